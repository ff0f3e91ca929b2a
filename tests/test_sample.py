"""`python -m minibldm.sample` end to end on tiny random weights: the MVTec-layout output, the
manifest and preview, determinism, sharding, resume, and bad input (exit 2, nothing written)."""
import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import write_tiny_weights
from PIL import Image

from minibldm.sample import main

FAST = ["--ddim-steps", "4", "--latent-start", "1", "--latent-stop", "3", "--image-start", "3",
        "--adapt-steps", "3", "--size", "64", "--quiet"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    weights = write_tiny_weights(root / "weights")
    rng = np.random.default_rng(0)
    (root / "good").mkdir()
    (root / "masks").mkdir()
    for i in range(3):  # a bright disc (the object) on a dark background
        img = np.full((80, 80, 3), 30, np.uint8)
        yy, xx = np.mgrid[:80, :80]
        img[(yy - 40) ** 2 + (xx - 40) ** 2 < 30 ** 2] = 180 + 20 * i
        img = np.clip(img + rng.integers(0, 10, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / "good" / f"{i:03d}.png")
    for i, (h, w) in enumerate([(6, 14), (10, 4)]):
        m = np.zeros((80, 80), np.uint8)
        m[30:30 + h, 30:30 + w] = 255
        Image.fromarray(m).save(root / "masks" / f"{i:03d}_mask.png")
    return root, weights


def run(inputs, out, *extra, n="2"):
    """The command's main() in this process (the same code path as `python -m`, minus the start-up)."""
    root, weights = inputs
    masks = [] if "--exact-masks" in extra else ["--defect-masks", root / "masks"]  # one or other
    args = ["--weights", weights, "--images", root / "good", *masks,
            "--object", "tile", "--defect", "crack", "-n", n, "--out", out, *FAST, *extra]
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return SimpleNamespace(returncode=code, stderr=err.getvalue())


def files(out):
    """The dataset's PNGs (the metadata folder minibldm/ aside), by path relative to out."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(Path(out).rglob("*.png"))
            if "minibldm" not in p.relative_to(out).parts}


def manifest(out, name="manifest.jsonl"):
    return [json.loads(x) for x in (Path(out) / "minibldm" / name).read_text().splitlines()]


def settings(out):
    """The run record of the one run in out."""
    (record,) = (Path(out) / "minibldm" / "runs").iterdir()
    return json.loads(record.read_text())


def test_writes_mvtec_layout_manifest_and_preview(tmp_path, inputs):
    r = run(inputs, tmp_path / "out")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    lines = manifest(out)
    run_id = lines[0]["run"]
    assert len(run_id) == 8 and sorted(files(out)) == [
        f"ground_truth/crack/{run_id}_000000_mask.png", f"ground_truth/crack/{run_id}_000001_mask.png",
        f"test/crack/{run_id}_000000.png", f"test/crack/{run_id}_000001.png"]
    assert [x["index"] for x in lines] == [0, 1]
    for x in lines:  # each record names its own files, relative to out
        assert set(files(out)) >= {x["image"], x["mask"]} and x["defect"] == "crack"
        assert x["mask"] == x["image"].replace("test/", "ground_truth/").replace(".png", "_mask.png")
    mask = np.asarray(Image.open(out / lines[0]["mask"]))
    assert set(np.unique(mask)) == {0, 255}
    img = np.asarray(Image.open(out / lines[0]["image"]))
    assert img.shape == (80, 80, 3)  # the good image's own size (the model works at 64)
    for key in ("seed", "source", "placement", "prompt", "stages", "adapt_loss_before",
                "adapt_loss_after", "psnr_bg_before", "psnr_bg_after", "noise_seed", "window"):
        assert key in lines[0]
    assert lines[0]["prompt"] == "a tile with a crack"
    assert Image.open(out / "minibldm" / "previews" / f"{run_id}.jpg").size == (5 * 64, 2 * 64)
    assert sorted(p.name for p in out.iterdir()) == ["ground_truth", "minibldm", "test"]


def test_same_seed_same_bytes_and_shards_equal_one_run(tmp_path, inputs):
    assert run(inputs, tmp_path / "a").returncode == 0
    assert run(inputs, tmp_path / "b").returncode == 0
    assert files(tmp_path / "a") == files(tmp_path / "b")
    # the second half, in a separate process
    root, weights = inputs
    args = ["--weights", weights, "--images", root / "good", "--defect-masks", root / "masks",
            "--object", "tile", "--defect", "crack", "-n", "1", "--first", "1",
            "--out", tmp_path / "s", *FAST]
    r = subprocess.run([sys.executable, "-m", "minibldm.sample", *map(str, args)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    shard = files(tmp_path / "s")
    assert shard == {k: v for k, v in files(tmp_path / "a").items() if "_000001" in k}
    assert run(inputs, tmp_path / "c", "--seed", "1").returncode == 0
    assert files(tmp_path / "c") != files(tmp_path / "a")


def test_batches_give_the_images_of_one_at_a_time(tmp_path, inputs):
    assert run(inputs, tmp_path / "one", n="3").returncode == 0
    r = run(inputs, tmp_path / "batch", "--batch-size", "2", n="3")  # a batch of 2, then of 1
    assert r.returncode == 0, r.stderr
    one, batch = files(tmp_path / "one"), files(tmp_path / "batch")
    assert sorted(one) == sorted(batch)
    for name in one:
        a = np.asarray(Image.open(tmp_path / "one" / name), np.int16)
        b = np.asarray(Image.open(tmp_path / "batch" / name), np.int16)
        assert np.abs(a - b).max() <= 1, name  # float rounding may flip a level
    rec = [manifest(tmp_path / d) for d in ("one", "batch")]
    for x, y in zip(*rec):
        assert x["index"] == y["index"] and x["placement"] == y["placement"]
        assert abs(x["adapt_loss_after"] - y["adapt_loss_after"]) <= 1e-4 * x["adapt_loss_after"]


@pytest.mark.skipif(os.environ.get("MINIBLDM_COMPILE_TESTS") != "1",
                    reason="compiling the UNet, branch and decoder takes minutes on 2 CPU cores; "
                           "set MINIBLDM_COMPILE_TESTS=1")
def test_compiled_run_agrees_with_eager(tmp_path, inputs):
    assert run(inputs, tmp_path / "eager", n="1").returncode == 0
    r = run(inputs, tmp_path / "fused", "--compile", n="1")
    assert r.returncode == 0, r.stderr
    for name, data in files(tmp_path / "eager").items():
        a = np.asarray(Image.open(tmp_path / "eager" / name), np.int16)
        b = np.asarray(Image.open(tmp_path / "fused" / name), np.int16)
        assert np.abs(a - b).max() <= 1, name
    x, y = [manifest(tmp_path / d)[0] for d in ("eager", "fused")]
    assert abs(x["adapt_loss_after"] - y["adapt_loss_after"]) <= 1e-4 * x["adapt_loss_after"]


def test_resume_continues_where_it_stopped(tmp_path, inputs):
    assert run(inputs, tmp_path / "full").returncode == 0
    assert run(inputs, tmp_path / "part", n="1").returncode == 0
    assert len(files(tmp_path / "part")) == 2
    assert run(inputs, tmp_path / "part").returncode == 0
    assert files(tmp_path / "part") == files(tmp_path / "full")
    assert len(manifest(tmp_path / "part")) == 2
    # other settings are another run, written beside this one under its own names
    r = run(inputs, tmp_path / "part", "--seed", "5")
    assert r.returncode == 0, r.stderr
    both = files(tmp_path / "part")
    assert len(both) == 8 and {k: both[k] for k in files(tmp_path / "full")} == files(tmp_path / "full")
    assert len({x["run"] for x in manifest(tmp_path / "part")}) == 2


def test_exact_masks_one_output_per_mask(tmp_path, inputs):
    root, _ = inputs
    r = run(inputs, tmp_path / "out", "--exact-masks", root / "masks", "--good", root / "good" / "000.png",
            n="5")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    for record in manifest(out):  # the user's masks, as they are, at the image's own size
        got = np.asarray(Image.open(out / record["mask"])) > 127
        src = np.asarray(Image.open(record["placement"]["mask_file"])) > 127
        assert (got == src).all()
    assert len(files(out)) == 4


def bad_case(tmp_path, inputs, how):
    root, weights = inputs
    args = []
    if how == "no images":
        (tmp_path / "empty").mkdir()
        args = ["--images", tmp_path / "empty"]
    elif how == "missing images":
        args = ["--images", tmp_path / "nope"]
    elif how == "unreadable image":
        (tmp_path / "bad").mkdir()
        (tmp_path / "bad" / "x.png").write_bytes(b"not a png")
        args = ["--images", tmp_path / "bad"]
    elif how == "empty mask":
        (tmp_path / "m").mkdir()
        Image.fromarray(np.zeros((80, 80), np.uint8)).save(tmp_path / "m" / "a.png")
        args = ["--defect-masks", tmp_path / "m"]
    elif how == "mask size":
        (tmp_path / "m").mkdir()
        Image.fromarray(np.full((20, 30), 255, np.uint8)).save(tmp_path / "m" / "a.png")
        args = ["--exact-masks", tmp_path / "m", "--good", root / "good" / "000.png"]
    elif how == "out is a file":
        (tmp_path / "out").write_text("x")
    elif how == "n <= 0":
        args = ["-n", "0"]
    elif how == "adapt blocks < 0":
        args = ["--adapt-blocks", "-1"]
    elif how == "untrained defect":
        from safetensors.torch import load_file, save_file
        sd = load_file(str(weights / "control.safetensors"))
        save_file(sd, str(tmp_path / "control.safetensors"), metadata={"defects": '["scratch"]'})
        args = ["--control", tmp_path / "control.safetensors"]
    elif how == "control mismatch":
        from safetensors.torch import load_file, save_file
        sd = load_file(str(weights / "control.safetensors"))
        sd["zero_convs.0.0.weight"] = sd["zero_convs.0.0.weight"][:8]
        save_file(sd, str(tmp_path / "control.safetensors"))
        args = ["--control", tmp_path / "control.safetensors"]
    return args


@pytest.mark.parametrize("how,needle", [
    ("no images", "no images"), ("missing images", "no such folder"),
    ("unreadable image", "x.png"), ("empty mask", "the mask is empty"),
    ("mask size", "mask is 30x20 but its image"), ("out is a file", "is not a folder"),
    ("n <= 0", "-n must be a number >= 1"), ("untrained defect", "not 'crack'"),
    ("adapt blocks < 0", "--adapt-blocks must be >= 0"),
    ("control mismatch", "zero_convs.0.0.weight has shape"),
])
def test_bad_input_exits_2_and_writes_nothing(tmp_path, inputs, how, needle):
    extra = bad_case(tmp_path, inputs, how)
    out = tmp_path / "out"
    r = run(inputs, out, *extra, n=extra[extra.index("-n") + 1] if "-n" in extra else "2")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert not out.is_dir() or not any(out.iterdir())


def test_no_arguments_without_bundled_weights_says_what_it_needs(tmp_path, monkeypatch, capsys):
    from minibldm.commands import demo
    monkeypatch.chdir(tmp_path)
    assert demo.main(tmp_path / "missing") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing" in err[0] and "--weights" in err[0]
    assert list(tmp_path.iterdir()) == []


def test_bfloat16_runs(tmp_path, inputs):
    r = run(inputs, tmp_path / "out", "--precision", "bfloat16", n="1")
    assert r.returncode == 0, r.stderr
    assert len(files(tmp_path / "out")) == 2


def test_texture_is_read_from_the_category_meta(tmp_path):
    from minibldm.commands.sampleplan import UsageError, marked_texture
    good = tmp_path / "fabric" / "train" / "good"
    good.mkdir(parents=True)
    assert not marked_texture(good)
    (tmp_path / "fabric" / "meta.json").write_text(json.dumps({"object": "fabric", "texture": True}))
    assert marked_texture(good)
    (tmp_path / "fabric" / "meta.json").write_text("[1")
    with pytest.raises(UsageError, match="meta.json"):
        marked_texture(good)


def test_soft_masks_are_thresholded_and_said_once(tmp_path, inputs):
    soft = tmp_path / "soft"
    soft.mkdir()
    for i in range(2):
        m = np.zeros((80, 80), np.uint8)
        m[30:40, 30:44] = 200
        m[29, 30:44] = 90  # an anti-aliased edge
        Image.fromarray(m).save(soft / f"{i}.png")
    r = run(inputs, tmp_path / "out", "--defect-masks", soft, n="1")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("thresholded at 127") == 1
    mask = np.asarray(Image.open(tmp_path / "out" / manifest(tmp_path / "out")[0]["mask"]))
    assert set(np.unique(mask)) == {0, 255}


def test_paste_background_copies_x_ok_outside_a_feathered_mask(tmp_path, inputs):
    r = run(inputs, tmp_path / "out", "--paste-background", n="1")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    record = manifest(out)[0]
    good = np.asarray(Image.open(record["source"]).convert("RGB"))
    img = np.asarray(Image.open(out / record["image"]))
    mask = np.asarray(Image.open(out / record["mask"])) > 127
    near = np.zeros_like(mask)  # the mask grown by the feather's reach: 2 x radius 4 at 80 px
    for y, x in zip(*np.nonzero(mask)):
        near[max(0, y - 8):y + 9, max(0, x - 8):x + 9] = True
    assert (img[~near] == good[~near]).all()
    assert np.abs(img[mask].astype(int) - good[mask]).mean() > 1  # the defect region is generated


def test_latent_mask_cover_keeps_a_thin_exact_mask(tmp_path, inputs):
    """A 2-pixel line between the pixels the nearest resize reads (every 8th column at 64 px):
    with nearest the whole latent is kept and nothing can be generated; with cover the line's
    cells are generated. Both record their choice, and a resume with the other is refused."""
    root, _ = inputs
    (tmp_path / "thin").mkdir()
    m = np.zeros((80, 80), np.uint8)
    m[20:60, 13:15] = 255  # columns 10..11 at 64 px
    Image.fromarray(m).save(tmp_path / "thin" / "000_mask.png")
    outs = {}
    for how in ("nearest", "cover"):
        out = tmp_path / how
        r = run(inputs, out, "--exact-masks", tmp_path / "thin", "--good", root / "good" / "000.png",
                "--latent-mask", how, n="1")
        assert r.returncode == 0, r.stderr
        assert settings(out)["latent_mask"] == how
        outs[how] = np.asarray(Image.open(out / manifest(out)[0]["image"]))
    assert (outs["nearest"] != outs["cover"]).any()
    r = run(inputs, tmp_path / "bad", "--latent-mask", "area")  # one line, exit 2, nothing written
    assert r.returncode == 2 and not (tmp_path / "bad").exists()
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "minibldm.sample: error: argument --latent-mask: invalid choice: 'area'"), lines


def test_bulk_is_no_adaptation_plus_paste_in_batches(tmp_path, inputs):
    """--bulk gives the bytes of --adapt-steps 0 --paste-background --batch-size 16, reports its
    rate and time left, and refuses another adaptation length."""
    root, weights = inputs
    base = ["--weights", weights, "--images", root / "good", "--defect-masks", root / "masks",
            "--object", "tile", "--defect", "crack", "-n", "3", "--ddim-steps", "4",
            "--latent-start", "1", "--latent-stop", "3", "--image-start", "3", "--size", "64"]

    def call(out, *extra):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = main([str(a) for a in base + ["--out", tmp_path / out, *extra]])
        return code, err.getvalue()
    code, err = call("bulk", "--bulk")
    assert code == 0, err
    assert "3/3 images" in err and "images/min" in err and "left" in err
    code, err = call("ref", "--adapt-steps", "0", "--paste-background", "--batch-size", "16")
    assert code == 0, err
    assert files(tmp_path / "bulk") == files(tmp_path / "ref")
    assert settings(tmp_path / "bulk")["adapt_steps"] == 0
    assert settings(tmp_path / "bulk")["paste_background"] is True
    code, err = call("bad", "--bulk", "--adapt-steps", "50")
    assert code == 2 and "--bulk" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_manifest_records_the_change_inside_the_mask(tmp_path, inputs):
    """change_in_mask is genquality's measure, recomputed here from the written files."""
    assert run(inputs, tmp_path / "out", n="2").returncode == 0
    for record in manifest(tmp_path / "out"):
        img = np.asarray(Image.open(tmp_path / "out" / record["image"]), np.float64)
        good = np.asarray(Image.open(record["source"]).convert("RGB"))
        mask = np.asarray(Image.open(tmp_path / "out" / record["mask"])) > 127
        assert record["change_in_mask"] == pytest.approx(np.abs(img[mask] - good[mask]).mean(),
                                                         abs=2e-3)


def test_min_change_redraws_then_drops_and_resume_skips_the_dropped(tmp_path, inputs):
    """An impossible --min-change: every image is drawn 1 + R times with new noise, then
    dropped (nothing written but dropped.jsonl); a rerun does not draw them again. A threshold
    of 0 keeps the first draw: the bytes of a run without the option."""
    r = run(inputs, tmp_path / "out", "--min-change", "255", "--redraws", "1", n="2")
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out"
    assert not files(out)
    dropped = manifest(out, "dropped.jsonl")
    assert sorted((d["index"], d["attempt"]) for d in dropped) == [(0, 1), (1, 1)]
    assert all(d["change_in_mask"] < 255 for d in dropped)
    again = run(inputs, out, "--min-change", "255", "--redraws", "1", n="2")
    assert again.returncode == 0 and len(manifest(out, "dropped.jsonl")) == 2
    assert run(inputs, tmp_path / "zero", "--min-change", "0", n="2").returncode == 0
    assert run(inputs, tmp_path / "plain", n="2").returncode == 0
    assert files(tmp_path / "zero") == files(tmp_path / "plain")
    first = {x["index"]: x["change_in_mask"] for x in manifest(tmp_path / "plain")}
    assert all(d["change_in_mask"] != first[d["index"]] for d in dropped)  # new noise, new image
    bad = run(inputs, tmp_path / "bad", "--min-change", "-1", n="1")
    assert bad.returncode == 2 and "--min-change" in bad.stderr


def test_an_f4_model_samples_and_a_mismatched_branch_is_refused(tmp_path, inputs):
    """An f4 autoencoder (latents a quarter of the image's side: the paper's VQ-f4 family) with
    its f4 trimap branch runs the whole method, the image keeping its size; a config whose
    branch shrinks by 8 while the autoencoder shrinks by 4 is one line and exit status 2."""
    root, _ = inputs
    f4 = write_tiny_weights(tmp_path / "f4", factor=4)
    r = run((root, f4), tmp_path / "out", n="1")
    assert r.returncode == 0, r.stderr
    [record] = manifest(tmp_path / "out")
    assert Image.open(tmp_path / "out" / record["image"]).size == (80, 80)
    assert record["change_in_mask"] > 0
    config = json.loads((f4 / "config.json").read_text())
    config["unet"]["hint_factor"] = 8
    (f4 / "config.json").write_text(json.dumps(config))
    bad = run((root, f4), tmp_path / "bad", n="1")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "hint_factor 8" in bad.stderr and "f = 4" in bad.stderr
    assert not (tmp_path / "bad").exists()
