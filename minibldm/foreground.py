"""The foreground F of a good image (AdaBLDM, arXiv 2402.19330, "trimap"): the user's mask,
all ones for a texture, or estimated without labels and cached on disk.

The estimate follows the reference code's border heuristic (2-means on per-pixel features; the
cluster holding most of a 3-pixel border is background; a 5x5 closing), here on hand-made
features instead of CNN features.
"""
from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .images import IMAGE_SUFFIXES, DataError, read_image, read_mask
from .io import atomic_path
from .masks import dilate, erode, fill_holes, largest_component

FOREGROUND_METHOD = "kmeans2-border-v2"  # in the cache key: change it with the estimate


def _features(rgb: Tensor) -> Tensor:
    """Per-pixel features of a (3, H, W) image in [0, 1], (H*W, 7): colour (luminance and two
    opponent colours, 3x3 means) and texture (the luminance's local mean and standard deviation
    over 7x7 and 21x21 windows). Centred; the colour columns share one scale (so the chroma of a
    grey image stays near 0), each texture column has unit variance."""
    r, g, b = rgb
    lum = (r + g + b) / 3
    chans = [lum, r - g, (r + g) / 2 - b]
    feats = [F.avg_pool2d(c[None, None], 3, 1, 1, count_include_pad=False)[0, 0] for c in chans]
    for k in (7, 21):
        mean = F.avg_pool2d(lum[None, None], k, 1, k // 2, count_include_pad=False)[0, 0]
        sq = F.avg_pool2d(lum[None, None] ** 2, k, 1, k // 2, count_include_pad=False)[0, 0]
        feats += [mean, (sq - mean ** 2).clamp_min(0).sqrt()]
    x = torch.stack(feats, -1).reshape(-1, len(feats))  # (H*W, 7)
    x = x - x.mean(0)
    colour = x[:, :3] / (x[:, :3].square().sum(1).mean().sqrt() / math.sqrt(3) + 1e-3)
    return torch.cat([colour, x[:, 3:] / (x[:, 3:].std(0) + 1e-3)], 1)


def _two_means(x: Tensor, first: Tensor, iters: int = 20) -> tuple[Tensor, Tensor]:
    """k-means with k = 2 on (N, D) points. The first centre is `first`; the second is drawn
    k-means++ style (probability ∝ squared distance) from a generator seeded with 0, so the
    result is deterministic. A point goes to the nearer centre: centre 1 when
    x·(c1 - c0) > (|c1|² - |c0|²) / 2. Returns (labels (N,) int64, centres (2, D))."""
    g = torch.Generator().manual_seed(0)
    d2 = ((x - first) ** 2).sum(1)
    centres = torch.stack([first, x[torch.multinomial(d2 + 1e-12, 1, generator=g)[0]]])

    def assign(c: Tensor) -> Tensor:
        return (x @ (c[1] - c[0]) > (c[1].square().sum() - c[0].square().sum()) / 2).long()

    for _ in range(iters):
        labels = assign(centres)
        for j in range(2):
            if (labels == j).any():
                centres[j] = x[labels == j].mean(0)
    return assign(centres), centres


def estimate_foreground(image: np.ndarray | Tensor, work_size: int = 256,
                        min_border_purity: float = 0.8, min_separation: float = 20.0,
                        max_hole: float = 0.05) -> Tensor:
    """Estimate the foreground F of a uint8 (H, W, 3) image without labels; returns (H, W) {0, 1}.

    The reference code's border heuristic on hand-made features: at a working size of at most
    `work_size` pixels a side, cluster per-pixel features (`_features`: colour, local mean and
    std at two scales) into 2 groups, starting from the mean of a 3-pixel border; the group
    holding most of that border is background. Then a 5x5 closing, the largest component, and
    hole filling for holes smaller than `max_hole` of it (a washer's hole stays background).

    Textures have no background; F is then all ones. That is decided when (a) less than
    `min_border_purity` of the border falls in one group (the border is not one background), or
    (b) the groups' colour separation, the squared distance of their mean colours over the
    mean within-group variance along that direction, is below `min_separation` (halving one
    Gaussian spread gives 7, a uniform one 12: a texture under uneven light; the 1,340 magnetic
    tile images give at most 17 where (a) does not already apply, shaded synthetic objects on a
    dark table 22 to 35, flat ones 100s), or (c) the estimate covers less than 1% of the image.
    """
    img = image.to(torch.uint8) if isinstance(image, Tensor) else torch.from_numpy(
        np.array(image, dtype=np.uint8))
    if img.ndim == 2:
        img = img[..., None].expand(*img.shape, 3)
    H, W = img.shape[:2]
    rgb = img[..., :3].permute(2, 0, 1).float() / 255  # (3, H, W)
    f = work_size / max(H, W)
    if f < 1:
        h, w = max(1, round(H * f)), max(1, round(W * f))
        rgb = F.interpolate(rgb[None], size=(h, w), mode="area")[0]
    h, w = rgb.shape[1:]
    x = _features(rgb)

    border = torch.ones(h, w, dtype=torch.bool)
    border[3:-3, 3:-3] = False
    border = border.reshape(-1)
    labels, _ = _two_means(x, x[border].mean(0))
    bg = labels[border].mode().values
    purity = (labels[border] == bg).float().mean().item()
    if purity < min_border_purity or labels.min() == labels.max():
        return torch.ones(H, W)
    colour = x[:, :3]
    c0, c1 = colour[labels == 0].mean(0), colour[labels == 1].mean(0)
    proj = colour @ ((c1 - c0) / (c1 - c0).norm().clamp_min(1e-12))  # (N,) along c1 - c0
    within = sum(((proj[labels == j] - proj[labels == j].mean()) ** 2).sum() for j in range(2))
    if (c1 - c0).square().sum() / (within / len(x) + 1e-12) < min_separation:
        return torch.ones(H, W)

    fg = (labels != bg).float().reshape(h, w)
    fg = erode(dilate(fg, 5), 5)  # 5x5 closing (reference)
    fg = largest_component(fg)
    fg = fill_holes(fg, max_area=max_hole * fg.sum().item())
    if fg.mean() < 0.01:
        return torch.ones(H, W)
    if (h, w) != (H, W):
        fg = F.interpolate(fg[None, None], size=(H, W), mode="bilinear", align_corners=False)[0, 0]
    return (fg > 0.5).float()


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/minibldm/foreground, else ~/.cache/minibldm/foreground."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "minibldm" / "foreground"


def _find_mask(folder: Path, rel: Path) -> Path | None:
    """The mask for image `rel` in `folder`: the mirrored path folder/rel (any image suffix,
    optionally `_mask`), else the same stem at the top of the folder."""
    for parent in ([folder / rel.parent] if rel.parent != Path(".") else []) + [folder]:
        for name in (rel.stem, rel.stem + "_mask"):
            for suffix in IMAGE_SUFFIXES:
                p = parent / (name + suffix)
                if p.is_file():
                    return p
    return None


def foreground_for(image_path: str | Path, image: np.ndarray | None = None,
                   fg_dir: str | Path | None = None, texture: bool = False,
                   cache_dir: str | Path | None = None, rel: str | Path | None = None) -> Tensor:
    """F for one image, (H, W) float {0, 1}, by the rule of METHOD.md §2:

    * `fg_dir` given: the user's mask for this image, found at fg_dir/`rel` (the image's path
      inside its category, e.g. train/good/000.png, any suffix) or by the image's stem at the top
      of fg_dir (`000.png` or `000_mask.png`); a missing or empty mask is a `DataError`;
    * `texture`: all ones;
    * otherwise `estimate_foreground`, computed once per image and cached as a 0/255 PNG in
      `cache_dir` (default `default_cache_dir()`), keyed by the SHA-256 of the image file's bytes
      and `FOREGROUND_METHOD`, written atomically.

    `image` is the decoded uint8 (H, W, 3) image; it is read from `image_path` when not given.
    """
    image_path = Path(image_path)
    if fg_dir is not None:
        found = _find_mask(Path(fg_dir), Path(rel) if rel is not None else Path(image_path.name))
        if found is None:
            raise DataError(f"{image_path}: no foreground mask for it in {fg_dir}")
        fg, _ = read_mask(found)
        if image is not None and tuple(fg.shape) != tuple(image.shape[:2]):
            raise DataError(f"{found}: foreground mask is {tuple(fg.shape)} px but its image "
                            f"{image_path.name} is {tuple(image.shape[:2])} (height, width)")
        return fg
    if image is None:
        image = read_image(image_path)
    if texture:
        return torch.ones(image.shape[:2])

    digest = hashlib.sha256(FOREGROUND_METHOD.encode() + b"\0" + image_path.read_bytes())
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cached = cache / f"{digest.hexdigest()}.png"
    try:
        with Image.open(cached) as im:
            fg = torch.from_numpy(np.asarray(im.convert("L")) > 127).float()
        if tuple(fg.shape) == tuple(image.shape[:2]):
            return fg
    except OSError:  # not cached yet (or a damaged entry): compute it
        pass
    fg = estimate_foreground(image)
    try:  # write through a temporary file, so readers never see half a PNG
        with atomic_path(cached) as tmp:
            Image.fromarray((fg.numpy() * 255).astype(np.uint8)).save(tmp, format="PNG")
    except OSError:  # a read-only cache only costs the recomputation
        pass
    return fg
