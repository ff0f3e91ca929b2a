"""`python -m minibldm.export --onnx OUT_DIR`: see minibldm/commands/export.py."""
from .commands.export import main

if __name__ == "__main__":
    raise SystemExit(main())
