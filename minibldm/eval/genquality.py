"""python -m minibldm.genquality: how good the generated defect images themselves are.

--generated: `python -m minibldm.sample` outputs (OUT/test/<defect>/<name>.png,
OUT/ground_truth/<defect>/<name>_mask.png, OUT/minibldm/manifest.jsonl, whose record of each image
names its "source" good image: as written, else in --data by its last 3 or 2 path parts). The split
and the held-out guard are minibldm.evaluate's. Per defect type:

  background PSNR  of the generated image against its source outside the generated mask, over
        the 3 channels of the 8-bit files: 10 log10(255^2 / MSE), the source resized to the
        generated image's size as minibldm.sample does (PIL bilinear); capped at 100 dB, which
        an identical background (MSE 0) gets. Mean, median, min.
  change in mask  the mean absolute difference from the source inside the mask, in levels of
        255 over the 3 channels: how strongly a defect was drawn (0: none appeared).
  mask spread  of the generated masks, the split's k training masks and all real masks of the
        type: area (fraction of the image; mean, population std), centroid (mean pixel centre,
        x / W and y / H in [0, 1]; mean, std), "nearest_centroid" (mean distance from a centroid
        to the nearest other one of the set; small: positions repeat), and "gen_to_train" /
        "gen_to_all" (mean distance from a generated centroid to the nearest real one).
  With `pip install -e ".[eval]"` (torch-fidelity, lpips), every image resized (not cropped)
  to the first generated image's size:
  IS    Inception Score (Salimans et al. 2016) of the generated images, clamp(n // 10, 1, 10)
        splits (torch-fidelity).
  KID   Kernel Inception Distance (Binkowski et al. 2018), generated against all real defect
        images of the type, subsets of min(1000, n_gen, n_real) (torch-fidelity).
  IC-LPIPS  intra-cluster LPIPS (Ojha et al. 2021; for defects, DFMGAN, Duan et al. 2023): each
        generated image joins the cluster of its nearest training defect image of the type by
        LPIPS (AlexNet, v0.1; a tie goes to the first in split order); a cluster scores the mean
        LPIPS over all pairs of its first --cluster-cap members (file order); the result is the
        mean over clusters with a pair (2 members or more), null if none has one.
  Those packages fetch their backbone weights into the torch hub cache on first use; when one
  is missing or its weights cannot be fetched or loaded, one line on stderr says why and the
  JSON records {"skipped": reason}.

"overall": PSNR, change in mask and mask spread over every image pooled; IS, KID and IC-LPIPS
the mean over types. The JSON (--out) holds "per_type", "overall", "settings" and "split"
(no timing: the same command writes the same bytes); a markdown table goes to stdout and beside
the JSON as .md. Bad input: one line
on stderr naming the argument or file, exit status 2, nothing written.
"""
from __future__ import annotations

import argparse
import functools
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from .common import (Pairs, check_args, check_generated, data_errors_as, manifest_records,
                     read_data, run_command, split_pairs, table)
from .literature import literature
from ..cli import Parser, UsageError, add_max_pixels, default_device
from ..commands.data import Category
from ..images import read_image, read_mask, resize_image
from ..pipeline import psnr

PROG = "python -m minibldm.genquality"
PSNR_CAP = 100.0  # dB; what an identical background (MSE 0) gets
SMALL_CLUSTERS = "clusters with fewer than 2 members have no pairs and are left out of the mean"


def background_psnr(generated: np.ndarray, source: np.ndarray, mask: np.ndarray) -> float:
    """PSNR in dB of uint8 (H, W, 3) images where the (H, W) mask is 0, capped at PSNR_CAP."""
    gen, src = (torch.from_numpy(np.asarray(x, np.float64)).permute(2, 0, 1) / 127.5 - 1
                for x in (generated, source))  # as pipeline.psnr takes images: in [-1, 1]
    return min(PSNR_CAP, psnr(gen, src, torch.from_numpy(~np.asarray(mask, bool)).double()))


def defect_change(generated: np.ndarray, source: np.ndarray, mask: np.ndarray) -> float:
    """Mean absolute difference, in levels of 255 over the 3 channels, of uint8 (H, W, 3) images
    where the (H, W) mask is 1: how strongly a defect was drawn (0: nothing appeared)."""
    region = np.asarray(mask, bool)
    return float(np.mean(np.abs(generated[region].astype(np.float64) - source[region])))


def mask_geometry(mask: np.ndarray) -> tuple[float, float, float]:
    """(area fraction, centroid x / W, centroid y / H) of a non-empty (H, W) mask; pixel
    centres at (column + 0.5, row + 0.5)."""
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    return len(xs) / (h * w), (xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h


def nearest_distance(points: np.ndarray, refs: np.ndarray, exclude_self: bool = False):
    """Mean over points (N, 2) of the distance to the nearest of refs (M, 2), or with
    exclude_self to the nearest other point of the same set; None when there is none."""
    d = np.linalg.norm(points[:, None] - refs[None], axis=-1)  # (N, M)
    if exclude_self:
        np.fill_diagonal(d, np.inf)
    return float(d.min(axis=1).mean()) if len(points) and np.isfinite(d).any() else None


def spread(geometry: list) -> dict:
    """Area and centroid statistics of one set of masks (a mask_geometry each)."""
    g = np.asarray(geometry, np.float64).reshape(-1, 3)
    return {"n": len(g), "area_mean": float(g[:, 0].mean()), "area_std": float(g[:, 0].std()),
            "cx_mean": float(g[:, 1].mean()), "cy_mean": float(g[:, 2].mean()),
            "cx_std": float(g[:, 1].std()), "cy_std": float(g[:, 2].std()),
            "nearest_centroid": nearest_distance(g[:, 1:], g[:, 1:], exclude_self=True)}


def mask_spread(generated: list, train: list, real: list) -> dict:
    """spread() of the generated, training and all real masks, and generated-to-real distances."""
    gen_xy, train_xy, real_xy = (np.asarray(g, np.float64).reshape(-1, 3)[:, 1:]
                                 for g in (generated, train, real))
    return {"generated": spread(generated), "real_train": spread(train), "real_all": spread(real),
            "gen_to_train": nearest_distance(gen_xy, train_xy),
            "gen_to_all": nearest_distance(gen_xy, real_xy)}


def summary(values: list[float]) -> dict:
    return {"n": len(values), "mean": float(np.mean(values)), "median": float(np.median(values)),
            "min": float(np.min(values))}


def figures(values: dict) -> dict:
    """The figures of one set of images from their values: "psnr" and "change" per image, mask
    geometries "gen", "train" and "real"."""
    return {"n": len(values["psnr"]), "background_psnr": summary(values["psnr"]),
            "defect_change": summary(values["change"]),
            "masks": mask_spread(values["gen"], values["train"], values["real"])}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = Parser(prog=PROG, description=__doc__, examples="""\
  python -m minibldm.genquality --generated generated --data data/magnetic_tile --texture \\
      --split runs/tile/split.json --out results/genquality.json""")
    add = p.add_argument
    add("--generated", nargs="+", required=True, metavar="DIR", help="minibldm.sample outputs")
    add("--data", required=True, metavar="DIR", help="the category (MVTec AD or plain layout)")
    add("--k", type=int, help="real defects per type for training (default 10, or --split's)")
    add("--seed", type=int, help="split seed (default 0, or --split's)")
    add("--split", metavar="FILE", help="a training run's split.json (its k and seed are used)")
    add("--cluster-cap", type=int, default=50, metavar="N",
        help="IC-LPIPS: members per cluster used, the first N (50)")
    add("--texture", action="store_true", help="a surface (recorded; no figure depends on it)")
    add_max_pixels(add)
    add("--device", default=default_device(), help="cpu, cuda, ... for IS, KID and IC-LPIPS "
        "(default: cuda when available, else cpu)")
    add("--out", metavar="RESULT.json", help="the JSON to write; the table goes to RESULT.md")
    args = p.parse_args(argv)
    check_args(args, {"k": 1, "seed": 0, "cluster_cap": 2})
    return args


def find_source(image: Path, sources: dict, category: Category) -> Path:
    """The good image a generated image was made from, by sources {resolved image path, or
    (resolved folder, index) in the older layout: the manifest record's "source"}: as written,
    else in --data by its last 3 or 2 parts."""
    folder = image.parents[2]
    name = sources.get(image.resolve()) or sources.get(
        (folder.resolve(), int(image.stem) if image.stem.isdigit() else None))
    if not isinstance(name, str):
        raise UsageError(f"--generated {image}: the manifest of {folder} has no record of it "
                         "naming its source good image")
    p = Path(name)
    found = [c for c in (p, category.root.joinpath(*p.parts[-3:]),
                         category.root.joinpath(*p.parts[-2:])) if c.is_file()]
    if not found:
        raise UsageError(f"--generated {folder}: source {name} of {image.name} is not "
                         f"found (as written, nor in --data {category.root})")
    return found[0]


def read_generated(args, category: Category, split: dict) -> dict[str, list[tuple]]:
    """{type: [(image, mask, source good image)]}, after the held-out guard."""
    folders = [Path(f) for f in args.generated]
    pairs: Pairs = check_generated(folders, category, split)
    sources = {}
    for folder in folders:
        for _, record in manifest_records(folder):
            key = ((folder / record["image"]).resolve() if isinstance(record.get("image"), str)
                   else (folder.resolve(), record.get("index")))
            sources[key] = record.get("source")
    out = {}
    for t, items in pairs.items():
        if t not in category.defects:
            raise UsageError(f"--generated {items[0][0].parent}: defect type {t!r} is not in "
                             f"--data {category.root} (has: {', '.join(category.defects)})")
        out[t] = [(image, mask, find_source(image, sources, category)) for image, mask in items]
    return out


def image_stats(image: Path, source: Path, mask: np.ndarray) -> tuple[float, float]:
    """(background_psnr, defect_change) of a generated image file against its resized source."""
    with data_errors_as("--generated"):
        gen, src = read_image(image), read_image(source)
    if mask.shape != gen.shape[:2]:
        raise UsageError(f"--generated {image}: is {gen.shape[1]}x{gen.shape[0]} but its mask "
                         f"{mask.shape[1]}x{mask.shape[0]}")
    if mask.all():
        raise UsageError(f"--generated {image}: its mask covers it all (no background)")
    src = resize_image(src, gen.shape[:2])
    return background_psnr(gen, src, mask), defect_change(gen, src, mask)


def type_values(items: list[tuple], train: list[tuple], real: list[tuple]) -> dict:
    """The values figures() takes, of one type's generated items (image, mask, source) and its
    training and all real (image, mask) pairs."""
    with data_errors_as("--generated"):
        masks = [read_mask(m)[0].numpy() > 0.5 for _, m, _ in items]
    stats = [image_stats(image, source, m) for (image, _, source), m in zip(items, masks)]
    values = {"psnr": [p for p, _ in stats], "change": [c for _, c in stats],
              "gen": [mask_geometry(m) for m in masks]}
    with data_errors_as("--data"):
        for key, pairs in (("train", train), ("real", real)):
            values[key] = [mask_geometry(read_mask(m)[0].numpy() > 0.5) for _, m in pairs]
    return values


def stack_reader(generated: dict, category: Category, train: Pairs, hw: tuple[int, int]):
    """read(type) -> (generated, all real, training) images of the type as uint8 (N, 3, H, W)
    stacks at the size hw, read once."""
    def stack(items):  # the images of (image path, ...) items
        arrays = [resize_image(read_image(item[0]), hw) for item in items]
        return torch.stack([torch.from_numpy(a.copy()).permute(2, 0, 1) for a in arrays])

    @functools.cache
    def read(t):
        with data_errors_as("--data"):
            return stack(generated[t]), stack(category.defects[t]), stack(train[t])
    return read


def mean_over_types(per_type: dict) -> dict:
    """IS, KID and IC-LPIPS: the mean over the types with a value, else the first skip reason."""
    out = {}
    for key, value in (("is", "mean"), ("kid", "mean"), ("ic_lpips", "score")):
        values = [m[key][value] for m in per_type.values() if m[key].get(value) is not None]
        reasons = [m[key]["skipped"] for m in per_type.values() if "skipped" in m[key]]
        out[key] = {value: float(np.mean(values)), "types": len(values)} if values else \
            {"skipped": (reasons or ["no defect type has a value"])[0]}
    return out


def settings(args, category: Category, hw: tuple[int, int]) -> dict:
    def version(dist):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None
    return {"generated": args.generated, "data": str(args.data), "split": args.split,
            "k": args.k, "seed": args.seed, "texture": category.texture, "device": args.device,
            "image_size": list(hw), "psnr_cap_db": PSNR_CAP, "cluster_cap": args.cluster_cap,
            "small_clusters": SMALL_CLUSTERS, "lpips_net": "alex v0.1",
            "versions": {d: version(d) for d in ("torch", "torch-fidelity", "lpips")}}


def measure(args, log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> dict:
    """Check the input and compute every figure; returns the result."""
    category, split = read_data(args)
    generated = read_generated(args, category, split)
    train = split_pairs(category, split, "train")
    per_type, pooled = {}, {"psnr": [], "change": [], "gen": [], "train": [], "real": []}
    for t, items in sorted(generated.items()):
        values = type_values(items, train[t], category.defects[t])
        per_type[t] = figures(values)
        for key, v in values.items():
            pooled[key] += v
    hw = read_image(next(iter(generated.values()))[0][0]).shape[:2]
    read = stack_reader(generated, category, train, hw)
    for t, found in literature(sorted(generated), read, args.cluster_cap, args.device, log,
                               PROG).items():
        per_type[t].update(found)
    overall = figures(pooled) | mean_over_types(per_type)
    return {"settings": settings(args, category, hw), "per_type": per_type, "overall": overall,
            "split": {"train": {t: len(p) for t, p in train.items()},
                      "real": {t: len(p) for t, p in category.defects.items()},
                      "short": split.get("short", {})}}


def markdown(result: dict) -> str:
    """The figures as a markdown table."""
    def cell(m, key, value, fmt):  # "–" for a null score (no cluster with a pair)
        return "skipped" if "skipped" in m[key] else \
            "–" if m[key][value] is None else fmt.format(m[key][value])

    head = ["defect", "n", "bg PSNR mean / median / min (dB)", "change in mask mean / min (/255)",
            "mask area % gen / k real / all real", "centroid std x, y gen / all real",
            "gen to nearest real centroid", "IS", "KID", "IC-LPIPS"]
    rows = []
    for name, m in list(result["per_type"].items()) + [("**overall**", result["overall"])]:
        p, c, s = m["background_psnr"], m["defect_change"], m["masks"]
        g, a = s["generated"], s["real_all"]
        rows.append([name, str(m["n"]), f"{p['mean']:.1f} / {p['median']:.1f} / {p['min']:.1f}",
               f"{c['mean']:.1f} / {c['min']:.1f}",
               " / ".join(f"{100 * x['area_mean']:.2f}" for x in (g, s["real_train"], a)),
               f"{g['cx_std']:.2f}, {g['cy_std']:.2f} / {a['cx_std']:.2f}, {a['cy_std']:.2f}",
               f"{s['gen_to_all']:.3f}", cell(m, "is", "mean", "{:.2f}"),
               cell(m, "kid", "mean", "{:.4f}"), cell(m, "ic_lpips", "score", "{:.3f}")])
    s = result["settings"]
    return (f"generated defects against {Path(s['data']).name}: k={s['k']}, seed={s['seed']}, "
            f"images at {s['image_size'][1]}x{s['image_size'][0]}\n\n" + table(head, rows))


def main(argv: list[str] | None = None) -> int:
    return run_command(PROG, argv, parse_args, measure, markdown)
