"""python -m minibldm.sample: make defect images with pixel-aligned masks (AdaBLDM).

    python -m minibldm.sample --data CATEGORY --weights RUN -n 200 --out OUT
    python -m minibldm.sample --images GOOD --defect-masks MASKS --object NAME --defect NAME \
        -n 10 --out OUT

With --data, every defect type the run's trimap branch was trained on (or --defect's), -n per
type, with masks drawn from the run's few-shot split only (split.json beside the branch). The
hand-wired flags make one defect type from any folders. For each output k: a good image x_OK,
its foreground F, a defect mask M* (a real few-shot mask, randomly rotated and scaled, placed
inside F; or the user's exact mask) and the trimap go through minibldm.Pipeline (minibldm/api.py:
Algorithms 1 and 2 at the model's size; the result is blended back into the full-resolution
image, whose size and aspect the outputs keep). Writes the MVTec AD layout that anomaly-detection
tools read, everything else under OUT/minibldm/:

    OUT/test/<defect>/<run>_<k>.png  OUT/ground_truth/<defect>/<run>_<k>_mask.png (0/255)
    OUT/minibldm/manifest.jsonl      one JSON line per image: its image and mask paths (relative
                                     to OUT), defect type, source image, placement, prompt,
                                     seeds, adaptation loss, background PSNR and change_in_mask
                                     (mean |image - x_OK| inside M*, levels of 255)
    OUT/minibldm/runs/<run>.json     the settings of run <run> (8 hex digits of their hash)
    OUT/minibldm/previews/<run>.jpg  good | trimap | before adaptation | after | mask overlay
                                     of the run's first 8 images (its rows, lossless: preview-rows/
                                     <run>_<n>.npy). Not PNG on purpose: anomalib's MVTec AD
                                     reader takes every *.png / *.PNG under OUT for a sample (and
                                     fails on one outside test/ and ground_truth/)
    OUT/minibldm/dropped.jsonl       with --min-change: the images dropped (no defect appeared)

<k> has 6 digits. Image k depends only on (seed, k) (and its defect type with --data), so
`--first K -n N` shards a job across processes, and under torchrun (`torchrun --nproc_per_node N
-m minibldm.sample ...`, with --device cuda one GPU each) rank r makes every N-th pending image
into the same OUT; a rerun with the same settings resumes (the same bytes as an uninterrupted
run); other settings write beside it under another <run>. Bad input:
one line on stderr, exit status 2, nothing written. With no arguments: the demo of the bundled
tiny model (demo.py).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
import torch

from ..api import DEFAULT_WEIGHTS, Job, Pipeline
from ..config import LATENT_MASKS, AdaptConfig, SampleConfig, Stages
from ..images import DataError, save_png, to_uint8
from ..io import WeightsError, atomic_path, remove_temporaries, write_text_atomic
from ..pipeline import image_seed
from ..cli import (PRECISIONS, Parser, UsageError, add_max_pixels, apply_max_pixels,
                   check_writable, default_device)
from .sampleplan import (category_sources, check_control_names, check_numbers, done_images,
                         hand_wired_sources, plan_source, run_id, run_settings)

KNOBS = SampleConfig()  # the method's knobs with their defaults, from minibldm/config.py
PREVIEW_ROWS = 8  # images drawn in a run's preview


def parse_args(argv):
    p = Parser(prog="python -m minibldm.sample", description=__doc__.split("\n\n")[0],
               renamed={"--steps": "--ddim-steps", "--dtype": "--precision"}, examples="""\
  python -m minibldm.sample                      # the demo of the bundled tiny model
  python -m minibldm.sample --data data/magnetic_tile --weights runs/tile -n 200 --out generated
  python -m minibldm.sample --data data/magnetic_tile --weights runs/tile -n 1000 --bulk --out big
  python -m minibldm.sample --images good/ --defect-masks masks/ --texture --object tile \\
      --defect crack -n 10 --out generated""")
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="minibldm weights folder or training run (default: the bundled tiny model)")
    io.add_argument("--control", help="control.safetensors of a training run, when --weights has none")
    io.add_argument("--data", help="a category (MVTec AD or plain layout): every defect type the "
                    "trimap branch was trained on, masks from the run's split.json")
    io.add_argument("--split", help="with --data: the few-shot split (default: split.json beside "
                    "the trimap branch)")
    io.add_argument("--images", help="folder of defect-free images x_OK")
    io.add_argument("--defect-masks", help="folder of real few-shot defect masks M_NG")
    io.add_argument("--exact-masks", help="folder of masks used as they are: one output per mask")
    io.add_argument("--good", help="use this good image for every output")
    io.add_argument("--resize-masks", action="store_true", help="accept exact masks whose size differs from their image")
    fg = io.add_mutually_exclusive_group()
    fg.add_argument("--foreground", help="folder of foreground masks (same stems as the images)")
    fg.add_argument("--texture", action="store_true", help="a surface: the foreground is the whole image")
    io.add_argument("--object", help='object name for the prompt "a {object} with a {defect}" '
                    "(--data: the branch's, else the category's)")
    io.add_argument("--defect", nargs="+", help="defect name (prompt and output folder); with "
                    "--data, the types to make (default: all the branch's)")
    io.add_argument("-n", type=int, help="number of images (with --data: per defect type)")
    io.add_argument("--first", type=int, default=0, help="index of the first image (to shard a job)")
    io.add_argument("--out", help="output folder (MVTec AD layout)")
    io.add_argument("--seed", type=int, default=0)
    add_method_args(p.add_argument_group("method").add_argument)
    run = p.add_argument_group("how it runs").add_argument
    run("--bulk", action="store_true", help="dataset scale, not the paper's Algorithm 2: no "
        "decoder adaptation, x_OK pasted outside a feathered mask (--adapt-steps 0 "
        "--paste-background), --batch-size 16 unless given; about 15x faster on a CPU "
        "(docs/RESULTS.md)")
    run("--batch-size", type=int, metavar="B", help="images sampled and adapted together, one "
        "decoder copy each (default 1, with --bulk 16); the same images as one at a time up to "
        "float rounding")
    run("--compile", action="store_true", help="torch.compile the UNet, the trimap branch (on a "
        "CPU frozen into the graph: a second copy of their weights, +4.7 GiB for SD 1.5 float32) "
        "and decoder adaptation (at --batch-size 1); the first image compiles, minutes on a CPU")
    add_max_pixels(run)
    run("--device", default=default_device(), help="cpu, cuda, cuda:1 ... (default: cuda when "
        "available, else cpu)")
    run("--precision", default="float32", choices=list(PRECISIONS), help="the networks' dtype; "
        "the decoder adaptation trains a float32 copy under autocast to it")
    run("--reference", action="store_true", help="run the pure reference path (minibldm/adapt.py's "
        "loop, no CPU routes); the same images up to float rounding, slower")
    run("--quiet", action="store_true")
    return p.parse_args(argv)


def add_method_args(add) -> None:
    """The knobs of Algorithms 1 and 2, their defaults read from config.SampleConfig."""
    S, A = KNOBS.stages, KNOBS.adapt
    add("--size", type=int, help="image size the model works at (default: the weights' or 256)")
    add("--ddim-steps", type=int, metavar="N", help=f"DDIM steps (default: the reference "
        f"code's {S.steps}); the stage boundaries below scale with it unless given")
    add("--latent-start", type=int, help="first latent-editing step (default: the reference's "
        f"{S.latent_start} of {S.steps}, scaled to --ddim-steps)")
    add("--latent-stop", type=int, help="latent editing before this step (default: the "
        f"reference's {S.latent_stop} of {S.steps}, scaled)")
    add("--image-start", type=int, help="first image-editing step (default: the reference's "
        f"{S.image_start} of {S.steps}, scaled)")
    add("--stage-lengths", type=int, nargs=3, metavar=("FREE", "LATENT", "IMAGE"),
        help="consecutive stage lengths instead of the four flags above (the paper's: 50 30 5)")
    add("--latent-mask", choices=LATENT_MASKS, default=KNOBS.latent_mask,
        help="how M* shrinks to the latent grid: nearest (reference code) or cover (every latent "
             "cell the mask touches; keeps defects thinner than 8 px)")
    add("--guidance", type=float, default=KNOBS.guidance, help="text-only classifier-free guidance")
    add("--eta", type=float, default=KNOBS.eta, help="DDIM eta")
    add("--translate-only", action="store_true",
        help="place masks without rotation or scaling (reference test script)")
    add("--adapt-steps", type=int, default=A.steps, help="decoder adaptation steps T_ft (0: none)")
    add("--adapt-lr", type=float, default=A.lr)
    add("--adapt-blocks", type=int, metavar="N", help="faster, not the paper's method: adapt only "
        "the decoder's output head and last N upsampling levels (default: the whole decoder)")
    add("--bg-weight", type=float, default=A.bg_weight,
        help="weight of the background term (reference: %(default)s)")
    add("--fg-weight", type=float, default=A.fg_weight,
        help="weight of the defect-region term (reference code: %(default)s; the paper's "
             "lambda_con). 100 stops the adaptation from erasing small or thin defects")
    add("--paste-background", action="store_true", help="copy x_OK as is outside a feathered mask")
    add("--zoom", type=float, default=1.0, help="generate in a window of 1/zoom of the image's "
        "height and width around M* (default 1: the whole image, the scale training sees)")
    add("--min-change", type=float, default=0.0, metavar="T", help="labels that tell the truth: "
        "redraw (new noise, same x_OK and mask) an image whose mean change inside its mask is "
        "under T levels of 255, up to --redraws times, then drop it (listed in dropped.jsonl); "
        "default 0: keep every image")
    add("--redraws", type=int, default=3, metavar="R", help="redraws per image under --min-change (3)")


def stages_from_args(args) -> Stages:
    """--stage-lengths, or --ddim-steps with the reference boundaries scaled to it where the
    boundary flags are not given; --stage-lengths with any of those is refused."""
    given = {"--ddim-steps": args.ddim_steps, "--latent-start": args.latent_start,
             "--latent-stop": args.latent_stop, "--image-start": args.image_start}
    given = {flag: v for flag, v in given.items() if v is not None}
    if args.stage_lengths and given:
        raise UsageError(f"--stage-lengths sets every stage: not with {next(iter(given))}")
    if args.stage_lengths:
        return Stages.from_lengths(*args.stage_lengths)
    base = Stages.scaled(args.ddim_steps if args.ddim_steps is not None else KNOBS.stages.steps)
    return Stages(base.steps, *(b if v is None else v for b, v in (
        (base.latent_start, args.latent_start), (base.latent_stop, args.latent_stop),
        (base.image_start, args.image_start))))


def check_args(args) -> SampleConfig:
    check_numbers(args)
    apply_max_pixels(args)
    if args.n is None and not args.exact_masks:
        raise UsageError("-n is required (the number of images)")
    if args.n is None:
        args.n = 10 ** 9  # every exact mask
    if args.bulk:
        if args.adapt_steps not in (0, KNOBS.adapt.steps):
            raise UsageError(f"--bulk skips the decoder adaptation: not with --adapt-steps {args.adapt_steps}")
        args.adapt_steps, args.paste_background = 0, True
    if args.batch_size is None:
        args.batch_size = 16 if args.bulk else 1
    if args.out is None:
        raise UsageError("--out is required")
    if args.data:
        for name in ("images", "defect_masks", "exact_masks", "good", "foreground"):
            if getattr(args, name):
                raise UsageError(f"--data reads the category's images and the run's masks: not "
                                 f"with --{name.replace('_', '-')}")
        if not Path(args.data).is_dir():
            raise UsageError(f"--data {args.data}: no such folder")
    else:
        if args.split:
            raise UsageError("--split goes with --data")
        for name in ("images", "object", "defect"):
            if getattr(args, name) is None:
                raise UsageError(f"--{name} is required (or --data CATEGORY)")
        if len(args.defect) > 1:
            raise UsageError(f"--defect: one name without --data, got {len(args.defect)}")
        if not args.defect_masks and not args.exact_masks:
            raise UsageError("--defect-masks (few-shot masks to sample from) or --exact-masks is required")
    if not (args.zoom >= 1 and args.zoom < float("inf")):
        raise UsageError(f"--zoom must be at least 1, got {args.zoom:g}")
    if args.adapt_blocks is not None and args.adapt_blocks < 0:
        raise UsageError(f"--adapt-blocks must be >= 0, got {args.adapt_blocks}")
    check_writable(args.out, "--out")
    if args.good and not Path(args.good).is_file():
        raise UsageError(f"--good {args.good}: no such file")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available here")
    if args.reference and (args.compile or args.adapt_blocks is not None):
        raise UsageError("--reference runs the reference path: not with --compile or --adapt-blocks")
    try:
        stages = stages_from_args(args)
        return SampleConfig(stages, args.guidance, args.eta, args.latent_mask,
                            AdaptConfig(args.adapt_steps, args.adapt_lr, args.fg_weight,
                                        args.bg_weight))
    except ValueError as e:
        raise UsageError(str(e)) from None


def main(argv=None) -> int:
    """`python -m minibldm.sample ARGS` (minibldm/sample.py runs the demo when there are none)."""
    try:
        return generate(parse_args(argv))
    except (UsageError, DataError, WeightsError) as e:
        print(f"minibldm.sample: error: {e}", file=sys.stderr)
        return 2


def load_pipeline(args, cfg: SampleConfig) -> Pipeline:
    """minibldm.Pipeline on the weights and their trimap branch (or --control's)."""
    try:
        return Pipeline.load(args.weights, control=args.control, device=args.device,
                             dtype=PRECISIONS[args.precision], cfg=cfg, size=args.size,
                             reference=args.reference, compile=args.compile,
                             adapt_blocks=args.adapt_blocks,
                             paste_background=args.paste_background, zoom=args.zoom)
    except ValueError as e:
        raise UsageError(f"--size {e}") from None
    except WeightsError as e:
        if "trimap branch" in str(e):
            raise UsageError(f"{e}; pass --control") from None
        raise


def generate(args) -> int:
    """Plan every image (reading all input), then sample the pending ones in batches."""
    cfg = check_args(args)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and args.device == "cuda":  # torchrun: one GPU per process
        args.device = f"cuda:{os.environ.get('LOCAL_RANK', rank)}"
    tag = f"[rank {rank}/{world}] " if world > 1 else ""
    log = (lambda *a, **k: None) if args.quiet else (
        lambda s, **k: print(("\r" + tag + s[1:]) if s.startswith("\r") else tag + s,
                             file=sys.stderr, **k))
    pipe = load_pipeline(args, cfg)
    control = Path(args.control) if args.control else Path(args.weights) / "control.safetensors"
    sources = category_sources(args, control) if args.data else hand_wired_sources(args)
    if not args.data:
        check_control_names(control, args.defect[0])
    settings = run_settings(args, cfg.stages, pipe.size)
    run, out = run_id(settings), Path(args.out)
    done = done_images(out, run)
    plans, binary = [], True
    for source in sources:
        planned, ok = plan_source(args, source)
        plans, binary = plans + [(source, p) for p in planned], binary and ok
    if not binary:  # said even with --quiet: it is about the user's data
        print("minibldm.sample: note: some masks were not binary; thresholded at 127",
              file=sys.stderr)

    # -- from here on, OUT is written --
    if world == 1:  # a killed run's half-written files (under torchrun, others may be writing)
        remove_temporaries([out / "test", out / "ground_truth", out / "minibldm"])
    write_text_atomic(out / "minibldm" / "runs" / f"{run}.json", json.dumps(settings, indent=2) + "\n")
    for source in sources:
        pipe.encode(source.prompt)
    pipe.models.text_encoder = None  # every prompt is encoded: its weights (0.5 GB at SD size) are freed
    start, written = time.time(), 0
    pending = [(n, src, plan) for n, (src, plan) in enumerate(plans)  # torchrun: every world-th
               if n % world == rank and (src.folder, plan["k"]) not in done]  # of all, not of the
    # pending: another rank may have written some already when this one reads the manifest
    for c in range(0, len(pending), args.batch_size):
        chunk = pending[c:c + args.batch_size]
        written += sample_chunk(args, pipe, run, chunk, len(plans), log)
        log(progress_line(c + len(chunk), len(pending), time.time() - start))
    contact_sheet(out / "minibldm", run)  # the run's, however many calls made it
    dropped = len(pending) - written
    log(f"wrote {written} images to {out} (run {run})"
        + (f"; dropped {dropped} (minibldm/dropped.jsonl)" if dropped else ""))
    return 0


def progress_line(done: int, total: int, seconds: float) -> str:
    """"120/1000 images, 48.0 images/min, about 18 min left" (this run's rate so far)."""
    rate = done / max(seconds, 1e-9) * 60
    left = (total - done) / rate * 60 if rate > 0 else float("inf")
    when = f"{left / 60:.0f} min" if left >= 90 else f"{left:.0f} s"
    return f"{done}/{total} images, {rate:.1f} images/min, about {when} left"


def draw_chunk(args, pipe: Pipeline, run: str, chunk: list, total: int, log) -> list[dict]:
    """Make one batch of planned images: chunk holds (n, source, plan, attempt), attempt 0 the
    first draw of output k and a > 0 its a-th redraw (the same x_OK and M*, new noise). Returns
    per image its result, its manifest record and its preview row."""
    t0 = time.time()
    seeds = [image_seed(args.seed, plan["k"], src.stream) for _, src, plan, _ in chunk]
    jobs = [Job(plan["image"], plan["mask"], plan["fg"], src.prompt, s + 1 + attempt)
            for (_, src, plan, attempt), s in zip(chunk, seeds)]
    which = f"image {chunk[0][0] + 1}" + (f"-{chunk[-1][0] + 1}" if len(chunk) > 1 else "")
    which += f"/{total}"
    steps, adapt_steps = pipe.cfg.stages.steps, pipe.cfg.adapt.steps

    def progress(i, t, z, x0):
        if (i + 1) % 10 == 0 or i + 1 == steps:
            log(f"\r{which}: step {i + 1}/{steps}", end="")

    def adapt_progress(step, loss):
        if step % 20 == 0 or step == adapt_steps - 1:
            log(f"\r{which}: adaptation {step + 1}/{adapt_steps} loss {loss:.5f}", end="")

    results = pipe.run(jobs, progress, adapt_progress)
    seconds, drawn = (time.time() - t0) / len(chunk), []
    for (n, src, plan, attempt), s, res in zip(chunk, seeds, results):
        name = f"{run}_{plan['k']:06d}"
        record = dict(run=run, index=plan["k"], defect=src.folder,
                      image=f"test/{src.folder}/{name}.png",
                      mask=f"ground_truth/{src.folder}/{name}_mask.png", seed=args.seed,
                      image_seed=s, attempt=attempt, source=str(plan["good"]),
                      placement=plan["info"], **res.record)  # no timing: the same bytes
        good, hint, before, after, mask = res.preview              # on every machine
        drawn.append(dict(n=n, record=record, result=res, seconds=seconds,
                          row=[good, hint, before, after, overlay(after, mask)]))
    return drawn


def write_image(out: Path, item: dict, total: int, log) -> None:
    """One image, its mask and its manifest line (the line last: it marks the image done)."""
    record, res = item["record"], item["result"]
    save_png(res.image, out / record["image"])
    save_png(res.mask, out / record["mask"])
    with (out / "minibldm" / "manifest.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")
    log(f"\rimage {item['n'] + 1}/{total}: done in {item['seconds']:.1f}s, background PSNR "
        f"{record['psnr_bg_before']:.1f} -> {record['psnr_bg_after']:.1f} dB, change in mask "
        f"{record['change_in_mask']:.1f}" + " " * 20)


def sample_chunk(args, pipe: Pipeline, run: str, chunk: list, total: int, log) -> list:
    """Draw one batch, redraw (as a batch) each image that changed less than --min-change inside
    its mask, up to --redraws times; write the images that passed, list the others in
    OUT/minibldm/dropped.jsonl. Returns the number of images written."""
    out = Path(args.out)
    todo, written = [(n, src, plan, 0) for n, src, plan in chunk], 0
    while todo:
        redo = []
        for (n, src, plan, attempt), item in zip(todo, draw_chunk(args, pipe, run, todo, total, log)):
            if item["record"]["change_in_mask"] >= args.min_change:
                if n < PREVIEW_ROWS:  # the run's preview row, kept for the sheet, before the image
                    with atomic_path(out / "minibldm" / "preview-rows" / f"{run}_{n:06d}.npy") as tmp:
                        with open(tmp, "wb") as f:
                            np.save(f, np.concatenate([to_uint8(t) for t in item["row"]], axis=1))
                write_image(out, item, total, log)
                written += 1
            elif attempt < args.redraws:
                redo.append((n, src, plan, attempt + 1))
            else:
                with (out / "minibldm" / "dropped.jsonl").open("a") as f:
                    f.write(json.dumps(item["record"]) + "\n")
                log(f"\rimage {n + 1}/{total}: dropped, its mask changed by "
                    f"{item['record']['change_in_mask']:.1f} < --min-change {args.min_change:g} "
                    f"in {args.redraws + 1} draws" + " " * 20)
        todo = redo
    return written


def overlay(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The image with the mask tinted red."""
    red = torch.tensor([1.0, -1.0, -1.0], device=image.device, dtype=image.dtype)[:, None, None]
    return torch.where(mask > 0.5, 0.5 * image + 0.5 * red, image)


def contact_sheet(meta: Path, run: str) -> None:
    """META/previews/<run>.jpg: the rows META/preview-rows/<run>_*.npy (good | trimap | before |
    after | overlay of the run's first PREVIEW_ROWS images) one below the other: the same sheet
    after any resume."""
    rows = sorted((meta / "preview-rows").glob(f"{run}_*.npy"))
    if rows:
        sheet = np.concatenate([np.load(r, allow_pickle=False) for r in rows], axis=0)
        with atomic_path(meta / "previews" / f"{run}.jpg") as tmp:
            Image.fromarray(sheet).save(tmp, format="JPEG", quality=95)
