"""Algorithm 1 (multi-stage blended DDIM) and Algorithm 2 (decoder adaptation) on tiny random
networks: the stage schedule, what each edit leaves untouched, guidance with shared residuals."""
import copy

import numpy as np
import pytest
import torch
from conftest import max_abs, randomize

from minibldm.adapt import adapt_decoder, adapt_decoders
from minibldm.autoencoder import Autoencoder
from minibldm.config import AutoencoderConfig, UNetConfig
from minibldm.control import ControlNet
from minibldm.ddim import alphas_cumprod
from minibldm.sampler import Stages, blended_sample, guided_eps, latent_keep_mask
from minibldm.unet import UNet

AE = AutoencoderConfig(ch=16, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_num_groups=8)
UN = UNetConfig(model_channels=16, channel_mult=(1, 2), attention_resolutions=(2,), num_heads=2,
                context_dim=16, norm_num_groups=8, num_res_blocks=1)
AC = alphas_cumprod()


def adaptation_case(b: int = 1, device: str | torch.device = "cpu"):
    """A small random autoencoder (frozen, as loaded for sampling) and b images to adapt its
    decoder on: the decoder's input h, a target x_ok near its own output, a square defect mask."""
    torch.manual_seed(0)
    ae = randomize(Autoencoder(AE), 3).eval().requires_grad_(False).to(device)
    g = torch.Generator().manual_seed(1)
    h = ae.decoder_input(torch.randn(b, 4, 4, 4, generator=g).to(device)).detach()
    with torch.no_grad():
        x_ok = (0.8 * ae.decoder(h) + 0.2).clamp(-1, 1)
    mask = torch.zeros(b, 1, 32, 32, device=device)
    mask[..., 8:20, 8:20] = 1
    return ae, h, x_ok, mask


def guided_nets():
    """A small random UNet and trimap branch ready for sampling, the prompts' embeddings, a
    trimap, and the generator that drew them (for more draws)."""
    torch.manual_seed(0)
    unet = randomize(UNet(UN), 4).eval().requires_grad_(False)
    control = randomize(ControlNet(UN), 5).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(2)
    cond, uncond = torch.randn(2, 1, 77, 16, generator=g)
    hint = torch.rand(1, 3, 64, 64, generator=g)
    return unet, control, cond, uncond, hint, g


def test_reference_and_paper_schedules():
    s = Stages()
    assert [i for i in range(s.steps) if s.edits_latent(i)] == list(range(26, 46))
    assert [i for i in range(s.steps) if s.edits_image(i)] == list(range(45, 50))
    assert s.timesteps().tolist() == list(range(981, 0, -20))
    p = Stages.from_lengths(50, 30, 5)
    assert p.steps == 85
    assert [i for i in range(p.steps) if p.edits_latent(i)] == list(range(50, 80))
    assert [i for i in range(p.steps) if p.edits_image(i)] == list(range(80, 85))
    ts = p.timesteps()
    assert len(ts) == 85 and ts[-1] == 1 and bool((ts[:-1] > ts[1:]).all())
    with pytest.raises(ValueError):
        Stages(steps=50, latent_start=30, latent_stop=20)


def test_keep_mask_is_one_minus_dilated_resized_mask():
    m = torch.zeros(1, 1, 64, 64)
    m[..., 30:34, 30:34] = 1  # -> latent pixel (3..4, 3..4) at 8x8 after nearest resize
    keep = latent_keep_mask(m, (8, 8))
    small = torch.nn.functional.interpolate(m, size=(8, 8), mode="nearest")
    ys, xs = torch.nonzero(small[0, 0], as_tuple=True)
    want = torch.ones(8, 8)
    for y, x in zip(ys.tolist(), xs.tolist()):
        want[max(0, y - 2):y + 3, max(0, x - 2):x + 3] = 0
    assert torch.equal(keep[0, 0], want)


def test_cover_keeps_a_thin_defect_that_nearest_loses():
    m = torch.zeros(1, 1, 64, 64)
    m[..., 10:50, 2] = 1  # a 1-pixel vertical scratch; nearest reads column 8j + 4 for cell j
    assert torch.equal(latent_keep_mask(m, (8, 8)), torch.ones(1, 1, 8, 8))  # lost: all kept
    keep = latent_keep_mask(m, (8, 8), resize="cover")
    # cells (1..6, 0) hold scratch pixels; dilated 5x5: rows 0..7 (clipped), columns 0..2
    want = torch.ones(8, 8)
    want[:, 0:3] = 0
    assert torch.equal(keep[0, 0], want)
    big = torch.zeros(1, 1, 64, 64)
    big[..., 24:40, 24:40] = 1  # cover and nearest agree when every touched cell is read
    assert torch.equal(latent_keep_mask(big, (8, 8)), latent_keep_mask(big, (8, 8), resize="cover"))
    with pytest.raises(ValueError, match="nearest"):
        latent_keep_mask(m, (8, 8), resize="area")


class Spy:
    """Tiny random networks, recording what the sampler feeds them."""

    def __init__(self):
        torch.manual_seed(0)
        self.ae = randomize(Autoencoder(AE), 1).eval()
        self.unet = randomize(UNet(UN), 2).eval()
        self.eps_inputs, self.encode_inputs, self.after = [], [], []

    def eps(self, z, t):
        self.eps_inputs.append(z.clone())
        return self.unet(z, t, torch.zeros(z.shape[0], 77, 16))

    def encode(self, x, noise):
        self.encode_inputs.append(x.clone())
        return self.ae.encode(x, noise=noise)

    def callback(self, i, t, z, x0):
        self.after.append((z.clone(), x0.clone()))


@torch.no_grad()
def run_spy(seed=0, stages=Stages(steps=10, latent_start=4, latent_stop=8, image_start=7)):
    spy = Spy()
    g = torch.Generator().manual_seed(seed)
    x_ok = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:40, 20:44] = 1
    z_ok = spy.ae.encode(x_ok)
    z = blended_sample(spy.eps, spy.encode, spy.ae.decode, z_ok, x_ok, mask, AC, stages, g,
                       callback=spy.callback)
    return spy, z, z_ok, x_ok, mask, stages


def test_latent_editing_keeps_only_the_kept_region():
    spy, _, z_ok, _, mask, stages = run_spy()
    keep = latent_keep_mask(mask, z_ok.shape[-2:])
    assert 0 < keep.mean() < 1
    ts = stages.timesteps()
    for i in range(1, stages.steps):
        z_in, z_before = spy.eps_inputs[i], spy.after[i - 1][0]
        if not stages.edits_latent(i):
            assert torch.equal(z_in, z_before), i
            continue
        # outside the keep-mask: the running latent; inside: z_OK noised to t_i with unit noise
        assert torch.equal(z_in * (1 - keep), z_before * (1 - keep)), i
        a = AC[ts[i]].float()
        noise = (z_in - a.sqrt() * z_ok) / (1 - a).sqrt()
        noise = noise[keep.expand_as(noise) > 0]
        assert abs(noise.mean()) < 0.3 and 0.7 < noise.std() < 1.3, (i, noise.mean(), noise.std())
        assert max_abs(z_in, z_before) > 0.1


def test_image_editing_blends_x_ok_outside_the_mask():
    spy, _, _, x_ok, mask, stages = run_spy()
    n_image = sum(stages.edits_image(i) for i in range(stages.steps))
    assert len(spy.encode_inputs) == n_image == 3
    for k, x in enumerate(spy.encode_inputs):
        i = stages.image_start + k
        x0 = spy.after[i][1]  # the step's predicted x0 (the callback sees it after the step)
        assert torch.equal(x * (1 - mask), x_ok * (1 - mask))
        assert max_abs(x * mask, spy.ae.decode(x0) * mask) <= 1e-6


def test_same_seed_same_latent_other_seed_other_latent():
    z1, z2, z3 = run_spy(0)[1], run_spy(0)[1], run_spy(1)[1]
    assert torch.equal(z1, z2)
    assert max_abs(z1, z3) > 1e-2


@torch.no_grad()
def test_guided_eps_shares_control_residuals_exactly():
    unet, ctrl = randomize(UNet(UN), 3).eval(), randomize(ControlNet(UN), 4).eval()
    g = torch.Generator().manual_seed(0)
    z, hint = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    cond, uncond = torch.randn(2, 77, 16, generator=g), torch.randn(2, 77, 16, generator=g)
    t = torch.tensor([500, 500])
    calls = []
    counted = lambda *a: calls.append(1) or ctrl(*a)  # noqa: E731
    got = guided_eps(unet, counted, cond, uncond, hint, 9.0)(z, t)
    assert len(calls) == 1
    res = ctrl(z, hint, t, uncond)  # the reference: the empty prompt feeds the trimap branch
    e_c, e_u = unet(z, t, cond, control=res), unet(z, t, uncond, control=res)
    assert max_abs(got, e_u + 9.0 * (e_c - e_u)) <= 1e-4
    assert max_abs(e_c, e_u) > 1e-3


def test_adaptation_restores_background_and_leaves_decoder_untouched():
    torch.manual_seed(0)
    ae = randomize(Autoencoder(AE), 5).eval()
    before = {k: v.clone() for k, v in ae.decoder.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 4, 4, generator=g)
    h = ae.decoder_input(z).detach()
    with torch.no_grad():
        x_fg = ae.decoder(h)
    x_ok = 0.8 * x_fg + 0.2  # a background the decoder misses (a contrast and brightness shift)
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:20, 8:20] = 1
    out, losses = adapt_decoder(ae.decoder, h, x_ok, mask, steps=30, lr=3e-4)
    assert len(losses) == 31 and losses[-1] < 0.5 * losses[0]
    bg = lambda x: ((x - x_ok) * (1 - mask)).pow(2).mean().item()  # noqa: E731
    assert bg(out) < 0.6 * bg(x_fg)
    # the conservative term holds the defect region: without it the region drifts further
    free, _ = adapt_decoder(ae.decoder, h, x_ok, mask, steps=30, lr=3e-4, fg_weight=0.0)
    held, _ = adapt_decoder(ae.decoder, h, x_ok, mask, steps=30, lr=3e-4, fg_weight=100.0)
    drift = lambda x: ((x - x_fg) * mask).abs().sum() / mask.sum()  # noqa: E731
    assert drift(held) < drift(out) < drift(free)
    for k, v in ae.decoder.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_adapting_only_the_last_blocks():
    """--adapt-blocks: with every stage trainable it is the full method exactly; with fewer it
    still fits the background, differently, and the caller's decoder stays untouched."""
    torch.manual_seed(0)
    ae = randomize(Autoencoder(AE), 3).eval()
    g = torch.Generator().manual_seed(1)
    h = ae.decoder_input(torch.randn(1, 4, 4, 4, generator=g)).detach()
    with torch.no_grad():
        x_fg = ae.decoder(h)
    x_ok, mask = 0.8 * x_fg + 0.2, torch.zeros(1, 1, 32, 32)
    mask[..., 8:20, 8:20] = 1
    before = {k: v.clone() for k, v in ae.decoder.state_dict().items()}
    full, full_losses = adapt_decoder(ae.decoder, h, x_ok, mask, steps=10, lr=3e-4)
    every, every_losses = adapt_decoder(ae.decoder, h, x_ok, mask, steps=10, lr=3e-4,
                                        blocks=len(ae.decoder.up) + 1)
    assert torch.equal(full, every) and full_losses == every_losses
    tail, tail_losses = adapt_decoder(ae.decoder, h, x_ok, mask, steps=10, lr=3e-4, blocks=1)
    assert tail_losses[-1] < 0.8 * tail_losses[0] and not torch.equal(tail, full)
    assert tail_losses[0] == full_losses[0]  # the same starting point
    for k, v in ae.decoder.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError):
        adapt_decoder(ae.decoder, h, x_ok, mask, steps=1, blocks=-1)


@pytest.mark.parametrize("batched", [False, True])
def test_adaptation_under_autocast_follows_float32(batched):
    """Wrapped in one bfloat16 autocast region, the adaptation must keep training: torch reuses
    each parameter's low-precision copy within a region, so without clearing that cache after
    every step the loss stayed within 1% of its start (measured: 40.65 -> 40.32 against 28.59 in
    float32 after 20 steps)."""
    torch.manual_seed(0)
    ae = randomize(Autoencoder(AE), 3).eval()
    g = torch.Generator().manual_seed(3)
    h = ae.decoder_input(torch.randn(2, 4, 4, 4, generator=g)).detach()
    with torch.no_grad():
        x_ok = 0.8 * ae.decoder(h) + 0.2
    mask = torch.zeros(2, 1, 32, 32)
    mask[..., 8:20, 8:20] = 1
    run = (lambda: adapt_decoders(ae.decoder, h, x_ok, mask, steps=12, lr=3e-4)[1][0]) if batched \
        else (lambda: adapt_decoder(ae.decoder, h[:1], x_ok[:1], mask[:1], steps=12, lr=3e-4)[1])
    full = run()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = run()
    assert full[-1] < 0.7 * full[0]
    if batched:  # torch applies no autocast inside vmap: the steps stay float32, and only the
        # targets and the frozen input, computed before vmap, went through bfloat16
        assert np.allclose(low, full, rtol=2e-3, atol=0)
    else:
        assert abs(low[-1] / full[-1] - 1) < 0.05  # bfloat16 rounding only
        assert low != full


@pytest.mark.parametrize("variant", ["single", "batched", "compiled"])
def test_bfloat16_decoder_is_adapted_with_float32_master_weights(variant):
    """sample --dtype bfloat16 hands the adaptation a bfloat16 decoder. Its steps then run under
    bfloat16 autocast on a float32 copy, so lr-1e-4 updates are not rounded away: the loss
    follows the float32 run, the output comes back in bfloat16, the caller's decoder is
    untouched. (Trained in bfloat16 directly, the final loss was twice float32's here, and 50%
    above it on the tiny model's pill image.)"""
    torch.manual_seed(0)
    ae = randomize(Autoencoder(AE), 3).eval()
    g = torch.Generator().manual_seed(3)
    h = ae.decoder_input(torch.randn(1, 4, 4, 4, generator=g)).detach()
    with torch.no_grad():
        x_ok = 0.8 * ae.decoder(h) + 0.2
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:20, 8:20] = 1

    def run(dec, dt):
        args = (dec, h.to(dt), x_ok.to(dt), mask.to(dt))
        if variant == "batched":
            out, losses = adapt_decoders(*args, steps=40, lr=1e-4)
            return out, losses[0]
        return adapt_decoder(*args, steps=40, lr=1e-4, compile=variant == "compiled")
    _, full = run(ae.decoder, torch.float32)
    low_decoder = copy.deepcopy(ae.decoder).to(torch.bfloat16)
    before = {k: v.clone() for k, v in low_decoder.state_dict().items()}
    out, low = run(low_decoder, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert full[-1] < 0.8 * full[0]
    # measured here: +9.5% (bfloat16 forward passes); trained in bfloat16 directly: +101%
    assert abs(low[-1] / full[-1] - 1) < 0.15, (low[-1], full[-1])
    for k, v in low_decoder.state_dict().items():
        assert torch.equal(v, before[k]) and v.dtype == torch.bfloat16, k


def test_float16_adaptation_redoes_the_updates_its_scaler_skipped():
    """A float16 decoder is adapted through a gradient scaler, which starts at 2**16 and skips
    the updates whose gradients overflow. Those are done again at the lower scale, so all
    `steps` updates are real and the loss follows float32's from the first one. (Counted as
    steps, 2 of these 3 updates were lost and the loss stayed at its start.) A loss that
    overflows at every scale ends in a clear error, not an endless loop."""
    ae, h, x_ok, mask = adaptation_case()
    _, full = adapt_decoder(ae.decoder, h, x_ok, mask, steps=3, lr=1e-4)
    low = copy.deepcopy(ae.decoder).half()
    _, half = adapt_decoder(low, h.half(), x_ok.half(), mask.half(), steps=3, lr=1e-4)
    assert len(half) == 4 and full[-1] < 0.5 * full[0]
    assert np.allclose(half, full, rtol=0.02, atol=0), (half, full)  # measured: within 0.7%
    x_bad = x_ok.half()
    x_bad[..., 0, 0] = float("inf")
    with pytest.raises(RuntimeError, match="overflowed in 31 updates in a row"):
        adapt_decoder(low, h.half(), x_bad, mask.half(), steps=3, lr=1e-4)


def test_adaptation_recomputes_norms_from_256_pixels_on(monkeypatch):
    """adapt_decoder's copy recomputes its GroupNorm outputs in the backward pass (memory) for
    images of at least 256 x 256 pixels, and keeps them for smaller ones (speed)."""
    import minibldm.autoencoder as autoencoder
    from minibldm.adapt import RECOMPUTE_FROM
    assert RECOMPUTE_FROM == 256 * 256
    flags = []
    real = autoencoder.norm_silu
    monkeypatch.setattr(autoencoder, "norm_silu",
                        lambda n, x, r=False: flags.append(r and torch.is_grad_enabled()) or real(n, x, r))
    ae = randomize(Autoencoder(AE), 3).eval()
    for latent, want in ((4, False), (32, True)):  # 32 px and 256 px images
        h = ae.decoder_input(torch.randn(1, 4, latent, latent)).detach()
        x_ok = torch.zeros(1, 3, latent * 8, latent * 8)
        flags.clear()
        adapt_decoder(ae.decoder, h, x_ok, torch.zeros(1, 1, latent * 8, latent * 8), steps=1)
        assert flags and any(flags) == want, (latent, flags)
    assert not getattr(ae.decoder.up[0].block[0], "recompute")  # the caller's decoder: untouched


@pytest.mark.parametrize("compiled", [False, True])
def test_adaptation_runs_channels_last_from_256_pixels_on(monkeypatch, compiled):
    """On a CPU the adaptation's copy and its activations are channels-last for images of at least
    256 x 256 pixels (speed, adapt.CHANNELS_LAST_FROM), and the losses follow the default order's.
    The compiled case lowers the threshold to the small image, so the compile stays short."""
    import minibldm.adapt as adapt
    assert adapt.CHANNELS_LAST_FROM == 256 * 256
    ae = randomize(Autoencoder(AE), 3).eval()
    seen = []
    ae.decoder.up[0].block[0].conv1.register_forward_pre_hook(  # deepcopy copies the hook
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)
                                    and m.weight.is_contiguous(memory_format=torch.channels_last)))
    sizes = [(4, True)] if compiled else [(4, False), (32, True)]  # 32 px and 256 px images
    if compiled:
        monkeypatch.setattr(adapt, "CHANNELS_LAST_FROM", 32 * 32)
    for latent, want in sizes:
        g = torch.Generator().manual_seed(latent)
        h = ae.decoder_input(torch.randn(1, 4, latent, latent, generator=g)).detach()
        with torch.no_grad():
            x_ok = (0.8 * ae.decoder(h) + 0.2).clamp(-1, 1)
        mask = torch.zeros(1, 1, latent * 8, latent * 8)
        mask[..., : latent * 2, : latent * 2] = 1
        seen.clear()
        out, losses = adapt_decoder(ae.decoder, h, x_ok, mask, steps=3, compile=compiled)
        assert compiled or (seen and all(s == want for s in seen[1:])), (latent, seen)
        assert out.is_contiguous()
        with monkeypatch.context() as m:
            m.setattr(adapt, "CHANNELS_LAST_FROM", float("inf"))
            ref_out, ref = adapt_decoder(ae.decoder, h, x_ok, mask, steps=3,
                                         compile=compiled)
        assert losses[-1] < 0.9 * losses[0], losses
        assert np.allclose(losses, ref, rtol=1e-5, atol=0), (latent, losses, ref)
        assert max_abs(out, ref_out) <= 1e-4


def test_output_head_runs_in_float32_under_autocast():
    from minibldm.adapt import run_stages
    ae = randomize(Autoencoder(AE), 3).eval()
    h = ae.decoder_input(torch.randn(1, 4, 4, 4)).detach()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert ae.decoder(h).dtype == torch.bfloat16
        assert run_stages(ae.decoder.stages(), h).dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(run_stages(ae.decoder.stages(), h), ae.decoder(h))


@pytest.mark.parametrize("blocks", [None, 1])
def test_batched_adaptation_equals_one_image_at_a_time(blocks):
    """adapt_decoders: one decoder copy per image, stacked with torch.func; each image's result
    and loss curve are those of adapt_decoder alone (up to summation order)."""
    torch.manual_seed(0)
    ae = randomize(Autoencoder(AE), 3).eval()
    ae.requires_grad_(False)  # as loaded for sampling: the copies must still train
    g = torch.Generator().manual_seed(2)
    h = ae.decoder_input(torch.randn(3, 4, 4, 4, generator=g)).detach()
    x_ok = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    mask = (torch.rand(3, 1, 32, 32, generator=g) > 0.7).float()
    before = {k: v.clone() for k, v in ae.decoder.state_dict().items()}
    out, losses = adapt_decoders(ae.decoder, h, x_ok, mask, steps=8, lr=3e-4, blocks=blocks)
    assert out.shape == (3, 3, 32, 32) and len(losses) == 3 and len(losses[0]) == 9
    for i in range(3):
        alone, alone_losses = adapt_decoder(ae.decoder, h[i:i + 1], x_ok[i:i + 1], mask[i:i + 1],
                                            steps=8, lr=3e-4, blocks=blocks)
        assert (out[i] - alone[0]).abs().max() < 1e-4  # Adam amplifies summation-order noise
        assert np.allclose(losses[i], alone_losses, rtol=1e-4, atol=0)
        assert alone_losses[-1] < alone_losses[0]
    assert not torch.allclose(out[0], out[1])  # the copies did not share one decoder
    for k, v in ae.decoder.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_compiled_adaptation_agrees_with_eager():
    """adapt_decoder(compile=True): inductor's fused forward + backward gives the eager result
    within 1e-4, and a second image reuses the graph. Only the output head is trained here
    (blocks=0), which keeps the C++ compile to tens of seconds on 2 cores; the whole decoder,
    UNet and branch are compared by test_sample's compiled run (MINIBLDM_COMPILE_TESTS=1)."""
    torch.manual_seed(0)
    ae = randomize(Autoencoder(AE), 3).eval()
    g = torch.Generator().manual_seed(1)
    h = ae.decoder_input(torch.randn(2, 4, 4, 4, generator=g)).detach()
    x_ok = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    mask = (torch.rand(2, 1, 32, 32, generator=g) > 0.7).float()
    for i in range(2):
        args = (ae.decoder, h[i:i + 1], x_ok[i:i + 1], mask[i:i + 1])
        eager, eager_losses = adapt_decoder(*args, steps=6, lr=3e-3, blocks=0)
        fused, fused_losses = adapt_decoder(*args, steps=6, lr=3e-3, blocks=0, compile=True)
        assert (eager - fused).abs().max() < 1e-4
        assert np.allclose(eager_losses, fused_losses, rtol=1e-4, atol=0)
        assert eager_losses[-1] < 0.9 * eager_losses[0]


@torch.no_grad()
def test_compile_frozen_really_freezes_the_weights():
    """With freezing on, the weights are constants of the compiled graph: changing them after
    the first call leaves the compiled output as it was. (torch.compile's options={"freezing":
    True} did not freeze; this test caught that.)"""
    from minibldm.sample import compile_frozen
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.SiLU()).eval()
    x = torch.randn(1, 4, 8, 8)
    frozen = compile_frozen(net, torch.device("cpu"))
    before = frozen(x)
    assert max_abs(before, net(x)) < 1e-5
    net[0].weight.mul_(2)
    assert max_abs(net(x), before) > 0.1  # the eager module follows its weights ...
    assert max_abs(frozen(x), before) < 1e-6  # ... the frozen graph keeps the ones it compiled
    import torch._inductor.config as inductor_config
    assert not inductor_config.freezing  # switched on for the compiled calls only


@torch.no_grad()
def test_compile_frozen_guided_step_agrees_with_eager():
    """sample.compile_frozen (inductor with its weights frozen into the graph on a CPU): the
    guided step with the trimap branch gives the eager result within 1e-4, for two inputs
    (the graph is not specialised to the first one's values)."""
    from minibldm.sample import compile_frozen
    unet, control, cond, uncond, hint, g = guided_nets()
    eager = guided_eps(unet, control, cond, uncond, hint, 9.0)
    dev = torch.device("cpu")
    fused = guided_eps(compile_frozen(unet, dev), compile_frozen(control, dev), cond, uncond,
                       hint, 9.0)
    for t in (900, 20):
        z = torch.randn(1, 4, 8, 8, generator=g)
        tt = torch.tensor([t])
        want = eager(z, tt)
        assert max_abs(fused(z, tt), want) < 1e-4 * max(1.0, want.abs().max().item())
