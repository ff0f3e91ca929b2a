"""`python -m minibldm.sample` with no arguments: the bundled tiny model (weights/tiny) on demo
inputs drawn by minibldm.synth, one defect image per category, with the full default method but
`--fg-weight 100` (FG_WEIGHT): the defect-region term weighs as much per pixel as the background's.
With the reference code's 1 the adaptation erased most specks and cracks the tiny model had drawn
(weights/tiny/README.md has the figures).

It writes minibldm_demo/ in the current directory: inputs/ (a synth dataset, seed 1: images the
tiny model never saw; it was trained on seed 0), one `python -m minibldm.sample` output folder per
category, and manifest.jsonl and preview.png over all of them. Running again resumes.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from ..images import save_png
from . import sample
from .synth import CATEGORIES, write_dataset

OUT = Path("minibldm_demo")
INPUT_SEED = 1  # the tiny model's training set is synth seed 0
DEMO_DEFECTS = {"fabric": "hole", "metal": "rust", "washer": "spot", "pill": "stain"}
FG_WEIGHT = "100"  # the adaptation's defect-region weight (reference code: 1; see above)


def sample_args(weights: Path, out: Path, category: str, defect: str) -> list[str]:
    """The `python -m minibldm.sample` arguments of one category's demo run."""
    root, meta = out / "inputs" / category, CATEGORIES[category]
    args = ["--weights", str(weights), "--images", str(root / "train" / "good"),
            "--defect-masks", str(root / "ground_truth" / defect),
            "--object", meta["object"], "--defect", meta["defects"][defect],
            "-n", "1", "--out", str(out / category), "--fg-weight", FG_WEIGHT]
    if meta["texture"]:
        return args + ["--texture"]
    return args + ["--foreground", str(root / "foreground" / "train" / "good")]


def main(weights: Path = sample.DEFAULT_WEIGHTS) -> int:
    """`python -m minibldm.sample` with no arguments."""
    if not (weights / "config.json").is_file():
        print(f"minibldm.sample: error: the bundled tiny model is missing ({weights}/config.json); "
              "run with --weights DIR --images DIR --defect-masks DIR --object NAME --defect NAME "
              "-n N --out OUT", file=sys.stderr)
        return 2
    return run(weights)


def write_inputs(folder: Path) -> None:
    """The demo's good images, masks and foregrounds: a synth dataset the model never saw."""
    write_dataset(folder, per_class=2, seed=INPUT_SEED, size=128, test_good=0, test_per_defect=4,
                  categories=list(DEMO_DEFECTS), log=None)


def run(weights: Path, out: Path = OUT, log=sys.stderr) -> int:
    """Write the demo inputs, sample once per category, and gather the manifests and previews.
    Returns 0, or the first failing run's status."""
    t0 = time.perf_counter()
    print(f"minibldm demo: the tiny model in {weights} on synthetic inputs; writing {out}/",
          file=log, flush=True)
    write_inputs(out / "inputs")
    rows, previews = [], []
    for category, defect in DEMO_DEFECTS.items():
        argv = sample_args(weights, out, category, defect)
        print(f"{category}: python -m minibldm.sample {' '.join(argv)}", file=log, flush=True)
        status = sample.main(argv)  # bad input: one line on stderr, status 2
        if status:
            return status
        folder = out / category
        for line in (folder / "minibldm" / "manifest.jsonl").read_text().splitlines():
            rec = json.loads(line)
            rows.append({"category": category, **rec, "image": f"{category}/{rec['image']}",
                         "mask": f"{category}/{rec['mask']}"})
        previews += [np.load(r, allow_pickle=False) for r in  # the run's preview rows, lossless
                     sorted((folder / "minibldm" / "preview-rows").glob(f"{rec['run']}_*.npy"))]
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    save_png(np.concatenate(previews, axis=0), out / "preview.png")
    print(f"minibldm demo: {len(rows)} defect images in {time.perf_counter() - t0:.0f} s; look at "
          f"{out / 'preview.png'} (per row: good image | trimap | sample | after decoder "
          f"adaptation | mask in red)", file=log, flush=True)
    return 0
