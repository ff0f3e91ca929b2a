"""Configs for every minibldm network, as frozen dataclasses.

Network configs: field names follow the latent-diffusion / ControlNet YAML files
(`model_channels`, `channel_mult`, `context_dim`, ...) and, for the CLIP text encoder, the Hugging
Face CLIPTextConfig, since the CompVis checkpoints embed that model. Presets are module constants;
minibldm/convert.py reads a config off a checkpoint's tensor shapes.

Method configs: `Stages`, `AdaptConfig` and `SampleConfig` name every knob of AdaBLDM's
Algorithm 1 (the blended sampler) and Algorithm 2 (the decoder adaptation) once, with the
reference code's default and, where the paper differs, the paper's value in the comment.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class AutoencoderConfig:
    """LDM first-stage autoencoder (ldm.modules.diffusionmodules.model Encoder/Decoder)."""
    ch: int = 128                         # channels of the first conv; level i has ch * ch_mult[i]
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)  # one entry per resolution level; f = 2 ** (len - 1)
    num_res_blocks: int = 2               # ResnetBlocks per encoder level (decoder has one more)
    attn_resolutions: tuple[int, ...] = ()  # feature sizes (for `resolution` input) with self-attention
    in_channels: int = 3                  # image channels in
    out_ch: int = 3                       # image channels out
    resolution: int = 256                 # nominal input size; only locates attn_resolutions
    z_channels: int = 4                   # encoder output channels (x2 for the KL mean+logvar)
    embed_dim: int = 4                    # latent channels after quant_conv
    double_z: bool = True                 # KL: encoder emits mean and logvar
    n_embed: int = 0                      # VQ codebook size; 0 selects the KL bottleneck
    beta: float = 0.25                    # VQ commitment weight (ldm VectorQuantizer2)
    scale_factor: float = 0.18215         # latent = scale_factor * bottleneck output
    norm_num_groups: int = 32             # GroupNorm groups (32 in all public checkpoints)

    @property
    def is_vq(self) -> bool:
        return self.n_embed > 0

    @property
    def factor(self) -> int:
        """f: how many image pixels one latent cell spans along each side."""
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class UNetConfig:
    """openaimodel.UNetModel with SpatialTransformer cross-attention (SD 1.x family)."""
    in_channels: int = 4                  # latent channels in
    out_channels: int = 4                 # predicted noise channels
    model_channels: int = 320             # base width; level i has model_channels * channel_mult[i]
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2               # ResBlocks per input level (output levels have one more)
    attention_resolutions: tuple[int, ...] = (4, 2, 1)  # downsample factors that get a transformer
    num_heads: int = 8                    # attention heads (SD 1.x: 8 at every level)
    transformer_depth: int = 1            # BasicTransformerBlocks per SpatialTransformer
    context_dim: int = 768                # width of the text embedding fed to cross-attention
    norm_num_groups: int = 32             # GroupNorm groups (32 in all public checkpoints)
    hint_channels: int = 3                # trimap channels read by the control branch's embedder
    hint_factor: int = 8                  # the embedder's downsampling: the autoencoder's f (8, 4, 2)


@dataclass(frozen=True)
class TextConfig:
    """CLIP text transformer (Hugging Face CLIPTextConfig names; SD 1.x uses ViT-L/14's)."""
    vocab_size: int = 49408
    max_position_embeddings: int = 77     # tokens per prompt, padded with end-of-text
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    layer_norm_eps: float = 1e-5


@dataclass(frozen=True)
class ModelConfig:
    """Everything `minibldm.load` needs to build the networks of one weights folder."""
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    text: TextConfig = field(default_factory=TextConfig)

    def hint_mismatch(self) -> str | None:
        """Why a trimap branch cannot run with these networks (None when it can)."""
        if self.unet.hint_factor != self.autoencoder.factor:
            return (f"unet.hint_factor {self.unet.hint_factor} differs from the autoencoder's "
                    f"factor f = {self.autoencoder.factor}: set it to f (the trimap branch maps "
                    "the image to the latent)")

    @property
    def size_multiple(self) -> int:
        """Image sizes must be multiples of this: f times the UNet's total downsampling."""
        return self.autoencoder.factor * 2 ** (len(self.unet.channel_mult) - 1)

    @staticmethod
    def from_dict(d: dict) -> "ModelConfig":
        """From config.json's dict: one section per network, missing ones at their defaults."""
        return ModelConfig(from_fields(AutoencoderConfig, d.get("autoencoder", {})),
                           from_fields(UNetConfig, d.get("unet", {})),
                           from_fields(TextConfig, d.get("text", {})))


def from_fields(cls, values: dict):
    """A config dataclass from a JSON object's fields (lists become tuples); an unknown field or
    a value of another kind than the field's default (a string for a number, a number for a
    list) is a ValueError naming it."""
    if not isinstance(values, dict):
        raise ValueError(f"{cls.__name__}: expected a JSON object, got {type(values).__name__}")
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {', '.join(unknown)}")
    for k, v in values.items():
        if not same_kind(v, defaults[k]):
            raise ValueError(f"{cls.__name__}.{k}: expected {type(defaults[k]).__name__}, got "
                             f"{json_kind(v)} {v!r}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def json_kind(v) -> str:
    return "a list" if isinstance(v, list) else type(v).__name__


def same_kind(value, default) -> bool:
    """Whether a JSON value fits a field whose default is `default` (ints fit float fields)."""
    number = (int, float)
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, tuple):
        return isinstance(value, (list, tuple)) and all(
            isinstance(x, number) and not isinstance(x, bool) for x in value)
    if isinstance(default, float):
        return isinstance(value, number)
    return isinstance(value, type(default))


# --- presets -------------------------------------------------------------------------------------

SD15 = ModelConfig()  # Stable Diffusion 1.x: KL-f8 autoencoder, 860M UNet, CLIP ViT-L/14 text

# LDM VQ autoencoders (latent-diffusion models/first_stage_models/vq-f8 and vq-f4); latent scale 1.
VQ_F8 = AutoencoderConfig(ch_mult=(1, 2, 2, 4), attn_resolutions=(32,), z_channels=4, embed_dim=4,
                          double_z=False, n_embed=16384, scale_factor=1.0)
VQ_F4 = AutoencoderConfig(ch_mult=(1, 2, 4), attn_resolutions=(), z_channels=3, embed_dim=3,
                          double_z=False, n_embed=8192, scale_factor=1.0)


# The embedded default model's size (weights/tiny). Chosen so that the full default method
# (50 guided steps, 200 decoder-adaptation steps) fits the demo's time budget on 2 CPU cores at
# 128x128; tools/measure_tiny_budget.py times both.
TINY = ModelConfig(
    autoencoder=AutoencoderConfig(ch=16, ch_mult=(1, 2, 4, 4), num_res_blocks=1, resolution=128,
                                  norm_num_groups=8),
    unet=UNetConfig(model_channels=32, channel_mult=(1, 2, 4), num_res_blocks=1,
                    attention_resolutions=(4, 2), num_heads=4, context_dim=128, norm_num_groups=16),
    text=TextConfig(vocab_size=768, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                    num_attention_heads=4))

PRESETS = {"sd15": SD15, "tiny": TINY}  # names `python -m minibldm.train --config` accepts


# --- the method's knobs (AdaBLDM, arXiv 2402.19330) ----------------------------------------------

@dataclass(frozen=True)
class Stages:
    """Stage boundaries of Algorithm 1, as DDIM step indices (defaults: the reference code)."""
    steps: int = 50              # N, DDIM steps in all
    latent_start: int = 26       # first step with latent editing (steps before it run free)
    latent_stop: int = 46        # latent editing on latent_start <= i < latent_stop
    image_start: int = 45        # image editing on image_start <= i < N

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"stages need at least one DDIM step: {self}")
        if not 0 <= self.latent_start <= self.latent_stop <= self.steps:
            raise ValueError(f"stages need 0 <= latent_start <= latent_stop <= steps: {self}")
        if not 0 <= self.image_start <= self.steps:
            raise ValueError(f"stages need 0 <= image_start <= steps: {self}")

    @staticmethod
    def from_lengths(free: int, latent: int, image: int) -> "Stages":
        """Consecutive stages of the given lengths, e.g. the paper's (50, 30, 5): 85 steps."""
        if min(free, latent, image) < 0 or free + latent + image == 0:
            raise ValueError(f"stage lengths must be >= 0 and not all 0: {free}, {latent}, {image}")
        return Stages(free + latent + image, free, free + latent, free + latent)

    @staticmethod
    def scaled(steps: int) -> "Stages":
        """The reference code's boundaries (26, 46, 45 of 50) at the same fractions of `steps`,
        rounded: what `sample --ddim-steps N` uses unless a boundary is given."""
        ref = Stages()
        return Stages(steps, *(round(b * steps / ref.steps)
                               for b in (ref.latent_start, ref.latent_stop, ref.image_start)))

    def edits_latent(self, i: int) -> bool:
        return self.latent_start <= i < self.latent_stop

    def edits_image(self, i: int) -> bool:
        return i >= self.image_start


@dataclass(frozen=True)
class AdaptConfig:
    """Algorithm 2, the online decoder adaptation (defaults: the reference code)."""
    steps: int = 200             # T_ft, AdamW steps per image (0: no adaptation)
    lr: float = 1e-4             # AdamW learning rate (torch's betas and weight decay)
    fg_weight: float = 1.0       # weight of the defect-region term (the paper's lambda_con)
    bg_weight: float = 100.0     # weight of the background term (reference code: 100)


LATENT_MASKS = ("nearest", "cover")  # how M* shrinks to the latent grid (sampler.latent_keep_mask)


@dataclass(frozen=True)
class SampleConfig:
    """Algorithm 1 and 2 together: what `pipeline.defect_image` runs."""
    stages: Stages = Stages()    # the reference code's 50 steps; the paper's: from_lengths(50, 30, 5)
    guidance: float = 9.0        # classifier-free guidance scale, on the text only
    eta: float = 0.0             # DDIM eta (0: deterministic steps)
    latent_mask: str = "nearest"  # "nearest" (reference code) or "cover" (keeps thin defects)
    adapt: AdaptConfig = AdaptConfig()

    def __post_init__(self):
        if self.latent_mask not in LATENT_MASKS:
            raise ValueError(f"latent_mask must be one of {LATENT_MASKS}, got {self.latent_mask!r}")
