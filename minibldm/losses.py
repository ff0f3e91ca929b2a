"""The training objectives of minibldm's stages (python -m minibldm.train):

- the diffusion stages (control, unet, text): ldm's ε-prediction loss ‖ε − ε_θ(z_t, t, ...)‖² on
  z_t = sqrt(ā_t) z_0 + sqrt(1 − ā_t) ε (Ho et al. 2020, eq. 14, as latent diffusion trains it;
  with the trimap branch's residuals added to the UNet's skips for the control stage), where z_0
  is a posterior sample of the autoencoder; optionally weighted towards the latent cells a
  defect mask touches;
- the autoencoder stage: L1 (or L2) reconstruction plus the bottleneck's term (KL or VQ).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .autoencoder import Autoencoder, kl_loss
from .ddim import q_sample


def encode_latent(autoencoder: Autoencoder, image: torch.Tensor,
                  posterior_noise: torch.Tensor) -> torch.Tensor:
    """z_0 = scale · (mean + std · noise), a posterior sample (Autoencoder.encode with a
    generator, with the noise given); VQ: the deterministic pre-quantisation latent."""
    if autoencoder.cfg.is_vq:
        return autoencoder.encode(image)
    mean, logvar = autoencoder.moments(image)
    return autoencoder.cfg.scale_factor * (mean + torch.exp(0.5 * logvar) * posterior_noise)


def defect_weights(mask: torch.Tensor, latent_hw: tuple[int, int], weight: float) -> torch.Tensor:
    """Per latent cell: `weight` where the defect mask (B, 1, H, W) touches the cell's f x f
    patch (a max-pool, so a 1-pixel scratch still marks its cells), 1 elsewhere; (B, 1, h, w).
    With (h, w) = (H, W) it is per pixel (the autoencoder stage's reconstruction weights)."""
    touched = F.adaptive_max_pool2d(mask.float(), latent_hw)
    return 1 + (weight - 1) * touched


def denoising_loss(unet, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                   context: torch.Tensor, schedule: torch.Tensor, control=None,
                   hint: torch.Tensor | None = None,
                   control_context: torch.Tensor | None = None,
                   weights: torch.Tensor | None = None) -> torch.Tensor:
    """‖ε − ε_θ(z_t, t, context, control residuals)‖², the mean over all elements (ldm's l2);
    with `weights` (B, 1, h, w), the weighted mean Σ w·(ε − ε_θ)² / Σ w over the channels too.
    t (B,) on the CPU (the schedule's device); with `control` the residuals of
    control(z_t, hint, t, control_context) are added to the UNet's skips."""
    z_t = q_sample(z0, t, noise, schedule)
    t = t.to(z0.device)
    residuals = control(z_t, hint, t, control_context) if control is not None else None
    eps = unet(z_t, t, context, control=residuals)
    if weights is None:
        return F.mse_loss(eps.float(), noise.float())
    w = weights.float().expand_as(eps)
    return (w * (eps.float() - noise.float()).square()).sum() / w.sum()


class AutoencoderLoss(nn.Module):
    """Reconstruction plus the bottleneck's term, as one forward (so DDP can wrap it)."""

    def __init__(self, autoencoder: Autoencoder, rec_loss: str, kl_weight: float,
                 codebook_weight: float):
        super().__init__()
        self.autoencoder = autoencoder
        self.rec_loss, self.kl_weight, self.codebook_weight = rec_loss, kl_weight, codebook_weight

    def forward(self, image: torch.Tensor, posterior_noise: torch.Tensor,
                weights: torch.Tensor | None = None) -> torch.Tensor:
        """weights: None (the plain mean) or per pixel (B, 1, H, W): the reconstruction term is
        then the weighted mean Σ w·d / Σ w over the channels too (`--defect-weight`)."""
        ae = self.autoencoder
        if ae.cfg.is_vq:
            z, reg, _ = ae.quantize(ae.quant_conv(ae.encoder(image)))
            reg = self.codebook_weight * reg
        else:
            mean, logvar = ae.moments(image)
            z = mean + torch.exp(0.5 * logvar) * posterior_noise
            # ldm: sum over pixels / B for both terms; here both are divided by C·H·W as well
            reg = self.kl_weight * kl_loss(mean.float(), logvar.float()).mean() / image[0].numel()
        rec = ae.decoder(ae.post_quant_conv(z)).float()
        diff = rec - image.float()
        d = diff.abs() if self.rec_loss == "l1" else diff.square()
        if weights is None:
            return d.mean() + reg
        w = weights.float().expand_as(d)
        return (w * d).sum() / w.sum() + reg
