"""The run folder of `python -m minibldm.train`: its checkpoint, outputs and loss log.

The run folder (--out) is a complete weights folder (`minibldm.load(RUN_DIR)` reads it):
  config.json             the model config, "image_size", and "train": this run's settings
  split.json              the few-shot split, reused when the run resumes (split-<i>-<name>.json
                          per category when --data names several)
  <network>.safetensors   the trained networks as of the last checkpoint; the others hard-linked
                          (else copied) from --weights, or their seeded random init. Only the
                          control stage writes control.safetensors (the other stages change what
                          a trimap branch was trained against), with the defects and the object
                          it was trained for in its metadata
  vocab.json, merges.txt  the tokenizer
  checkpoint.safetensors  the trained networks, AdamW's state and, in its metadata, the step, the
                          settings and the fp16 loss scale (no pickle); written atomically every
                          --checkpoint-every steps and at the end
  loss.csv                step,loss (the mean over all processes); loss.png at the end
Re-running with the same --out continues from checkpoint.safetensors (to a larger --steps if
given); on CPU the result is bit-for-bit that of an uninterrupted run. A run whose settings differ
(other than --steps, --checkpoint-every, --device, --num-workers, --grad-checkpoint,
--log-every, the path of an unchanged --config) is refused, naming the fields.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import shutil
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ..config import ModelConfig
from ..io import load_into, save_atomic, write_text_atomic
from ..tokenizer import Tokenizer
from ..weights import FILES

CHECKPOINT = "checkpoint.safetensors"
CHECKPOINT_FORMAT = "minibldm.train/1"
# Settings a resumed run may change; every other one must equal the checkpoint's.
# (--config's path may change too: its content is compared as "model".)
MAY_CHANGE = {"steps", "checkpoint_every", "device", "num_workers", "grad_checkpoint", "log_every",
              "out", "config", "max_pixels"}
# Settings added after runs were made: a checkpoint without one was made with this value.
ADDED_SETTINGS = {"defect_weight": 1.0}


class TrainError(Exception):
    """Bad input or a failed run; the message is one line."""


def differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Names of the fields whose values differ, nested ones as `model.unet.model_channels`."""
    out = []
    for k in sorted(set(a) | set(b)):
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += differences(a[k], b[k], f"{prefix}{k}.")
        elif a.get(k) != b.get(k):
            out.append(f"{prefix}{k}")
    return out


def check_resumable(out: Path, state: dict, run: dict, rescaled: bool) -> None:
    """A TrainError naming the settings in which `run` differs from the checkpoint's, other
    than MAY_CHANGE (and the latent scale when this run sets it anew: `rescaled`)."""
    differ = [k for k in differences({**ADDED_SETTINGS, **state["run"]}, run)
              if k.split(".")[0] not in MAY_CHANGE
              and not (k == "model.autoencoder.scale_factor" and rescaled)]
    if differ:
        raise TrainError(f"--out {out}: holds a run with other settings ({', '.join(differ)}); "
                         "use those settings or another --out")


def save_checkpoint(path: Path, step: int, opt, run: dict) -> None:
    """opt: a train.Optimizer, whose trained networks and AdamW state are saved."""
    tensors = {f"net/{name}/{k}": v for name, net in opt.trained.items()
               for k, v in net.state_dict().items()}
    for pname, p in opt.named_params:
        for key, value in opt.adamw.state.get(p, {}).items():
            tensors[f"adamw/{pname}/{key}"] = torch.as_tensor(value)
    scaler = opt.scaler.state_dict() if opt.scaler.is_enabled() else None
    state = {"step": step, "scaler": scaler, "run": run}
    save_atomic(tensors, path, {"format": CHECKPOINT_FORMAT, "state": json.dumps(state)})


def read_checkpoint_state(path: Path) -> dict:
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise TrainError(f"{path}: not a {CHECKPOINT_FORMAT} checkpoint")
        return json.loads(meta["state"])
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise TrainError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e}); delete it "
                         "to start the run again") from None


def load_checkpoint(path: Path, state: dict, opt) -> int:
    """Restore `opt` (a train.Optimizer) as of the checkpoint; returns its step."""
    tensors = load_file(str(path))
    for name, net in opt.trained.items():
        prefix = f"net/{name}/"
        load_into(net, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                  str(path), name)
    index = {pname: i for i, (pname, _) in enumerate(opt.named_params)}
    opt_state = {}
    for k, v in tensors.items():
        if k.startswith("adamw/"):
            pname, key = k[len("adamw/"):].rsplit("/", 1)
            if pname not in index:
                raise TrainError(f"{path}: optimizer state for an unknown parameter {pname}")
            opt_state.setdefault(index[pname], {})[key] = v
    opt.adamw.load_state_dict({"state": opt_state,
                               "param_groups": opt.adamw.state_dict()["param_groups"]})
    if state.get("scaler"):
        opt.scaler.load_state_dict(state["scaler"])
    return state["step"]


def place_file(src: Path, dst: Path) -> None:
    """dst becomes src's content: a hard link where possible (no copy of GBs of frozen weights;
    files are only ever replaced, never written in place), else a copy; atomically either way."""
    if dst.exists() and os.path.samefile(src, dst):
        return  # already a link to src (a rerun): nothing to do
    tmp = dst.with_name(dst.name + ".tmp")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    if tmp.exists():  # rename(2) does nothing when both names are links to one file
        tmp.unlink()


def control_metadata(cats: list, splits: list[dict], defects: list[str] | None) -> dict[str, str]:
    """control.safetensors' metadata: the defect folders it was trained on ("defects"), the
    object ("object", the first category's), and per object its defect folders with their prompt
    names ("objects", JSON {object: {folder: name}}; "defect_names" is the first category's)."""
    objects = {}
    for c, s in zip(cats, splits):
        folders = list(defects or sorted(s["defects"]))
        objects.setdefault(c.object_name, {}).update({d: c.defect_names.get(d, d) for d in folders})
    every = sorted({d for names in objects.values() for d in names})
    return {"defects": json.dumps(every), "object": cats[0].object_name,
            "defect_names": json.dumps(objects[cats[0].object_name]), "objects": json.dumps(objects)}


@contextlib.contextmanager
def undo_if_failed(out: Path, enabled: bool = True):
    """Around a run: if it fails or is interrupted while `out` holds no checkpoint, remove what it
    wrote there (the folder too when it made it), so that a failed run leaves nothing that looks
    like a run, and the corrected command starts as if it were the first."""
    existed = out.exists()
    before = set(out.rglob("*")) if existed else set()
    try:
        yield
    except BaseException:
        if enabled and not (out / CHECKPOINT).is_file():
            if not existed:
                shutil.rmtree(out, ignore_errors=True)
            else:  # deepest first, so that each new folder is empty when its turn comes
                for p in sorted(set(out.rglob("*")) - before, reverse=True):
                    p.rmdir() if p.is_dir() and not p.is_symlink() else p.unlink()
        raise


def write_trained(out: Path, nets: dict, trained: tuple[str, ...],
                  metadata: dict[str, str] | None) -> None:
    """The networks named in `trained`, as they are now; control.safetensors with `metadata`."""
    for name in trained:
        save_atomic(nets[name].state_dict(), out / FILES[name],
                    metadata if name == "control" else None)


def write_run_folder(out: Path, args, cfg: ModelConfig, run: dict, sources: dict, nets: dict,
                     trained: tuple[str, ...], tokenizer: Tokenizer, tok_source: str) -> None:
    """config.json, tokenizer, and every network this run does not train (linked or new). Only
    the control stage has a trimap branch: one fits the UNet and latents it was trained with."""
    out.mkdir(parents=True, exist_ok=True)
    origin = {}
    for name, net in nets.items():
        if name in trained:
            origin[name] = "trained" + (" (from --weights)" if sources[name] == "weights" else "")
        elif sources[name] == "weights":
            place_file(Path(args.weights) / FILES[name], out / FILES[name])
            origin[name] = "linked from --weights"
        else:
            save_atomic(net.state_dict(), out / FILES[name])
            origin[name] = f"random init (seed {args.seed})"
    tokenizer.save(out)
    raw = {**dataclasses.asdict(cfg), "image_size": args.size,
           "train": {**run, "networks": origin, "tokenizer": tok_source}}
    write_text_atomic(out / "config.json", json.dumps(raw, indent=2) + "\n")


def read_loss_log(path: Path, upto: int) -> list[tuple[int, float]]:
    """loss.csv's rows up to step `upto` (the checkpoint's); a line a kill cut short is past the
    checkpoint, so it is dropped with the others there."""
    if not path.is_file():
        return []
    rows = []
    with path.open() as f:
        for r in csv.DictReader(f):
            try:
                rows.append((int(r["step"]), float(r["loss"])))
            except (TypeError, ValueError):
                continue
    return [r for r in rows if r[0] <= upto]


def draw_loss_curve(rows: list[tuple[int, float]], path: Path, title: str) -> None:
    """The loss per step (grey) and its running mean (blue) on linear axes, drawn with PIL. The
    y range stops at the 99th percentile so that early spikes do not flatten the rest."""
    W, H, left, right, top, bottom = 720, 400, 72, 24, 34, 44
    img = Image.new("RGB", (W, H), "white")
    d, font = ImageDraw.Draw(img), ImageFont.load_default()
    d.text((left, 10), title, fill="black", font=font)
    rows = [(s, v) for s, v in rows if math.isfinite(v)]
    if not rows:
        d.text((left, H // 2), "no finite loss logged", fill="black", font=font)
        img.save(path)
        return
    steps, vals = [s for s, _ in rows], [v for _, v in rows]
    w = max(1, len(vals) // 50)  # the running mean's window
    wins = [vals[max(0, i - w + 1):i + 1] for i in range(len(vals))]
    smooth = [sum(win) / len(win) for win in wins]
    lo, hi = min(vals), sorted(vals)[min(len(vals) - 1, int(0.99 * len(vals)))]
    hi = hi if hi > lo else lo + 1e-12 + abs(lo) * 0.1
    s0, s1 = min(steps[0], 0), max(steps[-1], 1)

    def xy(s, v):
        x = left + (s - s0) / (s1 - s0) * (W - left - right)
        y = top + (hi - min(max(v, lo), hi)) / (hi - lo) * (H - top - bottom)
        return x, y
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    for k in range(5):
        v = lo + (hi - lo) * k / 4
        y = xy(s0, v)[1]
        d.line([left - 4, y, left, y], fill="black")
        d.text((4, y - 6), f"{v:.4g}", fill="black", font=font)
        s = s0 + (s1 - s0) * k / 4
        x = xy(s, lo)[0]
        d.line([x, H - bottom, x, H - bottom + 4], fill="black")
        d.text((x - 12, H - bottom + 8), f"{round(s)}", fill="black", font=font)
    d.text(((W - 30) // 2, H - 16), "step", fill="black", font=font)
    if len(rows) > 1:
        d.line([xy(s, v) for s, v in rows], fill=(185, 185, 185), width=1)
        d.line([xy(s, v) for s, v in zip(steps, smooth)], fill=(30, 80, 200), width=2)
    else:
        x, y = xy(*rows[0])
        d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(30, 80, 200))
    img.save(path)
