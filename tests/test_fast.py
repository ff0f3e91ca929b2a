"""minibldm.fast, each route against the reference path it replaces: the matrix-product 3x3
convolution against nn.Conv2d, the upsampling on the input grid against autoencoder.Upsample,
fast.optimize against the networks as loaded, the fast decoder adaptation (eager, batched,
norms recomputed, channels-last, compiled, low precision, blocks) against adapt.adapt_decoder,
and compile_frozen against eager sampling. Thresholds are always passed as arguments."""
import copy
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import max_abs, randomize
from test_adapt import adaptation_case, assert_untouched, state
from test_sampler import AE, UN, guided_nets, one_thread  # noqa: F401 (an autouse fixture)

from minibldm import adapt, fast
from minibldm.autoencoder import Autoencoder, ResnetBlock, Upsample
from minibldm.config import AdaptConfig
from minibldm.control import ControlNet
from minibldm.fast.adapt import decoder_stages, recompute_norms, run_stages
from minibldm.fast.conv import GridUpsample, MatmulConv2d, conv3x3_as_matmul, upsample_conv3x3
from minibldm.sampler import guided_eps
from minibldm.unet import UNet
from minibldm.weights import Models

CL = torch.channels_last
# torch.compile's first build of a graph takes tens of seconds on a small CPU: opt in
needs_compile = pytest.mark.skipif(os.environ.get("MINIBLDM_COMPILE_TESTS") != "1",
                                   reason="compiles with inductor; set MINIBLDM_COMPILE_TESTS=1")


def is_channels_last(x):
    return x.is_contiguous(memory_format=CL) and not x.is_contiguous()


# --- the convolution routes ------------------------------------------------------------------


@pytest.mark.parametrize("shape,bias", [((2, 24, 4, 4), True), ((1, 16, 8, 6), False),
                                        ((3, 8, 1, 1), True)])
def test_as_matmul_equals_conv2d(shape, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g)
    w = torch.randn(12, shape[1], 3, 3, generator=g)
    b = torch.randn(12, generator=g) if bias else None
    want = F.conv2d(x, w, b, padding=1)
    got = conv3x3_as_matmul(x, w, b)
    assert got.shape == want.shape
    assert want.abs().mean() > 1
    assert max_abs(got, want) <= 1e-4


@pytest.mark.parametrize("bias", [True, False])
def test_matmul_conv2d_is_the_convolution_and_runs_at_inference_on_small_grids(bias):
    """Same keys and values as the nn.Conv2d it wraps; the matrix-product route (whose output is
    channels-last) only without gradients and on grids of at most small_grid positions."""
    g = torch.Generator().manual_seed(0)
    ref = randomize(nn.Conv2d(24, 12, 3, padding=1, bias=bias), 1)
    m = MatmulConv2d(ref, small_grid=16)
    assert list(m.state_dict()) == list(ref.state_dict())
    for k, v in m.state_dict().items():
        assert v is ref.state_dict()[k] or v.data_ptr() == ref.state_dict()[k].data_ptr()
    small, big = torch.randn(2, 24, 4, 4, generator=g), torch.randn(2, 24, 4, 5, generator=g)
    with torch.no_grad():
        for x, route in ((small, True), (big, False)):
            got, want = m(x), ref(x)
            assert is_channels_last(got) == route
            assert max_abs(got, want) <= 1e-4 and want.abs().mean() > 0.1
    x = small.clone().requires_grad_()
    got = m(x)  # gradients on: the convolution, so training sees nn.Conv2d's backward
    assert not is_channels_last(got)
    grads = torch.autograd.grad(got.square().sum(), [x, m.weight])
    xr = small.clone().requires_grad_()
    for a, b in zip(grads, torch.autograd.grad(ref(xr).square().sum(), [xr, ref.weight])):
        assert max_abs(a, b) <= 1e-4


def upsample_then_conv(x, w, b):
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), w, b, padding=1)


@pytest.mark.parametrize("shape,bias,channels_last", [((2, 5, 4, 6), True, False),
                                                      ((1, 3, 1, 1), False, False),
                                                      ((2, 6, 3, 5), True, True)])
def test_upsample_conv3x3_equals_upsampling_then_conv2d(shape, bias, channels_last):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=CL)
    x.requires_grad_()
    w = torch.randn(7, shape[1], 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    want, got = upsample_then_conv(x, w, b), upsample_conv3x3(x, w, b)
    assert got.shape == want.shape == (shape[0], 7, 2 * shape[2], 2 * shape[3])
    assert got.is_contiguous(memory_format=CL if channels_last else torch.contiguous_format)
    assert want.abs().mean() > 1 and max_abs(got, want) <= 1e-12
    # gradients reach x and the 3x3 kernel through the folded kernels
    up = torch.randn(want.shape, generator=g, dtype=torch.float64)
    inputs = [t for t in (x, w, b) if t is not None]
    for a, c in zip(torch.autograd.grad(want, inputs, up), torch.autograd.grad(got, inputs, up)):
        assert a.abs().mean() > 0.1 and max_abs(a, c) <= 1e-10


@pytest.mark.parametrize("channels_last", [False, True])
def test_grid_upsample_equals_autoencoder_upsample(channels_last):
    """GridUpsample against the layer as written, forward and gradients (the adaptation trains
    through it), with the same keys and parameters."""
    ref = randomize(Upsample(6), 2)
    m = GridUpsample(ref)
    assert list(m.state_dict()) == list(ref.state_dict()) == ["conv.weight", "conv.bias"]
    assert m.conv is ref.conv
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 5, 3, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=CL)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    want, got = ref(xa), m(xb)
    assert got.shape == want.shape == (2, 6, 10, 6) and is_channels_last(got) == channels_last
    assert max_abs(got, want) <= 1e-5
    up = torch.randn(want.shape, generator=g)
    params = [ref.conv.weight, ref.conv.bias]
    for a, b in zip(torch.autograd.grad(want, [xa, *params], up),
                    torch.autograd.grad(got, [xb, *params], up)):
        assert a.abs().mean() > 0.01 and max_abs(a, b) <= 1e-4


# --- fast.optimize ---------------------------------------------------------------------------


def tiny_models():
    torch.manual_seed(0)
    ae = randomize(Autoencoder(AE), 1).eval()
    unet = randomize(UNet(UN), 2).eval()
    control = randomize(ControlNet(UN), 3).eval()
    return Models(None, ae, unet, None, None, control)


def count(net, cls):
    return sum(isinstance(m, cls) for m in net.modules())


@torch.no_grad()
def test_optimize_keeps_every_key_and_the_outputs():
    """Every route forced (big_weight=0, small_grid=inf, upsample_min_channels=0): the same
    state-dict keys holding the same tensors, and the UNet (with the branch's residuals), the
    branch and the decoder within float tolerance of the networks as loaded."""
    ref = tiny_models()
    models = copy.deepcopy(ref)
    keys = {n: list(getattr(models, n).state_dict()) for n in ("unet", "control", "autoencoder")}
    ptrs = {n: [v.data_ptr() for v in getattr(models, n).state_dict().values()] for n in keys}
    assert fast.optimize(models, big_weight=0, small_grid=float("inf"),
                         upsample_min_channels=0) is models
    for n in keys:
        assert list(getattr(models, n).state_dict()) == keys[n], n
        assert [v.data_ptr() for v in getattr(models, n).state_dict().values()] == ptrs[n], n
    assert count(models.unet, MatmulConv2d) > 10 and count(models.control, MatmulConv2d) > 5
    assert count(models.autoencoder, GridUpsample) == count(ref.autoencoder, Upsample) == 3
    unet, control, cond, uncond, hint, g = guided_nets()
    models.unet.load_state_dict(unet.state_dict())  # loading still works on the swapped modules
    ref.unet.load_state_dict(unet.state_dict())
    z, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500, 20])
    hint, ctx = hint.expand(2, -1, -1, -1), torch.cat([cond, uncond])
    res, res_ref = models.control(z, hint, t, ctx), ref.control(z, hint, t, ctx)
    assert len(res) == len(res_ref) and all(max_abs(a, b) <= 1e-5 for a, b in zip(res, res_ref))
    got, want = models.unet(z, t, ctx, control=res), ref.unet(z, t, ctx, control=res_ref)
    assert is_channels_last(got) and not is_channels_last(want)  # the output conv's route ran
    assert max_abs(got, want) <= 1e-4 * max(1.0, want.abs().max().item())
    h = ref.autoencoder.decoder_input(z)
    assert max_abs(models.autoencoder.decoder(h), ref.autoencoder.decoder(h)) <= 1e-4
    swapped = str(models)
    fast.optimize(models, big_weight=0, small_grid=float("inf"), upsample_min_channels=0)
    assert str(models) == swapped  # once is all: nothing left to swap


def test_optimize_defaults_pick_big_plain_3x3_convolutions_and_wide_upsampling():
    """At the default thresholds the tiny networks keep their layers; a big plain 3x3
    convolution is replaced, a strided, dilated or small one is not; upsampling from 128
    channels on."""
    models = tiny_models()
    before = {n: str(getattr(models, n)) for n in ("unet", "control", "autoencoder")}
    fast.optimize(models)
    assert {n: str(getattr(models, n)) for n in before} == before
    net = nn.Sequential(nn.Conv2d(768, 768, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1),
                        nn.Conv2d(768, 768, 3, stride=2, padding=1),
                        nn.Conv2d(768, 768, 3, padding=2, dilation=2))
    ups = nn.Sequential(Upsample(64), Upsample(128))
    fast.optimize(Models(None, ups, net, None, None))
    assert [type(m) for m in net] == [MatmulConv2d, nn.Conv2d, nn.Conv2d, nn.Conv2d]
    assert [type(m) for m in ups] == [Upsample, GridUpsample]
    off = nn.Sequential(nn.Conv2d(768, 768, 3, padding=1))
    fast.optimize(Models(None, Upsample(4), off, None, None), big_weight=float("inf"))
    assert type(off[0]) is nn.Conv2d


# --- the decoder adaptation -------------------------------------------------------------------


def check_close(out, losses, ref_out, ref_losses, atol=1e-4, rtol=1e-4):
    assert len(losses) == len(ref_losses)
    for a, b in zip(losses, ref_losses):
        assert np.allclose(a, b, rtol=rtol, atol=0), (a, b)
    assert out.shape == ref_out.shape and out.dtype == ref_out.dtype
    assert max_abs(out, ref_out) <= atol


@pytest.mark.parametrize("fused", [True, False])
def test_eager_adaptation_follows_the_reference(fused):
    """One image in float32: fused or not, the reference loop's optimisation (AdamW is the same
    formula), the same callback, and the caller's decoder untouched."""
    ae, h, x_ok, mask = adaptation_case()
    before = state(ae.decoder)
    cfg = AdaptConfig(steps=6, lr=3e-4)
    seen, ref_seen = [], []
    out, losses = fast.adapt_decoder(ae.decoder, h, x_ok, mask, cfg,
                                     lambda s, v: seen.append((s, v)), fused=fused)
    ref_out, ref_losses = adapt.adapt_decoder(ae.decoder, h, x_ok, mask, cfg,
                                              lambda s, v: ref_seen.append((s, v)))
    check_close(out, losses, ref_out, ref_losses)
    assert losses[0][-1] < 0.9 * losses[0][0]
    assert [s for s, _ in seen] == [s for s, _ in ref_seen] == list(range(6))
    assert_untouched(ae.decoder, before)


@pytest.mark.parametrize("blocks", [None, 1])
def test_batched_adaptation_equals_one_image_at_a_time(blocks):
    """B > 1: one decoder copy per image, stacked with torch.func; each image's result and loss
    curve are those it gets alone (the reference loop; the fast eager one with blocks)."""
    ae, h, x_ok, mask = adaptation_case(3)
    g = torch.Generator().manual_seed(2)
    x_ok = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    mask = (torch.rand(3, 1, 32, 32, generator=g) > 0.7).float()
    before = state(ae.decoder)
    cfg = AdaptConfig(steps=5, lr=3e-4)
    out, losses = fast.adapt_decoder(ae.decoder, h, x_ok, mask, cfg, blocks=blocks)
    assert out.shape == (3, 3, 32, 32) and len(losses) == 3 and len(losses[0]) == 6
    if blocks is None:
        ref_out, ref_losses = adapt.adapt_decoder(ae.decoder, h, x_ok, mask, cfg)
    else:
        alone = [fast.adapt_decoder(ae.decoder, h[i:i + 1], x_ok[i:i + 1], mask[i:i + 1], cfg,
                                    blocks=blocks) for i in range(3)]
        ref_out, ref_losses = torch.cat([a[0] for a in alone]), [a[1][0] for a in alone]
    check_close(out, losses, ref_out, ref_losses)  # Adam amplifies summation-order noise
    assert all(curve[-1] < curve[0] for curve in losses)
    assert not torch.allclose(out[0], out[1])  # the copies did not share one decoder
    assert_untouched(ae.decoder, before)


def saved_bytes(run) -> int:
    """Bytes the autograd graph keeps for the backward passes of run() (outside checkpoints)."""
    total = [0]

    def pack(t):
        total[0] += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return total[0]


def test_recomputed_norms_follow_the_reference():
    """recompute_from=0 forces the norm recomputation on a small image: the autograd graph
    keeps less, the result is the reference loop's. The swapped block is the block."""
    block, x = randomize(ResnetBlock(8, 16, 4), 1), torch.randn(2, 8, 6, 6, requires_grad=True)
    swapped = recompute_norms(copy.deepcopy(adaptation_case()[0].decoder)).mid.block_1
    assert type(swapped).__name__ == "RecomputedResnetBlock"
    other = type(swapped)(block)
    assert list(other.state_dict()) == list(block.state_dict())
    for a, b in zip(torch.autograd.grad(block(x).sum(), [x, block.conv1.weight]),
                    torch.autograd.grad(other(x).sum(), [x, block.conv1.weight])):
        assert max_abs(a, b) <= 1e-5
    ae, h, x_ok, mask = adaptation_case()
    cfg = AdaptConfig(steps=4, lr=3e-4)
    runs = {}
    for name, at in (("kept", float("inf")), ("recomputed", 0)):
        runs[name] = saved_bytes(lambda: runs.setdefault(name + "_result", fast.adapt_decoder(
            ae.decoder, h, x_ok, mask, cfg, recompute_from=at)))
    assert runs["recomputed"] < 0.9 * runs["kept"]
    check_close(*runs["recomputed_result"], *adapt.adapt_decoder(ae.decoder, h, x_ok, mask, cfg))


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=needs_compile)])
def test_channels_last_adaptation_follows_the_reference(compile):
    """channels_last_from=0 forces channels-last order on a small image: the copy's weights and
    activations are channels-last (seen by a hook, which the copy inherits), the output comes
    back contiguous, and the losses are the reference's. Compiled: only the head is trained
    (blocks=0), which keeps the compile short; compared with eager blocks=0."""
    ae, h, x_ok, mask = adaptation_case()
    seen = []
    ae.decoder.conv_out.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=CL)
                                    and m.weight.is_contiguous(memory_format=CL)))
    cfg = AdaptConfig(steps=3, lr=3e-4)
    blocks = 0 if compile else None
    for at, want in ((float("inf"), False), (0, True)):
        seen.clear()
        out, losses = fast.adapt_decoder(ae.decoder, h, x_ok, mask, cfg, blocks=blocks,
                                         compile=compile, channels_last_from=at)
        assert compile or (len(seen) == 5 and all(s == want for s in seen[1:])), (at, seen)
        assert out.is_contiguous()
        if compile:
            ref = fast.adapt_decoder(ae.decoder, h, x_ok, mask, cfg, blocks=0)
        else:
            ref = adapt.adapt_decoder(ae.decoder, h, x_ok, mask, cfg)
        check_close(out, losses, *ref, atol=1e-3)  # other summation orders, amplified by Adam
        assert losses[0][-1] < 0.95 * losses[0][0], losses


@needs_compile
def test_compiled_adaptation_agrees_with_eager():
    """compile=True: inductor's fused forward + backward gives the eager result, and a second
    image reuses the graph. Only the output head is trained (blocks=0), which keeps the compile
    short; the whole decoder is compared on a GPU (tests/test_cuda.py)."""
    ae, h, x_ok, mask = adaptation_case(2)
    x_ok = x_ok.flip(0)
    cfg = AdaptConfig(steps=4, lr=3e-3)
    for i in range(2):
        args = (ae.decoder, h[i:i + 1], x_ok[i:i + 1], mask[i:i + 1], cfg)
        eager = fast.adapt_decoder(*args, blocks=0)
        check_close(*fast.adapt_decoder(*args, blocks=0, compile=True), *eager)
        assert eager[1][0][-1] < 0.9 * eager[1][0][0]


def test_adaptation_through_grid_upsample_follows_the_reference():
    """The fast path as the sample command runs it: the decoder optimised (its upsampling on
    the input grid), then fast.adapt_decoder; against the reference loop on the plain decoder."""
    ae, h, x_ok, mask = adaptation_case()
    fast_ae = copy.deepcopy(ae)
    fast.optimize(Models(None, fast_ae, None, None, None), upsample_min_channels=0)
    assert count(fast_ae.decoder, GridUpsample) == 3
    cfg = AdaptConfig(steps=4, lr=3e-4)
    check_close(*fast.adapt_decoder(fast_ae.decoder, h, x_ok, mask, cfg),
                *adapt.adapt_decoder(ae.decoder, h, x_ok, mask, cfg))


def test_blocks_every_stage_is_the_whole_decoder_fewer_still_fit():
    """blocks: with every stage trainable it is the default exactly; with fewer it still fits
    the background, differently, from the same start; the caller's decoder stays untouched."""
    ae, h, x_ok, mask = adaptation_case()
    before = state(ae.decoder)
    cfg = AdaptConfig(steps=5, lr=3e-4)
    full, full_losses = fast.adapt_decoder(ae.decoder, h, x_ok, mask, cfg)
    every, every_losses = fast.adapt_decoder(ae.decoder, h, x_ok, mask, cfg,
                                             blocks=len(ae.decoder.up) + 1)
    assert torch.equal(full, every) and full_losses == every_losses
    tail, tail_losses = fast.adapt_decoder(ae.decoder, h, x_ok, mask, cfg, blocks=1)
    assert tail_losses[0][-1] < 0.9 * tail_losses[0][0] and not torch.equal(tail, full)
    assert tail_losses[0][0] == full_losses[0][0]  # the same starting point
    assert_untouched(ae.decoder, before)
    with pytest.raises(ValueError):
        fast.adapt_decoder(ae.decoder, h, x_ok, mask, AdaptConfig(steps=1), blocks=-1)


@torch.no_grad()
def test_stages_are_the_decoder_and_the_head_runs_in_float32_under_autocast():
    ae, h, _, _ = adaptation_case()
    assert torch.equal(run_stages(decoder_stages(ae.decoder), h), ae.decoder(h))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ae.decoder(h).dtype == torch.bfloat16
        assert run_stages(decoder_stages(ae.decoder), h).dtype == torch.float32


@pytest.mark.parametrize("batched", [False, True])
def test_adaptation_under_autocast_follows_float32(batched):
    """Wrapped in one bfloat16 autocast region, the adaptation must keep training: torch reuses
    each parameter's low-precision copy within a region, so without clearing that cache after
    every step the loss barely moves."""
    ae, h, x_ok, mask = adaptation_case(2)
    x_ok = x_ok.flip(0)
    args = (ae.decoder, h, x_ok, mask) if batched else (ae.decoder, h[:1], x_ok[:1], mask[:1])
    cfg = AdaptConfig(steps=10, lr=1e-3)
    full = fast.adapt_decoder(*args, cfg)[1][0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = fast.adapt_decoder(*args, cfg)[1][0]
    assert full[-1] < 0.7 * full[0], full
    if batched:  # torch applies no autocast inside vmap: the steps stay float32, and only the
        # targets and the frozen input, computed before vmap, went through bfloat16
        assert np.allclose(low, full, rtol=2e-3, atol=0)
    else:
        assert abs(low[-1] / full[-1] - 1) < 0.05 and low != full  # bfloat16 rounding only


@pytest.mark.parametrize("variant", ["single", "batched",
                                     pytest.param("compiled", marks=needs_compile)])
def test_bfloat16_decoder_is_adapted_with_float32_master_weights(variant):
    """A bfloat16 decoder (sample --dtype bfloat16): its steps run under bfloat16 autocast on a
    float32 copy, so small updates are not rounded away: the loss follows the float32 run, the
    output comes back in bfloat16, the caller's decoder is untouched."""
    ae, h, x_ok, mask = adaptation_case(2)
    x_ok = x_ok.flip(0)
    b = 2 if variant == "batched" else 1
    h, x_ok, mask = h[:b], x_ok[:b], mask[:b]
    kw = dict(blocks=0, compile=True) if variant == "compiled" else {}
    cfg = AdaptConfig(steps=10, lr=1e-3 if kw else 2e-4)
    full = fast.adapt_decoder(ae.decoder, h, x_ok, mask, cfg, **kw)[1][0]
    low_decoder = copy.deepcopy(ae.decoder).to(torch.bfloat16)
    before = state(low_decoder)
    bf = torch.bfloat16
    out, low = fast.adapt_decoder(low_decoder, h.to(bf), x_ok.to(bf), mask.to(bf), cfg, **kw)
    assert out.dtype == bf and out.shape == x_ok.shape
    assert full[-1] < 0.8 * full[0], full
    assert abs(low[0][-1] / full[-1] - 1) < 0.15, (low[0][-1], full[-1])
    assert_untouched(low_decoder, before)


def test_float16_adaptation_redoes_the_updates_its_scaler_skipped():
    """A float16 decoder is adapted through a gradient scaler, which starts at 2**16 and skips
    the updates whose gradients overflow. Those are done again at the lower scale, so all
    `steps` updates are real and the loss follows float32's from the first one. A loss that
    overflows at every scale ends in a clear error, not an endless loop."""
    ae, h, x_ok, mask = adaptation_case()
    cfg = AdaptConfig(steps=3, lr=1e-4)
    _, full = adapt.adapt_decoder(ae.decoder, h, x_ok, mask, cfg)
    low = copy.deepcopy(ae.decoder).half()
    out, half = fast.adapt_decoder(low, h.half(), x_ok.half(), mask.half(), cfg)
    assert out.dtype == torch.float16 and len(half[0]) == 4 and full[0][-1] < 0.5 * full[0][0]
    assert np.allclose(half[0], full[0], rtol=0.02, atol=0), (half, full)
    x_bad = x_ok.half()
    x_bad[..., 0, 0] = float("inf")
    with pytest.raises(RuntimeError, match="overflowed in 31 updates in a row"):
        fast.adapt_decoder(low, h.half(), x_bad, mask.half(), cfg, blocks=0)  # the head: quick


# --- compile_frozen --------------------------------------------------------------------------


@torch.no_grad()
def test_compile_frozen_really_freezes_the_weights():
    """With freezing on, the weights are constants of the compiled graph: changing them after
    the first call leaves the compiled output as it was. (torch.compile's options={"freezing":
    True} did not freeze; this test caught that.)"""
    net = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.SiLU()).eval()
    x = torch.randn(1, 4, 8, 8)
    frozen = fast.compile_frozen(net, torch.device("cpu"))
    before = frozen(x)
    assert max_abs(before, net(x)) < 1e-5
    net[0].weight.mul_(2)
    assert max_abs(net(x), before) > 0.1  # the eager module follows its weights ...
    assert max_abs(frozen(x), before) < 1e-6  # ... the frozen graph keeps the ones it compiled
    import torch._inductor.config as inductor_config
    assert not inductor_config.freezing  # switched on for the compiled calls only


@needs_compile
@torch.no_grad()
def test_compile_frozen_guided_step_agrees_with_eager():
    """The guided step with the trimap branch, compiled with frozen weights, gives the eager
    result within 1e-4, for two inputs (the graph is not specialised to the first one's
    values)."""
    unet, control, cond, uncond, hint, g = guided_nets()
    eager = guided_eps(unet, control, cond, uncond, hint, 9.0)
    dev = torch.device("cpu")
    fused = guided_eps(fast.compile_frozen(unet, dev), fast.compile_frozen(control, dev), cond,
                       uncond, hint, 9.0)
    for t in (900, 20):
        z = torch.randn(1, 4, 8, 8, generator=g)
        tt = torch.tensor([t])
        want = eager(z, tt)
        assert max_abs(fused(z, tt), want) < 1e-4 * max(1.0, want.abs().max().item())
