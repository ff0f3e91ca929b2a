"""The LDM first-stage autoencoder: Encoder, Decoder and a KL or VQ bottleneck between them.

Rombach et al., "High-Resolution Image Synthesis with Latent Diffusion Models" (CVPR 2022),
Sec. 3.1 and App. G: the encoder maps an image in [-1, 1] to a latent f times smaller, the
decoder maps it back. KL: a diagonal Gaussian posterior pulled towards N(0, I) (SD's f=8
autoencoder). VQ: the nearest codebook entry (van den Oord et al. 2017, eq. 3), inside the
decoder as in App. G. The diffusion model works on z = scale_factor * E(x) (about unit variance).

Module names equal the CompVis checkpoints' `first_stage_model.*` keys, so those load with
`strict=True`; diffusers layouts are renamed into them in minibldm/convert/. The decoder runs as
`decoder(decoder_input(z))`, so a per-image copy of `decoder` alone can be fine-tuned (AdaBLDM's
decoder adaptation, Algorithm 2).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .attention import attention
from .config import AutoencoderConfig


def norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)  # ldm's Normalize: eps 1e-6, affine


class ResnetBlock(nn.Module):
    """Two (GroupNorm, swish, 3x3 conv) stages plus a skip; a 1x1 conv on the skip changes width.

    ldm's time embedding and dropout are absent: the autoencoder uses neither (dropout 0.0 in
    every public config).
    """

    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = norm(c_in, groups)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = norm(c_out, groups)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        # nn.Identity() holds no weights, so blocks that keep their width have no shortcut keys.
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # silu(x) = x * sigmoid(x), ldm's "swish"
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1 convs as the projections."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        q, k, v = (rearrange(proj(h), "b c h w -> b (h w) c") for proj in (self.q, self.k, self.v))
        out = attention(q, k, v, heads=1)  # (B, H*W, C); scale C ** -0.5 as ldm
        out = rearrange(out, "b (h w) c -> b c h w", h=x.shape[2])
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one zero row and column on the bottom and right only."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (left, right, top, bottom): ldm's asymmetric pad


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def res_blocks(c_in: int, c_out: int, n: int, with_attn: bool,
               groups: int) -> tuple[nn.ModuleList, nn.ModuleList]:
    """`n` ResnetBlocks c_in -> c_out, and the attention applied after each of them.

    Levels without attention get nn.Identity() (no weights, so no keys), keeping forward free of
    branches.
    """
    blocks = nn.ModuleList(ResnetBlock(c_in if j == 0 else c_out, c_out, groups) for j in range(n))
    attn = nn.ModuleList(AttnBlock(c_out, groups) if with_attn else nn.Identity() for _ in range(n))
    return blocks, attn


class DownLevel(nn.Module):
    """One encoder resolution level: ResnetBlocks (+ attention), then a downsample if not last."""

    def __init__(self, c_in: int, c_out: int, n: int, with_attn: bool, down: bool, groups: int):
        super().__init__()
        self.block, self.attn = res_blocks(c_in, c_out, n, with_attn, groups)
        self.downsample = Downsample(c_out) if down else nn.Identity()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block, attn in zip(self.block, self.attn):
            h = attn(block(h))
        return self.downsample(h)


class UpLevel(nn.Module):
    """One decoder resolution level: ResnetBlocks (+ attention), then an upsample if not last."""

    def __init__(self, c_in: int, c_out: int, n: int, with_attn: bool, up: bool, groups: int):
        super().__init__()
        self.block, self.attn = res_blocks(c_in, c_out, n, with_attn, groups)
        self.upsample = Upsample(c_out) if up else nn.Identity()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for block, attn in zip(self.block, self.attn):
            h = attn(block(h))
        return self.upsample(h)


class Mid(nn.Module):
    """ResnetBlock, self-attention, ResnetBlock at the lowest resolution."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> (B, z_channels or 2 * z_channels, H / f, W / f)."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        g, n, widths = cfg.norm_num_groups, cfg.num_res_blocks, [cfg.ch * m for m in cfg.ch_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        # level i works at resolution / 2**i; attention where that size is in attn_resolutions
        self.down = nn.ModuleList(
            DownLevel(cfg.ch if i == 0 else widths[i - 1], w, n,
                      cfg.resolution // 2 ** i in cfg.attn_resolutions, i != last, g)
            for i, w in enumerate(widths))
        self.mid = Mid(widths[-1], g)
        self.norm_out = norm(widths[-1], g)
        z_out = 2 * cfg.z_channels if cfg.double_z else cfg.z_channels  # KL: mean and logvar
        self.conv_out = nn.Conv2d(widths[-1], z_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> image (B, out_ch, h * f, w * f); no tanh on the output.

    `up` is indexed like the encoder's `down` (up[0] is the full-resolution level) and run from
    the last index to the first; level i has num_res_blocks + 1 ResnetBlocks.
    """

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        g, n = cfg.norm_num_groups, cfg.num_res_blocks + 1
        widths = [cfg.ch * m for m in cfg.ch_mult]
        last = len(widths) - 1
        self.conv_in = nn.Conv2d(cfg.z_channels, widths[-1], 3, padding=1)
        self.mid = Mid(widths[-1], g)
        # level i reads level i+1's width (the deepest reads its own) and works at resolution / 2**i
        self.up = nn.ModuleList(
            UpLevel(widths[min(i + 1, last)], w, n,
                    cfg.resolution // 2 ** i in cfg.attn_resolutions, i != 0, g)
            for i, w in enumerate(widths))
        self.norm_out = norm(widths[0], g)
        self.conv_out = nn.Conv2d(widths[0], cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest-codebook-entry quantisation with a straight-through gradient (ldm VectorQuantizer2).

    Returns (z_q, loss, indices): z_q (B, C, H, W) has the codebook entries' values but passes
    gradients to z unchanged; indices are (B, H, W). The loss uses ldm's "legacy" weighting, with
    which the public checkpoints were trained: commitment term ||z - sg[e]||^2 weight 1, codebook
    term ||sg[z] - e||^2 weight beta (VQ-VAE Eq. 3 has the two weights the other way round).
    """

    def __init__(self, n_embed: int, embed_dim: int, beta: float):
        super().__init__()
        self.beta = beta
        self.embedding = nn.Embedding(n_embed, embed_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)  # ldm's init

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, _, h, w = z.shape
        flat = rearrange(z, "b c h w -> (b h w) c")
        codebook = self.embedding.weight                        # (n_embed, C)
        dist = (flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.t()
                + codebook.pow(2).sum(1))                       # (B*H*W, n_embed) squared L2
        indices = dist.argmin(1)
        z_q = rearrange(codebook[indices], "(b h w) c -> b c h w", b=b, h=h, w=w)
        loss = F.mse_loss(z, z_q.detach()) + self.beta * F.mse_loss(z_q, z.detach())
        z_q = z + (z_q - z).detach()                            # straight-through estimator
        return z_q, loss, indices.view(b, h, w)


def posterior_sample(mean: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """A draw from N(mean, exp(logvar)) given standard normal `noise` (the reparameterisation)."""
    return mean + torch.exp(0.5 * logvar) * noise


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) per sample, summed over C, H, W: shape (B,).

    As ldm's DiagonalGaussianDistribution.kl(); ldm's training loss divides its sum by B.
    """
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3))


class Autoencoder(nn.Module):
    """LDM AutoencoderKL (cfg.n_embed == 0) or VQModel (cfg.n_embed > 0).

    encode: image in [-1, 1] -> scaled latent; decode: scaled latent -> image.
    """

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        if cfg.double_z == cfg.is_vq:
            raise ValueError("AutoencoderConfig: the KL bottleneck needs double_z=True and the VQ "
                             f"one (n_embed > 0) double_z=False; got double_z={cfg.double_z}, "
                             f"n_embed={cfg.n_embed}")
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        if cfg.is_vq:
            self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
            self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim, cfg.beta)
        else:  # mean and logvar side by side on the channel axis
            self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """KL only: the posterior's (mean, logvar), each (B, embed_dim, H / f, W / f), logvar
        clamped to [-30, 20] as ldm."""
        if self.cfg.is_vq:
            raise ValueError("moments() is for the KL autoencoder; this one is VQ")
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None,
               noise=None) -> torch.Tensor:
        """Image (B, 3, H, W) in [-1, 1] -> scale_factor * latent, (B, embed_dim, H / f, W / f):
        the LDM latent of METHOD.md (1).

        KL: the posterior mean, or a posterior sample mean + std * n, with n drawn from
        `generator` or given by `noise(mean)` (a function returning standard normal noise shaped
        like its argument). VQ: the latent before quantisation (quantised in `decode`, as ldm's
        VQModelInterface); no noise is drawn, the VQ encoder being deterministic.
        """
        if self.cfg.is_vq:
            return self.cfg.scale_factor * self.quant_conv(self.encoder(x))
        mean, logvar = self.moments(x)
        if generator is None and noise is None:
            return self.cfg.scale_factor * mean
        n = noise(mean) if noise is not None else torch.randn(
            mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.cfg.scale_factor * posterior_sample(mean, logvar, n)

    def decoder_input(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latent -> what `decoder` reads: unscale, quantise (VQ), post_quant_conv. For z*
        this h is Algorithm 2's fixed input (METHOD.md §6)."""
        h = z / self.cfg.scale_factor
        if self.cfg.is_vq:
            h = self.quantize(h)[0]
        return self.post_quant_conv(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latent (B, embed_dim, h, w) -> image (B, out_ch, h * f, w * f), about [-1, 1]."""
        return self.decoder(self.decoder_input(z))
