"""Renaming other public layouts into minibldm's (= the CompVis / ControlNet checkpoint keys).

minibldm's module names equal the CompVis Stable Diffusion and ControlNet checkpoint keys, so
those load after a prefix strip. Diffusers and transformers layouts are renamed into that
namespace here, and back (for the round-trip tests and for users who export): each `*_from_*`
takes and returns a flat state dict. The `*_config_from_state_dict` functions read a config off
a CompVis-layout state dict's shapes.
"""
from __future__ import annotations

import torch

from ..config import AutoencoderConfig, TextConfig, UNetConfig

StateDict = dict[str, torch.Tensor]


def _count(sd: dict, prefix: str) -> int:
    """Number of distinct integer indices i in keys `prefix{i}.`."""
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


# --- CLIP text encoder: transformers CLIPTextModel <-> minibldm ----------------------------------
# minibldm's TextEncoder has the names of the published CLIPTextModel files (transformers 4.x,
# openai/clip-vit-large-patch14, SD 1.x's `cond_stage_model.transformer.*`): `text_model.` + the
# module path. transformers 5 dropped the `text_model.` level from CLIPTextModel's state dict (it
# still reads the prefixed files). Checkpoints saved by transformers < 4.31 also hold the
# `embeddings.position_ids` buffer (arange(77)); minibldm computes positions, so it is dropped.
TEXT_PREFIX = "text_model."


def text_encoder_from_transformers(sd: StateDict) -> StateDict:
    """CLIPTextModel state dict or file (transformers 4.x or 5; CompVis after the
    `cond_stage_model.transformer.` strip) -> minibldm."""
    sd = {k if k.startswith(TEXT_PREFIX) else TEXT_PREFIX + k: v for k, v in sd.items()}
    return {k: v for k, v in sd.items() if k != TEXT_PREFIX + "embeddings.position_ids"}


def text_encoder_to_transformers(sd: StateDict) -> StateDict:
    """minibldm -> the published CLIPTextModel layout, which is minibldm's; `from_pretrained` of
    transformers 4.x and 5 reads it (transformers 5's `load_state_dict` wants the prefix off)."""
    return dict(sd)


# --- autoencoder: diffusers AutoencoderKL / VQModel <-> minibldm --------------------------------
# (diffusers, minibldm) name pieces, applied in this order to every key; the way back applies the
# same pairs swapped. The dots around each piece keep it from matching inside a longer name.
# diffusers' decoder.up_blocks.i is ldm's decoder.up.(n - 1 - i): ldm indexes decoder levels from
# full resolution, diffusers in the order they run (deepest first). ldm's conv_shortcut is 3x3;
# the 1x1 skip conv is its nin_shortcut.
AUTOENCODER_RENAMES = [
    (".mid_block.resnets.0.", ".mid.block_1."), (".mid_block.attentions.0.", ".mid.attn_1."),
    (".mid_block.resnets.1.", ".mid.block_2."), ("encoder.down_blocks.", "encoder.down."),
    ("decoder.up_blocks.", "decoder.up."), (".resnets.", ".block."), (".attentions.", ".attn."),
    (".downsamplers.0.", ".downsample."), (".upsamplers.0.", ".upsample."),
    (".conv_shortcut.", ".nin_shortcut."), (".conv_norm_out.", ".norm_out."),
    (".group_norm.", ".norm."), (".to_q.", ".q."), (".to_k.", ".k."), (".to_v.", ".v."),
    (".to_out.0.", ".proj_out."),
]
# Attention names of diffusers before 0.14, still in some public folders (SD 1.5's vae/).
AUTOENCODER_OLD_ATTENTION = [(".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."),
                             (".proj_attn.", ".to_out.0.")]
# Attention projections: nn.Linear (C, C) in diffusers, 1x1 nn.Conv2d (C, C, 1, 1) in ldm.
_AE_ATTN_WEIGHTS = (".q.weight", ".k.weight", ".v.weight", ".proj_out.weight")


def _rename_autoencoder(sd: StateDict, pairs: list, up: str, attn_shape: tuple) -> StateDict:
    """Flip the decoder level index i of the keys `{up}{i}.`, apply `pairs` to every key, and
    reshape the attention projections (ldm names, found before or after the renames) to
    (C, C, *attn_shape)."""
    n = _count(sd, up)
    out = {}
    for key, v in sd.items():
        new = key
        if key.startswith(up):
            i, rest = key[len(up):].split(".", 1)
            new = f"{up}{n - 1 - int(i)}.{rest}"
        for a, b in pairs:
            new = new.replace(a, b)
        if key.endswith(_AE_ATTN_WEIGHTS) or new.endswith(_AE_ATTN_WEIGHTS):
            v = v.reshape(v.shape[0], v.shape[1], *attn_shape)
        out[new] = v
    return out


def autoencoder_from_diffusers(sd: StateDict) -> StateDict:
    """diffusers AutoencoderKL / VQModel state dict (current or pre-0.14 names) -> minibldm."""
    return _rename_autoencoder(sd, AUTOENCODER_OLD_ATTENTION + AUTOENCODER_RENAMES,
                               "decoder.up_blocks.", (1, 1))


def autoencoder_to_diffusers(sd: StateDict) -> StateDict:
    """minibldm autoencoder state dict -> diffusers AutoencoderKL / VQModel (current names)."""
    return _rename_autoencoder(sd, [(b, a) for a, b in AUTOENCODER_RENAMES], "decoder.up.", ())


# --- UNet and control branch: diffusers UNet2DConditionModel / ControlNetModel <-> minibldm ----
# Diffusers names whole blocks differently but keeps most inner names (transformer blocks are
# identical), so the table is a list of (ldm prefix, diffusers prefix, inner renames) made from
# the config, applied to each key by its longest matching prefix.

_RESBLOCK = (("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."),
             ("emb_layers.1.", "time_emb_proj."), ("out_layers.0.", "norm2."),
             ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut."))


def _unet_prefixes(cfg: UNetConfig, control: bool) -> list[tuple[str, str, tuple]]:
    """(ldm prefix, diffusers prefix, inner renames) for a UNet, or for a control branch."""
    n, levels = cfg.num_res_blocks, len(cfg.channel_mult)
    has_attn = [2 ** level in cfg.attention_resolutions for level in range(levels)]
    pairs = [("time_embed.0.", "time_embedding.linear_1.", ()),
             ("time_embed.2.", "time_embedding.linear_2.", ()),
             ("input_blocks.0.0.", "conv_in.", ())]
    k = 1
    for level in range(levels):
        for j in range(n):
            pairs.append((f"input_blocks.{k}.0.", f"down_blocks.{level}.resnets.{j}.", _RESBLOCK))
            if has_attn[level]:
                pairs.append((f"input_blocks.{k}.1.", f"down_blocks.{level}.attentions.{j}.", ()))
            k += 1
        if level < levels - 1:
            pairs.append((f"input_blocks.{k}.0.op.",
                          f"down_blocks.{level}.downsamplers.0.conv.", ()))
            k += 1
    pairs += [("middle_block.0.", "mid_block.resnets.0.", _RESBLOCK),
              ("middle_block.1.", "mid_block.attentions.0.", ()),
              ("middle_block.2.", "mid_block.resnets.1.", _RESBLOCK)]
    if control:
        pairs += [(f"zero_convs.{i}.0.", f"controlnet_down_blocks.{i}.", ()) for i in range(k)]
        blocks = 2 * (cfg.hint_factor.bit_length() - 1)  # convs between conv_in and conv_out
        pairs += [("middle_block_out.0.", "controlnet_mid_block.", ()),
                  ("input_hint_block.0.", "controlnet_cond_embedding.conv_in.", ()),
                  (f"input_hint_block.{2 * blocks + 2}.", "controlnet_cond_embedding.conv_out.",
                   ())]
        pairs += [(f"input_hint_block.{2 * m + 2}.", f"controlnet_cond_embedding.blocks.{m}.", ())
                  for m in range(blocks)]
        return pairs
    for i, level in enumerate(reversed(range(levels))):  # diffusers' up_blocks[i] is level L-1-i
        for j in range(n + 1):
            b = i * (n + 1) + j
            pairs.append((f"output_blocks.{b}.0.", f"up_blocks.{i}.resnets.{j}.", _RESBLOCK))
            if has_attn[level]:
                pairs.append((f"output_blocks.{b}.1.", f"up_blocks.{i}.attentions.{j}.", ()))
        if level > 0:
            up = f"output_blocks.{i * (n + 1) + n}.{2 if has_attn[level] else 1}.conv."
            pairs.append((up, f"up_blocks.{i}.upsamplers.0.conv.", ()))
    return pairs + [("out.0.", "conv_norm_out.", ()), ("out.2.", "conv_out.", ())]


def _rename(sd: StateDict, cfg: UNetConfig, control: bool, to_diffusers: bool) -> StateDict:
    """Rename every key by its longest matching block prefix, then by the inner renames.
    Keys that match nothing are kept as they are, for the strict loader to report."""
    pairs = _unet_prefixes(cfg, control)
    table = sorted(((a, b, inner) if to_diffusers else (b, a, tuple((y, x) for x, y in inner))
                    for a, b, inner in pairs), key=lambda p: -len(p[0]))
    out = {}
    for key, value in sd.items():
        src, dst, inner = next((p for p in table if key.startswith(p[0])), ("", "", ()))
        rest = key[len(src):]
        x, y = next(((x, y) for x, y in inner if rest.startswith(x)), ("", ""))
        out[dst + y + rest[len(x):]] = value
    return out


def unet_from_diffusers(sd: StateDict, cfg: UNetConfig) -> StateDict:
    """diffusers UNet2DConditionModel state dict -> minibldm UNet (CompVis) keys."""
    return _rename(sd, cfg, control=False, to_diffusers=False)


def unet_to_diffusers(sd: StateDict, cfg: UNetConfig) -> StateDict:
    return _rename(sd, cfg, control=False, to_diffusers=True)


def control_from_diffusers(sd: StateDict, cfg: UNetConfig) -> StateDict:
    """diffusers ControlNetModel state dict -> minibldm ControlNet (`control_model.`) keys."""
    return _rename(sd, cfg, control=True, to_diffusers=False)


def control_to_diffusers(sd: StateDict, cfg: UNetConfig) -> StateDict:
    return _rename(sd, cfg, control=True, to_diffusers=True)


# --- configs read off tensor shapes (CompVis key layout) ---------------------------------------
# What shapes cannot tell follows the SD 1.x conventions and is a parameter: 8 UNet heads at every
# level, 64-wide CLIP heads, 32 GroupNorm groups, the latent scale factor.

def unet_config_from_state_dict(sd: dict, num_heads: int = 8,
                                norm_num_groups: int = 32) -> UNetConfig:
    """UNetConfig of a UNet (`model.diffusion_model.` stripped) or of a control branch
    (`control_model.` stripped) state dict."""
    conv_in = sd["input_blocks.0.0.weight"]
    mc = conv_in.shape[0]

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in sd)

    def width(k: int) -> int:  # output channels of the ResBlock input_blocks.k.0, off any conv
        names = [f"input_blocks.{k}.0.{n}.weight" for n in ("out_layers.3", "in_layers.2",
                                                             "emb_layers.1")]
        return sd[next((n for n in names if n in sd), names[0])].shape[0]

    mult, attn, per_level, n = [], [], [], 0
    for k in range(1, _count(sd, "input_blocks.")):
        if has(f"input_blocks.{k}.0.op."):  # a Downsample closes the level
            per_level.append(n)
            n = 0
        else:
            if n == 0:  # the level's first ResBlock sets its width
                mult.append(width(k) // mc)
                if has(f"input_blocks.{k}.1."):
                    attn.append(2 ** (len(mult) - 1))
            n += 1
    hint, out = sd.get("input_hint_block.0.weight"), sd.get("out.2.weight")
    context_dim = sd["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
    return UNetConfig(in_channels=conv_in.shape[1],
                      out_channels=out.shape[0] if out is not None else conv_in.shape[1],
                      model_channels=mc, channel_mult=tuple(mult),
                      num_res_blocks=max(per_level + [n]),
                      attention_resolutions=tuple(sorted(attn, reverse=True)), num_heads=num_heads,
                      transformer_depth=_count(sd, "middle_block.1.transformer_blocks."),
                      context_dim=context_dim, norm_num_groups=norm_num_groups,
                      hint_channels=hint.shape[1] if hint is not None else 3,
                      # conv_in, two convs per stride-2 growth, conv_out (control.make_hint_block)
                      hint_factor=2 ** ((_count(sd, "input_hint_block.") - 2) // 2) if hint is not None
                      else 8)


def autoencoder_config_from_state_dict(sd: dict, scale_factor: float | None = None,
                                       resolution: int = 256,
                                       norm_num_groups: int = 32) -> AutoencoderConfig:
    """AutoencoderConfig of a `first_stage_model.`-stripped state dict; KL unless it has a
    codebook. scale_factor defaults to 0.18215 for KL and 1.0 for VQ (the LDM configs)."""
    ch = sd["encoder.conv_in.weight"].shape[0]
    levels = range(_count(sd, "encoder.down."))
    mult = tuple(sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // ch for i in levels)
    attn = tuple(resolution // 2 ** i for i in levels if f"encoder.down.{i}.attn.0.q.weight" in sd)
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
