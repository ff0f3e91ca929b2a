"""The denoiser eps_theta: the latent-diffusion UNet with cross-attention (Rombach et al. 2022,
"High-Resolution Image Synthesis with Latent Diffusion Models", Sec. 3.3), as in Stable
Diffusion 1.x.

Attribute names equal the keys under `model.diffusion_model.` in the CompVis checkpoints
(openaimodel layout: `input_blocks`, `middle_block`, `output_blocks`, `time_embed`, `out`), so
such a checkpoint loads after a prefix strip. The building blocks are shared with the trimap
branch in control.py. `UNet.forward` takes the trimap branch's residuals as `control=`
(ControlNet, Zhang et al. 2023): one per skip connection plus one for the middle output.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .attention import attention
from .config import UNetConfig


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps, [cos | sin] halves as in ldm. t: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                           device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (ldm's `normalization`)."""

    def forward(self, x):
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(),
                            self.eps).type(x.dtype)


class ResBlock(nn.Module):
    """Two 3x3 convs with the time embedding added in between; 1x1 skip when widths differ."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(groups, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(GroupNorm32(groups, out_channels), nn.SiLU(),
                                        nn.Identity(),  # ldm's Dropout(0); keeps index 3 below
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = (nn.Identity() if out_channels == channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None].type(h.dtype)
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """Multi-head attention of x over `context` (over x itself when context is None)."""

    def __init__(self, query_dim: int, context_dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(query_dim, query_dim, bias=False)
        self.to_k = nn.Linear(context_dim, query_dim, bias=False)
        self.to_v = nn.Linear(context_dim, query_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(query_dim, query_dim))  # ldm: (Linear, Dropout)

    def forward(self, x, context=None):
        context = x if context is None else context
        return self.to_out(attention(self.to_q(x), self.to_k(context), self.to_v(context),
                                     self.heads))


class GEGLU(nn.Module):
    """Linear to twice the width; one half gates the other through GELU (Shazeer 2020)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(),  # ldm's Dropout(0)
                                 nn.Linear(dim * mult, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-LN self-attention, cross-attention over the text, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """GroupNorm, 1x1 conv in, transformer blocks over the H*W tokens, 1x1 conv out, residual."""

    def __init__(self, channels: int, heads: int, depth: int, context_dim: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, heads, context_dim) for _ in range(depth)])
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x, context):
        h, w = x.shape[-2:]
        y = rearrange(self.proj_in(self.norm(x)), "b c h w -> b (h w) c")  # (B, HW, C)
        for block in self.transformer_blocks:
            y = block(y, context)
        return x + self.proj_out(rearrange(y, "b (h w) c -> b c h w", h=h, w=w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential that hands the time embedding to ResBlocks and the text to transformers."""

    def forward(self, x, emb, context):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def make_time_embed(cfg: UNetConfig) -> nn.Sequential:
    d = cfg.model_channels * 4
    return nn.Sequential(nn.Linear(cfg.model_channels, d), nn.SiLU(), nn.Linear(d, d))


def make_input_blocks(cfg: UNetConfig) -> tuple[nn.ModuleList, list[int]]:
    """The encoder half: conv_in, then per level num_res_blocks x (ResBlock [+ transformer]) and a
    Downsample between levels. Returns the blocks and the channel count after each of them."""
    emb, g = cfg.model_channels * 4, cfg.norm_num_groups
    blocks = [TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, cfg.model_channels, 3, padding=1))]
    chans = [cfg.model_channels]
    ch = cfg.model_channels
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            layers = [ResBlock(ch, emb, cfg.model_channels * mult, g)]
            ch = cfg.model_channels * mult
            if 2 ** level in cfg.attention_resolutions:
                layers.append(SpatialTransformer(ch, cfg.num_heads, cfg.transformer_depth,
                                                 cfg.context_dim, g))
            blocks.append(TimestepEmbedSequential(*layers))
            chans.append(ch)
        if level != len(cfg.channel_mult) - 1:
            blocks.append(TimestepEmbedSequential(Downsample(ch)))
            chans.append(ch)
    return nn.ModuleList(blocks), chans


def make_middle_block(cfg: UNetConfig) -> TimestepEmbedSequential:
    ch, emb, g = cfg.model_channels * cfg.channel_mult[-1], cfg.model_channels * 4, cfg.norm_num_groups
    return TimestepEmbedSequential(
        ResBlock(ch, emb, ch, g),
        SpatialTransformer(ch, cfg.num_heads, cfg.transformer_depth, cfg.context_dim, g),
        ResBlock(ch, emb, ch, g))


class UNet(nn.Module):
    """eps_theta(z_t, t, c): predicts the noise in z_t. 13 skip connections at SD 1.x size."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        emb, g = cfg.model_channels * 4, cfg.norm_num_groups
        self.time_embed = make_time_embed(cfg)
        self.input_blocks, chans = make_input_blocks(cfg)
        self.middle_block = make_middle_block(cfg)
        ch = cfg.model_channels * cfg.channel_mult[-1]
        blocks = []
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + chans.pop(), emb, cfg.model_channels * mult, g)]
                ch = cfg.model_channels * mult
                if 2 ** level in cfg.attention_resolutions:
                    layers.append(SpatialTransformer(ch, cfg.num_heads, cfg.transformer_depth,
                                                     cfg.context_dim, g))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                blocks.append(TimestepEmbedSequential(*layers))
        self.output_blocks = nn.ModuleList(blocks)
        self.out = nn.Sequential(GroupNorm32(g, ch), nn.SiLU(),
                                 nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                control: list[torch.Tensor] | None = None) -> torch.Tensor:
        """eps_theta(x, t, context) (METHOD.md (3)). x: (B, C, h, w) noisy latent; t: (B,) or ()
        timesteps; context: (B, 77, context_dim). control: None, or the trimap branch's residuals, one per input block then the middle."""
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).type(x.dtype))
        skips, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        if control is not None:
            h = h + control[-1]
            skips = [s + c for s, c in zip(skips, control[:-1])]
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h)
