"""python -m minibldm.genquality: how good the generated defect images themselves are.

    python -m minibldm.genquality --generated DIR [DIR ...] --data DIR [--k 10] [--seed 0]
        [--split FILE] [--cluster-cap 50] [--texture] [--device cpu] [--out RESULT.json]

DIR: `python -m minibldm.sample` outputs (OUT/test/<defect>/NNN.png, OUT/ground_truth/<defect>/
NNN_mask.png, OUT/manifest.jsonl, whose record with "index" NNN names the "source" good image;
a source path missing as written is looked up in --data by its last 3 or 2 parts). The split
and the held-out guard are minibldm.evaluate's (--split, or --k and --seed). Per defect type:

  background PSNR  generated image against its source outside the generated mask, over the 3
        channels of the 8-bit files: 10 log10(255^2 / MSE); the source is resized to the
        generated image's size (PIL bilinear, as minibldm.sample does) when the sizes differ.
        Capped at PSNR_CAP = 100 dB, which an identical background (MSE 0) gets. Mean, median, min.
  change in mask  the mean absolute difference from the source inside the generated mask, in
        levels of 255 over the 3 channels: how strongly a defect was drawn (0: none appeared).
  mask spread  of the generated masks, the split's k training masks of the type and all its
        real masks: area (fraction of the image; mean, population std), centroid (mean pixel
        centre, x / W and y / H in [0, 1]; mean, std), "nearest_centroid" (mean distance from a
        centroid to the nearest other one of the set; small: positions repeat), and
        "gen_to_train" / "gen_to_all" (mean distance from a generated centroid to the nearest
        real one).
  With `pip install -e ".[eval]"` (torch-fidelity, lpips), every image resized (not cropped)
  to the first generated image's size:
  IS    Inception Score (Salimans et al. 2016) of the generated images, clamp(n // 10, 1, 10)
        splits (torch-fidelity).
  KID   Kernel Inception Distance (Binkowski et al. 2018), generated against all real defect
        images of the type, subsets of min(1000, n_gen, n_real) (torch-fidelity).
  IC-LPIPS  intra-cluster LPIPS (Ojha et al. 2021, used for defects by DFMGAN, Duan et al. 2023):
        each generated image joins the cluster of its nearest training defect image of the type
        by LPIPS (AlexNet, v0.1; a tie goes to the first in split order); a cluster scores the
        mean LPIPS over all pairs of its first --cluster-cap members (file order); the result is
        the mean over clusters. Clusters with fewer than 2 members (empty, singleton) have no
        pairs and are left out; with none left the score is null.
  Those packages fetch their backbone weights into the torch hub cache on first use; when a
  package is missing or its weights cannot be fetched or loaded, one line on stderr says why
  and the JSON records {"skipped": reason}.

"overall": PSNR, change in mask and mask spread over every image pooled; IS, KID and IC-LPIPS
the mean over types.
The JSON (--out) holds "per_type", "overall", "settings", "split", "wall_seconds"; a markdown
table goes to stdout and beside the JSON as .md. Bad input: one line on stderr naming the
argument or file, exit status 2, nothing written.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import itertools
import json
import math
import sys
import time
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data import Category, DataError, read_category, read_image, read_mask
from .cli import Parser, UsageError
from .evaluate import check_generated, read_split, split_pairs
from .io import write_result

PROG = "python -m minibldm.genquality"
PSNR_CAP = 100.0  # dB; what an identical background (MSE 0) gets
SMALL_CLUSTERS = "clusters with fewer than 2 members have no pairs and are left out of the mean"


# ---- the statistics, as pure functions --------------------------------------------------------

def background_psnr(generated: np.ndarray, source: np.ndarray, mask: np.ndarray) -> float:
    """PSNR in dB of uint8 (H, W, 3) images where the (H, W) mask is 0, capped at PSNR_CAP."""
    bg = ~np.asarray(mask, bool)
    mse = float(np.mean((generated[bg].astype(np.float64) - source[bg]) ** 2))  # over (N_bg, 3)
    return PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * math.log10(255 ** 2 / mse))


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
    def xy(g):
        return np.asarray(g, np.float64).reshape(-1, 3)[:, 1:]
    return {"generated": spread(generated), "real_train": spread(train), "real_all": spread(real),
            "gen_to_train": nearest_distance(xy(generated), xy(train)),
            "gen_to_all": nearest_distance(xy(generated), xy(real))}


def ic_lpips(generated: list, centres: list, distance, cap: int = 50) -> dict:
    """IC-LPIPS (module docstring) with distance(xs, ys) -> one float per pair (xs[i], ys[i]).
    Returns {"score", "clusters": [{"members", "used", "score"}] in the order of centres}."""
    n, k = len(generated), len(centres)
    d = np.asarray(distance([g for g in generated for _ in centres],
                            [c for _ in generated for c in centres]), np.float64).reshape(n, k)
    nearest = d.argmin(axis=1)  # a tie goes to the first centre
    clusters = []
    for c in range(k):
        members = np.flatnonzero(nearest == c).tolist()
        pairs = list(itertools.combinations(members[:cap], 2))
        score = float(np.mean(distance([generated[i] for i, _ in pairs],
                                       [generated[j] for _, j in pairs]))) if pairs else None
        clusters.append({"members": len(members), "used": min(len(members), cap), "score": score})
    scores = [c["score"] for c in clusters if c["score"] is not None]
    return {"score": float(np.mean(scores)) if scores else None, "clusters": clusters}


def summary(values: list[float]) -> dict:
    return {"n": len(values), "mean": float(np.mean(values)), "median": float(np.median(values)),
            "min": float(np.min(values))}


# ---- the optional metrics (torch-fidelity, lpips) ---------------------------------------------

class Skip(Exception):
    """A metric that cannot be computed here; the message says why."""


def optional(name: str):
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise Skip(f"{name} is not installed ({type(e).__name__}); pip install -e \".[eval]\"")


class _Images(torch.utils.data.Dataset):
    """uint8 (N, 3, H, W) images as the Dataset torch-fidelity reads."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def is_kid(tf, gen: torch.Tensor, real: torch.Tensor, device: str) -> tuple[dict, dict]:
    if min(len(gen), len(real)) < 2:
        raise Skip(f"needs 2 images a set (has {len(gen)} generated, {len(real)} real)")
    subset = min(1000, len(gen), len(real))
    m = tf.calculate_metrics(input1=_Images(gen), input2=_Images(real), isc=True, kid=True,
                             isc_splits=min(10, max(1, len(gen) // 10)), kid_subset_size=subset,
                             cuda=device.startswith("cuda"), cache=False, save_cpu_ram=True,
                             verbose=False)
    return ({"mean": m["inception_score_mean"], "std": m["inception_score_std"]},
            {"mean": m["kernel_inception_distance_mean"], "std": m["kernel_inception_distance_std"],
             "subset_size": subset, "n_real": len(real)})


def lpips_distance(device: str, batch: int = 16):
    """distance(xs, ys) for ic_lpips: LPIPS (AlexNet, v0.1) of uint8 (3, H, W) image pairs."""
    net = optional("lpips").LPIPS(net="alex", version="0.1", verbose=False).to(device).eval()

    @torch.no_grad()
    def distance(xs, ys):
        out = []
        for i in range(0, len(xs), batch):
            a, b = (torch.stack(v[i:i + batch]).to(device).float() / 127.5 - 1 for v in (xs, ys))
            out += net(a, b).flatten().tolist()
        return out
    return distance


def literature(types: list[str], read, cap: int, device: str, log) -> dict:
    """{type: {"is", "kid", "ic_lpips"}}; read(type) -> (generated, real, train) uint8 stacks.
    A metric that cannot run is {"skipped": reason}, said once on stderr."""
    out = {t: {} for t in types}
    for keys, setup in ((("is", "kid"), lambda: optional("torch_fidelity")),
                        (("ic_lpips",), lambda: lpips_distance(device))):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tool = setup()
                stacks = {t: read(t) for t in types}
                for t, (gen, real, train) in stacks.items():
                    log(f"{'/'.join(keys)}: {t}")
                    try:
                        got = is_kid(tool, gen, real, device) if keys[0] == "is" else \
                            (ic_lpips(list(gen), list(train), tool, cap),)
                    except Skip as e:
                        log(f"{PROG}: skipped {'/'.join(keys)} for {t}: {e}")
                        got = ({"skipped": str(e)},) * len(keys)
                    out[t].update(zip(keys, got))
        except (UsageError, DataError):
            raise
        except Exception as e:  # noqa: BLE001 - no package, no network, no weights, ...
            first = (str(e).strip().splitlines() or [""])[0]
            reason = str(e) if isinstance(e, Skip) else f"{type(e).__name__}: {first} (weights " \
                f"are read from {torch.hub.get_dir()}/checkpoints)"
            log(f"{PROG}: skipped {'/'.join(keys)}: {reason}")
            for t in types:
                out[t].update({k: {"skipped": reason} for k in keys if k not in out[t]})
    return out


# ---- inputs -----------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = Parser(prog=PROG, description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--generated", nargs="+", required=True, metavar="DIR", help="minibldm.sample outputs")
    add("--data", required=True, metavar="DIR", help="the category (MVTec AD or plain layout)")
    add("--k", type=int, help="real defects per type for training (default 10, or --split's)")
    add("--seed", type=int, help="split seed (default 0, or --split's)")
    add("--split", metavar="FILE", help="a training run's split.json (its k and seed are used)")
    add("--cluster-cap", type=int, default=50, metavar="N",
        help="IC-LPIPS: members per cluster used, the first N (50)")
    add("--texture", action="store_true", help="a surface (recorded; no figure depends on it)")
    add("--device", default="cpu", help="cpu or cuda, for IS, KID and IC-LPIPS (cpu)")
    add("--out", metavar="RESULT.json", help="the JSON to write; the table goes to RESULT.md")
    args = p.parse_args(argv)
    for name, value, low in (("k", args.k, 1), ("seed", args.seed, 0),
                             ("cluster-cap", args.cluster_cap, 2)):
        if value is not None and value < low:
            raise UsageError(f"--{name} must be at least {low} (got {value})")
    for name, folder in [("data", args.data)] + [("generated", g) for g in args.generated]:
        if not Path(folder).is_dir():
            raise UsageError(f"--{name} {folder}: no such folder")
    if args.split and not Path(args.split).is_file():
        raise UsageError(f"--split {args.split}: no such file")
    if args.out and Path(args.out).is_dir():
        raise UsageError(f"--out {args.out}: is a folder; give a file name such as result.json")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available here")
    return args


def resized(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W, 3) at (h, w) by PIL's bilinear filter (minibldm.sample's resize)."""
    if image.shape[:2] == tuple(hw):
        return image
    return np.asarray(Image.fromarray(image).resize((hw[1], hw[0]), Image.BILINEAR))


def read_generated(args, category: Category, split: dict) -> dict[str, list[tuple]]:
    """{type: [(image, mask, source good image)]}, after minibldm.evaluate's held-out guard."""
    held_out = [f for pairs in split_pairs(category, split, "test").values() for pair in pairs
                for f in pair] + category.test_good
    pairs = check_generated([Path(f) for f in args.generated], category, held_out)
    sources = {}  # (folder, index) -> the manifest's source
    for folder in map(Path, args.generated):
        for line in filter(str.strip, (folder / "manifest.jsonl").read_text().splitlines()):
            record = json.loads(line)  # check_generated read it: a JSON object
            sources[folder.resolve(), record.get("index")] = record.get("source")
    out = {}
    for t, items in pairs.items():
        if t not in category.defects:
            raise UsageError(f"--generated {items[0][0].parent}: defect type {t!r} is not in "
                             f"--data {category.root} (has: {', '.join(category.defects)})")
        for image, mask in items:
            manifest = image.parents[2] / "manifest.jsonl"
            name = sources.get((image.parents[2].resolve(),
                                int(image.stem) if image.stem.isdigit() else None))
            if not isinstance(name, str):
                raise UsageError(f"--generated {image}: {manifest} has no record with index "
                                 f"{image.stem} naming its source good image")
            p = Path(name)  # as written, else in --data by its last 3 or 2 parts (train/good/x)
            found = [c for c in (p, category.root.joinpath(*p.parts[-3:]),
                                 category.root.joinpath(*p.parts[-2:])) if c.is_file()]
            if not found:
                raise UsageError(f"--generated {manifest}: source {name} of {image.name} is not "
                                 f"found (as written, nor in --data {category.root})")
            out.setdefault(t, []).append((image, mask, found[0]))
    return out


def read_masks(files: list[Path], arg: str) -> list[np.ndarray]:
    try:
        return [read_mask(f)[0].numpy() > 0.5 for f in files]
    except DataError as e:
        raise UsageError(f"{arg} {e}") from None


def image_stats(image: Path, source: Path, mask: np.ndarray) -> tuple[float, float]:
    """(background_psnr, defect_change) of a generated image file against its source, resized
    to its size."""
    try:
        gen, src = read_image(image), read_image(source)
    except DataError as e:
        raise UsageError(f"--generated {e}") from None
    if mask.shape != gen.shape[:2]:
        raise UsageError(f"--generated {image}: is {gen.shape[1]}x{gen.shape[0]} but its mask "
                         f"{mask.shape[1]}x{mask.shape[0]}")
    if mask.all():
        raise UsageError(f"--generated {image}: its mask covers it all (no background)")
    src = resized(src, gen.shape[:2])
    return background_psnr(gen, src, mask), defect_change(gen, src, mask)


# ---- the command ------------------------------------------------------------------------------

def measure(args, log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> dict:
    """Check the input and compute every figure; returns the result."""
    t0 = time.time()
    try:
        category = read_category(args.data, texture=True if args.texture else None)
    except DataError as e:
        raise UsageError(f"--data {e}") from None
    split = read_split(args, category)
    generated = read_generated(args, category, split)
    train = split_pairs(category, split, "train")
    per_type, pooled = {}, {"psnr": [], "change": [], "gen": [], "train": [], "real": []}
    for t, items in sorted(generated.items()):
        masks = read_masks([m for _, m, _ in items], "--generated")
        stats = [image_stats(image, source, m) for (image, _, source), m in zip(items, masks)]
        psnr, change = [p for p, _ in stats], [c for _, c in stats]
        geometry = {"gen": [mask_geometry(m) for m in masks]}
        for key, pairs in (("train", train[t]), ("real", category.defects[t])):
            geometry[key] = [mask_geometry(m) for m in read_masks([m for _, m in pairs], "--data")]
        per_type[t] = {"n": len(items), "background_psnr": summary(psnr),
                       "defect_change": summary(change),
                       "masks": mask_spread(geometry["gen"], geometry["train"], geometry["real"])}
        pooled["psnr"] += psnr
        pooled["change"] += change
        for key, values in geometry.items():
            pooled[key] += values

    hw = read_image(next(iter(generated.values()))[0][0]).shape[:2]

    @functools.cache
    def read(t):  # uint8 (N, 3, H, W) stacks at the first generated image's size
        def stack(paths):
            return torch.stack([torch.from_numpy(resized(read_image(p), hw).copy()).permute(2, 0, 1)
                                for p in paths])
        try:
            return (stack([i for i, _, _ in generated[t]]),
                    stack([i for i, _ in category.defects[t]]), stack([i for i, _ in train[t]]))
        except DataError as e:
            raise UsageError(f"--data {e}") from None

    optional_metrics = literature(sorted(generated), read, args.cluster_cap, args.device, log)
    for t, metrics in optional_metrics.items():
        per_type[t].update(metrics)
    overall = {"n": len(pooled["psnr"]), "background_psnr": summary(pooled["psnr"]),
               "defect_change": summary(pooled["change"]),
               "masks": mask_spread(pooled["gen"], pooled["train"], pooled["real"])}
    for key, value in (("is", "mean"), ("kid", "mean"), ("ic_lpips", "score")):
        values = [m[key][value] for m in per_type.values() if m[key].get(value) is not None]
        reasons = [m[key]["skipped"] for m in per_type.values() if "skipped" in m[key]]
        overall[key] = {value: float(np.mean(values)), "types": len(values)} if values else \
            {"skipped": (reasons or ["no defect type has a value"])[0]}

    def version(dist):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None
    settings = {"generated": args.generated, "data": str(args.data), "split": args.split,
                "k": args.k, "seed": args.seed, "texture": category.texture, "device": args.device,
                "image_size": list(hw), "psnr_cap_db": PSNR_CAP, "cluster_cap": args.cluster_cap,
                "small_clusters": SMALL_CLUSTERS, "lpips_net": "alex v0.1",
                "versions": {d: version(d) for d in ("torch", "torch-fidelity", "lpips")}}
    return {"settings": settings, "per_type": per_type, "overall": overall,
            "split": {"train": {t: len(p) for t, p in train.items()},
                      "real": {t: len(p) for t, p in category.defects.items()},
                      "short": split.get("short", {})},
            "wall_seconds": round(time.time() - t0, 1)}


def markdown(result: dict) -> str:
    """The figures as a markdown table."""
    def cell(m, key, value, fmt):  # "–" for a null score (no cluster with a pair)
        return "skipped" if "skipped" in m[key] else \
            "–" if m[key][value] is None else fmt.format(m[key][value])

    head = ["defect", "n", "bg PSNR mean / median / min (dB)", "change in mask mean / min (/255)",
            "mask area % gen / k real / all real", "centroid std x, y gen / all real",
            "gen to nearest real centroid", "IS", "KID", "IC-LPIPS"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in list(result["per_type"].items()) + [("**overall**", result["overall"])]:
        p, s = m["background_psnr"], m["masks"]
        g, a = s["generated"], s["real_all"]
        c = m["defect_change"]
        row = [name, str(m["n"]), f"{p['mean']:.1f} / {p['median']:.1f} / {p['min']:.1f}",
               f"{c['mean']:.1f} / {c['min']:.1f}",
               " / ".join(f"{100 * x['area_mean']:.2f}" for x in (g, s["real_train"], a)),
               f"{g['cx_std']:.2f}, {g['cy_std']:.2f} / {a['cx_std']:.2f}, {a['cy_std']:.2f}",
               f"{s['gen_to_all']:.3f}", cell(m, "is", "mean", "{:.2f}"),
               cell(m, "kid", "mean", "{:.4f}"), cell(m, "ic_lpips", "score", "{:.3f}")]
        lines.append("| " + " | ".join(row) + " |")
    s = result["settings"]
    return (f"generated defects against {Path(s['data']).name}: k={s['k']}, seed={s['seed']}, "
            f"images at {s['image_size'][1]}x{s['image_size'][0]}\n\n" + "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse_args(argv)
        result = measure(args)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    table = markdown(result)
    print(table, end="")
    if args.out:
        write_result(args.out, result, table)
        print(f"wrote {args.out} and {Path(args.out).with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
