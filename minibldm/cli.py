"""What every command line shares (sample, train, evaluate, genquality, synth and the converter):
bad input is one line on stderr naming the argument, exit status 2; every --help shows the
defaults and an example; the device and precision flags mean the same everywhere.

Each command raises UsageError for bad input and catches it in its main(); Parser makes argparse
report its own errors the same way instead of printing its usage block, and names the new flag
when an old one is given.
"""
from __future__ import annotations

import argparse
import sys

import torch

PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_device() -> str:
    """Every command's --device default: cuda when available, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


class UsageError(Exception):
    """Bad input; the message is one line and names the argument or the file."""


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
