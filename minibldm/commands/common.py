"""What the commands share for bad input: one line on stderr naming the argument, exit status 2.

Each command raises UsageError for bad input and catches it in its main(); Parser makes argparse
report its own errors the same way instead of printing its usage block.
"""
from __future__ import annotations

import argparse


class UsageError(Exception):
    """Bad input; the message is one line and names the argument or the file."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise UsageError(message)
