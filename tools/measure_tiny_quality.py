"""Measure a trained minibldm model on held-out synthetic images, the figures of
weights/tiny/README.md:

1. autoencoder reconstruction PSNR (posterior mean, decoded) on each category's test/good images,
   and per defect type the mean reconstruction error inside the masks of the first 6 held-out
   defect images, |decode(encode(x)) - x| on the 0..255 scale (a defect the autoencoder smooths
   away cannot be drawn by anything downstream); `--no-sampling` stops here;
2. per category, `python -m minibldm.sample` with the default method on the test/good images (never
   trained on) with masks sampled from the category's held-out defect masks: the background PSNR
   against x_OK before and after the decoder adaptation (from the manifest), and the mean absolute
   change inside the mask, |x - x_OK| on the 0..255 scale (a defect must actually appear).

    python tools/measure_tiny_quality.py --data DATA_DIR [--weights weights/tiny] [-n 5]
        [--out runs/quality] [--json quality.json] [--latent-mask nearest|cover] [--fg-weight W]

DATA_DIR holds the categories (python -m minibldm.synth DATA_DIR); the split of the run that
trained the control branch is not needed: test/ images are never trained on.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

import minibldm
from minibldm import sample
from minibldm.commands.synth import CATEGORIES
from minibldm.images import mask_to_tensor, read_image, read_mask, to_tensor
from minibldm.pipeline import psnr

REPO = Path(__file__).resolve().parent.parent


@torch.no_grad()
def reconstruction_psnr(m, folder: Path, size: int) -> list[float]:
    out = []
    for f in sorted(folder.glob("*.png")):
        x = to_tensor(read_image(f), size)[None]
        rec = m.autoencoder.decode(m.autoencoder.encode(x)).clamp(-1, 1)
        out.append(psnr(rec, x, torch.ones_like(x[:, :1])))
    return out


@torch.no_grad()
def reconstruction_error_in_masks(m, root: Path, defects, size: int, n: int = 6) -> dict:
    """Per defect type: mean |decode(encode(x)) - x| (0..255, over the channels) on the mask
    pixels of the first n test/<defect> images."""
    out = {}
    for d in defects:
        total, count = 0.0, 0.0
        for f in sorted((root / "test" / d).glob("*.png"))[:n]:
            x = to_tensor(read_image(f), size)[None]
            mask = mask_to_tensor(read_mask(root / "ground_truth" / d / f"{f.stem}_mask.png")[0], size)
            rec = m.autoencoder.decode(m.autoencoder.encode(x)).clamp(-1, 1)
            total += float(((rec - x).abs().mean(1)[0] * mask).sum()) * 127.5
            count += float(mask.sum())
        out[d] = total / max(count, 1.0)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="synthetic dataset folder")
    p.add_argument("--weights", default=str(REPO / "weights" / "tiny"))
    p.add_argument("-n", type=int, default=5, help="images per category for the sampling figures")
    p.add_argument("--out", default="runs/quality", help="folder for the sample runs")
    p.add_argument("--json", help="write the figures here as JSON")
    p.add_argument("--latent-mask", default="nearest", help="passed to minibldm.sample")
    p.add_argument("--no-sampling", action="store_true", help="the autoencoder figures only")
    p.add_argument("--fg-weight", default="1", help="passed to minibldm.sample (the adaptation's "
                   "defect-region weight; 1 is the reference code's)")
    args = p.parse_args(argv)
    data, out = Path(args.data), Path(args.out)
    m = minibldm.load(args.weights)
    size = json.loads((Path(args.weights) / "config.json").read_text()).get("image_size", 256)
    with safe_open(str(Path(args.weights) / "control.safetensors"), "pt") as f:
        ctrl = json.loads((f.metadata() or {}).get("objects", "{}"))  # object -> trained defects
    result = {}
    for cat, meta in CATEGORIES.items():
        if not (data / cat).is_dir():
            continue
        t0 = time.perf_counter()
        rec = reconstruction_psnr(m, data / cat / "test" / "good", size)
        in_masks = reconstruction_error_in_masks(m, data / cat, meta["defects"], size)
        print(f"{cat:7s} AE PSNR {statistics.median(rec):.1f} dB | AE error in the defect masks "
              + ", ".join(f"{d} {e:.1f}" for d, e in in_masks.items()) + " /255", flush=True)
        result[cat] = {"reconstruction_psnr_median": statistics.median(rec),
                       "reconstruction_images": len(rec), "reconstruction_error_in_masks": in_masks}
        if args.no_sampling:
            continue
        rows = []
        for i, defect in enumerate(ctrl.get(meta["object"], list(meta["defects"]))):
            # n images per category, split over its defect types
            n = args.n // len(meta["defects"]) + (i < args.n % len(meta["defects"]))
            if n == 0:
                continue
            run = out / cat / defect
            argv = ["--weights", args.weights, "--images", str(data / cat / "test" / "good"),
                    "--defect-masks", str(data / cat / "ground_truth" / defect),
                    "--object", meta["object"], "--defect", meta["defects"][defect],
                    "-n", str(n), "--out", str(run), "--quiet", "--latent-mask", args.latent_mask,
                    "--fg-weight", args.fg_weight]
            argv += ["--texture"] if meta["texture"] else [
                "--foreground", str(data / cat / "foreground" / "test" / "good")]
            t0 = time.time()
            if sample.main(argv):
                return 2
            seconds = (time.time() - t0) / n  # per image, loading the model included
            for line in (run / "minibldm" / "manifest.jsonl").read_text().splitlines():
                r = json.loads(line)
                x = read_image(run / r["image"]).astype(np.float64)
                x_ok = np.asarray(to_tensor(read_image(r["source"]), size).permute(1, 2, 0) * 127.5 + 127.5)
                mask = read_image(run / r["mask"])[..., 0] > 127
                change = np.abs(x - np.round(x_ok))[mask].mean()
                rows.append({"defect": defect, "psnr_bg_before": r["psnr_bg_before"],
                             "psnr_bg_after": r["psnr_bg_after"], "mask_change": float(change),
                             "seconds": seconds})
        result[cat].update({
            "psnr_bg_before_median": statistics.median(r["psnr_bg_before"] for r in rows),
            "psnr_bg_after_median": statistics.median(r["psnr_bg_after"] for r in rows),
            "mask_change_mean": statistics.mean(r["mask_change"] for r in rows),
            "seconds_per_image": statistics.mean(r["seconds"] for r in rows), "images": rows})
        s = result[cat]
        print(f"{cat:7s} background PSNR "
              f"{s['psnr_bg_before_median']:.1f} -> {s['psnr_bg_after_median']:.1f} dB | change in "
              f"mask {s['mask_change_mean']:.1f}/255 | {len(rows)} images, "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
