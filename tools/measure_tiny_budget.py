"""Time the two costs that bound the embedded demo for the TINY preset: one decoder adaptation
step (forward, loss, backward, AdamW) at the preset's resolution, and one guided UNet +
trimap-branch step, both with the fast layer as the sample command applies it. Random weights;
the numbers size the preset, not its quality.

    python tools/measure_tiny_budget.py [--size 128] [--repeats 10] [--factor 8|4]

--factor 4: the same preset with an f = 4 autoencoder (one level fewer, ch_mult 1,2,4) and its
f4 trimap embedder, so the UNet works on latents of a quarter of the image's side (32 x 32 at
128 px) instead of an eighth: what a latent fine enough for thin defects costs.
"""
import argparse
import dataclasses
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
    p.add_argument("--factor", type=int, choices=(8, 4), default=8,
                   help="the autoencoder's factor f (TINY's is 8)")
    args = p.parse_args()
    cfg = TINY
    if args.factor != cfg.autoencoder.factor:
        levels = args.factor.bit_length()  # 1 + log2(f) resolution levels
        cfg = dataclasses.replace(
            cfg, autoencoder=dataclasses.replace(cfg.autoencoder,
                                                 ch_mult=cfg.autoencoder.ch_mult[:levels]),
            unet=dataclasses.replace(cfg.unet, hint_factor=args.factor))
    f = cfg.autoencoder.factor
    ae, unet, ctrl = (Autoencoder(cfg.autoencoder).eval(), UNet(cfg.unet).eval(),
                      ControlNet(cfg.unet).eval())
    fast.optimize(Models(cfg, ae, unet, None, None, ctrl))
    h = ae.decoder_input(torch.randn(1, cfg.autoencoder.embed_dim, args.size // f, args.size // f)).detach()
    x, mask = torch.rand(1, 3, args.size, args.size) * 2 - 1, torch.zeros(1, 1, args.size, args.size)
    fast.adapt_decoder(ae.decoder, h, x, mask, AdaptConfig(steps=2))  # warm-up
    t0 = time.perf_counter()
    fast.adapt_decoder(ae.decoder, h, x, mask, AdaptConfig(steps=args.repeats))
    adapt = (time.perf_counter() - t0) / args.repeats

    z = torch.randn(1, 4, args.size // f, args.size // f)
    ctx = torch.randn(1, 77, cfg.unet.context_dim)
    eps = guided_eps(unet, ctrl, ctx, ctx, torch.rand(1, 3, args.size, args.size), 9.0)
    t = torch.tensor([500])
    with torch.no_grad():
        eps(z, t)
        t0 = time.perf_counter()
        for _ in range(args.repeats):
            eps(z, t)
    step = (time.perf_counter() - t0) / args.repeats
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.size}x{args.size}, "
          f"f = {f} (latents {args.size // f}x{args.size // f})")
    print(f"decoder adaptation step: {adapt * 1e3:.0f} ms (200 steps: {adapt * 200:.1f} s)")
    print(f"guided UNet + trimap step: {step * 1e3:.0f} ms (50 steps: {step * 50:.1f} s)")


if __name__ == "__main__":
    main()
