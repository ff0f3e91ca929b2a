"""Renaming other public layouts into minibldm's (= the CompVis / ControlNet checkpoint keys).

minibldm's module names equal the keys of the CompVis Stable Diffusion and ControlNet
checkpoints, so those load after a prefix strip. Diffusers and transformers layouts are renamed
into that namespace here, and back (for the round-trip tests and for users who export).
Each `*_from_*` takes and returns a flat state dict; nothing here builds a model.
"""
from __future__ import annotations

import torch

from .config import UNetConfig

StateDict = dict[str, torch.Tensor]


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
# (section owned by the autoencoder work)

# (diffusers, minibldm) name pieces, applied in this order to every key; the way back applies the
# same pairs swapped. The dots around each piece keep it from matching inside a longer name.
AUTOENCODER_RENAMES = [
    (".mid_block.resnets.0.", ".mid.block_1."),
    (".mid_block.attentions.0.", ".mid.attn_1."),
    (".mid_block.resnets.1.", ".mid.block_2."),
    ("encoder.down_blocks.", "encoder.down."),
    ("decoder.up_blocks.", "decoder.up."),       # the level index is also flipped, see below
    (".resnets.", ".block."),
    (".attentions.", ".attn."),
    (".downsamplers.0.", ".downsample."),
    (".upsamplers.0.", ".upsample."),
    (".conv_shortcut.", ".nin_shortcut."),       # the 1x1 skip conv (ldm's conv_shortcut is 3x3)
    (".conv_norm_out.", ".norm_out."),
    (".group_norm.", ".norm."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    (".to_out.0.", ".proj_out."),
]
# Attention names of diffusers before 0.14, still in some public folders (SD 1.5's vae/).
AUTOENCODER_OLD_ATTENTION = [(".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."),
                             (".proj_attn.", ".to_out.0.")]
# Attention projections: nn.Linear (C, C) in diffusers, 1x1 nn.Conv2d (C, C, 1, 1) in ldm.
_AE_ATTN_WEIGHTS = (".q.weight", ".k.weight", ".v.weight", ".proj_out.weight")


def _flip_up_levels(key: str, n: int) -> str:
    """diffusers' decoder.up_blocks.i is ldm's decoder.up.(n - 1 - i): ldm indexes decoder levels
    from full resolution, diffusers in the order they run (deepest first)."""
    parts = key.split(".")
    if parts[:2] in (["decoder", "up"], ["decoder", "up_blocks"]):
        parts[2] = str(n - 1 - int(parts[2]))
    return ".".join(parts)


def _count_levels(sd: StateDict, prefix: str) -> int:
    return 1 + max((int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)),
                   default=-1)


def autoencoder_from_diffusers(sd: StateDict) -> StateDict:
    """diffusers AutoencoderKL / VQModel state dict (current or pre-0.14 names) -> minibldm."""
    n = _count_levels(sd, "decoder.up_blocks.")
    out = {}
    for key, v in sd.items():
        new = _flip_up_levels(key, n)
        for theirs, ours in AUTOENCODER_OLD_ATTENTION + AUTOENCODER_RENAMES:
            new = new.replace(theirs, ours)
        if new.endswith(_AE_ATTN_WEIGHTS) and v.ndim == 2:
            v = v[:, :, None, None]  # (C, C) -> (C, C, 1, 1)
        out[new] = v
    return out


def autoencoder_to_diffusers(sd: StateDict) -> StateDict:
    """minibldm autoencoder state dict -> diffusers AutoencoderKL / VQModel (current names)."""
    n = _count_levels(sd, "decoder.up.")
    out = {}
    for key, v in sd.items():
        new = key
        for theirs, ours in AUTOENCODER_RENAMES:
            new = new.replace(ours, theirs)
        if key.endswith(_AE_ATTN_WEIGHTS):
            v = v.reshape(v.shape[0], v.shape[1])  # (C, C, 1, 1) -> (C, C)
        out[_flip_up_levels(new, n)] = v
    return out


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
            pairs.append((f"input_blocks.{k}.0.op.", f"down_blocks.{level}.downsamplers.0.conv.", ()))
            k += 1
    pairs += [("middle_block.0.", "mid_block.resnets.0.", _RESBLOCK),
              ("middle_block.1.", "mid_block.attentions.0.", ()),
              ("middle_block.2.", "mid_block.resnets.1.", _RESBLOCK)]
    if control:
        pairs += [(f"zero_convs.{i}.0.", f"controlnet_down_blocks.{i}.", ()) for i in range(k)]
        pairs += [("middle_block_out.0.", "controlnet_mid_block.", ()),
                  ("input_hint_block.0.", "controlnet_cond_embedding.conv_in.", ()),
                  ("input_hint_block.14.", "controlnet_cond_embedding.conv_out.", ())]
        pairs += [(f"input_hint_block.{2 * m + 2}.", f"controlnet_cond_embedding.blocks.{m}.", ())
                  for m in range(6)]
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
    pairs += [("out.0.", "conv_norm_out.", ()), ("out.2.", "conv_out.", ())]
    return pairs


def _rename(sd: StateDict, pairs: list[tuple[str, str, tuple]], reverse: bool) -> StateDict:
    """Rename every key by its longest matching block prefix, then by the inner renames.
    Keys that match nothing are kept as they are, for the strict loader to report."""
    table = sorted(((b, a, tuple((y, x) for x, y in inner)) if reverse else (a, b, inner)
                    for a, b, inner in pairs), key=lambda p: -len(p[0]))
    out = {}
    for key, value in sd.items():
        new = key
        for src, dst, inner in table:
            if key.startswith(src):
                rest = key[len(src):]
                for x, y in inner:
                    if rest.startswith(x):
                        rest = y + rest[len(x):]
                        break
                new = dst + rest
                break
        out[new] = value
    return out


def unet_from_diffusers(sd: StateDict, cfg: UNetConfig) -> StateDict:
    """diffusers UNet2DConditionModel state dict -> minibldm UNet (CompVis) keys."""
    return _rename(sd, _unet_prefixes(cfg, control=False), reverse=True)


def unet_to_diffusers(sd: StateDict, cfg: UNetConfig) -> StateDict:
    return _rename(sd, _unet_prefixes(cfg, control=False), reverse=False)


def control_from_diffusers(sd: StateDict, cfg: UNetConfig) -> StateDict:
    """diffusers ControlNetModel state dict -> minibldm ControlNet (ControlNet `control_model.`) keys."""
    return _rename(sd, _unet_prefixes(cfg, control=True), reverse=True)


def control_to_diffusers(sd: StateDict, cfg: UNetConfig) -> StateDict:
    return _rename(sd, _unet_prefixes(cfg, control=True), reverse=False)
