"""What every command line shares (sample, train, evaluate, genquality, synth and the converter):
bad input is one line on stderr naming the argument, exit status 2; every --help shows the
defaults and an example; the device and precision flags mean the same everywhere.

Each command raises UsageError for bad input and catches it in its main(); Parser makes argparse
report its own errors the same way instead of printing its usage block, and names the new flag
when an old one is given.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_device() -> str:
    """Every command's --device default: cuda when available, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


class UsageError(Exception):
    """Bad input; the message is one line and names the argument or the file."""


def check_writable(path, flag: str, folder: bool = True) -> None:
    """Refuse an output that cannot be written, before anything is written: `path` (a folder
    when `folder`, else a file) must be of that kind if it exists, and the nearest folder that
    exists on its way must accept a new file. That is probed with an empty temporary file,
    removed at once, because permission bits say nothing for root or a read-only mount."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        raise UsageError(f"{flag} {path}: exists and is not a {'folder' if folder else 'file'}")
    if path.exists() and not folder and not os.access(path, os.W_OK):
        raise UsageError(f"{flag} {path}: cannot write this file")
    base = path if folder and path.is_dir() else path.parent
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise UsageError(f"{flag} {path}: {base} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=base, prefix=".minibldm-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot write in {base} ({e.strerror})") from None


def add_max_pixels(add) -> None:
    """The --max-pixels flag of every command that reads images."""
    add("--max-pixels", type=int, default=None, metavar="N",
        help="refuse images above N pixels, before decoding them (default: $MINIBLDM_MAX_PIXELS, "
        "else 178,956,970)")


def apply_max_pixels(args) -> None:
    """Check --max-pixels and make it (or the default) the limit of every image read from now on."""
    if args.max_pixels is not None and args.max_pixels < 1:
        raise UsageError(f"--max-pixels must be at least 1, got {args.max_pixels}")
    from .images import set_max_pixels
    set_max_pixels(args.max_pixels)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions and epilogs as written; "(default: X)" after each option's help that has a
    default and does not state it already."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default not in (None, False, argparse.SUPPRESS) and "default" not in text
                and action.option_strings):
            value = action.default
            shown = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            text += f" (default: {shown})"
        return text


class Parser(argparse.ArgumentParser):
    """argparse for the commands: one-line errors (raised as `error`, UsageError by default),
    defaults in --help, `examples` as the help's epilog, and `renamed` {old flag: new flag} to
    say what a flag is called now instead of "unrecognized arguments"."""

    def __init__(self, *args, examples: str = "", renamed: dict[str, str] | None = None,
                 error: type[Exception] = UsageError, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        if examples:
            kwargs["epilog"] = "examples:\n" + examples + ("\n\n" + kwargs["epilog"]
                                                           if kwargs.get("epilog") else "")
        super().__init__(*args, **kwargs)
        self.renamed, self.error_type = renamed or {}, error

    def error(self, message):  # one line, not argparse's usage block
        raise self.error_type(message)

    def parse_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else [str(a) for a in args]
        for a in argv:
            old = a.split("=", 1)[0]
            if old in self.renamed:
                raise self.error_type(f"{old} is now {self.renamed[old]}")
        return super().parse_args(argv, namespace)
