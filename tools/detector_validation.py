#!/usr/bin/env python
"""The downstream detector scored on a validation set built from the training split alone, for
choosing the detector's design without looking at the test set (docs/RESULTS.md, 2026-12-03).

    python tools/detector_validation.py --data DIR [--split SPLIT.json] --out RESULT.json \
        [evaluate options]

Per defect type, the first half of the split's training defects (sorted by name; 5 of k = 10)
train and the other half are scored; 100 good training images (a fixed draw, at most a quarter)
take the place of test/good and are left out of training. Everything else is `python -m
minibldm.evaluate` with the options given (e.g. --method crop-paste --crop 0 --batch-size 8
--detector-steps 1000; without --split, the split of --seed): the test defects and test/good
are never read.
"""
from __future__ import annotations

import random
import sys
from unittest import mock

from minibldm.eval import evaluate

HELD_GOOD = 100  # good training images scored instead of test/good (at most a quarter)


def validation_data(read_data):
    """read_data, with the split's test part replaced by held-out training data."""
    def read(args):
        category, split = read_data(args)
        good = list(category.good)
        random.Random(1234).shuffle(good)
        held = min(HELD_GOOD, len(good) // 4)
        category.test_good, category.good = sorted(good[:held]), sorted(good[held:])
        for part in split["defects"].values():
            train = sorted(part["train"])
            part["train"], part["test"] = train[:len(train) // 2], train[len(train) // 2:]
        return category, split
    return read


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with mock.patch.object(evaluate, "read_data", validation_data(evaluate.read_data)):
        return evaluate.main(argv + ["--checkpoint-every", "0"])

if __name__ == "__main__":
    sys.exit(main())
