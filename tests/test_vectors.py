"""The committed reference vectors of the bundled tiny model (tests/vectors/tiny.safetensors,
written by tools/export_vectors.py) are reproduced by the current code within the tolerances the
file states, on the reference path and on the fast path (every CPU route forced on, and the
fast decoder adaptation), and a changed output is caught."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

import minibldm
from minibldm import fast
from minibldm.adapt import adapt_decoder
from minibldm.io import file_sha256
from minibldm.commands.sample import DEFAULT_WEIGHTS

FILE = Path(__file__).parent / "vectors" / "tiny.safetensors"
TOOLS = Path(__file__).resolve().parents[1] / "tools"
SPEC = importlib.util.spec_from_file_location("vectors", TOOLS / "vectors.py")
vectors = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(vectors)


def load(path):
    """The reference networks, as minibldm.load returns them."""
    return minibldm.load(path), adapt_decoder


def load_fast(path):
    """The fast layer with every route forced on (the tiny model is below their thresholds)."""
    models = fast.optimize(minibldm.load(path), big_weight=0, small_grid=32 * 32,
                           upsample_min_channels=1)
    assert any(isinstance(m, fast.conv.MatmulConv2d) for m in models.unet.modules())
    assert any(isinstance(m, fast.conv.GridUpsample) for m in models.autoencoder.modules())
    return models, fast.adapt_decoder


@pytest.fixture(scope="module", params=[load, load_fast], ids=["reference", "fast"])
def recomputed(request):
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # as tools/export_vectors.py runs
    try:
        ref, meta = vectors.read(FILE)
        models, adapt = request.param(DEFAULT_WEIGHTS)
        new = vectors.recompute(models, ref, adapt=adapt)
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
