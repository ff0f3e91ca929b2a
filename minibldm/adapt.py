"""AdaBLDM's online decoder adaptation (Li et al. 2024, arXiv 2402.19330, Algorithm 2).

The blended latent z* decodes to an image whose background drifts from x_OK (the autoencoder is
lossy). Per generated image, a copy of the decoder Phi is fine-tuned for T_ft steps so that it
reproduces x_OK outside the defect mask M* while keeping its own first rendering of the defect:

    L = fg_weight * MSE(D(z*) * M*, x_fg * M*) + bg_weight * MSE(D(z*) * (1 - M*), x_OK * (1 - M*)),

x_fg = Phi(z*) from the unadapted decoder, each MSE a mean over all pixels. The reference code
weights the background term by 100 and the defect term by 1; the paper names the defect term's
weight lambda_con, so both are parameters (config.AdaptConfig). The post-quant conv stays frozen:
its output h is computed once. The caller's decoder is never modified, so nothing leaks from one
image to the next.

This is the reference loop: float32, one image at a time, plain AdamW. minibldm/fast/adapt.py
runs the same optimisation faster (batched, compiled, under autocast) and is tested against it.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import Tensor, nn

from .config import AdaptConfig


def adaptation_loss(out: Tensor, x_fg: Tensor, x_ok: Tensor, mask: Tensor,
                    fg_weight: float = 1.0, bg_weight: float = 100.0) -> Tensor:
    """Algorithm 2's loss L, METHOD.md (13) (module docstring). mask (B, 1, H, W) is 1 on the defect."""
    fg = ((out - x_fg) * mask).pow(2).mean()
    bg = ((out - x_ok) * (1 - mask)).pow(2).mean()
    return fg_weight * fg + bg_weight * bg


def adapt_one(decoder: nn.Module, h: Tensor, x_ok: Tensor, mask: Tensor,
              cfg: AdaptConfig = AdaptConfig(),
              callback: Callable[[int, float], None] | None = None) -> tuple[Tensor, list[float]]:
    """Algorithm 2 for one image: fine-tune a float32 copy of `decoder` on (h, x_ok, mask), each
    (1, ...), and return (its output after the last step, the loss before each step and after
    the last: cfg.steps + 1 values). callback(step, loss) before each update."""
    tuned = copy.deepcopy(decoder).float().train().requires_grad_(True)
    h, x_ok, mask = h.float(), x_ok.float(), mask.float()
    with torch.no_grad():
        x_fg = decoder(h.to(next(decoder.parameters()).dtype)).float()  # the unadapted rendering
    opt = torch.optim.AdamW(tuned.parameters(), lr=cfg.lr)
    losses = []
    for step in range(cfg.steps):
        loss = adaptation_loss(tuned(h), x_fg, x_ok, mask, cfg.fg_weight, cfg.bg_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if callback is not None:
            callback(step, losses[-1])
    with torch.no_grad():
        out = tuned(h)
        losses.append(adaptation_loss(out, x_fg, x_ok, mask, cfg.fg_weight, cfg.bg_weight).item())
    return out, losses


def adapt_decoder(decoder: nn.Module, h: Tensor, x_ok: Tensor, mask: Tensor,
                  cfg: AdaptConfig = AdaptConfig(),
                  callback: Callable[[int, float], None] | None = None
                  ) -> tuple[Tensor, list[list[float]]]:
    """Algorithm 2 for a batch of B images, each with its own decoder copy (adapt_one in turn).

    decoder: the autoencoder's `decoder` (post_quant_conv excluded); h: its input for z*
    (`autoencoder.decoder_input(z*)`), (B, z_channels, h, w); x_ok: (B, 3, H, W) in [-1, 1];
    mask: (B, 1, H, W). Returns (the B adapted images in x_ok's dtype, per image its losses).
    """
    with torch.enable_grad():
        results = [adapt_one(decoder, h[b:b + 1], x_ok[b:b + 1], mask[b:b + 1], cfg, callback)
                   for b in range(h.shape[0])]
    out = torch.cat([r[0] for r in results]).to(x_ok.dtype)
    return out, [r[1] for r in results]
