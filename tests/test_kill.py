"""kill -9 at awkward moments of training and sampling: rerunning the same command must end
with every file byte-identical to an uninterrupted run's, and no temporary file left behind.

Each kill is a real SIGKILL that the process sends itself at a chosen point (a hook patched in
before the command runs), so the moment is exact and the test repeatable: between checkpoints,
halfway through writing a checkpoint, between the checkpoint and the weights it goes with,
before the last image is written, and halfway through writing the last image's mask; and an
evaluate run's detector between checkpoints, halfway through one, and after its result."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_tiny_weights
from minibldm.commands.synth import write_dataset

# The command, with one function (`owner`'s attribute `path`) replaced by one that SIGKILLs the
# process on its CALL-th call, after writing half of its file when HALF (for the writers).
SCRIPT = """
import importlib, os, signal, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from minibldm.io import atomic_path
owner = importlib.import_module({owner!r})
for part in {path!r}[:-1]:
    owner = getattr(owner, part)
original, calls = getattr(owner, {path!r}[-1]), [0]

def hook(*args, **kwargs):
    calls[0] += 1
    if calls[0] == {call}:
        if {half}:  # a write cut in the middle: the temporary file holds 100 bytes
            path = next(a for a in args if isinstance(a, (str, Path)))
            with atomic_path(path) as tmp:
                tmp.write_bytes(b"x" * 100)
                os.kill(os.getpid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)

setattr(owner, {path!r}[-1], hook)
sys.exit(importlib.import_module({command!r}).main(sys.argv[1:]))
"""


def run(command, argv, hook=None, expect=(0, -9)):
    """minibldm.commands.<command>'s main(argv) (or the module `command` names, when dotted) in
    a process of one thread; hook = (owner module, dotted attribute, call, half) kills it
    there. Returns the exit status."""
    owner, path, call, half = hook or ("minibldm.io", "atomic_path", 0, False)
    module = command if "." in command else f"minibldm.commands.{command}"
    code = SCRIPT.format(owner=owner, path=path.split("."), call=call, half=half, command=module)
    r = subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode in expect, r.stderr[-2000:]
    return r.returncode


def files(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def same_files(folder: Path, reference: dict) -> None:
    got = files(folder)
    assert sorted(got) == sorted(reference)
    assert [str(k) for k in got if got[k] != reference[k]] == []


def kill_and_resume(command, make_args, data, straight, hook):
    """Kill the command at `hook`, rerun it, and compare every file with the straight run's."""
    out, reference = straight
    shutil.rmtree(out, ignore_errors=True)
    assert run(command, make_args(data, out), hook) == -9
    assert run(command, make_args(data, out)) == 0
    assert not list(out.rglob("*.tmp"))
    same_files(out, reference)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    write_dataset(root / "data", per_class=4, size=64, categories=["metal"], test_good=0,
                  test_per_defect=3, log=None)
    return root / "data" / "metal", write_tiny_weights(root / "w")


# ---- training -----------------------------------------------------------------------------------

def train_args(data, out):
    cat, weights = data
    return ["--stage", "control", "--weights", weights, "--data", cat, "--out", out, "--steps", 6,
            "--batch-size", 2, "--lr", 1e-3, "--size", 64, "--k", 2, "--checkpoint-every", 2,
            "--preview-every", 3, "--log-every", 1, "--device", "cpu"]


@pytest.fixture(scope="module")
def straight_run(data, tmp_path_factory):
    """The uninterrupted run's files, and the folder every test runs in (the run records its
    own path, so the runs compared must have the same one)."""
    out = tmp_path_factory.mktemp("train") / "run"
    assert run("train", train_args(data, out)) == 0
    reference = files(out)
    shutil.rmtree(out)
    return out, reference


TRAIN = "minibldm.commands.train"


@pytest.mark.parametrize("hook", [
    (TRAIN, "Progress.add", 3, False),   # after step 3, between the checkpoints of steps 2 and 4
    (TRAIN, "save_checkpoint", 2, True),  # halfway through writing step 4's checkpoint
    (TRAIN, "write_trained", 2, False),   # step 4's checkpoint written, its weights not yet
], ids=["between-checkpoints", "during-checkpoint-write", "between-checkpoint-and-weights"])
def test_a_killed_training_run_resumes_to_the_same_bytes(data, straight_run, hook):
    kill_and_resume("train", train_args, data, straight_run, hook)


# ---- sampling -----------------------------------------------------------------------------------

def sample_args(data, out):
    cat, weights = data
    return ["--images", cat / "train" / "good", "--defect-masks", cat / "ground_truth" / "dent",
            "--object", "plate", "--defect", "dent", "--weights", weights, "-n", 3,
            "--batch-size", 1, "--size", 64, "--ddim-steps", 4, "--latent-start", 1,
            "--latent-stop", 3, "--image-start", 3, "--adapt-steps", 2, "--quiet", "--out", out,
            "--device", "cpu"]


@pytest.fixture(scope="module")
def straight_sample(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sample") / "out"
    assert run("sample", sample_args(data, out)) == 0
    reference = files(out)
    shutil.rmtree(out)
    return out, reference


SAMPLE = "minibldm.commands.sample"


@pytest.mark.parametrize("hook", [
    (SAMPLE, "write_image", 3, False),  # the last image drawn, not written
    (SAMPLE, "save_png", 6, True),      # halfway through the last image's mask (image, mask)
    (SAMPLE, "contact_sheet", 1, False),  # every image written, the preview sheet not
], ids=["during-last-image", "during-last-mask", "during-preview"])
def test_a_killed_sampling_run_resumes_to_the_same_bytes(data, straight_sample, hook):
    kill_and_resume("sample", sample_args, data, straight_sample, hook)


def test_a_finished_sampling_run_rerun_changes_nothing(data, straight_sample, tmp_path):
    """Nothing pending: the rerun rewrites the preview from its kept rows, byte for byte."""
    out, reference = straight_sample
    shutil.rmtree(out, ignore_errors=True)
    assert run("sample", sample_args(data, out)) == 0
    (out / "minibldm" / "previews").rename(tmp_path / "gone")
    assert run("sample", sample_args(data, out)) == 0
    same_files(out, reference)


# ---- evaluate's detector ------------------------------------------------------------------------

EVALUATE, DETECTOR = "minibldm.eval.evaluate", "minibldm.eval.detector"


def evaluate_args(category, out, lr=2e-3):
    return ["--data", category, "--method", "crop-paste", "--k", 2, "--detector-steps", 6,
            "--checkpoint-every", 2, "--size", 32, "--batch-size", 2, "--lr", lr,
            "--out", out / "result.json", "--device", "cpu"]


@pytest.fixture(scope="module")
def straight_evaluate(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    write_dataset(root / "data", per_class=4, size=32, categories=["washer"], test_good=2,
                  test_per_defect=4, log=None)
    out = root / "out"
    assert run(EVALUATE, evaluate_args(root / "data" / "washer", out)) == 0
    reference = files(out)
    assert sorted(map(str, reference)) == ["result.json", "result.md"]  # no resume file left
    shutil.rmtree(out)
    return root / "data" / "washer", (out, reference)


@pytest.mark.parametrize("hook", [
    (DETECTOR, "loss", 5, False),         # at step 5, its last checkpoint at step 4
    (DETECTOR, "save_atomic", 2, True),   # halfway through writing step 4's checkpoint
    (EVALUATE, "finished", 1, False),     # the result written, the resume file not yet removed
], ids=["between-checkpoints", "during-checkpoint-write", "after-the-result"])
def test_a_killed_evaluate_run_resumes_to_the_same_bytes(straight_evaluate, hook):
    category, straight = straight_evaluate
    kill_and_resume(EVALUATE, lambda c, out: evaluate_args(c, out), category, straight, hook)


def test_evaluate_refuses_a_resume_file_of_other_settings(straight_evaluate, capfd):
    category, (out, _) = straight_evaluate
    shutil.rmtree(out, ignore_errors=True)
    assert run(EVALUATE, evaluate_args(category, out), (DETECTOR, "loss", 5, False)) == -9
    before = files(out)
    r = subprocess.run([sys.executable, "-m", "minibldm.evaluate",
                        *map(str, evaluate_args(category, out, lr=1e-3))], capture_output=True,
                       text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "result.resume.safetensors" in r.stderr and "another lr (0.002)" in r.stderr, r.stderr
    assert files(out) == before  # the resume file is kept for the run that wrote it


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(data, tmp_path, monkeypatch,
                                                                      capsys):
    """An error found after the run folder was written (here: raised at step 3, the checkpoints
    at 2) removes what the run wrote when no checkpoint exists, and keeps a resumable run when
    one does; a folder that existed keeps what it held."""
    from minibldm.commands import train, trainpreview
    from minibldm.commands.runfolder import TrainError
    add = trainpreview.Progress.add

    def failing(self, done, value):
        if done == self.fail_at:
            raise TrainError(f"failed at step {done}")
        add(self, done, value)
    monkeypatch.setattr(trainpreview.Progress, "add", failing)
    new, old = tmp_path / "new", tmp_path / "old"
    old.mkdir()
    (old / "notes.txt").write_text("mine\n")
    for out, fail_at in ((new, 1), (old, 1), (tmp_path / "late", 3)):
        monkeypatch.setattr(trainpreview.Progress, "fail_at", fail_at, raising=False)
        assert train.main([str(a) for a in train_args(data, out)]) == 2
        assert f"failed at step {fail_at}" in capsys.readouterr().err
    assert not new.exists()
    assert files(old) == {Path("notes.txt"): b"mine\n"}
    assert (tmp_path / "late" / "checkpoint.safetensors").is_file()  # step 2's: resumable
