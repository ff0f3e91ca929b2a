"""Two faster routes to the same 3x3 convolutions on a CPU, swapped in by fast.optimize with the
same parameters and keys: MatmulConv2d (big weights on small grids) and GridUpsample.

At the SD 1.5 UNet's coarsest levels (8x8 and 4x4 latent cells for a 256 px image) a 3x3
convolution has 1280 to 2560 input channels, 15 to 29 million weights and only 16 or 64
positions. There oneDNN's convolution is several times slower on a CPU than a matrix product
(it walks the weights in another layout), so MatmulConv2d runs it at inference as im2col
(unfold: each 3x3 neighbourhood one row) times the weight matrix: nn.Conv2d's result up to the
order of the sums (shapes, thresholds and the measured gain: docs/BENCHMARKS.md).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

SMALL_GRID = 64  # MatmulConv2d's route: at most this many positions (8x8) ...
BIG_WEIGHT = 2 ** 22  # ... and at least this many weights (4.2 M; 1280 x 1280 x 9 is 14.7 M)
UPSAMPLE_MIN_CHANNELS = 128  # GridUpsample from this width on (below, 2x2 convolutions lose)


def conv3x3_as_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """conv2d(x, weight, bias, padding=1) for a 3x3 kernel, as unfold + one matrix product.
    x: (B, C, H, W), weight: (O, C, 3, 3). Returns (B, O, H, W) in channels-last memory order."""
    b, _, h, w = x.shape
    cols = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(b * h * w, -1)  # (B*H*W, C*9)
    y = F.linear(cols, weight.reshape(weight.shape[0], -1), bias)  # (B*H*W, O)
    return y.view(b, h, w, -1).permute(0, 3, 1, 2)


# The upsampling route (autoencoder.Upsample). 2x nearest upsampling then a 3x3 convolution reads
# each input pixel four times: output pixel (2i + a, 2j + b) sees a 3x3 window of the upsampled
# image holding only 2x2 distinct input pixels. Along each axis, phase 0 (even outputs) reads input
# rows (i - 1, i) with the kernel rows (0, 1 + 2) summed onto them, phase 1 (odd) rows (i, i + 1)
# with (0 + 1, 2). So the layer is four 2x2 convolutions over the input grid, one per output
# phase, with kernels folded from the 3x3 one: 16 multiplies per input pixel and channel pair
# instead of 36, the same sums in another order. The fold is linear in the weight, so gradients
# reach the 3x3 kernel (the decoder adaptation trains it). tools/measure_upsample.py measures it.
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


def is_plain_3x3(conv: nn.Conv2d) -> bool:
    """A 3x3, stride-1, padding-1 convolution without groups or dilation."""
    return (conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros")


class MatmulConv2d(nn.Module):
    """An nn.Conv2d's parameters (same keys), run as conv3x3_as_matmul at inference on grids of
    at most `small_grid` positions; as the convolution otherwise (training, bigger grids)."""

    def __init__(self, conv: nn.Conv2d, small_grid: int = SMALL_GRID):
        super().__init__()
        self.weight, self.bias, self.small_grid = conv.weight, conv.bias, small_grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() and x.shape[-2] * x.shape[-1] <= self.small_grid:
            return conv3x3_as_matmul(x, self.weight, self.bias)
        return F.conv2d(x, self.weight, self.bias, padding=1)


class GridUpsample(nn.Module):
    """autoencoder.Upsample (same `conv` child and keys), computed on the input grid by
    upsample_conv3x3. Differentiable: the decoder adaptation trains through it."""

    def __init__(self, upsample: nn.Module):
        super().__init__()
        self.conv = upsample.conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return upsample_conv3x3(x, self.conv.weight, self.conv.bias)
