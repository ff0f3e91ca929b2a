"""Training defects for the detector comparison (`python -m minibldm.evaluate`).

Each source is a callable, source(i) -> (image (3, S, S) in [-1, 1], mask (S, S) {0, 1}), and a
function of (seed, i) alone, so any item can be remade; images are read at S x S (resized, not
cropped). The evaluation then flips and turns every training image (`flip_rotate`).
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch
from torch import Tensor

from ..commands.data import DecodedImages, PairDataset


def stream(seed: int, name: str, i: int) -> torch.Generator:
    """The generator of item i of the random stream `name`: a function of (seed, name, i)."""
    digest = hashlib.sha256(f"minibldm.baselines/{seed}/{name}/{i}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def flip_rotate(tensors: list[Tensor], generator: torch.Generator) -> list[Tensor]:
    """The same random left-right flip (p = 1/2) and quarter turn (0, 90, 180 or 270 degrees) of
    each (..., H, W) tensor, H == W."""
    flip = torch.randint(2, (1,), generator=generator).item()
    turns = torch.randint(4, (1,), generator=generator).item()
    return [torch.rot90(t.flip(-1) if flip else t, turns, (-2, -1)) for t in tensors]


def crop(image: Tensor, mask: Tensor, size: int,
         generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """A size x size window of a (C, S, S) image and its (S, S) mask. When the mask marks a
    defect, the window holds one of its pixels drawn at random, at a random place in the window
    (the window kept inside the image); otherwise the window is anywhere."""
    S = image.shape[-1]
    pixels = mask.flatten().nonzero()[:, 0]
    if len(pixels):
        y, x = divmod(pixels[torch.randint(len(pixels), (1,), generator=generator)].item(), S)
        dy, dx = torch.randint(size, (2,), generator=generator).tolist()
        y0, x0 = (min(max(c - d, 0), S - size) for c, d in ((y, dy), (x, dx)))
    else:
        y0, x0 = torch.randint(S - size + 1, (2,), generator=generator).tolist()
    return image[:, y0:y0 + size, x0:x0 + size], mask[y0:y0 + size, x0:x0 + size]


def signed(image: Tensor) -> Tensor:
    """uint8 -> float in [-1, 1]."""
    return image.float() / 127.5 - 1


class FixedPairs:
    """Defect images and masks as given, {type: [(image path, mask path)]}, read once: a type is
    drawn uniformly, then one of its images (real-only, minibldm, minibldm+real)."""

    def __init__(self, pairs: dict[str, list[tuple[Path, Path]]], decoded: DecodedImages,
                 seed: int = 0):
        self.types = sorted(t for t in pairs if pairs[t])
        self.items = {t: [(signed(decoded.image(i)), decoded.mask(m).float())
                          for i, m in pairs[t]] for t in self.types}
        self.seed = seed

    def __len__(self) -> int:
        return sum(len(v) for v in self.items.values())

    def __call__(self, i: int) -> tuple[Tensor, Tensor]:
        g = stream(self.seed, "fixed", i)
        items = self.items[self.types[torch.randint(len(self.types), (1,), generator=g).item()]]
        return items[torch.randint(len(items), (1,), generator=g).item()]


class CropPaste:
    """PairDataset's items: a real training defect pasted inside a good image's foreground by
    masks.paste_defect (random rotation and scale); the mask is exactly the pasted pixels."""

    def __init__(self, pairs: PairDataset):
        self.pairs = pairs

    def __call__(self, i: int) -> tuple[Tensor, Tensor]:
        item = self.pairs[i]
        return item["image"], item["mask"][0]


def perlin_noise(size: int, res: tuple[int, int], generator: torch.Generator) -> Tensor:
    """2-D gradient noise (Perlin, "Improving noise", SIGGRAPH 2002: random unit gradients on a
    (res_y + 1, res_x + 1) lattice, the quintic fade 6t^5 - 15t^4 + 10t^3) sampled at the pixel
    centres of a size x size image, times sqrt(2) so values lie in about [-1, 1] (as DRAEM's)."""
    ry, rx = res
    angle = torch.rand(ry + 1, rx + 1, generator=generator, dtype=torch.float64) * 2 * math.pi
    grad = torch.stack([angle.sin(), angle.cos()], -1)  # (ry + 1, rx + 1, 2): (gy, gx)
    y = (torch.arange(size, dtype=torch.float64) + 0.5) * ry / size  # in lattice cells
    x = (torch.arange(size, dtype=torch.float64) + 0.5) * rx / size
    y0, x0 = y.floor().long(), x.floor().long()
    fy, fx = (y - y0)[:, None], (x - x0)[None, :]  # (S, 1), (1, S): position inside the cell

    def corner(dy: int, dx: int) -> Tensor:  # gradient . offset from that corner, (S, S)
        g = grad[y0 + dy][:, x0 + dx]  # (S, S, 2)
        return g[..., 0] * (fy - dy) + g[..., 1] * (fx - dx)

    uy, ux = (t ** 3 * (t * (6 * t - 15) + 10) for t in (fy, fx))  # the quintic fade
    top = corner(0, 0) + ux * (corner(0, 1) - corner(0, 0))
    bottom = corner(1, 0) + ux * (corner(1, 1) - corner(1, 0))
    return (math.sqrt(2) * (top + uy * (bottom - top))).float()


def perlin_mask(foreground: Tensor, generator: torch.Generator, threshold: float = 0.5,
                max_log2_res: int = 5, tries: int = 10) -> Tensor:
    """DRAEM's anomaly mask, kept inside the (S, S) foreground: Perlin noise with 2^a x 2^b
    lattice cells (a, b uniform in 0..max_log2_res) above `threshold`. Redrawn when nothing is
    left inside F; after `tries` draws, the top 2% of the last noise inside F."""
    size, inside = foreground.shape[-1], foreground > 0.5
    if not inside.any():
        raise ValueError("the foreground is empty")
    for _ in range(tries):
        a, b = torch.randint(max_log2_res + 1, (2,), generator=generator).tolist()
        noise = perlin_noise(size, (2 ** a, 2 ** b), generator)
        mask = (noise > threshold) & inside
        if mask.any():
            return mask.float()
    top = noise[inside].quantile(0.98)
    return ((noise >= top) & inside).float()


def anomaly_source(image: Tensor, generator: torch.Generator, grid: int = 4) -> Tensor:
    """A texture unlike the good images, made from one of them ((3, S, S) in [-1, 1], S a
    multiple of `grid`): its grid x grid tiles shuffled and each turned a random quarter, then
    contrast x U[0.5, 2), a colour shift U[-0.5, 0.5) per channel, inverted with p = 1/2."""
    C, S, _ = image.shape
    t = S // grid
    tiles = image.reshape(C, grid, t, grid, t).permute(1, 3, 0, 2, 4).reshape(grid * grid, C, t, t)
    order = torch.randperm(grid * grid, generator=generator)
    turns = torch.randint(4, (grid * grid,), generator=generator)
    tiles = torch.stack([torch.rot90(tiles[j], int(k), (-2, -1)) for j, k in zip(order, turns)])
    x = tiles.reshape(grid, grid, C, t, t).permute(2, 0, 3, 1, 4).reshape(C, S, S)
    u = torch.rand(C + 2, generator=generator)
    contrast, shift, invert = 0.5 + 1.5 * u[0], u[1:C + 1] - 0.5, u[C + 1] < 0.5
    mean = x.mean()
    x = (x - mean) * contrast + mean + shift[:, None, None]
    return (-x if invert else x).clamp(-1, 1)


def perlin_defect(good: Tensor, source: Tensor, foreground: Tensor,
                  generator: torch.Generator) -> tuple[Tensor, Tensor, float]:
    """DRAEM (Zavrtanik et al., ICCV 2021) eq. 1 on a (3, S, S) good image I with anomaly
    texture A: I_a = (1 - M) I + (1 - beta) M A + beta M I, beta ~ U[0, 0.8), M `perlin_mask`.
    Returns (I_a, M (S, S), beta)."""
    mask = perlin_mask(foreground, generator)
    beta = 0.8 * torch.rand(1, generator=generator).item()
    blended = (1 - beta) * source + beta * good
    return torch.where(mask > 0.5, blended, good), mask, beta


class Perlin:
    """DRAEM-style anomalies on the good training images, inside their foregrounds. DTD is not at
    hand, so the texture A is another good image, tiles shuffled and colours jittered
    (`anomaly_source`); the noise is not rotated (DRAEM turns it by up to 90 degrees; the random
    lattice aspect, 1 to 32 cells a side, gives the shapes their variety)."""

    def __init__(self, good: list[Path], decoded: DecodedImages, seed: int = 0):
        self.good, self.decoded, self.seed = good, decoded, seed

    def __call__(self, i: int) -> tuple[Tensor, Tensor]:
        g = stream(self.seed, "perlin", i)
        n = len(self.good)
        j = torch.randint(n, (1,), generator=g).item()
        k = (j + 1 + torch.randint(n - 1, (1,), generator=g).item()) % n if n > 1 else j
        good = signed(self.decoded.image(self.good[j]))
        source = anomaly_source(signed(self.decoded.image(self.good[k])), g)
        image, mask, _ = perlin_defect(good, source, self.decoded.foreground(self.good[j]), g)
        return image, mask
