"""Configs for every minibldm network, as frozen dataclasses.

Field names follow the latent-diffusion / ControlNet YAML files (`model_channels`, `channel_mult`,
`context_dim`, ...) and, for the CLIP text encoder, the Hugging Face CLIPTextConfig, since the
CompVis checkpoints embed that model. Presets are module constants. `config_from_state_dicts`
reads a config off a checkpoint's tensor shapes (see minibldm/convert.py).
"""
from __future__ import annotations

import dataclasses
import json
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

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @staticmethod
    def from_dict(d: dict) -> "ModelConfig":
        def build(cls, values):
            names = {f.name for f in dataclasses.fields(cls)}
            unknown = sorted(set(values) - names)
            if unknown:
                raise ValueError(f"unknown {cls.__name__} fields: {', '.join(unknown)}")
            return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
        return ModelConfig(build(AutoencoderConfig, d.get("autoencoder", {})),
                           build(UNetConfig, d.get("unet", {})),
                           build(TextConfig, d.get("text", {})))


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

# --- configs read off tensor shapes (CompVis key layout) ---------------------------------------
# What shapes cannot tell follows the SD 1.x conventions and is a parameter: 8 UNet heads at every
# level, 64-wide CLIP heads, 32 GroupNorm groups, the latent scale factor.

def _count(sd: dict, prefix: str) -> int:
    """Number of distinct integer indices i in keys `prefix{i}.`."""
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


def unet_config_from_state_dict(sd: dict, num_heads: int = 8, norm_num_groups: int = 32) -> UNetConfig:
    """UNetConfig of a UNet (`model.diffusion_model.` stripped) or of a control branch
    (`control_model.` stripped) state dict."""
    conv_in = sd["input_blocks.0.0.weight"]
    mc = conv_in.shape[0]

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in sd)

    def width(k: int) -> int:  # output channels of the ResBlock input_blocks.k.0
        for name in ("out_layers.3.weight", "in_layers.2.weight", "emb_layers.1.weight"):
            if f"input_blocks.{k}.0.{name}" in sd:
                return sd[f"input_blocks.{k}.0.{name}"].shape[0]
        raise KeyError(f"input_blocks.{k}.0.out_layers.3.weight")

    mult, attn, per_level, n = [], [], [], 0
    for k in range(1, _count(sd, "input_blocks.")):
        if has(f"input_blocks.{k}.0.op."):  # a Downsample closes the level
            per_level.append(n)
            n = 0
            continue
        if n == 0:  # the level's first ResBlock sets its width
            mult.append(width(k) // mc)
            if has(f"input_blocks.{k}.1."):
                attn.append(2 ** (len(mult) - 1))
        n += 1
    per_level.append(n)
    n_res = max(per_level)
    depth = _count(sd, "middle_block.1.transformer_blocks.")
    context_dim = sd["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
    hint = sd.get("input_hint_block.0.weight")
    out = sd.get("out.2.weight")
    return UNetConfig(in_channels=conv_in.shape[1],
                      out_channels=out.shape[0] if out is not None else conv_in.shape[1],
                      model_channels=mc, channel_mult=tuple(mult), num_res_blocks=n_res,
                      attention_resolutions=tuple(sorted(attn, reverse=True)), num_heads=num_heads,
                      transformer_depth=depth, context_dim=context_dim,
                      norm_num_groups=norm_num_groups,
                      hint_channels=hint.shape[1] if hint is not None else 3)


def autoencoder_config_from_state_dict(sd: dict, scale_factor: float | None = None,
                                       resolution: int = 256,
                                       norm_num_groups: int = 32) -> AutoencoderConfig:
    """AutoencoderConfig of a `first_stage_model.`-stripped state dict; KL unless it has a
    codebook. scale_factor defaults to 0.18215 for KL and 1.0 for VQ (the LDM configs)."""
    ch = sd["encoder.conv_in.weight"].shape[0]
    levels = _count(sd, "encoder.down.")
    mult = tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in range(levels))
    attn = tuple(resolution // 2 ** i for i in range(levels) if f"encoder.down.{i}.attn.0.q.weight" in sd)
    codebook = sd.get("quantize.embedding.weight")
    is_vq = codebook is not None
    z2 = sd["encoder.conv_out.weight"].shape[0]
    embed = sd["quant_conv.weight"].shape[0]
    return AutoencoderConfig(
        ch=ch, ch_mult=mult, num_res_blocks=_count(sd, "encoder.down.0.block."),
        attn_resolutions=attn, in_channels=sd["encoder.conv_in.weight"].shape[1],
        out_ch=sd["decoder.conv_out.weight"].shape[0], resolution=resolution,
        z_channels=z2 if is_vq else z2 // 2, embed_dim=embed if is_vq else embed // 2,
        double_z=not is_vq, n_embed=codebook.shape[0] if is_vq else 0,
        scale_factor=scale_factor if scale_factor is not None else (1.0 if is_vq else 0.18215),
        norm_num_groups=norm_num_groups)


def text_config_from_state_dict(sd: dict, head_dim: int = 64) -> TextConfig:
    """TextConfig of a `cond_stage_model.transformer.`-stripped (= transformers) state dict."""
    tok = sd["text_model.embeddings.token_embedding.weight"]
    return TextConfig(
        vocab_size=tok.shape[0], hidden_size=tok.shape[1],
        max_position_embeddings=sd["text_model.embeddings.position_embedding.weight"].shape[0],
        intermediate_size=sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=_count(sd, "text_model.encoder.layers."),
        num_attention_heads=tok.shape[1] // head_dim)
