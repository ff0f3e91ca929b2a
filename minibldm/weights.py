"""A minibldm weights folder, and `load`. A folder holds `config.json` (one section per network),
one safetensors file per network and the tokenizer's `vocab.json` + `merges.txt`; `python -m
minibldm.convert` writes one from public checkpoints, `python -m minibldm.train` writes
`control.safetensors` into its run folder. Only safetensors are read here: nothing is unpickled.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from unittest import mock

import torch

from .autoencoder import Autoencoder
from .clip import TextEncoder
from .config import AutoencoderConfig, ModelConfig, TextConfig, UNetConfig, from_fields
from .control import ControlNet
from .io import (WeightsError, load_into, read_json, read_safetensors, save_atomic,
                 write_text_atomic)
from .tokenizer import Tokenizer
from .unet import UNet

BUILDERS = {"autoencoder": Autoencoder, "unet": UNet, "text_encoder": TextEncoder,
            "control": ControlNet}
FILES = {name: f"{name}.safetensors" for name in BUILDERS}
SECTIONS = {"autoencoder": ("autoencoder", AutoencoderConfig), "unet": ("unet", UNetConfig),
            "text_encoder": ("text", TextConfig), "control": ("unet", UNetConfig)}


@dataclass
class Models:
    """The networks of one weights folder. `control` is None when the folder has none."""
    config: ModelConfig
    autoencoder: Autoencoder
    unet: UNet
    text_encoder: TextEncoder
    tokenizer: Tokenizer
    control: ControlNet | None = None


def read_config(weights_dir: str | Path) -> dict:
    path = Path(weights_dir) / "config.json"
    if not path.is_file():
        raise WeightsError(f"{path}: no such file; is {weights_dir} a minibldm weights folder?")
    return read_json(path)


def section(raw: dict, name: str, source: str):
    """The config dataclass of one network from config.json's raw dict."""
    key, cls = SECTIONS[name]
    if key not in raw:
        raise WeightsError(f"{source}: config.json has no '{key}' section")
    try:
        return from_fields(cls, raw[key])
    except ValueError as e:
        raise WeightsError(f"{source}: config.json '{key}': {e}") from None


def load_network(name: str, cfg, path: str | Path, device="cpu", dtype=torch.float32):
    """Build network `name` from `cfg` without initialising it, then fill it from `path`."""
    # On the meta device, nn.Embedding's normal_ runs a Python decomposition whose first call
    # imports torch._dynamo (3-8 s on 2 CPU cores) to fill values that are thrown away: skip it.
    with torch.device("meta"), mock.patch.object(torch.nn.Embedding, "reset_parameters",
                                                 lambda self: None):
        module = BUILDERS[name](cfg)
    load_into(module, read_safetensors(path), str(path), name, assign=True)
    return module.to(device=device, dtype=dtype).eval().requires_grad_(False)


def load(weights_dir: str | Path, device: str | torch.device = "cpu",
         dtype: torch.dtype = torch.float32, control: str | Path | None = None) -> Models:
    """Load every network of a weights folder. `control` names a control.safetensors elsewhere
    (a training run's); without it the folder's own is used when present."""
    d = Path(weights_dir)
    if not d.is_dir():
        raise WeightsError(f"{d}: no such weights folder")
    raw = read_config(d)
    source = str(d / "config.json")
    cfgs = {name: section(raw, name, source) for name in ("autoencoder", "unet", "text_encoder")}
    config = ModelConfig(cfgs["autoencoder"], cfgs["unet"], cfgs["text_encoder"])
    control_path = Path(control) if control is not None else d / FILES["control"]
    with_control = control is not None or control_path.is_file()
    if with_control and config.hint_mismatch():
        raise WeightsError(f"{source}: {config.hint_mismatch()}")
    nets = {name: load_network(name, cfgs[name], d / FILES[name], device, dtype) for name in cfgs}
    if with_control:
        nets["control"] = load_network("control", cfgs["unet"], control_path, device, dtype)
    tok = Tokenizer.from_file(d, max_length=config.text.max_position_embeddings)
    return Models(config, tokenizer=tok, **nets)


def save(out_dir: str | Path, configs: dict, state_dicts: dict[str, dict[str, torch.Tensor]],
         tokenizer: Tokenizer | None = None) -> None:
    """Write a weights folder: `configs` maps config.json sections ("autoencoder", "unet",
    "text") to dataclasses; `state_dicts` maps network names of FILES to their tensors."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, sd in state_dicts.items():
        save_atomic(sd, out / FILES[name])
    if tokenizer is not None:
        tokenizer.save(out)
    raw = {key: asdict(cfg) for key, cfg in configs.items()}
    write_text_atomic(out / "config.json", json.dumps(raw, indent=2) + "\n")
