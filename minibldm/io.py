"""Reading checkpoints and loading them into modules, loudly. Every failure is a `WeightsError`
whose one-line message names the file (command-line tools print it and exit with status 2).
The runtime reads only safetensors; pickled `.ckpt` files are read by the converter alone, with
`torch.load(weights_only=True)`, which refuses anything but tensors and plain containers.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CONVERT_HINT = "convert public weights with: python -m minibldm.convert SRC OUT_DIR"


class WeightsError(Exception):
    """A weights file that cannot be read or does not fit the model. The message is one line."""


def first_line(e: BaseException) -> str:
    """An exception as one line: its type and the first line of its message."""
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise WeightsError(f"{path}: not a readable safetensors file ({first_line(e)})") from None


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a `.safetensors` file or of a pickled `.ckpt`/`.pt`/`.bin` (safely unpickled).
    A Lightning checkpoint's `state_dict` entry is unwrapped (its step counters and optimizer
    states are ignored); inside the state dict, anything but a tensor is an error."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - the unpickler raises many types; all mean "unreadable"
        raise WeightsError(f"{path}: cannot be read as a weights-only checkpoint "
                           f"({first_line(e)})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors")
    bad = sorted(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise WeightsError(f"{path}: entries that are not tensors: {_names(bad)}")
    return obj


def _names(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def check_state_dict(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor],
                     source: str, what: str) -> None:
    """Raise WeightsError unless `got` has exactly the keys of `expected`, each of that shape."""
    wrong = {"missing": sorted(set(expected) - set(got)),
             "unexpected": sorted(set(got) - set(expected))}
    if any(wrong.values()):
        parts = "; ".join(f"{len(ks)} {how}: {_names(ks)}" for how, ks in wrong.items() if ks)
        raise WeightsError(f"{source}: keys do not match the {what} ({parts}); {CONVERT_HINT}")
    for k, v in expected.items():
        if tuple(got[k].shape) != tuple(v.shape):
            raise WeightsError(f"{source}: {k} has shape {tuple(got[k].shape)} in the file but "
                               f"{tuple(v.shape)} in the {what}; {CONVERT_HINT}")


def load_into(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str,
              what: str, assign: bool = False) -> torch.nn.Module:
    """Copy `state_dict` into `module` after the key-set and per-key shape checks. With
    assign=True the tensors replace the module's (for modules built on the meta device)."""
    check_state_dict(module.state_dict(), state_dict, source, what)
    module.load_state_dict(state_dict, strict=True, assign=assign)
    return module


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside `path`; when the block succeeds it is renamed to `path`,
    otherwise removed. Readers never see half a file, and a crash leaves none behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        yield Path(tmp)
        # mkstemp makes 0600 (and a writer may recreate the file so); give the usual permissions
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# The name atomic_path gives its temporary file: the target's name, mkstemp's 8 characters, .tmp
TEMPORARY = re.compile(r".+\.(png|jpg|npy|json|jsonl|safetensors|csv|txt)[a-z0-9_]{8}\.tmp")


def remove_temporaries(folders, targets: tuple[str, ...] = ()) -> None:
    """Remove the temporary files atomic_path leaves in `folders` (and below) when a kill -9
    stops its process in the middle of a write; with `targets` (file names), only those files'
    temporaries, in the folders themselves. Call it only where no other process writes them."""
    for folder in map(Path, folders):
        if not folder.is_dir():
            continue
        found = ([p for t in targets for p in folder.glob(glob.escape(t) + "*.tmp")] if targets
                 else folder.rglob("*.tmp"))
        for p in found:
            if TEMPORARY.fullmatch(p.name) and p.is_file():
                p.unlink(missing_ok=True)


def read_json(path: str | Path, error: type[Exception] = WeightsError):
    """A JSON file's value; a missing or unreadable file is an `error` naming it."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such file")
    try:
        return json.loads(path.read_text())
    except (ValueError, OSError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_result(path: str | Path, result: dict, table: str) -> None:
    """A command's result: the JSON at `path` and its markdown table beside it (.md)."""
    write_text_atomic(path, json.dumps(result, indent=1) + "\n")
    write_text_atomic(Path(path).with_suffix(".md"), table)


def save_atomic(tensors: dict[str, torch.Tensor], path: str | Path,
                metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file (with optional string metadata) atomically, the same bytes for
    the same tensors and metadata (sort_metadata)."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp),
                  metadata=metadata)
        sort_metadata(tmp)


def sort_metadata(path: Path) -> None:
    """Put a safetensors header's metadata keys in sorted order, in place. The library writes
    them in a hash map's order, which changes from process to process, so identical files would
    differ; the header keeps its length (the same keys, values and separators)."""
    with open(path, "r+b") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        if "__metadata__" not in header:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        new = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(new) > n:
            raise WeightsError(f"{path}: its safetensors header could not be normalised")
        f.seek(8)
        f.write(new + b" " * (n - len(new)))
