"""A minibldm weights folder, and `load`.

A folder holds `config.json` (one section per network), one safetensors file per network, and
the tokenizer's `vocab.json` + `merges.txt`. `tools/convert_weights.py` writes one from public
checkpoints; `python -m minibldm.train` writes `control.safetensors` into its run folder.
Only safetensors are read here: nothing is ever unpickled at run time.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .autoencoder import Autoencoder
from .clip import TextEncoder
from .config import AutoencoderConfig, ModelConfig, TextConfig, UNetConfig
from .control import ControlNet
from .io import WeightsError, load_into, read_safetensors, save_atomic, write_text_atomic
from .tokenizer import Tokenizer
from .unet import UNet

FILES = {"autoencoder": "autoencoder.safetensors", "unet": "unet.safetensors",
         "text_encoder": "text_encoder.safetensors", "control": "control.safetensors"}
SECTIONS = {"autoencoder": ("autoencoder", AutoencoderConfig), "unet": ("unet", UNetConfig),
            "text_encoder": ("text", TextConfig), "control": ("unet", UNetConfig)}
BUILDERS = {"autoencoder": Autoencoder, "unet": UNet, "text_encoder": TextEncoder,
            "control": ControlNet}


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
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: not valid JSON ({e})") from None


def section(raw: dict, name: str, source: str):
    """The config dataclass of one network from config.json's raw dict."""
    key, cls = SECTIONS[name]
    if key not in raw:
        raise WeightsError(f"{source}: config.json has no '{key}' section")
    fields = {f for f in cls.__dataclass_fields__}
    unknown = sorted(set(raw[key]) - fields)
    if unknown:
        raise WeightsError(f"{source}: config.json '{key}' has unknown fields {', '.join(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw[key].items()})


def load_network(name: str, cfg, path: str | Path, device="cpu", dtype=torch.float32):
    """Build network `name` from `cfg` without initialising it, then fill it from `path`."""
    with torch.device("meta"):
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
    cfgs = {name: section(raw, name, str(d / "config.json")) for name in ("autoencoder", "unet", "text_encoder")}
    nets = {name: load_network(name, cfgs[name], d / FILES[name], device, dtype) for name in cfgs}
    control_path = Path(control) if control is not None else d / FILES["control"]
    ctrl = None
    if control is not None or control_path.is_file():
        ctrl = load_network("control", cfgs["unet"], control_path, device, dtype)
    config = ModelConfig(autoencoder=cfgs["autoencoder"], unet=cfgs["unet"], text=cfgs["text_encoder"])
    tok = Tokenizer.from_file(d, max_length=config.text.max_position_embeddings)
    return Models(config, nets["autoencoder"], nets["unet"], nets["text_encoder"], tok, ctrl)


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
