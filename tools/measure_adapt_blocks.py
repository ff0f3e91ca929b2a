"""Speed and background quality of `--adapt-blocks N` (adapt only the decoder's head and last N
up levels) against the full decoder adaptation, 200 steps each, on one held-out good image per
category of a synthetic dataset, with a real defect mask of that category.

    python tools/measure_adapt_blocks.py --data DATA_DIR [--weights weights/tiny] [--blocks 2 1 0]
"""
import argparse
import statistics
import time
from pathlib import Path

import torch

import minibldm
from minibldm.adapt import adapt_decoder
from minibldm.data import mask_to_tensor, read_image, read_mask, to_tensor
from minibldm.sample import psnr

REPO = Path(__file__).resolve().parent.parent
CASES = (("pill", "crack"), ("fabric", "hole"), ("washer", "scratch"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True)
    p.add_argument("--weights", default=str(REPO / "weights" / "tiny"))
    p.add_argument("--blocks", type=int, nargs="+", default=[2, 1, 0])
    p.add_argument("--size", type=int, default=128)
    args = p.parse_args()
    m, data, res = minibldm.load(args.weights), Path(args.data), {}
    for cat, defect in CASES:
        x = to_tensor(read_image(data / cat / "test" / "good" / "000.png"), args.size)[None]
        mask = mask_to_tensor(read_mask(data / cat / "ground_truth" / defect / "000_mask.png")[0],
                              args.size)[None, None]
        with torch.no_grad():
            h = m.autoencoder.decoder_input(m.autoencoder.encode(x, torch.Generator().manual_seed(0)))
        for blocks in [None] + args.blocks:
            t0 = time.perf_counter()
            out, losses = adapt_decoder(m.autoencoder.decoder, h, x, mask, 200, blocks=blocks)
            row = (time.perf_counter() - t0, psnr(out, x, 1 - mask), losses[-1])
            res.setdefault(blocks, []).append(row)
            print(f"{cat} blocks={blocks}: {row[0]:.1f} s, background PSNR {row[1]:.2f} dB, "
                  f"final loss {row[2]:.5f}", flush=True)
    full = statistics.mean(r[0] for r in res[None])
    for blocks, rows in res.items():
        s = statistics.mean(r[0] for r in rows)
        print(f"blocks={blocks}: {s:.2f} s per image ({full / s:.1f}x the full method), mean "
              f"background PSNR {statistics.mean(r[1] for r in rows):.2f} dB")


if __name__ == "__main__":
    main()
