"""Masks for AdaBLDM: the trimap Γ, the foreground F, and the sampling of defect masks.

AdaBLDM: Li et al., "A Novel Approach to Industrial Defect Generation through Blended Latent
Diffusion Model with Online Adaptation", arXiv 2402.19330 (see docs/ADABLDM.md).

  * Trimap Γ: 1 on the defect mask M*, 0.5 on the foreground F, 0 elsewhere, on 3 channels.
  * Foreground F: from the user's folder, all ones for textures, or estimated without labels by
    the reference code's border heuristic (2-means; the cluster holding most of a 3-pixel border
    is background; a 5x5 closing), here on hand-made features instead of CNN features.
  * Defect mask sampling (paper): a random few-shot mask, a random rotation in [0°, 360°) and
    scale in [0.85, 1.15] about its bounding-box centre, then a translation that puts every mask
    pixel on F, shrinking by 0.9 while it cannot fit. `translate_only` is the reference code's
    test-time mode.
  * Training pairs (crop and paste): the same transform applied to a few-shot defect's pixels
    and mask, pasted into a good image inside F.

Conventions: masks are float tensors (H, W) holding 0 and 1; images are float (C, H, W); angles
are degrees, counter-clockwise as seen on screen (PIL's `Image.rotate`); all randomness comes from
an explicit `torch.Generator`, so a draw is reproducible from its seed.
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

from .io import atomic_path

ROTATION = (0.0, 360.0)  # degrees, paper
SCALE = (0.85, 1.15)  # paper
FOREGROUND_METHOD = "kmeans2-border-v2"  # in the cache key: change it with the estimate


class PlacementError(ValueError):
    """A defect mask that cannot be put inside the foreground. The caller adds the image name."""


# ---- trimap and morphology ------------------------------------------------------------------

def trimap(defect_mask: Tensor, foreground: Tensor) -> Tensor:
    """Γ (ADABLDM.md "Trimap"): 1 where the defect mask is 1, else 0.5 where the foreground is 1,
    else 0; shape (3, H, W), float (the reference stores 0/127/255 and divides by 255)."""
    g = torch.where(foreground > 0.5, 0.5, 0.0)
    g = torch.where(defect_mask > 0.5, 1.0, g).float()
    return g.expand(3, *g.shape).clone()


def dilate(mask: Tensor, k: int) -> Tensor:
    """Binary dilation by a k x k square (k odd), as a max-pool; pixels beyond the border are
    ignored. (..., H, W) in, same shape out (the sampler's 5x5 dilation of the latent mask)."""
    if k % 2 != 1:
        raise ValueError(f"dilate needs an odd kernel size, got {k}")
    x = mask.float().reshape(-1, 1, *mask.shape[-2:])
    return F.max_pool2d(x, k, stride=1, padding=k // 2).reshape(mask.shape)


def erode(mask: Tensor, k: int) -> Tensor:
    """Binary erosion by a k x k square; pixels beyond the border count as 1 (no edge erosion)."""
    return 1.0 - dilate(1.0 - mask.float(), k)


def components(mask: Tensor) -> Tensor:
    """8-connected components of an (H, W) mask: int64 labels (H, W), each component labelled by
    the smallest flat index of its pixels, -1 off the mask. Each round takes the minimum label
    over the 3x3 neighbourhood (a min-pool) and then follows labels to their own labels (pointer
    jumping), so it takes few rounds even for long shapes."""
    H, W = mask.shape
    on, n = mask > 0.5, H * W
    lab = torch.where(on, torch.arange(n).reshape(H, W), n)  # n: off the mask
    while True:
        nb = -F.max_pool2d(-lab[None, None].double(), 3, stride=1, padding=1)[0, 0]
        flat = torch.cat([torch.where(on, torch.minimum(lab, nb.long()), n).flatten(),
                          torch.tensor([n])])
        while True:  # pointer jumping: a label is a pixel index; take that pixel's label
            jumped = flat[flat]
            if torch.equal(jumped, flat):
                break
            flat = jumped
        new = flat[:n].reshape(H, W)
        if torch.equal(new, lab):
            return torch.where(on, lab, -1)
        lab = new


def count_components(mask: Tensor) -> int:
    """The number of 8-connected components of an (H, W) mask."""
    return int((components(mask).unique() >= 0).sum())


def fill_holes(mask: Tensor, max_area: float = float("inf")) -> Tensor:
    """Set to 1 every background region of an (H, W) mask that does not touch the image border
    and has fewer than `max_area` pixels."""
    lab = components(1.0 - mask.float())
    border = torch.cat([lab[0], lab[-1], lab[:, 0], lab[:, -1]]).unique()
    ids, counts = lab[lab >= 0].unique(return_counts=True)
    holes = ids[(counts < max_area) & ~torch.isin(ids, border)]
    return torch.where(torch.isin(lab, holes), 1.0, mask.float())


def largest_component(mask: Tensor) -> Tensor:
    """The largest 8-connected component of an (H, W) mask (all zeros for an empty mask)."""
    lab = components(mask)
    if not (lab >= 0).any():
        return torch.zeros(mask.shape)
    ids, counts = lab[lab >= 0].unique(return_counts=True)
    return (lab == ids[counts.argmax()]).float()


# ---- foreground F ---------------------------------------------------------------------------

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
    from .data import IMAGE_SUFFIXES
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
    """F for one image, (H, W) float {0, 1}, by the rule of ADABLDM.md "Trimap Γ":

    * `fg_dir` given: the user's mask for this image, found at fg_dir/`rel` (the image's path
      inside its category, e.g. train/good/000.png, any suffix) or by the image's stem at the top
      of fg_dir (`000.png` or `000_mask.png`); a missing or empty mask is a `DataError`;
    * `texture`: all ones;
    * otherwise `estimate_foreground`, computed once per image and cached as a 0/255 PNG in
      `cache_dir` (default `default_cache_dir()`), keyed by the SHA-256 of the image file's bytes
      and `FOREGROUND_METHOD`, written atomically.

    `image` is the decoded uint8 (H, W, 3) image; it is read from `image_path` when not given.
    """
    from .data import DataError, read_image, read_mask  # data imports this module
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


# ---- defect mask sampling (paper) -----------------------------------------------------------

def bbox(mask: Tensor) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1), inclusive, of the pixels of an (H, W) mask that are 1."""
    ys, xs = torch.nonzero(mask > 0.5, as_tuple=True)
    if len(ys) == 0:
        raise ValueError("the mask is empty")
    return ys.min().item(), ys.max().item(), xs.min().item(), xs.max().item()


def affine_crop(mask: Tensor, angle: float = 0.0, scale: float = 1.0,
                image: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Rotate by `angle` degrees and scale by `scale` about the centre of the mask's bounding box;
    return the result cropped to its new bounding box: (mask (h, w), image (C, h, w) or None).

    `mask` is (H, W); `image`, when given, is (C, H, W), sampled by the same map bilinearly
    (beyond its edge, the edge pixel). The mask is sampled bilinearly and thresholded at 0.5; when
    that splits it into more pieces than it had (masks about a pixel wide, like thin cracks), at
    0.4, 0.3, 0.2, 0.1 or half its peak, the first that does not. angle = 0, scale = 1 returns
    the exact bounding-box crop, and quarter turns at scale 1 are exact too.
    """
    y0, y1, x0, x1 = bbox(mask)
    cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    hy, hx = (y1 - y0 + 1) / 2, (x1 - x0 + 1) / 2
    ho = math.ceil(2 * scale * (abs(c) * hy + abs(s) * hx) - 1e-6) + 2  # 1 px margin each side
    wo = math.ceil(2 * scale * (abs(s) * hy + abs(c) * hx) - 1e-6) + 2
    # the parity of the source box side that each output axis runs along (the height near 0° and
    # 180°, the width near 90° and 270°): then quarter turns at scale 1 map pixel centres onto
    # pixel centres, and a one-pixel mask is sampled at its centre
    side_y, side_x = y1 - y0 + 1, x1 - x0 + 1
    along_y, along_x = (side_y, side_x) if abs(c) >= abs(s) else (side_x, side_y)
    ho += (ho - along_y) % 2
    wo += (wo - along_x) % 2
    uy = torch.arange(ho, dtype=torch.float64) - (ho - 1) / 2  # output offsets from the centre
    ux = torch.arange(wo, dtype=torch.float64) - (wo - 1) / 2
    uy, ux = torch.meshgrid(uy, ux, indexing="ij")
    # inverse map: source = centre + R(angle)^-1 u / scale; on screen (y down), a counter-
    # clockwise rotation sends (dx, dy) to (c dx + s dy, -s dx + c dy)
    sx = cx + (c * ux - s * uy) / scale
    sy = cy + (s * ux + c * uy) / scale

    def sample(x: Tensor, padding: str) -> Tensor:  # bilinear; x (C, H, W), pixel coordinates
        Hs, Ws = x.shape[-2:]
        grid = torch.stack([(2 * sx + 1) / Ws - 1, (2 * sy + 1) / Hs - 1], -1)  # (ho, wo, 2)
        return F.grid_sample(x[None].double(), grid[None], mode="bilinear", padding_mode=padding,
                             align_corners=False)[0].to(x.dtype)

    v = sample(mask[None].float(), "zeros")[0]
    if v.max() <= 0:
        raise ValueError(f"the mask vanishes at scale {scale}")
    pieces = count_components(mask[y0:y1 + 1, x0:x1 + 1])
    for t in (0.5, 0.4, 0.3, 0.2, 0.1, v.max().item() / 2):
        m = (v > t).float()
        if m.any() and count_components(m) <= pieces:
            break
    Y0, Y1, X0, X1 = bbox(m)
    out = None if image is None else sample(image, "border")[:, Y0:Y1 + 1, X0:X1 + 1]
    return m[Y0:Y1 + 1, X0:X1 + 1], out


def random_affine(mask: Tensor, generator: torch.Generator,
                  rotation: tuple[float, float] = ROTATION, scale: tuple[float, float] = SCALE,
                  image: Tensor | None = None) -> tuple[Tensor, Tensor | None, dict]:
    """The paper's random affine: angle ~ U[rotation) degrees, scale ~ U[scale), applied by
    `affine_crop`. Returns (mask crop, image crop or None, {"angle": a, "scale": s})."""
    angle, s = _draw_affine(generator, rotation, scale)
    m, img = affine_crop(mask, angle, s, image)
    return m, img, {"angle": angle, "scale": s}


def _draw_affine(generator: torch.Generator, rotation: tuple[float, float],
                 scale: tuple[float, float]) -> tuple[float, float]:
    u = torch.rand(2, generator=generator, dtype=torch.float64)
    angle = rotation[0] + (rotation[1] - rotation[0]) * u[0].item()
    return angle, scale[0] + (scale[1] - scale[0]) * u[1].item()


def valid_positions(mask_crop: Tensor, foreground: Tensor) -> Tensor:
    """Bool (H - h + 1, W - w + 1): True at (y, x) when the (h, w) crop pasted with its top-left
    corner there has every mask pixel on the (H, W) foreground. The count of mask pixels off F is
    a correlation of (1 - F) with the crop, done by FFT so its cost does not grow with the crop
    (no wrap-around reaches the valid corner positions)."""
    (h, w), (H, W) = mask_crop.shape, foreground.shape
    if h > H or w > W:
        return torch.zeros(max(H - h + 1, 0), max(W - w + 1, 0), dtype=torch.bool)
    off = torch.fft.rfft2((foreground <= 0.5).double())
    ker = torch.fft.rfft2((mask_crop > 0.5).double(), s=(H, W))
    count = torch.fft.irfft2(off * ker.conj(), s=(H, W))[:H - h + 1, :W - w + 1]
    return count < 0.5


def _transform_and_place(mask: Tensor, foreground: Tensor, generator: torch.Generator,
                         angle: float, scale: float, image: Tensor | None, max_shrinks: int,
                         shrink: float) -> tuple[Tensor, Tensor | None, dict]:
    """affine_crop at scale·shrinkᵏ for k = 0, 1, ... until some position puts the crop inside
    F; the position is uniform over all such positions. Returns (crop, image crop, info)."""
    for k in range(max_shrinks + 1):
        m, img = affine_crop(mask, angle, scale * shrink ** k, image)
        ok = valid_positions(m, foreground)
        n = int(ok.sum())
        if n > 0:
            j = torch.randint(n, (1,), generator=generator).item()
            y, x = torch.nonzero(ok)[j].tolist()
            return m, img, {"shrink": shrink ** k, "y": y, "x": x}
    y0, y1, x0, x1 = bbox(mask)
    raise PlacementError(f"a {y1 - y0 + 1}x{x1 - x0 + 1} px defect mask does not fit inside the "
                         f"foreground ({int((foreground > 0.5).sum())} of {foreground.numel()} "
                         f"px) even shrunk to {shrink ** max_shrinks:.2f}x")


def _canvas(crop: Tensor, y: int, x: int, like: Tensor) -> Tensor:
    """`crop` (..., h, w) written at (y, x) into zeros shaped like `like` (..., H, W)."""
    out = torch.zeros_like(like, dtype=crop.dtype)
    out[..., y:y + crop.shape[-2], x:x + crop.shape[-1]] = crop
    return out


def place_in_foreground(mask_crop: Tensor, foreground: Tensor, generator: torch.Generator,
                        max_shrinks: int = 10, shrink: float = 0.9) -> tuple[Tensor, dict]:
    """Translate a mask (its bounding box is used) to a random position where every mask pixel
    lies on F, shrinking it by `shrink` (up to `max_shrinks` times) while no position fits.
    Returns the full (H, W) mask and {"shrink", "y", "x"} (top-left corner of the bounding box);
    raises PlacementError when even the smallest size does not fit."""
    m, _, info = _transform_and_place(mask_crop, foreground, generator, 0.0, 1.0, None,
                                      max_shrinks, shrink)
    return _canvas(m, info["y"], info["x"], foreground.float()), info


def sample_defect_mask(few_shot_masks: list[Tensor], foreground: Tensor,
                       generator: torch.Generator, translate_only: bool = False,
                       rotation: tuple[float, float] = ROTATION,
                       scale: tuple[float, float] = SCALE, max_shrinks: int = 10,
                       shrink: float = 0.9) -> tuple[Tensor, dict]:
    """Defect mask sampling (ADABLDM.md): a random few-shot mask, the random affine (skipped with
    `translate_only`, the reference code's test-time mode), then a placement inside F.

    The masks are (H_i, W_i) at the same pixel scale as `foreground` (H, W). Returns the full
    (H, W) mask and a JSON-able info {"source": index, "angle", "scale", "shrink", "y", "x"}.
    """
    i = torch.randint(len(few_shot_masks), (1,), generator=generator).item()
    angle, s = (0.0, 1.0) if translate_only else _draw_affine(generator, rotation, scale)
    m, _, info = _transform_and_place(few_shot_masks[i], foreground, generator, angle, s, None,
                                      max_shrinks, shrink)
    return (_canvas(m, info["y"], info["x"], foreground.float()),
            {"source": i, "angle": angle, "scale": s, **info})


def paste_defect(good_image: Tensor, defect_image: Tensor, defect_mask: Tensor,
                 foreground: Tensor, generator: torch.Generator, translate_only: bool = False,
                 rotation: tuple[float, float] = ROTATION, scale: tuple[float, float] = SCALE,
                 max_shrinks: int = 10, shrink: float = 0.9) -> tuple[Tensor, Tensor, dict]:
    """A training pair by crop and paste (ADABLDM.md "Training the trimap branch").

    The defect's bounding box is taken from `defect_image` (C, h, w) and `defect_mask` (h, w),
    both get the same random affine, and they are pasted at a random position inside F (H, W) of
    `good_image` (C, H, W): composite = transformed defect pixels where the transformed mask is
    1, the good image elsewhere. Returns (composite (C, H, W), pasted mask (H, W), info) with info
    {"angle", "scale", "shrink", "y", "x"}; the pasted pixels are exactly
    affine_crop(defect_mask, angle, scale * shrink, defect_image).
    """
    angle, s = (0.0, 1.0) if translate_only else _draw_affine(generator, rotation, scale)
    m, img, info = _transform_and_place(defect_mask, foreground, generator, angle, s,
                                        defect_image, max_shrinks, shrink)
    mask = _canvas(m, info["y"], info["x"], foreground.float())
    pixels = _canvas(img, info["y"], info["x"], good_image)
    composite = torch.where(mask > 0.5, pixels, good_image)
    return composite, mask, {"angle": angle, "scale": s, **info}
