#!/usr/bin/env python
"""How long must the downstream detector train? The same detector at several lengths, for the
two baselines that need no generator, on one seed's split; the length is then chosen from the
training losses alone, by a rule fixed before any run (never from the test metrics).

    python tools/detector_lengths.py [--data DIR] [--work DIR] [--seed 0]
        [--lengths 400 1000 2000 4000] [--methods real-only crop-paste]

Each (method, length) is one `python -m minibldm.evaluate` run (its own cosine schedule, the
split k = 10 of --seed), written to WORK/METHOD_L.json and skipped when it exists, so the
command resumes; its wall time goes to WORK/wall_seconds.json. Then WORK/lengths.md gets the
test metrics of every run and the rule's choice, and WORK/losses.png the loss curves (one panel
per method, one line per length).

The rule (docs/RESULTS.md, fixed on 2026-12-02 before the first run): the final loss of a run
is its mean training loss over the last fifth of its steps. A length L is long enough when the
next length in the list lowers the final loss by less than 5 %, for every method. The chosen
length is the shortest that is long enough; if none is, the longest, reported as not converged.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from minibldm.io import write_text_atomic

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 0.05  # the rule's "less than 5 %"
COLOURS = [(30, 80, 200), (220, 120, 0), (40, 160, 60), (200, 30, 30), (120, 60, 170)]


def final_loss(result: dict) -> float:
    """The mean training loss over the last fifth of the run (its 50-span curve's last 10)."""
    curve = result["loss_curve"]
    tail = curve[-max(1, len(curve) // 5):]
    return sum(tail) / len(tail)


def choose(finals: dict[str, dict[int, float]], lengths: list[int]) -> tuple[int, bool]:
    """(length, converged): the rule above, on {method: {length: final loss}}."""
    for short, long in zip(lengths, lengths[1:]):
        if all(f[long] > (1 - TOLERANCE) * f[short] for f in finals.values()):
            return short, True
    return lengths[-1], False


def draw(results: dict[str, dict[int, dict]], path: Path) -> None:
    """One panel per method: the 50-span training loss of each length against its step."""
    W, H, pad = 520, 320, 48
    img = Image.new("RGB", (W * len(results), H), "white")
    d, font = ImageDraw.Draw(img), ImageFont.load_default()
    for p, (method, runs) in enumerate(results.items()):
        x0 = p * W
        values = [v for r in runs.values() for v in r["loss_curve"]]
        lo, hi = min(values), max(values)
        longest = max(runs)
        d.rectangle([x0 + pad, pad // 2, x0 + W - 12, H - pad], outline="black")
        d.text((x0 + pad, 6), f"{method}: detector training loss", fill="black", font=font)
        for k in range(5):
            v, s = lo + (hi - lo) * k / 4, longest * k / 4
            y = H - pad - (H - 1.5 * pad) * k / 4
            d.text((x0 + 4, y - 6), f"{v:.3f}", fill="black", font=font)
            d.text((x0 + pad + (W - pad - 12) * k / 4 - 10, H - pad + 6), f"{s:.0f}",
                   fill="black", font=font)
        for c, (length, r) in enumerate(sorted(runs.items())):
            curve, colour = r["loss_curve"], COLOURS[c % len(COLOURS)]
            pts = [(x0 + pad + (W - pad - 12) * (i + 0.5) / len(curve) * length / longest,
                    H - pad - (H - 1.5 * pad) * (v - lo) / max(hi - lo, 1e-12))
                   for i, v in enumerate(curve)]
            d.line(pts, fill=colour, width=2)
            d.text((x0 + W - 110, pad // 2 + 6 + 12 * c), f"{length} steps", fill=colour,
                   font=font)
        d.text((x0 + W // 2 - 10, H - 16), "step", fill="black", font=font)
    img.save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "magnetic_tile"))
    p.add_argument("--work", default="runs/detector_lengths")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lengths", type=int, nargs="+", default=[400, 1000, 2000, 4000])
    p.add_argument("--methods", nargs="+", default=["real-only", "crop-paste"])
    p.add_argument("--size", type=int, default=128)
    args = p.parse_args(argv)
    if not (Path(args.data) / "train" / "good").is_dir():
        print(f"detector_lengths: --data {args.data}: no train/good folder", file=sys.stderr)
        return 2
    if len(args.lengths) < 2 or sorted(set(args.lengths)) != args.lengths or args.lengths[0] < 1:
        print("detector_lengths: --lengths: give at least two, increasing", file=sys.stderr)
        return 2
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[int, dict]] = {m: {} for m in args.methods}
    walls_file = work / "wall_seconds.json"  # this tool's timing of each run it made
    walls = json.loads(walls_file.read_text()) if walls_file.is_file() else {}
    for length in args.lengths:  # the short runs of every method first
        for method in args.methods:
            out = work / f"{method}_{length}.json"
            if not out.is_file():
                cmd = [sys.executable, "-m", "minibldm.evaluate", "--data", args.data,
                       "--texture", "--method", method, "--k", "10", "--seed", str(args.seed),
                       "--detector-steps", str(length), "--size", str(args.size), "--out", str(out)]
                print("$ " + " ".join(cmd), flush=True)
                t0 = time.time()
                if subprocess.call(cmd, stdout=subprocess.DEVNULL):
                    print(f"detector_lengths: {method} at {length} steps failed", file=sys.stderr)
                    return 1
                walls[out.stem] = round(time.time() - t0, 1)
                write_text_atomic(walls_file, json.dumps(walls, indent=1) + "\n")
                print(f"  {walls[out.stem]:.0f} s", flush=True)
            results[method][length] = json.loads(out.read_text())
    finals = {m: {L: final_loss(r) for L, r in runs.items()} for m, runs in results.items()}
    length, converged = choose(finals, args.lengths)
    keys = ("pixel_auroc", "pixel_ap", "pixel_aupro", "pixel_f1_max", "image_auroc", "image_ap")
    rows = ["| method | steps | final loss | " + " | ".join(keys) + " | wall (s) |",
            "|" + "---|" * (len(keys) + 4)]
    for method, runs in results.items():
        for L, r in sorted(runs.items()):
            rows.append(f"| {method} | {L} | {finals[method][L]:.4f} | "
                        + " | ".join(f"{100 * r['mean'][k]:.1f}" for k in keys)
                        + (f" | {walls[f'{method}_{L}']:.0f} |" if f"{method}_{L}" in walls
                           else " | – |"))
    types = sorted(next(iter(results[args.methods[0]].values()))["per_type"])
    per_type = ["| method | steps | " + " | ".join(types) + " |", "|" + "---|" * (len(types) + 2)]
    for method, runs in results.items():
        for L, r in sorted(runs.items()):
            per_type.append(f"| {method} | {L} | " + " | ".join(
                f"{100 * r['per_type'][t]['pixel_ap']:.1f}" for t in types) + " |")
    verdict = (f"The rule chooses {length} steps" + ("" if converged else
               " (the longest: no length met the rule, so the detector is not converged)"))
    s = results[args.methods[0]][args.lengths[0]].get("settings", {})
    batches = (f", batches of {s['batch_size']} windows of {s.get('crop', args.size)} px"
               if "batch_size" in s else "")
    (work / "lengths.md").write_text(
        f"Detector at several lengths on {Path(args.data).name}, split k = 10 of seed "
        f"{args.seed}, {args.size} px{batches}; metrics in %, mean over defect types.\n\n"
        + "\n".join(rows) + f"\n\n{verdict}. Final loss: the mean training loss over the last "
        "fifth of the run. Wall: the whole evaluate command, as this tool timed it "
        "(wall_seconds.json; – for a run it did not make).\n\nPixel AP per defect type (%):\n\n"
        + "\n".join(per_type) + "\n")
    draw(results, work / "losses.png")
    print((work / "lengths.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
