"""Time the two costs that bound the embedded demo for the TINY preset: one decoder adaptation
step (forward, loss, backward, AdamW) at the preset's resolution, and one guided UNet +
trimap-branch step, both with the fast layer as the sample command applies it. Random weights;
the numbers size the preset, not its quality.

    python tools/measure_tiny_budget.py [--size 128] [--repeats 10]
"""
import argparse
import time

import torch

from minibldm import fast
from minibldm.autoencoder import Autoencoder
from minibldm.config import TINY, AdaptConfig
from minibldm.control import ControlNet
from minibldm.sampler import guided_eps
from minibldm.unet import UNet
from minibldm.weights import Models


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=TINY.autoencoder.resolution)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    f = TINY.autoencoder.factor
    ae, unet, ctrl = (Autoencoder(TINY.autoencoder).eval(), UNet(TINY.unet).eval(),
                      ControlNet(TINY.unet).eval())
    fast.optimize(Models(TINY, ae, unet, None, None, ctrl))
    h = ae.decoder_input(torch.randn(1, TINY.autoencoder.embed_dim, args.size // f, args.size // f)).detach()
    x, mask = torch.rand(1, 3, args.size, args.size) * 2 - 1, torch.zeros(1, 1, args.size, args.size)
    fast.adapt_decoder(ae.decoder, h, x, mask, AdaptConfig(steps=2))  # warm-up
    t0 = time.perf_counter()
    fast.adapt_decoder(ae.decoder, h, x, mask, AdaptConfig(steps=args.repeats))
    adapt = (time.perf_counter() - t0) / args.repeats

    z = torch.randn(1, 4, args.size // f, args.size // f)
    ctx = torch.randn(1, 77, TINY.unet.context_dim)
    eps = guided_eps(unet, ctrl, ctx, ctx, torch.rand(1, 3, args.size, args.size), 9.0)
    t = torch.tensor([500])
    with torch.no_grad():
        eps(z, t)
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            eps(z, t)
    step = (time.perf_counter() - t0) / args.repeats
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.size}x{args.size}")
    print(f"decoder adaptation step: {adapt * 1e3:.0f} ms (200 steps: {adapt * 200:.1f} s)")
    print(f"guided UNet + trimap step: {step * 1e3:.0f} ms (50 steps: {step * 50:.1f} s)")


if __name__ == "__main__":
    main()
