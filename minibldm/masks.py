"""Masks for AdaBLDM: the trimap Γ and the sampling of defect masks (docs/METHOD.md §2-4).

AdaBLDM: Li et al., "A Novel Approach to Industrial Defect Generation through Blended Latent
Diffusion Model with Online Adaptation", arXiv 2402.19330.

  * Trimap Γ: 1 on the defect mask M*, 0.5 on the foreground F (foreground.py), 0 elsewhere.
  * Defect mask sampling (paper): a random few-shot mask, rotated in [0°, 360°) and scaled in
    [0.85, 1.15] about its bounding-box centre, then translated so every pixel lies on F,
    shrinking by 0.9 while it cannot fit (`translate_only`: the reference code's test mode).
  * Training pairs: the same transform on a few-shot defect's pixels and mask, pasted inside F.

Masks are float (H, W) tensors of 0 and 1, images float (C, H, W); angles are degrees,
counter-clockwise on screen (PIL's `Image.rotate`); randomness comes from an explicit
`torch.Generator`, so a draw is reproducible from its seed.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

ROTATION = (0.0, 360.0)  # degrees, paper
SCALE = (0.85, 1.15)  # paper


class PlacementError(ValueError):
    """A defect mask that cannot be put inside the foreground. The caller adds the image name."""


# ---- trimap and morphology ------------------------------------------------------------------

def trimap(defect_mask: Tensor, foreground: Tensor) -> Tensor:
    """Γ, METHOD.md (4): 1 where the defect mask is 1, else 0.5 where the foreground is 1,
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


def draw_affine(generator: torch.Generator, rotation: tuple[float, float] = ROTATION,
                scale: tuple[float, float] = SCALE) -> tuple[float, float]:
    """The paper's random affine, for `affine_crop`: angle ~ U[rotation) degrees, scale ~ U[scale)."""
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


def sample_defect_mask(few_shot_masks: list[Tensor], foreground: Tensor,
                       generator: torch.Generator, translate_only: bool = False,
                       rotation: tuple[float, float] = ROTATION,
                       scale: tuple[float, float] = SCALE, max_shrinks: int = 10,
                       shrink: float = 0.9) -> tuple[Tensor, dict]:
    """Defect mask sampling, METHOD.md (5): a random few-shot mask, the random affine (skipped with
    `translate_only`, the reference code's test-time mode), then a placement inside F.

    The masks are (H_i, W_i) at the same pixel scale as `foreground` (H, W). Returns the full
    (H, W) mask and a JSON-able info {"source": index, "angle", "scale", "shrink", "y", "x"}.
    """
    i = torch.randint(len(few_shot_masks), (1,), generator=generator).item()
    angle, s = (0.0, 1.0) if translate_only else draw_affine(generator, rotation, scale)
    m, _, info = _transform_and_place(few_shot_masks[i], foreground, generator, angle, s, None,
                                      max_shrinks, shrink)
    return (_canvas(m, info["y"], info["x"], foreground.float()),
            {"source": i, "angle": angle, "scale": s, **info})


def paste_defect(good_image: Tensor, defect_image: Tensor, defect_mask: Tensor,
                 foreground: Tensor, generator: torch.Generator, translate_only: bool = False,
                 rotation: tuple[float, float] = ROTATION, scale: tuple[float, float] = SCALE,
                 max_shrinks: int = 10, shrink: float = 0.9) -> tuple[Tensor, Tensor, dict]:
    """A training pair for the trimap branch by crop and paste, METHOD.md (6).

    The defect's bounding box is taken from `defect_image` (C, h, w) and `defect_mask` (h, w),
    both get the same random affine, and they are pasted at a random position inside F (H, W) of
    `good_image` (C, H, W): composite = transformed defect pixels where the transformed mask is
    1, the good image elsewhere. Returns (composite (C, H, W), pasted mask (H, W), info) with info
    {"angle", "scale", "shrink", "y", "x"}; the pasted pixels are exactly
    affine_crop(defect_mask, angle, scale * shrink, defect_image).
    """
    angle, s = (0.0, 1.0) if translate_only else draw_affine(generator, rotation, scale)
    m, img, info = _transform_and_place(defect_mask, foreground, generator, angle, s,
                                        defect_image, max_shrinks, shrink)
    mask = _canvas(m, info["y"], info["x"], foreground.float())
    pixels = _canvas(img, info["y"], info["x"], good_image)
    composite = torch.where(mask > 0.5, pixels, good_image)
    return composite, mask, {"angle": angle, "scale": s, **info}
