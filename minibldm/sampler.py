"""AdaBLDM's multi-stage denoising with content editing (Li et al. 2024, arXiv 2402.19330,
Algorithm 1), as plain functions over tensors and model callables.

Over N DDIM steps i = 0..N-1 (timesteps t_0 > t_1 > ... > t_{N-1}):
  1. free diffusion (i < latent_start): guided DDIM steps from z_T ~ N(0, I);
  2. latent editing (latent_start <= i < latent_stop): before the step, the region to keep is
     replaced by the good image's latent noised to t_i (Blended Latent Diffusion, Avrahami et
     al. 2023): z <- m * q_sample(z_OK, t_i) + (1 - m) * z, m = 1 - dilate5x5(resize(M*));
  3. image editing (i >= image_start): after the step, the predicted x0 is decoded, blended with
     x_OK in pixels under the undilated M*, re-encoded (a posterior sample) and noised back to
     t_i with q_sample. Like the reference code, the noise level is the step's own t_i.
The reference code's schedule is N=50 with latent editing on steps 26..45 and image editing on
45..49 (step 45 does both); the paper's stage lengths (50, 30, 5) are `Stages.from_lengths`
(minibldm/config.py).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import LATENT_MASKS, Stages
from .ddim import ddim_step, ddim_timesteps, q_sample


def stage_timesteps(stages: Stages) -> Tensor:
    """Algorithm 1's t_0 > ... > t_{N-1} (METHOD.md §5): N descending timesteps: ldm's list when N divides 1000 (50 -> 981, ..., 1); otherwise
    its last N entries, as diffusers' "leading" spacing (ldm would run more than N)."""
    return ddim_timesteps(stages.steps)[-stages.steps:]


def latent_keep_mask(mask: Tensor, latent_hw: tuple[int, int], dilation: int = 5,
                     resize: str = "nearest") -> Tensor:
    """Algorithm 1's latent-editing mask, METHOD.md (10): m = 1 - dilate_k(resize(M*)), 1 where
    the latent is replaced by z_OK's.
    mask: (B, 1, H, W) in {0, 1} -> (B, 1, h, w).

    resize "nearest" (the reference code) reads one pixel per latent cell, so a defect thinner
    than the autoencoder's factor f can fall between the pixels it reads and vanish: the whole
    latent is then kept and no defect can appear. "cover" marks every cell whose f x f patch
    holds any mask pixel (a max-pool), so the mask never vanishes."""
    if resize == "nearest":
        small = F.interpolate(mask.float(), size=latent_hw, mode="nearest")
    elif resize == "cover":
        small = F.adaptive_max_pool2d(mask.float(), latent_hw)
    else:
        raise ValueError(f"latent mask resize must be one of {LATENT_MASKS}, got {resize!r}")
    grown = F.max_pool2d(small, dilation, stride=1, padding=dilation // 2)
    return (1.0 - grown).to(mask.dtype)


def guided_eps(unet, control, cond: Tensor, uncond: Tensor, hint: Tensor | None,
               scale: float) -> Callable[[Tensor, Tensor], Tensor]:
    """eps(z, t) with classifier-free guidance on the text only, METHOD.md (8). The trimap branch reads the
    empty prompt in the reference code, so its residuals do not depend on the text: they are
    computed once per step and shared by the conditional and unconditional halves (exact)."""
    def eps(z: Tensor, t: Tensor) -> Tensor:
        residuals = None
        if control is not None:
            residuals = [torch.cat([r, r]) for r in control(z, hint, t, uncond)]
        e = unet(torch.cat([z, z]), torch.cat([t, t]), torch.cat([cond, uncond]), control=residuals)
        e_cond, e_uncond = e.chunk(2)
        return e_uncond + scale * (e_cond - e_uncond)
    return eps


def gaussian(generator: torch.Generator | None) -> Callable[[Tensor], Tensor]:
    """Standard normal noise shaped like its argument, drawn from `generator`."""
    return lambda x: torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def blended_sample(eps: Callable[[Tensor, Tensor], Tensor], encode: Callable, decode: Callable,
                   z_ok: Tensor, x_ok: Tensor, mask: Tensor, alphas_cumprod: Tensor,
                   stages: Stages = Stages(), generator: torch.Generator | None = None,
                   eta: float = 0.0, callback: Callable | None = None,
                   noise: Callable[[Tensor], Tensor] | None = None,
                   latent_mask: str = "nearest") -> Tensor:
    """Algorithm 1. Returns z*, the latent to decode.

    eps(z, t) -> noise prediction (e.g. `guided_eps`); encode(x, noise) -> scaled latent, a
    posterior sample whose noise is noise(latent) (e.g. `Autoencoder.encode(x, noise=noise)`);
    decode(z) -> image in [-1, 1]. z_ok: (B, c, h, w) = encode(x_ok); x_ok: (B, 3, H, W);
    mask: (B, 1, H, W) M*, 1 on the defect. Every random draw is noise(like) in a fixed order:
    z_T, each latent-stage step's re-noising of z_ok, then per image-stage step the posterior
    sample and its re-noising (and with eta > 0 each step's DDIM noise). `noise` defaults to
    gaussian(generator), so a seed fixes the result; a recorded list of draws replays it.
    callback(i, t, z, x0_pred) after each step. latent_mask: how M* is resized to the latent
    grid (`latent_keep_mask`; "nearest" is the reference code's).
    """
    randn_like = noise if noise is not None else gaussian(generator)

    keep = latent_keep_mask(mask, z_ok.shape[-2:], resize=latent_mask).to(z_ok.dtype)
    timesteps = stage_timesteps(stages).tolist()
    z = randn_like(z_ok)
    for i, t in enumerate(timesteps):
        t_prev = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        tt = torch.full((z.shape[0],), t, dtype=torch.long, device=z.device)
        if stages.edits_latent(i):  # latent editing, METHOD.md (11)
            z = keep * q_sample(z_ok, tt, randn_like(z_ok), alphas_cumprod) + (1 - keep) * z
        noise = randn_like(z) if eta > 0 else None
        z, x0 = ddim_step(z, eps(z, tt), tt, t_prev, alphas_cumprod, eta=eta, noise=noise)
        if stages.edits_image(i):  # image editing, METHOD.md (12)
            blended = decode(x0) * mask + x_ok * (1 - mask)
            z = q_sample(encode(blended, randn_like), tt, randn_like(z), alphas_cumprod)
        if callback is not None:
            callback(i, t, z, x0)
    return z
