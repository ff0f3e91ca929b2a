"""Pack a training run folder into a weights folder for shipping: every network stored in a
smaller float dtype (float16 by default; `minibldm.load` casts back to the dtype it runs in),
safetensors metadata kept (the trimap branch's defect names), the tokenizer files copied, and a
config.json with the model sections and "image_size" but without the run's "train" record (it
names local paths; the recipe belongs in the folder's README).

    python tools/pack_weights.py RUN_DIR OUT_DIR [--dtype float16|bfloat16|float32]
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from minibldm.io import WeightsError, save_atomic, write_text_atomic
from minibldm.weights import FILES, read_config

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a weights folder or training run folder")
    p.add_argument("out", help="folder to write")
    p.add_argument("--dtype", default="float16", choices=sorted(DTYPES))
    args = p.parse_args(argv)
    run, out = Path(args.run), Path(args.out)
    try:
        raw = read_config(run)
    except WeightsError as e:
        print(f"pack_weights: error: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    total = 0
    for name, file in FILES.items():
        if not (run / file).is_file():
            continue
        with safe_open(str(run / file), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            meta = f.metadata()
        tensors = {k: v.to(DTYPES[args.dtype]) if v.is_floating_point() else v for k, v in tensors.items()}
        save_atomic(tensors, out / file, meta)
        total += (out / file).stat().st_size
    for file in ("vocab.json", "merges.txt"):
        shutil.copyfile(run / file, out / file)
        total += (out / file).stat().st_size
    config = {k: v for k, v in raw.items() if k != "train"}
    write_text_atomic(out / "config.json", json.dumps(config, indent=2) + "\n")
    print(f"wrote {out}: {total / 1e6:.2f} MB of weights and tokenizer ({args.dtype})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
