"""The training objectives of `python -m minibldm.train`, and the loss of a step of each stage
(StepLoss): for the diffusion stages (control, unet, text) ldm's ε-prediction loss,
docs/METHOD.md (7) (Ho et al. 2020, eq. 14, on latents), optionally weighted towards the latent
cells a defect mask touches; for the autoencoder stage, L1 (or L2) reconstruction plus the
bottleneck's term (KL or VQ).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..autoencoder import Autoencoder, kl_loss, posterior_sample
from ..ddim import alphas_cumprod, q_sample
from ..tokenizer import Tokenizer
from .trainsamples import NUM_TIMESTEPS, latent_shape, sample_draws


def encode_latent(autoencoder: Autoencoder, image: torch.Tensor,
                  posterior_noise: torch.Tensor) -> torch.Tensor:
    """z_0 of METHOD.md (1): scale · (mean + std · noise), a posterior sample with the noise
    given (drawn per sample by trainsamples.sample_draws); VQ: the deterministic
    pre-quantisation latent."""
    return autoencoder.encode(image, noise=lambda mean: posterior_noise)


def defect_weights(mask: torch.Tensor, latent_hw: tuple[int, int], weight: float) -> torch.Tensor:
    """Per latent cell: `weight` where the defect mask (B, 1, H, W) touches the cell's f x f
    patch (a max-pool, so a 1-pixel scratch still marks its cells), 1 elsewhere; (B, 1, h, w).
    With (h, w) = (H, W) it is per pixel (the autoencoder stage's reconstruction weights)."""
    touched = F.adaptive_max_pool2d(mask.float(), latent_hw)
    return 1 + (weight - 1) * touched


def weighted_mean(d: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """The mean of d (B, C, h, w); with `weights` (B, 1, h, w), Σ w·d / Σ w over all elements."""
    if weights is None:
        return d.mean()
    w = weights.float().expand_as(d)
    return (w * d).sum() / w.sum()


def denoising_loss(unet, z0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                   context: torch.Tensor, schedule: torch.Tensor, control=None,
                   hint: torch.Tensor | None = None,
                   control_context: torch.Tensor | None = None,
                   weights: torch.Tensor | None = None) -> torch.Tensor:
    """METHOD.md (7): ‖ε − ε_θ(z_t, t, context, control residuals)‖² with z_t from (2), the
    (weighted) mean over all elements (ldm's l2). t (B,) on the CPU (the schedule's device); with
    `control`, the residuals of control(z_t, hint, t, control_context) go to the UNet's skips."""
    z_t = q_sample(z0, t, noise, schedule)
    t = t.to(z0.device)
    residuals = control(z_t, hint, t, control_context) if control is not None else None
    eps = unet(z_t, t, context, control=residuals)
    return weighted_mean((eps.float() - noise.float()).square(), weights)


class AutoencoderLoss(nn.Module):
    """Reconstruction plus the bottleneck's term, as one forward (so DDP can wrap it)."""

    def __init__(self, autoencoder: Autoencoder, rec_loss: str, kl_weight: float,
                 codebook_weight: float):
        super().__init__()
        self.autoencoder = autoencoder
        self.rec_loss, self.kl_weight, self.codebook_weight = rec_loss, kl_weight, codebook_weight

    def forward(self, image: torch.Tensor, posterior_noise: torch.Tensor,
                weights: torch.Tensor | None = None) -> torch.Tensor:
        """weights: None, or per pixel (B, 1, H, W) for the reconstruction (--defect-weight)."""
        ae = self.autoencoder
        if ae.cfg.is_vq:
            z, reg, _ = ae.quantize(ae.quant_conv(ae.encoder(image)))
            reg = self.codebook_weight * reg
        else:
            mean, logvar = ae.moments(image)
            z = posterior_sample(mean, logvar, posterior_noise)
            # ldm: sum over pixels / B for both terms; here both are divided by C·H·W as well
            reg = self.kl_weight * kl_loss(mean.float(), logvar.float()).mean() / image[0].numel()
        rec = ae.decoder(ae.post_quant_conv(z)).float()
        diff = rec - image.float()
        return weighted_mean(diff.abs() if self.rec_loss == "l1" else diff.square(), weights) + reg


class PromptCache:
    """τ(prompt) of a frozen text encoder, computed once per prompt, each prompt alone (so the
    values never depend on which prompts share a batch)."""

    def __init__(self, text_encoder, tokenizer: Tokenizer, device: torch.device):
        self.text_encoder, self.tokenizer, self.device = text_encoder, tokenizer, device
        self.cache = {}

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        for p in prompts:
            if p not in self.cache:
                self.cache[p] = self.text_encoder(self.tokenizer([p]).to(self.device))[0]
        return torch.stack([self.cache[p] for p in prompts])  # (B, 77, context_dim)


class StepLoss:
    """The stage's loss on this process's samples of one step. `run` is train.Run; the networks
    the stage trains are called through DDP when there are several processes, so that the
    gradients are those of the whole global batch."""

    def __init__(self, run, tokenizer: Tokenizer):
        args, nets, device = run.args, run.nets, run.device
        self.args, self.nets, self.tokenizer, self.device = args, nets, tokenizer, device

        def wrap(module):
            if run.world == 1:
                return module
            return nn.parallel.DistributedDataParallel(
                module, device_ids=[device.index] if device.type == "cuda" else None)
        if args.stage == "autoencoder":
            self.ae_loss = wrap(AutoencoderLoss(nets["autoencoder"], args.rec_loss, args.kl_weight,
                                                args.codebook_weight))
        else:
            self.calls = {name: wrap(nets[name]) for name in run.trained}
        if args.stage not in ("text", "autoencoder"):
            self.prompts = PromptCache(nets["text_encoder"], tokenizer, device)
        self.schedule = alphas_cumprod(NUM_TIMESTEPS)
        self.latent_shape = latent_shape(nets["autoencoder"].cfg, args.size)

    def __call__(self, batch: dict, indices: list[int]) -> torch.Tensor:
        """The loss of samples `indices` (the batch): METHOD.md (7), with the trimap branch for
        the control stage, without it for unet and text; the autoencoder's for autoencoder."""
        stage, device = self.args.stage, self.device
        t, noise, post = sample_draws(self.args.seed, indices, self.latent_shape)
        image = batch["image"].to(device)
        noise, post = noise.to(device), post.to(device)
        weights = None  # per pixel for the autoencoder, per latent cell for the diffusion stages
        if self.args.defect_weight != 1:
            grid = image.shape[-2:] if stage == "autoencoder" else self.latent_shape[-2:]
            weights = defect_weights(batch["mask"].to(device), grid, self.args.defect_weight)
        if stage == "autoencoder":
            return self.ae_loss(image, post, weights)
        with torch.no_grad():
            z0 = encode_latent(self.nets["autoencoder"], image, post)
        if stage == "text":
            context = self.calls["text_encoder"](self.tokenizer(batch["prompt"]).to(device))
        else:
            context = self.prompts(batch["prompt"])
        if stage == "control":
            return denoising_loss(self.nets["unet"], z0, t, noise, context, self.schedule,
                                  control=self.calls["control"], hint=batch["hint"].to(device),
                                  control_context=self.prompts([""]).expand(len(indices), -1, -1),
                                  weights=weights)
        return denoising_loss(self.calls["unet"], z0, t, noise, context, self.schedule,
                              weights=weights)
