"""python -m minibldm.export --onnx OUT_DIR [--weights DIR]: the networks of a weights folder as
ONNX graphs, so that another runtime can run minibldm (docs/PORTING.md is the guide; tools/
replay_numpy.py runs a whole sample on them with onnxruntime and NumPy).

OUT_DIR receives, each file written whole or not at all:

    text_encoder.onnx  ids (B, 77) int64 -> hidden (B, 77, d): τ, after the final LayerNorm
    control.onnx       z_t (B, c, h, w), hint (B, 3, 8h, 8w), t (B,) int64, context (B, 77, d)
                       -> residual.0 .. residual.<n>: the trimap branch (when the folder has one)
    unet.onnx          z_t, t, context, residual.0 .. residual.<n> -> eps (zeros: no trimap branch)
    encoder.onnx       image (B, 3, 8h, 8w) in [-1, 1] -> mean, logvar (unscaled; logvar clamped)
    decoder.onnx       z (B, c, h, w), a scaled latent -> image (B, 3, 8h, 8w)
    config.json, vocab.json, merges.txt: the weights folder's, for the schedule-free constants
                       (scale_factor) and the tokenizer

The batch size B is dynamic; the spatial size is the model's image size (config.json's
image_size, else --size). --networks exports some of them (e.g. `--networks control` after
training a new trimap branch). The graphs come from the reference modules (minibldm.load), never
from minibldm/fast. Bad input: one line on stderr, exit status 2, nothing written.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from ..api import DEFAULT_WEIGHTS
from ..cli import Parser, UsageError, check_writable
from ..io import WeightsError, read_json
from ..weights import Models, load

TOKENIZER_FILES = ("config.json", "vocab.json", "merges.txt")
NETWORKS = ("text_encoder", "control", "unet", "encoder", "decoder")


class UNetWithResiduals(nn.Module):
    """The UNet with the trimap branch's residuals as separate inputs (a graph has no lists)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, z_t, t, context, *residuals):
        return self.unet(z_t, t, context, control=list(residuals))


class Moments(nn.Module):
    """The encoder half of the KL autoencoder: image -> (mean, clamped logvar), unscaled."""

    def __init__(self, autoencoder: nn.Module):
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, image):
        return self.autoencoder.moments(image)


class Decode(nn.Module):
    """Scaled latent -> image: unscale, post_quant_conv, decoder (Autoencoder.decode)."""

    def __init__(self, autoencoder: nn.Module):
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, z):
        return self.autoencoder.decode(z)


def graphs(m: Models, size: int) -> dict[str, tuple[nn.Module, dict, list[str]]]:
    """name -> (module, {input name: example}, output names) for every network to export.
    Examples have batch 2 (a batch of 1 would let the exporter fix it)."""
    cfg = m.config
    c, h, d = cfg.autoencoder.embed_dim, size // cfg.autoencoder.factor, cfg.unet.context_dim
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, c, h, h, generator=g)
    t = torch.tensor([981, 1])
    context = torch.randn(2, cfg.text.max_position_embeddings, d, generator=g)
    image = torch.rand(2, 3, size, size, generator=g) * 2 - 1
    hint = torch.rand(2, cfg.unet.hint_channels, size, size, generator=g)
    ids = torch.zeros(2, cfg.text.max_position_embeddings, dtype=torch.long)
    residuals = {f"residual.{i}": r for i, r in enumerate(
        m.control(z, hint, t, context) if m.control is not None else zero_residuals(m, z, t, context))}
    out = {"text_encoder": (m.text_encoder, {"ids": ids}, ["hidden"]),
           "unet": (UNetWithResiduals(m.unet), {"z_t": z, "t": t, "context": context, **residuals},
                    ["eps"]),
           "encoder": (Moments(m.autoencoder), {"image": image}, ["mean", "logvar"]),
           "decoder": (Decode(m.autoencoder), {"z": z}, ["image"])}
    if m.control is not None:
        out["control"] = (m.control, {"z_t": z, "hint": hint, "t": t, "context": context},
                          list(residuals))
    return out


def zero_residuals(m: Models, z, t, context) -> list[torch.Tensor]:
    """Zeros shaped like the residuals a trimap branch would give: the UNet's skips, then its
    middle block's output (adding them changes nothing)."""
    shapes = []
    hooks = [b.register_forward_hook(lambda mod, a, out: shapes.append(out.shape))
             for b in [*m.unet.input_blocks, m.unet.middle_block]]
    try:
        m.unet(z, t, context)
    finally:
        for hook in hooks:
            hook.remove()
    return [torch.zeros(s) for s in shapes]


@contextlib.contextmanager
def quiet():
    """The exporter's progress lines and its warnings about optional packages, silenced."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def to_onnx(module: nn.Module, inputs: dict, outputs: list[str]):
    """torch.onnx's ONNXProgram of `module` with named inputs and outputs, batch dynamic."""
    batch = {0: torch.export.Dim("batch", min=1, max=1024)}
    params = inspect.signature(module.forward).parameters.values()
    fixed = sum(p.kind == p.POSITIONAL_OR_KEYWORD for p in params)
    shapes = (batch,) * fixed  # and a tuple for *args (UNetWithResiduals' residuals)
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        shapes += ((batch,) * (len(inputs) - fixed),)
    with torch.no_grad(), quiet():
        return torch.onnx.export(module, tuple(inputs.values()), input_names=list(inputs),
                                 output_names=outputs, dynamo=True, verbose=False,
                                 dynamic_shapes=shapes)


def export_onnx(m: Models, weights_dir: Path, out_dir: Path, size: int,
                names: list[str] | None = None, log=print) -> list[str]:
    """Export the networks `names` (default: all) of `m` to `out_dir` (module docstring);
    returns the files written. All graphs are made before the first file is written; each file
    appears by a rename."""
    programs = {}
    for name, (module, inputs, outputs) in graphs(m, size).items():
        if names and name not in names:
            continue
        t0 = time.perf_counter()
        programs[name] = to_onnx(module, inputs, outputs)
        log(f"{name}: exported in {time.perf_counter() - t0:.1f} s")
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".export-*"):  # a killed export's staging folder
        shutil.rmtree(stale, ignore_errors=True)
    written = []
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".export-") as staging:
        for name, program in programs.items():
            program.save(Path(staging) / f"{name}.onnx")  # with any external data file beside it
        for f in TOKENIZER_FILES:
            shutil.copyfile(weights_dir / f, Path(staging) / f)
        for f in sorted(Path(staging).iterdir()):
            f.replace(out_dir / f.name)
            written.append(f.name)
    return written


def model_size(weights_dir: Path, size: int | None, m: Models) -> int:
    size = size or read_json(weights_dir / "config.json").get("image_size", 512)
    if not isinstance(size, int) or size <= 0 or size % m.config.size_multiple:
        raise UsageError(f"--size {size}: must be a positive multiple of "
                         f"{m.config.size_multiple} for these weights")
    return size


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m minibldm.export", description=__doc__.split("\n\n")[0],
               examples="  python -m minibldm.export --onnx onnx/tiny\n"
                        "  python -m minibldm.export --onnx onnx/sd15 --weights weights/sd15")
    p.add_argument("--onnx", required=True, metavar="OUT_DIR", help="folder for the ONNX graphs")
    p.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="minibldm weights folder")
    p.add_argument("--size", type=int, help="image side (default: config.json's image_size)")
    p.add_argument("--networks", nargs="+", choices=NETWORKS, metavar="NAME",
                   help=f"export only these, of: {' '.join(NETWORKS)} (default: all)")
    try:
        args = p.parse_args(argv)
        for package in ("onnx", "onnxscript"):  # torch.onnx's exporter needs both
            try:
                importlib.import_module(package)
            except ImportError:
                raise UsageError(f"--onnx needs the {package} package: pip install onnx "
                                 "onnxscript") from None
        weights, out = Path(args.weights), Path(args.onnx)
        check_writable(out, "--onnx")
        m = load(weights)
        if m.config.autoencoder.is_vq:
            raise UsageError(f"--weights {weights}: a VQ autoencoder; the export is for the KL "
                             "one (Stable Diffusion's)")
        size = model_size(weights, args.size, m)
        if m.control is None and "control" in (args.networks or []):
            raise UsageError(f"--networks control: {weights} has no control.safetensors")
        missing = [f for f in TOKENIZER_FILES if not (weights / f).is_file()]
        if missing:
            raise UsageError(f"--weights {weights}: no {', '.join(missing)}")
    except (UsageError, WeightsError) as e:
        print(f"python -m minibldm.export: error: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    written = export_onnx(m, weights, out, size, args.networks,
                          log=lambda s: print(s, file=sys.stderr))
    print(f"wrote {', '.join(written)} to {out} in {time.perf_counter() - t0:.1f} s")
    return 0
