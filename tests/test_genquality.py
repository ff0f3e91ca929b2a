"""`python -m minibldm.genquality`: IC-LPIPS clustering with an injected distance, background
PSNR and mask spread against hand-computed cases, and the command on a tiny synthetic generated
folder: without the optional packages (skipped, with the reason), with stand-ins for them (the
values reach the JSON), with packages that fail to load their weights, and on bad input."""
import contextlib
import io
import itertools
import json
import math
import shutil
import sys
import types
import urllib.error
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from minibldm.commands.data import make_split, read_category
from minibldm.commands.synth import write_dataset
from minibldm.eval import genquality as gq
from minibldm.eval.literature import ic_lpips
from minibldm.images import resize_image

K = 2
DEFECT = "hole"


# ---- pure functions ---------------------------------------------------------------------------

def line_distance(xs, ys):
    return [abs(x - y) for x, y in zip(xs, ys)]


def test_ic_lpips_clusters_by_hand():
    # centres 0, 10, 100, 1000 on a line; 1 and 3 are nearest 0, 9 and 12 nearest 10, 96
    # nearest 100, none nearest 1000. Cluster scores: |1-3| = 2, |9-12| = 3, singleton {96} and
    # the empty cluster have no pairs and are left out: (2 + 3) / 2 = 2.5.
    r = ic_lpips([1.0, 9.0, 3.0, 96.0, 12.0], [0.0, 10.0, 100.0, 1000.0], line_distance)
    assert [c["members"] for c in r["clusters"]] == [2, 2, 1, 0]
    assert [c["score"] for c in r["clusters"]] == [2.0, 3.0, None, None]
    assert r["score"] == pytest.approx(2.5)
    # no cluster with two members: no score
    assert ic_lpips([1.0, 11.0], [0.0, 10.0], line_distance)["score"] is None


def test_ic_lpips_cap_and_ties():
    # all four join centre 0. Pairs of 1, 2, 4, 8: 1 3 7 2 6 4, mean 23/6. Capped at the first
    # three (1, 2, 4): 1 3 2, mean 2.
    gen = [1.0, 2.0, 4.0, 8.0]
    assert ic_lpips(gen, [0.0], line_distance, cap=4)["score"] == pytest.approx(23 / 6)
    capped = ic_lpips(gen, [0.0], line_distance, cap=3)
    assert capped["score"] == pytest.approx(2.0)
    assert capped["clusters"] == [{"members": 4, "used": 3, "score": pytest.approx(2.0)}]
    # 5 is as far from 0 as from 10: it goes to the first centre
    tie = ic_lpips([5.0, 5.0, 6.0], [0.0, 10.0], line_distance)
    assert [c["members"] for c in tie["clusters"]] == [2, 1] and tie["score"] == 0.0


def test_background_psnr_by_hand():
    rng = np.random.default_rng(0)
    source = rng.integers(0, 200, (16, 16, 3), dtype=np.uint8)
    mask = np.zeros((16, 16), bool)
    mask[4:9, 2:12] = True  # 50 pixels; 206 background pixels, 618 values
    gen = source.copy()
    gen[mask] = 255  # the defect region is not counted
    assert gq.background_psnr(gen, source, mask) == gq.PSNR_CAP  # identical background
    bg_rows, bg_cols = np.nonzero(~mask)
    gen[bg_rows[:10], bg_cols[:10], 1] += 10  # 10 values off by 10: MSE = 10 * 100 / 618
    assert gq.background_psnr(gen, source, mask) == pytest.approx(
        10 * math.log10(255 ** 2 * 618 / 1000))
    gen[mask] = 0
    assert gq.background_psnr(gen, source, mask) == pytest.approx(
        10 * math.log10(255 ** 2 * 618 / 1000))


def test_defect_change_by_hand():
    source = np.full((8, 8, 3), 100, np.uint8)
    mask = np.zeros((8, 8), bool)
    mask[2:4, 2:6] = True  # 8 pixels, 24 values
    gen = source.copy()
    gen[~mask] = 0  # the background is not counted
    assert gq.defect_change(gen, source, mask) == 0.0
    gen[2, 2] = (130, 100, 70)  # 2 values off by 30, one up and one down: 60 / 24
    assert gq.defect_change(gen, source, mask) == pytest.approx(2.5)


def test_mask_spread_by_hand():
    a = np.zeros((10, 20), bool)
    a[0, 0] = True  # area 1/200, centroid (0.5 / 20, 0.5 / 10) = (0.025, 0.05)
    b = np.zeros((10, 20), bool)
    b[4:6, 10:14] = True  # area 8/200, centroid (12 / 20, 5 / 10) = (0.6, 0.5)
    assert gq.mask_geometry(a) == pytest.approx((0.005, 0.025, 0.05))
    assert gq.mask_geometry(b) == pytest.approx((0.04, 0.6, 0.5))
    s = gq.spread([gq.mask_geometry(a), gq.mask_geometry(b)])
    assert s["n"] == 2
    assert (s["area_mean"], s["area_std"]) == (pytest.approx(0.0225), pytest.approx(0.0175))
    assert (s["cx_std"], s["cy_std"]) == (pytest.approx(0.2875), pytest.approx(0.225))
    assert s["nearest_centroid"] == pytest.approx(math.hypot(0.575, 0.45))
    assert gq.spread([gq.mask_geometry(a)])["nearest_centroid"] is None  # no other centroid
    m = gq.mask_spread([gq.mask_geometry(b)], [gq.mask_geometry(a)],
                       [gq.mask_geometry(a), (0.1, 0.6, 0.4)])
    assert m["gen_to_train"] == pytest.approx(math.hypot(0.575, 0.45))
    assert m["gen_to_all"] == pytest.approx(0.1)


# ---- the command ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = write_dataset(tmp_path_factory.mktemp("genquality"), per_class=3, test_good=2,
                         test_per_defect=4, size=64, categories=["fabric"], log=None)
    return root / "fabric"


def read_rgb(path):
    return np.asarray(Image.open(path).convert("RGB"))


def make_generated(folder, data, n=3, defect=DEFECT):
    """A minibldm.sample-like folder of `n` images of `defect`: a training good image with a
    black box (the mask) and a few background values changed; returns (expected PSNRs, mask
    areas, changes inside the mask). Image 1's source is written as a path from another working
    directory."""
    cat = read_category(data)
    train = make_split(cat, K, 0)["defects"][defect]["train"]
    gen, truth = folder / "test" / defect, folder / "ground_truth" / defect
    gen.mkdir(parents=True)
    truth.mkdir(parents=True)
    psnr, areas, change, lines = [], [], [], []
    for i in range(n):
        good = cat.good[i % len(cat.good)]
        src = read_rgb(good)
        mask = np.zeros((64, 64), bool)
        mask[8 + 10 * i:16 + 10 * i, 4:12 + 6 * i] = True
        img = src.astype(np.int64)
        img[mask] = 0
        rows, cols = np.nonzero(~mask)
        img[rows[:5 * (i + 1)], cols[:5 * (i + 1)], 0] += np.where(
            src[rows[:5 * (i + 1)], cols[:5 * (i + 1)], 0] > 127, -9, 9)
        img = img.astype(np.uint8)
        Image.fromarray(img).save(gen / f"{i:03d}.png")
        Image.fromarray(np.uint8(mask) * 255).save(truth / f"{i:03d}_mask.png")
        mse = np.mean((img[~mask].astype(float) - src[~mask]) ** 2)
        psnr.append(10 * math.log10(255 ** 2 / mse))
        areas.append(mask.mean())
        change.append(np.abs(img[mask].astype(float) - src[mask]).mean())
        source = f"elsewhere/train/good/{good.name}" if i == 1 else str(good)
        mask_file = cat.root / "ground_truth" / defect / f"{Path(train[i % K]).stem}_mask.png"
        lines.append(json.dumps({"index": i, "source": source,
                                 "placement": {"mask_file": str(mask_file)}}))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return psnr, areas, change


def run(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = gq.main([str(a) for a in args])
    return SimpleNamespace(code=code, stdout=out.getvalue(), stderr=err.getvalue())


def hide_packages(monkeypatch):
    for name in ("torch_fidelity", "lpips"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError


def test_end_to_end_without_the_optional_packages(tmp_path, data, monkeypatch):
    hide_packages(monkeypatch)
    psnr, areas, change = make_generated(tmp_path / "gen", data)
    psnr2, _, _ = make_generated(tmp_path / "gen2", data, n=2, defect="stain")
    r = run("--generated", tmp_path / "gen", tmp_path / "gen2", "--data", data, "--k", K,
            "--out", tmp_path / "r.json")
    assert r.code == 0, r.stderr
    res = json.loads((tmp_path / "r.json").read_text())
    assert (tmp_path / "r.md").read_text() == r.stdout and f"| {DEFECT} | 3 |" in r.stdout
    assert set(res["per_type"]) == {DEFECT, "stain"} and res["per_type"]["stain"]["n"] == 2
    m = res["per_type"][DEFECT]
    assert m["background_psnr"] == {"n": 3, "mean": pytest.approx(np.mean(psnr)),
                                    "median": pytest.approx(np.median(psnr)),
                                    "min": pytest.approx(min(psnr))}
    assert m["defect_change"]["mean"] == pytest.approx(np.mean(change))
    assert m["masks"]["generated"]["area_mean"] == pytest.approx(np.mean(areas))
    assert m["masks"]["generated"]["area_std"] == pytest.approx(np.std(areas))
    real = [read_rgb(p)[..., 0] > 127 for p in sorted((data / "ground_truth" / DEFECT).iterdir())]
    assert m["masks"]["real_all"]["n"] == 4 and m["masks"]["real_train"]["n"] == K
    assert m["masks"]["real_all"]["area_mean"] == pytest.approx(np.mean([x.mean() for x in real]))
    assert res["overall"]["background_psnr"]["mean"] == pytest.approx(np.mean(psnr + psnr2))
    assert res["overall"]["masks"]["real_all"]["n"] == 8  # both types' real masks, pooled
    for key in ("is", "kid", "ic_lpips"):
        assert "not installed" in m[key]["skipped"]
    assert "not installed" in res["overall"]["is"]["skipped"]
    skipped = [line for line in r.stderr.splitlines() if "skipped" in line]
    assert len(skipped) == 2 and "torch_fidelity" in skipped[0] and "lpips" in skipped[1]
    assert res["settings"]["cluster_cap"] == 50 and "left out" in res["settings"]["small_clusters"]


def test_a_larger_source_is_resized_as_minibldm_sample_does(tmp_path, data, monkeypatch):
    # generated at 32x32 from 64x64 sources: the background is exactly sample.py's resize of
    # the source (images.resize_image), so the PSNR is the cap for an identical background
    hide_packages(monkeypatch)
    make_generated(tmp_path / "gen", data, n=2)
    for i, line in enumerate((tmp_path / "gen" / "manifest.jsonl").read_text().splitlines()):
        source = data / "train" / "good" / Path(json.loads(line)["source"]).name
        small = resize_image(read_rgb(source), 32).copy()
        small[4:10, 4:12] = 0
        mask = np.zeros((32, 32), np.uint8)
        mask[4:10, 4:12] = 255
        Image.fromarray(small).save(tmp_path / "gen" / "test" / DEFECT / f"{i:03d}.png")
        Image.fromarray(mask).save(tmp_path / "gen" / "ground_truth" / DEFECT / f"{i:03d}_mask.png")
    r = run("--generated", tmp_path / "gen", "--data", data, "--k", K, "--out", tmp_path / "r.json")
    assert r.code == 0, r.stderr
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["per_type"][DEFECT]["background_psnr"]["min"] == gq.PSNR_CAP
    assert res["per_type"][DEFECT]["masks"]["generated"]["area_mean"] == pytest.approx(48 / 1024)


class FakeLPIPS(torch.nn.Module):
    """Stands in for lpips.LPIPS: the mean absolute difference of each pair, (B, 1, 1, 1)."""

    def __init__(self, **kwargs):
        super().__init__()

    def forward(self, a, b):
        return (a - b).abs().mean((1, 2, 3), keepdim=True)


def test_optional_metrics_reach_the_json(tmp_path, data, monkeypatch):
    calls = []

    def calculate_metrics(**kw):  # IS: the number of generated images, to tell the types apart
        calls.append(kw)
        return {"inception_score_mean": float(len(kw["input1"])), "inception_score_std": 0.25,
                "kernel_inception_distance_mean": 0.125, "kernel_inception_distance_std": 0.0625}
    monkeypatch.setitem(sys.modules, "torch_fidelity",
                        types.SimpleNamespace(calculate_metrics=calculate_metrics))
    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=FakeLPIPS))
    make_generated(tmp_path / "gen", data)
    make_generated(tmp_path / "gen2", data, n=2, defect="stain")
    r = run("--generated", tmp_path / "gen", tmp_path / "gen2", "--data", data, "--k", K,
            "--out", tmp_path / "r.json")
    assert r.code == 0, r.stderr
    res = json.loads((tmp_path / "r.json").read_text())
    m = res["per_type"][DEFECT]
    assert m["is"] == {"mean": 3.0, "std": 0.25} and res["per_type"]["stain"]["is"]["mean"] == 2
    assert res["overall"]["is"] == {"mean": 2.5, "types": 2}  # the mean over types
    assert m["kid"] == {"mean": 0.125, "std": 0.0625, "subset_size": 3, "n_real": 4}
    kw = calls[0]  # hole, then stain
    assert kw["isc"] and kw["kid"] and (len(kw["input1"]), len(kw["input2"])) == (3, 4)
    first = kw["input1"][0]
    assert first.dtype == torch.uint8 and first.shape == (3, 64, 64)
    assert torch.equal(first.permute(1, 2, 0), torch.from_numpy(
        read_rgb(tmp_path / "gen" / "test" / DEFECT / "000.png").copy()))
    # IC-LPIPS by brute force with the same stand-in distance
    cat = read_category(data)
    train = [cat.root / p for p in make_split(cat, K, 0)["defects"][DEFECT]["train"]]
    gen = sorted((tmp_path / "gen" / "test" / DEFECT).iterdir())
    x = {p: read_rgb(p).astype(np.float64) / 127.5 - 1 for p in gen + train}
    d = {(a, b): np.abs(x[a] - x[b]).mean() for a in gen for b in gen + train}
    clusters = [[g for g in gen if min(train, key=lambda t: d[g, t]) == t] for t in train]
    scores = [np.mean([d[a, b] for a, b in itertools.combinations(c, 2)])
              for c in clusters if len(c) > 1]
    assert m["ic_lpips"]["score"] == pytest.approx(np.mean(scores), rel=1e-5)
    assert [c["members"] for c in m["ic_lpips"]["clusters"]] == [len(c) for c in clusters]


def test_weights_that_cannot_be_fetched_are_skipped(tmp_path, data, monkeypatch):
    def offline(**kw):
        raise urllib.error.URLError("no network")

    def no_alexnet(**kw):
        raise RuntimeError("cannot fetch alexnet weights\nsecond line")
    monkeypatch.setitem(sys.modules, "torch_fidelity",
                        types.SimpleNamespace(calculate_metrics=offline))
    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=no_alexnet))
    make_generated(tmp_path / "gen", data)
    r = run("--generated", tmp_path / "gen", "--data", data, "--k", K, "--out", tmp_path / "r.json")
    assert r.code == 0, r.stderr
    m = json.loads((tmp_path / "r.json").read_text())["per_type"][DEFECT]
    assert "URLError" in m["is"]["skipped"] and m["kid"] == m["is"]
    assert m["ic_lpips"]["skipped"].startswith("RuntimeError: cannot fetch alexnet weights (")
    assert "skipped is/kid: URLError: <urlopen error no network>" in r.stderr
    assert "skipped" in r.stdout  # the table says so too


def test_bad_input_is_one_line_and_exit_2(tmp_path, data, monkeypatch):
    hide_packages(monkeypatch)
    good = tmp_path / "good"
    make_generated(good, data)
    held = tmp_path / "held"  # made from a held-out good test image
    shutil.copytree(good, held)
    (held / "manifest.jsonl").write_text(json.dumps(
        {"index": 0, "source": str(data / "test" / "good" / "000.png")}) + "\n")
    unknown = tmp_path / "unknown"  # a defect type the category does not have
    shutil.copytree(good, unknown)
    (unknown / "test" / DEFECT).rename(unknown / "test" / "bogus")
    (unknown / "ground_truth" / DEFECT).rename(unknown / "ground_truth" / "bogus")
    no_record = tmp_path / "no_record"
    shutil.copytree(good, no_record)
    (no_record / "manifest.jsonl").write_text(json.dumps({"index": 7, "source": "x.png"}) + "\n")
    full = tmp_path / "full"  # a mask with no background left
    shutil.copytree(good, full)
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(
        full / "ground_truth" / DEFECT / "001_mask.png")
    small = tmp_path / "small"  # a mask of another size than its image
    shutil.copytree(good, small)
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(
        small / "ground_truth" / DEFECT / "001_mask.png")
    no_manifest = tmp_path / "no_manifest"
    shutil.copytree(good, no_manifest)
    (no_manifest / "manifest.jsonl").unlink()
    cases = [(["--generated", good, "--data", tmp_path / "missing"], "--data"),
             (["--generated", tmp_path / "missing", "--data", data], "--generated"),
             (["--generated", no_manifest, "--data", data], "manifest.jsonl"),
             (["--generated", held, "--data", data], "held-out"),
             (["--generated", unknown, "--data", data], "'bogus'"),
             (["--generated", no_record, "--data", data], "no record"),
             (["--generated", full, "--data", data], "no background"),
             (["--generated", small, "--data", data], "is 64x64 but its mask 32x32"),
             (["--generated", good, "--data", data, "--cluster-cap", "1"], "--cluster-cap"),
             (["--generated", good, "--data", data, "--k", "0"], "--k"),
             (["--data", data], "--generated")]
    before = sorted(p.name for p in tmp_path.iterdir())
    for args, needle in cases:
        r = run(*args, "--out", tmp_path / "r.json")
        assert r.code == 2 and r.stdout == "", args
        assert len(r.stderr.strip().splitlines()) == 1 and needle in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
