"""Algorithm 1 (multi-stage blended DDIM) on tiny random networks: the stage schedule, what each
edit leaves untouched, guidance with shared residuals. Algorithm 2 is tested in test_adapt.py
(the reference loop) and test_fast.py (its fast variants)."""
import pytest
import torch
from conftest import max_abs, randomize

from minibldm.autoencoder import Autoencoder
from minibldm.config import AutoencoderConfig, Stages, UNetConfig
from minibldm.control import ControlNet
from minibldm.ddim import alphas_cumprod
from minibldm.sampler import blended_sample, guided_eps, latent_keep_mask, stage_timesteps
from minibldm.unet import UNet

AE = AutoencoderConfig(ch=16, ch_mult=(1, 2, 2, 2), num_res_blocks=1, norm_num_groups=8)
UN = UNetConfig(model_channels=16, channel_mult=(1, 2), attention_resolutions=(2,), num_heads=2,
                context_dim=16, norm_num_groups=8, num_res_blocks=1)
AC = alphas_cumprod()


@pytest.fixture(autouse=True)
def one_thread():
    """These small networks run faster on one thread, and far more steadily on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
    assert stage_timesteps(s).tolist() == list(range(981, 0, -20))
    p = Stages.from_lengths(50, 30, 5)
    assert p.steps == 85
    assert [i for i in range(p.steps) if p.edits_latent(i)] == list(range(50, 80))
    assert [i for i in range(p.steps) if p.edits_image(i)] == list(range(80, 85))
    ts = stage_timesteps(p)
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
    ts = stage_timesteps(stages)
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
