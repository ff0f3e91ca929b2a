"""What only a GPU can check: the networks, the compiled paths, the float16 adaptation and
`python -m minibldm.sample` on CUDA. Skipped where torch sees no CUDA device (CI, developers'
CPU machines); tools/gpu_check.sh runs them first when a GPU is lent.

Float32 comparisons switch TF32 off (torch's default lets cuDNN's convolutions use it, which
rounds their inputs to 10 mantissa bits: about 1e-3, not a bug).

MINIBLDM_TEST_GPU=cpu runs them on the CPU instead: a dry run of their own logic, for a machine
without a GPU."""
import copy
import os
from io import BytesIO

import numpy as np
import pytest
import torch
from conftest import max_abs
from PIL import Image
from test_adapt import adaptation_case, assert_untouched, state
from test_sample import files, inputs, run  # noqa: F401 (inputs is a fixture)
from test_sampler import guided_nets

from minibldm import adapt, fast
from minibldm.config import AdaptConfig
from minibldm.sampler import guided_eps
from minibldm.weights import Models

CUDA = torch.device(os.environ.get("MINIBLDM_TEST_GPU", "cuda"))
pytestmark = pytest.mark.skipif(CUDA.type == "cuda" and not torch.cuda.is_available(),
                                reason="needs a CUDA device (tools/gpu_check.sh runs these)")


@pytest.fixture(autouse=True)
def no_tf32():
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


@torch.no_grad()
def test_guided_step_on_cuda_matches_cpu():
    unet, control, cond, uncond, hint, g = guided_nets()
    z, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500])
    want = guided_eps(unet, control, cond, uncond, hint, 9.0)(z, t)
    on = [x.to(CUDA) for x in (cond, uncond, hint, z, t)]
    got = guided_eps(copy.deepcopy(unet).to(CUDA), copy.deepcopy(control).to(CUDA), *on[:3],
                     9.0)(*on[3:])
    assert max_abs(got.cpu(), want) < 1e-4 * max(1.0, want.abs().max().item())


@torch.no_grad()
def test_compiled_guided_step_on_cuda_matches_eager():
    """sample --compile on a GPU: plain torch.compile (Triton kernels), within 1e-4 of eager."""
    unet, control, cond, uncond, hint, g = guided_nets()
    unet, control = unet.to(CUDA), control.to(CUDA)
    cond, uncond, hint = cond.to(CUDA), uncond.to(CUDA), hint.to(CUDA)
    eager = guided_eps(unet, control, cond, uncond, hint, 9.0)
    fused = guided_eps(fast.compile_frozen(unet, CUDA), fast.compile_frozen(control, CUDA), cond,
                       uncond, hint, 9.0)
    for t in (900, 20):
        zz, tt = torch.randn(1, 4, 8, 8, generator=g).to(CUDA), torch.tensor([t], device=CUDA)
        want = eager(zz, tt)
        assert max_abs(fused(zz, tt), want) < 1e-4 * max(1.0, want.abs().max().item())


@torch.no_grad()
def test_optimize_leaves_networks_on_cuda_as_they_are():
    """The CPU routes are measured on CPUs only: on a GPU fast.optimize swaps nothing (the dry
    run on a CPU sees them swapped)."""
    unet, control, *_ = guided_nets()
    ae = adaptation_case(device=CUDA)[0]
    models = Models(None, ae, unet.to(CUDA), None, None, control.to(CUDA))
    before = str(models)
    fast.optimize(models, big_weight=0, small_grid=float("inf"), upsample_min_channels=0)
    assert (str(models) == before) == (CUDA.type == "cuda")


def test_eager_adaptation_on_cuda_matches_the_reference():
    """fast.adapt_decoder on the GPU (fused AdamW; no channels-last, a CPU choice) against the
    reference loop."""
    ae, h, x_ok, mask = adaptation_case(device=CUDA)
    cfg = AdaptConfig(steps=8, lr=3e-4)
    out, losses = fast.adapt_decoder(ae.decoder, h, x_ok, mask, cfg)
    ref, ref_losses = adapt.adapt_decoder(ae.decoder, h, x_ok, mask, cfg)
    assert out.device == h.device and max_abs(out, ref) < 1e-4
    assert np.allclose(losses, ref_losses, rtol=1e-4, atol=0)


def test_compiled_adaptation_on_cuda_matches_eager():
    """The whole decoder, forward + backward through inductor's Triton kernels."""
    ae, h, x_ok, mask = adaptation_case(device=CUDA)
    cfg = AdaptConfig(steps=8, lr=3e-4)
    eager, eager_losses = fast.adapt_decoder(ae.decoder, h, x_ok, mask, cfg)
    fused, fused_losses = fast.adapt_decoder(ae.decoder, h, x_ok, mask, cfg, compile=True)
    assert max_abs(eager, fused) < 1e-4
    assert np.allclose(eager_losses, fused_losses, rtol=1e-4, atol=0)
    assert eager_losses[0][-1] < eager_losses[0][0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_decoder_adaptation_on_cuda_follows_float32(dtype):
    """sample --dtype float16 (the GPU default for memory): a float32 copy trained under
    autocast, float16 through a gradient scaler; the caller's decoder stays untouched."""
    ae, h, x_ok, mask = adaptation_case(device=CUDA)
    cfg = AdaptConfig(steps=40, lr=1e-4)
    _, full = adapt.adapt_decoder(ae.decoder, h, x_ok, mask, cfg)
    low = copy.deepcopy(ae.decoder).to(dtype)
    before = state(low)
    out, losses = fast.adapt_decoder(low, h.to(dtype), x_ok.to(dtype), mask.to(dtype), cfg)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert full[0][-1] < 0.8 * full[0][0]
    assert abs(losses[0][-1] / full[0][-1] - 1) < 0.15, (losses[0][-1], full[0][-1])
    assert_untouched(low, before)


def test_batched_adaptation_on_cuda_matches_one_at_a_time():
    ae, h, x_ok, mask = adaptation_case(2, CUDA)
    x_ok = x_ok.flip(0)  # the two images differ in their targets too
    cfg = AdaptConfig(steps=6, lr=3e-4)
    out, losses = fast.adapt_decoder(ae.decoder, h, x_ok, mask, cfg)
    ref, ref_losses = adapt.adapt_decoder(ae.decoder, h, x_ok, mask, cfg)  # one at a time
    for i in range(2):
        assert max_abs(out[i], ref[i]) < 1e-4
        assert np.allclose(losses[i], ref_losses[i], rtol=1e-4, atol=0)


@pytest.mark.parametrize("extra", [["--precision", "float16"], ["--batch-size", "2", "--compile"]])
def test_sample_on_cuda_is_close_to_cpu(tmp_path, inputs, extra):  # noqa: F811
    """The command end to end on the GPU: same files as on the CPU, and the images within a few
    levels of 255 (float16, or batching plus compiled kernels, change only rounding)."""
    assert run(inputs, tmp_path / "cpu").returncode == 0
    r = run(inputs, tmp_path / "gpu", "--device", str(CUDA), *extra)
    assert r.returncode == 0, r.stderr
    cpu, gpu = files(tmp_path / "cpu"), files(tmp_path / "gpu")
    assert sorted(cpu) == sorted(gpu)
    for name in cpu:
        a = np.asarray(Image.open(BytesIO(cpu[name])), np.int16)
        b = np.asarray(Image.open(BytesIO(gpu[name])), np.int16)
        if "ground_truth" in name:
            assert np.array_equal(a, b), name  # the masks are placed by seeded numpy, not torch
        else:
            assert np.abs(a - b).mean() < 3, name
