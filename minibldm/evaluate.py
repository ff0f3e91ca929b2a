"""`python -m minibldm.evaluate`: see minibldm/eval/evaluate.py."""
from .eval.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
