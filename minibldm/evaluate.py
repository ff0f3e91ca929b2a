"""python -m minibldm.evaluate: how much a source of training defects helps a defect detector.

    python -m minibldm.evaluate --data DIR --method minibldm|minibldm+real|crop-paste|perlin|real-only
        [--generated DIR ...] [--k 10] [--seed 0] [--split FILE] [--steps 400] [--size 128]
        [--batch-size 8] [--lr 2e-3] [--texture] [--out RESULT.json]

Split. The few-shot split of training (minibldm/data.py: per defect type, k real images chosen
by --seed; `--split FILE` reads a training run's split.json, whose k and seed make the split;
--seed then seeds only the detector, so one generator's split can be scored with several seeds).
The k real defects per type are the only real defects any method may use; the other defect
images and test/good are the test set. A test image used for training is refused (one line on
stderr, exit status 2): a split file whose train and test lists overlap, or a --generated folder
whose manifest.jsonl names a held-out image or mask (`source`, `placement.mask_file`; matched
by path and by file contents) or that holds a copy of one.

Methods (training defects; minibldm/baselines.py):
  real-only   the k real defects per type as they are
  crop-paste  a real defect's masked pixels, rotated 0-360 deg, scaled 0.85-1.15, pasted on a
              good image inside its foreground; the mask is exactly the pasted pixels
  perlin      DRAEM-style: a thresholded Perlin-noise mask inside the foreground, filled with
              a shuffled, colour-jittered good image blended at opacity 1 - beta, beta < 0.8
  minibldm    the images of `python -m minibldm.sample` runs, --generated DIR [DIR ...]
              (OUT/test/<defect>/*.png, OUT/ground_truth/<defect>/*_mask.png, manifest.jsonl)
  minibldm+real  both: per defect type, the k real defects and the generated ones in one pool
              (as a user adds generated images to the real ones). Batches draw a type, then an
              image of it, so with 10 real and 10 generated images of a type half are real

Detector (minibldm/detector.py), the same for every method: a U-Net (16-32-64-128 channels)
trained from scratch for --steps Adam steps on batches of half good training images (target all
zeros) and half the method's defect images, every image flipped and turned by quarter turns at
random, loss BCE + Dice, images resized to --size. Anomaly map = sigmoid output; image score =
maximum of the map averaged over 21x21 windows. The same arguments give the same numbers on CPU.

Metrics (minibldm/metrics.py), for each defect type (its test images against test/good) and
their mean: pixel AUROC, pixel AP, pixel F1-max and the IoU at its threshold, image AUROC and
image AP; masks at --size. Ties are scored as one threshold (AUROC with tie-averaged ranks,
sklearn's step-wise AP). The JSON (metrics, split counts, settings, wall time) goes to --out, a
markdown table to stdout and beside the JSON as .md. Progress goes to stderr. Bad input is one
line on stderr naming the argument, exit status 2, with nothing written.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from . import baselines, detector, metrics
from .cli import Parser, UsageError
from .data import (Category, DataError, DecodedImages, PairDataset, list_images, mask_of,
                   load_or_make_split, make_split, read_category)
from .io import file_sha256, write_result

METHODS = ("minibldm", "minibldm+real", "crop-paste", "perlin", "real-only")
GENERATED = ("minibldm", "minibldm+real")  # the methods that read --generated
METRICS = ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_iou", "image_auroc", "image_ap")
PROG = "python -m minibldm.evaluate"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = Parser(prog=PROG, description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--data", required=True, metavar="DIR", help="category folder (MVTec AD layout)")
    add("--method", required=True, choices=METHODS, help="source of training defects")
    add("--generated", nargs="+", metavar="DIR", help="minibldm.sample output folders")
    add("--k", type=int, help="real defects per type for training (default 10, or --split's)")
    add("--seed", type=int, help="split and detector seed (default 0); with --split, the "
        "detector's seed only (default the split's)")
    add("--split", metavar="FILE",
        help="a training run's split.json (its k and seed make the split)")
    add("--steps", type=int, default=400, metavar="N", help="detector training steps (400)")
    add("--size", type=int, default=128, metavar="S", help="image side, a multiple of 8 (128)")
    add("--batch-size", type=int, default=8, metavar="B", help="half good, half defects (8)")
    add("--lr", type=float, default=2e-3, help="Adam learning rate (2e-3)")
    add("--texture", action="store_true", help="a surface: the foreground is the whole image")
    add("--device", default="cpu", help="cpu or cuda (cpu)")
    add("--out", metavar="RESULT.json", help="the JSON to write; the table goes to RESULT.md")
    return p.parse_args(argv)


def check_args(args) -> None:
    if not Path(args.data).is_dir():
        raise UsageError(f"--data {args.data}: no such folder")
    if args.method in GENERATED and not args.generated:
        raise UsageError(f"--generated DIR is required with --method {args.method}")
    if args.generated and args.method not in GENERATED:
        raise UsageError("--generated is read only with --method minibldm or minibldm+real "
                         f"(not {args.method})")
    for folder in args.generated or ():
        if not Path(folder).is_dir():
            raise UsageError(f"--generated {folder}: no such folder")
    if args.split and not Path(args.split).is_file():
        raise UsageError(f"--split {args.split}: no such file")
    for name, low in (("k", 1), ("seed", 0), ("steps", 1), ("size", 16), ("batch_size", 2)):
        value = getattr(args, name)
        if value is not None and value < low:
            raise UsageError(f"--{name.replace('_', '-')} must be at least {low} (got {value})")
    if args.size % 8:
        raise UsageError(f"--size {args.size}: must be a multiple of 8 (the detector halves it "
                         "3 times)")
    if not args.lr > 0:
        raise UsageError(f"--lr must be positive (got {args.lr})")
    if args.out and Path(args.out).is_dir():
        raise UsageError(f"--out {args.out}: is a folder; give a file name such as result.json")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available here")


# ---- the split and the held-out images ------------------------------------------------------

def read_split(args, category: Category) -> dict:
    """The training split: --split FILE (its k and seed; --seed, when given, then seeds only the
    detector and its data), else make_split with --k and --seed. Sets args.k, args.seed and
    args.split_seed. A split whose train and test overlap is refused."""
    if args.split:
        try:
            stored = json.loads(Path(args.split).read_text())
        except (ValueError, OSError) as e:
            raise UsageError(f"--split {args.split}: not a readable split file ({e})") from None
        if not isinstance(stored, dict) or not isinstance(stored.get("defects"), dict):
            raise UsageError(f"--split {args.split}: not a split file (no \"defects\" object)")
        if args.k is not None and args.k != stored.get("k"):
            raise UsageError(f"--k {args.k}: --split {args.split} was made with "
                             f"k={stored.get('k')}")
        args.k, args.split_seed = stored.get("k"), stored.get("seed")
        args.seed = args.split_seed if args.seed is None else args.seed  # the detector's seed
        try:
            split = load_or_make_split(args.split, category, args.k, args.split_seed)
        except DataError as e:
            raise UsageError(f"--split {e}") from None
    else:
        args.k = 10 if args.k is None else args.k
        args.seed = 0 if args.seed is None else args.seed
        args.split_seed = args.seed
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # short types are reported in the JSON and below
            split = make_split(category, args.k, args.seed)
    for name in category.defects:
        part = split["defects"].get(name)
        if part is None:
            raise UsageError(f"--split {args.split}: has no entry for defect type {name!r}")
        both = sorted(set(part["train"]) & set(part["test"]))
        if both:
            raise UsageError(f"--split {args.split}: {both[0]} is in both train and test of "
                             f"{name!r}; a test image must not be used for training")
    return split


def split_pairs(category: Category, split: dict, part: str) -> dict[str, list[tuple[Path, Path]]]:
    """{type: [(image, mask)]} of the split's "train" or "test" defect images."""
    out = {}
    for name, pairs in category.defects.items():
        chosen = set(split["defects"][name][part])
        out[name] = [(i, m) for i, m in pairs if category.rel(i) in chosen]
    return out



def check_generated(folders: list[Path], category: Category,
                    held_out: list[Path]) -> dict[str, list[tuple[Path, Path]]]:
    """The generated (image, mask) pairs by defect folder, after checking that no held-out file
    was used: manifest `source` and `placement.mask_file` must name none (by resolved path, by
    contents, or, for a file no longer there, by its last three path parts), and no generated
    file may be a copy of one."""
    by_path = {p.resolve(): category.rel(p) for p in held_out}
    by_tail = set(by_path.values())
    by_hash = {file_sha256(p): category.rel(p) for p in held_out}

    def held(name: str) -> str | None:
        p = Path(name)
        if p.is_file():
            return by_path.get(p.resolve()) or by_hash.get(file_sha256(p))
        tail = "/".join(p.parts[-3:])
        return tail if tail in by_tail else None

    out: dict[str, list[tuple[Path, Path]]] = {}
    for folder in folders:
        test = folder / "test"
        manifest = folder / "manifest.jsonl"
        if not manifest.is_file():
            raise UsageError(f"--generated {folder}: no manifest.jsonl (needed to check that no "
                             "test image was used); write it with python -m minibldm.sample")
        for n, line in enumerate(manifest.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                names = [("source", record.get("source")),
                         ("placement.mask_file", (record.get("placement") or {}).get("mask_file"))]
            except (ValueError, AttributeError):
                raise UsageError(f"--generated {manifest}: line {n} is not a JSON object") from None
            for key, name in names:
                hit = held(name) if isinstance(name, str) else None
                if hit:
                    raise UsageError(f"--generated {folder}: manifest.jsonl line {n}: {key} {name} "
                                     f"is the held-out test file {hit} (the split keeps it for "
                                     "testing); generate from the training split only")
        found = 0
        for d in sorted(p for p in test.iterdir() if p.is_dir()) if test.is_dir() else ():
            mask_dir = folder / "ground_truth" / d.name
            for image in list_images(d):
                mask = mask_of(image, mask_dir)
                if mask is None:
                    raise UsageError(f"--generated {image}: no mask "
                                     f"{mask_dir / (image.stem + '_mask.png')}")
                for f in (image, mask):
                    copied = by_hash.get(file_sha256(f))
                    if copied:
                        raise UsageError(f"--generated {f}: is a copy of the held-out test file "
                                         f"{copied}")
                out.setdefault(d.name, []).append((image, mask))
                found += 1
        if not found:
            raise UsageError(f"--generated {folder}: no images in test/<defect>/ (with masks in "
                             "ground_truth/<defect>/<stem>_mask.png)")
    return out


# ---- training and scoring -------------------------------------------------------------------

def defect_source(args, category: Category, split: dict, decoded: DecodedImages,
                  generated: dict) -> baselines.FixedPairs | baselines.CropPaste | baselines.Perlin:
    if args.method == "real-only":
        return baselines.FixedPairs(split_pairs(category, split, "train"), decoded, args.seed)
    if args.method == "minibldm":
        return baselines.FixedPairs(generated, decoded, args.seed)
    if args.method == "minibldm+real":
        real = split_pairs(category, split, "train")
        return baselines.FixedPairs({t: real.get(t, []) + generated.get(t, [])
                                     for t in sorted(set(real) | set(generated))}, decoded, args.seed)
    if args.method == "crop-paste":
        pairs = PairDataset(category, split, size=args.size, seed=args.seed, length=10 ** 9)
        pairs.decoded = decoded  # one cache of decoded images
        return baselines.CropPaste(pairs)
    return baselines.Perlin(category.good, decoded, args.seed)


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
                image = decoded.image(path).float() / 127.5 - 1
                mask = torch.zeros(image.shape[-2:])
            else:
                image, mask = source(step * half + j - (args.batch_size - half))
            g = baselines.stream(args.seed, "aug", i)
            image, mask = baselines.flip_rotate([image, mask], g)
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
    return {"pixel_auroc": metrics.auroc(pix_scores, pix_labels),
            "pixel_ap": metrics.average_precision(pix_scores, pix_labels),
            "pixel_f1_max": f1, "pixel_iou": iou, "f1_threshold": threshold,
            "image_auroc": metrics.auroc(img_scores, img_labels),
            "image_ap": metrics.average_precision(img_scores, img_labels),
            "n_test": len(maps_defect)}


def markdown(result: dict) -> str:
    """The metrics as a markdown table, in percent."""
    head = ["defect", "n", "pixel AUROC", "pixel AP", "pixel F1-max", "pixel IoU",
            "image AUROC", "image AP"]
    rows = [[name, str(m["n_test"])] + [f"{100 * m[k]:.1f}" for k in METRICS]
            for name, m in result["per_type"].items()]
    rows.append(["**mean**", str(sum(m["n_test"] for m in result["per_type"].values()))]
                + [f"**{100 * result['mean'][k]:.1f}**" for k in METRICS])
    s = result["settings"]
    lines = [f"{s['method']} on {Path(s['data']).name}: k={s['k']}, seed={s['seed']}, "
             f"{s['steps']} steps at {s['size']} px, {result['test_good']} good test images", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def read_inputs(args) -> tuple[Category, dict, dict, dict]:
    """Check the arguments and read the category, the split, the held-out test pairs by type
    and the generated pairs by type (checked against the held-out files)."""
    check_args(args)
    try:
        category = read_category(args.data, texture=True if args.texture else None)
    except DataError as e:
        raise UsageError(f"--data {e}") from None
    if not category.test_good:
        raise UsageError(f"--data {args.data}: no test/good images to score against (the MVTec "
                         "AD layout is needed)")
    split = read_split(args, category)
    tests = {t: p for t, p in split_pairs(category, split, "test").items() if p}
    if not tests:
        raise UsageError(f"--k {args.k}: leaves no defect image of any type for testing")
    held_out = [f for pairs in tests.values() for pair in pairs for f in pair] + category.test_good
    generated = check_generated([Path(f) for f in args.generated], category, held_out) \
        if args.generated else {}
    return category, split, tests, generated


def evaluate(args, log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> dict:
    """Check the input, train the detector on the method's data, score it; returns the result."""
    t0 = time.time()
    category, split, tests, generated = read_inputs(args)
    decoded = DecodedImages(category, args.size, None, capacity=10 ** 6)
    try:  # read every image now, so that bad files are reported before training
        test_images = {t: torch.stack([decoded.image(i) for i, _ in p]) for t, p in tests.items()}
        test_masks = {t: torch.stack([decoded.mask(m) for _, m in p]).float()
                      for t, p in tests.items()}
        good_images = torch.stack([decoded.image(p) for p in category.test_good])
        for pairs in split_pairs(category, split, "train").values():
            for image, mask in pairs:
                decoded.image(image), decoded.mask(mask)
    except DataError as e:
        raise UsageError(f"--data {e}") from None
    try:
        source = defect_source(args, category, split, decoded, generated)
    except DataError as e:
        raise UsageError(f"--{'generated' if generated else 'data'} {e}") from None
    n_train = {t: len(p) for t, p in split_pairs(category, split, "train").items()}
    log(f"{PROG}: {args.method} on {category.root}: {len(category.good)} good training images, "
        f"split k={args.k} ({sum(n_train.values())} real defects for training"
        + (f", {sum(len(v) for v in generated.values())} generated" if generated else "")
        + f"), testing on {sum(len(p) for p in tests.values())} defect and "
        f"{len(category.test_good)} good images")
    for t in sorted(set(category.defects) - set(tests)):
        log(f"note: {t} has {n_train[t]} images, no more than k={args.k}: none left for testing")

    def maps(images: torch.Tensor) -> torch.Tensor:
        return detector.anomaly_maps(net, images.float() / 127.5 - 1, device=args.device)

    state = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with torch.random.fork_rng(devices=[]):  # the seed sets the initial weights alone
            torch.manual_seed(args.seed)
            net = detector.SegNet().to(args.device)
        losses = detector.train(net, make_batches(args, category, decoded, source), args.steps,
                                lr=args.lr, device=args.device, log=log)
        log(f"scoring {sum(len(v) for v in test_images.values()) + len(good_images)} test images")
        good_maps = maps(good_images)
        good_scores = detector.image_scores(good_maps)
        per_type = {t: score(maps(test_images[t]), test_masks[t], good_maps, good_scores)
                    for t in sorted(tests)}
    except DataError as e:  # a defect that fits no foreground, a missing foreground mask
        raise UsageError(f"--data {e}") from None
    finally:
        torch.use_deterministic_algorithms(state[0], warn_only=state[1])
    settings = {"method": args.method, "data": str(args.data), "generated": args.generated,
                "split": args.split, "k": args.k, "seed": args.seed,
                "split_seed": args.split_seed, "steps": args.steps,
                "size": args.size, "batch_size": args.batch_size, "lr": args.lr,
                "texture": category.texture, "device": args.device, "torch": torch.__version__}
    return {"settings": settings,
            "per_type": per_type,
            "mean": {k: float(np.mean([m[k] for m in per_type.values()])) for k in METRICS},
            "split": {"train": n_train, "test": {t: len(p) for t, p in tests.items()},
                      "short": split.get("short", {})},
            "test_good": len(category.test_good),
            "generated": {t: len(p) for t, p in generated.items()},
            "final_loss": float(np.mean(losses[-max(1, len(losses) // 10):])),
            "wall_seconds": round(time.time() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
        result = evaluate(args)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    table = markdown(result)
    print(table, end="")
    if args.out:
        write_result(args.out, result, table)
        print(f"wrote {args.out} and {Path(args.out).with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
