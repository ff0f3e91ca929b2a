"""Public Stable Diffusion 1.x / LDM / ControlNet weights to a minibldm weights folder: the same
command as `python -m minibldm.convert` (minibldm/convert/checkpoint.py), kept at this path."""
import sys

from minibldm.convert.checkpoint import main

if __name__ == "__main__":
    sys.exit(main())
