"""`python -m minibldm.genquality`: see minibldm/eval/genquality.py."""
from .eval.genquality import main

if __name__ == "__main__":
    raise SystemExit(main())
