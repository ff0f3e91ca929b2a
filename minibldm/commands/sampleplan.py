"""Planning `python -m minibldm.sample`: every input is read and checked here, before anything
is written. A `Source` is one defect type's inputs: from a category and its run's few-shot split
(`--data`), or from hand-wired folders. One plan per output image: its good image x_OK, its
defect mask M* (a real few-shot mask placed by masks.sample_defect_mask, or an exact mask as it
is) and the foreground F, all at the good image's own size. And what names a run in the output
folder (its settings' hash) and which of its images are already there."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..foreground import foreground_for
from ..images import IMAGE_SUFFIXES, DataError, mask_to_tensor, read_image, read_mask
from ..io import read_json
from ..config import Stages
from ..masks import PlacementError, sample_defect_mask
from ..pipeline import image_seed, prompt
from ..cli import UsageError
from .data import read_category


@dataclass
class Source:
    """One defect type's inputs. folder: its output folder (test/<folder>/); stream: what its
    images' seeds are keyed by besides (seed, k) ("" for a hand-wired run); masks: few-shot mask
    files to place, or with `exact` masks used as they are; rel: an image's path inside its
    category (for mirrored foreground masks), or None."""
    folder: str
    prompt: str
    goods: list[Path]
    masks: list[Path]
    exact: bool = False
    texture: bool = False
    fg_dir: Path | None = None
    stream: str = ""
    rel: object = None
    fixed: bool = False  # goods[0] for every image (--good): no draw


def check_numbers(args) -> None:
    """Every number on the command line finite and in its range, else one line naming the flag
    (a NaN guidance would write black images and NaN into the manifest)."""
    rules = [("--guidance", args.guidance, 0.0), ("--eta", args.eta, 0.0),
             ("--fg-weight", args.fg_weight, 0.0), ("--bg-weight", args.bg_weight, 0.0),
             ("--adapt-steps", args.adapt_steps, 0), ("--first", args.first, 0),
             ("--redraws", args.redraws, 0), ("--min-change", args.min_change, 0.0)]
    rules += [(flag, v, 1) for flag, v in (("--size", args.size), ("--ddim-steps", args.ddim_steps),
                                          ("-n", args.n), ("--batch-size", args.batch_size))
              if v is not None]
    for flag, value, low in rules:
        if not (low <= value < float("inf")):
            raise UsageError(f"{flag} must be a number >= {low}, got {value}")
    if not (0 < args.adapt_lr < float("inf")):
        raise UsageError(f"--adapt-lr must be a positive number, got {args.adapt_lr}")
    if args.fg_weight == args.bg_weight == 0 and args.adapt_steps > 0:
        raise UsageError("--fg-weight and --bg-weight are both 0: the adaptation has no loss")
    if args.min_change > 255:
        raise UsageError(f"--min-change is in levels of 255, got {args.min_change:g}")
    if args.defect_masks and args.exact_masks:
        raise UsageError("--exact-masks uses your masks as they are, --defect-masks places "
                         "few-shot masks: give one")


def image_files(folder: Path, what: str) -> list[Path]:
    if not folder.is_dir():
        raise UsageError(f"{what} {folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UsageError(f"{what} {folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


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


def branch_metadata(path: Path) -> dict:
    """control.safetensors' metadata: {"defects": [folders], "objects": {object: {folder:
    prompt name}}, ...} as train writes it; {} for a branch that records none."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return {k: json.loads(v) if k in ("defects", "defect_names", "objects") else v
            for k, v in meta.items()}


def check_control_names(path: Path, defect: str) -> None:
    """Refuse a defect the control branch was not trained for, when its file records names."""
    meta = branch_metadata(path)
    if "defects" in meta:
        names = list(meta["defects"]) + list(meta.get("defect_names", {}).values())
        for per_object in meta.get("objects", {}).values():
            names += list(per_object.values())
        if names and defect not in names and defect.replace(" ", "_") not in names:
            raise UsageError(f"{path}: trained for defects {', '.join(names)}, not '{defect}'")


def hand_wired_sources(args) -> list[Source]:
    """The one defect type of --images / --defect-masks or --exact-masks / --object / --defect."""
    images = Path(args.images)
    goods = [Path(args.good)] if args.good else image_files(images, "--images")
    fg_dir = Path(args.foreground) if args.foreground else None
    texture = args.texture or (fg_dir is None and marked_texture(images))
    masks = image_files(Path(args.exact_masks or args.defect_masks),
                        "--exact-masks" if args.exact_masks else "--defect-masks")
    defect = args.defect[0]
    return [Source(defect.replace(" ", "_"), prompt(args.object, defect), goods, masks,
                   bool(args.exact_masks), texture, fg_dir, fixed=bool(args.good))]


def category_sources(args, control: Path) -> list[Source]:
    """Every defect type the trimap branch was trained on (or --defect's), from --data's
    category: the good images of train/good, the masks of the run's split's training images only
    (split.json beside the branch, or --split), F from the category (meta.json, its foreground/
    folder, --texture, else the estimate), object and defect names from the branch's metadata."""
    try:
        cat = read_category(args.data, texture=True if args.texture else None,
                            object_name=args.object)
    except DataError as e:
        raise UsageError(f"--data {e}") from None
    if cat.layout == "mvtec" and not (Path(args.data) / "ground_truth").is_dir():
        raise UsageError(f"--data {args.data}: no ground_truth/ folder (MVTec AD layout)")
    split_path = Path(args.split) if args.split else control.parent / "split.json"
    if not split_path.is_file():
        raise UsageError(f"{split_path}: no split.json beside the trimap branch; pass --split "
                         "FILE (the run's few-shot split, written by minibldm.train)")
    split = read_json(split_path, UsageError)
    meta = branch_metadata(control)
    trained = meta.get("defects") or sorted(split.get("defects", {}))
    names = meta.get("objects", {}).get(cat.object_name) or meta.get("defect_names", {})
    object_name = args.object or meta.get("object") or cat.object_name
    wanted = args.defect or trained
    sources = []
    for want in wanted:
        folder = next((f for f in trained if want in (f, names.get(f), f.replace("_", " "))), None)
        if folder is None:
            raise UsageError(f"--defect {want}: the trimap branch {control} was trained on "
                             f"{', '.join(trained)}")
        if folder not in cat.defects:
            raise UsageError(f"--data {cat.root}: has no defect type {folder!r} (the branch's); "
                             "is it the category the run was trained on?")
        chosen = set(split.get("defects", {}).get(folder, {}).get("train", []))
        known = {cat.rel(img) for img, _ in cat.defects[folder]}
        if not chosen or not chosen <= known:
            raise UsageError(f"{split_path}: its {folder} training images are not those of "
                             f"{cat.root}; a split of another category?")
        masks = [m for img, m in cat.defects[folder] if cat.rel(img) in chosen]
        name = names.get(folder) or cat.defect_names.get(folder, folder.replace("_", " "))
        sources.append(Source(folder, prompt(object_name, name), cat.good, masks, False,
                              cat.texture, cat.foreground_dir, stream=folder, rel=cat.rel))
    return sources


def plan_source(args, source: Source) -> tuple[list[dict], bool]:
    """One plan per output image of `source` (k from --first, -n of them; exact masks: one per
    mask) and whether all masks were binary. Each plan: k, good (path), image (uint8 (H, W, 3)),
    mask M* and F (bool (H, W), the good image's size), info (the placement)."""
    read = [read_mask(f) for f in source.masks]
    binary = all(b for _, b in read)
    ks = range(args.first, args.first + args.n)
    if source.exact:
        ks = range(args.first, min(args.first + args.n, len(read)))
    plans, fg_cache, resized = [], {}, {}
    for k in ks:
        g = torch.Generator().manual_seed(image_seed(args.seed, k, source.stream))
        named = [p for p in source.goods if source.exact and p.name == source.masks[k].name]
        if source.fixed or named:  # --good, or a good image named like the exact mask
            good = (named or source.goods)[0]
        else:
            good = source.goods[int(torch.randint(len(source.goods), (1,), generator=g))]
        image = read_image(good)
        size = image.shape[:2]
        if good not in fg_cache:
            fg = foreground_for(good, image, fg_dir=source.fg_dir, texture=source.texture,
                                rel=source.rel(good) if source.rel else None)
            fg_cache[good] = fg > 0.5
        fg = fg_cache[good]
        if source.exact:
            m = read[k][0]
            if tuple(m.shape) != size and not args.resize_masks:
                raise UsageError(f"{source.masks[k]}: mask is {m.shape[1]}x{m.shape[0]} but its "
                                 f"image {good} is {size[1]}x{size[0]} (--resize-masks to resize)")
            mask, info = mask_to_tensor(m, size) > 0.5, {"mask_file": str(source.masks[k])}
        else:
            if size not in resized:  # the few-shot masks at this image's size, as training does
                resized[size] = [mask_to_tensor(m, size) for m, _ in read]
            try:
                mask, info = sample_defect_mask(resized[size], fg.float(), g,
                                                translate_only=args.translate_only)
            except PlacementError as e:
                raise UsageError(f"{good}: no placement of a defect mask inside the foreground ({e})")
            mask = mask > 0.5
            info["mask_file"] = str(source.masks[info["source"]])
        plans.append(dict(k=k, good=good, image=image, mask=mask, fg=fg, info=info))
    return plans, binary


def run_settings(args, stages: Stages, size: int) -> dict:
    """What names a run: the settings that decide its images (not -n, --first, --defect with
    --data, the batch size or the device). The same settings resume a run in OUT; others start a
    new one beside it."""
    keys = ["weights", "control", "seed", "guidance", "eta", "translate_only", "adapt_steps",
            "adapt_lr", "adapt_blocks", "bg_weight", "fg_weight", "paste_background", "precision",
            "latent_mask", "min_change", "redraws", "zoom"]
    keys += (["data", "split", "texture", "object"] if args.data else
             ["images", "defect_masks", "exact_masks", "good", "foreground", "texture", "object",
              "defect"])
    settings = {k: getattr(args, k) for k in keys}
    return {**settings, "size": size, "stages": vars(stages)}


def run_id(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def done_images(out: Path, run: str) -> set[tuple[str, int]]:
    """(defect folder, k) of run `run`'s images already written or dropped in OUT."""
    lines = [line for name in ("manifest.jsonl", "dropped.jsonl")
             if (out / "minibldm" / name).is_file()
             for line in (out / "minibldm" / name).read_text().splitlines()]
    records = [json.loads(line) for line in lines if line.strip()]
    return {(r["defect"], r["index"]) for r in records if r.get("run") == run}
