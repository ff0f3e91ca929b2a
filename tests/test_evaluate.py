"""`python -m minibldm.evaluate`: the metrics against hand-computed cases, the synthetic defect
baselines (masks match the changed pixels), the split guard, bad input, and a tiny end-to-end
run on a synthetic dataset (deterministic)."""
import contextlib
import io
import itertools
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from minibldm.commands.data import (DecodedImages, PairDataset, load_or_make_split, make_split,
                                    read_category)
from minibldm.commands.synth import image_rng, make_defect, make_good, write_dataset
from minibldm.eval import baselines, metrics
from minibldm.eval.common import read_data
from minibldm.eval.evaluate import METRICS, defect_source, main, make_batches, parse_args

K = 2
FAST = ["--k", str(K), "--detector-steps", "3", "--size", "64", "--batch-size", "4"]


# ---- metrics --------------------------------------------------------------------------------

def test_perfect_inverted_and_constant_maps():
    labels = np.array([0, 0, 1, 0, 1, 1, 0, 0])
    perfect = np.where(labels == 1, 0.75, 0.25)
    assert metrics.auroc(perfect, labels) == 1.0
    assert metrics.average_precision(perfect, labels) == 1.0
    assert metrics.f1_max(perfect, labels) == (1.0, 0.75, 1.0)
    assert metrics.auroc(-perfect, labels) == 0.0
    const = np.full(8, 0.3)
    assert metrics.auroc(const, labels) == 0.5
    assert metrics.average_precision(const, labels) == pytest.approx(3 / 8)  # the positive rate
    f1, t, iou = metrics.f1_max(const, labels)  # everything positive: P = 3/8, R = 1
    assert (f1, t, iou) == (pytest.approx(6 / 11), 0.3, pytest.approx(3 / 8))


def test_ties_by_hand():
    # scores 0.9 0.8 0.8 0.8 0.3 0.3, labels 1 1 0 0 1 0 (P = N = 3).
    # AUROC: ranks from below, ties averaged: 0.3 -> 1.5, 0.8 -> 4, 0.9 -> 6. Positives: 6 + 4 +
    #   1.5 = 11.5; U = 11.5 - 3*4/2 = 5.5; AUROC = 5.5 / 9. (Pairwise: 0.9 beats all 3 negatives;
    #   the positive 0.8 ties two and beats one, 2; the positive 0.3 ties one, 0.5.)
    # AP: t = 0.9: TP 1, FP 0 (P 1, R 1/3); t = 0.8: TP 2, FP 2 (P 1/2, R 2/3); t = 0.3: TP 3,
    #   FP 3 (P 1/2, R 1). AP = 1/3 * 1 + 1/3 * 1/2 + 1/3 * 1/2 = 2/3.
    # F1 = 2TP / (2TP + FP + FN): 2/4, 4/7, 6/9; best 2/3 at t = 0.3, IoU = 3 / (3 + 3) = 1/2.
    s = [0.9, 0.8, 0.8, 0.8, 0.3, 0.3]
    y = [1, 1, 0, 0, 1, 0]
    for order in ([0, 1, 2, 3, 4, 5], [3, 2, 1, 5, 4, 0]):  # the order of tied items is irrelevant
        so, yo = np.array(s)[order], np.array(y)[order]
        assert metrics.auroc(so, yo) == pytest.approx(5.5 / 9)
        assert metrics.average_precision(so, yo) == pytest.approx(2 / 3)
        f1, t, iou = metrics.f1_max(so, yo)
        assert (f1, t, iou) == (pytest.approx(2 / 3), 0.3, pytest.approx(0.5))


def test_random_ties_against_definitions():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 6, 60) / 5  # many ties
    y = rng.random(60) < 0.4
    pos, neg = s[y], s[~y]
    pairwise = np.mean([1.0 if a > b else 0.5 if a == b else 0.0
                        for a, b in itertools.product(pos, neg)])
    assert metrics.auroc(s, y) == pytest.approx(pairwise)
    ap, last_recall = 0.0, 0.0  # sklearn's definition, one distinct threshold at a time
    for t in sorted(set(s), reverse=True):
        tp, fp = np.sum(y & (s >= t)), np.sum(~y & (s >= t))
        ap += (tp / y.sum() - last_recall) * tp / (tp + fp)
        last_recall = tp / y.sum()
    assert metrics.average_precision(s, y) == pytest.approx(ap)
    with pytest.raises(ValueError):
        metrics.auroc(s, np.zeros(60))


def maps_and_masks(seed: int, n: int = 6, size: int = 24, levels: int = 12):
    """Anomaly maps with many ties (scores on a few levels) that lean towards the masks, and
    masks of several blobs per image, some images all good."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size))
    for i in range(n - 2):  # the last two images are good
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(0, size - 6, 2)
            h, w = rng.integers(1, 7, 2)
            masks[i, y:y + h, x:x + w] = 1
    scores = np.round((rng.random(masks.shape) + 0.7 * masks) * levels) / levels
    return scores, masks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pixel_and_image_metrics_against_scikit_learn(seed):
    skm = pytest.importorskip("sklearn.metrics")
    scores, masks = maps_and_masks(seed)
    s, y = scores.reshape(-1), masks.reshape(-1)
    assert metrics.auroc(s, y) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    assert metrics.average_precision(s, y) == pytest.approx(
        skm.average_precision_score(y, s), abs=1e-12)
    precision, recall, thresholds = skm.precision_recall_curve(y, s)
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-300)
    best = int(np.argmax(f1[:-1]))  # the last point (P = 1, R = 0) has no threshold
    f1_max, t, iou = metrics.f1_max(s, y)
    assert f1_max == pytest.approx(f1[best], abs=1e-12)
    assert t == thresholds[best]
    pred, gt = s >= t, y > 0.5
    assert iou == pytest.approx(skm.jaccard_score(gt, pred), abs=1e-12)
    image_scores, image_labels = scores.reshape(len(scores), -1).max(1), masks.any((1, 2))
    assert metrics.auroc(image_scores, image_labels) == pytest.approx(
        skm.roc_auc_score(image_labels, image_scores), abs=1e-12)
    assert metrics.average_precision(image_scores, image_labels) == pytest.approx(
        skm.average_precision_score(image_labels, image_scores), abs=1e-12)


def reference_aupro(scores, masks, fpr_limit=0.3):
    """AUPRO the slow way: scipy labels the regions; at every distinct threshold, binarise the
    maps and measure the false-positive rate and each region's overlap; then trapezoids from
    (0, 0) up to the limit, the last point interpolated, divided by the limit."""
    ndimage = pytest.importorskip("scipy.ndimage")
    region_of = []  # one (N, H, W) boolean array per region
    for k, m in enumerate(masks):
        lab, n = ndimage.label(m > 0.5, structure=np.ones((3, 3)))
        for r in range(1, n + 1):
            region = np.zeros(masks.shape, dtype=bool)
            region[k] = lab == r
            region_of.append(region)
    negative = masks < 0.5
    points = [(0.0, 0.0)]
    for t in sorted(set(scores.reshape(-1)), reverse=True):
        pred = scores >= t
        fpr = (pred & negative).sum() / negative.sum()
        pro = np.mean([pred[r].mean() for r in region_of])
        points.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:  # cut the segment at the limit
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("limit", [0.3, 0.05, 1.0])
def test_aupro_against_a_reference(seed, limit):
    scores, masks = maps_and_masks(seed)
    assert metrics.aupro(scores, masks, limit) == pytest.approx(
        reference_aupro(scores, masks, limit), abs=1e-12)


def test_aupro_by_hand():
    # Two regions of 1 and 3 pixels, 4 negatives. A perfect map covers both regions before any
    # negative: PRO is 1 from FPR 0 on, so AUPRO = 1 at any limit.
    masks = np.array([[[1, 0, 0, 0], [0, 0, 1, 1], [0, 0, 0, 1]]], dtype=float)
    perfect = masks * 0.9 + 0.1
    assert metrics.aupro(perfect, masks) == pytest.approx(1.0)
    # Each region counts alike whatever its size: the small region found alone gives PRO 1/2.
    # Scores: the 1-pixel region 1.0, everything else 0.5 (one tie group: FPR 1, PRO 1).
    # Curve (0, 0) -> (0, 1/2) -> (1, 1): up to 0.3 the area is 0.3 * (1/2 + (1/2 + 0.15)) / 2.
    one = np.where(np.arange(12).reshape(1, 3, 4) == 0, 1.0, 0.5)
    assert metrics.aupro(one, masks) == pytest.approx((0.5 + 0.65) / 2)
    # Whole regions are 8-connected: the diagonal neighbours make one region of 3 pixels.
    _, n = metrics.connected_components(np.array([[[1, 0], [0, 1]], [[0, 0], [0, 1]]]))
    assert n == 2
    with pytest.raises(ValueError):
        metrics.aupro(perfect, 0 * masks)


# ---- baselines: the mask covers every changed pixel -----------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = write_dataset(tmp_path_factory.mktemp("evaluate"), per_class=6, test_good=4,
                         test_per_defect=4, size=64, categories=["washer"], log=None)
    return root / "washer"


def changed(a, b):
    return (a != b).any(0)


def test_crop_paste_changes_only_the_mask(data):
    cat = read_category(data)
    source = baselines.CropPaste(PairDataset(cat, make_split(cat, K, 0), size=64, seed=0))
    decoded = DecodedImages(cat, 64, None, 100)
    for i in range(4):
        item = source.pairs[i]
        image, mask = source(i)
        good = decoded.image(cat.root / item["info"]["good"]).float() / 127.5 - 1
        assert mask.sum() > 0 and set(mask.unique().tolist()) <= {0.0, 1.0}
        assert not (changed(image, good) & (mask == 0)).any()
        assert not ((mask > 0) & ~decoded.foreground(cat.root / item["info"]["good"])).any()


def test_perlin_changes_only_the_mask():
    g = torch.Generator().manual_seed(0)
    noise = baselines.perlin_noise(64, (4, 8), g)
    assert noise.shape == (64, 64) and noise.abs().max() < 1.5
    assert torch.equal(noise, baselines.perlin_noise(64, (4, 8), torch.Generator().manual_seed(0)))
    good = torch.rand(3, 64, 64, generator=g) * 2 - 1
    other = torch.rand(3, 64, 64, generator=g) * 2 - 1
    fg = torch.zeros(64, 64)
    fg[8:56, 16:48] = 1
    for _ in range(5):
        source = baselines.anomaly_source(other, g)
        image, mask, beta = baselines.perlin_defect(good, source, fg, g)
        assert 0 <= beta < 0.8 and mask.sum() > 0
        assert not ((mask > 0) & (fg == 0)).any()
        assert not (changed(image, good) & (mask == 0)).any()
        assert torch.allclose(image[:, mask > 0], ((1 - beta) * source + beta * good)[:, mask > 0])


def test_perlin_source_on_a_dataset(data):
    cat = read_category(data)
    decoded = DecodedImages(cat, 64, None, 100)
    image, mask = baselines.Perlin(cat.good, decoded, seed=1)(3)
    assert image.shape == (3, 64, 64) and mask.sum() > 0
    again = baselines.Perlin(cat.good, decoded, seed=1)(3)
    assert torch.equal(image, again[0]) and torch.equal(mask, again[1])


def test_real_only_augmentation_keeps_image_and_mask_aligned(data):
    cat = read_category(data)
    # a synthetic defect image differs from its good scene only inside its mask
    good, _ = make_good("washer", image_rng(0, "washer", "x", 0), 64)
    bad, mask, _ = make_defect("washer", "crack", image_rng(0, "washer", "x", 0), 64)
    good, bad = torch.from_numpy(good).permute(2, 0, 1), torch.from_numpy(bad).permute(2, 0, 1)
    mask = torch.from_numpy(mask).float()
    assert mask.sum() > 0 and not (changed(bad, good) & (mask == 0)).any()
    for seed in range(8):
        g, b, m = baselines.flip_rotate([good, bad, mask], torch.Generator().manual_seed(seed))
        assert not (changed(b, g) & (m == 0)).any() and m.sum() == mask.sum()
    # real-only gives the k training pairs as they are
    split = make_split(cat, K, 0)
    pairs = {t: [(i, m) for i, m in p if cat.rel(i) in split["defects"][t]["train"]]
             for t, p in cat.defects.items()}
    source = baselines.FixedPairs(pairs, DecodedImages(cat, 64, None, 100), seed=0)
    assert len(source) == K * len(cat.defects)
    for i in range(6):
        image, m = source(i)
        assert any(torch.equal(image, x) and torch.equal(m, y)
                   for items in source.items.values() for x, y in items)


def test_crop_windows_hold_a_defect_and_stay_aligned():
    g = torch.Generator().manual_seed(0)
    image = torch.arange(3 * 64 * 64, dtype=torch.float32).reshape(3, 64, 64)
    corners = set()
    for n in range(40):
        mask = torch.zeros(64, 64)
        if n % 2:  # a small defect somewhere, on the border for some n
            y, x = torch.randint(64, (2,), generator=g).tolist()
            mask[y:y + 3, x:x + 2] = 1
        window, m = baselines.crop(image, mask, 24, g)
        assert window.shape == (3, 24, 24) and m.shape == (24, 24)
        y0, x0 = divmod(int(window[0, 0, 0]), 64)  # where the window is, read off the image
        assert torch.equal(window, image[:, y0:y0 + 24, x0:x0 + 24])
        assert torch.equal(m, mask[y0:y0 + 24, x0:x0 + 24])
        assert m.sum() > 0 or mask.sum() == 0
        corners.add((y0, x0))
    assert len(corners) > 30  # windows are drawn at random, not from a few places


# ---- the command ----------------------------------------------------------------------------

def run(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return SimpleNamespace(code=code, stdout=out.getvalue(), stderr=err.getvalue())


def fake_generated(folder, data, source, mask_file):
    """A minibldm.sample-like folder holding one training defect, with a manifest line."""
    cat = read_category(data)
    train = make_split(cat, K, 0)["defects"]["crack"]["train"][0]
    image = cat.root / train
    mask = cat.root / "ground_truth" / "crack" / (image.stem + "_mask.png")
    (folder / "test" / "crack").mkdir(parents=True)
    (folder / "ground_truth" / "crack").mkdir(parents=True)
    shutil.copy(image, folder / "test" / "crack" / "000.png")
    shutil.copy(mask, folder / "ground_truth" / "crack" / "000_mask.png")
    record = {"index": 0, "source": str(source), "placement": {"mask_file": str(mask_file or mask)}}
    (folder / "manifest.jsonl").write_text(json.dumps(record) + "\n")
    return folder


def test_generated_from_a_test_image_is_refused(tmp_path, data):
    cat = read_category(data)
    held = make_split(cat, K, 0)["defects"]["crack"]["test"][0]
    held_mask = cat.root / "ground_truth" / "crack" / (cat.root / held).stem
    cases = [(data / "test" / "good" / "000.png", None),  # a held-out good image as x_OK
             (data / "train" / "good" / "000.png", f"{held_mask}_mask.png")]  # a held-out mask
    for n, (source, mask_file) in enumerate(cases):
        gen = fake_generated(tmp_path / f"gen{n}", data, source, mask_file)
        r = run("--data", data, "--method", "minibldm", "--generated", gen, *FAST,
                "--out", tmp_path / "r.json")
        assert r.code == 2 and r.stdout == ""
        assert len(r.stderr.strip().splitlines()) == 1 and "--generated" in r.stderr
        assert "held-out" in r.stderr and not (tmp_path / "r.json").exists()
    gen = tmp_path / "copy"  # a generated image that is a copy of a test image
    fake_generated(gen, data, data / "train" / "good" / "000.png", None)
    shutil.copy(cat.root / held, gen / "test" / "crack" / "001.png")
    shutil.copy(f"{held_mask}_mask.png", gen / "ground_truth" / "crack" / "001_mask.png")
    r = run("--data", data, "--method", "minibldm", "--generated", gen, *FAST)
    assert r.code == 2 and "copy of the held-out" in r.stderr


def test_split_file_gives_k_and_seed_and_overlap_is_refused(tmp_path, data):
    (tmp_path / "run").mkdir()
    load_or_make_split(tmp_path / "run" / "split.json", read_category(data), 3, 5)
    r = run("--data", data, "--method", "real-only", "--split", tmp_path / "run" / "split.json",
            "--detector-steps", "1", "--size", "64", "--out", tmp_path / "run" / "r.json")
    assert r.code == 0, r.stderr
    res = json.loads((tmp_path / "run" / "r.json").read_text())
    assert (res["settings"]["k"], res["settings"]["seed"]) == (3, 5)
    assert res["split"]["train"] == {"crack": 3, "scratch": 3, "spot": 3}
    # --seed with --split seeds the detector only: the split stays the file's
    r = run("--data", data, "--method", "real-only", "--split", tmp_path / "run" / "split.json",
            "--seed", "7", "--detector-steps", "1", "--size", "64", "--out", tmp_path / "run" / "r7.json")
    assert r.code == 0, r.stderr
    res7 = json.loads((tmp_path / "run" / "r7.json").read_text())
    assert (res7["settings"]["seed"], res7["settings"]["split_seed"]) == (7, 5)
    assert res7["split"] == res["split"]
    r = run("--data", data, "--method", "real-only", "--split", tmp_path / "run" / "split.json",
            "--k", "4", "--detector-steps", "1", "--size", "64", "--out", tmp_path / "run" / "r4.json")
    assert r.code == 2 and "--k 4" in r.stderr and "k=3" in r.stderr
    assert not (tmp_path / "run" / "r4.json").exists()

    split = make_split(read_category(data), K, 0)
    split["defects"]["spot"]["train"].append(split["defects"]["spot"]["test"][0])
    (tmp_path / "split.json").write_text(json.dumps(split))
    r = run("--data", data, "--method", "real-only", "--split", tmp_path / "split.json",
            "--detector-steps", "2", "--size", "64", "--out", tmp_path / "r.json")
    assert r.code == 2 and "--split" in r.stderr and "both train and test" in r.stderr
    assert not (tmp_path / "r.json").exists()


def test_bad_input_is_one_line_and_exit_2(tmp_path, data):
    (tmp_path / "empty" / "test").mkdir(parents=True)
    (tmp_path / "empty" / "manifest.jsonl").write_text("")
    cases = [(["--data", tmp_path / "missing", "--method", "perlin"], "--data"),
             (["--data", data, "--method", "gan"], "--method"),
             (["--data", data, "--method", "minibldm"], "--generated"),
             (["--data", data, "--method", "minibldm", "--generated", tmp_path / "empty"],
              "--generated"),
             (["--data", data, "--method", "perlin", "--size", "60"], "--size"),
             (["--data", data, "--method", "perlin", "--crop", "36"], "--crop"),
             (["--data", data, "--method", "perlin", "--size", "64", "--crop", "72"], "--crop")]
    for args, name in cases:
        r = run(*args, "--k", K, "--out", tmp_path / "r.json")
        assert r.code == 2, args
        assert len(r.stderr.strip().splitlines()) == 1 and name in r.stderr, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_end_to_end_is_deterministic(tmp_path, data):
    results = []
    for n in range(2):
        r = run("--data", data, "--method", "crop-paste", *FAST, "--out", tmp_path / f"r{n}.json")
        assert r.code == 0, r.stderr
        assert "| **mean** |" in r.stdout and "detector step 3/3" in r.stderr
        assert (tmp_path / f"r{n}.md").read_text() == r.stdout
        results.append(json.loads((tmp_path / f"r{n}.json").read_text()))
    res = results[0]
    assert set(res) >= {"settings", "per_type", "mean", "split", "test_good"}
    assert set(res["per_type"]) == {"crack", "scratch", "spot"}
    assert res["split"]["train"] == {"crack": K, "scratch": K, "spot": K}
    for m in list(res["per_type"].values()) + [res["mean"]]:
        assert all(0 <= m[k] <= 1 for k in METRICS)
    assert res["per_type"] == results[1]["per_type"] and res["mean"] == results[1]["mean"]


def test_training_batches_are_windows_and_the_defect_ones_hold_defects(tmp_path, data):
    args = parse_args(["--data", str(data), "--method", "crop-paste", *FAST, "--crop", "32"])
    category, split = read_data(args)
    decoded = DecodedImages(category, 64, None, 100)
    batch = make_batches(args, category, decoded, defect_source(args, category, split, decoded, {}))
    for step in range(3):
        images, masks = batch(step)
        assert images.shape == (4, 3, 32, 32) and masks.shape == (4, 1, 32, 32)
        assert masks[:2].sum() == 0 and all(m.sum() > 0 for m in masks[2:])
    r = run("--data", data, "--method", "real-only", *FAST, "--crop", "32",
            "--out", tmp_path / "r.json")
    assert r.code == 0, r.stderr
    assert json.loads((tmp_path / "r.json").read_text())["settings"]["crop"] == 32


def test_minibldm_method_reads_a_generated_folder(tmp_path, data):
    gen = fake_generated(tmp_path / "gen", data, data / "train" / "good" / "000.png", None)
    r = run("--data", data, "--method", "minibldm", "--generated", gen, *FAST)
    assert r.code == 0, r.stderr
    assert "1 generated" in r.stderr and "| **mean** |" in r.stdout


def test_minibldm_plus_real_pools_the_real_and_generated_defects(tmp_path, data):
    cat = read_category(data)
    split = make_split(cat, K, 0)
    gen = fake_generated(tmp_path / "gen", data, data / "train" / "good" / "000.png", None)
    generated = {"crack": [(gen / "test" / "crack" / "000.png",
                            gen / "ground_truth" / "crack" / "000_mask.png")]}
    decoded = DecodedImages(cat, 64, None, 100)
    args = SimpleNamespace(method="minibldm+real", seed=0, size=64)
    source = defect_source(args, cat, split, decoded, generated)
    assert {t: len(v) for t, v in source.items.items()} == {"crack": K + 1, "scratch": K, "spot": K}
    only_gen = defect_source(SimpleNamespace(method="minibldm", seed=0, size=64), cat, split,
                             decoded, generated)
    assert {t: len(v) for t, v in only_gen.items.items()} == {"crack": 1}
    r = run("--data", data, "--method", "minibldm+real", "--generated", gen, *FAST,
            "--out", tmp_path / "r.json")
    assert r.code == 0, r.stderr
    assert "1 generated" in r.stderr and f"{3 * K} real defects" in r.stderr
    assert json.loads((tmp_path / "r.json").read_text())["settings"]["method"] == "minibldm+real"
    r = run("--data", data, "--method", "minibldm+real", *FAST)
    assert r.code == 2 and "--generated DIR is required with --method minibldm+real" in r.stderr


def test_channels_last_training_is_the_reference_layout_up_to_rounding():
    """The detector's speed path (channels-last activations) against the plain layout: the same
    losses and weights after a few Adam steps, up to float rounding."""
    from minibldm.eval import detector
    g = torch.Generator().manual_seed(0)
    images = torch.randn(4, 3, 32, 32, generator=g)
    masks = (torch.rand(4, 1, 32, 32, generator=g) > 0.9).float()
    runs = []
    for channels_last in (False, True):
        torch.manual_seed(0)
        net = detector.SegNet(channels=(8, 16))
        losses = detector.train(net, lambda step: (images, masks), 5, channels_last=channels_last)
        runs.append((losses, net.state_dict()))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-4)
    # Adam turns rounding noise in the near-zero gradients of the biases before GroupNorm into
    # lr-sized steps, so weights agree to about lr (2e-3), the function far closer:
    for k, v in runs[0][1].items():
        assert torch.allclose(v, runs[1][1][k], atol=5e-3), k
    assert runs[0][0][-1] < runs[0][0][0]  # it trained
