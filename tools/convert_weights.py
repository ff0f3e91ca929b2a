"""Convert public Stable Diffusion 1.x / LDM / ControlNet weights into a minibldm weights folder.

    python tools/convert_weights.py SRC OUT_DIR [--control CONTROL] [--vocab PATH]

SRC is one of
  - a CompVis-layout checkpoint (`.ckpt`, read with torch.load(weights_only=True), or
    `.safetensors`) with `model.diffusion_model.*`, `first_stage_model.*` and
    `cond_stage_model.transformer.*` keys (a ControlNet / AdaBLDM checkpoint's `control_model.*`
    keys are taken too);
  - a diffusers pipeline folder (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`);
  - an LDM autoencoder checkpoint (VQ-f4, VQ-f8, KL-f8): only autoencoder.safetensors is written.
CONTROL is a ControlNet / AdaBLDM checkpoint (`control_model.*` keys) or a diffusers
ControlNetModel folder. PATH is OpenAI's `bpe_simple_vocab_16e6.txt.gz` or a folder with
`vocab.json` + `merges.txt` (a diffusers pipeline brings its own).

Configs are read off tensor shapes (diffusers folders: off their config.json); what shapes
cannot tell follows SD 1.x (8 UNet heads, 64-wide CLIP heads) unless given by flag. Every
network is checked against its minibldm module (keys and shapes) before anything is written.
Errors are one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

from minibldm import convert
from minibldm.config import (UNetConfig, autoencoder_config_from_state_dict,
                             text_config_from_state_dict, unet_config_from_state_dict)
from minibldm.io import WeightsError, check_state_dict, read_checkpoint
from minibldm.tokenizer import Tokenizer
from minibldm.weights import BUILDERS, save

COMPVIS_PREFIXES = {"model.diffusion_model.": "unet", "first_stage_model.": "autoencoder",
                    "cond_stage_model.transformer.": "text_encoder", "control_model.": "control"}
# Keys of CompVis / ControlNet checkpoints that are not network weights: the EMA copy, the
# LatentDiffusion schedule buffers (betas, alphas_cumprod, ..., scale_factor: no dot in the name),
# and an autoencoder's training losses (discriminator, LPIPS).
IGNORED_PREFIXES = ("model_ema.", "loss.", "first_stage_model.loss.")
AUTOENCODER_ROOTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize.")


def split_compvis(sd: dict, source: str) -> dict[str, dict]:
    """Split a CompVis / ControlNet / LDM checkpoint into per-network state dicts."""
    parts: dict[str, dict] = {}
    unknown = []
    for key, value in sd.items():
        if "." not in key or key.startswith(IGNORED_PREFIXES):
            continue
        for prefix, name in COMPVIS_PREFIXES.items():
            if key.startswith(prefix):
                parts.setdefault(name, {})[key[len(prefix):]] = value
                break
        else:
            if key.startswith(AUTOENCODER_ROOTS):  # a bare first-stage checkpoint
                parts.setdefault("autoencoder", {})[key] = value
            else:
                unknown.append(key)
    if unknown:
        shown = ", ".join(sorted(unknown)[:12])
        raise WeightsError(f"{source}: {len(unknown)} keys belong to no known network: {shown}")
    if not parts:
        raise WeightsError(f"{source}: no Stable Diffusion, ControlNet or LDM autoencoder keys")
    if "text_encoder" in parts:
        parts["text_encoder"] = convert.text_encoder_from_transformers(parts["text_encoder"])
    return parts


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from None


def read_weights_in(folder: Path, names: tuple[str, ...]) -> dict:
    for name in names:
        if (folder / name).is_file():
            return read_checkpoint(folder / name)
    raise WeightsError(f"{folder}: none of {', '.join(names)} found")


DIFFUSERS_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
TRANSFORMERS_FILES = ("model.safetensors", "pytorch_model.bin")


def unet_config_from_diffusers(cfg: dict, source: Path) -> UNetConfig:
    """UNetConfig from a diffusers UNet2DConditionModel / ControlNetModel config.json."""
    if cfg.get("use_linear_projection"):
        raise WeightsError(f"{source}: linear transformer projections (SD 2.x) are not supported")
    boc = cfg["block_out_channels"]
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)  # SD 1.x naming
    depth = cfg.get("transformer_layers_per_block", 1)
    for value, what in ((heads, "attention heads"), (depth, "transformer depth")):
        if isinstance(value, list) and len(set(value)) != 1:
            raise WeightsError(f"{source}: {what} differ between levels ({value}); not SD 1.x")
    return UNetConfig(
        in_channels=cfg.get("in_channels", 4), out_channels=cfg.get("out_channels", 4),
        model_channels=boc[0], channel_mult=tuple(c // boc[0] for c in boc),
        num_res_blocks=cfg.get("layers_per_block", 2),
        attention_resolutions=tuple(sorted((2 ** i for i, t in enumerate(cfg["down_block_types"])
                                            if t.startswith("CrossAttn")), reverse=True)),
        num_heads=heads[0] if isinstance(heads, list) else heads,
        transformer_depth=depth[0] if isinstance(depth, list) else depth,
        context_dim=cfg.get("cross_attention_dim", 768), norm_num_groups=cfg.get("norm_num_groups", 32),
        hint_channels=cfg.get("conditioning_channels", 3))


def read_diffusers_pipeline(src: Path, args) -> tuple[dict, dict, Tokenizer | None]:
    ucfg = unet_config_from_diffusers(read_json(src / "unet" / "config.json"), src / "unet")
    parts = {"unet": convert.unet_from_diffusers(read_weights_in(src / "unet", DIFFUSERS_FILES), ucfg),
             "autoencoder": convert.autoencoder_from_diffusers(read_weights_in(src / "vae", DIFFUSERS_FILES)),
             "text_encoder": convert.text_encoder_from_transformers(
                 read_weights_in(src / "text_encoder", TRANSFORMERS_FILES))}
    vae_cfg = read_json(src / "vae" / "config.json") if (src / "vae" / "config.json").is_file() else {}
    text_cfg = read_json(src / "text_encoder" / "config.json") if (src / "text_encoder" / "config.json").is_file() else {}
    width = parts["text_encoder"]["text_model.embeddings.token_embedding.weight"].shape[1]
    heads = text_cfg.get("num_attention_heads")
    configs = {"unet": ucfg,
               "autoencoder": autoencoder_config_from_state_dict(
                   parts["autoencoder"], args.scale_factor or vae_cfg.get("scaling_factor"),
                   norm_num_groups=vae_cfg.get("norm_num_groups", 32)),
               "text": text_config_from_state_dict(
                   parts["text_encoder"], width // heads if heads else args.clip_head_dim)}
    tok = Tokenizer.from_file(src / "tokenizer") if (src / "tokenizer").is_dir() else None
    return parts, configs, tok


def read_control(path: Path) -> dict:
    """Control-branch weights in minibldm keys."""
    if path.is_dir():
        cfg = unet_config_from_diffusers(read_json(path / "config.json"), path)
        return convert.control_from_diffusers(read_weights_in(path, DIFFUSERS_FILES), cfg)
    sd = read_checkpoint(path)
    if any(k.startswith("control_model.") for k in sd):
        return split_compvis(sd, str(path))["control"]
    return sd  # a bare control-branch state dict; the key check below judges it


def convert_weights(args) -> list[str]:
    src = Path(args.src)
    configs: dict = {}
    tok = None
    if src.is_dir():
        if not (src / "unet").is_dir():
            raise WeightsError(f"{src}: not a diffusers pipeline folder (no unet/); give a "
                               "checkpoint file or a folder with unet/, vae/, text_encoder/, tokenizer/")
        parts, configs, tok = read_diffusers_pipeline(src, args)
    else:
        sd = read_checkpoint(src)
        parts = split_compvis(sd, str(src))
        if "autoencoder" in parts:  # LatentDiffusion checkpoints store their scale factor
            scale = args.scale_factor or (float(sd["scale_factor"]) if "scale_factor" in sd else None)
            configs["autoencoder"] = autoencoder_config_from_state_dict(parts["autoencoder"], scale)
        if "text_encoder" in parts:
            configs["text"] = text_config_from_state_dict(parts["text_encoder"], args.clip_head_dim)
        if "unet" in parts:
            configs["unet"] = unet_config_from_state_dict(parts["unet"], args.num_heads)
    if args.control:
        parts["control"] = read_control(Path(args.control))
    fits = None
    if "control" in parts:
        base = configs.get("unet", UNetConfig())
        ccfg = unet_config_from_state_dict(parts["control"], base.num_heads, base.norm_num_groups)
        if "unet" in configs:
            fits = [f for f in ccfg.__dataclass_fields__ if f not in ("out_channels", "hint_channels")
                    and getattr(ccfg, f) != getattr(base, f)]
            ccfg = dataclasses.replace(base, hint_channels=ccfg.hint_channels)
        configs["unet"] = ccfg
    if "text_encoder" in parts and tok is None:
        if not args.vocab:
            raise WeightsError(f"{src}: has a text encoder but no tokenizer; pass --vocab "
                               "bpe_simple_vocab_16e6.txt.gz (or a folder with vocab.json + merges.txt)")
    if args.vocab:
        tok = Tokenizer.from_file(args.vocab)
    # Check every network against its module (keys and shapes) before writing anything.
    section_of = {"autoencoder": "autoencoder", "unet": "unet", "text_encoder": "text", "control": "unet"}
    for name, sd in parts.items():
        with torch.device("meta"):
            module = BUILDERS[name](configs[section_of[name]])
        source = args.control if name == "control" and args.control else src
        check_state_dict(module.state_dict(), sd, str(source), name)
    if fits:
        raise WeightsError(f"{args.control or src}: the control branch does not fit the UNet "
                           f"(differs in {', '.join(fits)})")
    save(args.out_dir, configs, parts, tok)
    return sorted(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="convert_weights.py", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="CompVis/LDM checkpoint (.ckpt/.safetensors) or diffusers pipeline folder")
    p.add_argument("out_dir", help="minibldm weights folder to write")
    p.add_argument("--control", help="ControlNet / AdaBLDM checkpoint or diffusers ControlNetModel folder")
    p.add_argument("--vocab", help="bpe_simple_vocab_16e6.txt.gz or a folder with vocab.json + merges.txt")
    p.add_argument("--num-heads", type=int, default=8, help="UNet attention heads (SD 1.x: 8)")
    p.add_argument("--clip-head-dim", type=int, default=64, help="CLIP head width (SD 1.x: 64)")
    p.add_argument("--scale-factor", type=float, default=None,
                   help="latent scale factor (default: the checkpoint's, else 0.18215 KL / 1.0 VQ)")
    args = p.parse_args(argv)
    try:
        written = convert_weights(args)
    except WeightsError as e:
        print(f"convert_weights.py: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(written)} to {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
