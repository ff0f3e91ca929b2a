"""Convert public Stable Diffusion 1.x / LDM / ControlNet weights into a minibldm weights folder.

    python -m minibldm.convert SRC OUT_DIR [--control CONTROL] [--vocab PATH]
    (tools/convert_weights.py is the same command)

SRC is a CompVis-layout checkpoint (`.ckpt`, read with torch.load(weights_only=True), or
`.safetensors`) with `model.diffusion_model.*`, `first_stage_model.*` and
`cond_stage_model.transformer.*` keys (and a ControlNet / AdaBLDM checkpoint's `control_model.*`
keys); a diffusers pipeline folder (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`); or an LDM
autoencoder checkpoint (VQ-f4, VQ-f8, KL-f8: only autoencoder.safetensors is written). CONTROL
is a ControlNet / AdaBLDM checkpoint or a diffusers ControlNetModel folder. PATH is OpenAI's
`bpe_simple_vocab_16e6.txt.gz` or a folder with `vocab.json` + `merges.txt` (a diffusers
pipeline brings its own).

Configs are read off tensor shapes (diffusers folders: off their config.json); what shapes
cannot tell follows SD 1.x (8 UNet heads, 64-wide CLIP heads) unless given by flag. Every
network is checked against its minibldm module (keys and shapes) before anything is written.
Errors are one line on stderr and exit status 2.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

from .. import convert
from ..cli import Parser, UsageError, check_writable
from ..config import UNetConfig
from ..io import WeightsError, check_state_dict, read_checkpoint, read_json, remove_temporaries
from ..tokenizer import Tokenizer
from ..weights import BUILDERS, SECTIONS, save

COMPVIS_PREFIXES = {"model.diffusion_model.": "unet", "first_stage_model.": "autoencoder",
                    "cond_stage_model.transformer.": "text_encoder", "control_model.": "control"}
# Keys of CompVis / ControlNet checkpoints that are not network weights: the EMA copy, the
# LatentDiffusion schedule buffers (betas, alphas_cumprod, ..., scale_factor: no dot in the name),
# and an autoencoder's training losses (discriminator, LPIPS).
IGNORED_PREFIXES = ("model_ema.", "loss.", "first_stage_model.loss.")
AUTOENCODER_ROOTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize.")
DIFFUSERS_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
TRANSFORMERS_FILES = ("model.safetensors", "pytorch_model.bin")


def split_compvis(sd: dict, source: str) -> dict[str, dict]:
    """Split a CompVis / ControlNet / LDM checkpoint into per-network state dicts."""
    parts: dict[str, dict] = {}
    unknown = []
    for key, value in sd.items():
        if "." not in key or key.startswith(IGNORED_PREFIXES):
            continue
        prefix, name = next(((p, n) for p, n in COMPVIS_PREFIXES.items() if key.startswith(p)),
                            ("", "autoencoder"))  # no prefix: a bare first-stage checkpoint
        if prefix or key.startswith(AUTOENCODER_ROOTS):
            parts.setdefault(name, {})[key[len(prefix):]] = value
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


def read_weights_in(folder: Path, names: tuple[str, ...] = DIFFUSERS_FILES) -> dict:
    for name in names:
        if (folder / name).is_file():
            return read_checkpoint(folder / name)
    raise WeightsError(f"{folder}: none of {', '.join(names)} found")


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
        context_dim=cfg.get("cross_attention_dim", 768),
        norm_num_groups=cfg.get("norm_num_groups", 32),
        hint_channels=cfg.get("conditioning_channels", 3),
        hint_factor=2 ** (len(cfg.get("conditioning_embedding_out_channels", (16, 32, 96, 256))) - 1))


def read_configs(parts: dict, args, unet: UNetConfig | None = None, scale: float | None = None,
                 vae_groups: int = 32, clip_head_dim: int | None = None) -> dict:
    """The config sections of the networks in `parts`, read off their shapes except where the
    source says (a diffusers config.json, a checkpoint's scale_factor) or a flag does."""
    configs = {}
    if "autoencoder" in parts:
        configs["autoencoder"] = convert.autoencoder_config_from_state_dict(
            parts["autoencoder"], args.scale_factor or scale, norm_num_groups=vae_groups)
    if "text_encoder" in parts:
        configs["text"] = convert.text_config_from_state_dict(
            parts["text_encoder"], clip_head_dim or args.clip_head_dim)
    if "unet" in parts:
        configs["unet"] = unet or convert.unet_config_from_state_dict(parts["unet"], args.num_heads)
        u = configs["unet"]
        widths = [u.model_channels * m for m in u.channel_mult]
        if any(w % u.num_heads for w in widths):
            raise WeightsError(f"--num-heads {u.num_heads}: does not divide the UNet's attention "
                               f"widths {sorted(set(widths))}; SD 1.x uses 8")
    return configs


def read_compvis(src: Path, args) -> tuple[dict, dict, None]:
    sd = read_checkpoint(src)
    parts = split_compvis(sd, str(src))
    scale = float(sd["scale_factor"]) if "scale_factor" in sd else None  # LatentDiffusion's
    return parts, read_configs(parts, args, scale=scale), None


def read_diffusers_pipeline(src: Path, args) -> tuple[dict, dict, Tokenizer | None]:
    if not (src / "unet").is_dir():
        raise WeightsError(f"{src}: not a diffusers pipeline folder (no unet/); give a checkpoint "
                           "file or a folder with unet/, vae/, text_encoder/, tokenizer/")
    ucfg = unet_config_from_diffusers(read_json(src / "unet" / "config.json"), src / "unet")
    text_sd = read_weights_in(src / "text_encoder", TRANSFORMERS_FILES)
    parts = {"unet": convert.unet_from_diffusers(read_weights_in(src / "unet"), ucfg),
             "autoencoder": convert.autoencoder_from_diffusers(read_weights_in(src / "vae")),
             "text_encoder": convert.text_encoder_from_transformers(text_sd)}
    vae, text = (read_json(f) if f.is_file() else {}
                 for f in (src / "vae" / "config.json", src / "text_encoder" / "config.json"))
    width = parts["text_encoder"]["text_model.embeddings.token_embedding.weight"].shape[1]
    heads = text.get("num_attention_heads")
    configs = read_configs(parts, args, ucfg, vae.get("scaling_factor"),
                           vae.get("norm_num_groups", 32), heads and width // heads)
    tok = Tokenizer.from_file(src / "tokenizer") if (src / "tokenizer").is_dir() else None
    return parts, configs, tok


def read_control(path: Path) -> dict:
    """Control-branch weights in minibldm keys."""
    if path.is_dir():
        cfg = unet_config_from_diffusers(read_json(path / "config.json"), path)
        return convert.control_from_diffusers(read_weights_in(path), cfg)
    sd = read_checkpoint(path)
    if any(k.startswith("control_model.") for k in sd):
        return split_compvis(sd, str(path))["control"]
    return sd  # a bare control-branch state dict; the key check below judges it


def convert_weights(args) -> list[str]:
    src = Path(args.src)
    parts, configs, tok = (read_diffusers_pipeline if src.is_dir() else read_compvis)(src, args)
    if args.control:
        parts["control"] = read_control(Path(args.control))
    fits = None
    if "control" in parts:
        base = configs.get("unet", UNetConfig())
        ccfg = convert.unet_config_from_state_dict(parts["control"], base.num_heads,
                                                   base.norm_num_groups)
        if "unet" in configs:
            fits = [f.name for f in dataclasses.fields(ccfg) if getattr(ccfg, f.name) !=
                    getattr(base, f.name) and f.name not in ("out_channels", "hint_channels",
                                                             "hint_factor")]
            ccfg = dataclasses.replace(base, hint_channels=ccfg.hint_channels,
                                       hint_factor=ccfg.hint_factor)
        configs["unet"] = ccfg
    if args.vocab:
        tok = Tokenizer.from_file(args.vocab)
    elif "text_encoder" in parts and tok is None:
        raise WeightsError(f"{src}: has a text encoder but no tokenizer; pass --vocab "
                           "bpe_simple_vocab_16e6.txt.gz (or a folder with vocab.json + "
                           "merges.txt)")
    for name, sd in parts.items():  # every network against its module, before writing anything
        with torch.device("meta"):
            module = BUILDERS[name](configs[SECTIONS[name][0]])
        source = args.control if name == "control" and args.control else src
        check_state_dict(module.state_dict(), sd, str(source), name)
    if fits:
        raise WeightsError(f"{args.control or src}: the control branch does not fit the UNet "
                           f"(differs in {', '.join(fits)})")
    save(args.out_dir, configs, parts, tok)
    return sorted(parts)


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m minibldm.convert", description=__doc__.split("\n\n")[0],
               error=WeightsError, examples="""\
  python -m minibldm.convert v1-5-pruned.safetensors weights/sd15 \\
      --vocab ../shared/clip/bpe_simple_vocab_16e6.txt.gz
  python -m minibldm.convert stable-diffusion-v1-5/ weights/sd15 --control adabldm_tile.ckpt""")
    add = p.add_argument
    add("src", help="CompVis/LDM checkpoint (.ckpt/.safetensors) or diffusers pipeline folder")
    add("out_dir", help="minibldm weights folder to write")
    add("--control", help="ControlNet / AdaBLDM checkpoint or diffusers ControlNetModel folder")
    add("--vocab", help="bpe_simple_vocab_16e6.txt.gz or a folder with vocab.json + merges.txt")
    add("--num-heads", type=int, default=8, help="UNet attention heads (SD 1.x: 8)")
    add("--clip-head-dim", type=int, default=64, help="CLIP head width (SD 1.x: 64)")
    add("--scale-factor", type=float, default=None,
        help="latent scale factor (default: the checkpoint's, else 0.18215 KL / 1.0 VQ)")
    try:
        args = p.parse_args(argv)
        for flag, value in (("--num-heads", args.num_heads), ("--clip-head-dim", args.clip_head_dim)):
            if value < 1:
                raise WeightsError(f"{flag} must be at least 1, got {value}")
        if args.scale_factor is not None and not (0 < args.scale_factor < float("inf")):
            raise WeightsError(f"--scale-factor must be a positive number, got {args.scale_factor}")
        try:
            check_writable(args.out_dir, "OUT_DIR")
        except UsageError as e:
            raise WeightsError(str(e)) from None
        remove_temporaries([args.out_dir])  # a killed conversion's half-written files
        written = convert_weights(args)
    except WeightsError as e:
        print(f"minibldm.convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(written)} to {args.out_dir}")
    return 0
