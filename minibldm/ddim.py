"""DDIM sampling for an epsilon-prediction latent diffusion model, as plain functions over tensors.

DDIM: Song, Meng, Ermon, "Denoising Diffusion Implicit Models", ICLR 2021. One reverse step is
their eq. 12,

    x_prev = sqrt(ā_prev) · x̂0  +  sqrt(1 - ā_prev - σ²) · ε  +  σ · z,
    x̂0     = (x_t - sqrt(1 - ā_t) · ε) / sqrt(ā_t),
    σ      = η · sqrt((1 - ā_prev) / (1 - ā_t)) · sqrt(1 - ā_t / ā_prev)      (their eq. 16),

with ε = ε_θ(x_t, t), z ~ N(0, I), ā the cumulative product of (1 - β); η = 0 is deterministic.
The forward process is q(x_t | x0) = N(sqrt(ā_t) x0, (1 - ā_t) I) (DDPM, Ho et al. 2020, eq. 4).

Schedule and discretisation follow latent-diffusion, as SD 1.5 and the AdaBLDM reference code
do: the "linear" betas linspace(sqrt(0.00085), sqrt(0.012), 1000)² in float64, the "uniform" DDIM
timesteps 1 + k·(1000 // N), each step's previous step its neighbour in that list, and
ā_prev = ā[0] (not 1) for the last step (diffusers' DDIMScheduler with "scaled_linear",
steps_offset=1, set_alpha_to_one=False, "leading" spacing, whenever N divides 1000).

x_t, eps, x0 and noise are (B, ...) tensors of any float dtype; a timestep t is an int or a
LongTensor of shape () or (B,). The float64 schedule may stay on the CPU: coefficients are
computed in float64 and cast to x's dtype last, which keeps 1 - ā exact near t = 0 for float16
and bfloat16 latents (on Apple MPS, which has no float64, pass `alphas_cumprod().float()`).
"""
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

Timestep = Union[int, Tensor]


def alphas_cumprod(num_train_timesteps: int = 1000, linear_start: float = 0.00085,
                   linear_end: float = 0.012) -> Tensor:
    """ā_t = prod_{s<=t} (1 - β_s) for ldm's "linear" schedule β = linspace(√start, √end, n)².

    float64, shape (num_train_timesteps,), as ldm computes it (its float32 copy is this cast).
    Index t is the noise level after t + 1 noising steps: ā[0] = 0.99915, ā[999] ≈ 0.0047.
    """
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    if not 0.0 < linear_start <= linear_end < 1.0:
        raise ValueError("need 0 < linear_start <= linear_end < 1, got "
                         f"linear_start={linear_start}, linear_end={linear_end}")
    betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, num_train_timesteps,
                           dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def ddim_timesteps(num_steps: int = 50, num_train_timesteps: int = 1000) -> Tensor:
    """ldm's "uniform" DDIM timesteps, in sampling (descending) order, as an int64 tensor.

    With stride c = num_train_timesteps // num_steps the steps are 1 + k·c for every k with
    k·c < num_train_timesteps: 981, 961, ..., 21, 1 for 50 steps of 1000.

    As in latent-diffusion, the list has num_steps entries only when num_steps divides
    num_train_timesteps; otherwise it has extra steps at the noisy end (30 steps give 31). Where
    ldm would visit t = num_train_timesteps (an IndexError there), this raises a ValueError.
    """
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1, got {num_train_timesteps}")
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, num_train_timesteps={num_train_timesteps}], "
                         f"got {num_steps}")
    stride = num_train_timesteps // num_steps
    steps = torch.arange(0, num_train_timesteps, stride, dtype=torch.long) + 1
    if steps[-1] >= num_train_timesteps:
        raise ValueError(
            f"ldm's uniform discretisation of {num_train_timesteps} steps with stride {stride} "
            f"(num_steps={num_steps}) would visit t={int(steps[-1])}, outside the schedule "
            f"(latent-diffusion raises IndexError here); choose another num_steps")
    return steps.flip(0)


def _lookup(alphas_cumprod: Tensor, t: Timestep) -> Tensor:
    """ā_t in the schedule's dtype and device: shape () for a scalar t, (B,) for t of shape (B,)."""
    return alphas_cumprod[torch.as_tensor(t, device=alphas_cumprod.device)]


def _cast(coef: Tensor, x: Tensor) -> Tensor:
    """A schedule coefficient of shape () or (B,), cast to x's dtype and device and shaped
    (B, 1, ..., 1) or (1, ..., 1) to broadcast over x."""
    coef = coef.to(dtype=x.dtype).to(device=x.device)  # dtype first: MPS has no float64
    return coef.reshape(coef.shape + (1,) * (x.ndim - coef.ndim))


def q_sample(x0: Tensor, t: Timestep, noise: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Sample q(x_t | x0), the forward process of METHOD.md (2): sqrt(ā_t) · x0 +
    sqrt(1 - ā_t) · noise, in x0's dtype."""
    a_t = _lookup(alphas_cumprod, t)
    return _cast(a_t.sqrt(), x0) * x0 + _cast((1 - a_t).sqrt(), x0) * noise


def predict_x0(x_t: Tensor, eps: Tensor, t: Timestep, alphas_cumprod: Tensor) -> Tensor:
    """x̂0 = (x_t - sqrt(1 - ā_t) · eps) / sqrt(ā_t), the inverse of q_sample for a known eps
    (METHOD.md (9), first line)."""
    a_t = _lookup(alphas_cumprod, t)
    return (x_t - _cast((1 - a_t).sqrt(), x_t) * eps) / _cast(a_t.sqrt(), x_t)


def ddim_step(x_t: Tensor, eps: Tensor, t: Timestep, t_prev: Timestep, alphas_cumprod: Tensor,
              eta: float = 0.0, noise: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """One DDIM step from t to t_prev < t (DDIM eq. 12; METHOD.md (9)). Returns (x_prev, x0_pred).

    t_prev < 0 (the step after t = 1) uses ā_prev = ā[0], as latent-diffusion does (diffusers:
    set_alpha_to_one=False), so the returned x_prev is at noise level ā[0], not exactly x0.
    noise ~ N(0, I), shaped like x_t, is required when eta > 0 and ignored when eta == 0.
    """
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if eta > 0 and noise is None:
        raise ValueError(f"ddim_step with eta={eta} > 0 needs noise (a tensor shaped like x_t)")
    a_t = _lookup(alphas_cumprod, t)
    a_prev = _lookup(alphas_cumprod, torch.as_tensor(t_prev).clamp(min=0))
    sigma = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).sqrt()
    x0_pred = predict_x0(x_t, eps, t, alphas_cumprod)
    direction = (1 - a_prev - sigma ** 2).sqrt()  # the weight of eps, "pointing to x_t"
    x_prev = _cast(a_prev.sqrt(), x_t) * x0_pred + _cast(direction, x_t) * eps
    if eta > 0:
        x_prev = x_prev + _cast(sigma, x_t) * noise
    return x_prev, x0_pred
