"""Two faster routes to the same 3x3 convolutions on a CPU: the UNet's big weights on small
grids (Conv2d, just below), and the autoencoder's upsample-then-convolve (upsample_conv, at the
end). Elsewhere (a GPU: not measured there yet) the layers run as written.

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


# The upsampling route (autoencoder.Upsample). A 2x nearest-neighbour upsampling followed by a 3x3
# convolution reads each input pixel four times: output pixel (2i + a, 2j + b) sees a 3x3 window of
# the upsampled image, and that window holds only 2x2 distinct input pixels. Along each axis, phase
# 0 (even outputs) reads input rows (i - 1, i) with the kernel rows (0, 1 + 2) summed onto them,
# phase 1 (odd) reads rows (i, i + 1) with (0 + 1, 2). So the whole layer is four 2x2 convolutions
# over the input grid, one per output phase, with kernels folded from the 3x3 one: 16 multiplies per
# input pixel and channel pair instead of 36, the same sums in another order. The fold is linear
# in the weight, so gradients reach the 3x3 kernel through it (the decoder adaptation trains it).
# At SD 1.5 size the decoder's three upsampling convolutions are 28% of its work. Measured with
# tools/measure_upsample.py (docs/BENCHMARKS.md): below 128 channels, on small grids, the 2x2
# convolutions run too inefficiently and the route loses, so it starts at 128.
UPSAMPLE_MIN_CHANNELS = 128
FOLD = ((1.0, 0.0, 0.0), (0.0, 1.0, 1.0)), ((1.0, 1.0, 0.0), (0.0, 0.0, 1.0))  # [phase][tap][row]


def upsample_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """conv2d(interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1) for a 3x3
    kernel, computed on x's grid. x: (B, C, H, W), weight: (O, C, 3, 3). Returns (B, O, 2H, 2W),
    in x's memory order (channels-last in, channels-last out)."""
    b, _, h, w = x.shape
    fold = torch.tensor(FOLD, dtype=weight.dtype, device=weight.device)
    kernels = torch.einsum("ayr,bxs,ocrs->abocyx", fold, fold, weight)  # (2, 2, O, C, 2, 2)
    xp = F.pad(x, (1, 1, 1, 1))
    # phase (a, b) reads the padded rows a .. a + H and columns b .. b + W
    phases = [[F.conv2d(xp[:, :, a:a + h + 1, c:c + w + 1], kernels[a, c], bias) for c in (0, 1)]
              for a in (0, 1)]
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        y = torch.stack([torch.stack([p.permute(0, 2, 3, 1) for p in row], 3) for row in phases], 2)
        return y.reshape(b, 2 * h, 2 * w, -1).permute(0, 3, 1, 2)  # (B, H, a, W, b, O) underneath
    y = torch.stack([torch.stack(row, -1) for row in phases], 3)  # (B, O, H, a, W, b)
    return y.reshape(b, -1, 2 * h, 2 * w)


def upsample_conv(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """conv(2x nearest upsampling of x): through upsample_conv3x3 on a CPU from
    UPSAMPLE_MIN_CHANNELS on, else as written (torch.export too: a port gets the plain layers)."""
    if (x.device.type == "cpu" and x.dim() == 4 and x.shape[1] >= UPSAMPLE_MIN_CHANNELS
            and conv.kernel_size == (3, 3) and conv.padding == (1, 1) and conv.stride == (1, 1)
            and not torch.compiler.is_exporting()):
        return upsample_conv3x3(x, conv.weight, conv.bias)
    return conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
