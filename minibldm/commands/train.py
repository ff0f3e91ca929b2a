"""python -m minibldm.train: train one part of a minibldm model, with resume and torchrun.

AdaBLDM (Li et al. 2024, arXiv 2402.19330; the method in our words: docs/METHOD.md). Stages:

  control      the trimap branch: ζ (`input_hint_block`) and the trimap encoder ε̂_tri, on pairs
               made on the fly (a real defect's crop, random affine, pasted inside F; several
               --data folders alternate). Loss ‖ε − ε_θ(z_t, t, τ(y), ε̂_tri(z_t, ζ(Γ), t, τ("")))‖²
               (as in the reference code the branch reads the empty prompt's embedding, the UNet
               the prompt's: "a {object} with a {defect}", empty with p = 0.1). A new branch starts
               as ControlNet's: a copy of the UNet's time embedding, input and middle blocks, zero
               convs at zero. AdamW, lr 1e-5, betas (0.9, 0.999).
  unet         the paper's domain stage: ε_θ alone on the category's good images and its k training
               defect images, each with its prompt.
  text         τ and ε_θ together, to build a model from scratch: without an image tower (CLIP's
               contrastive pretraining) the denoising loss is the one signal that can give the
               prompt words a meaning for this UNet.
  autoencoder  Ω and Φ on the unet stage's images: L1 reconstruction (--rec-loss l2 for MSE) plus
               ldm's KL term (weight 1e-6, divided like the reconstruction by the pixel count) or,
               for VQ, the codebook and commitment loss; no LPIPS or GAN term (no pretrained
               network at hand). --defect-weight matters here: on the plain mean an autoencoder
               smooths thin scratches and cracks away, and then no later stage can draw them.

Diffusion stages draw t ~ U{0..999} and take z_0 = scale · (a posterior sample of Ω(x)). Every
random draw of a sample (t, ε, posterior noise, the pair) is a function of (--seed, the sample's
index in the run), so a run does not depend on how it is split across processes or restarts.

Where the networks come from:
  --weights DIR  a weights folder (config.json, <network>.safetensors, vocab.json + merges.txt),
                 possibly partial (no control, or a previous run of the autoencoder stage).
  --config FILE  a model config JSON (a weights or run folder's config.json) or a preset name
                 (tiny, sd15): networks that --weights lacks are built from it with seeded random
                 weights. A network in both must have the same config in both.
  A stage's frozen networks must come from --weights (control: autoencoder, UNet, text encoder;
  unet: autoencoder, text encoder; text: autoencoder). Without a tokenizer in --weights, one is
  trained on the data's prompts. A new autoencoder's latents are not unit variance: the first
  diffusion stage after it takes `--scale-factor auto` (1 / std of the training latents, ldm's
  `scale_by_std`), written into the run's config for every later stage. So a model is built from
  nothing by a chain of runs, each reading the previous run folder (weights/tiny/README.md has the
  exact recipe of the bundled model):
      train --stage autoencoder --config tiny --data A B ... --out runs/ae
      train --stage text  --weights runs/ae --scale-factor auto --data A B ... --out runs/text
      train --stage control --weights runs/text --data A B ... --out runs/control

The run folder (--out), its checkpoint and resuming: see minibldm/commands/runfolder.py.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from . import runfolder
from ..config import PRESETS, ModelConfig
from ..images import DataError
from ..io import WeightsError, remove_temporaries, write_text_atomic
from ..weights import FILES
from ..cli import (PRECISIONS, Parser, UsageError, add_max_pixels, apply_max_pixels,
                   check_writable, default_device)
from .trainpreview import Progress, preview_items, write_preview
from .losses import StepLoss
from .runfolder import (CHECKPOINT, TrainError, check_resumable, control_metadata,
                        draw_loss_curve, load_checkpoint, read_checkpoint_state, read_loss_log,
                        save_checkpoint, undo_if_failed, write_run_folder, write_trained)
from .trainnets import (TRAINS, build_networks, enable_grad_checkpointing, get_tokenizer,
                        model_config, with_latent_scale)
from .trainsamples import (StepBatches, all_prompts, check_data, collate, make_dataset, read_data,
                           split_notes, write_splits)

STAGES = ("control", "unet", "text", "autoencoder")
DEFAULT_LR = {"control": 1e-5, "unet": 1e-5, "text": 1e-4, "autoencoder": 1e-4}
PROG = "python -m minibldm.train"


def add_run_args(add) -> None:
    """How the run runs: checkpoints, previews, memory, precision, data loading, progress."""
    add("--checkpoint-every", type=int, default=500, metavar="K",
        help="write checkpoint.safetensors every K steps (and at the end)")
    add("--preview-every", type=int, default=500, metavar="K",
        help="every K steps (and at the start and the end) draw what the model makes "
        "now for 4 fixed training items into OUT/samples/step_N.png; 0: never")
    add("--grad-checkpoint", action="store_true",
        help="recompute block activations in the backward pass (saves memory)")
    add("--precision", choices=list(PRECISIONS), default="float32",
        help="the forward passes' precision: float32, or autocast to bfloat16 or "
        "float16 (a GPU's; float16 with a gradient scaler)")
    add("--num-workers", type=int, default=0, help="data loader processes")
    add("--log-every", type=int, default=10, help="progress line every N steps")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The arguments; --lr defaults by stage. The --help epilog is this docstring from "Stages"
    on, with runfolder's docstring in place of the line that points to it."""
    pointer = next(line for line in __doc__.splitlines() if "runfolder.py" in line)
    epilog = __doc__[__doc__.index("Stages"):].replace(
        pointer, runfolder.__doc__.split("\n\n", 1)[1].rstrip("\n"))
    p = Parser(prog=PROG, description=__doc__.split("\n\n")[0], epilog=epilog,
               renamed={"--autocast": "--precision (float32, bfloat16, float16)"}, examples="""\
  python -m minibldm.train --stage control --weights weights/sd15 --data data/magnetic_tile \\
      --texture --out runs/tile --steps 20000 --batch-size 4
  torchrun --nproc_per_node 4 -m minibldm.train --stage control --weights weights/sd15 \\
      --data data/magnetic_tile --out runs/tile --precision bfloat16""")
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
    add_max_pixels(p.add_argument)
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--size", type=int, default=256, help="image side the model trains at")
    p.add_argument("--k", type=int, default=10, help="real defect images per type for training")
    p.add_argument("--defect-repeat", type=int, default=1, metavar="R",
                   help="text, unet and autoencoder stages: each few-shot defect image counts R "
                        "times per epoch (default 1), so that a few defects among many good images "
                        "are seen often")
    p.add_argument("--defect-weight", type=float, default=1.0, metavar="W",
                   help="weight of the defect in the loss (default 1: the plain mean): of the "
                        "latent cells a defect mask touches in the denoising loss, of its pixels "
                        "in the reconstruction loss; W > 1 makes small and thin defects count")
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
    add_run_args(p.add_argument)
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
    s["model"] = dataclasses.asdict(cfg)
    return json.loads(json.dumps(s))  # tuples become lists


def setup_distributed(device_arg: str | None) -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment; joins the process group (NCCL
    on GPUs, gloo on the CPU) when there are several processes."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(device_arg or default_device())
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
    """Values argparse lets through but the run cannot use, as TrainErrors."""
    for flag, value, low in (("--steps", args.steps, 1), ("--batch-size", args.batch_size, 1),
                             ("--k", args.k, 1), ("--checkpoint-every", args.checkpoint_every, 1),
                             ("--defect-repeat", args.defect_repeat, 1),
                             ("--size", args.size, 8), ("--num-workers", args.num_workers, 0),
                             ("--log-every", args.log_every, 1),
                             ("--preview-every", args.preview_every, 0)):
        if value < low:
            raise TrainError(f"{flag} must be at least {low}, got {value}")
    for flag, value in (("--defect-weight", args.defect_weight), ("--lr", args.lr)):
        if not (value > 0 and math.isfinite(value)):
            raise TrainError(f"{flag} must be positive, got {value}")
    if not 0 <= args.p_empty_prompt <= 1:
        raise TrainError(f"--p-empty-prompt must be in [0, 1], got {args.p_empty_prompt}")
    if not all(0 <= b < 1 for b in args.betas):  # AdamW's own rule, said before anything is written
        raise TrainError(f"--betas must be in [0, 1), got {' '.join(map(str, args.betas))}")
    if not (0 <= args.weight_decay < float("inf")):
        raise TrainError(f"--weight-decay must be a number >= 0, got {args.weight_decay}")
    for flag, value in (("--kl-weight", args.kl_weight), ("--codebook-weight", args.codebook_weight)):
        if not (0 <= value < float("inf")):
            raise TrainError(f"{flag} must be a number >= 0, got {value}")
    check_writable(args.out, "--out")
    apply_max_pixels(args)
    if args.defect_repeat != 1 and args.stage not in ("text", "unet", "autoencoder"):
        raise TrainError(f"--defect-repeat: only the text, unet and autoencoder stages train on a "
                         f"mix of good and defect images (got --stage {args.stage})")
    if args.scale_factor is not None and args.stage not in ("text", "unet"):
        raise TrainError(f"--scale-factor: only the text and unet stages choose the latent scale "
                         f"(the {args.stage} stage keeps the one in --weights)")
    if args.scale_factor not in (None, "auto"):
        try:
            value = float(args.scale_factor)
        except ValueError:
            value = float("nan")
        if not (value > 0 and math.isfinite(value)):
            raise TrainError(f"--scale-factor must be a positive number or 'auto', got "
                             f"{args.scale_factor!r}")


@dataclass
class Run:
    """One training run as its steps see it. settings: what the checkpoint records; control_meta:
    control.safetensors' metadata (control stage only)."""
    args: argparse.Namespace
    out: Path
    rank: int
    world: int
    device: torch.device
    log: Callable[[str], None]
    nets: dict[str, nn.Module]
    settings: dict
    control_meta: dict[str, str] | None
    trained: tuple[str, ...]  # the networks the stage trains


class Optimizer:
    """AdamW over the parameters of the networks the stage trains, with fp16's gradient scaler;
    saved in and restored from the run's checkpoint."""

    def __init__(self, run: Run):
        args = run.args
        self.trained = {name: run.nets[name] for name in run.trained}
        self.named_params = [(f"{name}.{k}", p) for name, net in self.trained.items()
                             for k, p in net.named_parameters()]
        self.adamw = torch.optim.AdamW([p for _, p in self.named_params], lr=args.lr,
                                       betas=tuple(args.betas), weight_decay=args.weight_decay)
        self.scaler = torch.amp.GradScaler(run.device.type, enabled=args.precision == "float16")

    def step(self, loss: torch.Tensor) -> None:
        self.adamw.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.adamw)
        self.scaler.update()


def run_steps(run: Run, dataset, step_loss: StepLoss, optimizer: Optimizer, start: int,
              loss_rows: list[tuple[int, float]]) -> None:
    """Steps start .. --steps, each on the global batch of its index; every --checkpoint-every
    steps and at the end, the checkpoint, the trained networks and loss.csv (`loss_rows`: the
    rows kept from before a resume). A non-finite loss stops the run before its step."""
    args, out, rank, world = run.args, run.out, run.rank, run.world
    batches = StepBatches(start, args.steps, args.batch_size, rank, world)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, collate_fn=collate,
                                         num_workers=args.num_workers)
    dtype = PRECISIONS[args.precision]
    autocast = torch.autocast(run.device.type, dtype=dtype, enabled=dtype != torch.float32)
    progress, last_checkpoint = Progress(start, args.steps, args.log_every, run.log), start or None
    run.log(f"{args.stage} stage: {', '.join(run.trained)} "
            f"({sum(p.numel() for _, p in optimizer.named_params) / 1e6:.2f}M parameters), "
            f"steps {start}..{args.steps}, batch {args.batch_size} on {world} x {run.device}, "
            f"data {', '.join(Path(d).name for d in args.data)}")
    items = preview_items(dataset) if args.preview_every and rank == 0 else []
    if items and start == 0:
        write_preview(run, step_loss.tokenizer, items, 0)  # what the untrained model draws
    if rank == 0:  # the history up to the checkpoint, replaced atomically: a kill loses none of it
        write_text_atomic(out / "loss.csv",
                          "step,loss\n" + "".join(f"{s},{v!r}\n" for s, v in loss_rows))
    with (out / "loss.csv").open("a") if rank == 0 else open(os.devnull, "w") as loss_file:
        for step, batch in enumerate(loader, start):
            with autocast:
                loss = step_loss(batch, batches.indices(step))
            value = loss.detach().float().clone()  # the mean over the processes, for loss.csv
            if world > 1:
                dist.all_reduce(value)
                value /= world
            value = value.item()
            if not math.isfinite(value):
                kept = (f"the last checkpoint (step {last_checkpoint}) is kept" if last_checkpoint
                        else "no checkpoint was written")
                raise TrainError(f"non-finite loss ({value}) at step {step + 1}; stopped, {kept} in {out}")
            optimizer.step(loss)
            done = step + 1
            progress.add(done, value)
            loss_file.write(f"{done},{value!r}\n")
            loss_rows.append((done, value))
            if done % args.checkpoint_every == 0 or done == args.steps:
                last_checkpoint = done
                if rank == 0:  # loss.csv first: a checkpoint never gets ahead of its history
                    loss_file.flush()
                    save_checkpoint(out / CHECKPOINT, done, optimizer, run.settings)
                    write_trained(out, run.nets, run.trained, run.control_meta)
            if items and (done % args.preview_every == 0 or done == args.steps):
                write_preview(run, step_loss.tokenizer, items, done)
    if rank == 0:
        draw_loss_curve(loss_rows, out / "loss.png", f"{args.stage} stage loss")
        run.log(f"wrote {out}: {', '.join(FILES[n] for n in run.trained)}, {CHECKPOINT}, "
                f"loss.csv, loss.png" + (", samples/" if items else ""))


def train(args) -> int:
    """Train the stage to --steps: a new run in --out, or the one there continued."""
    check_args(args)
    rank, world, device = setup_distributed(args.device)
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if rank == 0 else (lambda msg: None)
    if args.batch_size % world:
        raise TrainError(f"--batch-size {args.batch_size} is not divisible by the {world} processes")
    with undo_if_failed(Path(args.out), enabled=rank == 0):
        return train_stage(args, Path(args.out), rank, world, device, log)


def train_stage(args, out: Path, rank: int, world: int, device: torch.device, log) -> int:
    """The stage, after the checks that need no data: read and check the data, then write the
    run folder and train (train's docstring)."""
    cfg, sources = model_config(args)
    record = settings(args, cfg)
    state = read_checkpoint_state(out / CHECKPOINT) if (out / CHECKPOINT).is_file() else None
    if state is not None:
        check_resumable(out, state, record, rescaled=args.scale_factor is not None)
    cats, splits = read_data(args, out)
    dataset = make_dataset(args, cats, splits)
    check_data(dataset)  # every file it reads, before anything is written
    split_notes(args, cats, splits, log)
    tokenizer, tok_source = get_tokenizer(args, cfg, all_prompts(cats))
    nets = build_networks(args, cfg, sources)
    if args.scale_factor is not None:
        cfg = with_latent_scale(args, cfg, nets["autoencoder"], dataset)
        record["model"] = json.loads(json.dumps(dataclasses.asdict(cfg)))
        log(f"latent scale factor {cfg.autoencoder.scale_factor:.6g} ({args.scale_factor})")
    run = Run(args, out, rank, world, device, log, nets, record,
              control_metadata(cats, splits, args.defect) if args.stage == "control" else None,
              TRAINS[args.stage])
    for net in nets.values():  # before the checkpoint: AdamW's state goes where its parameter is
        net.to(device)
    optimizer = Optimizer(run)
    start = load_checkpoint(out / CHECKPOINT, state, optimizer) if state is not None else 0
    if args.grad_checkpoint:
        for name in TRAINS[args.stage] + (("unet",) if args.stage == "control" else ()):
            enable_grad_checkpointing(nets[name])
    if rank == 0:  # the trained networks first appear with the first checkpoint
        remove_temporaries([out])  # a killed run's half-written files
        write_splits(out, cats, splits)
        write_run_folder(out, args, cfg, record, sources, nets, TRAINS[args.stage], tokenizer,
                         tok_source)
    loss_rows = read_loss_log(out / "loss.csv", start) if state is not None else []
    if start >= args.steps:
        log(f"{out}: already trained to step {start} (--steps {args.steps}); nothing to do")
        if rank == 0:
            draw_loss_curve(loss_rows, out / "loss.png", f"{args.stage} stage loss")
        return 0
    run_steps(run, dataset, StepLoss(run, tokenizer), optimizer, start, loss_rows)
    if world > 1:
        dist.barrier()
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
        return train(args)
    except (TrainError, DataError, WeightsError, UsageError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
