"""Bad input across every command, as one table: each case must end with exit status 2, one line
on stderr that names the argument or file (no traceback), and every folder as it was: the output
not created (or unchanged when it existed) and the inputs untouched.

Cases that other files already pin in detail (sample's numbers, train's optimizer arguments, the
converter's checkpoints, the category path of sample --data) are not repeated here; this table
covers what they leave: outputs that cannot be written, files that cannot be read or make no
sense, and errors that used to surface only after the output folder was written."""
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import write_tiny_weights
from minibldm.commands import export, sample, synth, train
from minibldm.commands.data import make_split, read_category
from minibldm.convert import checkpoint
from minibldm.eval import evaluate, genquality

MAIN = {"sample": sample.main, "train": train.main, "evaluate": evaluate.main,
        "genquality": genquality.main, "synth": synth.main, "convert": checkpoint.main,
        "export": export.main}
UNWRITABLE = "/proc/minibldm-test/out"  # no one, root included, can create files there


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    """A small synthetic category, a weights folder with a trimap branch trained (by its metadata)
    on it with its split, and a few bad files."""
    root = tmp_path_factory.mktemp("bad")
    synth.write_dataset(root / "data", per_class=4, size=64, categories=["metal"], test_good=2,
                        test_per_defect=3, log=None)
    cat = root / "data" / "metal"
    run = write_tiny_weights(root / "run")
    from safetensors.torch import load_file, save_file
    names = {"scratch": "scratch", "dent": "dent", "rust": "rust spot"}
    save_file(load_file(str(run / "control.safetensors")), str(run / "control.safetensors"),
              metadata={"defects": json.dumps(sorted(names)), "object": "brushed metal plate",
                        "defect_names": json.dumps(names),
                        "objects": json.dumps({"brushed metal plate": names})})
    (run / "split.json").write_text(json.dumps(make_split(read_category(cat), k=2, seed=0)))
    bad = root / "files"
    bad.mkdir()
    (bad / "notes.txt").write_text("not an image\n")
    (bad / "truncated.png").write_bytes((cat / "train" / "good" / "000.png").read_bytes()[:100])
    bomb(bad / "bomb.png")
    for name, mask in (("tiny", np.full((1, 1), 255, np.uint8)),
                       ("empty", np.zeros((64, 64), np.uint8))):
        Image.fromarray(mask).save(bad / f"{name}_mask.png")
        (bad / name).mkdir()  # a folder of masks holding just that one
        Image.fromarray(mask).save(bad / name / f"{name}_mask.png")
    Image.fromarray(np.full((80, 80), 255, np.uint8)).save(bad / "big_mask.png")
    (bad / "config.json").write_text("{not json")
    return {"cat": cat, "run": run, "bad": bad, "root": root}


def bomb(path):
    """A PNG whose header claims 20000 x 20000 pixels (and holds none)."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xffffffff))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8,
                                                                     2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def copy_with(fx, tmp, what):
    """A copy of the category with one of its files replaced: what = (relative path, bad file)."""
    cat = tmp / "cat"
    shutil.copytree(fx["cat"], cat)
    rel, src = what
    shutil.copyfile(fx["bad"] / src, cat / rel)
    return cat


def hand(fx, *extra, masks=None, weights=None):
    """sample's hand-wired flags on the category (--defect-masks, or `masks` = [flag, path]),
    then `extra`."""
    cat = fx["cat"]
    return ["--images", cat / "train" / "good",
            *(masks or ["--defect-masks", cat / "ground_truth" / "dent"]),
            "--object", "plate", "--defect", "dent", "--weights", weights or fx["run"], "-n", "1",
            "--size", "64", "--ddim-steps", "2", "--adapt-steps", "1", *extra]


def train_args(fx, data, *extra, stage="control"):
    return ["--stage", stage, "--weights", fx["run"], "--data", data, "--steps", "2",
            "--size", "64", "--k", "2", "--batch-size", "2", "--preview-every", "0", *extra]


def eval_args(fx, *extra):
    return ["--data", fx["cat"], "--method", "real-only", "--k", "2", "--detector-steps", "2",
            "--size", "64", *extra]


# (id, command, argv from (fx, tmp, out), words the one line must hold). `out` is the output the
# command would write; tmp a fresh folder for inputs made for the case.
CASES = [
    # --- outputs that cannot be written
    ("sample-out-proc", "sample", lambda fx, t, o: hand(fx, "--out", UNWRITABLE), ["--out", "cannot write"]),
    ("sample-out-file", "sample", lambda fx, t, o: hand(fx, "--out", fx["bad"] / "notes.txt"),
     ["--out", "not a folder"]),
    ("train-out-proc", "train", lambda fx, t, o: train_args(fx, fx["cat"], "--out", UNWRITABLE),
     ["--out", "cannot write"]),
    ("train-out-file", "train", lambda fx, t, o: train_args(fx, fx["cat"], "--out", fx["bad"] / "notes.txt"),
     ["--out", "not a folder"]),
    ("evaluate-out-proc", "evaluate", lambda fx, t, o: eval_args(fx, "--out", UNWRITABLE + ".json"),
     ["--out", "cannot write"]),
    ("evaluate-out-folder", "evaluate", lambda fx, t, o: eval_args(fx, "--out", t), ["--out", "is a folder"]),
    ("genquality-out-proc", "genquality",
     lambda fx, t, o: ["--generated", t, "--data", fx["cat"], "--out", UNWRITABLE + ".json"],
     ["--out", "cannot write"]),
    ("synth-out-proc", "synth", lambda fx, t, o: [UNWRITABLE, "--per-class", "1"], ["OUT", "cannot write"]),
    ("synth-out-file", "synth", lambda fx, t, o: [fx["bad"] / "notes.txt"], ["not a folder"]),
    ("convert-out-proc", "convert", lambda fx, t, o: [fx["run"] / "unet.safetensors", UNWRITABLE],
     ["OUT_DIR", "cannot write"]),
    ("convert-out-file", "convert", lambda fx, t, o: [fx["run"] / "unet.safetensors", fx["bad"] / "notes.txt"],
     ["OUT_DIR", "not a folder"]),
    # --- image files that cannot be read, or claim too many pixels
    ("sample-bomb-image", "sample",
     lambda fx, t, o: hand(fx, "--good", fx["bad"] / "bomb.png", "--out", o), ["bomb.png", "pixels", "--max-pixels"]),
    ("sample-max-pixels", "sample",
     lambda fx, t, o: hand(fx, "--max-pixels", "100", "--out", o), ["more than 100 pixels"]),
    ("sample-max-pixels-zero", "sample", lambda fx, t, o: hand(fx, "--max-pixels", "0", "--out", o),
     ["--max-pixels must be at least 1"]),
    ("sample-truncated-good", "sample",
     lambda fx, t, o: hand(fx, "--good", fx["bad"] / "truncated.png", "--out", o), ["truncated.png"]),
    ("sample-text-as-good", "sample",
     lambda fx, t, o: hand(fx, "--good", fx["bad"] / "notes.txt", "--out", o), ["notes.txt"]),
    ("sample-1px-mask", "sample",
     lambda fx, t, o: hand(fx, "--out", o, masks=["--exact-masks", fx["bad"] / "tiny"]),
     ["tiny_mask.png", "1 x 1 mask"]),
    ("sample-empty-mask", "sample",
     lambda fx, t, o: hand(fx, "--out", o, masks=["--exact-masks", fx["bad"] / "empty"]),
     ["empty_mask.png", "empty"]),
    ("sample-no-weights", "sample",
     lambda fx, t, o: hand(fx, "--out", o, weights=t / "none"),
     ["none"]),
    ("sample-bad-config", "sample",
     lambda fx, t, o: hand(fx, "--out", o, weights=fx["bad"]),
     ["config.json"]),
    ("train-truncated-good", "train",
     lambda fx, t, o: train_args(fx, copy_with(fx, t, ("train/good/001.png", "truncated.png")), "--out", o),
     ["001.png", "not a readable image"]),
    ("train-truncated-good-unet", "train",
     lambda fx, t, o: train_args(fx, copy_with(fx, t, ("train/good/001.png", "truncated.png")), "--out", o,
                                 stage="unet"), ["001.png", "not a readable image"]),
    ("train-empty-masks", "train",
     lambda fx, t, o: train_args(fx, copy_with(fx, t, ("ground_truth/dent/000_mask.png", "empty_mask.png")),
                                 "--out", o, "--k", "20"), ["000_mask.png", "empty"]),
    ("train-bomb-image", "train",
     lambda fx, t, o: train_args(fx, copy_with(fx, t, ("train/good/002.png", "bomb.png")), "--out", o),
     ["002.png", "pixels"]),
    ("train-max-pixels", "train", lambda fx, t, o: train_args(fx, fx["cat"], "--out", o, "--max-pixels", "-1"),
     ["--max-pixels must be at least 1"]),
    ("train-no-data", "train", lambda fx, t, o: train_args(fx, t / "none", "--out", o), ["none"]),
    ("train-bad-config", "train",
     lambda fx, t, o: train_args(fx, fx["cat"], "--out", o, "--config", fx["bad"] / "config.json"),
     ["config.json"]),
    ("train-unknown-preset", "train",
     lambda fx, t, o: train_args(fx, fx["cat"], "--out", o, "--config", "huge"), ["--config", "huge"]),
    ("train-unknown-defect", "train",
     lambda fx, t, o: train_args(fx, fx["cat"], "--out", o, "--defect", "hole"), ["hole"]),
    ("train-steps-zero", "train", lambda fx, t, o: train_args(fx, fx["cat"], "--out", o, "--steps", "0"),
     ["--steps"]),
    ("train-lr-nan", "train", lambda fx, t, o: train_args(fx, fx["cat"], "--out", o, "--lr", "nan"),
     ["--lr"]),
    ("evaluate-no-data", "evaluate",
     lambda fx, t, o: ["--data", t / "none", "--method", "real-only", "--out", o / "r.json"], ["--data"]),
    ("evaluate-no-split", "evaluate",
     lambda fx, t, o: eval_args(fx, "--split", t / "none.json", "--out", o / "r.json"), ["--split"]),
    ("evaluate-bad-split", "evaluate",
     lambda fx, t, o: eval_args(fx, "--split", fx["bad"] / "config.json", "--out", o / "r.json"),
     ["config.json"]),
    ("evaluate-size", "evaluate", lambda fx, t, o: eval_args(fx, "--size", "60", "--out", o / "r.json"),
     ["--size 60"]),
    ("evaluate-lr", "evaluate", lambda fx, t, o: eval_args(fx, "--lr", "0", "--out", o / "r.json"),
     ["--lr"]),
    ("evaluate-method", "evaluate",
     lambda fx, t, o: ["--data", fx["cat"], "--method", "magic", "--out", o / "r.json"], ["--method"]),
    ("evaluate-truncated-test", "evaluate",
     lambda fx, t, o: eval_args(fx, "--out", o / "r.json")[:1]
     + [copy_with(fx, t, ("test/good/001.png", "truncated.png"))] + eval_args(fx, "--out", o / "r.json")[2:],
     ["001.png", "not a readable image"]),
    ("evaluate-max-pixels", "evaluate",
     lambda fx, t, o: eval_args(fx, "--max-pixels", "0", "--out", o / "r.json"), ["--max-pixels"]),
    ("genquality-no-generated", "genquality",
     lambda fx, t, o: ["--generated", t / "none", "--data", fx["cat"], "--out", o / "r.json"], ["--generated"]),
    ("genquality-not-generated", "genquality",
     lambda fx, t, o: ["--generated", fx["cat"], "--data", fx["cat"], "--out", o / "r.json"], ["--generated"]),
    ("genquality-cluster-cap", "genquality",
     lambda fx, t, o: ["--generated", t, "--data", fx["cat"], "--cluster-cap", "1", "--out", o / "r.json"],
     ["--cluster-cap"]),
    ("synth-size-huge", "synth", lambda fx, t, o: [o, "--size", "100000"], ["--size must be at most"]),
    ("synth-per-class", "synth", lambda fx, t, o: [o, "--per-class", "-1"], ["--per-class"]),
    ("synth-category", "synth", lambda fx, t, o: [o, "--categories", "nope"], ["nope"]),
    ("convert-no-src", "convert", lambda fx, t, o: [t / "none.ckpt", o], ["none.ckpt"]),
    ("convert-text-src", "convert", lambda fx, t, o: [fx["bad"] / "notes.txt", o], ["notes.txt"]),
    ("convert-empty-folder", "convert", lambda fx, t, o: [t, o], [str(Path("in"))]),
    ("export-out-proc", "export", lambda fx, t, o: ["--onnx", UNWRITABLE, "--weights", fx["run"]],
     ["--onnx", "cannot write"]),
    ("export-no-weights", "export", lambda fx, t, o: ["--onnx", o, "--weights", t / "none"], ["none"]),
    ("export-size", "export", lambda fx, t, o: ["--onnx", o, "--weights", fx["run"], "--size", "60"],
     ["--size 60"]),
]


def snapshot(*folders) -> dict:
    """Every path below the folders with its bytes (files) or None (folders)."""
    return {p: (p.read_bytes() if p.is_file() else None)
            for f in folders if Path(f).exists() for p in sorted(Path(f).rglob("*"))}


def test_the_table_is_large_and_covers_every_command():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)
    assert {c[1] for c in CASES} == set(MAIN)


@pytest.mark.parametrize("name,command,argv,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_status_2_and_nothing_written(name, command, argv, words, fx,
                                                            tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    args = [str(a) for a in argv(fx, inputs, out)]
    before = snapshot(fx["root"], tmp_path)
    code = MAIN[command](args)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, (args, err)
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert all(w in err[0] for w in words), (words, err[0])
    assert snapshot(fx["root"], tmp_path) == before
    assert not Path(UNWRITABLE).exists()
