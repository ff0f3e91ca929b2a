"""What each step of `python -m minibldm.train` reads: the run's samples, indexed by their
position in the run and split across processes, every random draw a function of (--seed, the
sample's index) alone, so that a run gives the same batches however it is split or restarted.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import torch

from ..config import AutoencoderConfig
from ..io import write_text_atomic
from .data import GoodDataset, PairDataset, default_prompt, load_or_make_split, read_category
from .runfolder import TrainError

NUM_TIMESTEPS = 1000  # the diffusion stages draw t ~ U{0 .. NUM_TIMESTEPS - 1}


def derived_seed(*parts) -> int:
    """A 63-bit seed from any values, e.g. (seed, "noise", i): independent streams per purpose."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class ShuffledImages(torch.utils.data.Dataset):
    """Sample i of a run over the images of one or more GoodDatasets: epoch e = i // N visits
    all N images in a permutation drawn from (seed, e), and item e·n + j of a dataset of n images
    gives image j with epoch e's own flips and empty-prompt draw."""

    def __init__(self, datasets: list[GoodDataset], seed: int):
        self.datasets, self.seed = datasets, seed
        self.owner = [(d, j) for d, ds in enumerate(datasets) for j in range(len(ds.items))]
        self._perm = (None, None)

    def __len__(self) -> int:
        return 2 ** 62  # the run's length is its step count; items exist for any index

    def __getitem__(self, i: int) -> dict:
        epoch, r = divmod(i, len(self.owner))
        if self._perm[0] != epoch:
            g = torch.Generator().manual_seed(derived_seed(self.seed, "epoch", epoch))
            self._perm = (epoch, torch.randperm(len(self.owner), generator=g).tolist())
        d, j = self.owner[self._perm[1][r]]
        return self.datasets[d][epoch * len(self.datasets[d].items) + j]


class Interleaved(torch.utils.data.Dataset):
    """Sample i of several datasets taken in turn: item i // C of dataset i % C."""

    def __init__(self, datasets: list):
        self.datasets = datasets

    def __len__(self) -> int:
        return sum(len(d) for d in self.datasets)

    def __getitem__(self, i: int) -> dict:
        return self.datasets[i % len(self.datasets)][i // len(self.datasets)]


class StepBatches(torch.utils.data.Sampler):
    """Per step from `start` to `steps`, this process's share of the global batch: sample indices
    s·B + rank·b ... s·B + rank·b + b − 1 with b = B / world."""

    def __init__(self, start: int, steps: int, batch: int, rank: int, world: int):
        self.start, self.steps, self.batch, self.rank, self.world = start, steps, batch, rank, world

    def __len__(self) -> int:
        return self.steps - self.start

    def indices(self, step: int) -> list[int]:
        b = self.batch // self.world
        first = step * self.batch + self.rank * b
        return list(range(first, first + b))

    def __iter__(self):
        return map(self.indices, range(self.start, self.steps))


def collate(items: list[dict]) -> dict:
    out = {"image": torch.stack([it["image"] for it in items]),
           "prompt": [it["prompt"] for it in items]}
    for key in ("hint", "mask"):
        if key in items[0]:
            out[key] = torch.stack([it[key] for it in items])
    return out


def split_path(out: Path, categories: list, i: int) -> Path:
    if len(categories) == 1:
        return out / "split.json"
    return out / f"split-{i}-{categories[i].root.resolve().name}.json"


def read_data(args, out: Path) -> tuple[list, list[dict]]:
    """The categories and their few-shot splits: read from the run folder, or made (a function
    of the file names, k and the seed alone, so every process makes the same) and written later
    by write_splits, once the data has been checked."""
    cats = [read_category(d, texture=True if args.texture else None, object_name=args.object)
            for d in args.data]
    if args.defect:
        for c in cats:
            unknown = [d for d in args.defect if d not in c.defects]
            if unknown:
                raise TrainError(f"{c.root}: no defect type {', '.join(map(repr, unknown))} with "
                                 f"images and masks (has: {', '.join(c.defects) or 'none'})")
    for c in cats if args.stage == "control" else ():
        if not c.defects:
            raise TrainError(f"{c.root}: no defect images with masks to train the trimap branch on")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the short types are reported below, once
        splits = [load_or_make_split(split_path(out, cats, i), c, args.k, args.seed, write=False)
                  for i, c in enumerate(cats)]
    return cats, splits


def split_notes(args, cats: list, splits: list[dict], log) -> None:
    """A note for each defect type with fewer than k images (all of them train)."""
    for c, s in zip(cats, splits):
        for d in [d for d in args.defect or sorted(s["defects"]) if d in s["short"]]:
            log(f"note: {c.root.name}/{d} has {s['short'][d]} real defect images, fewer than "
                f"k={args.k}; training on all {s['short'][d]} (none is left for evaluation)")


def write_splits(out: Path, cats: list, splits: list[dict]) -> None:
    """The splits read_data made, into the run folder (those already there stay as they are)."""
    for i, split in enumerate(splits):
        if not split_path(out, cats, i).is_file():
            write_text_atomic(split_path(out, cats, i), json.dumps(split, indent=1))


def check_data(dataset) -> None:
    """Decode every image, mask and foreground the run will read, into the datasets' caches, so
    that a bad file is reported before anything is written, not at the step that first reads it."""
    for part in getattr(dataset, "datasets", [dataset]):
        for kind, path in part.files():
            getattr(part.decoded, kind)(path)


def make_dataset(args, cats: list, splits: list[dict]) -> torch.utils.data.Dataset:
    if args.stage == "control":
        pairs = [PairDataset(c, s, size=args.size, defects=args.defect,
                             p_empty_prompt=args.p_empty_prompt,
                             seed=args.seed if len(cats) == 1 else derived_seed(args.seed, "pairs", i) % 2 ** 31,
                             length=args.steps * args.batch_size, translate_only=args.translate_only)
                 for i, (c, s) in enumerate(zip(cats, splits))]
        return pairs[0] if len(pairs) == 1 else Interleaved(pairs)
    goods = []
    for c, s in zip(cats, splits):
        if args.defect:
            s = {**s, "defects": {d: s["defects"][d] for d in args.defect if d in s["defects"]}}
        goods.append(GoodDataset(c, size=args.size, seed=args.seed, split=s,
                                 p_empty_prompt=args.p_empty_prompt,
                                 defect_repeat=args.defect_repeat))
    return ShuffledImages(goods, args.seed)


def all_prompts(cats: list) -> list[str]:
    """Every prompt the datasets can give, for training a tokenizer."""
    out = [""]
    for c in cats:
        out.append(default_prompt(c.object_name, None))
        out += [default_prompt(c.object_name, c.defect_names.get(d, d)) for d in c.defects]
    return out


def latent_shape(cfg: AutoencoderConfig, size: int) -> tuple[int, int, int]:
    """The shape of one latent of a size x size image: (embed_dim, size / f, size / f)."""
    return cfg.embed_dim, size // cfg.factor, size // cfg.factor


def sample_draws(seed: int, indices: list[int], shape: tuple[int, ...]):
    """Per sample i: t ~ U{0..999} and the noise ε of METHOD.md (7), and the posterior noise n
    of (1) (each of the latent's `shape`), from (seed, i) alone."""
    ts, eps, post = [], [], []
    for i in indices:
        g = torch.Generator().manual_seed(derived_seed(seed, "noise", i))
        ts.append(torch.randint(0, NUM_TIMESTEPS, (), generator=g))
        eps.append(torch.randn(shape, generator=g))
        post.append(torch.randn(shape, generator=g))
    return torch.stack(ts), torch.stack(eps), torch.stack(post)
