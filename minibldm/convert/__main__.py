"""`python -m minibldm.convert SRC OUT_DIR`: public checkpoints to a minibldm weights folder
(minibldm/convert/checkpoint.py)."""
from .checkpoint import main

raise SystemExit(main())
