"""The synthetic MVTec-layout dataset: layout, determinism, exact masks, and bad arguments."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from minibldm.commands.synth import CATEGORIES, image_rng, make_defect, make_good, write_dataset

PAIRS = [(c, d) for c, meta in CATEGORIES.items() for d in meta["defects"]]


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "minibldm.synth", *map(str, args)],
                          capture_output=True, text=True, timeout=60)


def read(path):
    return np.asarray(Image.open(path))


def files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_cli_writes_mvtec_layout(tmp_path):
    out = tmp_path / "data"
    r = run_cli(out, "--per-class", 3, "--test-good", 2, "--test-per-defect", 2, "--size", 64)
    assert r.returncode == 0, r.stderr
    assert len(r.stderr.strip().splitlines()) == len(CATEGORIES)  # one progress line per category
    assert sorted(p.name for p in out.iterdir()) == sorted(CATEGORIES)
    for cat, meta in CATEGORIES.items():
        root = out / cat
        assert json.loads((root / "meta.json").read_text()) == meta
        assert {p.name for p in (root / "test").iterdir()} == {"good", *meta["defects"]}
        expected = {"train/good": 3, "test/good": 2, **{f"test/{d}": 2 for d in meta["defects"]}}
        for split, n in expected.items():
            names = sorted(p.name for p in (root / split).iterdir())
            assert names == [f"{i:03d}.png" for i in range(n)]
            for name in names:
                img = Image.open(root / split / name)
                assert (img.mode, img.size) == ("RGB", (64, 64))
                fg_path = root / "foreground" / split / name
                assert fg_path.exists() != meta["texture"]  # objects only
                fg = read(fg_path) if fg_path.exists() else np.full((64, 64), 255, np.uint8)
                assert set(np.unique(fg)) <= {0, 255}
                if split.endswith("good"):
                    continue
                mask = read(root / "ground_truth" / split.split("/")[1] / name.replace(".png", "_mask.png"))
                assert mask.shape == (64, 64) and set(np.unique(mask)) == {0, 255}
                assert not ((mask == 255) & (fg == 0)).any()
        assert sorted(p.name for p in (root / "ground_truth").iterdir()) == sorted(meta["defects"])


def test_same_arguments_same_bytes_and_prefix(tmp_path):
    kw = dict(seed=3, size=48, categories=["fabric", "pill"], test_good=1, log=None)
    full = files(write_dataset(tmp_path / "a", per_class=4, test_per_defect=3, **kw))
    assert full == files(write_dataset(tmp_path / "b", per_class=4, test_per_defect=3, **kw))
    prefix = files(write_dataset(tmp_path / "c", per_class=2, test_per_defect=1, **kw))
    assert "fabric/train/good/001.png" in prefix and "fabric/train/good/002.png" not in prefix
    assert all(full[name] == data for name, data in prefix.items())
    kw["seed"] = 4
    other = files(write_dataset(tmp_path / "d", per_class=2, test_per_defect=1, **kw))
    assert other["pill/train/good/000.png"] != prefix["pill/train/good/000.png"]


@pytest.mark.parametrize("category,defect", PAIRS)
def test_defect_changes_only_its_mask_inside_foreground(category, defect):
    for index in range(3):
        good, good_fg = make_good(category, image_rng(0, category, "t", index), 128)
        img, mask, fg = make_defect(category, defect, image_rng(0, category, "t", index), 128)
        assert img.shape == (128, 128, 3) and img.dtype == np.uint8
        assert mask.dtype == bool and mask.sum() >= 20
        assert (fg == good_fg).all() and not (mask & ~fg).any()
        change = np.abs(img.astype(int) - good.astype(int)).max(-1)
        assert (change[~mask] == 0).all()
        assert change[mask].mean() > 20  # clearly visible, out of 255


def interior_fraction(mask):
    """Share of mask pixels whose 4 neighbours are all in the mask: low for curves, high for blobs."""
    inner = mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    return inner.sum() / mask.sum()


@pytest.mark.parametrize("category,defect", PAIRS)
def test_defects_look_like_their_names(category, defect):
    fractions, darkening = [], []
    for index in range(4):
        good, _ = make_good(category, image_rng(1, category, "t", index))
        img, mask, _ = make_defect(category, defect, image_rng(1, category, "t", index))
        fractions.append(interior_fraction(mask))
        darkening.append(np.percentile((good.astype(float) - img).mean(-1)[mask], 75))
    if defect in ("scratch", "crack", "thread"):
        assert np.mean(fractions) < 0.72  # curves 3-6 px wide at 256 px: many edge pixels
    if defect in ("hole", "stain", "rust", "dent"):
        assert np.mean(fractions) > 0.85  # compact regions
    if defect in ("hole", "crack", "spot"):
        assert min(darkening) > 50  # a large share of the mask turns clearly darker


@pytest.mark.parametrize("category", list(CATEGORIES))
def test_good_images_vary_and_objects_sit_on_a_darker_background(category):
    shots = [make_good(category, image_rng(0, category, "train/good", i), 96) for i in range(4)]
    for i in range(4):
        for j in range(i):
            assert np.abs(shots[i][0].astype(int) - shots[j][0]).mean() > 3
    for img, fg in shots:
        if CATEGORIES[category]["texture"]:
            assert fg.all()
        else:
            assert 0.1 < fg.mean() < 0.6
            lum = img.mean(-1)
            assert lum[fg].mean() > lum[~fg].mean() + 60
    if not CATEGORIES[category]["texture"]:
        assert not (shots[0][1] == shots[1][1]).all()  # the object moves


def test_unknown_names_raise():
    with pytest.raises(ValueError, match="unknown category"):
        make_good("carpet", np.random.default_rng(0))
    with pytest.raises(ValueError, match="unknown defect"):
        make_defect("pill", "hole", np.random.default_rng(0))


@pytest.mark.parametrize("args,needle", [
    (["--categories", "carpet"], "unknown category"),
    (["--per-class", "0"], "--per-class"),
    (["--test-per-defect", "-1"], "--test-per-defect"),
    (["--size", "8"], "--size"),
    (["--per-class", "many"], "invalid int"),
    ([], "not a folder"),
])
def test_bad_arguments_exit_2(tmp_path, args, needle):
    out = tmp_path / ("file" if needle == "not a folder" else "out")
    if needle == "not a folder":
        out.write_text("x")
    r = run_cli(out, *args)
    assert r.returncode == 2
    assert needle in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()  # nothing written
