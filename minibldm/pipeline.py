"""AdaBLDM assembled: a good image, a defect mask and a prompt in; a defect image out.

`defect_image` is the whole method (Li et al. 2024, arXiv 2402.19330) for one image or a batch:
encode x_OK (a posterior sample), Algorithm 1 (sampler.blended_sample: guided, blended DDIM with
the trimap branch), decode z*, Algorithm 2 (adapt.adapt_decoder: one decoder copy per image).
The command line (`python -m minibldm.sample`), the demo, the porting vectors and Python users
all call it. Image k of a run depends only on (seed, k): `image_seed` and `per_image_noise`.
"""
from __future__ import annotations

import hashlib
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .adapt import adapt_decoder
from .config import SampleConfig
from .ddim import alphas_cumprod
from .sampler import gaussian, guided_eps, blended_sample

Noise = Callable[[Tensor], Tensor]  # noise(like) -> standard normal draws shaped like `like`


def prompt(object_name: str, defect: str | None) -> str:
    """"a {object} with a {defect}" (the reference code's prompt), or "a {object}" for a good image."""
    return f"a {object_name} with a {defect}" if defect else f"a {object_name}"


@torch.no_grad()
def encode_prompt(models, text: str) -> tuple[Tensor, Tensor]:
    """(tau(text), tau("")), each (1, 77, context_dim): the guidance's two contexts."""
    device = next(models.text_encoder.parameters()).device
    return models.text_encoder(models.tokenizer([text, ""]).to(device)).chunk(2)


def image_seed(seed: int, k: int, stream: str = "") -> int:
    """A 63-bit seed for output k: every image's randomness depends on (seed, k) alone, or on
    (seed, stream, k) when the run has several streams (the defect types of a category)."""
    key = f"minibldm/{seed}/{stream}/{k}" if stream else f"minibldm/{seed}/{k}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 1


def per_image_noise(generators: list[torch.Generator]) -> Noise:
    """noise(like) for a batch: row b of every draw comes from generators[b], so an image gets
    the same draws in any batch as alone (gaussian(generators[0]) for a batch of one)."""
    def draw(like: Tensor) -> Tensor:
        return torch.cat([gaussian(g)(like[b:b + 1]) for b, g in enumerate(generators)])
    return draw


def defect_image(models, x_ok: Tensor, mask: Tensor, hint: Tensor, cond: Tensor,
                 uncond: Tensor, noise: Noise, cfg: SampleConfig = SampleConfig(),
                 adapt: Callable = adapt_decoder, progress: Callable | None = None,
                 adapt_progress: Callable | None = None) -> dict:
    """The whole method for a batch of B images.

    models: a minibldm.Models with a trimap branch; x_ok: (B, 3, H, W) in [-1, 1]; mask: M*,
    (B, 1, H, W), 1 on the defect; hint: the trimap (B, 3, H, W) (masks.trimap); cond, uncond:
    tau(prompt) and tau(""), (B, 77, d); noise(like): every random draw, in order (z_OK's
    posterior noise first, then blended_sample's). adapt: Algorithm 2 (adapt.adapt_decoder, or
    fast.adapt_decoder). progress(i, t, z, x0) after each DDIM step; adapt_progress(step, loss).

    Returns {"z_ok", "z": z*, "before": the frozen decoder's image, "after": the adapted
    decoder's, "losses": per image the adaptation loss before each step and after the last}.
    """
    ae = models.autoencoder
    with torch.no_grad():
        z_ok = ae.encode(x_ok, noise=noise)
        eps = guided_eps(models.unet, models.control, cond, uncond, hint, cfg.guidance)
        z = blended_sample(eps, lambda x, nz: ae.encode(x, noise=nz), ae.decode, z_ok, x_ok, mask,
                           alphas_cumprod(), cfg.stages, eta=cfg.eta, callback=progress,
                           noise=noise, latent_mask=cfg.latent_mask)
        h = ae.decoder_input(z)
        before = ae.decoder(h)
    after, losses = adapt(ae.decoder, h, x_ok, mask, cfg.adapt, adapt_progress)
    return {"z_ok": z_ok, "z": z, "before": before, "after": after.detach(), "losses": losses}


def psnr(a: Tensor, b: Tensor, where: Tensor) -> float:
    """PSNR in dB of images in [-1, 1] over the pixels where `where` is 1 (on the 0..1 scale)."""
    mse = (((a - b) / 2) ** 2 * where).sum() / (where.sum() * a.shape[-3]).clamp(min=1)
    return float("inf") if mse == 0 else 10 * math.log10(1 / mse.item())


def paste_background(image: Tensor, x_ok: Tensor, mask: Tensor, radius: int = 3) -> Tensor:
    """x_OK exactly outside the defect mask grown by `radius` and feathered (not the paper's
    method; an option): image inside, x_OK outside, a smooth blend between. (B, ...) tensors."""
    k = 2 * radius + 1
    grown = F.max_pool2d(mask, k, stride=1, padding=radius)
    w = F.avg_pool2d(grown, k, stride=1, padding=radius, count_include_pad=False).clamp(min=mask)
    return w * image + (1 - w) * x_ok
