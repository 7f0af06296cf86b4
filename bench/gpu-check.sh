#!/usr/bin/env bash
# The GPU checks in one run, for a new GPU host or a change to the engine: the continuous engine's tests on
# the GPU (its tokens equal generate()'s, with the decode step replayed from captured graphs that are
# checked against the step; in bfloat16 too), then the engines bench on MedMO-8B's shape with random
# weights, the continuous engine served with and without torch.compile, with the kernels per decode step
# and the attention kernel SDPA chose (--profile). Logs and the bench's rows go to RESULTS_DIR.
#
#   bash bench/gpu-check.sh RESULTS_DIR [bench.engines options]
#
# With no options the run is kept short: 30 s served and 10 s offline per client count for the continuous
# engine, and the generate engine at 64 clients only, for 100 s (its answers take tens of seconds, and a
# window shorter than three of them measures batch phases; the bench marks such rows).
set -euo pipefail
cd "$(dirname "$0")/.."

results=${1:?usage: bash bench/gpu-check.sh RESULTS_DIR [bench.engines options]}
shift
mkdir -p "$results"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

if ! "$python" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    echo "no CUDA or ROCm GPU is visible to PyTorch here" >&2
    exit 1
fi
"$python" -c 'import torch; print(torch.cuda.get_device_name(0), "torch", torch.__version__)' | tee "$results/device.txt"

# Only the GPU's parameter: the CPU's runs in CI. TF32 off, so that float32 on the GPU is float32 and the
# engine's tokens can equal generate()'s exactly; then the bfloat16 check (first tokens equal, agreement
# reported: bf16 argmax may flip where two tokens are within rounding).
NVIDIA_TF32_OVERRIDE=0 "$python" -m pytest -q -s -p no:cacheprovider tests/engine/test_continuous.py -k cuda 2>&1 \
    | tee "$results/engine-tests.log"

# The decode attention read alone: each SDPA backend that takes the engine's masked call (the one to pin),
# against FlexAttention reading each row only as far as its length.
"$python" -m bench.decode_attention 2>&1 | tee "$results/decode-attention.log"

# What a step costs when its rows sample or are constrained, against greedy rows (64 rows, MedMO-8B's shape).
"$python" -m bench.decoding --shape 8b --rows 64 2>&1 | tee "$results/decoding.log"

if [ $# -eq 0 ]; then
    set -- --duration 30 --offline-duration 10 --generate-clients 64 --generate-duration 100
fi
"$python" -m bench.engines --shape 8b --profile --json "$results/engines.json" "$@" 2>&1 \
    | tee "$results/engines.log"
