"""`python -m minibldm.sample` with no arguments: the bundled tiny model (weights/tiny) on demo
inputs drawn by minibldm.synth, one defect image per category, with the full default method
(50 DDIM steps in three stages, 200 decoder-adaptation steps), except for one weight: the
adaptation's defect-region term weighs as much per pixel as the background's (`--fg-weight 100`,
FG_WEIGHT below). With the reference code's weighting (1 against 100) the adaptation pulls a
small or thin defect back to the background around it, and on the tiny model it erased most
specks and cracks that the sampler had drawn (weights/tiny/README.md has the figures).

    minibldm_demo/inputs/<category>/...          the demo inputs (a synth dataset, seed 1: images
                                                 the tiny model never saw; it was trained on seed 0)
    minibldm_demo/<category>/test/<defect>/000.png, ground_truth/..., manifest.jsonl, preview.png
                                                 one `python -m minibldm.sample` run per category
    minibldm_demo/manifest.jsonl                 every image's record, with its category
    minibldm_demo/preview.png                    every category's preview, one row each

The folder is made in the current directory; running again resumes (nothing is redone).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

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


def run(weights: Path, generate, parse_args, out: Path = OUT, log=sys.stderr) -> int:
    """Write the demo inputs, run `generate` (sample.generate) once per category, and gather the
    manifests and previews. Returns 0, or the first failing run's status."""
    t0 = time.perf_counter()
    print(f"minibldm demo: the tiny model in {weights} on synthetic inputs; writing {out}/",
          file=log, flush=True)
    write_dataset(out / "inputs", per_class=2, seed=INPUT_SEED, size=128, test_good=0,
                  test_per_defect=4, categories=list(DEMO_DEFECTS), log=None)
    rows, previews = [], []
    for category, defect in DEMO_DEFECTS.items():
        argv = sample_args(weights, out, category, defect)
        print(f"{category}: python -m minibldm.sample {' '.join(argv)}", file=log, flush=True)
        status = generate(parse_args(argv))
        if status:
            return status
        folder = out / category
        for line in (folder / "manifest.jsonl").read_text().splitlines():
            rec = json.loads(line)
            name = CATEGORIES[category]["defects"][defect].replace(" ", "_")
            rows.append({"category": category, "image": f"{category}/test/{name}/{rec['index']:03d}.png",
                         "mask": f"{category}/ground_truth/{name}/{rec['index']:03d}_mask.png", **rec})
        previews.append(np.asarray(Image.open(folder / "preview.png").convert("RGB")))
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    Image.fromarray(np.concatenate(previews, axis=0)).save(out / "preview.png")
    print(f"minibldm demo: {len(rows)} defect images in {time.perf_counter() - t0:.0f} s; look at "
          f"{out / 'preview.png'} (per row: good image | trimap | sample | after decoder "
          f"adaptation | mask in red)", file=log, flush=True)
    return 0
