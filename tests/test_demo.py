"""`python -m minibldm.sample` with no arguments: the bundled tiny model's demo, run as a user
runs it: one image per category with its prompt, masks inside the foreground, the background
kept by the decoder adaptation, a visible defect in each, and a rerun that resumes. (The
model's quality over many images and every defect type is measured in weights/tiny/README.md.)"""
import json
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from minibldm.commands.demo import DEMO_DEFECTS, FG_WEIGHT, write_inputs
from minibldm.commands.sample import DEFAULT_WEIGHTS
from minibldm.commands.synth import CATEGORIES


@pytest.mark.slow
def test_demo_runs_from_nothing(tmp_path):
    assert (DEFAULT_WEIGHTS / "config.json").is_file(), "weights/tiny is part of the repository"
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "minibldm.sample"], cwd=tmp_path, capture_output=True,
                       text=True)
    seconds = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr
    out = tmp_path / "minibldm_demo"
    assert "minibldm_demo/preview.png" in r.stderr
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [row["category"] for row in rows] == list(DEMO_DEFECTS)
    for row in rows:
        cat = row["category"]
        image = np.asarray(Image.open(out / row["image"]).convert("RGB")).astype(float)
        mask = np.asarray(Image.open(out / row["mask"])) > 127
        source = tmp_path / row["source"]  # relative to where the demo ran
        good = np.asarray(Image.open(source).convert("RGB")).astype(float)
        assert image.shape == good.shape and mask.shape == image.shape[:2]
        assert row["stages"]["steps"] == 50 and len(row["prompt"]) > 0
        assert row["prompt"] == f"a {CATEGORIES[cat]['object']} with a " \
                                f"{CATEGORIES[cat]['defects'][DEMO_DEFECTS[cat]]}"
        if not CATEGORIES[cat]["texture"]:  # the mask lies on the object
            fg = np.asarray(Image.open(str(source).replace("/train/good/", "/foreground/train/good/"))) > 127
            assert mask.sum() > 0 and (mask & ~fg).sum() == 0, cat
        # a defect appears in every category: the demo's types are ones the tiny model draws
        # (hole 48.6, rust 43.7, contamination 138.5, stain 60.8 / 255 when measured); its
        # scratches and threads do not show yet (weights/tiny/README.md)
        change = np.abs(image - good).mean(-1)[mask].mean()
        assert change > 20, (cat, change)
        settings = json.loads((out / cat / "minibldm" / "runs" / f"{row['run']}.json").read_text())
        assert settings["fg_weight"] == float(FG_WEIGHT) and settings["adapt_steps"] == 200, settings
        # the background is kept: the adaptation's job, and it must improve on the frozen decoder
        assert row["psnr_bg_after"] > 30 and row["psnr_bg_after"] > row["psnr_bg_before"], row
    sheet = Image.open(out / "preview.png")
    assert sheet.size[1] == len(rows) * image.shape[0]
    print(f"demo: {seconds:.0f} s")

    # a second run resumes: nothing is redone, the same files stay
    before = {p: p.read_bytes() for p in out.rglob("*.png")}
    r = subprocess.run([sys.executable, "-m", "minibldm.sample"], cwd=tmp_path, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert {p: p.read_bytes() for p in out.rglob("*.png")} == before

    # a fresh run elsewhere starts from the same inputs, byte for byte; that the same inputs
    # and seed give the same output bytes in another folder is test_sample.py's
    # test_same_seed_same_bytes_and_shards_equal_one_run (a second whole demo here cost CI about 3 min)
    write_inputs(tmp_path / "again")
    again = {p.relative_to(tmp_path / "again"): p.read_bytes()
             for p in sorted((tmp_path / "again").rglob("*.png"))}
    inputs = {p.relative_to(out / "inputs"): p.read_bytes()
              for p in sorted((out / "inputs").rglob("*.png"))}
    assert again and again == inputs
