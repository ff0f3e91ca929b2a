#!/usr/bin/env bash
# Rebuild the bundled tiny model (weights/tiny) from nothing, with minibldm's own commands:
# the synthetic dataset, then the autoencoder, text encoder + UNet, and trimap-branch stages,
# then packing to float16, the quality figures and the porting vectors. weights/tiny/README.md
# records what this took on our machine. Every stage resumes if interrupted: run it again.
#
#   tools/build_tiny.sh [WORK_DIR]        (default: runs/tiny; about 2 GB free space)
#
# Environment: AE_STEPS, TEXT_STEPS, CONTROL_STEPS override the step counts below;
# DEVICE=cuda trains on a GPU.
set -euo pipefail
W=${1:-runs/tiny}
REPO=$(cd "$(dirname "$0")/.." && pwd)
DEV=${DEVICE:-cpu}
mkdir -p "$W"
D="$W/data/fabric $W/data/metal $W/data/pill $W/data/washer"

python -m minibldm.synth "$W/data" --seed 0                   # 4 x (200 + 20 + 60) images, 256 px
python -m minibldm.train --stage autoencoder --config tiny --data $D --out "$W/ae" \
    --size 128 --steps "${AE_STEPS:-4000}" --batch-size 8 --seed 0 --device "$DEV" --log-every 50
python -m minibldm.train --stage text --weights "$W/ae" --scale-factor auto --data $D \
    --out "$W/text" --size 128 --steps "${TEXT_STEPS:-5000}" --batch-size 16 --lr 2e-4 --k 10 \
    --defect-repeat 4 \
    --seed 0 --device "$DEV" --log-every 50
python -m minibldm.train --stage control --weights "$W/text" --data $D --out "$W/control" \
    --size 128 --steps "${CONTROL_STEPS:-4500}" --batch-size 16 --lr 1e-4 --k 10 --seed 0 \
    --device "$DEV" --log-every 50
python "$REPO/tools/pack_weights.py" "$W/control" "$REPO/weights/tiny" --dtype float16
python "$REPO/tools/measure_tiny_quality.py" --data "$W/data" --out "$W/quality" -n 4 \
    --json "$W/quality.json"
python "$REPO/tools/export_vectors.py" "$REPO/tests/vectors/tiny.safetensors"
