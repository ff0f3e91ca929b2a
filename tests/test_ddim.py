"""DDIM schedule, step and loop against diffusers' DDIMScheduler configured as SD 1.5, and
against closed forms computed here independently of minibldm.ddim."""
import math

import pytest
import torch
from diffusers import DDIMScheduler

from minibldm import ddim
from minibldm.config import Stages
from minibldm.sampler import blended_sample
from conftest import max_abs

T = 1000
# Counts for which ldm's uniform rule and diffusers' "leading" rule agree: the divisors of 1000
# (1000 itself excluded: ldm would visit t=1000).
DIVISORS = [1, 2, 4, 5, 8, 10, 20, 25, 40, 50, 100, 125, 200, 250, 500]


def randn64(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64)


def sd15_scheduler(num_steps: int) -> DDIMScheduler:
    """diffusers' DDIM as SD 1.5's scheduler_config sets it up."""
    s = DDIMScheduler(num_train_timesteps=T, beta_start=0.00085, beta_end=0.012,
                      beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                      steps_offset=1, prediction_type="epsilon", timestep_spacing="leading")
    s.set_timesteps(num_steps)
    return s


def ldm_uniform(num_steps: int) -> list:
    """ldm's uniform discretisation written out by hand: 1 + k*c for all k*c < T, descending."""
    c = T // num_steps
    return [1 + k * c for k in range(math.ceil(T / c))][::-1]


# ---- schedule ---------------------------------------------------------------------------------

def test_alphas_cumprod_matches_diffusers_and_closed_form():
    ac = ddim.alphas_cumprod()
    assert ac.shape == (T,) and ac.dtype == torch.float64
    assert max_abs(ac, sd15_scheduler(50).alphas_cumprod) <= 1e-6
    # Independent float64 product in plain Python.
    lo, hi, prod = 0.00085 ** 0.5, 0.012 ** 0.5, 1.0
    expected = []
    for i in range(T):
        prod *= 1.0 - (lo + (hi - lo) * i / (T - 1)) ** 2
        expected.append(prod)
    assert max_abs(ac, torch.tensor(expected, dtype=torch.float64)) <= 1e-12
    assert ac[0].item() == pytest.approx(1 - 0.00085, abs=1e-15)


def test_alphas_cumprod_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_train_timesteps"):
        ddim.alphas_cumprod(0)
    with pytest.raises(ValueError, match="linear_start"):
        ddim.alphas_cumprod(1000, 0.02, 0.01)


# ---- timesteps --------------------------------------------------------------------------------

def test_timesteps_50_are_981_to_1():
    ts = ddim.ddim_timesteps(50)
    assert ts.dtype == torch.long
    assert ts.tolist() == list(range(981, 0, -20))


@pytest.mark.parametrize("n", DIVISORS)
def test_timesteps_match_diffusers_when_n_divides_1000(n):
    ts = ddim.ddim_timesteps(n)
    assert len(ts) == n
    assert ts.tolist() == sd15_scheduler(n).timesteps.tolist()
    assert ts.tolist() == ldm_uniform(n)


@pytest.mark.parametrize("n,length,first", [(7, 8, 995), (30, 31, 991), (60, 63, 993),
                                            (150, 167, 997), (400, 500, 999)])
def test_timesteps_follow_ldm_when_n_does_not_divide_1000(n, length, first):
    """ldm keeps every 1 + k*c below 1000, so it runs extra, noisier steps; diffusers keeps n."""
    ts = ddim.ddim_timesteps(n).tolist()
    assert ts == ldm_uniform(n)
    assert (len(ts), ts[0], ts[-1]) == (length, first, 1)
    diffusers_ts = sd15_scheduler(n).timesteps.tolist()
    assert len(diffusers_ts) == n and diffusers_ts != ts
    assert ts[-n:] == diffusers_ts  # diffusers' list is ldm's without its noisiest entries


@pytest.mark.parametrize("n", [3, 9, 27, 36, 37, 101, 111, 251, 333, 501, 1000])
def test_timesteps_that_would_leave_the_schedule_raise(n):
    assert max(ldm_uniform(n)) == T  # ldm indexes alphas_cumprod[1000] here
    with pytest.raises(ValueError, match="outside the schedule"):
        ddim.ddim_timesteps(n)


@pytest.mark.parametrize("n,t", [(0, 1000), (-5, 1000), (1001, 1000), (10, 0)])
def test_timesteps_reject_bad_arguments(n, t):
    with pytest.raises(ValueError):
        ddim.ddim_timesteps(n, t)


# ---- q_sample and predict_x0 ------------------------------------------------------------------

def test_q_sample_closed_form_int_and_batched_t():
    ac = ddim.alphas_cumprod()
    x0, noise = randn64(3, 4, 5, 5), randn64(3, 4, 5, 5)
    a = ac[421].item()
    expected = math.sqrt(a) * x0 + math.sqrt(1 - a) * noise
    assert max_abs(ddim.q_sample(x0, 421, noise, ac), expected) <= 1e-14
    assert max_abs(ddim.q_sample(x0, torch.tensor(421), noise, ac), expected) <= 1e-14
    t = torch.tensor([0, 500, 999])
    batched = ddim.q_sample(x0, t, noise, ac)
    for i, ti in enumerate(t.tolist()):
        a = ac[ti].item()
        assert max_abs(batched[i], math.sqrt(a) * x0[i] + math.sqrt(1 - a) * noise[i]) <= 1e-14


def test_q_sample_matches_diffusers_add_noise():
    x0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([1, 250, 781, 999])
    ours = ddim.q_sample(x0, t, noise, ddim.alphas_cumprod())
    assert ours.dtype == torch.float32
    assert max_abs(ours, sd15_scheduler(50).add_noise(x0, noise, t)) <= 1e-5


def test_q_sample_float16_coefficients_are_rounded_once():
    """1 - ā[0] = 0.00085 must not be computed in float16 (it would come out as 0.00098)."""
    ones = torch.ones(1, 4, dtype=torch.float16)
    out = ddim.q_sample(torch.zeros_like(ones), 0, ones, ddim.alphas_cumprod())
    assert out.dtype == torch.float16
    assert torch.allclose(out.double(), torch.full((1, 4), math.sqrt(0.00085), dtype=torch.float64),
                          rtol=1e-3, atol=0)


def test_predict_x0_inverts_q_sample():
    ac = ddim.alphas_cumprod()
    x0, noise = randn64(2, 4, 6, 6), randn64(2, 4, 6, 6)
    for t in (0, 1, 500, 999, torch.tensor([3, 997])):
        assert max_abs(ddim.predict_x0(ddim.q_sample(x0, t, noise, ac), noise, t, ac), x0) <= 1e-10


# ---- one step vs diffusers --------------------------------------------------------------------

@pytest.mark.parametrize("eta", [0.0, 0.5])
@pytest.mark.parametrize("index", [0, 24, 48, 49])  # 49 is the last step, t=1 -> ā[0]
def test_ddim_step_matches_diffusers(eta, index):
    n = 50
    scheduler = sd15_scheduler(n)
    ts = ddim.ddim_timesteps(n)
    t = int(ts[index])
    t_prev = int(ts[index + 1]) if index + 1 < n else -1
    ac = ddim.alphas_cumprod()
    x0, eps_true = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    x_t = ddim.q_sample(x0, t, eps_true, ac)
    eps = eps_true + 0.1 * torch.randn_like(eps_true)  # an imperfect model
    noise = torch.randn_like(x_t) if eta > 0 else None

    x_prev, x0_pred = ddim.ddim_step(x_t, eps, t, t_prev, ac, eta=eta, noise=noise)
    ref = scheduler.step(eps, t, x_t, eta=eta, variance_noise=noise)
    assert x_prev.dtype == torch.float32 and x0_pred.dtype == torch.float32
    assert max_abs(x0_pred, ref.pred_original_sample) <= 1e-5
    assert max_abs(x_prev, ref.prev_sample) <= 1e-5


def test_ddim_step_last_step_uses_alpha_of_t0_not_one():
    ac = ddim.alphas_cumprod()
    x_t, eps = randn64(1, 4, 4, 4), randn64(1, 4, 4, 4)
    x_prev, x0_pred = ddim.ddim_step(x_t, eps, 1, -1, ac)
    expected = math.sqrt(ac[0].item()) * x0_pred + math.sqrt(1 - ac[0].item()) * eps
    assert max_abs(x_prev, expected) <= 1e-12
    assert max_abs(x_prev, x0_pred) > 1e-3


def test_ddim_step_batched_t_equals_per_sample_steps():
    ac = ddim.alphas_cumprod()
    x_t, eps, noise = (torch.randn(3, 4, 4, 4) for _ in range(3))
    t, t_prev = torch.tensor([981, 501, 1]), torch.tensor([961, 481, -1])
    x_prev, x0_pred = ddim.ddim_step(x_t, eps, t, t_prev, ac, eta=1.0, noise=noise)
    for i in range(3):
        xp, x0 = ddim.ddim_step(x_t[i:i + 1], eps[i:i + 1], int(t[i]), int(t_prev[i]), ac,
                                eta=1.0, noise=noise[i:i + 1])
        assert max_abs(x_prev[i:i + 1], xp) <= 1e-6 and max_abs(x0_pred[i:i + 1], x0) <= 1e-6


def test_ddim_step_noise_rules():
    ac = ddim.alphas_cumprod()
    x_t, eps = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    with pytest.raises(ValueError, match="needs noise"):
        ddim.ddim_step(x_t, eps, 501, 481, ac, eta=0.5)
    with pytest.raises(ValueError, match="eta"):
        ddim.ddim_step(x_t, eps, 501, 481, ac, eta=-0.1, noise=torch.randn_like(x_t))
    plain, _ = ddim.ddim_step(x_t, eps, 501, 481, ac)
    ignored, _ = ddim.ddim_step(x_t, eps, 501, 481, ac, eta=0.0, noise=torch.randn_like(x_t))
    noisy, _ = ddim.ddim_step(x_t, eps, 501, 481, ac, eta=0.5, noise=torch.randn_like(x_t))
    assert torch.equal(plain, ignored) and max_abs(plain, noisy) > 1e-3


# ---- the loop: the method's own (sampler.blended_sample), with stages that never edit ---------

def ddim_loop(model, x_T, n, eta=0.0, generator=None, callback=None):
    """Plain DDIM from x_T over ldm's n uniform steps, through sampler.blended_sample with no
    editing stage (the loop the method runs); x_T is its first draw, the rest come from
    `generator`."""
    first = [x_T]

    def noise(like):
        if first:
            return first.pop()
        return torch.randn(like.shape, generator=generator, dtype=like.dtype)

    def never(*_):
        raise AssertionError("no editing stage may run")
    mask = torch.zeros(x_T.shape[0], 1, *x_T.shape[-2:])
    return blended_sample(model, never, never, x_T, x_T, mask, ddim.alphas_cumprod(),
                          Stages(n, n, n, n), eta=eta, callback=callback, noise=noise)


def point_mass_eps(x0_star: torch.Tensor, ac: torch.Tensor):
    """The exact eps-model for data that is always x0_star: eps = (x_t - √ā_t x0*) / √(1 - ā_t)."""
    def model(x, t):
        assert t.dtype == torch.long and t.shape == (x.shape[0],)
        a = ac[t].to(x.dtype).view(-1, 1, 1, 1)
        return (x - a.sqrt() * x0_star) / (1 - a).sqrt()
    return model


def test_loop_point_mass_eta0_recovers_x0():
    ac = ddim.alphas_cumprod()
    x0_star = randn64(2, 4, 8, 8)
    x_T = randn64(2, 4, 8, 8)
    seen = []
    out = ddim_loop(point_mass_eps(x0_star, ac), x_T, 50,
                    callback=lambda i, t, x, x0: seen.append((i, t, x0)))
    assert [(i, t) for i, t, _ in seen] == list(enumerate(range(981, 0, -20)))
    assert max(max_abs(x0, x0_star) for _, _, x0 in seen) <= 1e-9
    # DDIM eta=0 keeps eps fixed along the path, and the last step lands on ā[0] (ldm), so the
    # result is x0* plus that eps at noise level ā[0].
    eps_T = (x_T - ac[981].sqrt() * x0_star) / (1 - ac[981]).sqrt()
    expected = ac[0].sqrt() * x0_star + (1 - ac[0]).sqrt() * eps_T
    assert max_abs(out, expected) <= 1e-9
    assert max_abs(out, x0_star) <= 0.03 * eps_T.abs().max().item()


def test_loop_point_mass_eta_positive_is_seeded():
    ac = ddim.alphas_cumprod()
    x0_star, x_T = randn64(1, 4, 8, 8), randn64(1, 4, 8, 8)
    model = point_mass_eps(x0_star, ac)
    seen = []
    a = ddim_loop(model, x_T, 20, eta=0.5, generator=torch.Generator().manual_seed(1),
                  callback=lambda i, t, x, x0: seen.append(x0))
    b = ddim_loop(model, x_T, 20, eta=0.5, generator=torch.Generator().manual_seed(1))
    c = ddim_loop(model, x_T, 20, eta=0.5, generator=torch.Generator().manual_seed(2))
    assert len(seen) == 20 and max(max_abs(x0, x0_star) for x0 in seen) <= 1e-9
    assert torch.equal(a, b) and max_abs(a, c) > 1e-4


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_loop_matches_a_diffusers_loop(eta):
    n = 50
    scheduler = sd15_scheduler(n)

    x0_star, x_T = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    exact = point_mass_eps(x0_star, ddim.alphas_cumprod())

    def model(x, t):  # a wrong but well-behaved model: exact eps plus a smooth, t-dependent error
        return exact(x, t) + 0.2 * torch.sin(3 * x) * (t.float() / T).view(-1, 1, 1, 1)

    out = ddim_loop(model, x_T, n, eta=eta, generator=torch.Generator().manual_seed(3))

    g, x = torch.Generator().manual_seed(3), x_T
    for t in scheduler.timesteps:
        eps = model(x, t.repeat(2))
        noise = torch.randn(x.shape, generator=g) if eta > 0 else None
        x = scheduler.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
    assert out.dtype == torch.float32
    assert max_abs(out, x) <= 1e-5


@pytest.mark.parametrize("n", [7, 30])
def test_loop_follows_eq12_when_n_does_not_divide_1000(n):
    """Each step goes to the next listed timestep, the last to ā[0] (ldm); written out here."""
    ac = ddim.alphas_cumprod()
    x0_star, x_T = randn64(1, 4, 8, 8), randn64(1, 4, 8, 8)
    exact = point_mass_eps(x0_star, ac)

    def model(x, t):
        return exact(x, t) + 0.2 * torch.sin(3 * x)

    out = ddim_loop(model, x_T, n)
    ts = ddim.ddim_timesteps(n)[-n:].tolist()
    assert len(ts) == n
    x = x_T  # eq. 12 with eta = 0, written out here
    for t, t_prev in zip(ts, ts[1:] + [0]):
        a, a_prev = ac[t].item(), ac[t_prev].item()
        eps = model(x, torch.tensor([t]))
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    assert max_abs(out, x) <= 1e-10
