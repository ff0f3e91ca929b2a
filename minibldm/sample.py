"""`python -m minibldm.sample`: make defect images with pixel-aligned masks (minibldm/commands/
sample.py); with no arguments, the demo of the bundled tiny model (minibldm/commands/demo.py)."""
import sys

from .commands import demo, sample


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    return sample.main(argv) if argv else demo.main()


if __name__ == "__main__":
    raise SystemExit(main())
