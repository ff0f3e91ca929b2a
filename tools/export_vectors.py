"""Write reference vectors of a minibldm model for people porting it: the inputs and outputs of
the tokenizer, text encoder, trimap branch, UNet, encoder, decoder, one DDIM step and one whole
default sample with its recorded noise, in one safetensors file (entries and tolerances:
tools/vectors.py).

    python tools/export_vectors.py OUT.safetensors [--weights weights/tiny] [--seed 0]
    python tools/export_vectors.py --check tests/vectors/tiny.safetensors [--weights weights/tiny]
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

import minibldm
from minibldm.io import WeightsError

import vectors  # tools/vectors.py, beside this file

REPO = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", nargs="?", help="safetensors file to write")
    p.add_argument("--weights", default=str(REPO / "weights" / "tiny"), help="weights folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", metavar="FILE", help="recompute FILE's outputs and compare instead")
    args = p.parse_args(argv)
    if (args.out is None) == (args.check is None):
        print("export_vectors: error: give OUT or --check FILE (one of them)", file=sys.stderr)
        return 2
    if args.check and not Path(args.check).is_file():
        print(f"export_vectors: error: --check {args.check}: no such file", file=sys.stderr)
        return 2
    torch.use_deterministic_algorithms(True)
    try:
        m = minibldm.load(args.weights)
    except WeightsError as e:
        print(f"export_vectors: error: {e}", file=sys.stderr)
        return 2
    if m.control is None:
        print(f"export_vectors: error: {args.weights}: has no control.safetensors", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    if args.out:
        tensors = vectors.export(m, args.weights, args.out, args.seed)
        size = Path(args.out).stat().st_size
        print(f"wrote {args.out}: {len(tensors)} entries, {size / 1e6:.2f} MB, "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
        return 0
    ref, meta = vectors.read(args.check)
    tol = json.loads(meta["tolerance"])
    worst = 0
    for k, d in sorted(vectors.differences(ref, vectors.recompute(m, ref)).items()):
        limit = tol[k.split(".")[0]]
        worst = max(worst, d > limit)
        print(f"{'FAIL' if d > limit else 'ok  '} {k:34s} {d:.3g} (tolerance {limit:g})")
    return 1 if worst else 0


if __name__ == "__main__":
    sys.exit(main())
