"""Image and mask files: reading them as arrays and tensors, writing PNGs. Every problem with a
file is a `DataError` whose one-line message names it (the commands print it and exit with 2).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .io import atomic_path, first_line
from .masks import count_components

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# Images above this many pixels are refused, not decoded (a PNG header can claim 20000 x 20000);
# every command's --max-pixels (or MINIBLDM_MAX_PIXELS) raises it. Pillow warns from half of its
# own limit and refuses from it.
DEFAULT_MAX_PIXELS = int(os.environ.get("MINIBLDM_MAX_PIXELS", 2 * 89_478_485))
MAX_PIXELS = DEFAULT_MAX_PIXELS
Image.MAX_IMAGE_PIXELS = MAX_PIXELS // 2


def set_max_pixels(n: int | None) -> None:
    """Refuse images above n pixels from now on (--max-pixels; None: the default)."""
    global MAX_PIXELS
    n = DEFAULT_MAX_PIXELS if n is None else n
    MAX_PIXELS = n
    Image.MAX_IMAGE_PIXELS = n // 2


def too_large(path) -> "DataError":
    """The one-line error for an image over the pixel limit."""
    return DataError(f"{path}: more than {MAX_PIXELS:,} pixels (raise the limit with --max-pixels "
                     "N or MINIBLDM_MAX_PIXELS=N)")


MIN_MASK_SIDE = 8


class DataError(Exception):
    """Data that cannot be used as given. The message is one line and names the file."""


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file to uint8 (H, W, 3), any size. Grey and 1-bit images are repeated on 3
    channels; 16-bit ones scaled by 255/65535 (32-bit integer and float ones too when above 255;
    floats in [0, 1] by 255); palette, CMYK, YCbCr and other modes converted by PIL; alpha
    composited over black. EXIF orientation is ignored (images stay pixel-aligned with their
    masks); of a multi-frame file (TIFF) the first frame is read."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
                return _high_depth(np.asarray(im), im.mode)
            if im.mode in ("RGBA", "LA", "RGBa", "La", "P", "PA"):  # palettes may hold alpha
                rgba = np.asarray(im.convert("RGBA")).astype(np.float32)
                rgb = rgba[..., :3] * rgba[..., 3:] / 255  # over black
                return np.round(rgb).astype(np.uint8)
            return np.array(im.convert("RGB"))
    except Image.DecompressionBombError:
        raise too_large(path) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: not a readable image ({first_line(e)})") from None


def _high_depth(a: np.ndarray, mode: str) -> np.ndarray:
    """16/32-bit integer or float grey pixels to uint8 (H, W, 3)."""
    a = a.astype(np.float64)
    top = a.max(initial=0.0)
    if mode.startswith("I;16") or 255 < top <= 65535:
        a = a * 255 / 65535
    elif top > 65535:
        a = a * 255 / top
    elif mode == "F" and top <= 1.0:
        a = a * 255
    g = np.clip(np.round(a), 0, 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=2)


def read_mask(path: str | Path) -> tuple[torch.Tensor, bool]:
    """A binary mask file as (H, W) float {0, 1}, and whether the file was binary. Pixels are the
    maximum over `read_image`'s channels, thresholded at 127 (a file holding only 0 and 1 is read
    as 0/1). The flag is False when other values were present (soft or anti-aliased masks), so a
    tool can say once that masks were thresholded. An empty mask, or one under MIN_MASK_SIDE
    pixels on a side (masks are drawn at their image's resolution), is a DataError."""
    a = read_image(path).max(axis=2)
    if min(a.shape) < MIN_MASK_SIDE:
        raise DataError(f"{path}: a {a.shape[1]} x {a.shape[0]} mask; masks are drawn at their "
                        f"image's resolution, at least {MIN_MASK_SIDE} x {MIN_MASK_SIDE} pixels")
    if a.max() <= 1:  # a file of 0s and 1s; 16-bit 1s read as 0 (255/65535 scaling): read again
        with Image.open(path) as im:
            raw = np.asarray(im)
        raw = raw.max(axis=2) if raw.ndim == 3 else raw
        a = np.where(raw == 1, 255, raw) if raw.max() == 1 else a
    values = np.unique(a)
    m = torch.from_numpy(a > 127).float()
    if not m.any():
        raise DataError(f"{path}: the mask is empty (no pixel above 127)")
    return m, bool(np.isin(values, (0, 255)).all())


def resize_image(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """uint8 (H, W, 3) to (size, size, 3) or, for size (h, w), (h, w, 3), resized (not cropped)
    by PIL's antialiased bilinear."""
    h, w = (size, size) if isinstance(size, int) else size
    if image.shape[:2] == (h, w):
        return image
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))


def to_tensor(image: np.ndarray, size: int | None = None) -> torch.Tensor:
    """uint8 (H, W, 3) to float (3, size, size) in [-1, 1] (`resize_image`; None keeps (H, W))."""
    if size is not None:
        image = resize_image(image, size)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 127.5 - 1.0


def mask_to_tensor(mask: torch.Tensor | np.ndarray, size: int | tuple[int, int]) -> torch.Tensor:
    """(H, W) {0, 1} mask to (size, size) or, for size (h, w), (h, w) by nearest neighbour (pixel
    centres aligned). When shrinking breaks the mask into more pieces than keeping every output
    pixel it touches does (a thin crack turned into dashes) or loses it, the touched pixels are
    used instead."""
    m = torch.as_tensor(mask).float()[None, None]
    h, w = (size, size) if isinstance(size, int) else size
    out = F.interpolate(m, size=(h, w), mode="nearest-exact")[0, 0]
    if m.shape[-2] > h or m.shape[-1] > w:
        touched = F.adaptive_max_pool2d(m, (h, w))[0, 0]
        if not out.any() or count_components(out) > count_components(touched):
            return touched
    return out


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [-1, 1] -> uint8 (H, W, 3)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()


def save_png(array: np.ndarray, path: Path) -> None:
    """Write a uint8 (H, W) or (H, W, 3) array as a PNG, atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
