"""The UNet's 3x3 convolution: nn.Conv2d, with a faster route for big weights on small grids.

At the SD 1.5 UNet's coarsest levels (8x8 and 4x4 latent cells for a 256 px image) a 3x3
convolution has 1280 to 2560 input channels, weights of 15 to 29 million numbers, and only 16 or
64 positions. On a CPU, oneDNN's convolution is several times slower than its matrix product on
such shapes (it works its way through the weights in another layout). The same product written
as im2col (unfold: each 3x3 neighbourhood becomes one row) times the weight matrix is one plain
matrix product, and it is what this module runs there at inference: for shapes, thresholds and
the measured gain see docs/BENCHMARKS.md. Small weights (the tiny model's, for one) and
training keep nn.Conv2d.

The weights, the state-dict keys and the result are those of nn.Conv2d, up to the order of the
sums. A port to another runtime can use its own convolution here.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

SMALL_GRID = 64  # at most this many positions (8x8) ...
BIG_WEIGHT = 2 ** 22  # ... and at least this many weights (4.2 M; 1280 x 1280 x 9 is 14.7 M)


def conv3x3_as_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """conv2d(x, weight, bias, padding=1) for a 3x3 kernel, as unfold + one matrix product.
    x: (B, C, H, W), weight: (O, C, 3, 3). Returns (B, O, H, W) in channels-last memory order."""
    b, _, h, w = x.shape
    cols = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(b * h * w, -1)  # (B*H*W, C*9)
    y = F.linear(cols, weight.reshape(weight.shape[0], -1), bias)  # (B*H*W, O)
    return y.view(b, h, w, -1).permute(0, 3, 1, 2)


class Conv2d(nn.Conv2d):
    """nn.Conv2d. At inference on a CPU, a 3x3, stride-1, padding-1 convolution with at least
    BIG_WEIGHT weights over at most SMALL_GRID positions takes the matrix-product route above.
    torch.export always sees the plain convolution (a port gets the network as written)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.as_matmul = (self.kernel_size == (3, 3) and self.stride == (1, 1)
                          and self.padding == (1, 1) and self.dilation == (1, 1)
                          and self.groups == 1 and self.padding_mode == "zeros"
                          and self.weight.numel() >= BIG_WEIGHT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.as_matmul and x.device.type == "cpu" and x.dim() == 4 and not torch.is_grad_enabled()
                and x.shape[-2] * x.shape[-1] <= SMALL_GRID and not torch.compiler.is_exporting()):
            return conv3x3_as_matmul(x, self.weight, self.bias)
        return super().forward(x)
