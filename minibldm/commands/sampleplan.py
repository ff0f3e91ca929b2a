"""Planning `python -m minibldm.sample`: every input is read and checked here, before anything
is written. One plan per output image: its good image x_OK, its defect mask M* (a real few-shot
mask placed by masks.sample_defect_mask, or an exact mask as it is), the foreground F."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..foreground import foreground_for
from ..images import IMAGE_SUFFIXES, mask_to_tensor, read_image, read_mask
from ..masks import PlacementError, sample_defect_mask
from ..pipeline import image_seed
from .common import UsageError


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


def read_masks(folder: Path, size: int, flag: str) -> tuple[list[torch.Tensor], list[Path], bool]:
    """The masks of `flag`'s folder at model resolution, their files, whether all were binary."""
    files = image_files(folder, flag)
    read = [(mask_to_tensor(m, size), binary) for m, binary in map(read_mask, files)]
    return [m for m, _ in read], files, all(binary for _, binary in read)


def plan_images(args, size: int) -> tuple[list[dict], bool]:
    """One entry per output image (source path, defect mask (size x size), foreground, info), and
    whether all masks were binary."""
    goods = image_files(Path(args.images), "--images")
    fg_dir = Path(args.foreground) if args.foreground else None
    texture = args.texture or (fg_dir is None and marked_texture(Path(args.images)))
    if args.exact_masks:
        masks, files, binary = read_masks(Path(args.exact_masks), size, "--exact-masks")
        jobs = [(k, f, m) for k, (f, m) in enumerate(zip(files, masks))][args.first:args.first + args.n]
    else:
        few, files, binary = read_masks(Path(args.defect_masks), size, "--defect-masks")
        jobs = [(k, None, None) for k in range(args.first, args.first + args.n)]
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
    return plans, binary
