"""The committed reference vectors of the bundled tiny model (tests/vectors/tiny.safetensors,
written by tools/export_vectors.py) are reproduced by the current code within the tolerances the
file states, and a changed output is caught."""
import json
from pathlib import Path

import pytest
import torch

import minibldm
from minibldm import vectors
from minibldm.io import file_sha256
from minibldm.sample import DEFAULT_WEIGHTS

FILE = Path(__file__).parent / "vectors" / "tiny.safetensors"


@pytest.fixture(scope="module")
def recomputed():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # as tools/export_vectors.py runs
    try:
        ref, meta = vectors.read(FILE)
        new = vectors.recompute(minibldm.load(DEFAULT_WEIGHTS), ref)
    finally:
        torch.use_deterministic_algorithms(before)  # other tests run as they would alone
    return ref, meta, new


def test_file_is_small_and_described(recomputed):
    ref, meta, _ = recomputed
    assert FILE.stat().st_size < 5e6
    described = json.loads(meta["descriptions"])
    for k in ref:
        generic = k.rsplit(".", 1)[0] + ".<i>"
        assert k in described or generic in described, k
    assert set(json.loads(meta["tolerance"])) == {k.split(".")[0] for k in ref}


def test_weights_are_the_ones_the_vectors_were_made_with(recomputed):
    _, meta, _ = recomputed
    for name, digest in json.loads(meta["weights"]).items():
        assert file_sha256(DEFAULT_WEIGHTS / minibldm.weights.FILES[name]) == digest, name


@pytest.mark.slow
def test_current_code_reproduces_the_vectors(recomputed):
    ref, meta, new = recomputed
    tol = json.loads(meta["tolerance"])
    diffs = vectors.differences(ref, new)
    bad = {k: d for k, d in diffs.items() if d > tol[k.split(".")[0]]}
    assert not bad, bad
    assert len(json.loads(meta["prompts"])) == ref["tokenizer.out.ids"].shape[0]


def test_a_changed_output_is_caught(recomputed):
    ref, _, new = recomputed
    tampered = dict(ref)
    tampered["unet.out.eps"] = ref["unet.out.eps"] + 1e-3
    diffs = vectors.differences(tampered, new)
    scale = max(1.0, ref["unet.out.eps"].abs().max().item())
    assert abs(diffs["unet.out.eps"] - 1e-3 / scale) < 1e-5 / scale
    assert diffs["unet.out.eps"] > json.loads(vectors.read(FILE)[1]["tolerance"])["unet"]
    tampered.pop("decoder.out.image")
    assert vectors.differences(tampered, {k: v for k, v in new.items() if k != "ddim.out.x0"})["ddim.out.x0"] == float("inf")
