"""python -m minibldm.train: train one part of a minibldm model, with resume and torchrun.

AdaBLDM (Li et al. 2024, arXiv 2402.19330; docs/ADABLDM.md "Training the trimap branch"). Stages:

  control      the trimap branch: ζ (`input_hint_block`) and the trimap encoder ε̂_tri, on pairs
               made on the fly (crop of a real defect, random affine, pasted inside F;
               data.PairDataset). Several --data folders train one branch for all of them,
               their pairs taken in turn. Loss ‖ε − ε_θ(z_t, t, τ(y), ε̂_tri(z_t, ζ(Γ), t, τ("")))‖²:
               as in the reference code the branch reads the empty prompt's embedding and the UNet
               reads the prompt's ("a {object} with a {defect}", empty with p = 0.1). UNet,
               autoencoder and text encoder are frozen. A branch missing from --weights starts as
               ControlNet's does: a copy of the UNet's time embedding, input and middle blocks,
               zero convs at zero. AdamW, lr 1e-5, betas (0.9, 0.999).
  unet         the paper's domain stage: ε_θ alone on the category's good images and its k training
               defect images, each with its prompt (data.GoodDataset); text encoder and
               autoencoder frozen.
  text         τ and ε_θ trained together through the same denoising loss, to build a model from
               scratch. Without an image tower (CLIP's contrastive pretraining) the denoising loss
               is the one signal a text encoder can learn from here, and joint training is how
               the prompt words come to mean something to this UNet.
  autoencoder  Ω and Φ on the good images and the k training defects (like the unet stage):
               L1 reconstruction (--rec-loss l2 for MSE), plus for the KL bottleneck ldm's KL
               term (weight 1e-6 against ldm's per-image pixel sums, here divided like the
               reconstruction by the pixel count), or for VQ the codebook and commitment loss
               (weight 1). ldm's LPIPS and GAN terms are left out: no pretrained network is at
               hand. With --defect-weight W the defect mask's pixels weigh W in the
               reconstruction mean: an autoencoder trained on the plain mean smooths thin
               scratches and cracks away, and then no later stage can draw them.

Diffusion stages draw t ~ U{0..999} and take z_0 = scale · (a posterior sample of Ω(x)); every
random draw of a sample (t, ε, the posterior noise, the pair itself) is a function of (--seed,
the sample's index in the run), so a run does not depend on how it was split across processes or
restarts.

Where the networks come from:
  --weights DIR  a weights folder (config.json, <network>.safetensors, vocab.json + merges.txt). It
                 may be partial (no control, or a previous run of the autoencoder stage).
  --config FILE  a model config JSON (the config.json of a weights folder or of a run) or a
                 preset name (tiny, sd15): networks that --weights lacks are built from it with
                 seeded random weights. A network in both must have the same config in both.
  The frozen networks of a stage must come from --weights (control: autoencoder, UNet, text
  encoder; unet: autoencoder, text encoder; text: autoencoder). Without a tokenizer in --weights,
  one is trained on the data's prompts (Tokenizer.train, the text config's vocab_size). A new
  UNet gets ldm's zero init of its output convs. A new autoencoder's latents are not unit
  variance: the first diffusion stage after it takes `--scale-factor auto` (1 / std of the
  training latents, ldm's `scale_by_std`), written into the run's config for every later stage.
  So a model is built from nothing by a chain of runs, each reading the previous run folder
  (weights/tiny/README.md has the exact recipe of the bundled model):
      train --stage autoencoder --config tiny --data A B ... --out runs/ae
      train --stage text  --weights runs/ae --scale-factor auto --data A B ... --out runs/text
      train --stage control --weights runs/text --data A B ... --out runs/control

The losses are in minibldm/losses.py; what each step reads (the samples by index, their split
across processes, their random draws) is in minibldm/trainsamples.py.

The run folder (--out), its checkpoint and resuming: see minibldm/runfolder.py.

Several GPUs or nodes: `torchrun --nproc_per_node N -m minibldm.train ...` (DDP; NCCL on GPUs,
gloo on CPU). Every process reads the same files (a shared file system across nodes); process r of
W takes samples r·B/W ... (r+1)·B/W − 1 of each global batch of B, so the data do not depend on W;
process 0 writes. Progress goes to stderr. Bad input is one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from . import runfolder
from .autoencoder import Autoencoder, ResnetBlock
from .config import PRESETS, ModelConfig
from .data import DataError
from .ddim import alphas_cumprod
from .io import WeightsError
from .losses import AutoencoderLoss, defect_weights, denoising_loss, encode_latent
from .runfolder import (CHECKPOINT, TrainError, control_metadata, draw_loss_curve, load_checkpoint,
                        read_checkpoint_state, read_loss_log, save_checkpoint, write_run_folder,
                        write_trained)
from .tokenizer import Tokenizer
from .trainsamples import (NUM_TIMESTEPS, StepBatches, all_prompts, collate, derived_seed,
                           make_dataset, read_data, sample_draws)
from .unet import ResBlock, SpatialTransformer, TimestepEmbedSequential, UNet
from .weights import BUILDERS, FILES, load_network, read_config, section

STAGES = ("control", "unet", "text", "autoencoder")
TRAINS = {"control": ("control",), "unet": ("unet",), "text": ("text_encoder", "unet"),
          "autoencoder": ("autoencoder",)}  # networks each stage trains
NEEDS = {"control": ("autoencoder", "unet", "text_encoder"), "unet": ("autoencoder", "text_encoder"),
         "text": ("autoencoder",), "autoencoder": ()}  # frozen networks it reads from --weights
DEFAULT_LR = {"control": 1e-5, "unet": 1e-5, "text": 1e-4, "autoencoder": 1e-4}
SECTION = {"autoencoder": "autoencoder", "unet": "unet", "text_encoder": "text", "control": "unet"}
# Settings a resumed run may change; every other one must equal the checkpoint's.
# (--config's path may change too: its content is compared as "model".)
MAY_CHANGE = {"steps", "checkpoint_every", "device", "num_workers", "grad_checkpoint", "log_every",
              "out", "config"}
# Settings added after runs were made: a checkpoint without one was made with this value.
ADDED_SETTINGS = {"defect_weight": 1.0}
PROG = "python -m minibldm.train"


# ---- settings -------------------------------------------------------------------------------

def usage_notes() -> str:
    """--help's epilog: this docstring from "Stages" on, with the run folder spelled out
    (runfolder's docstring in place of the line that points to it)."""
    pointer = next(line for line in __doc__.splitlines() if "minibldm/runfolder.py" in line)
    return __doc__[__doc__.index("Stages"):].replace(
        pointer, runfolder.__doc__.split("\n\n", 1)[1].rstrip("\n"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__.split("\n\n")[0], epilog=usage_notes())
    p.add_argument("--stage", required=True, choices=STAGES, help="what to train (see below)")
    p.add_argument("--weights", help="weights folder to start from (may be partial)")
    p.add_argument("--config", help="model config for networks --weights lacks: a JSON file or a "
                   f"preset name ({', '.join(PRESETS)})")
    p.add_argument("--data", nargs="+", required=True, metavar="DIR",
                   help="category folders (MVTec AD or plain layout)")
    p.add_argument("--defect", nargs="+", metavar="NAME", help="defect folders to train on (default: all)")
    p.add_argument("--out", required=True, help="run folder; an existing run there is continued")
    p.add_argument("--steps", type=int, default=5000, help="optimizer steps in all (default 5000; "
                   "the reference control run: 50,000 at batch 4)")
    p.add_argument("--batch-size", type=int, default=4, help="global batch size (reference: 4)")
    p.add_argument("--lr", type=float, help="AdamW learning rate (default: 1e-5 for control and "
                   "unet, 1e-4 for text and autoencoder, which start from scratch)")
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999), metavar=("B1", "B2"))
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (torch default)")
    p.add_argument("--seed", type=int, default=0, help="seeds the split, the data, the noise and new networks")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--size", type=int, default=256, help="image side the model trains at")
    p.add_argument("--k", type=int, default=10, help="real defect images per type for training")
    p.add_argument("--defect-repeat", type=int, default=1, metavar="R",
                   help="text, unet and autoencoder stages: each few-shot defect image counts R "
                        "times per epoch (default 1), so that a few defects among many good images "
                        "are seen often")
    p.add_argument("--defect-weight", type=float, default=1.0, metavar="W",
                   help="weight of the loss on the defect: diffusion stages weight the denoising "
                        "loss on the latent cells a defect mask touches, the autoencoder stage its "
                        "reconstruction loss on the mask's pixels (default 1: the plain mean); W > 1 "
                        "makes small and thin defects count, which otherwise are a fraction of a "
                        "percent of it")
    p.add_argument("--p-empty-prompt", type=float, default=0.1, help="probability of the empty prompt")
    p.add_argument("--object", help="object name for the prompts (default: meta.json or the folder name)")
    p.add_argument("--texture", action="store_true", help="a surface: the foreground is the whole image")
    p.add_argument("--translate-only", action="store_true",
                   help="control pairs: paste defects without rotation or scaling")
    p.add_argument("--scale-factor", metavar="S|auto",
                   help="text and unet stages: the latent scale to train with, a number or 'auto' "
                        "(1 / std of the training latents, ldm's rule for a new autoencoder)")
    p.add_argument("--rec-loss", choices=("l1", "l2"), default="l1", help="autoencoder reconstruction loss")
    p.add_argument("--kl-weight", type=float, default=1e-6, help="autoencoder KL weight (ldm: 1e-6)")
    p.add_argument("--codebook-weight", type=float, default=1.0, help="VQ codebook loss weight (ldm: 1)")
    p.add_argument("--checkpoint-every", type=int, default=500, metavar="K",
                   help="write checkpoint.safetensors every K steps (and at the end)")
    p.add_argument("--grad-checkpoint", action="store_true",
                   help="recompute block activations in the backward pass (saves memory)")
    p.add_argument("--autocast", choices=("bf16", "fp16"), help="mixed precision (GPU); default float32")
    p.add_argument("--num-workers", type=int, default=0, help="data loader processes")
    p.add_argument("--log-every", type=int, default=10, help="progress line every N steps")
    args = p.parse_args(argv)
    if args.lr is None:
        args.lr = DEFAULT_LR[args.stage]
    return args


def settings(args: argparse.Namespace, cfg: ModelConfig) -> dict:
    """The run's settings as JSON values: the arguments, paths made absolute, and the model."""
    s = dict(vars(args))
    for k in ("weights", "config", "out"):
        if s[k] is not None and not (k == "config" and s[k] in PRESETS):
            s[k] = str(Path(s[k]).resolve())
    s["data"] = [str(Path(d).resolve()) for d in args.data]
    s["betas"] = list(args.betas)
    s["model"] = dataclasses.asdict(cfg)
    return json.loads(json.dumps(s))


def differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Names of the fields whose values differ, nested ones as `model.unet.model_channels`."""
    out = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += differences(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            out.append(f"{prefix}{k}")
    return out


# ---- networks -------------------------------------------------------------------------------

def model_config(args) -> tuple[ModelConfig, dict[str, str]]:
    """The model config, and where each network comes from: "weights" or "new"."""
    wdir = Path(args.weights) if args.weights else None
    if wdir is not None and not wdir.is_dir():
        raise TrainError(f"--weights {wdir}: no such folder")
    raw = read_config(wdir) if wdir is not None else None
    given = None
    if args.config in PRESETS:
        given = PRESETS[args.config]
    elif args.config:
        try:
            given = ModelConfig.from_dict(json.loads(Path(args.config).read_text()))
        except (OSError, ValueError, TypeError) as e:
            raise TrainError(f"--config {args.config}: not a readable model config ({e})") from None
    if raw is None and given is None:
        raise TrainError("pass --weights DIR, --config FILE.json, or both")
    sections, sources = {}, {}
    for name in ("autoencoder", "unet", "text_encoder", "control"):
        key = SECTION[name]
        in_weights = wdir is not None and (wdir / FILES[name]).is_file()
        sources[name] = "weights" if in_weights else "new"
        from_weights = section(raw, name, str(wdir / "config.json")) if raw and key in raw else None
        if in_weights and from_weights is None:
            raise TrainError(f"{wdir / 'config.json'}: no '{key}' section for {FILES[name]}")
        if in_weights and given is not None and getattr(given, key) != from_weights:
            diff = differences(dataclasses.asdict(getattr(given, key)), dataclasses.asdict(from_weights))
            raise TrainError(f"--config {args.config} and --weights {wdir} disagree on the {key} "
                             f"config ({', '.join(diff)})")
        chosen = from_weights if in_weights or given is None else getattr(given, key)
        if chosen is None:
            raise TrainError(f"no config for the {key} network: pass --config FILE.json")
        sections.setdefault(key, chosen)
    cfg = ModelConfig(sections["autoencoder"], sections["unet"], sections["text"])
    for name in NEEDS[args.stage]:
        if sources[name] != "weights":
            where = f"--weights {wdir}" if wdir else "no --weights"
            raise TrainError(f"the {args.stage} stage trains on a frozen {name.replace('_', ' ')}, "
                             f"but {where} has no {FILES[name]}")
    if cfg.unet.context_dim != cfg.text.hidden_size:
        raise TrainError(f"the UNet's context_dim ({cfg.unet.context_dim}) differs from the text "
                         f"encoder's hidden_size ({cfg.text.hidden_size})")
    if cfg.unet.in_channels != cfg.autoencoder.embed_dim:
        raise TrainError(f"the UNet reads {cfg.unet.in_channels} latent channels but the "
                         f"autoencoder makes {cfg.autoencoder.embed_dim}")
    factor = 2 ** (len(cfg.autoencoder.ch_mult) - 1) * 2 ** (len(cfg.unet.channel_mult) - 1)
    if args.size % factor:
        raise TrainError(f"--size {args.size}: must be a multiple of {factor} for this model")
    return cfg, sources


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
    copied from the UNet (ControlNet's init); new networks are seeded by --seed."""
    nets = {}
    for name in ("autoencoder", "unet", "text_encoder"):
        c = getattr(cfg, SECTION[name])
        if sources[name] == "weights":
            nets[name] = load_network(name, c, Path(args.weights) / FILES[name])
        else:
            nets[name] = new_network(name, c, args.seed)
    if args.stage == "control":
        if sources["control"] == "weights":
            nets["control"] = load_network("control", cfg.unet, Path(args.weights) / FILES["control"])
        else:
            nets["control"] = new_network("control", cfg.unet, args.seed).copy_from_unet(nets["unet"])
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


# ---- the latent scale and the prompts -------------------------------------------------------

@torch.no_grad()
def latent_scale(autoencoder: Autoencoder, dataset, args, n: int = 64) -> float:
    """1 / std of z = mean + std · noise over the run's first n training samples (ldm's
    `scale_by_std`, which uses the first batch), so that the scaled latents have unit variance."""
    f = 2 ** (len(autoencoder.cfg.ch_mult) - 1)
    shape = (autoencoder.cfg.embed_dim, args.size // f, args.size // f)
    zs = []
    for first in range(0, n, 16):
        idx = list(range(first, min(first + 16, n)))
        image = torch.stack([dataset[i]["image"] for i in idx])
        _, _, post = sample_draws(args.seed, idx, shape)
        zs.append(encode_latent(autoencoder, image, post) / autoencoder.cfg.scale_factor)
    return 1.0 / torch.cat(zs).float().std().item()


class PromptCache:
    """τ(prompt) of a frozen text encoder, computed once per prompt, each prompt alone (so the
    values never depend on which prompts share a batch)."""

    def __init__(self, text_encoder, tokenizer: Tokenizer, device: torch.device):
        self.text_encoder, self.tokenizer, self.device, self.cache = text_encoder, tokenizer, device, {}

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        for p in prompts:
            if p not in self.cache:
                self.cache[p] = self.text_encoder(self.tokenizer([p]).to(self.device))[0]
        return torch.stack([self.cache[p] for p in prompts])  # (B, 77, context_dim)


# ---- the run --------------------------------------------------------------------------------

def setup_distributed(device_arg: str | None) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(device_arg or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainError(f"--device {device_arg}: CUDA is not available here")
        if device.index is None:
            device = torch.device("cuda", local if world > 1 else 0)
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def check_args(args) -> None:
    for flag, value, low in (("--steps", args.steps, 1), ("--batch-size", args.batch_size, 1),
                             ("--k", args.k, 1), ("--checkpoint-every", args.checkpoint_every, 1),
                             ("--defect-repeat", args.defect_repeat, 1),
                             ("--size", args.size, 8), ("--num-workers", args.num_workers, 0),
                             ("--log-every", args.log_every, 1)):
        if value < low:
            raise TrainError(f"{flag} must be at least {low}, got {value}")
    if not (args.defect_weight > 0 and math.isfinite(args.defect_weight)):
        raise TrainError(f"--defect-weight must be positive, got {args.defect_weight}")
    if not 0 <= args.p_empty_prompt <= 1:
        raise TrainError(f"--p-empty-prompt must be in [0, 1], got {args.p_empty_prompt}")
    if not (args.lr > 0 and math.isfinite(args.lr)):
        raise TrainError(f"--lr must be positive, got {args.lr}")
    if args.defect_repeat != 1 and args.stage not in ("text", "unet", "autoencoder"):
        raise TrainError(f"--defect-repeat: only the text, unet and autoencoder stages train on a "
                         f"mix of good and defect images (got --stage {args.stage})")
    if args.scale_factor is not None:
        if args.stage not in ("text", "unet"):
            raise TrainError(f"--scale-factor: only the text and unet stages choose the latent scale "
                             f"(the {args.stage} stage keeps the one in --weights)")
        if args.scale_factor != "auto":
            try:
                value = float(args.scale_factor)
            except ValueError:
                value = float("nan")
            if not (value > 0 and math.isfinite(value)):
                raise TrainError(f"--scale-factor must be a positive number or 'auto', got "
                                 f"{args.scale_factor!r}")


def train(args) -> int:
    check_args(args)
    rank, world, device = setup_distributed(args.device)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if rank == 0 else (lambda msg: None)
    if args.batch_size % world:
        raise TrainError(f"--batch-size {args.batch_size} is not divisible by the {world} processes")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise TrainError(f"--out {out}: exists and is not a folder")
    cfg, sources = model_config(args)
    run = settings(args, cfg)
    ckpt = out / CHECKPOINT
    state = read_checkpoint_state(ckpt) if ckpt.is_file() else None
    if state is not None:
        differ = [k for k in differences({**ADDED_SETTINGS, **state["run"]}, run)
                  if k.split(".")[0] not in MAY_CHANGE
                  and not (k == "model.autoencoder.scale_factor" and args.scale_factor is not None)]
        if differ:
            raise TrainError(f"--out {out}: holds a run with other settings ({', '.join(differ)}); "
                             "use those settings or another --out")
    cats, splits = read_data(args, out, rank, world, log)
    dataset = make_dataset(args, cats, splits)
    tokenizer, tok_source = get_tokenizer(args, cfg, all_prompts(cats))

    nets = build_networks(args, cfg, sources)
    if args.scale_factor is not None:
        scale = (latent_scale(nets["autoencoder"], dataset, args) if args.scale_factor == "auto"
                 else float(args.scale_factor))
        cfg = dataclasses.replace(cfg, autoencoder=dataclasses.replace(cfg.autoencoder,
                                                                       scale_factor=scale))
        nets["autoencoder"].cfg = cfg.autoencoder
        run["model"] = json.loads(json.dumps(dataclasses.asdict(cfg)))
        log(f"latent scale factor {scale:.6g} ({args.scale_factor})")
    trained = {name: nets[name] for name in TRAINS[args.stage]}
    named_params = [(f"{name}.{k}", p) for name, net in trained.items()
                    for k, p in net.named_parameters()]
    optimizer = torch.optim.AdamW([p for _, p in named_params], lr=args.lr,
                                  betas=tuple(args.betas), weight_decay=args.weight_decay)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, None: None}[args.autocast]
    scaler = torch.amp.GradScaler(device.type, enabled=args.autocast == "fp16")
    start = 0
    if state is not None:
        load_checkpoint(ckpt, state, trained, named_params, optimizer, scaler)
        start = state["step"]
    for net in nets.values():
        net.to(device)
    if args.grad_checkpoint:
        for name in TRAINS[args.stage] + (("unet",) if args.stage == "control" else ()):
            enable_grad_checkpointing(nets[name])

    ctrl_meta = control_metadata(cats, splits, args.defect) if args.stage == "control" else None
    if rank == 0:
        write_run_folder(out, args, cfg, run, sources, nets, TRAINS[args.stage], tokenizer,
                         tok_source)
        if state is None:
            write_trained(out, nets, TRAINS[args.stage], ctrl_meta)
    loss_rows = read_loss_log(out / "loss.csv", start) if state is not None else []
    if start >= args.steps:
        log(f"{out}: already trained to step {start} (--steps {args.steps}); nothing to do")
        if rank == 0:
            draw_loss_curve(loss_rows, out / "loss.png", f"{args.stage} stage loss")
        return 0

    # the callables of the loss: DDP wrappers around the trained networks when distributed
    def wrap(module):
        if world == 1:
            return module
        return nn.parallel.DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None)
    ae_loss = None
    if args.stage == "autoencoder":
        ae_loss = wrap(AutoencoderLoss(nets["autoencoder"], args.rec_loss, args.kl_weight,
                                       args.codebook_weight))
    calls = {name: wrap(net) for name, net in trained.items()} if ae_loss is None else {}
    prompts = None if args.stage == "text" else PromptCache(nets["text_encoder"], tokenizer, device)
    schedule = alphas_cumprod(NUM_TIMESTEPS)
    f = 2 ** (len(cfg.autoencoder.ch_mult) - 1)
    latent_shape = (cfg.autoencoder.embed_dim, args.size // f, args.size // f)
    local = args.batch_size // world
    autocast = torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    def step_loss(batch: dict, indices: list[int]) -> torch.Tensor:
        t, noise, post = sample_draws(args.seed, indices, latent_shape)
        image = batch["image"].to(device)
        noise, post = noise.to(device), post.to(device)
        weights = None  # per pixel for the autoencoder, per latent cell for the diffusion stages
        if args.defect_weight != 1:
            grid = image.shape[-2:] if args.stage == "autoencoder" else latent_shape[-2:]
            weights = defect_weights(batch["mask"].to(device), grid, args.defect_weight)
        if args.stage == "autoencoder":
            return ae_loss(image, post, weights)
        with torch.no_grad():
            z0 = encode_latent(nets["autoencoder"], image, post)
        if args.stage == "text":
            context = calls["text_encoder"](tokenizer(batch["prompt"]).to(device))
        else:
            context = prompts(batch["prompt"])
        if args.stage == "control":
            return denoising_loss(nets["unet"], z0, t, noise, context, schedule,
                                  control=calls["control"], hint=batch["hint"].to(device),
                                  control_context=prompts([""]).expand(len(indices), -1, -1),
                                  weights=weights)
        return denoising_loss(calls["unet"], z0, t, noise, context, schedule, weights=weights)

    last_checkpoint = start or None

    def checkpoint(step: int) -> None:
        nonlocal last_checkpoint
        last_checkpoint = step
        if rank == 0:
            save_checkpoint(ckpt, step, trained, named_params, optimizer, scaler, run)
            write_trained(out, nets, TRAINS[args.stage], ctrl_meta)
            loss_file.flush()

    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=StepBatches(start, args.steps, args.batch_size, rank, world),
        collate_fn=collate, num_workers=args.num_workers)
    loss_file = None
    if rank == 0:
        loss_file = (out / "loss.csv").open("w")
        loss_file.write("step,loss\n" + "".join(f"{s},{v!r}\n" for s, v in loss_rows))
    log(f"{args.stage} stage: {', '.join(TRAINS[args.stage])} "
        f"({sum(p.numel() for _, p in named_params) / 1e6:.2f}M parameters), steps {start}..{args.steps}, "
        f"batch {args.batch_size} on {world} x {device}, data {', '.join(c.root.name for c in cats)}")
    t_last, s_last, recent = time.perf_counter(), start, []
    try:
        for step, batch in enumerate(loader, start):
            indices = [step * args.batch_size + rank * local + j for j in range(local)]
            with autocast:
                loss = step_loss(batch, indices)
            value = loss.detach().float().clone()
            if world > 1:
                dist.all_reduce(value)
                value /= world
            value = value.item()
            if not math.isfinite(value):
                kept = (f"the last checkpoint (step {last_checkpoint}) is kept" if last_checkpoint
                        else "no checkpoint was written")
                raise TrainError(f"non-finite loss ({value}) at step {step + 1}; stopped, {kept} in {out}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            done = step + 1
            recent.append(value)
            if loss_file is not None:
                loss_file.write(f"{done},{value!r}\n")
                loss_rows.append((done, value))
            if done % args.log_every == 0 or done == args.steps or done == start + 1:
                now = time.perf_counter()
                rate = (done - s_last) / max(now - t_last, 1e-9)
                left = (args.steps - done) / rate
                log(f"step {done}/{args.steps}  loss {sum(recent) / len(recent):.5f}  "
                    f"{rate:.2f} steps/s  left {int(left // 3600)}:{int(left % 3600 // 60):02d}:"
                    f"{int(left % 60):02d}")
                t_last, s_last, recent = now, done, []
            if done % args.checkpoint_every == 0 or done == args.steps:
                checkpoint(done)
    finally:
        if loss_file is not None:
            loss_file.close()
    if rank == 0:
        draw_loss_curve(loss_rows, out / "loss.png", f"{args.stage} stage loss")
        log(f"wrote {out}: {', '.join(FILES[n] for n in TRAINS[args.stage])}, {CHECKPOINT}, "
            f"loss.csv, loss.png")
    if world > 1:
        dist.barrier()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return train(args)
    except (TrainError, DataError, WeightsError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
