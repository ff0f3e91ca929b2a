"""Time the autoencoder's upsampling layer (2x nearest-neighbour, then a 3x3 convolution) as
written and through minibldm.fast.conv.upsample_conv3x3 (fast.optimize's GridUpsample), forward
alone and forward + backward, over a grid of channel counts and input sizes. It is how the
default of fast.optimize's upsample_min_channels was chosen.

    python tools/measure_upsample.py [--channels 32 64 128 256 512] [--sizes 32 64 128]
                                     [--repeats 5] [--channels-last]

Prints one markdown row per shape: milliseconds (median of --repeats after one warm-up) and the
route's speed-up. Batch 1, float32, the current device's threads (a CPU by default).
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from bench import timed  # tools/bench.py, beside this file

from minibldm.fast.conv import upsample_conv3x3


def plain(x, w, b):
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), w, b, padding=1)


def forward(fn, x, w, b, up):
    with torch.no_grad():
        fn(x, w, b)


def backward(fn, x, w, b, up):  # forward and both gradients
    torch.autograd.grad(fn(x, w, b), (x, w, b), up)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--channels", type=int, nargs="+", default=[32, 64, 128, 256, 512])
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128], help="input side")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--channels-last", action="store_true")
    args = p.parse_args(argv)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'channels-last' if args.channels_last else 'default memory order'}", file=sys.stderr)
    print("| channels | input | forward: plain / route ms | speed-up "
          "| forward + backward: plain / route ms | speed-up |")
    print("|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for c in args.channels:
        for s in args.sizes:
            x = torch.randn(1, c, s, s, generator=g).contiguous(memory_format=fmt).requires_grad_()
            w = (0.02 * torch.randn(c, c, 3, 3, generator=g)).contiguous(memory_format=fmt)
            w.requires_grad_()
            b = torch.randn(c, generator=g, requires_grad=True)
            up = torch.randn(1, c, 2 * s, 2 * s, generator=g).contiguous(memory_format=fmt)
            row = [1e3 * timed(lambda: step(fn, x, w, b, up), x.device, args.repeats)["median_s"]
                   for step in (forward, backward) for fn in (plain, upsample_conv3x3)]
            print(f"| {c} | {s}² | {row[0]:.1f} / {row[1]:.1f} | {row[0] / row[1]:.2f}× "
                  f"| {row[2]:.1f} / {row[3]:.1f} | {row[2] / row[3]:.2f}× |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
