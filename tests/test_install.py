"""A plain (non-editable) `pip install` works on its own: the console entry points run, and the
bundled tiny model is found inside the installed package (no source checkout beside it)."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                        "--target", str(target), "-q", str(REPO)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"pip could not build the package here: {r.stderr.strip()[-300:]}")
    env = {**os.environ, "PYTHONPATH": str(target)}
    return target, env


def test_entry_points_and_the_bundled_model_after_a_plain_install(installed, tmp_path):
    target, env = installed
    code = "import minibldm.api as a; print(a.DEFAULT_WEIGHTS)"
    where = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                           capture_output=True, text=True).stdout.strip()
    assert Path(where) == target / "minibldm" / "bundled" / "tiny"
    assert (Path(where) / "config.json").is_file()
    for name in ("sample", "train", "evaluate", "genquality", "synth", "export", "convert"):
        r = subprocess.run([str(target / "bin" / f"minibldm-{name}"), "--help"], cwd=tmp_path,
                           env=env, capture_output=True, text=True)
        assert r.returncode == 0 and "examples:" in r.stdout, (name, r.stderr[-500:])
    # the bundled model makes an image through the installed console script
    (tmp_path / "good").mkdir()
    (tmp_path / "masks").mkdir()
    Image.fromarray(np.full((128, 128, 3), 140, np.uint8)).save(tmp_path / "good" / "a.png")
    m = np.zeros((128, 128), np.uint8)
    m[50:70, 40:80] = 255
    Image.fromarray(m).save(tmp_path / "masks" / "a.png")
    r = subprocess.run([str(target / "bin" / "minibldm-sample"), "--images", "good",
                        "--defect-masks", "masks", "--texture", "--object", "pill", "--defect",
                        "stain", "-n", "1", "--ddim-steps", "4", "--adapt-steps", "2",
                        "--out", "out", "--quiet"], cwd=tmp_path, env=env, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-1000:]
    assert len(list((tmp_path / "out" / "test" / "stain").glob("*.png"))) == 1
