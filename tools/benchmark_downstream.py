#!/usr/bin/env python
"""The downstream benchmark: does minibldm's generated data help a defect detector on real
parts, against the baselines a user would otherwise pick?

    python tools/benchmark_downstream.py [--quick] [--data DIR] [--work DIR] [--seeds 0 1 2]
        [--init weights/tiny|none] [--sampler bulk|full] [--n N] [--defect-weight W]
        [--fg-weight W] [--exact-masks]

For each seed, on one real category (default ../shared/data/magnetic_tile, a surface):
  1. the generator: the pretrained tiny model (weights/tiny, trained on minibldm's synthetic
     dataset) fine-tuned on this category with minibldm's own commands, as AdaBLDM fine-tunes
     SD 1.5: autoencoder on the good images, text encoder + UNet, then the trimap branch on the
     k = 10 real defects per type of the seed's few-shot split (written by
     `python -m minibldm.train` as split.json; the rest is the test set), every stage with the
     loss weighted 8x on the defect (train --defect-weight 8, the recipe that keeps small
     defects; weights/tiny/README.md). --init none trains it from scratch with the tiny config
     instead (many more steps are then needed);
  2. `python -m minibldm.sample` with that generator: 200 images per defect type (--n), masks
     drawn from the split's training masks only, with `sample --bulk` (50 DDIM steps, no decoder
     adaptation, the good image pasted outside a feathered mask: 1,000 images in about 20 min on
     2 cores); --sampler full runs the paper's whole method instead (200 adaptation steps per
     image, about 15x slower), to measure what the shortcut changes;
  3. `python -m minibldm.evaluate` for every method (real-only, crop-paste, perlin, minibldm,
     and minibldm+real: the generated and the real training defects together) with the run's
     split.json, so every detector sees the same real training images, each detector trained for
     the length tools/detector_lengths.py chose (DETECTOR_STEPS) on batches of 16 windows of
     64 px (protocol 3, 2026-12-03; results in eval_Nsteps_window64: protocol 2's whole-image
     detector wrote eval_Nsteps);
  4. `python -m minibldm.genquality` on the generated images.
Then the mean ± std over seeds goes to WORK/MODE/summary.json and summary.md (the table for
docs/RESULTS.md): the spread covers the split, the generator's training, generation and the
detector. Variants sit beside the default, with tagged folders, result and summary files,
reusing the seeds' baseline detectors (and generators) that exist: --sampler full (_full) and
--n N (_nN) change how and how many images are generated; --defect-weight W
fine-tunes every stage with train's --defect-weight W instead of 8 (the defect's pixels weigh W
in the losses; generator_dwW); --fg-weight W samples with the sampler's --fg-weight W instead of its
default 1 (generated_fgW); and --exact-masks samples on the split's training masks as they are
(sample --exact-masks: each real mask's own shape and place, such as a break on the tile's
edge) instead of masks drawn from them with a random rotation, scale and place
(generated_exact; n images per type = the first n masks). Every step resumes: run the same
command again after an interruption. --quick (one seed, 100 steps per stage, 2 images per
type) checks the whole chain; its numbers say nothing about quality.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from minibldm.commands.data import make_split, read_category
from minibldm.eval.common import machine
from minibldm.eval.evaluate import GENERATED  # the methods that read the generated images
from minibldm.io import write_text_atomic

REPO = Path(__file__).resolve().parents[1]
METHODS = ("real-only", "crop-paste", "perlin", "minibldm", "minibldm+real")  # table order
# The detector's training length, chosen by tools/detector_lengths.py's rule from the training
# losses of real-only and crop-paste on seed 0 (docs/RESULTS.md), never from test metrics: for
# the window detector (2026-12-03) no length up to 4000 met the rule, so the longest, 4000.
DETECTOR_STEPS = 4000
CROP = 64  # protocol 3's detector trains on batches of 16 windows of CROP px (docs/RESULTS.md)
DETECTOR = ["--crop", CROP, "--batch-size", 16]
# steps of each stage: autoencoder, text + UNet, trimap branch; detector steps; images per type.
# Full mode fine-tunes the pretrained tiny model (--init), as AdaBLDM fine-tunes SD 1.5.
STEPS = {"full": dict(ae=300, text=1200, control=1200, detector=DETECTOR_STEPS, n=200),
         "quick": dict(ae=100, text=100, control=100, detector=100, n=2)}
DEFECT_WEIGHT = 8.0  # every training stage's --defect-weight by default
TIMES: list[tuple[str, float]] = []  # (command, seconds) of every command this call ran


def run(cmd: list, log: Path) -> None:
    """Run one command, its output appended to `log`; stop the benchmark if it fails."""
    cmd = [str(c) for c in cmd]
    print("$ " + " ".join(cmd), flush=True)
    start = time.time()
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    if rc:
        sys.exit(f"benchmark_downstream: the command above failed (exit {rc}); see {log}")
    TIMES.append((" ".join(cmd[1:]), round(time.time() - start, 1)))
    print(f"  done in {time.time() - start:.0f} s", flush=True)


def train_model(data: Path, runs: Path, seed: int, s: dict, init: Path | None, device: str,
                log: Path, defect_weight: float = 1.0) -> Path:
    """The tiny-preset generator: fine-tuned from `init` (a weights folder), or trained from
    scratch with the tiny config when `init` is None; returns the folder of its last stage.
    defect_weight: every stage's --defect-weight."""
    common = ["--data", data, "--texture", "--object", "magnetic tile", "--size", 128, "--k", 10,
              "--seed", seed, "--device", device, "--log-every", 50, "--defect-weight", defect_weight]
    py = [sys.executable, "-m", "minibldm.train"]
    start = ["--weights", init] if init else ["--config", "tiny"]
    run(py + ["--stage", "autoencoder", *start, "--out", runs / "ae",
              "--steps", s["ae"], "--batch-size", 8, *common], log)
    run(py + ["--stage", "text", "--weights", runs / "ae", "--scale-factor", "auto",
              "--out", runs / "text", "--steps", s["text"], "--batch-size", 16, "--lr", 2e-4,
              "--defect-repeat", 4, *common], log)
    run(py + ["--stage", "control", "--weights", runs / "text", "--out", runs / "control",
              "--steps", s["control"], "--batch-size", 16, "--lr", 1e-4, *common], log)
    return runs / "control"


def training_masks(data: Path, split: dict, out: Path) -> dict[str, Path]:
    """A folder per defect type holding links to the split's training masks only, so that the
    sampler cannot draw a held-out mask."""
    folders = {}
    for name, part in split["defects"].items():
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        for rel in part["train"]:
            stem = Path(rel).stem
            mask = next((data / "ground_truth" / name / f"{stem}{suffix}"
                         for suffix in ("_mask.png", ".png")
                         if (data / "ground_truth" / name / f"{stem}{suffix}").is_file()), None)
            if mask is None:
                sys.exit(f"benchmark_downstream: no mask for {data / rel}")
            link = folder / mask.name
            if not link.exists():
                link.symlink_to(mask.resolve())
        folders[name] = folder
    return folders


def generate(model: Path, data: Path, masks: dict, out: Path, seed: int, n: int, device: str,
             log: Path, fg_weight: float, exact: bool = False, full: bool = False) -> list[Path]:
    """n images per defect type, on masks drawn from the type's folder (exact: its masks as
    they are, the first n, each stretched to its good image's size), with `sample --bulk`
    (full: the whole method, in batches of 5)."""
    outs = []
    for name, folder in masks.items():
        target = out / name
        run([sys.executable, "-m", "minibldm.sample", "--weights", model,
             "--images", data / "train" / "good",
             # the real masks come from defect images of other sizes than the good ones
             *(["--exact-masks", folder, "--resize-masks"] if exact else ["--defect-masks", folder]),
             "--texture",
             "--object", "magnetic tile", "--defect", name, "-n", n,
             "--out", target, "--seed", seed, "--device", device, "--fg-weight", fg_weight,
             *(["--batch-size", min(n, 5)] if full else ["--bulk"])], log)
        outs.append(target)
    return outs


def labels(tag: str = "") -> dict[str, str]:
    """{label: evaluate's --method}: the methods that read generated images carry the variant's
    tag in their label (and result file name)."""
    return {m + (tag if m in GENERATED else ""): m for m in METHODS}


def evaluate(data: Path, split_file: Path, generated: list, out: Path, steps: int, seed: int,
             device: str, log: Path, methods: dict[str, str] | None = None) -> dict:
    """Each method's detector result by label (methods: labels(tag); default untagged)."""
    results = {}
    for label, method in (labels() if methods is None else methods).items():
        result = out / f"{label}.json"
        if not result.is_file():
            extra = ["--generated", *generated] if method in GENERATED else []
            run([sys.executable, "-m", "minibldm.evaluate", "--data", data, "--texture",
                 "--method", method, "--split", split_file, "--seed", seed, "--detector-steps", steps,
                 *DETECTOR, "--device", device, "--out", result, *extra], log)
        results[label] = json.loads(result.read_text())
    return results


def mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def summarise(per_seed: dict, metrics: list[str], methods: tuple = METHODS) -> tuple[dict, str]:
    """Mean ± sample std over seeds of each method's mean-over-defect-types metrics."""
    summary = {}
    for method in methods:
        rows = [r[method]["mean"] for r in per_seed.values()]
        summary[method] = {m: dict(zip(("mean", "std"), mean_std([row[m] for row in rows])))
                           for m in metrics}
    head = "| method | " + " | ".join(m.replace("_", " ") for m in metrics) + " |"
    lines = [head, "|" + "---|" * (len(metrics) + 1)]
    for method in methods:
        cells = [f"{summary[method][m]['mean']:.3f} ± {summary[method][m]['std']:.3f}" for m in metrics]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return summary, "\n".join(lines) + "\n"


def per_type_table(per_seed: dict, metric: str, methods: tuple = METHODS) -> str:
    """Rows: defect types; columns: methods; cells: mean ± sample std over seeds of `metric`."""
    types = sorted(next(iter(per_seed.values()))["real-only"]["per_type"])
    lines = ["| defect | " + " | ".join(methods) + " |", "|" + "---|" * (len(methods) + 1)]
    for t in types:
        cells = []
        for method in methods:
            m, sd = mean_std([r[method]["per_type"][t][metric] for r in per_seed.values()])
            cells.append(f"{m:.3f} ± {sd:.3f}")
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "magnetic_tile"))
    p.add_argument("--work", default="runs/downstream", help="where runs and results go")
    p.add_argument("--seeds", type=int, nargs="+", help="default 0 1 2 (--quick: 0)")
    p.add_argument("--init", default=str(REPO / "weights" / "tiny"),
                   help="weights the generator is fine-tuned from (default weights/tiny, the "
                   "pretrained tiny model); 'none' trains it from scratch")
    p.add_argument("--quick", action="store_true", help="one seed, few steps: checks the chain")
    p.add_argument("--device", default="cpu")
    p.add_argument("--sampler", choices=("bulk", "full"), default="bulk",
                   help="bulk (default): sample --bulk, no decoder adaptation; full: the paper's "
                   "whole method (about 15x slower); tagged _full")
    p.add_argument("--detector-steps", type=int, metavar="N", help="detector training steps "
                   f"(default {DETECTOR_STEPS}, --quick 100); results go to eval_Nsteps_window64")
    p.add_argument("--n", type=int, metavar="N", help="images per defect type (default 200, "
                   "--quick 2); another number is tagged _nN")
    p.add_argument("--defect-weight", type=float, default=DEFECT_WEIGHT, metavar="W",
                   help="every training stage's --defect-weight (default %(default)g). Another "
                   "value trains its own generator_dwW per seed and tags what follows")
    p.add_argument("--fg-weight", type=float, default=1.0, metavar="W",
                   help="the sampler's --fg-weight (default 1, its default). Another value gets "
                   "its own generated_fgW folders, result files and summary_fgW files beside the "
                   "default's, and reuses the seeds' generators and baseline detectors")
    p.add_argument("--baselines-only", action="store_true",
                   help="only the methods without generated images (real-only, crop-paste, "
                   "perlin), on the seed's split (made by train's rule when not there yet): "
                   "they need no generator, so they can run in a session of their own")
    p.add_argument("--exact-masks", action="store_true",
                   help="sample on the training masks as they are (their own shapes and places) "
                   "instead of transformed draws from them; tagged _exact like the weights")
    return p.parse_args(argv)


def bad_args(args) -> str | None:
    """What is wrong with the arguments, in one line, or None."""
    data = Path(args.data)
    if not (data / "train" / "good").is_dir():
        return f"--data {data}: no train/good folder"
    if args.init != "none" and not (Path(args.init) / "config.json").is_file():
        return f"--init {Path(args.init)}: no config.json there"
    for name, value in (("--defect-weight", args.defect_weight), ("--fg-weight", args.fg_weight)):
        if not (value > 0 and math.isfinite(value)):
            return f"{name} {value}: must be positive"
    for name, value in (("--n", args.n), ("--detector-steps", args.detector_steps)):
        if value is not None and value < 1:
            return f"{name} {value}: must be at least 1"
    return None


def tags(args) -> tuple[str, str]:
    """(the generator's tag, the variant's tag): what a non-default option adds to file names."""
    dw_tag = "" if args.defect_weight == DEFECT_WEIGHT else f"_dw{args.defect_weight:g}"
    n_default = STEPS["quick" if args.quick else "full"]["n"]
    tag = (dw_tag + ("" if args.fg_weight == 1.0 else f"_fg{args.fg_weight:g}")
           + ("_exact" if args.exact_masks else "") + ("_full" if args.sampler == "full" else "")
           + ("" if args.n in (None, n_default) else f"_n{args.n}"))
    return dw_tag, tag


def run_seed(args, seed: int, work: Path, s: dict, log: Path) -> tuple[dict, dict]:
    """One seed's chain, each step skipped when its result exists: train the generator, sample,
    evaluate the methods that read generated images, genquality, then the baselines. The
    seed's split is kept as seedN/split.json, so that the baselines need no generator and a
    seed can be finished in a later session from its results alone (the generators and images
    are large and made from the data's pixels; only the split, the results and the log are
    worth keeping). Returns (detector results, genquality result)."""
    data, init = Path(args.data), None if args.init == "none" else Path(args.init)
    dw_tag, tag = tags(args)
    methods = labels(tag)
    sw = work / f"seed{seed}"
    sw.mkdir(exist_ok=True)
    steps = args.detector_steps or s["detector"]
    out = sw / f"eval_{steps}steps_window{CROP}"
    split_file, gq = sw / "split.json", sw / f"genquality{tag}.json"
    needs_generator = [label for label, m in methods.items()
                       if m in GENERATED and not (out / f"{label}.json").is_file()]
    generated = []
    if args.baselines_only:
        if not split_file.is_file():  # train's own split rule, as the generator's run writes it
            category = read_category(data, texture=True)
            write_text_atomic(split_file, json.dumps(make_split(category, k=10, seed=seed), indent=1))
        methods = {label: m for label, m in methods.items() if m not in GENERATED}
        print(f"== seed {seed}: evaluating {', '.join(methods)}", flush=True)
        return evaluate(data, split_file, [], out, steps, seed, args.device, log, methods), {}
    if needs_generator or not gq.is_file() or not split_file.is_file():
        print(f"== seed {seed}: training the generator on {data.name}", flush=True)
        model = train_model(data, sw / f"generator{dw_tag}", seed, s, init, args.device, log,
                            args.defect_weight)
        split = (model / "split.json").read_text()
        if split_file.is_file() and json.loads(split_file.read_text()) != json.loads(split):
            sys.exit(f"benchmark_downstream: {model / 'split.json'} differs from {split_file}")
        split_file.write_text(split)
        masks = training_masks(data, json.loads(split), sw / "train_masks")
        print(f"== seed {seed}: generating {args.n or s['n']} images per defect type", flush=True)
        generated = generate(model, data, masks, sw / f"generated{tag}", seed, args.n or s["n"],
                             args.device, log, args.fg_weight, args.exact_masks,
                             args.sampler == "full")
    print(f"== seed {seed}: evaluating {', '.join(methods)}", flush=True)
    # the methods that need this call's images first: the baselines can finish in another call
    order = sorted(methods, key=lambda label: methods[label] not in GENERATED)
    results = evaluate(data, split_file, generated, out, steps, seed, args.device, log,
                       {label: methods[label] for label in order[:len(needs_generator)]})
    if not gq.is_file():
        run([sys.executable, "-m", "minibldm.genquality", "--data", data, "--texture",
             "--split", split_file, "--generated", *generated, "--out", gq], log)
    results.update(evaluate(data, split_file, generated, out, steps, seed, args.device, log,
                            methods))
    return {label: results[label] for label in methods}, json.loads(gq.read_text())


def write_summary(args, work: Path, info: dict, per_seed: dict, quality: dict) -> str:
    """summary{tag}.json and .md in work; returns the headline table."""
    _, tag = tags(args)
    methods = tuple(labels(tag))
    metrics = list(next(iter(per_seed.values()))["real-only"]["mean"])
    summary, table = summarise(per_seed, metrics, methods)
    (work / f"summary{tag}.json").write_text(json.dumps(
        {"info": info, "summary": summary, "per_seed": per_seed, "genquality": quality},
        indent=1) + "\n")
    (work / f"summary{tag}.md").write_text(
        f"Downstream detection on {Path(args.data).name}, {info['mode']} mode, seeds "
        f"{info['seeds']}, training --defect-weight {args.defect_weight:g}, {info['n']} images "
        f"per type from the {args.sampler} sampler (--fg-weight {args.fg_weight:g})"
        f"{', on the training masks as they are' if args.exact_masks else ''}, detectors "
        f"trained {info['detector_steps']} steps "
        "(a generator, a split and a detector per seed), mean ± std over seeds of the mean over "
        "defect types.\n\n" + table
        + "".join(f"\nPer defect type, {m.replace('_', ' ')}:\n\n"
                  + per_type_table(per_seed, m, methods)
                  for m in ("pixel_ap", "pixel_aupro", "image_auroc")))
    return table


def main(argv=None) -> int:
    args = parse_args(argv)
    problem = bad_args(args)
    if problem:
        print(f"benchmark_downstream: {problem}", file=sys.stderr)
        return 2
    mode = "quick" if args.quick else "full"
    s, seeds = STEPS[mode], args.seeds or ([0] if args.quick else [0, 1, 2])
    work = Path(args.work) / mode
    work.mkdir(parents=True, exist_ok=True)
    log = work / "commands.log"
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip() or "unknown"
    with open(log, "a") as f:  # which code, where and when, for every call
        f.write(f"# {time.strftime('%Y-%m-%d %H:%M')} minibldm {commit}, "
                f"{machine(args.device)}, {os.cpu_count()} cores: {' '.join(sys.argv)}\n")
    start, per_seed, quality, walls = time.time(), {}, {}, {}
    for seed in seeds:
        t0 = time.time()
        per_seed[seed], quality[seed] = run_seed(args, seed, work, s, log)
        walls[seed] = time.time() - t0
    if args.baselines_only:
        print(f"baselines of seeds {seeds} done ({time.time() - start:.0f} s); the summary is "
              "written by a run with the generator's methods", flush=True)
        return 0
    info = {"mode": mode, "seeds": seeds, "defect_weight": args.defect_weight,
            "fg_weight": args.fg_weight, "exact_masks": args.exact_masks,
            "sampler": args.sampler, "n": args.n or s["n"],
            "detector_steps": args.detector_steps or s["detector"],
            "init": None if args.init == "none" else str(Path(args.init)), "steps": s,
            "data": str(Path(args.data).resolve()),
            "machine": f"{machine(args.device)}, {os.cpu_count()} cores",
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "wall_s": round(time.time() - start), "wall_s_this_call": walls,
            "commands_this_call": TIMES}
    table = write_summary(args, work, info, per_seed, quality)
    _, tag = tags(args)
    print(table + f"\nwrote {work / f'summary{tag}.json'} and {work / f'summary{tag}.md'} "
          f"({info['wall_s']} s this call)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
