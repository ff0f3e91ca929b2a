"""The networks of a training run: each one's config, where it comes from (--weights or new), how
a new one starts (as in the reference code, seeded by (--seed, its name), so that a network is the
same whatever else the run builds), which ones the stage trains, and the tokenizer.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn as nn

from ..autoencoder import Autoencoder, ResnetBlock
from ..config import PRESETS, ModelConfig
from ..tokenizer import Tokenizer
from ..unet import ResBlock, SpatialTransformer, TimestepEmbedSequential, UNet
from ..weights import BUILDERS, FILES, SECTIONS, load_network, read_config, section
from .losses import encode_latent
from .runfolder import TrainError, differences
from .trainsamples import derived_seed, latent_shape, sample_draws

NETWORKS = ("autoencoder", "unet", "text_encoder", "control")
TRAINS = {"control": ("control",), "unet": ("unet",), "text": ("text_encoder", "unet"),
          "autoencoder": ("autoencoder",)}  # networks each stage trains
NEEDS = {"control": ("autoencoder", "unet", "text_encoder"), "unet": ("autoencoder", "text_encoder"),
         "text": ("autoencoder",), "autoencoder": ()}  # frozen networks it reads from --weights


def given_config(arg: str | None) -> ModelConfig | None:
    """--config: a preset name, or a model config JSON file (a weights or run folder's
    config.json reads as one: its other keys are ignored)."""
    if not arg:
        return None
    if arg in PRESETS:
        return PRESETS[arg]
    try:
        return ModelConfig.from_dict(json.loads(Path(arg).read_text()))
    except (OSError, ValueError, TypeError) as e:
        raise TrainError(f"--config {arg}: not a readable model config ({e})") from None


def network_config(name: str, wdir: Path | None, raw: dict | None, given: ModelConfig | None,
                   config_arg: str | None):
    """The config of network `name` and its source: "weights" when --weights holds the network
    (its config.json section then rules, and --config must agree with it), else "new" (built
    from --config, or from --weights' section when there is no --config)."""
    key = SECTIONS[name][0]
    in_weights = wdir is not None and (wdir / FILES[name]).is_file()
    from_weights = section(raw, name, str(wdir / "config.json")) if raw and key in raw else None
    if in_weights and from_weights is None:
        raise TrainError(f"{wdir / 'config.json'}: no '{key}' section for {FILES[name]}")
    if in_weights and given is not None and getattr(given, key) != from_weights:
        diff = differences(dataclasses.asdict(getattr(given, key)), dataclasses.asdict(from_weights))
        raise TrainError(f"--config {config_arg} and --weights {wdir} disagree on the {key} "
                         f"config ({', '.join(diff)})")
    chosen = from_weights if in_weights or given is None else getattr(given, key)
    if chosen is None:
        raise TrainError(f"no config for the {key} network: pass --config FILE.json")
    return chosen, "weights" if in_weights else "new"


def model_config(args) -> tuple[ModelConfig, dict[str, str]]:
    """The model config, and where each network comes from: "weights" or "new"."""
    wdir = Path(args.weights) if args.weights else None
    if wdir is not None and not wdir.is_dir():
        raise TrainError(f"--weights {wdir}: no such folder")
    raw = read_config(wdir) if wdir is not None else None
    given = given_config(args.config)
    if raw is None and given is None:
        raise TrainError("pass --weights DIR, --config FILE.json, or both")
    sections, sources = {}, {}
    for name in NETWORKS:  # the control branch shares the UNet's section: the UNet's rules
        chosen, sources[name] = network_config(name, wdir, raw, given, args.config)
        sections.setdefault(SECTIONS[name][0], chosen)
    cfg = ModelConfig(sections["autoencoder"], sections["unet"], sections["text"])
    check_model(args, cfg, sources)
    return cfg, sources


def check_model(args, cfg: ModelConfig, sources: dict[str, str]) -> None:
    """The stage's frozen networks are in --weights, the networks fit together, and --size fits
    the model."""
    for name in NEEDS[args.stage]:
        if sources[name] != "weights":
            where = f"--weights {Path(args.weights)}" if args.weights else "no --weights"
            raise TrainError(f"the {args.stage} stage trains on a frozen {name.replace('_', ' ')}, "
                             f"but {where} has no {FILES[name]}")
    if cfg.unet.context_dim != cfg.text.hidden_size:
        raise TrainError(f"the UNet's context_dim ({cfg.unet.context_dim}) differs from the text "
                         f"encoder's hidden_size ({cfg.text.hidden_size})")
    if cfg.unet.in_channels != cfg.autoencoder.embed_dim:
        raise TrainError(f"the UNet reads {cfg.unet.in_channels} latent channels but the "
                         f"autoencoder makes {cfg.autoencoder.embed_dim}")
    if args.size % cfg.size_multiple:
        raise TrainError(f"--size {args.size}: must be a multiple of {cfg.size_multiple} for "
                         "this model")
    if args.stage == "control" and cfg.hint_mismatch():
        raise TrainError(f"the model config: {cfg.hint_mismatch()}")


@torch.no_grad()
def zero_init_unet(unet: UNet) -> UNet:
    """ldm's openaimodel zero-initialises each ResBlock's last conv, each transformer's proj_out
    and the output conv, so a new UNet starts as a sum of identities that predicts 0."""
    for m in unet.modules():
        if isinstance(m, ResBlock):
            nn.init.zeros_(m.out_layers[3].weight), nn.init.zeros_(m.out_layers[3].bias)
        elif isinstance(m, SpatialTransformer):
            nn.init.zeros_(m.proj_out.weight), nn.init.zeros_(m.proj_out.bias)
    nn.init.zeros_(unet.out[2].weight), nn.init.zeros_(unet.out[2].bias)
    return unet


def new_network(name: str, cfg, seed: int) -> nn.Module:
    """Network `name` with random weights drawn from (seed, name), without touching the global
    RNG. Token and position embeddings get CLIP's N(0, 0.02²) instead of torch's N(0, 1)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derived_seed(seed, "init", name))
        net = BUILDERS[name](cfg)
        for m in net.modules():
            if isinstance(m, nn.Embedding) and name == "text_encoder":
                nn.init.normal_(m.weight, std=0.02)
    return zero_init_unet(net) if name == "unet" else net


def build_networks(args, cfg: ModelConfig, sources: dict[str, str]) -> dict[str, nn.Module]:
    """Every network of the model on the CPU: from --weights, or new. A new control branch is
    copied from the UNet (ControlNet's init); new networks are seeded by --seed. The networks the
    stage trains are in train mode with gradients, the others frozen in eval mode."""
    nets = {}
    for name in NETWORKS if args.stage == "control" else NETWORKS[:-1]:
        c = getattr(cfg, SECTIONS[name][0])
        if sources[name] == "weights":
            nets[name] = load_network(name, c, Path(args.weights) / FILES[name])
        elif name == "control":
            nets[name] = new_network(name, c, args.seed).copy_from_unet(nets["unet"])
        else:
            nets[name] = new_network(name, c, args.seed)
    for name, net in nets.items():
        trained = name in TRAINS[args.stage]
        net.train(trained).requires_grad_(trained)
    return nets


def get_tokenizer(args, cfg: ModelConfig, prompts: list[str]) -> tuple[Tokenizer, str]:
    """The tokenizer of --weights, else one trained on `prompts`; and where it came from."""
    n = cfg.text.max_position_embeddings
    if args.weights and (Path(args.weights) / "vocab.json").is_file():
        tok, source = Tokenizer.from_file(args.weights, max_length=n), "weights"
    else:
        tok, source = Tokenizer.train(sorted(set(prompts)), cfg.text.vocab_size, max_length=n), "trained"
    if tok.vocab_size > cfg.text.vocab_size:
        raise TrainError(f"the tokenizer has {tok.vocab_size} tokens but the text encoder's "
                         f"vocab_size is {cfg.text.vocab_size}")
    return tok, source


def enable_grad_checkpointing(module: nn.Module) -> None:
    """Recompute each UNet / control block and autoencoder ResnetBlock in the backward pass.
    torch's checkpoint wrapper keeps state_dict() keys unchanged."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing)
    apply_activation_checkpointing(
        module, check_fn=lambda m: isinstance(m, (TimestepEmbedSequential, ResnetBlock)))


@torch.no_grad()
def latent_scale(autoencoder: Autoencoder, dataset, seed: int, size: int, n: int = 64) -> float:
    """1 / std of the posterior samples of the run's first n training samples (ldm's
    `scale_by_std`, which uses the first batch), so that the scaled latents have unit variance."""
    shape = latent_shape(autoencoder.cfg, size)
    zs = []
    for first in range(0, n, 16):
        idx = list(range(first, min(first + 16, n)))
        image = torch.stack([dataset[i]["image"] for i in idx])
        _, _, post = sample_draws(seed, idx, shape)
        zs.append(encode_latent(autoencoder, image, post) / autoencoder.cfg.scale_factor)
    return 1.0 / torch.cat(zs).float().std().item()


def with_latent_scale(args, cfg: ModelConfig, autoencoder: Autoencoder, dataset) -> ModelConfig:
    """--scale-factor applied: `cfg` and the autoencoder with the given scale, or with
    `latent_scale`'s for 'auto'."""
    scale = (latent_scale(autoencoder, dataset, args.seed, args.size) if args.scale_factor == "auto"
             else float(args.scale_factor))
    cfg = dataclasses.replace(cfg, autoencoder=dataclasses.replace(cfg.autoencoder,
                                                                   scale_factor=scale))
    autoencoder.cfg = cfg.autoencoder
    return cfg
