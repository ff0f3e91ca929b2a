#!/usr/bin/env bash
# Rebuild the bundled tiny model (weights/tiny) from nothing, with minibldm's own commands:
# the synthetic dataset, then the autoencoder, text encoder + UNet, and trimap-branch stages,
# then packing to float16, the quality figures and the porting vectors. weights/tiny/README.md
# records what this took on our machine. Every stage resumes if interrupted: run it again.
#
#   tools/build_tiny.sh [WORK_DIR]        (default: runs/tiny; about 2 GB free space)
#
# Environment: AE_STEPS, TEXT_STEPS, CONTROL_STEPS (and AE3_STEPS, TEXT3_STEPS, CONTROL3_STEPS)
# override the step counts below;
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
# Version 3 (weights/tiny/README.md): the autoencoder fine-tuned with its reconstruction loss
# weighted 8x on the defects' pixels, then text + UNet and the trimap branch fine-tuned on its
# latents with the denoising loss weighted 10x on the defects' latent cells. Each starts from
# version 2 as shipped (packed to float16), as ours did.
python "$REPO/tools/pack_weights.py" "$W/control" "$W/v2" --dtype float16
python -m minibldm.train --stage autoencoder --weights "$W/v2" --data $D --out "$W/ae3" \
    --size 128 --steps "${AE3_STEPS:-2000}" --batch-size 8 --lr 1e-4 --k 10 --defect-repeat 4 \
    --defect-weight 8 --seed 0 --device "$DEV" --log-every 50
python -m minibldm.train --stage text --weights "$W/ae3" --data $D --out "$W/text3" \
    --size 128 --steps "${TEXT3_STEPS:-3000}" --batch-size 16 --lr 1e-4 --k 10 --defect-repeat 4 \
    --defect-weight 10 --seed 0 --device "$DEV" --log-every 50
# the text stage leaves the branch out of its run folder (it was trained against the old UNet);
# version 3's branch continues from version 2's all the same
cp "$W/v2/control.safetensors" "$W/text3/"
python -m minibldm.train --stage control --weights "$W/text3" --data $D --out "$W/control3" \
    --size 128 --steps "${CONTROL3_STEPS:-3000}" --batch-size 16 --lr 1e-4 --k 10 \
    --defect-weight 10 --seed 0 --device "$DEV" --log-every 50
python "$REPO/tools/pack_weights.py" "$W/control3" "$REPO/weights/tiny" --dtype float16
python "$REPO/tools/measure_tiny_quality.py" --data "$W/data" --out "$W/quality" -n 4 \
    --json "$W/quality.json"
python "$REPO/tools/export_vectors.py" "$REPO/tests/vectors/tiny.safetensors"
