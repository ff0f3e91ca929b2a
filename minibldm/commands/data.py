"""Reading a defect category and making AdaBLDM's training data from it: many good images of one
object or texture, a few (k = 10 per type) defect images with binary masks, and the trimap
branch's pairs, made on the fly by crop and paste inside the foreground (docs/METHOD.md).

Layouts read by `read_category`:

  MVTec AD   root/train/good/*             good images
             root/test/good/*              held-out good images (not used for training)
             root/test/<defect>/<stem>.*   defect images
             root/ground_truth/<defect>/<stem>_mask.png
  plain      root/good/*                   good images
             root/defects/<defect>/<stem>.*  defect images, each beside <stem>_mask.png

Optional in both: root/meta.json {"object": name, "texture": bool, "defects": {folder: name}}
and root/foreground/, foreground masks mirroring the image paths (foreground/train/good/000.png)
or named by stem. Every problem with the data is a `DataError`, one line naming the file.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from PIL import Image, UnidentifiedImageError

from .. import masks
from ..foreground import foreground_for
from ..images import (IMAGE_SUFFIXES, DataError, mask_to_tensor, read_image, read_mask,
                      resize_image, too_large)
from ..io import read_json, write_text_atomic
from ..pipeline import prompt as default_prompt


@dataclass
class Category:
    root: Path
    layout: str  # "mvtec" or "plain"
    good: list[Path]  # training good images, sorted
    test_good: list[Path]  # MVTec test/good, never used for training
    defects: dict[str, list[tuple[Path, Path]]]  # defect folder -> sorted (image, mask) pairs
    object_name: str  # as the prompt says it: "a {object_name} with a {defect name}"
    texture: bool  # True: the foreground F is the whole image
    defect_names: dict[str, str] = field(default_factory=dict)  # defect folder -> prompt name
    foreground_dir: Path | None = None  # user foreground masks, when root/foreground exists

    def rel(self, path: Path) -> str:
        """A path inside the category, relative to root, with forward slashes."""
        return Path(path).relative_to(self.root).as_posix()


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file()
                  and p.suffix.lower() in IMAGE_SUFFIXES and not p.stem.endswith("_mask"))


def mask_of(image: Path, folder: Path) -> Path | None:
    for name in (image.stem + "_mask", image.stem):
        for suffix in IMAGE_SUFFIXES:
            p = folder / (name + suffix)
            if p.is_file() and p != image:
                return p
    return None


def _size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size
    except Image.DecompressionBombError:
        raise too_large(path) from None
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{path}: not a readable image ({type(e).__name__})") from None


def read_category(root: str | Path, texture: bool | None = None,
                  object_name: str | None = None) -> Category:
    """Read a category in the MVTec AD or the plain layout (module docstring). The object name,
    texture flag and defect names come from root/meta.json, else from the folder names
    (underscores become spaces; texture False); `texture` and `object_name` override both."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder")
    if (root / "train" / "good").is_dir():
        layout, good_dir, defects_dir = "mvtec", root / "train" / "good", root / "test"
    elif (root / "good").is_dir():
        layout, good_dir, defects_dir = "plain", root / "good", root / "defects"
    else:
        raise DataError(f"{root}: neither train/good/ (MVTec AD layout) nor good/ (plain layout)")
    good = list_images(good_dir)
    if not good:
        raise DataError(f"{good_dir}: no good images ({', '.join(IMAGE_SUFFIXES)})")
    test_good = list_images(root / "test" / "good") if layout == "mvtec" and \
        (root / "test" / "good").is_dir() else []

    defects = {}
    for folder in sorted(defects_dir.iterdir()) if defects_dir.is_dir() else []:
        if not folder.is_dir() or folder.name == "good":
            continue
        mask_dir = root / "ground_truth" / folder.name if layout == "mvtec" else folder
        pairs = []
        for image in list_images(folder):
            mask = mask_of(image, mask_dir)
            if mask is None:
                raise DataError(f"{image}: defect image without a mask (looked for "
                                f"{mask_dir / (image.stem + '_mask.png')})")
            if _size(image) != _size(mask):
                raise DataError(f"{mask}: mask is {_size(mask)} px but its image {image.name} is "
                                f"{_size(image)} (width, height)")
            pairs.append((image, mask))
        if pairs:
            defects[folder.name] = pairs

    meta = read_meta(root / "meta.json") if (root / "meta.json").is_file() else {}
    names = {d: meta.get("defects", {}).get(d, d.replace("_", " ")) for d in defects}
    fg_dir = root / "foreground"
    return Category(
        root=root, layout=layout, good=good, test_good=test_good, defects=defects,
        object_name=object_name or meta.get("object") or root.resolve().name.replace("_", " "),
        texture=bool(meta.get("texture", False)) if texture is None else texture,
        defect_names=names, foreground_dir=fg_dir if fg_dir.is_dir() else None)


def read_meta(path: Path) -> dict:
    """A category's meta.json, its fields checked: {"object": str, "texture": bool, "defects":
    {folder: prompt name}}, each optional; anything else is a DataError naming the field."""
    meta = read_json(path, DataError)
    kinds = {"object": str, "texture": bool, "defects": dict}
    if not isinstance(meta, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    for key, kind in kinds.items():
        if key in meta and not isinstance(meta[key], kind):
            raise DataError(f"{path}: \"{key}\" must be a {kind.__name__} (JSON "
                            f"{ {str: 'string', bool: 'true/false', dict: 'object'}[kind]}), "
                            f"got {meta[key]!r}")
    if not all(isinstance(v, str) for v in meta.get("defects", {}).values()):
        raise DataError(f"{path}: \"defects\" maps folder names to prompt names (strings)")
    return meta


def make_split(category: Category, k: int = 10, seed: int = 0) -> dict:
    """Per defect type, k defect images for training and the rest for testing, chosen by the
    SHA-256 of "{seed}:{relative path}": the split depends on the seed and the file names alone.
    A type with fewer than k images is all train, listed under "short" and warned about. Returns
    {"k", "seed", "defects": {folder: {"train": [paths relative to the root], "test": [...]}},
    "short": {folder: count}}."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    out = {"k": k, "seed": seed, "defects": {}, "short": {}}
    for name, pairs in category.defects.items():
        rels = sorted((category.rel(img) for img, _ in pairs),
                      key=lambda r: hashlib.sha256(f"{seed}:{r}".encode()).hexdigest())
        out["defects"][name] = {"train": sorted(rels[:k]), "test": sorted(rels[k:])}
        if len(rels) < k:
            out["short"][name] = len(rels)
    if out["short"]:
        warnings.warn(f"{category.root}: fewer than k={k} defect images for "
                      + ", ".join(f"{d} ({n})" for d, n in out["short"].items())
                      + "; all of them are used for training and none is left for testing")
    return out


def load_or_make_split(path: str | Path, category: Category, k: int = 10, seed: int = 0,
                       write: bool = True) -> dict:
    """The split stored at `path` (split.json) if it exists, else a new `make_split`, written
    there atomically when `write`. A stored split made with another k or seed, or naming files the category
    no longer has, is a DataError (delete the file or pass its k and seed)."""
    path = Path(path)
    if path.is_file():
        split = read_json(path, DataError)
        if split.get("k") != k or split.get("seed") != seed:
            raise DataError(f"{path}: made with k={split.get('k')}, seed={split.get('seed')} but "
                            f"k={k}, seed={seed} was asked; pass those or delete the file")
        known = {category.rel(img) for pairs in category.defects.values() for img, _ in pairs}
        for name, part in split.get("defects", {}).items():
            missing = [r for r in part["train"] + part["test"] if r not in known]
            if missing:
                raise DataError(f"{path}: lists {missing[0]} ({name}), which is not in "
                                f"{category.root}; delete the file to make a new split")
        return split
    split = make_split(category, k, seed)
    if write:
        write_text_atomic(path, json.dumps(split, indent=1))
    return split


def item_generator(seed: int, i: int) -> torch.Generator:
    """The generator of item i: a function of (seed, i) alone, so any item can be remade."""
    return torch.Generator().manual_seed(seed * 1_000_003 + i)


class DecodedImages:
    """Decoded images at one size, kept in a small LRU cache: uint8 (3, S, S) images, bool
    (S, S) masks and foregrounds."""

    def __init__(self, category: Category, size: int, cache_dir: str | Path | None,
                 capacity: int):
        self.category, self.size, self.cache_dir = category, size, cache_dir
        self.capacity, self.items = capacity, OrderedDict()

    def _get(self, key: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        if key in self.items:
            self.items.move_to_end(key)
            return self.items[key]
        value = self.items[key] = make()
        if len(self.items) > self.capacity:
            self.items.popitem(last=False)
        return value

    def image(self, path: Path) -> torch.Tensor:
        return self._get(("image", path), lambda: torch.from_numpy(
            resize_image(read_image(path), self.size).copy()).permute(2, 0, 1))

    def mask(self, path: Path) -> torch.Tensor:
        return self._get(("mask", path),
                         lambda: mask_to_tensor(read_mask(path)[0], self.size) > 0.5)

    def foreground(self, path: Path) -> torch.Tensor:
        c = self.category
        return self._get(("foreground", path), lambda: mask_to_tensor(foreground_for(
            path, None, fg_dir=c.foreground_dir, texture=c.texture, cache_dir=self.cache_dir,
            rel=c.rel(path)), self.size) > 0.5)


class PairDataset(torch.utils.data.Dataset):
    """The trimap branch's training pairs, made on the fly by crop and paste (masks.paste_defect).

    Item i is a function of (seed, i) alone: the good image, the defect type (of `defects`,
    default all in the split), its training image, the affine, the position inside the good
    image's foreground F, and the empty-prompt draw. Returns {"image": (3, S, S) composite in
    [-1, 1], "hint": (3, S, S) trimap, "mask": (1, S, S), "prompt", "defect": folder, "info":
    {good, source, angle, scale, shrink, y, x}}. Images, masks and F are resized (not cropped) to
    S x S; F is `foreground.foreground_for`'s (estimates cached in `cache_dir`). A defect that fits
    inside the F of none of 10 good images tried is a DataError.
    """

    def __init__(self, category: Category, split: dict, size: int = 256,
                 defects: list[str] | None = None, object_name: str | None = None,
                 p_empty_prompt: float = 0.1, seed: int = 0, length: int = 20_000,
                 cache_dir: str | Path | None = None, translate_only: bool = False,
                 cache_size: int = 2048):
        self.category, self.size, self.seed, self.length = category, size, seed, length
        self.p_empty_prompt, self.translate_only = p_empty_prompt, translate_only
        self.object_name = object_name or category.object_name
        names = defects if defects is not None else sorted(split["defects"])
        self.train = {}  # defect folder -> [(image, mask)] of its k training images
        for name in names:
            if name not in category.defects:
                raise DataError(f"{category.root}: no defect type {name!r} (has: "
                                f"{', '.join(category.defects) or 'none'})")
            chosen = set(split["defects"].get(name, {}).get("train", []))
            self.train[name] = [(i, m) for i, m in category.defects[name]
                                if category.rel(i) in chosen]
            if not self.train[name]:
                raise DataError(f"{category.root}: the split has no training image of {name!r}")
        self.defects = names
        self.decoded = DecodedImages(category, size, cache_dir, cache_size)

    def __len__(self) -> int:
        return self.length

    def files(self):
        """(DecodedImages method, path) of every file the pairs are made from."""
        for pairs in self.train.values():
            for image, mask in pairs:
                yield from (("image", image), ("mask", mask))
        for good in self.category.good:
            yield from (("image", good), ("foreground", good))

    def __getitem__(self, i: int) -> dict:
        """Pair i (METHOD.md (6)): the defect pasted into the good image, and its trimap (4)."""
        g = item_generator(self.seed, i)
        defect = self.defects[torch.randint(len(self.defects), (1,), generator=g).item()]
        pairs = self.train[defect]
        j = torch.randint(len(pairs), (1,), generator=g).item()
        d_img, d_mask = self.decoded.image(pairs[j][0]), self.decoded.mask(pairs[j][1])
        good_paths = self.category.good
        for _ in range(10):
            good = good_paths[torch.randint(len(good_paths), (1,), generator=g).item()]
            fg = self.decoded.foreground(good)
            try:
                image, mask, info = masks.paste_defect(
                    self.decoded.image(good).float() / 127.5 - 1, d_img.float() / 127.5 - 1,
                    d_mask.float(), fg.float(), g, translate_only=self.translate_only)
                break
            except masks.PlacementError as e:
                last = f"{good}: {e}"
        else:
            raise DataError(f"{pairs[j][0]}: fits inside the foreground of none of 10 good "
                            f"images tried; last: {last}")
        empty = torch.rand(1, generator=g).item() < self.p_empty_prompt
        name = self.category.defect_names.get(defect, defect)
        return {"image": image, "hint": masks.trimap(mask, fg), "mask": mask[None],
                "prompt": "" if empty else default_prompt(self.object_name, name),
                "defect": defect,
                "info": {"good": self.category.rel(good), "source": self.category.rel(pairs[j][0]),
                         **info}}


class GoodDataset(torch.utils.data.Dataset):
    """The domain stage's images (UNet or autoencoder): every good training image and every
    few-shot training defect image of the split (each listed `defect_repeat` times), with prompts.

    Item i is image i mod N, flipped left-right and up-down with probability 1/2 each, its prompt
    "" with probability `p_empty_prompt`, all drawn from (seed, i) alone: a `length` of N·epochs
    gives each epoch its own flips. Returns {"image": (3, S, S) in [-1, 1], "mask": (1, S, S)
    (zeros for a good image), "prompt", "defect": folder or ""}.
    """

    def __init__(self, category: Category, size: int = 256, seed: int = 0,
                 prompt_fn: Callable[[str, str | None], str] = default_prompt,
                 split: dict | None = None, p_empty_prompt: float = 0.1,
                 length: int | None = None, cache_size: int = 2048, defect_repeat: int = 1):
        self.items = [(p, "", None) for p in category.good]  # (image, defect folder, mask)
        for name, part in (split or {"defects": {}})["defects"].items():
            chosen = set(part["train"])
            self.items += [(img, name, m) for img, m in category.defects.get(name, [])
                           if category.rel(img) in chosen] * defect_repeat
        self.category, self.size, self.seed, self.prompt_fn = category, size, seed, prompt_fn
        self.p_empty_prompt = p_empty_prompt
        self.length = length if length is not None else len(self.items)
        self.decoded = DecodedImages(category, size, None, cache_size)

    def __len__(self) -> int:
        return self.length

    def files(self):
        """(DecodedImages method, path) of every file the items read."""
        for path, _, mask in dict.fromkeys(self.items):
            yield ("image", path)
            if mask is not None:
                yield ("mask", mask)

    def __getitem__(self, i: int) -> dict:
        g = item_generator(self.seed, i)
        path, defect, mask_path = self.items[i % len(self.items)]
        image = self.decoded.image(path).float() / 127.5 - 1
        mask = (self.decoded.mask(mask_path).float()[None] if mask_path is not None
                else torch.zeros(1, *image.shape[1:]))
        flip_lr, flip_ud, empty = (torch.rand(3, generator=g) < torch.tensor(
            [0.5, 0.5, self.p_empty_prompt])).tolist()
        if flip_lr:
            image, mask = image.flip(-1), mask.flip(-1)
        if flip_ud:
            image, mask = image.flip(-2), mask.flip(-2)
        name = self.category.defect_names.get(defect, defect) if defect else None
        prompt = "" if empty else self.prompt_fn(self.category.object_name, name)
        return {"image": image, "mask": mask, "prompt": prompt, "defect": defect}
