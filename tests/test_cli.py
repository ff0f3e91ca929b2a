"""The command line without traps: one meaning per flag name, stage boundaries that follow
--ddim-steps, conflicting flags refused in one line, defaults and an example in every --help, the
same device and precision flags everywhere, and one line for a bad flag in every command."""
import importlib

import pytest

from minibldm.cli import UsageError
from minibldm.config import Stages

COMMANDS = {"sample": "minibldm.commands.sample", "train": "minibldm.commands.train",
            "evaluate": "minibldm.eval.evaluate", "genquality": "minibldm.eval.genquality",
            "synth": "minibldm.commands.synth", "convert": "minibldm.convert.checkpoint",
            "export": "minibldm.commands.export"}


@pytest.mark.parametrize("name", COMMANDS)
def test_help_shows_defaults_and_an_example(name, capsys):
    with pytest.raises(SystemExit) as e:
        importlib.import_module(COMMANDS[name]).main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and f"python -m minibldm.{name}" in text.split("examples:")[1]
    assert "default" in text


REQUIRED = {"sample": [], "train": ["--stage", "control", "--data", "d", "--out", "o"],
            "evaluate": ["--data", "d", "--method", "real-only"],
            "genquality": ["--generated", "g", "--data", "d"], "synth": ["out"],
            "convert": ["src", "out"], "export": ["--onnx", "out"]}


@pytest.mark.parametrize("name", COMMANDS)
def test_a_bad_flag_is_one_line_and_status_2(name, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert importlib.import_module(COMMANDS[name]).main(REQUIRED[name] + ["--no-such-flag"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--no-such-flag" in err[0], err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name,old,new", [
    ("sample", "--steps", "--ddim-steps"), ("sample", "--dtype", "--precision"),
    ("evaluate", "--steps", "--detector-steps"), ("train", "--autocast", "--precision")])
def test_a_renamed_flag_says_its_new_name(name, old, new, capsys):
    assert importlib.import_module(COMMANDS[name]).main([old, "5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{old} is now {new}" in err[0], err


def sample_stages(*argv):
    from minibldm.commands import sample
    args = sample.parse_args(["--images", "x", "--defect-masks", "y", "--object", "o",
                              "--defect", "d", "-n", "1", "--out", "o", *argv])
    return sample.check_args(args).stages


def test_stage_boundaries_follow_ddim_steps():
    assert sample_stages() == Stages()  # the reference code's 50 / 26 / 46 / 45
    assert sample_stages("--ddim-steps", "25") == Stages(25, 13, 23, 22)  # the same fractions
    assert sample_stages("--ddim-steps", "100") == Stages(100, 52, 92, 90)
    assert sample_stages("--ddim-steps", "25", "--image-start", "24") == Stages(25, 13, 23, 24)
    assert sample_stages("--stage-lengths", "50", "30", "5") == Stages.from_lengths(50, 30, 5)


@pytest.mark.parametrize("flag", [["--ddim-steps", "50"], ["--latent-start", "3"],
                                  ["--image-start", "40"]])
def test_stage_lengths_refuses_the_flags_it_overrides(flag):
    with pytest.raises(UsageError, match=f"--stage-lengths sets every stage: not with {flag[0]}"):
        sample_stages("--stage-lengths", "50", "30", "5", *flag)


def parser_of(module, argv):
    """The Parser a command's parse_args builds, caught as it parses argv."""
    from minibldm.cli import Parser
    caught, real = {}, Parser.parse_args

    def grab(self, *a, **k):
        caught["p"] = self
        return real(self, *a, **k)
    Parser.parse_args = grab
    try:
        module.parse_args(argv)
    except UsageError:  # the checks after parsing (folders that do not exist here)
        pass
    finally:
        Parser.parse_args = real
    return caught["p"]


def flags(parser) -> dict:
    return {s: a for a in parser._actions for s in a.option_strings}


def test_device_and_precision_flags_are_the_same_everywhere(monkeypatch):
    import torch
    from minibldm import cli as common
    from minibldm.commands import sample, train
    from minibldm.eval import evaluate
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert common.default_device() == "cuda"
    assert sample.parse_args([]).device == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert common.default_device() == "cpu"
    assert sample.parse_args([]).device == "cpu"
    train_argv = ["--stage", "control", "--data", "d", "--out", "o"]
    precision = [flags(parser_of(m, argv))["--precision"].choices
                 for m, argv in ((sample, []), (train, train_argv))]
    assert precision[0] == precision[1] == ["float32", "bfloat16", "float16"]
    e = parser_of(evaluate, ["--data", "d", "--method", "real-only"])
    assert flags(e)["--device"].default == "cpu"


def test_steps_is_train_s_alone():
    """--steps counts optimizer steps in train; the sampler's are --ddim-steps, the detector's
    --detector-steps."""
    from minibldm.commands import sample, train
    from minibldm.eval import evaluate
    s = flags(parser_of(sample, []))
    t = flags(parser_of(train, ["--stage", "control", "--data", "d", "--out", "o"]))
    e = flags(parser_of(evaluate, ["--data", "d", "--method", "real-only"]))
    assert "--steps" in t and "--steps" not in s and "--steps" not in e
    assert "--ddim-steps" in s and "--detector-steps" in e


@pytest.mark.parametrize("extra,needle", [
    (["--guidance", "nan"], "--guidance must be a number"),
    (["--guidance", "inf"], "--guidance must be a number"),
    (["--eta", "-0.5"], "--eta must be a number >= 0"),
    (["--fg-weight", "-1"], "--fg-weight must be a number >= 0"),
    (["--bg-weight", "nan"], "--bg-weight must be a number >= 0"),
    (["--fg-weight", "0", "--bg-weight", "0"], "both 0"),
    (["--adapt-steps", "-1"], "--adapt-steps must be a number >= 0"),
    (["--adapt-lr", "0"], "--adapt-lr must be a positive number"),
    (["--adapt-lr", "nan"], "--adapt-lr must be a positive number"),
    (["--first", "-1"], "--first must be a number >= 0"),
    (["--size", "0"], "--size must be a number >= 1"),
    (["--size", "-32"], "--size must be a number >= 1"),
    (["--ddim-steps", "0"], "--ddim-steps must be a number >= 1"),
    (["--batch-size", "0"], "--batch-size must be a number >= 1"),
    (["--min-change", "nan"], "--min-change must be a number"),
    (["--min-change", "300"], "levels of 255"),
    (["--redraws", "-2"], "--redraws must be a number >= 0"),
    (["--zoom", "0.5"], "--zoom must be at least 1"),
    (["--exact-masks", "m2"], "give one"),
    (["--stage-lengths", "50", "30", "5", "--ddim-steps", "50"], "--stage-lengths sets every"),
])
def test_sample_refuses_bad_numbers_before_writing(tmp_path, capsys, extra, needle):
    from minibldm.commands import sample
    out = tmp_path / "out"
    argv = ["--images", str(tmp_path), "--defect-masks", str(tmp_path), "--object", "tile",
            "--defect", "crack", "-n", "1", "--out", str(out), *extra]
    assert sample.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("extra,needle", [
    (["--betas", "2", "0.999"], "--betas must be in [0, 1)"),
    (["--betas", "0.9", "nan"], "--betas must be in [0, 1)"),
    (["--weight-decay", "-1"], "--weight-decay must be a number >= 0"),
    (["--kl-weight", "-1"], "--kl-weight must be a number >= 0"),
    (["--preview-every", "-5"], "--preview-every must be at least 0"),
    (["--precision", "fp16"], "--precision"),
])
def test_train_refuses_bad_optimizer_arguments_before_writing(tmp_path, capsys, extra, needle):
    from minibldm.commands import train
    out = tmp_path / "out"
    argv = ["--stage", "control", "--data", str(tmp_path), "--out", str(out), *extra]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and "Traceback" not in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("extra,needle", [
    (["--num-heads", "0"], "--num-heads must be at least 1"),
    (["--clip-head-dim", "-64"], "--clip-head-dim must be at least 1"),
    (["--scale-factor", "-1"], "--scale-factor must be a positive number"),
    (["--scale-factor", "nan"], "--scale-factor must be a positive number"),
])
def test_convert_refuses_bad_numbers_before_writing(tmp_path, capsys, extra, needle):
    from minibldm.convert import checkpoint
    out = tmp_path / "out"
    assert checkpoint.main([str(tmp_path / "model.ckpt"), str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not out.exists()


def bomb_png(path):
    """A PNG whose header claims 20000 x 20000 pixels (and holds none)."""
    import struct
    import zlib

    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xffffffff))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 20000, 20000, 8, 2,
                                                                     0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_an_image_over_the_pixel_limit_is_one_line(tmp_path, capsys):
    from minibldm.commands import sample
    (tmp_path / "good").mkdir()
    bomb_png(tmp_path / "good" / "big.png")
    (tmp_path / "masks").mkdir()
    bomb_png(tmp_path / "masks" / "m.png")
    out = tmp_path / "out"
    argv = ["--images", str(tmp_path / "good"), "--defect-masks", str(tmp_path / "masks"),
            "--object", "tile", "--defect", "crack", "-n", "1", "--out", str(out)]
    assert sample.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pixels" in err[0] and "MINIBLDM_MAX_PIXELS" in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("section,value,needle", [
    ("unet", {"num_res_blocks": "1"}, "UNetConfig.num_res_blocks: expected int, got str"),
    ("unet", 5, "expected a JSON object, got int"),
    ("autoencoder", {"ch_mult": 4}, "AutoencoderConfig.ch_mult: expected tuple"),
    ("text", {"layer_norm_eps": "1e-5"}, "TextConfig.layer_norm_eps: expected float"),
])
def test_config_json_with_wrong_types_is_one_line(tmp_path, section, value, needle):
    import json
    from conftest import write_tiny_weights
    from minibldm import load
    from minibldm.io import WeightsError
    w = write_tiny_weights(tmp_path / "w")
    raw = json.loads((w / "config.json").read_text())
    raw[section] = value
    (w / "config.json").write_text(json.dumps(raw))
    with pytest.raises(WeightsError, match=needle.replace("(", r"\(")):
        load(w)


@pytest.mark.parametrize("meta,needle", [
    (["texture"], "expected a JSON object, got list"),
    ({"texture": "yes"}, '"texture" must be a bool'),
    ({"object": 5}, '"object" must be a str'),
    ({"defects": {"crack": 1}}, '"defects" maps folder names'),
])
def test_meta_json_with_wrong_types_is_a_data_error(tmp_path, meta, needle):
    import json

    import numpy as np
    from PIL import Image
    from minibldm.commands.data import read_category
    from minibldm.images import DataError
    (tmp_path / "cat" / "train" / "good").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "cat" / "train" / "good" / "a.png")
    (tmp_path / "cat" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DataError, match=needle):
        read_category(tmp_path / "cat")


SAVE = """
import sys, torch
from minibldm.io import save_atomic
save_atomic({"b": torch.ones(2), "a": torch.arange(3.0)}, sys.argv[1],
            metadata={"objects": "{}", "defects": "[]", "object": "t\\u00e9", "defect_names": "x"})
"""


def test_the_same_tensors_and_metadata_give_the_same_bytes(tmp_path):
    """safetensors writes metadata in a hash map's order, which differs between processes;
    save_atomic sorts it, so identical saves in separate processes are identical files."""
    import subprocess
    import sys
    from safetensors import safe_open
    paths = [tmp_path / f"{i}.safetensors" for i in range(4)]
    for p in paths:
        subprocess.run([sys.executable, "-c", SAVE, str(p)], check=True)
    assert len({p.read_bytes() for p in paths}) == 1
    with safe_open(str(paths[0]), "pt") as f:
        assert f.metadata() == {"objects": "{}", "defects": "[]", "object": "t\u00e9",
                                "defect_names": "x"}
        assert f.get_tensor("a").tolist() == [0.0, 1.0, 2.0]
