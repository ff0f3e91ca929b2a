"""`python -m minibldm.sample --data CATEGORY`, full-resolution outputs and `minibldm.Pipeline`,
on tiny random weights: every trained defect type from the run's split (training masks only),
the source's size and aspect kept with the background bit-exact away from the defect, the
Python entry point giving the command's bytes, and bad input on the new paths."""
import contextlib
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tiny_weights
from PIL import Image
from safetensors.torch import load_file, save_file

from minibldm.commands.data import make_split, read_category
from minibldm.sample import main

FAST = ["--ddim-steps", "4", "--latent-start", "1", "--latent-stop", "3", "--image-start", "3",
        "--adapt-steps", "2", "--size", "64", "--quiet"]


def sample(*args):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, err.getvalue()


def manifest(out):
    return [json.loads(x) for x in (Path(out) / "minibldm" / "manifest.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A category in the MVTec AD layout (96 x 64 images: not square, not the model's 64) with
    two defect types of 4 images each, and a "training run" of it: tiny weights whose trimap
    branch records the types it was trained on, and its split.json (k = 2)."""
    root = tmp_path_factory.mktemp("cat")
    cat = root / "tile"
    rng = np.random.default_rng(0)
    (cat / "train" / "good").mkdir(parents=True)
    for i in range(3):
        img = np.clip(120 + 20 * i + rng.normal(0, 8, (64, 96, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(cat / "train" / "good" / f"{i:03d}.png")
    for d, (h, w) in {"crack": (3, 20), "hole": (8, 8)}.items():
        (cat / "test" / d).mkdir(parents=True)
        (cat / "ground_truth" / d).mkdir(parents=True)
        for i in range(4):
            img = np.clip(110 + rng.normal(0, 8, (64, 96, 3)), 0, 255).astype(np.uint8)
            m = np.zeros((64, 96), np.uint8)
            y, x = 10 + 8 * i, 10 + 12 * i
            m[y:y + h, x:x + w] = 255
            img[m > 0] = 40
            Image.fromarray(img).save(cat / "test" / d / f"{i:03d}.png")
            Image.fromarray(m).save(cat / "ground_truth" / d / f"{i:03d}_mask.png")
    (cat / "meta.json").write_text(json.dumps({"object": "tile", "texture": True,
                                               "defects": {"hole": "hole", "crack": "crack"}}))
    run = write_tiny_weights(root / "run")
    sd = load_file(str(run / "control.safetensors"))
    save_file(sd, str(run / "control.safetensors"), metadata={
        "defects": '["crack", "hole"]', "object": "tile",
        "defect_names": '{"crack": "crack", "hole": "hole"}',
        "objects": '{"tile": {"crack": "crack", "hole": "hole"}}'})
    split = make_split(read_category(cat), k=2, seed=0)
    (run / "split.json").write_text(json.dumps(split))
    return cat, run, split


def test_data_makes_every_trained_type_from_training_masks_only(tmp_path, run_folder):
    cat, run, split = run_folder
    out = tmp_path / "out"
    code, err = sample("--data", cat, "--weights", run, "-n", 3, "--out", out, *FAST)
    assert code == 0, err
    records = manifest(out)
    assert sorted((r["defect"], r["index"]) for r in records) == [
        ("crack", 0), ("crack", 1), ("crack", 2), ("hole", 0), ("hole", 1), ("hole", 2)]
    for r in records:
        rel = Path(r["placement"]["mask_file"]).relative_to(cat).as_posix()
        stem = rel.replace("ground_truth/", "test/").replace("_mask.png", ".png")
        assert stem in split["defects"][r["defect"]]["train"]  # never a held-out mask
        assert r["prompt"] == f"a tile with a {r['defect']}"
        image, mask = np.asarray(Image.open(out / r["image"])), np.asarray(Image.open(out / r["mask"]))
        assert image.shape == (64, 96, 3) and mask.shape == (64, 96)  # the source's size
    # the types' images are not the same draws: their seeds are keyed by the type
    assert len({r["image_seed"] for r in records}) == 6
    code, err = sample("--data", cat, "--weights", run, "-n", 1, "--defect", "hole",
                       "--out", tmp_path / "one", *FAST)
    assert code == 0, err
    assert [r["defect"] for r in manifest(tmp_path / "one")] == ["hole"]
    # a subset of the types is the same run as all of them: the same names and bytes
    hole = [r for r in records if r["defect"] == "hole" and r["index"] == 0][0]
    assert (tmp_path / "one" / hole["image"]).read_bytes() == (out / hole["image"]).read_bytes()


def test_full_resolution_keeps_the_background_bit_exact(tmp_path, run_folder):
    """Away from M* grown by the blend's reach (3 model pixels, feathered over as many: 2 x 5 px
    at 96 / 64 scale), every output pixel is the good image's; the defect region changed."""
    cat, run, _ = run_folder
    out = tmp_path / "out"
    assert sample("--data", cat, "--weights", run, "-n", 2, "--out", out, *FAST)[0] == 0
    for r in manifest(out):
        good = np.asarray(Image.open(r["source"]))
        image = np.asarray(Image.open(out / r["image"]))
        mask = np.asarray(Image.open(out / r["mask"])) > 127
        near = np.zeros_like(mask)
        for y, x in zip(*np.nonzero(mask)):
            near[max(0, y - 10):y + 11, max(0, x - 10):x + 11] = True
        assert (image[~near] == good[~near]).all()
        assert (image[mask] != good[mask]).any()
        assert r["window"] == [0, 0, 64, 96] and r["size"] == [64, 96]


def test_zoom_generates_in_a_window_around_the_mask(tmp_path, run_folder):
    cat, run, _ = run_folder
    out = tmp_path / "out"
    code, err = sample("--data", cat, "--weights", run, "-n", 2, "--zoom", 2, "--out", out, *FAST)
    assert code == 0, err
    for r in manifest(out):
        y, x, h, w = r["window"]
        mask = np.asarray(Image.open(out / r["mask"])) > 127
        ys, xs = np.nonzero(mask)
        assert (h, w) == (32, 48) and y <= ys.min() and ys.max() < y + h and x <= xs.min() and xs.max() < x + w
        good, image = np.asarray(Image.open(r["source"])), np.asarray(Image.open(out / r["image"]))
        outside = np.ones(mask.shape, bool)
        outside[y:y + h, x:x + w] = False
        assert (image[outside] == good[outside]).all()


def test_pipeline_gives_the_command_s_image(tmp_path, run_folder):
    """minibldm.Pipeline called with the command's source, mask and noise seed makes the same
    bytes (the command is built on it)."""
    from minibldm import Pipeline
    from minibldm.config import AdaptConfig, SampleConfig, Stages
    cat, run, _ = run_folder
    out = tmp_path / "out"
    assert sample("--data", cat, "--weights", run, "-n", 1, "--defect", "crack", "--out", out,
                  *FAST)[0] == 0
    r = manifest(out)[0]
    cfg = SampleConfig(Stages(4, 1, 3, 3), adapt=AdaptConfig(steps=2))
    pipe = Pipeline.load(run, device="cpu", cfg=cfg, size=64)
    got = pipe(Image.open(r["source"]), Image.open(out / r["mask"]), "tile", "crack",
               seed=r["noise_seed"], texture=True)
    assert (got.image == np.asarray(Image.open(out / r["image"]))).all()
    assert (got.mask == np.asarray(Image.open(out / r["mask"]))).all()
    assert got.record["change_in_mask"] == r["change_in_mask"]


def bad(tmp_path, run_folder, how):
    cat, run, split = run_folder
    args = ["--data", cat, "--weights", run]
    if how == "no ground_truth":
        copy = tmp_path / "nogt"
        shutil.copytree(cat, copy)
        shutil.rmtree(copy / "ground_truth")
        args = ["--data", copy, "--weights", run]
    elif how == "split of another category":
        other = json.loads(json.dumps(split))
        other["defects"]["crack"]["train"] = ["test/crack/999.png"]
        (tmp_path / "split.json").write_text(json.dumps(other))
        args += ["--split", tmp_path / "split.json"]
    elif how == "no branch":
        args = ["--data", cat, "--weights", write_tiny_weights(tmp_path / "w", control=False)]
    elif how == "untrained defect":
        args += ["--defect", "dent"]
    elif how == "with --images":
        args += ["--images", cat / "train" / "good"]
    elif how == "no split":
        w = tmp_path / "w2"
        shutil.copytree(run, w)
        (w / "split.json").unlink()
        args = ["--data", cat, "--weights", w]
    return args


@pytest.mark.parametrize("how,needle", [
    ("no ground_truth", "ground_truth"), ("split of another category", "another category"),
    ("no branch", "trimap branch"), ("untrained defect", "--defect dent"),
    ("with --images", "not with --images"), ("no split", "no split.json"),
])
def test_bad_input_on_the_category_path(tmp_path, run_folder, how, needle):
    out = tmp_path / "out"
    code, err = sample(*bad(tmp_path, run_folder, how), "-n", 1, "--out", out, *FAST)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert not out.exists()


def test_torchrun_splits_the_images_by_rank_into_one_folder(tmp_path, run_folder):
    """Two processes under torchrun make the images of one process, into one OUT (masks bit for
    bit; images up to a level of rounding, as the thread count differs)."""
    import subprocess
    import sys
    cat, run, _ = run_folder
    args = ["--data", cat, "--weights", run, "-n", 2, *FAST]
    assert sample(*args, "--out", tmp_path / "one")[0] == 0
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "-m", "minibldm.sample", *map(str, args), "--out", str(tmp_path / "two")],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    one = {p.relative_to(tmp_path / "one"): p.read_bytes() for p in (tmp_path / "one").rglob("*.png")
           if "minibldm" not in p.parts}
    two = {p.relative_to(tmp_path / "two"): p.read_bytes() for p in (tmp_path / "two").rglob("*.png")
           if "minibldm" not in p.parts}
    assert len(one) == 8 and sorted(one) == sorted(two)
    for name in one:  # the same images: each process runs one thread here, so up to rounding
        a = np.asarray(Image.open(tmp_path / "one" / name), np.int16)
        b = np.asarray(Image.open(tmp_path / "two" / name), np.int16)
        assert np.abs(a - b).max() <= 1, name
    assert len(manifest(tmp_path / "two")) == 4


def test_blend_back_adds_the_model_s_change_to_the_source_s_texture():
    """Where the model changed nothing (its output = the window as it saw it), the full-size
    output is the source bit for bit, fine texture included, even inside M*; a change the model
    made comes back at full size inside M* and fades out within the blend's reach."""
    import torch
    from minibldm.api import blend_back
    from minibldm.images import resize_image
    rng = np.random.default_rng(1)
    good = rng.integers(0, 256, (48, 80, 3), dtype=np.uint8)  # all fine texture
    seen = torch.from_numpy(resize_image(good, 32).copy()).permute(2, 0, 1).float() / 127.5 - 1
    mask = torch.zeros(48, 80, dtype=torch.bool)
    mask[20:26, 30:50] = True
    assert (blend_back(good, seen, seen, mask, (0, 0, 48, 80), 32) == good).all()
    darker = seen - 0.5  # the model darkened everything by 64 levels
    out = blend_back(good, darker, seen, mask, (0, 0, 48, 80), 32).astype(int)
    inside = (good.astype(int) - out)[mask.numpy()]
    assert np.abs(inside - np.clip(inside, 0, 64)).max() == 0 and np.median(inside) == 64
    far = np.ones((48, 80), bool)
    far[20 - 16:26 + 16, 30 - 16:50 + 16] = False  # 2 x ceil(3 * 80 / 32) = 16 px reach
    assert (out[far] == good[far]).all()


def test_a_rank_that_starts_late_still_makes_its_own_images(tmp_path, run_folder, monkeypatch):
    """Ranks split the images by their place in the whole plan, not in what is still pending:
    rank 1 starting after rank 0 finished (so reading rank 0's images as done) makes its own."""
    cat, run, _ = run_folder
    args = ["--data", cat, "--weights", run, "-n", 2, *FAST]
    assert sample(*args, "--out", tmp_path / "one")[0] == 0
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("0", "1"):
        monkeypatch.setenv("RANK", rank)
        assert sample(*args, "--out", tmp_path / "two")[0] == 0
    key = sorted((r["defect"], r["index"]) for r in manifest(tmp_path / "one"))
    assert sorted((r["defect"], r["index"]) for r in manifest(tmp_path / "two")) == key


def test_only_the_dataset_looks_like_data(tmp_path, run_folder):
    """Every *.png in OUT is a test/<type>/ image or its ground_truth/<type>/ mask (the previews
    in minibldm/ are JPEG), so readers that glob OUT for *.png and take an image's last three
    path parts as split / label / name (anomalib's MVTec AD reader does) see only the dataset;
    images and masks pair by name and, sorted, in the same order."""
    cat, run, _ = run_folder
    out = tmp_path / "out"
    assert sample("--data", cat, "--weights", run, "-n", 2, "--out", out, *FAST)[0] == 0
    assert sample("--data", cat, "--weights", run, "-n", 2, "--seed", 1, "--out", out, *FAST)[0] == 0
    found = [p.relative_to(out).parts for p in out.rglob("*") if p.suffix == ".png"]
    assert all(p[0] in ("test", "ground_truth") and len(p) == 3 for p in found)
    assert (out / "minibldm" / "previews").is_dir()
    for d in ("crack", "hole"):
        images = sorted((out / "test" / d).iterdir())
        masks = sorted((out / "ground_truth" / d).iterdir())
        assert len(images) == len(masks) == 4  # two runs (seeds) beside each other
        assert [m.name for m in masks] == [i.stem + "_mask.png" for i in images]


def test_anomalib_reads_the_output(tmp_path, run_folder):
    """anomalib's own MVTec AD and Folder readers pair every generated image with its mask.
    (Runs where anomalib imports: it needs a torchvision built for the installed torch.)"""
    pytest.importorskip("anomalib.data", reason="anomalib is not importable here (pip install "
                        "anomalib and a torchvision matching torch)", exc_type=ImportError)
    from anomalib.data.datasets.image.folder import make_folder_dataset
    from anomalib.data.datasets.image.mvtecad import make_mvtec_ad_dataset
    cat, run, _ = run_folder
    out = tmp_path / "out"
    assert sample("--data", cat, "--weights", run, "-n", 3, "--out", out, *FAST)[0] == 0
    test = make_mvtec_ad_dataset(out, split="test")
    assert len(test) == 6
    for _, row in test.iterrows():
        assert Path(row.mask_path).name == Path(row.image_path).stem + "_mask.png"
    for d in ("crack", "hole"):
        folder = make_folder_dataset(normal_dir=cat / "train" / "good", root=out,
                                     abnormal_dir=f"test/{d}", mask_dir=f"ground_truth/{d}")
        bad = folder[folder.label_index == 1]
        assert len(bad) == 3
        for _, row in bad.iterrows():
            assert Path(row.mask_path).name == Path(row.image_path).stem + "_mask.png"
