"""`python -m minibldm.train`: see minibldm/commands/train.py."""
from .commands.train import main

if __name__ == "__main__":
    raise SystemExit(main())
