#!/usr/bin/env bash
# The GPU measurements of docs/BENCHMARKS.md as one prepared run, for a session that is lent a
# GPU (under 10 minutes; each part has its own time limit, so a slow part costs only itself). Writes six files to $OUT (default gpu_check/): log.txt (everything printed),
# summary.txt (each part's exit status and seconds) and the bench's JSON per part.
# docs/BENCHMARKS.md ("On a GPU") says how to run it and where the figures go.
#
#   bash tools/gpu_check.sh                        # on the GPU machine, from the repository root
#   DEVICE=cpu SIZE=tiny TIME_SCALE=5 bash tools/gpu_check.sh   # a dry run of the script, on a CPU
#
# TIME_SCALE multiplies every part's time limit (590 s in all at 1).
#
# The parts, most needed first:
#   tests   tests/test_cuda.py: networks, fast.optimize, the fast adaptation (eager, compiled,
#           batched, float16) against the reference loop, and the command on CUDA
#   memory  peak max_memory_allocated of the whole method, float16 and float32, batch 1
#   step    the guided step: matmul peak, diffusers, minibldm eager and compiled, float32 and float16
#   method  the whole method: seconds per image and images per hour, float16, eager and compiled,
#           batches of 1 and 4
#   adapt   one adaptation iteration against diffusers: float32, bfloat16 autocast, compiled
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check}
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-sd15}
TIME_SCALE=${TIME_SCALE:-1}
mkdir -p "$OUT"
: > "$OUT/summary.txt"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ! python3 -c "import diffusers" 2>/dev/null; then  # the GPU machine's image has no diffusers
    if ! ls .whl/diffusers-*.whl >/dev/null 2>&1; then
        echo "gpu_check: diffusers is not installed and .whl/ holds no wheel of it" \
             "(docs/BENCHMARKS.md, 'On a GPU')" >&2
        exit 2
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 2
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

LOG=$OUT/log.txt
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || lscpu | grep "Model name"
    python3 -c "import torch, diffusers; print('torch', torch.__version__, '| diffusers', diffusers.__version__)"
} 2>&1 | tee "$LOG"

part() {  # name, time limit in seconds, command...
    local name=$1 limit=$(($2 * TIME_SCALE)) t0=$SECONDS
    shift 2
    echo "== $name (at most $limit s)" | tee -a "$LOG"
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    echo "$name: exit ${PIPESTATUS[0]}, $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
}

bench=(python3 tools/bench.py --device "$DEVICE" --size "$SIZE")
part tests 150 env MINIBLDM_TEST_GPU="$DEVICE" python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py
part memory 50 "${bench[@]}" --parts memory --dtype float16 float32 --out "$OUT/memory.json"
part step 130 "${bench[@]}" --parts peak step --dtype float32 float16 --compile --repeats 10 \
    --out "$OUT/step.json"
part method 170 "${bench[@]}" --parts sd-pipeline --dtype float16 --compile --batch-size 1 4 \
    --out "$OUT/method.json"
part adapt 90 "${bench[@]}" --parts adapt --dtype float32 bfloat16 --compile --adapt-steps 200 \
    --out "$OUT/adapt.json"
cat "$OUT/summary.txt"
