"""Algorithm 2, the reference loop (minibldm.adapt) on a tiny random autoencoder: the loss as
written, the adaptation restoring the background while its conservative term holds the defect,
one decoder copy per image, float32 master weights for a low-precision decoder, and the caller's
decoder never touched. The fast variants are compared with this loop in tests/test_fast.py."""
import copy

import numpy as np
import torch
from conftest import randomize
from test_sampler import AE, one_thread  # noqa: F401 (one_thread: an autouse fixture)

from minibldm.adapt import adaptation_loss, adapt_decoder
from minibldm.autoencoder import Autoencoder
from minibldm.config import AdaptConfig


def adaptation_case(b: int = 1, device: str | torch.device = "cpu", latent: int = 4):
    """A small random autoencoder (frozen, as loaded for sampling) and b images to adapt its
    decoder on: the decoder's input h, a target x_ok near its own output (a contrast and
    brightness shift the decoder misses), a square defect mask."""
    torch.manual_seed(0)
    ae = randomize(Autoencoder(AE), 3).eval().requires_grad_(False).to(device)
    g = torch.Generator().manual_seed(1)
    h = ae.decoder_input(torch.randn(b, 4, latent, latent, generator=g).to(device)).detach()
    with torch.no_grad():
        x_ok = (0.8 * ae.decoder(h) + 0.2).clamp(-1, 1)
    side = 8 * latent
    mask = torch.zeros(b, 1, side, side, device=device)
    mask[..., side // 4: side * 5 // 8, side // 4: side * 5 // 8] = 1
    return ae, h, x_ok, mask


def state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_untouched(module, before):
    after = module.state_dict()
    assert sorted(after) == sorted(before)
    for k, v in after.items():
        assert torch.equal(v, before[k]) and v.dtype == before[k].dtype, k


def test_loss_is_the_two_weighted_means():
    g = torch.Generator().manual_seed(0)
    out, x_fg, x_ok = torch.randn(3, 2, 3, 8, 8, generator=g)
    mask = (torch.rand(2, 1, 8, 8, generator=g) > 0.6).float()
    fg = sum(((out - x_fg)[b, c, i, j] ** 2).item() for b, c, i, j in np.ndindex(2, 3, 8, 8)
             if mask[b, 0, i, j]) / out.numel()
    bg = sum(((out - x_ok)[b, c, i, j] ** 2).item() for b, c, i, j in np.ndindex(2, 3, 8, 8)
             if not mask[b, 0, i, j]) / out.numel()
    assert abs(adaptation_loss(out, x_fg, x_ok, mask, 2.0, 7.0).item() - (2 * fg + 7 * bg)) < 1e-4
    assert abs(adaptation_loss(out, x_fg, x_ok, mask).item() - (fg + 100 * bg)) < 1e-3


def test_adaptation_restores_background_and_leaves_decoder_untouched():
    ae, h, x_ok, mask = adaptation_case()
    before = state(ae.decoder)
    with torch.no_grad():
        x_fg = ae.decoder(h)
    seen = []
    cfg = AdaptConfig(steps=20, lr=5e-4)
    out, losses = adapt_decoder(ae.decoder, h, x_ok, mask, cfg, lambda s, v: seen.append((s, v)))
    assert len(losses) == 1 and len(losses[0]) == 21 and losses[0][-1] < 0.5 * losses[0][0]
    assert seen == list(enumerate(losses[0][:20]))  # callback(step, loss before the update)
    assert out.shape == x_ok.shape and not out.requires_grad
    bg = lambda x: ((x - x_ok) * (1 - mask)).pow(2).mean().item()  # noqa: E731
    assert bg(out) < 0.6 * bg(x_fg)
    # the conservative term holds the defect region: without it the region drifts further
    free, _ = adapt_decoder(ae.decoder, h, x_ok, mask, AdaptConfig(20, 5e-4, fg_weight=0.0))
    held, _ = adapt_decoder(ae.decoder, h, x_ok, mask, AdaptConfig(20, 5e-4, fg_weight=100.0))
    drift = lambda x: ((x - x_fg) * mask).abs().sum() / mask.sum()  # noqa: E731
    assert drift(held) < drift(out) < drift(free)
    assert_untouched(ae.decoder, before)
    assert not any(p.requires_grad for p in ae.decoder.parameters())


def test_zero_steps_is_the_frozen_decoder():
    ae, h, x_ok, mask = adaptation_case()
    out, losses = adapt_decoder(ae.decoder, h, x_ok, mask, AdaptConfig(steps=0))
    with torch.no_grad():
        assert torch.equal(out, ae.decoder(h))
    assert len(losses[0]) == 1


def test_each_image_of_a_batch_has_its_own_copy():
    ae, h, x_ok, mask = adaptation_case(2)
    x_ok = x_ok.flip(0)  # the two images differ in their targets too
    cfg = AdaptConfig(steps=5, lr=3e-4)
    out, losses = adapt_decoder(ae.decoder, h, x_ok, mask, cfg)
    assert out.shape == (2, 3, 32, 32) and len(losses) == 2
    for i in range(2):
        alone, alone_losses = adapt_decoder(ae.decoder, h[i:i + 1], x_ok[i:i + 1], mask[i:i + 1],
                                            cfg)
        assert torch.equal(out[i:i + 1], alone) and losses[i] == alone_losses[0]


def test_low_precision_decoder_is_adapted_as_a_float32_copy():
    """A bfloat16 decoder: the reference trains a float32 copy from the decoder's own bfloat16
    rendering, returns the image in the inputs' dtype and leaves the decoder as it was."""
    ae, h, x_ok, mask = adaptation_case()
    low = copy.deepcopy(ae.decoder).to(torch.bfloat16)
    before = state(low)
    cfg = AdaptConfig(steps=10, lr=3e-4)
    _, full = adapt_decoder(ae.decoder, h, x_ok, mask, cfg)
    out, losses = adapt_decoder(low, h.bfloat16(), x_ok.bfloat16(), mask.bfloat16(), cfg)
    assert out.dtype == torch.bfloat16
    assert losses[0][-1] < 0.8 * losses[0][0]
    assert abs(losses[0][-1] / full[0][-1] - 1) < 0.15  # only the weights' rounding differs
    assert_untouched(low, before)
