"""A synthetic industrial defect dataset in the MVTec AD layout, drawn by code in seconds.

It lets a new user (and the tiny default model, trained on it) see AdaBLDM work with no download.
Two categories are surfaces (fabric, metal), two are objects on a dark table (washer, pill);
texture, colour, pose, lighting and sensor noise vary from image to image.

`python -m minibldm.synth OUT` writes, in OUT/<category>/:
    train/good/000.png ...                   defect-free training images (--per-class)
    test/good/000.png ...                    defect-free test images (--test-good)
    test/<defect>/000.png ...                defect images (--test-per-defect per defect type)
    ground_truth/<defect>/000_mask.png       the defect's mask, 0 / 255
    foreground/<split>/<kind>/000.png        objects only: the foreground mask, 0 / 255
    meta.json                                CATEGORIES[category]: object, texture, defect names

Existing files are overwritten, nothing is deleted. Each image has its own generator, seeded by
(seed, category, split, index): the same arguments give the same bytes, and --per-class 5 writes
the first 5 images of a --per-class 200 run. For one generator state, make_defect draws
make_good's scene and changes only the pixels inside its mask.
"""
from __future__ import annotations

import json
import sys
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ..images import save_png
from ..cli import Parser, UsageError, check_writable

CATEGORIES = {  # category folder -> meta.json: prompt words, texture or object, defect folders
    "fabric": {"object": "woven fabric", "texture": True,
               "defects": {"hole": "hole", "stain": "stain", "thread": "loose thread"}},
    "metal": {"object": "brushed metal plate", "texture": True,
              "defects": {"scratch": "scratch", "dent": "dent", "rust": "rust spot"}},
    "washer": {"object": "metal washer", "texture": False,
               "defects": {"scratch": "scratch", "crack": "crack", "spot": "contamination"}},
    "pill": {"object": "pill", "texture": False,
             "defects": {"crack": "crack", "stain": "stain", "spot": "black specks"}},
}
MAX_SIZE = 2048  # the largest --size: a 2048 px image is drawn on 8192 x 8192 canvases
_SS = 4  # supersampling factor of the PIL canvases: 4x4 samples per pixel give anti-aliased edges


# ---- small drawing tools; images are float (H, W, 3) arrays in [0, 1] until the very end ----

def _frame(s, c, angle):
    """Pixel-centre coordinates along (u) and across (v) the direction `angle`, from c = (x, y)."""
    y, x = np.mgrid[:s, :s].astype(np.float32) + 0.5
    x, y = x - c[0], y - c[1]
    return x * np.cos(angle) + y * np.sin(angle), y * np.cos(angle) - x * np.sin(angle)


def _edge_depth(s):
    """Distance to the image border: the 'depth' of a texture, whose foreground is everything."""
    x, y = _frame(s, (0, 0), 0)
    return np.minimum(np.minimum(x, y), np.minimum(s - x, s - y))


def _smooth(rng, shape, s):
    """Smooth noise, roughly unit variance: a random (rows, cols) grid upsampled bicubically."""
    grid = rng.standard_normal(shape).astype(np.float32)
    return np.asarray(Image.fromarray(grid, "F").resize((s, s), Image.BICUBIC))


def _draw(s, paint):
    """Coverage in [0, 1] of shapes drawn by paint(draw, k) on a k-times supersampled canvas."""
    canvas = Image.new("L", (s * _SS, s * _SS), 0)
    paint(ImageDraw.Draw(canvas), _SS)
    return np.asarray(canvas.resize((s, s), Image.BOX), np.float32) / 255


def _blur(a, radius):
    im = Image.fromarray(np.uint8(np.clip(a, 0, 1) * 255 + 0.5))
    return np.asarray(im.filter(ImageFilter.GaussianBlur(radius)), np.float32) / 255


def _anchor(rng, depth, margin):
    """A random (x, y) pixel centre at least `margin` pixels inside the foreground."""
    ok = np.flatnonzero(depth >= min(margin, depth.max()))
    y, x = divmod(int(rng.choice(ok)), depth.shape[1])
    return np.array([x + 0.5, y + 0.5])


def _blob(rng, c, rho, s, scales=(1.0,), amp=0.25):
    """Coverage maps of one irregular closed shape around c, drawn at each radius scale."""
    ang = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    r = rho * (1 + sum(amp / k * rng.uniform(-1, 1) * np.cos(k * ang + rng.uniform(0, 6.3))
                       for k in range(2, 6)))
    return [_draw(s, lambda d, k, f=f: d.polygon(
        [(k * (c[0] + f * ri * np.cos(a)), k * (c[1] + f * ri * np.sin(a))) for ri, a in zip(r, ang)],
        fill=255)) for f in scales]


def _polyline(s, lines):
    """Coverage of polylines given as (points (n, 2), width in pixels) pairs."""
    return _draw(s, lambda d, k: [d.line([tuple(k * p) for p in pts], fill=255, joint="curve",
                                         width=max(1, round(k * w))) for pts, w in lines])


def _curve(rng, depth, length, bend):
    """Points of a smooth quadratic Bezier curve through a random foreground pixel."""
    c, th = _anchor(rng, depth, length / 2), rng.uniform(0, 2 * np.pi)
    d = np.array([np.cos(th), np.sin(th)]) * length / 2
    ctrl = c + np.array([-d[1], d[0]]) * rng.uniform(-bend, bend)
    t = np.linspace(0, 1, 32)[:, None]
    return (1 - t) ** 2 * (c - d) + 2 * t * (1 - t) * ctrl + t ** 2 * (c + d)


# ---- good scenes: each returns (image, depth): depth = pixels inside the foreground (<0 outside) ----

def _fabric(rng, s):
    """Plain weave: warp and weft threads alternate over / under cell by cell."""
    a, p = rng.uniform(-0.12, 0.12), s / 20 * rng.uniform(0.9, 1.15)  # weave angle, thread pitch
    u, v = _frame(s, -p * rng.uniform(0, 2, 2), a)
    u, v = u / p, v / p  # in threads
    fu, fv = u % 1, v % 1
    warp = np.sin(np.pi * fu) ** 0.7 * (0.7 + 0.3 * np.sin(np.pi * fv))
    weft = np.sin(np.pi * fv) ** 0.7 * (0.7 + 0.3 * np.sin(np.pi * fu))
    over = ((np.floor(u) + np.floor(v)) % 2 == 0)[..., None]
    c_warp = np.array([0.30, 0.40, 0.62]) + rng.uniform(-0.04, 0.04, 3)  # denim-like blue
    c_weft = np.array([0.62, 0.64, 0.68]) + rng.uniform(-0.04, 0.04, 3)
    img = np.where(over, c_warp * (0.3 + 0.7 * warp[..., None]), c_weft * (0.3 + 0.7 * weft[..., None]))
    img = img * (1 + 0.05 * _smooth(rng, (8, 8), s))[..., None]
    return img, _edge_depth(s)


def _metal(rng, s):
    """Brushed metal: fine parallel streaks of random length, a soft sheen band."""
    u, v = _frame(s, (0, -0.2 * s), rng.uniform(-0.08, 0.08))  # v >= 0
    lines = rng.standard_normal(int(1.5 * s) + 2)
    streak = np.interp(v, np.arange(lines.size), lines) * (0.6 + 0.4 * _smooth(rng, (s // 2, 4), s))
    sheen = np.exp(-(((u - rng.uniform(0.2, 0.8) * s) / (0.25 * s)) ** 2))
    shade = 0.75 + 0.035 * streak + 0.06 * _smooth(rng, (4, 4), s) + 0.12 * sheen
    colour = np.array([0.80, 0.81, 0.84]) * rng.uniform(0.95, 1.05) + rng.uniform(-0.01, 0.01, 3)
    return shade[..., None] * colour, _edge_depth(s)


def _on_background(rng, s, obj, depth):
    """Composite an object (colour map, signed depth) onto a dark table with a soft shadow."""
    alpha = np.clip(depth + 0.5, 0, 1)[..., None]
    shift = max(1, round(s / 64))
    shadow = _blur(np.roll(alpha[..., 0], (shift, shift), (0, 1)), s / 48)[..., None]
    bg = (np.array([0.10, 0.10, 0.11]) * (1 + 0.2 * _smooth(rng, (3, 3), s))[..., None]
          * (1 - 0.6 * shadow))
    return bg + alpha * (obj - bg), depth


def _washer(rng, s):
    """A machined metal ring: bevelled profile, turning marks, a highlight that turns with it."""
    u, v = _frame(s, s / 2 + rng.uniform(-0.06, 0.06, 2) * s, 0)
    outer = s * rng.uniform(0.33, 0.39)
    inner = outer * rng.uniform(0.45, 0.55)
    d, th = np.hypot(u, v), np.arctan2(v, u)
    t = np.clip((d - inner) / (outer - inner), 0, 1)
    shade = (0.55 + 0.2 * np.cos(2 * (th - rng.uniform(0, np.pi))) + 0.15 * np.sin(np.pi * t)
             + 0.03 * np.sin(d * 2 * np.pi / (s / 80) + rng.uniform(0, 6.3)))
    colour = np.array([0.82, 0.81, 0.78]) * rng.uniform(0.93, 1.05) + rng.uniform(-0.015, 0.015, 3)
    return _on_background(rng, s, shade[..., None] * colour, np.minimum(outer - d, d - inner))


def _pill(rng, s):
    """A two-colour capsule: a rounded cylinder with a seam and a glossy highlight."""
    c = s / 2 + rng.uniform(-0.05, 0.05, 2) * s
    ang, half, rad = rng.uniform(-0.4, 0.4), s * rng.uniform(0.19, 0.23), s * rng.uniform(0.12, 0.14)
    a, b = _frame(s, c, ang)  # along and across the capsule axis
    end = np.maximum(np.abs(a) - half, 0)
    dist = np.hypot(end, b)  # distance to the axis segment
    nz = np.sqrt(np.clip(1 - (dist / rad) ** 2, 0, 1))  # surface normal's z: round shading
    shade = (0.45 + 0.55 * nz) * (1 - 0.35 * np.exp(-(a / (s / 200)) ** 2))
    gloss = 0.35 * np.exp(-(((b + 0.45 * rad) / (0.13 * rad)) ** 2 + (end / (0.2 * rad)) ** 2))
    left = np.array([0.93, 0.91, 0.87]) + rng.uniform(-0.02, 0.02, 3)
    right = np.array([0.88, 0.42, 0.12]) + rng.uniform(-0.04, 0.04, 3)
    colour = np.where((a < 0)[..., None], left, right)
    return _on_background(rng, s, colour * shade[..., None] + gloss[..., None], rad - dist)


_SCENES = {"fabric": _fabric, "metal": _metal, "washer": _washer, "pill": _pill}


# ---- defects: each returns (alpha (H, W) in [0, 1], target image or colour) ----
# make_defect blends image + alpha * (target - image), with alpha cut to the mask.

def _scratch(img, rng, depth, s):  # a thin bright (or dark) smooth curve
    pts = _curve(rng, depth, s * rng.uniform(0.2, 0.45), 0.3)
    alpha = _polyline(s, [(pts, s / 256 * rng.uniform(3, 5))])
    target = 1 - 0.15 * (1 - img) if rng.random() < 0.65 else 0.3 * img
    return alpha * rng.uniform(0.7, 1.0), target


def _thread(img, rng, depth, s):  # a loose thread: thicker, coloured, more bent
    pts = _curve(rng, depth, s * rng.uniform(0.25, 0.5), 0.6)
    alpha = _polyline(s, [(pts, s / 256 * rng.uniform(4, 6))])
    colour = np.array([[0.92, 0.86, 0.72], [0.78, 0.18, 0.14]])[rng.integers(2)]  # cream or red
    return alpha, colour * (0.85 + 0.15 * rng.random())


def _crack(img, rng, depth, s):  # a branching thin dark polyline, random-walked
    step = s * rng.uniform(0.016, 0.026)

    def walk(p, th, n):  # n jagged steps scattered around one heading
        a = th + rng.normal(0, 0.5, n)
        return p + np.concatenate([[[0, 0]], np.cumsum(step * np.stack([np.cos(a), np.sin(a)], 1), 0)])

    th0, c = rng.uniform(0, 2 * np.pi), _anchor(rng, depth, s / 32)
    tail, head = walk(c, th0 + np.pi, rng.integers(4, 9)), walk(c, th0, rng.integers(4, 9))
    main = np.concatenate([tail[::-1], head[1:]])  # grown both ways from the anchor
    lines = [(main, s / 256 * rng.uniform(3, 4.5))]
    for _ in range(rng.integers(1, 4)):
        i = int(rng.integers(1, len(main) - 1))
        d = main[i + 1] - main[i]
        th = np.arctan2(d[1], d[0]) + rng.choice([-1, 1]) * rng.uniform(0.5, 1.1)
        lines.append((walk(main[i], th, rng.integers(2, 6)), s / 256 * 2.5))
    return _polyline(s, lines), 0.12 * img


def _hole(img, rng, depth, s):  # a dark irregular opening with a lighter frayed rim
    rho = s * rng.uniform(0.06, 0.1)
    inner, outer = _blob(rng, _anchor(rng, depth, 1.5 * rho), rho, s, scales=(1.0, 1.35))
    rim = np.clip(0.55 * img + 0.4, 0, 1)
    dark = np.array([0.03, 0.03, 0.035]) * (1 + 0.3 * rng.random())
    return outer, rim + inner[..., None] * (dark - rim)


def _stain(img, rng, depth, s):  # a soft coloured blob that tints what it covers
    rho = s * rng.uniform(0.07, 0.12)
    (cov,) = _blob(rng, _anchor(rng, depth, 1.3 * rho), rho, s, amp=0.35)
    tint = np.array([[0.62, 0.42, 0.18], [0.45, 0.55, 0.25], [0.5, 0.3, 0.4]])[rng.integers(3)]
    tint = tint + rng.uniform(-0.05, 0.05, 3)  # brown, olive or wine, jittered
    return _blur(cov, rho * 0.15) * rng.uniform(0.7, 0.95), tint * (0.4 + 0.8 * img.mean(-1, keepdims=True))


def _spot(img, rng, depth, s):  # contamination: a cluster of small dark specks
    spread = s * rng.uniform(0.04, 0.07)
    c, n = _anchor(rng, depth, spread), int(rng.integers(3, 10))
    r, a = spread * np.sqrt(rng.random(n)), rng.uniform(0, 2 * np.pi, n)  # uniform over a disc
    pos = c + np.stack([r * np.cos(a), r * np.sin(a)], 1)
    rad = s / 256 * rng.uniform(3, 6, n)
    alpha = _draw(s, lambda d, k: [d.ellipse([k * (p[0] - r), k * (p[1] - r), k * (p[0] + r), k * (p[1] + r)],
                                             fill=255) for p, r in zip(pos, rad)])
    return alpha, np.array([0.07, 0.055, 0.045]) * (1 + rng.random())


def _dent(img, rng, depth, s):  # a shallow elliptic dent: upper wall in shade, lower wall lit
    rx = s * rng.uniform(0.08, 0.13)
    ry, rot = rx * rng.uniform(0.6, 1.0), rng.uniform(0, np.pi)
    light = -np.pi / 2 + rng.uniform(-0.6, 0.6)  # from above, which the eye reads as concave
    a, b = _frame(s, _anchor(rng, depth, 2 * rx), rot)
    h = np.clip(1 - (a / rx) ** 2 - (b / ry) ** 2, 0, 1) ** 1.5  # dent depth profile
    gy, gx = np.gradient(h)
    g = max(np.abs(gx).max(), np.abs(gy).max(), 1e-8)
    warp = 0.25 * rx / g  # the streaks inside bend, as in a reflection off the sloped wall
    y, x = np.mgrid[:s, :s]
    iy, ix = np.clip(y - warp * gy, 0, s - 1).astype(int), np.clip(x - warp * gx, 0, s - 1).astype(int)
    shade = 1 + rng.uniform(0.35, 0.5) * (gx * np.cos(light) + gy * np.sin(light)) / g - 0.2 * h
    return (h > 0).astype(np.float32), img[iy, ix] * shade[..., None]


def _rust(img, rng, depth, s):  # grainy corrosion, dark brown to orange, with a broken edge
    rho = s * rng.uniform(0.07, 0.11)
    (cov,) = _blob(rng, _anchor(rng, depth, 1.4 * rho), rho, s, amp=0.4)
    fine, coarse = _smooth(rng, (s // 3, s // 3), s), _smooth(rng, (s // 12, s // 12), s)
    alpha = np.clip(_blur(cov, rho * 0.1) * (1.0 + 0.4 * fine + 0.3 * coarse), 0, 1)
    mix = np.clip(0.5 + 0.3 * fine + 0.3 * coarse, 0, 1)[..., None]
    dark, orange = np.array([0.30, 0.13, 0.05]), np.array([0.72, 0.36, 0.12])
    return alpha, dark + mix * (orange - dark)


_DEFECTS = {"scratch": _scratch, "thread": _thread, "crack": _crack, "hole": _hole,
            "stain": _stain, "spot": _spot, "dent": _dent, "rust": _rust}


# ---- public API ----

def _check(category, defect="good"):
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r} (known: {', '.join(CATEGORIES)})")
    if defect != "good" and defect not in CATEGORIES[category]["defects"]:
        raise ValueError(f"unknown defect {defect!r} for {category} "
                         f"(known: {', '.join(CATEGORIES[category]['defects'])})")


def _scene(category, rng, size):
    """(clean image, depth, finish): finish adds the lighting gradient and sensor noise drawn
    here and quantises, so a defect painted in between gets the same light and noise."""
    _check(category)
    img, depth = _SCENES[category](rng, size)
    g, phi = rng.uniform(0.1, 0.3), rng.uniform(0, 2 * np.pi)
    light = (1 + g * _frame(size, (size / 2, size / 2), phi)[0] / size)[..., None]
    noise = rng.normal(0, rng.uniform(0.008, 0.02), img.shape)
    return img, depth, lambda im: np.uint8(np.clip(im * light + noise, 0, 1) * 255 + 0.5)


def make_good(category: str, rng: np.random.Generator, size: int = 256):
    """A defect-free image (size, size, 3) uint8 and its foreground (size, size) bool."""
    img, depth, finish = _scene(category, rng, size)
    return finish(img), depth > 0


def make_defect(category: str, defect: str, rng: np.random.Generator, size: int = 256):
    """(image uint8, defect mask bool, foreground bool). The scene is make_good's for the same
    generator state; only pixels inside the mask differ from it, and the mask lies inside the
    foreground."""
    _check(category, defect)
    img, depth, finish = _scene(category, rng, size)
    fg = depth > 0
    for _ in range(20):  # redraw the rare defect that the foreground clips to almost nothing
        alpha, target = _DEFECTS[defect](img, rng, depth, size)
        mask = (alpha > 0.1) & fg  # fainter anti-aliasing fringes are dropped: the mask is exact
        if mask.sum() >= size * size / 4000:
            break
    img = img + (alpha * mask)[..., None] * (target - img)
    return finish(img), mask, fg


def image_rng(seed: int, category: str, split: str, index: int) -> np.random.Generator:
    """The generator of one image, e.g. split="test/crack"; independent of how many are made."""
    return np.random.default_rng([seed, zlib.crc32(category.encode()), zlib.crc32(split.encode()), index])


def write_dataset(out, per_class: int = 200, seed: int = 0, size: int = 256, categories=None,
                  test_good: int = 20, test_per_defect: int = 20, log=sys.stderr) -> Path:
    """Write the dataset (layout in the module docstring) and return OUT as a Path. One progress
    line per category goes to `log` (None: silent). Bad arguments raise ValueError."""
    out, categories = Path(out), list(dict.fromkeys(CATEGORIES if categories is None else categories))
    for name in categories:
        _check(name)
    for flag, value, low in (("--per-class", per_class, 1), ("--test-good", test_good, 0),
                             ("--test-per-defect", test_per_defect, 0), ("--size", size, 32),
                             ("--seed", seed, 0)):
        if value < low:
            raise ValueError(f"{flag} must be at least {low} (got {value})")
    if size > MAX_SIZE:  # drawn 4x supersampled: 16 * size**2 samples per canvas
        raise ValueError(f"--size must be at most {MAX_SIZE} (got {size})")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder")
    for cat in categories:
        t0, meta, root = time.perf_counter(), CATEGORIES[cat], out / cat
        splits = [("train/good", per_class), ("test/good", test_good)]
        splits += [(f"test/{d}", test_per_defect) for d in meta["defects"]]
        for split, n in splits:
            kind = split.split("/")[1]
            for i in range(n):
                rng, stem = image_rng(seed, cat, split, i), f"{i:03d}"
                if kind == "good":
                    img, fg = make_good(cat, rng, size)
                else:
                    img, mask, fg = make_defect(cat, kind, rng, size)
                    save_png(np.uint8(mask) * 255, root / f"ground_truth/{kind}/{stem}_mask.png")
                save_png(img, root / split / f"{stem}.png")
                if not meta["texture"]:
                    save_png(np.uint8(fg) * 255, root / "foreground" / split / f"{stem}.png")
        (root / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if log is not None:
            print(f"{cat}: {sum(n for _, n in splits)} images in {time.perf_counter() - t0:.1f} s",
                  file=log, flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m minibldm.synth", description=__doc__.split("\n\n")[0],
               examples="  python -m minibldm.synth data/synth --per-class 200 --size 128")
    p.add_argument("out", help="dataset folder to write (created if missing)")
    p.add_argument("--per-class", type=int, default=200, help="train/good images per category")
    p.add_argument("--test-good", type=int, default=20, help="test/good images per category")
    p.add_argument("--test-per-defect", type=int, default=20, help="test images per defect type")
    p.add_argument("--seed", type=int, default=0, help="base seed, non-negative")
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--categories", nargs="+", default=list(CATEGORIES), metavar="NAME",
                   help=f"subset of: {' '.join(CATEGORIES)}")
    try:
        a = p.parse_args(argv)
        check_writable(a.out, "OUT")
        write_dataset(a.out, a.per_class, a.seed, a.size, a.categories, a.test_good, a.test_per_defect)
    except (ValueError, OSError, UsageError) as e:
        print(f"python -m minibldm.synth: error: {e}", file=sys.stderr)
        return 2
    return 0
