"""The trimap branch of AdaBLDM (Li et al. 2024, arXiv 2402.19330, Sec. 3.2): the trimap
embedder zeta and the trimap encoder eps_tri, built as ControlNet (Zhang et al. 2023, "Adding
Conditional Control to Text-to-Image Diffusion Models").

zeta (`input_hint_block`) maps the trimap (B, 3, fh, fw) to (B, model_channels, h, w), f the
autoencoder's factor (hint_factor), with 3x3 convs and SiLU and a zero-initialised last conv.
eps_tri is a trainable copy of the UNet's time embedding, input blocks and middle block; zeta's
output is added after its first conv, and a zero-initialised 1x1 conv after each input block
(`zero_convs`) and after the middle block (`middle_block_out`) gives the residuals that
`UNet.forward(..., control=)` adds to its skip connections and middle output. Attribute names equal the keys under `control_model.` in
ControlNet / AdaBLDM checkpoints.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .config import UNetConfig
from .unet import UNet, make_input_blocks, make_middle_block, make_time_embed, timestep_embedding

HINT_CHANNELS = (16, 16, 32, 32, 96, 96, 256)  # zeta's widths; a stride-2 conv enters 32, 96, 256


def zero_module(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def make_hint_block(hint_channels: int, out_channels: int, factor: int = 8) -> nn.Sequential:
    """zeta: (conv, SiLU) pairs through HINT_CHANNELS, stride 2 wherever the width grows, log2
    `factor` times (8 in every public ControlNet; 4 as diffusers' ControlNetModel with
    conditioning_embedding_out_channels (16, 32, 96)), then a zero conv to the UNet width."""
    assert factor in (2, 4, 8), f"hint_factor must be 2, 4 or 8, got {factor}"
    widths = HINT_CHANNELS[:2 * factor.bit_length() - 1]  # conv_in, then 2 per stride-2 stage
    layers, ch = [nn.Conv2d(hint_channels, widths[0], 3, padding=1), nn.SiLU()], widths[0]
    for out in widths[1:]:
        layers += [nn.Conv2d(ch, out, 3, padding=1, stride=2 if out != ch else 1), nn.SiLU()]
        ch = out
    layers.append(zero_module(nn.Conv2d(ch, out_channels, 3, padding=1)))
    return nn.Sequential(*layers)


class ControlNet(nn.Module):
    """zeta + eps_tri. `forward(x, hint, t, context)` returns len(input_blocks) + 1 residuals."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        self.time_embed = make_time_embed(cfg)
        self.input_hint_block = make_hint_block(cfg.hint_channels, cfg.model_channels,
                                                 cfg.hint_factor)
        self.input_blocks, chans = make_input_blocks(cfg)
        self.zero_convs = nn.ModuleList(
            [nn.Sequential(zero_module(nn.Conv2d(c, c, 1))) for c in chans])
        self.middle_block = make_middle_block(cfg)
        c = cfg.model_channels * cfg.channel_mult[-1]
        self.middle_block_out = nn.Sequential(zero_module(nn.Conv2d(c, c, 1)))

    @torch.no_grad()
    def copy_from_unet(self, unet: UNet) -> "ControlNet":
        """Initialise eps_tri from the UNet, as ControlNet's add-control tool does: time
        embedding, input and middle blocks copied; zeta and the zero convs keep their init."""
        for name in ("time_embed", "input_blocks", "middle_block"):
            getattr(self, name).load_state_dict(getattr(unet, name).state_dict(), strict=True)
        return self

    def forward(self, x: torch.Tensor, hint: torch.Tensor, t: torch.Tensor,
                context: torch.Tensor) -> list[torch.Tensor]:
        """The residuals r of METHOD.md (3), one per UNet skip connection and one for the middle.
        x: (B, C, h, w) noisy latent; hint: (B, 3, fh, fw) trimap in [0, 1], f = hint_factor;
        t: (B,) or (); context: (B, T, context_dim) (AdaBLDM feeds the empty prompt's embedding here)."""
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).type(x.dtype))
        h = self.input_blocks[0](x, emb, context) + self.input_hint_block(hint)
        outs = [self.zero_convs[0](h)]
        for block, zero_conv in zip(self.input_blocks[1:], self.zero_convs[1:]):
            h = block(h, emb, context)
            outs.append(zero_conv(h))
        h = self.middle_block(h, emb, context)
        outs.append(self.middle_block_out(h))
        return outs
