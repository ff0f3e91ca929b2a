"""Speed and background quality of `--adapt-blocks N` (adapt only the decoder's head and last N
up levels) against the full decoder adaptation (200 steps at lr 1e-4, the method), on one
held-out good image per case of a synthetic dataset, with a real defect mask of that category;
optionally with fewer steps and other learning rates, to look for a faster setting.

    python tools/measure_adapt_blocks.py --data DATA_DIR [--weights weights/tiny] [--blocks 2 1 0]
        [--steps 200 ...] [--lr 1e-4 ...] [--cases pill:crack fabric:hole washer:scratch]
"""
import argparse
import itertools
import statistics
import time
from pathlib import Path

import torch

import minibldm
from minibldm import fast
from minibldm.config import AdaptConfig
from minibldm.images import mask_to_tensor, read_image, read_mask, to_tensor
from minibldm.pipeline import psnr

REPO = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--weights", default=str(REPO / "weights" / "tiny"))
    p.add_argument("--blocks", type=int, nargs="+", default=[2, 1, 0])
    p.add_argument("--steps", type=int, nargs="+", default=[200], help="adaptation steps to try")
    p.add_argument("--lr", type=float, nargs="+", default=[1e-4], help="learning rates to try")
    p.add_argument("--cases", nargs="+", default=["pill:crack", "fabric:hole", "washer:scratch"],
                   metavar="CATEGORY:DEFECT", help="one image per case: test/good/000.png with "
                   "the defect's first mask")
    p.add_argument("--size", type=int, default=128)
    args = p.parse_args()
    m, data, res = fast.optimize(minibldm.load(args.weights)), Path(args.data), {}  # as sample
    settings = [(None, 200, 1e-4)] + list(itertools.product(args.blocks, args.steps, args.lr))
    for cat, defect in (c.split(":") for c in args.cases):
        x = to_tensor(read_image(data / cat / "test" / "good" / "000.png"), args.size)[None]
        mask = mask_to_tensor(read_mask(data / cat / "ground_truth" / defect / "000_mask.png")[0],
                              args.size)[None, None]
        with torch.no_grad():
            h = m.autoencoder.decoder_input(m.autoencoder.encode(x, torch.Generator().manual_seed(0)))
        for blocks, steps, lr in settings:
            t0 = time.perf_counter()
            out, losses = fast.adapt_decoder(m.autoencoder.decoder, h, x, mask,
                                             AdaptConfig(steps=steps, lr=lr), blocks=blocks)
            row = (time.perf_counter() - t0, psnr(out, x, 1 - mask), losses[0][-1])
            res.setdefault((blocks, steps, lr), []).append(row)
            print(f"{cat} blocks={blocks} steps={steps} lr={lr:g}: {row[0]:.1f} s, background "
                  f"PSNR {row[1]:.2f} dB, final loss {row[2]:.5f}", flush=True)
    full = statistics.mean(r[0] for r in res[settings[0]])
    full_psnr = statistics.mean(r[1] for r in res[settings[0]])
    for (blocks, steps, lr), rows in res.items():
        s, q = statistics.mean(r[0] for r in rows), statistics.mean(r[1] for r in rows)
        print(f"blocks={blocks} steps={steps} lr={lr:g}: {s:.2f} s per image ({full / s:.1f}x "
              f"the full method), mean background PSNR {q:.2f} dB ({q - full_psnr:+.2f})")


if __name__ == "__main__":
    main()
