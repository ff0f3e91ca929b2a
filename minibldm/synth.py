"""`python -m minibldm.synth`: see minibldm/commands/synth.py."""
from .commands.synth import main

if __name__ == "__main__":
    raise SystemExit(main())
