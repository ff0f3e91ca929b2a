"""python -m minibldm.sample: make defect images with pixel-aligned masks (AdaBLDM).

For each output k: pick a good image x_OK (seeded by (seed, k)), its foreground F, a defect mask
M* (a real few-shot mask, randomly rotated and scaled, placed inside F; or the user's exact
mask), the trimap Γ; run the multi-stage blended DDIM sampler (Algorithm 1, minibldm/sampler.py)
and the online decoder adaptation (Algorithm 2, minibldm/adapt.py). Writes, in the MVTec AD
layout so anomaly-detection tools read it directly:

    OUT/test/<defect>/000.png  OUT/ground_truth/<defect>/000_mask.png (0/255)
    OUT/manifest.jsonl         one JSON line per image (seed, source, placement, prompt, stages,
                               adaptation loss before/after, background PSNR against x_OK)
    OUT/preview.png            good | trimap | before adaptation | after | mask overlay
    OUT/run.json               the settings; a rerun with the same OUT resumes, a different one is refused

Image k depends only on (seed, k), so `--first K -n N` shards a job across processes and a
resumed run gives the same bytes as an uninterrupted one. Bad input: one line on stderr, exit
status 2, nothing written. With no arguments: the demo of the bundled tiny model (minibldm/demo.py).
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

from . import demo
from .adapt import adapt_decoder, adapt_decoders
from .cli import Parser, UsageError
from .data import DataError, mask_to_tensor, read_image, read_mask, to_tensor
from .ddim import alphas_cumprod
from .io import WeightsError, atomic_path
from .masks import PlacementError, foreground_for, sample_defect_mask, trimap
from .sampler import LATENT_MASKS, Stages, blended_sample, gaussian, guided_eps
from .weights import load

DEFAULT_WEIGHTS = Path(__file__).resolve().parent.parent / "weights" / "tiny"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def image_files(folder: Path, what: str) -> list[Path]:
    if not folder.is_dir():
        raise UsageError(f"{what} {folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UsageError(f"{what} {folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def image_seed(seed: int, k: int) -> int:
    """A 63-bit seed for output k: every image's randomness depends on (seed, k) alone."""
    return int.from_bytes(hashlib.sha256(f"minibldm/{seed}/{k}".encode()).digest()[:8], "little") >> 1


def psnr(a: torch.Tensor, b: torch.Tensor, where: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] over the pixels where `where` is 1 (on the 0..1 scale)."""
    mse = (((a - b) / 2) ** 2 * where).sum() / (where.sum() * a.shape[-3]).clamp(min=1)
    return float("inf") if mse == 0 else 10 * math.log10(1 / mse.item())


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> uint8 (H, W, 3)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()


def save_png(array: np.ndarray, path: Path) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def feathered(mask: torch.Tensor, radius: int = 3) -> torch.Tensor:
    """The defect mask grown by `radius` and smoothed: 1 on the defect, falling to 0 outside."""
    k = 2 * radius + 1
    grown = F.max_pool2d(mask, k, stride=1, padding=radius)
    return F.avg_pool2d(grown, k, stride=1, padding=radius, count_include_pad=False).clamp(min=mask)


# --- planning: everything that reads input happens before anything is written ---------------

def marked_texture(images: Path) -> bool:
    """Whether the category holding `images` marks itself a texture in its meta.json (as
    minibldm.synth writes; looked for in the folder and the two above it, MVTec's train/good)."""
    for folder in (images, images.parent, images.parent.parent):
        if (folder / "meta.json").is_file():
            try:
                return bool(json.loads((folder / "meta.json").read_text()).get("texture", False))
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                raise UsageError(f"{folder / 'meta.json'}: not a JSON object") from None
    return False


def read_masks(folder: Path, size: int) -> tuple[list[torch.Tensor], list[Path], bool]:
    """The few-shot masks at model resolution, their files, and whether all were binary."""
    files = image_files(folder, "--defect-masks")
    masks, binary = [], True
    for f in files:
        m, is_binary = read_mask(f)
        binary &= is_binary
        masks.append(mask_to_tensor(m, size))
    return masks, files, binary


def plan_images(args, size: int) -> tuple[list[dict], list[str]]:
    """One entry per output image: source path, defect mask (size x size), foreground, info."""
    notes = []
    goods = image_files(Path(args.images), "--images")
    fg_dir = Path(args.foreground) if args.foreground else None
    texture = args.texture or (fg_dir is None and marked_texture(Path(args.images)))
    if args.exact_masks:
        masks, files, binary = read_masks(Path(args.exact_masks), size)
        jobs = [(k, f, m) for k, (f, m) in enumerate(zip(files, masks))][args.first:args.first + args.n]
    else:
        few, files, binary = read_masks(Path(args.defect_masks), size)
        jobs = [(k, None, None) for k in range(args.first, args.first + args.n)]
    if not binary:
        notes.append("some masks were not binary; thresholded at 127")
    plans, fg_cache = [], {}
    for k, mask_file, exact in jobs:
        g = torch.Generator().manual_seed(image_seed(args.seed, k))
        if args.good:
            good = Path(args.good)
        elif exact is not None and (Path(args.images) / mask_file.name).is_file():
            good = Path(args.images) / mask_file.name  # a good image named like the mask
        else:
            good = goods[int(torch.randint(len(goods), (1,), generator=g))]
        image = read_image(good)
        if good not in fg_cache:
            fg = foreground_for(good, image, fg_dir=fg_dir, texture=texture)
            fg_cache[good] = mask_to_tensor(fg, size)
        fg = fg_cache[good]
        if exact is not None:
            mask_size = read_mask(mask_file)[0].shape
            if mask_size != image.shape[:2] and not args.resize_masks:
                raise UsageError(f"{mask_file}: mask is {mask_size[1]}x{mask_size[0]} but its image "
                                 f"{good} is {image.shape[1]}x{image.shape[0]} (--resize-masks to resize)")
            mask, info = exact, {"mask_file": str(mask_file)}
        else:
            try:
                mask, info = sample_defect_mask(few, fg, g, translate_only=args.translate_only)
            except PlacementError as e:
                raise UsageError(f"{good}: no placement of a defect mask inside the foreground ({e})")
            info["mask_file"] = str(files[info["source"]])
        plans.append(dict(k=k, good=good, mask=mask, fg=fg, info=info))
    return plans, notes


# --- the command ----------------------------------------------------------------------------

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
    run = p.add_argument_group("method")
    run.add_argument("--size", type=int, default=None, help="image size the model works at (default: the weights' or 256)")
    run.add_argument("--steps", type=int, default=50, help="DDIM steps N (reference: 50)")
    run.add_argument("--latent-start", type=int, default=26, help="first latent-editing step (reference: 26)")
    run.add_argument("--latent-stop", type=int, default=46, help="latent editing before this step (reference: 46)")
    run.add_argument("--image-start", type=int, default=45, help="first image-editing step (reference: 45)")
    run.add_argument("--stage-lengths", type=int, nargs=3, metavar=("FREE", "LATENT", "IMAGE"),
                     help="consecutive stage lengths instead; the paper's are 50 30 5")
    run.add_argument("--latent-mask", choices=LATENT_MASKS, default="nearest",
                     help="how M* shrinks to the latent grid: nearest (reference code) or cover "
                          "(every latent cell the mask touches; keeps defects thinner than 8 px)")
    run.add_argument("--guidance", type=float, default=9.0, help="classifier-free guidance scale (text only)")
    run.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    run.add_argument("--translate-only", action="store_true", help="place masks without rotation or scaling (reference test script)")
    run.add_argument("--adapt-steps", type=int, default=200, help="decoder adaptation steps T_ft (0: none)")
    run.add_argument("--adapt-lr", type=float, default=1e-4)
    run.add_argument("--adapt-blocks", type=int, metavar="N",
                     help="faster, not the paper's method: adapt only the decoder's output head and "
                          "last N upsampling levels (default: the whole decoder)")
    run.add_argument("--bg-weight", type=float, default=100.0, help="weight of the background term (reference: 100)")
    run.add_argument("--fg-weight", type=float, default=1.0,
                     help="weight of the defect-region term (reference code: 1; the paper's "
                          "lambda_con). 100 stops the adaptation from erasing small or thin defects")
    run.add_argument("--paste-background", action="store_true", help="copy x_OK exactly outside a feathered mask")
    run.add_argument("--batch-size", type=int, default=1, metavar="B",
                     help="images sampled and adapted together (one decoder copy each); the same "
                          "images as one at a time, up to float rounding (default 1)")
    run.add_argument("--compile", action="store_true",
                     help="torch.compile the UNet, the trimap branch (on a CPU with their "
                          "weights frozen into the graph) and the decoder adaptation (the first "
                          "image pays the compile time, minutes on a CPU; the adaptation is "
                          "compiled at --batch-size 1). On a CPU the frozen graph holds a second "
                          "copy of the UNet and branch weights (SD 1.5 float32: +4.7 GiB)")
    run.add_argument("--device", default="cpu", help="cpu or cuda")
    run.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                     help="the networks' dtype; the decoder adaptation trains a float32 copy under "
                          "autocast to it (default float32)")
    run.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def check_args(args) -> Stages:
    if args.n is None and not args.exact_masks:
        raise UsageError("-n is required (the number of images)")
    if args.n is None:
        args.n = 10 ** 9  # every exact mask
    if args.n <= 0:
        raise UsageError(f"-n must be positive, got {args.n}")
    if args.batch_size <= 0:
        raise UsageError(f"--batch-size must be positive, got {args.batch_size}")
    for name in ("images", "object", "defect", "out"):
        if getattr(args, name) is None:
            raise UsageError(f"--{name} is required")
    if not args.defect_masks and not args.exact_masks:
        raise UsageError("--defect-masks (few-shot masks to sample from) or --exact-masks is required")
    if args.adapt_blocks is not None and args.adapt_blocks < 0:
        raise UsageError(f"--adapt-blocks must be >= 0, got {args.adapt_blocks}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out}: exists and is not a folder")
    if args.good and not Path(args.good).is_file():
        raise UsageError(f"--good {args.good}: no such file")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available here")
    try:
        if args.stage_lengths:
            return Stages.from_lengths(*args.stage_lengths)
        return Stages(args.steps, args.latent_start, args.latent_stop, args.image_start)
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
    keys = ("weights", "control", "images", "defect_masks", "exact_masks", "good", "foreground",
            "texture", "object", "defect", "seed", "guidance", "eta", "translate_only",
            "adapt_steps", "adapt_lr", "adapt_blocks", "bg_weight", "fg_weight", "paste_background",
            "dtype", "latent_mask")
    return {**{k: getattr(args, k) for k in keys}, "size": size, "stages": vars(stages)}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
    except UsageError as e:  # argparse's own complaint (unknown flag, bad choice), in one line
        print(f"minibldm.sample: error: {e}", file=sys.stderr)
        return 2
    if not argv and not (DEFAULT_WEIGHTS / "config.json").is_file():
        print(f"minibldm.sample: error: the bundled tiny model is missing ({DEFAULT_WEIGHTS}/"
              "config.json); run with --weights DIR --images DIR --defect-masks DIR --object NAME "
              "--defect NAME -n N --out OUT", file=sys.stderr)
        return 2
    try:
        if not argv:
            return demo.run(DEFAULT_WEIGHTS, generate, parse_args)
        return generate(args)
    except (UsageError, DataError, WeightsError) as e:
        print(f"minibldm.sample: error: {e}", file=sys.stderr)
        return 2


def generate(args) -> int:
    stages = check_args(args)
    log = (lambda *a, **k: None) if args.quiet else (lambda *a, **k: print(*a, file=sys.stderr, **k))
    models = load(args.weights, device=args.device, dtype=DTYPES[args.dtype], control=args.control)
    if models.control is None:
        raise UsageError(f"{args.weights}: has no trimap branch (control.safetensors); pass --control")
    check_control_names(Path(args.control) if args.control else Path(args.weights) / "control.safetensors",
                        args.defect)
    raw = json.loads((Path(args.weights) / "config.json").read_text())
    size = args.size or raw.get("image_size", 256)
    factor = 2 ** (len(models.config.autoencoder.ch_mult) - 1) * 2 ** (len(models.config.unet.channel_mult) - 1)
    if size % factor:
        raise UsageError(f"--size {size}: must be a multiple of {factor} for these weights")
    out = Path(args.out)
    settings = run_settings(args, stages, size)
    if (out / "run.json").is_file():
        before = json.loads((out / "run.json").read_text())
        differ = sorted(k for k in settings if before.get(k) != json.loads(json.dumps(settings[k])))
        if differ:
            raise UsageError(f"--out {out}: holds a run with other settings ({', '.join(differ)}); "
                             "use another folder")
    plans, notes = plan_images(args, size)
    for note in notes:  # said even with --quiet: they are about the user's data
        print(f"minibldm.sample: note: {note}", file=sys.stderr)

    # -- from here on, OUT is written --
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps(settings, indent=2) + "\n")
    manifest = out / "manifest.jsonl"
    done = set()
    if manifest.is_file():
        done = {json.loads(line)["index"] for line in manifest.read_text().splitlines() if line.strip()}
    folder = args.defect.replace(" ", "_")
    dev, dt = torch.device(args.device), DTYPES[args.dtype]
    m = models
    if args.compile:
        m.unet, m.control = compile_frozen(m.unet, dev), compile_frozen(m.control, dev)
    prompt = f"a {args.object} with a {args.defect}"
    with torch.no_grad():
        cond, uncond = m.text_encoder(m.tokenizer([prompt, ""]).to(dev)).chunk(2)
    m.text_encoder = None  # one prompt per run: its weights (0.5 GB at SD size) are freed here
    rows = []
    pending = [(n, plan) for n, plan in enumerate(plans) if plan["k"] not in done]
    for c in range(0, len(pending), args.batch_size):
        chunk = pending[c:c + args.batch_size]
        t0 = time.time()
        gens = [torch.Generator(dev).manual_seed(image_seed(args.seed, plan["k"]) + 1)
                for _, plan in chunk]
        x_ok = torch.stack([to_tensor(read_image(plan["good"]), size) for _, plan in chunk]).to(dev, dt)
        mask = torch.stack([plan["mask"][None] for _, plan in chunk]).to(dev, dt)
        hint = torch.stack([trimap(plan["mask"], plan["fg"]) for _, plan in chunk]).to(dev, dt)
        which = f"image {chunk[0][0] + 1}" + (f"-{chunk[-1][0] + 1}" if len(chunk) > 1 else "")
        which += f"/{len(plans)}"

        def progress(i, t, z, x0):
            if (i + 1) % 10 == 0 or i + 1 == stages.steps:
                log(f"\r{which}: step {i + 1}/{stages.steps}", end="")

        def adapt_progress(step, loss):
            if step % 20 == 0 or step == args.adapt_steps - 1:
                log(f"\r{which}: adaptation {step + 1}/{args.adapt_steps} loss {loss:.5f}", end="")

        res = defect_image(m, x_ok, mask, hint, cond.expand(len(chunk), -1, -1),
                           uncond.expand(len(chunk), -1, -1), stages, per_image_noise(gens),
                           args.guidance, args.eta, args.adapt_steps, args.adapt_lr, args.fg_weight,
                           args.bg_weight, progress, adapt_progress, args.adapt_blocks,
                           compile=args.compile, latent_mask=args.latent_mask)
        before, after = res["before"], res["after"]
        if args.paste_background:
            w = feathered(mask)
            after = w * after + (1 - w) * x_ok
        seconds = (time.time() - t0) / len(chunk)
        for j, (n, plan) in enumerate(chunk):
            k, losses, bg = plan["k"], res["losses"][j], 1 - mask[j:j + 1]
            record = dict(index=k, seed=args.seed, image_seed=image_seed(args.seed, k),
                          source=str(plan["good"]), placement=plan["info"], prompt=prompt,
                          stages=vars(stages), adapt_loss_before=losses[0],
                          adapt_loss_after=losses[-1],
                          psnr_bg_before=psnr(before[j:j + 1], x_ok[j:j + 1], bg),
                          psnr_bg_after=psnr(after[j:j + 1], x_ok[j:j + 1], bg),
                          seconds=round(seconds, 2))
            save_png(to_uint8(after[j]), out / "test" / folder / f"{k:03d}.png")
            save_png((plan["mask"] * 255).byte().numpy(), out / "ground_truth" / folder / f"{k:03d}_mask.png")
            with manifest.open("a") as f:
                f.write(json.dumps(record) + "\n")
            log(f"\rimage {n + 1}/{len(plans)}: done in {record['seconds']:.1f}s, background PSNR "
                f"{record['psnr_bg_before']:.1f} -> {record['psnr_bg_after']:.1f} dB" + " " * 20)
            rows.append([x_ok[j], hint[j] * 2 - 1, before[j], after[j], overlay(after[j], mask[j])])
    if rows:
        contact_sheet(rows, out / "preview.png")
    log(f"wrote {len(rows)} images to {out}")
    return 0


def defect_image(m, x_ok: torch.Tensor, mask: torch.Tensor, hint: torch.Tensor,
                 cond: torch.Tensor, uncond: torch.Tensor, stages: Stages, noise,
                 guidance: float = 9.0, eta: float = 0.0, adapt_steps: int = 200,
                 adapt_lr: float = 1e-4, fg_weight: float = 1.0, bg_weight: float = 100.0,
                 progress=None, adapt_progress=None, adapt_blocks: int | None = None,
                 compile: bool = False, latent_mask: str = "nearest") -> dict:
    """The whole method for one input, or a batch of B: encode x_OK (a posterior sample),
    Algorithm 1 (guided, blended DDIM), decode, Algorithm 2 (decoder adaptation, one decoder copy
    per image: adapt.adapt_decoders when B > 1). m: a minibldm.Models with a control branch;
    cond/uncond: τ(prompt) and τ(""), B rows each; noise(like): every random draw, in order
    (z_OK's posterior noise first, then blended_sample's; `per_image_noise` keeps each image's
    draws its own). Returns {"z_ok", "z", "before", "after", "losses"}: z* the sampled latent,
    the image decoded by the frozen and by the adapted decoder, and per image the adaptation
    loss per step. compile: the adaptation of a single image runs through torch.compile
    (adapt_decoder); compile the UNet and branch in `m` yourself (see generate). latent_mask:
    how M* shrinks to the latent grid (sampler.latent_keep_mask)."""
    ae = m.autoencoder
    with torch.no_grad():
        z_ok = ae.encode(x_ok, noise=noise)
        eps = guided_eps(m.unet, m.control, cond, uncond, hint, guidance)
        z = blended_sample(eps, lambda x, nz: ae.encode(x, noise=nz), ae.decode, z_ok, x_ok, mask,
                           alphas_cumprod(), stages, eta=eta, callback=progress, noise=noise,
                           latent_mask=latent_mask)
        h = ae.decoder_input(z)
        before = ae.decoder(h)
    with torch.enable_grad():
        if x_ok.shape[0] == 1:
            after, losses = adapt_decoder(ae.decoder, h, x_ok, mask, adapt_steps, adapt_lr,
                                          fg_weight, bg_weight, adapt_progress, adapt_blocks,
                                          compile=compile)
            losses = [losses]
        else:
            after, losses = adapt_decoders(ae.decoder, h, x_ok, mask, adapt_steps, adapt_lr,
                                           fg_weight, bg_weight, adapt_progress, adapt_blocks)
    return {"z_ok": z_ok, "z": z, "before": before, "after": after.detach(), "losses": losses}


def compile_frozen(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """torch.compile for sampling (inductor: C++ kernels on CPU, Triton on CUDA; built on the
    first call). On a CPU with inductor's `freezing`: the weights, which sampling never changes,
    become constants of the graph, so the convolutions run on weights packed once for oneDNN
    (see docs/BENCHMARKS.md). Call the result under torch.no_grad().

    inductor reads `freezing` when it compiles, which is at the first call (and at any
    recompile for a new shape), not at torch.compile(): so each call runs with it switched on.
    torch.compile's own `options={"freezing": True}` was measured to leave the weights unfrozen.
    The frozen graph keeps its own packed copy of the weights beside the module's: SD 1.5's UNet
    and branch in float32 take 4.7 GiB more."""
    compiled = torch.compile(module)
    if device.type != "cpu":
        return compiled
    import torch._inductor.config as inductor_config
    forward = compiled.forward

    def frozen_forward(*args, **kwargs):
        with inductor_config.patch(freezing=True):
            return forward(*args, **kwargs)
    compiled.forward = frozen_forward
    return compiled


def per_image_noise(generators: list[torch.Generator]):
    """noise(like) for a batch: row b of every draw comes from generators[b], so an image gets
    the same draws in any batch as alone (gaussian(generators[0]) for a batch of one)."""
    def draw(like: torch.Tensor) -> torch.Tensor:
        return torch.cat([gaussian(g)(like[b:b + 1]) for b, g in enumerate(generators)])
    return draw


def overlay(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The image with the mask tinted red."""
    red = torch.tensor([1.0, -1.0, -1.0], device=image.device, dtype=image.dtype)[:, None, None]
    return torch.where(mask > 0.5, 0.5 * image + 0.5 * red, image)


def contact_sheet(rows: list[list[torch.Tensor]], path: Path, limit: int = 8) -> None:
    """Rows of (3, H, W) images in [-1, 1] side by side: good | trimap | before | after | overlay."""
    tiles = [np.concatenate([to_uint8(t) for t in row], axis=1) for row in rows[:limit]]
    save_png(np.concatenate(tiles, axis=0), path)


if __name__ == "__main__":
    sys.exit(main())
