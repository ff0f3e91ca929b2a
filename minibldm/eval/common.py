"""What `python -m minibldm.evaluate` and `python -m minibldm.genquality` share.

Both score generated defects against a category's held-out real ones, so both read the same
few-shot split and refuse the same thing: generated data made from, or copied from, a file the
split keeps for testing. Both report a markdown table on stdout, the JSON and the table beside
it with --out, and bad input as one line on stderr with exit status 2.
"""
from __future__ import annotations

import contextlib
import json
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch

from ..cli import UsageError, apply_max_pixels, check_writable
from ..commands.data import (Category, list_images, load_or_make_split, make_split, mask_of,
                             read_category)
from ..images import DataError
from ..io import file_sha256, read_json, write_result

Pairs = dict[str, list[tuple[Path, Path]]]  # {defect type: [(image, mask)]}


@contextlib.contextmanager
def data_errors_as(arg: str):
    """Report a DataError inside the block as bad input: a UsageError naming `arg`."""
    try:
        yield
    except DataError as e:
        raise UsageError(f"{arg} {e}") from None


def check_args(args, at_least: dict[str, int]) -> None:
    """The checks both commands share: the options in `at_least` ({dest: minimum}, when given),
    the --data and --generated folders, the --split and --out files, --device."""
    for name, low in at_least.items():
        value = getattr(args, name)
        if value is not None and value < low:
            raise UsageError(f"--{name.replace('_', '-')} must be at least {low} (got {value})")
    for name, folder in [("data", args.data)] + [("generated", g) for g in args.generated or ()]:
        if not Path(folder).is_dir():
            raise UsageError(f"--{name} {folder}: no such folder")
    if args.split and not Path(args.split).is_file():
        raise UsageError(f"--split {args.split}: no such file")
    if args.out and Path(args.out).is_dir():
        raise UsageError(f"--out {args.out}: is a folder; give a file name such as result.json")
    if args.out:
        for path in (args.out, Path(args.out).with_suffix(".md")):
            check_writable(path, "--out", folder=False)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available here")
    apply_max_pixels(args)


def _stored_split(args, category: Category) -> dict:
    """--split FILE: its k and seed make the split; --seed then seeds only the detector run."""
    with data_errors_as("--split"):
        stored = read_json(args.split, DataError)
    if not isinstance(stored, dict) or not isinstance(stored.get("defects"), dict):
        raise UsageError(f"--split {args.split}: not a split file (no \"defects\" object)")
    if args.k is not None and args.k != stored.get("k"):
        raise UsageError(f"--k {args.k}: --split {args.split} was made with k={stored.get('k')}")
    args.k, args.split_seed = stored.get("k"), stored.get("seed")
    args.seed = args.split_seed if args.seed is None else args.seed
    with data_errors_as("--split"):
        return load_or_make_split(args.split, category, args.k, args.split_seed)


def read_data(args) -> tuple[Category, dict]:
    """The --data category (--texture: the foreground is the whole image) and its training split:
    --split FILE, else make_split with --k (default 10) and --seed (default 0). Sets args.k,
    args.seed and args.split_seed. A split whose train and test lists overlap is refused."""
    with data_errors_as("--data"):
        category = read_category(args.data, texture=True if args.texture else None)
    if args.split:
        split = _stored_split(args, category)
    else:
        args.k = 10 if args.k is None else args.k
        args.seed = args.split_seed = 0 if args.seed is None else args.seed
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # short types are reported in the result
            split = make_split(category, args.k, args.seed)
    for name in category.defects:
        part = split["defects"].get(name)
        if part is None:
            raise UsageError(f"--split {args.split}: has no entry for defect type {name!r}")
        both = sorted(set(part["train"]) & set(part["test"]))
        if both:
            raise UsageError(f"--split {args.split}: {both[0]} is in both train and test of "
                             f"{name!r}; a test image must not be used for training")
    return category, split


def split_pairs(category: Category, split: dict, part: str) -> Pairs:
    """{type: [(image, mask)]} of the split's "train" or "test" defect images."""
    return {name: [(i, m) for i, m in pairs if category.rel(i) in split["defects"][name][part]]
            for name, pairs in category.defects.items()}


def manifest_records(folder: Path) -> list[tuple[int, dict]]:
    """(line number, record) of each non-empty line of the folder's manifest.jsonl (in
    minibldm/, or at the top in the layout of minibldm before 2026-12)."""
    manifest = folder / "minibldm" / "manifest.jsonl"
    if not manifest.is_file():
        manifest = folder / "manifest.jsonl"
    if not manifest.is_file():
        raise UsageError(f"--generated {folder}: no manifest.jsonl (needed to check that no "
                         "test image was used); write it with python -m minibldm.sample")
    out = []
    for n, line in enumerate(manifest.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            raise UsageError(f"--generated {manifest}: line {n} is not a JSON object")
        out.append((n, record))
    return out


class HeldOut:
    """Tells whether a file is one the split keeps for testing (a test defect image, its mask,
    test/good): by resolved path, by contents, or, for a file no longer there, by its last three
    path parts (such as test/crack/001.png)."""

    def __init__(self, category: Category, split: dict):
        files = [f for pairs in split_pairs(category, split, "test").values() for pair in pairs
                 for f in pair] + category.test_good
        self.by_path = {p.resolve(): category.rel(p) for p in files}
        self.by_tail = set(self.by_path.values())
        self.by_hash = {file_sha256(p): category.rel(p) for p in files}

    def copy_of(self, path: Path) -> str | None:
        """The held-out file that `path` (an existing file) has the bytes of, if any."""
        return self.by_hash.get(file_sha256(path))

    def named(self, name: str) -> str | None:
        """The held-out file that the path `name` points at, if any."""
        p = Path(name)
        if p.is_file():
            return self.by_path.get(p.resolve()) or self.copy_of(p)
        tail = "/".join(p.parts[-3:])
        return tail if tail in self.by_tail else None


def check_generated(folders: list[str | Path], category: Category, split: dict) -> Pairs:
    """The (image, mask) pairs by defect type of `python -m minibldm.sample` output folders
    (test/<type>/*.png, ground_truth/<type>/<stem>_mask.png), after checking that none was made
    from a held-out file (no manifest record's `source` (x_OK) nor `placement.mask_file` names
    one) and that none is a copy of one."""
    held, out = HeldOut(category, split), {}
    for folder in map(Path, folders):
        for n, record in manifest_records(folder):
            names = [("source", record.get("source")),
                     ("placement.mask_file", (record.get("placement") or {}).get("mask_file"))]
            for key, name in names:
                if isinstance(name, str) and (hit := held.named(name)):
                    raise UsageError(f"--generated {folder}: manifest.jsonl line {n}: {key} {name} "
                                     f"is the held-out test file {hit} (the split keeps it for "
                                     "testing); generate from the training split only")
        images = [(d.name, image) for d in sorted(folder.glob("test/*")) if d.is_dir()
                  for image in list_images(d)]
        if not images:
            raise UsageError(f"--generated {folder}: no images in test/<defect>/ (with masks in "
                             "ground_truth/<defect>/<stem>_mask.png)")
        for name, image in images:
            mask_dir = folder / "ground_truth" / name
            mask = mask_of(image, mask_dir)
            if mask is None:
                raise UsageError(f"--generated {image}: no mask "
                                 f"{mask_dir / (image.stem + '_mask.png')}")
            for f in (image, mask):
                if copied := held.copy_of(f):
                    raise UsageError(f"--generated {f}: is a copy of the held-out test file "
                                     f"{copied}")
            out.setdefault(name, []).append((image, mask))
    return out


def table(head: list[str], rows: list[list[str]]) -> str:
    """A markdown table of the given cells."""
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                     + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def machine(device: str = "cpu") -> str:
    """The processor a result was computed on, with the instruction set torch dispatches to:
    CPUs of one model but other vector units (AVX2, AVX-512) round differently in the last
    bits, and a detector's 4,000 steps grow those bits into other numbers (docs/RESULTS.md)."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                platform.processor() or platform.machine())
    return f"{name}, {torch.backends.cpu.get_cpu_capability()}"


def run_command(prog: str, argv: list[str] | None, parse_args: Callable, compute: Callable,
                markdown: Callable[[dict], str], written: Callable | None = None) -> int:
    """main() of an evaluation command: parse, compute the result, print its table and, with
    --out, write the JSON and the table (no timing in them: the same command writes the same
    bytes; the wall time goes to stderr), then call written(args); bad input is one line on
    stderr and exit status 2."""
    try:
        args = parse_args(argv)
        t0 = time.time()
        result = compute(args)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    table = markdown(result)
    print(table, end="")
    if args.out:
        write_result(args.out, result, table)
        print(f"wrote {args.out} and {Path(args.out).with_suffix('.md')}", file=sys.stderr)
        if written is not None:
            written(args)
    print(f"done in {time.time() - t0:.0f} s", file=sys.stderr)
    return 0
