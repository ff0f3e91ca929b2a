#!/usr/bin/env python
"""How the full-resolution outputs of `python -m minibldm.sample` meet their source images.

    python tools/measure_fullres.py GENERATED [GENERATED ...] [--out RESULT.json]

For each image of each folder's manifest, against its source good image (same size):
  size          the image's (H, W), and the model size S it was made at;
  outside       pixels that differ from the source farther from M* than the blend reaches
                (M* grown by 2 x ceil(3 x max(h, w) / S) px: the 3-model-pixel margin and its
                feather, at the window's scale); the promise is 0;
  seam          the mean absolute difference between neighbouring pixels (horizontal and
                vertical) on the blend region's outer ring, output minus source: a visible
                seam raises it; 0 means the ring's texture is the source's;
  band          the mean |output - source| inside the blend region but outside M*, levels of 255;
  change        the manifest's change_in_mask (inside M*).
Prints a table and writes the per-image values and means as JSON with --out.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from minibldm.masks import dilate


def grow(mask: np.ndarray, r: int) -> np.ndarray:
    """The mask dilated by r pixels each way (the core's square dilation)."""
    return dilate(torch.from_numpy(mask), 2 * r + 1).numpy() > 0.5


def gradient(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = image.astype(np.float64).mean(-1)
    gx, gy = np.zeros_like(x), np.zeros_like(x)
    gx[:, :-1] = np.abs(np.diff(x, axis=1))
    gy[:-1] = np.abs(np.diff(x, axis=0))
    return gx, gy


def measure(folder: Path, record: dict, size: int) -> dict:
    image = np.asarray(Image.open(folder / record["image"]).convert("RGB"))
    mask = np.asarray(Image.open(folder / record["mask"])) > 127
    good = np.asarray(Image.open(record["source"]).convert("RGB"))
    if good.shape != image.shape:
        sys.exit(f"measure_fullres: {folder / record['image']} is {image.shape}, its source "
                 f"{record['source']} {good.shape}: not a full-resolution output")
    y, x, h, w = record.get("window", [0, 0, *image.shape[:2]])
    r = math.ceil(3 * max(h, w) / size)
    region = grow(mask, 2 * r)
    ring = grow(region, 1) & ~region
    diff = np.abs(image.astype(np.float64) - good).mean(-1)
    (ox, oy), (sx, sy) = gradient(image), gradient(good)
    seam = float(np.concatenate([(ox - sx)[ring], (oy - sy)[ring]]).mean())
    return {"image": record["image"], "size": list(image.shape[:2]), "model_size": size,
            "outside": int((diff[~region] > 0).sum()), "seam": round(seam, 4),
            "band": round(float(diff[region & ~mask].mean()), 3),
            "change": record.get("change_in_mask")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("generated", nargs="+")
    p.add_argument("--out")
    args = p.parse_args(argv)
    rows = []
    for folder in map(Path, args.generated):
        for line in (folder / "minibldm" / "manifest.jsonl").read_text().splitlines():
            record = json.loads(line)
            settings = json.loads((folder / "minibldm" / "runs" / f"{record['run']}.json").read_text())
            rows.append(measure(folder, record, settings["size"]))
    means = {k: float(np.mean([r[k] for r in rows])) for k in ("outside", "seam", "band", "change")}
    print("| images | pixels differing outside the blend | seam (gradient excess) | band | change in mask |")
    print("|---|---|---|---|---|")
    print(f"| {len(rows)} | {sum(r['outside'] for r in rows)} | {means['seam']:.3f} | "
          f"{means['band']:.2f} | {means['change']:.1f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"means": means, "images": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
