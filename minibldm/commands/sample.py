"""python -m minibldm.sample: make defect images with pixel-aligned masks (AdaBLDM).

For each output k: a good image x_OK, its foreground F, a defect mask M* (a real few-shot mask,
randomly rotated and scaled, placed inside F; or the user's exact mask) and the trimap Γ go
through minibldm/pipeline.py (Algorithms 1 and 2). Writes, in the MVTec AD layout so that
anomaly-detection tools read it directly:

    OUT/test/<defect>/000.png  OUT/ground_truth/<defect>/000_mask.png (0/255)
    OUT/manifest.jsonl         one JSON line per image (seed, source, placement, prompt, stages,
                               adaptation loss before/after, background PSNR against x_OK,
                               change_in_mask: mean |image - x_OK| inside M*, levels of 255)
    OUT/preview.png            good | trimap | before adaptation | after | mask overlay
    OUT/dropped.jsonl          with --min-change: the images dropped (no defect appeared)
    OUT/run.json               the settings; a rerun with the same OUT resumes, a different one is refused

Image k depends only on (seed, k), so `--first K -n N` shards a job across processes and a
resumed run gives the same bytes as an uninterrupted one. Bad input: one line on stderr, exit
status 2, nothing written. With no arguments: the demo of the bundled tiny model (demo.py).
"""
from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from .. import adapt, fast
from ..config import LATENT_MASKS, AdaptConfig, SampleConfig, Stages
from ..images import DataError, read_image, save_png, to_tensor, to_uint8
from ..io import WeightsError
from ..masks import trimap
from ..pipeline import (defect_image, encode_prompt, image_seed, paste_background, per_image_noise,
                        prompt, psnr)
from ..weights import load, read_config
from .common import Parser, UsageError
from .sampleplan import plan_images

DEFAULT_WEIGHTS = Path(__file__).resolve().parents[2] / "weights" / "tiny"
KNOBS = SampleConfig()  # the method's knobs with their defaults, from minibldm/config.py
PREVIEW_ROWS = 8  # images drawn in preview.png
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv):
    p = Parser(prog="python -m minibldm.sample", description=__doc__.split("\n\n")[0])
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="minibldm weights folder (default: the bundled tiny model)")
    io.add_argument("--control", help="control.safetensors of a training run, when --weights has none")
    io.add_argument("--images", help="folder of defect-free images x_OK")
    io.add_argument("--defect-masks", help="folder of real few-shot defect masks M_NG")
    io.add_argument("--exact-masks", help="folder of masks used as they are: one output per mask")
    io.add_argument("--good", help="use this good image for every output")
    io.add_argument("--resize-masks", action="store_true", help="accept exact masks whose size differs from their image")
    fg = io.add_mutually_exclusive_group()
    fg.add_argument("--foreground", help="folder of foreground masks (same stems as the images)")
    fg.add_argument("--texture", action="store_true", help="a surface: the foreground is the whole image")
    io.add_argument("--object", help='object name for the prompt "a {object} with a {defect}"')
    io.add_argument("--defect", help="defect name (prompt and output folder)")
    io.add_argument("-n", type=int, help="number of images")
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
    run("--device", default="cpu", help="cpu or cuda")
    run("--dtype", default="float32", choices=sorted(DTYPES), help="the networks' dtype; the "
        "decoder adaptation trains a float32 copy under autocast to it (default float32)")
    run("--reference", action="store_true", help="run the pure reference path (minibldm/adapt.py's "
        "loop, no CPU routes); the same images up to float rounding, slower")
    run("--quiet", action="store_true")
    return p.parse_args(argv)


def add_method_args(add) -> None:
    """The knobs of Algorithms 1 and 2, their defaults read from config.SampleConfig."""
    S, A = KNOBS.stages, KNOBS.adapt
    add("--size", type=int, help="image size the model works at (default: the weights' or 256)")
    add("--steps", type=int, default=S.steps, help="DDIM steps N (reference: %(default)s)")
    add("--latent-start", type=int, default=S.latent_start,
        help="first latent-editing step (reference: %(default)s)")
    add("--latent-stop", type=int, default=S.latent_stop,
        help="latent editing before this step (reference: %(default)s)")
    add("--image-start", type=int, default=S.image_start,
        help="first image-editing step (reference: %(default)s)")
    add("--stage-lengths", type=int, nargs=3, metavar=("FREE", "LATENT", "IMAGE"),
        help="consecutive stage lengths instead; the paper's are 50 30 5")
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
    add("--min-change", type=float, default=0.0, metavar="T", help="labels that tell the truth: "
        "redraw (new noise, same x_OK and mask) an image whose mean change inside its mask is "
        "under T levels of 255, up to --redraws times, then drop it (listed in dropped.jsonl); "
        "default 0: keep every image")
    add("--redraws", type=int, default=3, metavar="R", help="redraws per image under --min-change (3)")


def check_args(args) -> SampleConfig:
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
    for flag, value in (("-n", args.n), ("--batch-size", args.batch_size)):
        if value <= 0:
            raise UsageError(f"{flag} must be positive, got {value}")
    for name in ("images", "object", "defect", "out"):
        if getattr(args, name) is None:
            raise UsageError(f"--{name} is required")
    if not args.defect_masks and not args.exact_masks:
        raise UsageError("--defect-masks (few-shot masks to sample from) or --exact-masks is required")
    if not 0 <= args.min_change <= 255 or args.redraws < 0:
        raise UsageError(f"--min-change must be in 0..255 and --redraws >= 0 (got "
                         f"{args.min_change:g}, {args.redraws})")
    if args.adapt_blocks is not None and args.adapt_blocks < 0:
        raise UsageError(f"--adapt-blocks must be >= 0, got {args.adapt_blocks}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out}: exists and is not a folder")
    if args.good and not Path(args.good).is_file():
        raise UsageError(f"--good {args.good}: no such file")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available here")
    if args.reference and (args.compile or args.adapt_blocks is not None):
        raise UsageError("--reference runs the reference path: not with --compile or --adapt-blocks")
    try:
        stages = (Stages.from_lengths(*args.stage_lengths) if args.stage_lengths
                  else Stages(args.steps, args.latent_start, args.latent_stop, args.image_start))
        return SampleConfig(stages, args.guidance, args.eta, args.latent_mask,
                            AdaptConfig(args.adapt_steps, args.adapt_lr, args.fg_weight,
                                        args.bg_weight))
    except ValueError as e:
        raise UsageError(str(e)) from None


def check_control_names(path: Path, defect: str) -> None:
    """Refuse a defect the control branch was not trained for, when its file records names."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if "defects" in meta:
        names = json.loads(meta["defects"])
        names += list(json.loads(meta.get("defect_names", "{}")).values())  # the prompt's words
        for per_object in json.loads(meta.get("objects", "{}")).values():
            names += list(per_object.values())
        if names and defect not in names and defect.replace(" ", "_") not in names:
            raise UsageError(f"{path}: trained for defects {', '.join(names)}, not '{defect}'")


def run_settings(args, stages: Stages, size: int) -> dict:
    """What run.json records: a rerun into the same --out must match it to resume."""
    keys = ("weights", "control", "images", "defect_masks", "exact_masks", "good", "foreground",
            "texture", "object", "defect", "seed", "guidance", "eta", "translate_only",
            "adapt_steps", "adapt_lr", "adapt_blocks", "bg_weight", "fg_weight", "paste_background",
            "dtype", "latent_mask", "min_change", "redraws")
    return {**{k: getattr(args, k) for k in keys}, "size": size, "stages": vars(stages)}


def main(argv=None) -> int:
    """`python -m minibldm.sample ARGS` (minibldm/sample.py runs the demo when there are none)."""
    try:
        return generate(parse_args(argv))
    except (UsageError, DataError, WeightsError) as e:
        print(f"minibldm.sample: error: {e}", file=sys.stderr)
        return 2


def load_models(args):
    """The weights with a trimap branch for this run's defect, with the fast layer applied
    (unless --reference) and the UNet and branch compiled with --compile."""
    models = load(args.weights, device=args.device, dtype=DTYPES[args.dtype], control=args.control)
    if models.control is None:
        raise UsageError(f"{args.weights}: has no trimap branch (control.safetensors); pass --control")
    check_control_names(Path(args.control) if args.control else Path(args.weights) / "control.safetensors",
                        args.defect)
    if not args.reference:
        fast.optimize(models)
    if args.compile:
        dev = torch.device(args.device)
        models.unet = fast.compile_frozen(models.unet, dev)
        models.control = fast.compile_frozen(models.control, dev)
    return models


def prepare_out(args, settings: dict) -> set[int]:
    """Refuse an --out holding another run; the indices already done when it holds this one."""
    out = Path(args.out)
    if (out / "run.json").is_file():
        before = json.loads((out / "run.json").read_text())
        differ = sorted(k for k in settings if before.get(k) != json.loads(json.dumps(settings[k])))
        if differ:
            raise UsageError(f"--out {out}: holds a run with other settings ({', '.join(differ)}); "
                             "use another folder")
    lines = [line for name in ("manifest.jsonl", "dropped.jsonl") if (out / name).is_file()
             for line in (out / name).read_text().splitlines()]
    return {json.loads(line)["index"] for line in lines if line.strip()}


def generate(args) -> int:
    """Plan every image (reading all input), then sample the pending ones in batches."""
    cfg = check_args(args)
    log = (lambda *a, **k: None) if args.quiet else (lambda *a, **k: print(*a, file=sys.stderr, **k))
    models = load_models(args)
    size = args.size or read_config(args.weights).get("image_size", 256)
    if size % models.config.size_multiple:
        raise UsageError(f"--size {size}: must be a multiple of {models.config.size_multiple} "
                         "for these weights")
    settings = run_settings(args, cfg.stages, size)
    done = prepare_out(args, settings)
    plans, binary = plan_images(args, size)
    if not binary:  # said even with --quiet: it is about the user's data
        print("minibldm.sample: note: some masks were not binary; thresholded at 127",
              file=sys.stderr)

    # -- from here on, OUT is written --
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps(settings, indent=2) + "\n")
    text = prompt(args.object, args.defect)
    cond, uncond = encode_prompt(models, text)
    models.text_encoder = None  # one prompt per run: its weights (0.5 GB at SD size) are freed here
    adapt_fn = adapt.adapt_decoder if args.reference else functools.partial(
        fast.adapt_decoder, blocks=args.adapt_blocks, compile=args.compile)
    rows, start, written = [], time.time(), 0
    pending = [(n, plan) for n, plan in enumerate(plans) if plan["k"] not in done]
    for c in range(0, len(pending), args.batch_size):
        chunk = pending[c:c + args.batch_size]
        new = sample_chunk(args, models, cfg, chunk, len(plans), (cond, uncond, text), adapt_fn, log)
        written, rows = written + len(new), (rows + new)[:PREVIEW_ROWS]  # keep what is drawn
        log(progress_line(c + len(chunk), len(pending), time.time() - start))
    if rows:
        contact_sheet(rows, out / "preview.png")
    dropped = len(pending) - written
    log(f"wrote {written} images to {out}" + (f"; dropped {dropped} (dropped.jsonl)" if dropped else ""))
    return 0


def progress_line(done: int, total: int, seconds: float) -> str:
    """"120/1000 images, 48.0 images/min, about 18 min left" (this run's rate so far)."""
    rate = done / max(seconds, 1e-9) * 60
    left = (total - done) / rate * 60 if rate > 0 else float("inf")
    when = f"{left / 60:.0f} min" if left >= 90 else f"{left:.0f} s"
    return f"{done}/{total} images, {rate:.1f} images/min, about {when} left"


def draw_chunk(args, models, cfg: SampleConfig, chunk: list, total: int, text: tuple,
               adapt_fn, log) -> list[dict]:
    """Sample and adapt one batch of planned images: chunk holds (n, plan, attempt), attempt 0
    the first draw of output k and a > 0 its a-th redraw (the same x_OK and M*, new noise).
    Returns per image its tensors, its manifest record and its preview row."""
    t0 = time.time()
    cond, uncond, prompt_text = text
    dev, dt = torch.device(args.device), DTYPES[args.dtype]
    gens = [torch.Generator(dev).manual_seed(image_seed(args.seed, plan["k"]) + 1 + attempt)
            for _, plan, attempt in chunk]
    x_ok = torch.stack([to_tensor(read_image(plan["good"]), plan["mask"].shape[-1])
                        for _, plan, _ in chunk]).to(dev, dt)
    mask = torch.stack([plan["mask"][None] for _, plan, _ in chunk]).to(dev, dt)
    hint = torch.stack([trimap(plan["mask"], plan["fg"]) for _, plan, _ in chunk]).to(dev, dt)
    which = f"image {chunk[0][0] + 1}" + (f"-{chunk[-1][0] + 1}" if len(chunk) > 1 else "")
    which += f"/{total}"
    steps, adapt_steps = cfg.stages.steps, cfg.adapt.steps

    def progress(i, t, z, x0):
        if (i + 1) % 10 == 0 or i + 1 == steps:
            log(f"\r{which}: step {i + 1}/{steps}", end="")

    def adapt_progress(step, loss):
        if step % 20 == 0 or step == adapt_steps - 1:
            log(f"\r{which}: adaptation {step + 1}/{adapt_steps} loss {loss:.5f}", end="")

    b = len(chunk)
    res = defect_image(models, x_ok, mask, hint, cond.expand(b, -1, -1), uncond.expand(b, -1, -1),
                       per_image_noise(gens), cfg, adapt_fn, progress, adapt_progress)
    before, after = res["before"], res["after"]
    if args.paste_background:
        after = paste_background(after, x_ok, mask)
    seconds, drawn = (time.time() - t0) / b, []
    for j, (n, plan, attempt) in enumerate(chunk):
        k, losses, bg = plan["k"], res["losses"][j], 1 - mask[j:j + 1]
        image, region = to_uint8(after[j]), plan["mask"].numpy() > 0.5
        record = dict(index=k, seed=args.seed, image_seed=image_seed(args.seed, k),
                      attempt=attempt, source=str(plan["good"]), placement=plan["info"],
                      prompt=prompt_text, stages=vars(cfg.stages), adapt_loss_before=losses[0],
                      adapt_loss_after=losses[-1],
                      psnr_bg_before=psnr(before[j:j + 1], x_ok[j:j + 1], bg),
                      psnr_bg_after=psnr(after[j:j + 1], x_ok[j:j + 1], bg),
                      change_in_mask=round(float(np.abs(image[region].astype(np.float64)
                                                        - to_uint8(x_ok[j])[region]).mean()), 3),
                      seconds=round(seconds, 2))
        drawn.append(dict(n=n, plan=plan, attempt=attempt, image=image, record=record,
                          row=[x_ok[j], hint[j] * 2 - 1, before[j], after[j],
                               overlay(after[j], mask[j])]))
    return drawn


def write_image(args, item: dict, total: int, log) -> None:
    """One drawn image, its mask and its manifest line (the line last: it marks the image done)."""
    out, folder, k, record = Path(args.out), args.defect.replace(" ", "_"), item["plan"]["k"], item["record"]
    save_png(item["image"], out / "test" / folder / f"{k:03d}.png")
    save_png((item["plan"]["mask"] * 255).byte().numpy(), out / "ground_truth" / folder / f"{k:03d}_mask.png")
    with (out / "manifest.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")
    log(f"\rimage {item['n'] + 1}/{total}: done in {record['seconds']:.1f}s, background PSNR "
        f"{record['psnr_bg_before']:.1f} -> {record['psnr_bg_after']:.1f} dB, change in mask "
        f"{record['change_in_mask']:.1f}" + " " * 20)


def sample_chunk(args, models, cfg: SampleConfig, chunk: list, total: int, text: tuple,
                 adapt_fn, log) -> list:
    """Draw one batch, redraw (as a batch) each image that changed less than --min-change inside
    its mask, up to --redraws times; write the images that passed, list the others in
    OUT/dropped.jsonl. Returns the preview rows of the written images."""
    todo, rows = [(n, plan, 0) for n, plan in chunk], []
    while todo:
        redo = []
        for item in draw_chunk(args, models, cfg, todo, total, text, adapt_fn, log):
            if item["record"]["change_in_mask"] >= args.min_change:
                write_image(args, item, total, log)
                rows.append(item["row"])
            elif item["attempt"] < args.redraws:
                redo.append((item["n"], item["plan"], item["attempt"] + 1))
            else:
                with (Path(args.out) / "dropped.jsonl").open("a") as f:
                    f.write(json.dumps(item["record"]) + "\n")
                log(f"\rimage {item['n'] + 1}/{total}: dropped, its mask changed by "
                    f"{item['record']['change_in_mask']:.1f} < --min-change {args.min_change:g} "
                    f"in {args.redraws + 1} draws" + " " * 20)
        todo = redo
    return rows


def overlay(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The image with the mask tinted red."""
    red = torch.tensor([1.0, -1.0, -1.0], device=image.device, dtype=image.dtype)[:, None, None]
    return torch.where(mask > 0.5, 0.5 * image + 0.5 * red, image)


def contact_sheet(rows: list[list[torch.Tensor]], path: Path) -> None:
    """Rows of (3, H, W) images in [-1, 1] side by side: good | trimap | before | after | overlay."""
    tiles = [np.concatenate([to_uint8(t) for t in row], axis=1) for row in rows]
    save_png(np.concatenate(tiles, axis=0), path)
