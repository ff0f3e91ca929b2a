"""`python -m minibldm.export --onnx`: the bundled tiny model's graphs, run by onnxruntime,
reproduce the porting vectors (tests/vectors/tiny.safetensors, made from the same weights) within
the tolerances the file states, and tools/replay_numpy.py replays the vectors' whole sample in
NumPy around them. Bad input is one line on stderr, exit status 2, nothing written."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

from minibldm.api import DEFAULT_WEIGHTS  # noqa: E402
from minibldm.commands import export  # noqa: E402

FILE = Path(__file__).parent / "vectors" / "tiny.safetensors"
TOOLS = Path(__file__).resolve().parents[1] / "tools"
SPEC = importlib.util.spec_from_file_location("replay_numpy", TOOLS / "replay_numpy.py")
replay = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(replay)
GRAPHS = {"text_encoder": (["ids"], ["hidden"]),
          "control": (["z_t", "hint", "t", "context"], [f"residual.{i}" for i in range(7)]),
          "unet": (["z_t", "t", "context"] + [f"residual.{i}" for i in range(7)], ["eps"]),
          "encoder": (["image"], ["mean", "logvar"]),
          "decoder": (["z"], ["image"])}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The command, run as users run it, in two processes into one folder (the UNet takes as
    long to export as the other four together; two cores halve the wait)."""
    out = tmp_path_factory.mktemp("export") / "tiny"
    runs = [subprocess.Popen([sys.executable, "-m", "minibldm.export", "--onnx", str(out),
                              "--networks", *names], stderr=subprocess.PIPE, text=True)
            for names in (["unet", "text_encoder"], ["control", "encoder", "decoder"])]
    for r in runs:
        err = r.communicate()[1]
        assert r.returncode == 0, err
    return out


@pytest.fixture(scope="module")
def vectors():
    with safe_open(str(FILE), "np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.fixture(scope="module")
def model(exported):
    return replay.Model(exported)


def test_graphs_have_named_inputs_outputs_and_a_dynamic_batch(exported):
    assert sorted(p.name for p in exported.iterdir()) == sorted(
        [f"{n}.onnx" for n in GRAPHS] + ["config.json", "vocab.json", "merges.txt"])
    for f in ("config.json", "vocab.json", "merges.txt"):
        assert (exported / f).read_bytes() == (DEFAULT_WEIGHTS / f).read_bytes()
    for name, (inputs, outputs) in GRAPHS.items():
        s = ort.InferenceSession(str(exported / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        assert [i.name for i in s.get_inputs()] == inputs, name
        assert [o.name for o in s.get_outputs()] == outputs, name
        for x in s.get_inputs() + s.get_outputs():
            assert isinstance(x.shape[0], str), (name, x.name, x.shape)  # symbolic: any batch


def test_each_graph_reproduces_its_vectors(model, vectors):
    v, meta = vectors
    tol = json.loads(meta["tolerance"])
    diffs = replay.check_components(model, v)
    ported = {k for k in v if k.split(".")[0] in tol and ".out." in k
              and k.split(".")[0] not in ("tokenizer", "sample")} | {"ddim.in.alphas_cumprod"}
    assert set(diffs) == ported
    bad = {k: d for k, d in diffs.items() if d > tol[k.split(".")[0]]}
    assert not bad, bad
    # the comparison can fail: the UNet without its residuals is far from eps with them, and a
    # trimap branch fed the prompt's embedding instead of the empty prompt's is caught here
    assert replay.difference(v["unet.out.eps_no_control"], v["unet.out.eps"]) > 100 * tol["unet"]
    wrong = model.nets["control"](z_t=v["control.in.z_t"], hint=v["control.in.hint"],
                                  t=v["control.in.t"], context=v["unet.in.context"])
    assert max(replay.difference(r, v[f"control.out.{k}"]) for k, r in wrong.items()) > tol["control"]


def test_a_batch_of_one_gives_the_rows_of_a_batch_of_two(model, vectors):
    v, _ = vectors
    one = model.nets["control"](z_t=v["control.in.z_t"][1:], hint=v["control.in.hint"][1:],
                                t=v["control.in.t"][1:], context=v["control.in.context"][1:])
    for k, r in one.items():
        np.testing.assert_allclose(r[0], v[f"control.out.{k}"][1], atol=1e-5)


def test_numpy_replay_reproduces_the_whole_sample(model, vectors):
    v, meta = vectors
    tol = json.loads(meta["tolerance"])["sample"]
    diffs = replay.replay(model, v, json.loads(meta["sample"]))
    assert set(diffs) == {"sample.out.z_ok", "sample.out.z", "sample.out.before"}
    assert max(diffs.values()) <= tol, diffs


def test_replay_script_imports_neither_torch_nor_minibldm():
    text = (TOOLS / "replay_numpy.py").read_text()
    imported = {line.split()[1].split(".")[0] for line in text.splitlines()
                if line.startswith(("import ", "from "))}
    assert imported == {"json", "sys", "time", "pathlib", "numpy", "onnxruntime", "safetensors"}


def run_bad(capsys, *args) -> str:
    assert export.main(list(args)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m minibldm.export: error:"), err
    return err


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert "no such weights folder" in run_bad(capsys, "--onnx", out, "--weights", tmp_path / "nope")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert "not valid JSON" in run_bad(capsys, "--onnx", out, "--weights", broken)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert "not a folder" in run_bad(capsys, "--onnx", a_file)
    assert "not a folder" in run_bad(capsys, "--onnx", a_file / "sub")
    assert "--size" in run_bad(capsys, "--onnx", out, "--size", "100")
    run_bad(capsys)  # --onnx is required
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "file"]
    assert a_file.read_text() == "x"


def test_missing_onnx_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import fails
    assert "onnxscript" in run_bad(capsys, "--onnx", tmp_path / "out")
    assert not (tmp_path / "out").exists()
