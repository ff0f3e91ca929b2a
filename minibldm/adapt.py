"""AdaBLDM's online decoder adaptation (Li et al. 2024, arXiv 2402.19330, Algorithm 2).

The blended latent z* decodes to an image whose background drifts from x_OK (the autoencoder
is lossy). Per generated image, a copy of the decoder Phi is fine-tuned for a few steps so that
it reproduces x_OK outside the defect mask M* while keeping its own rendering of the defect:

    L = MSE(D(z*) * M*, x_fg * M*) + lambda * MSE(D(z*) * (1 - M*), x_OK * (1 - M*)),

x_fg = Phi(z*) from the unadapted decoder, means over all pixels, lambda = 100 (the reference
code's weighting; the paper names the weight lambda_con of the defect term instead, so both are
parameters). T_ft = 200 AdamW steps at lr 1e-4. The post-quant conv stays frozen: its output is
computed once. The caller's decoder is never modified, so nothing leaks from one image to the next.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn as nn
from torch import Tensor


def adaptation_loss(out: Tensor, x_fg: Tensor, x_ok: Tensor, mask: Tensor,
                    fg_weight: float = 1.0, bg_weight: float = 100.0) -> Tensor:
    """Algorithm 2's loss; each term a mean over all pixels. mask (B, 1, H, W) is 1 on the defect."""
    fg = ((out - x_fg) * mask).pow(2).mean()
    bg = ((out - x_ok) * (1 - mask)).pow(2).mean()
    return fg_weight * fg + bg_weight * bg


def adapt_decoder(decoder: nn.Module, h: Tensor, x_ok: Tensor, mask: Tensor, steps: int = 200,
                  lr: float = 1e-4, fg_weight: float = 1.0, bg_weight: float = 100.0,
                  callback: Callable[[int, float], None] | None = None,
                  blocks: int | None = None) -> tuple[Tensor, list[float]]:
    """Fine-tune a copy of `decoder` on one image and return (its output, the loss per step).

    decoder: the autoencoder's `decoder` (post_quant_conv excluded); h: its input for z*
    (`autoencoder.decoder_input(z*)`), (B, z_channels, h, w); x_ok: (B, 3, H, W) in [-1, 1];
    mask: (B, 1, H, W). The returned image is the adapted decoder's output after the last step.
    losses[k] is the loss before update k; len(losses) == steps + 1 (the last: after training).

    blocks (opt-in, not the paper's method): train only the output head and the last `blocks`
    upsampling levels; the stages before them (Decoder.stages) are frozen, so their output is
    computed once and each step runs forward and backward through the tail alone. None (or
    len(decoder.up) + 1, which includes conv_in + mid) trains the whole decoder.
    """
    with torch.no_grad():
        x_fg = decoder(h)
    tuned = copy.deepcopy(decoder).train()
    stages = tuned.stages()
    frozen = 0 if blocks is None else max(0, len(stages) - 1 - blocks)
    if blocks is not None and blocks < 0:
        raise ValueError(f"blocks must be >= 0, got {blocks}")
    tuned.requires_grad_(False)
    for _, modules in stages[frozen:]:
        for m in modules:
            m.requires_grad_(True)
    with torch.no_grad():
        start = h
        for fn, _ in stages[:frozen]:
            start = fn(start)

    def forward() -> Tensor:
        out = start
        for fn, _ in stages[frozen:]:
            out = fn(out)
        return out

    opt = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(steps):
        loss = adaptation_loss(forward(), x_fg, x_ok, mask, fg_weight, bg_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if callback is not None:
            callback(step, losses[-1])
    with torch.no_grad():
        out = forward()
        losses.append(adaptation_loss(out, x_fg, x_ok, mask, fg_weight, bg_weight).item())
    return out, losses
