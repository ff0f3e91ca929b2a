"""python -m minibldm.evaluate: how much a source of training defects helps a defect detector.

The same small U-Net (minibldm/eval/detector.py) is trained from scratch for every method, for
--steps Adam steps on batches of half good training images (empty masks) and half the method's
defect images, each flipped and turned at random, at --size, and cut to a --crop window (one
that holds defect pixels when the image has any); then it scores the held-out real defects
as whole images. The same arguments give the same numbers on one kind of CPU.

Methods (training defects; minibldm/eval/baselines.py):
  real-only      the k real defects per type as they are
  crop-paste     a real defect's masked pixels, rotated 0-360 deg and scaled 0.85-1.15, pasted
                 on a good image inside its foreground; the mask is exactly the pasted pixels
  perlin         DRAEM-style: a thresholded Perlin-noise mask inside the foreground, filled with
                 a shuffled, colour-jittered good image blended at opacity 1 - beta, beta < 0.8
  minibldm       the images of `python -m minibldm.sample` runs, --generated DIR [DIR ...]
                 (OUT/test/<defect>/*.png, OUT/ground_truth/<defect>/*_mask.png, manifest.jsonl)
  minibldm+real  both in one pool per type, as a user adds generated images to the real ones;
                 batches draw a type, then one of its images (10 real + 10 generated: half real)

Split: per defect type, k real images chosen by --seed, or a training run's split.json (--split:
its k and seed make the split, --seed then seeds only the detector, so one generator's split can
be scored with several seeds). No method may use other real defects: the rest and test/good are
the test set. A test image used for training is refused: a split whose train and test lists
overlap, or a --generated folder whose manifest.jsonl names a held-out image or mask (`source`,
`placement.mask_file`; by path or by contents) or that holds a copy of one.

Metrics (minibldm/eval/metrics.py), per defect type (its test images against test/good) and
their mean: pixel AUROC, AP, AUPRO (up to a false-positive rate of 0.3), F1-max and the IoU at
its threshold; image AUROC and AP, the image score being the maximum of the anomaly map averaged
over 21x21 windows; tied scores count as one threshold. The table goes to stdout; --out writes
the JSON (metrics, split counts, settings, the training loss averaged over 50 spans)
and the table beside it (.md). Progress goes to stderr; bad input is one line on stderr naming
the argument, exit status 2, nothing written.

Resuming: with --out, the detector's training is saved every --checkpoint-every steps to
RESULT.resume.safetensors, and the same command run again after a kill resumes from it and
writes the same bytes as an uninterrupted run; the file is removed once RESULT.json is written.
A resume file left by other settings, or on another kind of processor (the result's
settings.machine), is refused: delete it to start over.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from . import baselines, detector, metrics
from .common import (check_args, check_generated, data_errors_as, machine, read_data,
                     run_command, split_pairs, table)
from ..cli import Parser, UsageError, add_max_pixels, default_device
from ..commands.data import Category, DecodedImages, PairDataset
from ..io import remove_temporaries

METHODS = ("minibldm", "minibldm+real", "crop-paste", "perlin", "real-only")
GENERATED = ("minibldm", "minibldm+real")  # the methods that read --generated
METRICS = ("pixel_auroc", "pixel_ap", "pixel_aupro", "pixel_f1_max", "pixel_iou", "image_auroc",
           "image_ap")
PROG = "python -m minibldm.evaluate"
CROP = 64  # --crop's default


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = Parser(prog=PROG, description=__doc__, renamed={"--steps": "--detector-steps"},
               examples="""\
  python -m minibldm.evaluate --data data/magnetic_tile --texture --method crop-paste \\
      --split runs/tile/split.json --out results/crop-paste.json
  python -m minibldm.evaluate --data data/magnetic_tile --texture --method minibldm+real \\
      --split runs/tile/split.json --generated generated --out results/minibldm+real.json""")
    add = p.add_argument
    add("--data", required=True, metavar="DIR", help="category folder (MVTec AD layout)")
    add("--method", required=True, choices=METHODS, help="source of training defects")
    add("--generated", nargs="+", metavar="DIR", help="minibldm.sample output folders")
    add("--k", type=int, help="real defects per type for training (default 10, or --split's)")
    add("--seed", type=int, help="split and detector seed (default 0); with --split, the "
        "detector's seed only (default the split's)")
    add("--split", metavar="FILE", help="a training run's split.json (its k and seed are used)")
    add("--detector-steps", type=int, default=4000, metavar="N", help="detector training steps "
        "(default 4000: the longest tools/detector_lengths.py tries; 28-37 min at 128 px on 2 "
        "CPU cores)")
    add("--size", type=int, default=128, metavar="S", help="image side, a multiple of 8 (128)")
    add("--crop", type=int, metavar="C", help="train on C x C windows of the --size images, "
        "each defect window holding defect pixels; the detector still scores whole images "
        f"(default {CROP}, or --size when smaller; 0: whole images, as before 2026-12-03)")
    add("--batch-size", type=int, default=16, metavar="B", help="half good, half defects (16)")
    add("--lr", type=float, default=2e-3, help="Adam learning rate (2e-3)")
    add("--texture", action="store_true", help="a surface: the foreground is the whole image")
    add_max_pixels(add)
    add("--device", default=default_device(), help="cpu, cuda, cuda:1 ... (default: cuda when "
        "available, else cpu)")
    add("--out", metavar="RESULT.json", help="the JSON to write; the table goes to RESULT.md")
    add("--checkpoint-every", type=int, default=200, metavar="N", help="with --out, save the "
        "detector every N steps to RESULT.resume.safetensors, from which the same command "
        "resumes after a kill (default 200; 0: never)")
    args = p.parse_args(argv)
    check_args(args, {"k": 1, "seed": 0, "detector_steps": 1, "size": 16, "batch_size": 2,
                      "crop": 0, "checkpoint_every": 0})
    if args.method in GENERATED and not args.generated:
        raise UsageError(f"--generated DIR is required with --method {args.method}")
    if args.generated and args.method not in GENERATED:
        raise UsageError("--generated is read only with --method minibldm or minibldm+real "
                         f"(not {args.method})")
    if args.size % 8:
        raise UsageError(f"--size {args.size}: must be a multiple of 8 (the detector halves it "
                         "3 times)")
    args.crop = min(CROP, args.size) if args.crop is None else args.crop or args.size
    if args.crop % 8 or args.crop > args.size:
        raise UsageError(f"--crop {args.crop}: must be a multiple of 8 and at most --size "
                         f"({args.size}), or 0 for whole images")
    if not args.lr > 0:
        raise UsageError(f"--lr must be positive (got {args.lr})")
    return args


def defect_source(args, category: Category, split: dict, decoded: DecodedImages,
                  generated: dict):
    """The --method's source of defects (see minibldm/eval/baselines.py)."""
    if args.method == "crop-paste":
        pairs = PairDataset(category, split, size=args.size, seed=args.seed, length=10 ** 9)
        pairs.decoded = decoded  # one cache of decoded images
        return baselines.CropPaste(pairs)
    if args.method == "perlin":
        return baselines.Perlin(category.good, decoded, args.seed)
    real = {} if args.method == "minibldm" else split_pairs(category, split, "train")
    return baselines.FixedPairs({t: real.get(t, []) + generated.get(t, [])
                                 for t in set(real) | set(generated)}, decoded, args.seed)


def make_batches(args, category: Category, decoded: DecodedImages, source):
    """batch(step) -> (images (B, 3, S, S), masks (B, 1, S, S)): B/2 good images with empty
    masks, then B/2 of the source's defects; each image flipped and turned at random."""
    half = args.batch_size // 2

    def batch(step: int):
        images, masks = [], []
        for j in range(args.batch_size):
            i = step * args.batch_size + j
            if j < args.batch_size - half:
                g = baselines.stream(args.seed, "good", i)
                path = category.good[torch.randint(len(category.good), (1,), generator=g).item()]
                image = baselines.signed(decoded.image(path))
                mask = torch.zeros(image.shape[-2:])
            else:
                image, mask = source(step * half + j - (args.batch_size - half))
            g = baselines.stream(args.seed, "aug", i)
            image, mask = baselines.flip_rotate([image, mask], g)
            if args.crop < args.size:
                g = baselines.stream(args.seed, "crop", i)
                image, mask = baselines.crop(image, mask, args.crop, g)
            images.append(image)
            masks.append(mask[None])
        return torch.stack(images), torch.stack(masks)
    return batch


def score(maps_defect: torch.Tensor, masks: torch.Tensor, maps_good: torch.Tensor,
          good_scores: torch.Tensor) -> dict:
    """The metrics of one defect type: its maps and masks (N, S, S) against the good images'
    maps and image scores."""
    pix_scores = torch.cat([maps_defect.flatten(), maps_good.flatten()]).numpy()
    pix_labels = torch.cat([masks.flatten(), torch.zeros(maps_good.numel())]).numpy()
    img_scores = torch.cat([detector.image_scores(maps_defect), good_scores]).numpy()
    img_labels = np.r_[np.ones(len(maps_defect)), np.zeros(len(maps_good))]
    f1, threshold, iou = metrics.f1_max(pix_scores, pix_labels)
    maps = torch.cat([maps_defect, maps_good]).numpy()
    return {"pixel_auroc": metrics.auroc(pix_scores, pix_labels),
            "pixel_ap": metrics.average_precision(pix_scores, pix_labels),
            "pixel_aupro": metrics.aupro(maps, torch.cat([masks, 0 * maps_good]).numpy()),
            "pixel_f1_max": f1, "pixel_iou": iou, "f1_threshold": threshold,
            "image_auroc": metrics.auroc(img_scores, img_labels),
            "image_ap": metrics.average_precision(img_scores, img_labels),
            "n_test": len(maps_defect)}


def markdown(result: dict) -> str:
    """The metrics as a markdown table, in percent."""
    head = ["defect", "n", "pixel AUROC", "pixel AP", "pixel AUPRO", "pixel F1-max", "pixel IoU",
            "image AUROC", "image AP"]
    rows = [[name, str(m["n_test"])] + [f"{100 * m[k]:.1f}" for k in METRICS]
            for name, m in result["per_type"].items()]
    rows.append(["**mean**", str(sum(m["n_test"] for m in result["per_type"].values()))]
                + [f"**{100 * result['mean'][k]:.1f}**" for k in METRICS])
    s = result["settings"]
    return (f"{s['method']} on {Path(s['data']).name}: k={s['k']}, seed={s['seed']}, "
            f"{s['steps']} steps at {s['size']} px (windows of {s.get('crop', s['size'])}), "
            f"{result['test_good']} good test images\n\n"
            + table(head, rows))


def read_inputs(args) -> tuple[Category, dict, dict, dict]:
    """The category, its split, the test pairs and the (checked) generated pairs by type."""
    category, split = read_data(args)
    if not category.test_good:
        raise UsageError(f"--data {args.data}: no test/good images to score against (the MVTec "
                         "AD layout is needed)")
    tests = {t: p for t, p in split_pairs(category, split, "test").items() if p}
    if not tests:
        raise UsageError(f"--k {args.k}: leaves no defect image of any type for testing")
    generated = check_generated(args.generated, category, split) if args.generated else {}
    return category, split, tests, generated


def decode_all(category: Category, split: dict, tests: dict, decoded: DecodedImages):
    """Every image the run reads, decoded now so that a bad file is reported before training:
    returns the test images and masks by type and the good test images."""
    with data_errors_as("--data"):
        images = {t: torch.stack([decoded.image(i) for i, _ in p]) for t, p in tests.items()}
        masks = {t: torch.stack([decoded.mask(m) for _, m in p]).float() for t, p in tests.items()}
        good = torch.stack([decoded.image(p) for p in category.test_good])
        for pairs in split_pairs(category, split, "train").values():
            for image, mask in pairs:
                decoded.image(image), decoded.mask(mask)
    return images, masks, good


def resume_file(args) -> Path | None:
    """Where --out's detector training is saved for a resume (None without --out)."""
    return Path(args.out).with_suffix(".resume.safetensors") if args.out else None


def checkpoint(args, settings: dict) -> detector.Checkpoint | None:
    """The detector's checkpoint for a resumable run (None without --out or with
    --checkpoint-every 0). Refuses one written with other settings; removes the temporary
    files a kill may have left beside the result."""
    path = resume_file(args)
    if path is None:
        return None
    out = Path(args.out)  # only this run's temporaries: others may write in the folder
    remove_temporaries([out.parent], (path.name, out.name, out.with_suffix(".md").name))
    if args.checkpoint_every == 0:
        return None
    key = json.dumps(settings, sort_keys=True)
    ckpt = detector.Checkpoint(path, key, args.checkpoint_every)
    try:
        stored = ckpt.stored_key()
    except Exception as e:  # noqa: BLE001 - the safetensors reader raises several types
        raise UsageError(f"{path}: not a readable resume file ({type(e).__name__}); delete it "
                         "to start over") from None
    if stored is not None and stored != key:
        try:
            other = json.loads(stored)
        except ValueError:
            other = {}
        changed = sorted(k for k in settings if other.get(k) != settings[k]) or ["settings"]
        raise UsageError(f"{path}: left by an evaluate run with another {', '.join(changed)} "
                         f"({', '.join(str(other.get(k)) for k in changed)}); delete it to "
                         "start this run from step 0")
    return ckpt


def train_and_score(args, batches, test_images: dict, test_masks: dict, good_images, log,
                    ckpt: detector.Checkpoint | None = None):
    """Train a fresh detector (its initial weights from --seed alone), deterministically, and
    score it; returns (the loss per step, the metrics per type). ckpt: resume from it and save
    to it (detector.Checkpoint)."""
    def maps(images: torch.Tensor) -> torch.Tensor:
        return detector.anomaly_maps(net, baselines.signed(images), device=args.device)

    state = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            net = detector.SegNet().to(args.device)
        losses = detector.train(net, batches, args.detector_steps, lr=args.lr, device=args.device,
                                log=log, checkpoint=ckpt)
        log(f"scoring {sum(len(v) for v in test_images.values()) + len(good_images)} test images")
        good_maps = maps(good_images)
        good_scores = detector.image_scores(good_maps)
        per_type = {t: score(maps(test_images[t]), test_masks[t], good_maps, good_scores)
                    for t in sorted(test_images)}
    finally:
        torch.use_deterministic_algorithms(state[0], warn_only=state[1])
    return losses, per_type


def evaluate(args, log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> dict:
    """Read the input, train the detector on the method's data, score it; returns the result."""
    category, split, tests, generated = read_inputs(args)
    settings = {"method": args.method, "data": str(args.data), "generated": args.generated,
                "split": args.split, "k": args.k, "seed": args.seed, "split_seed": args.split_seed,
                "steps": args.detector_steps, "size": args.size, "crop": args.crop,
                "batch_size": args.batch_size,
                "lr": args.lr, "texture": category.texture, "device": args.device,
                "torch": torch.__version__, "machine": machine(args.device)}
    ckpt = checkpoint(args, settings)  # resumed only with these settings, on this kind of machine
    decoded = DecodedImages(category, args.size, None, capacity=10 ** 6)
    test_images, test_masks, good_images = decode_all(category, split, tests, decoded)
    with data_errors_as("--generated" if generated else "--data"):
        source = defect_source(args, category, split, decoded, generated)
    n_train = {t: len(p) for t, p in split_pairs(category, split, "train").items()}
    log(f"{PROG}: {args.method} on {category.root}: {len(category.good)} good training "
        f"images, split k={args.k} ({sum(n_train.values())} real defects for training"
        + (f", {sum(len(v) for v in generated.values())} generated" if generated else "")
        + f"), testing on {sum(len(p) for p in tests.values())} defect and "
        f"{len(category.test_good)} good images")
    for t in sorted(set(category.defects) - set(tests)):
        log(f"note: {t} has {n_train[t]} images, no more than k={args.k}: none left for testing")
    with data_errors_as("--data"):  # a defect that fits no foreground, a missing foreground mask
        losses, per_type = train_and_score(args, make_batches(args, category, decoded, source),
                                           test_images, test_masks, good_images, log, ckpt)
    return {"settings": settings, "per_type": per_type,
            "mean": {k: float(np.mean([m[k] for m in per_type.values()])) for k in METRICS},
            "split": {"train": n_train, "test": {t: len(p) for t, p in tests.items()},
                      "short": split.get("short", {})},
            "test_good": len(category.test_good),
            "generated": {t: len(p) for t, p in generated.items()},
            "final_loss": float(np.mean(losses[-max(1, len(losses) // 10):])),
            "loss_curve": detector.loss_curve(losses)}


def finished(args) -> None:
    """The result is written: its resume file is no longer needed."""
    resume_file(args).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    return run_command(PROG, argv, parse_args, evaluate, markdown, finished)
