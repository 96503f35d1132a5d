#!/usr/bin/env bash
# GPU check for a lent GPU machine (under 5 minutes): a table of SVB.apply() (SVB + BBN) on WRN-28-10,
# WRN-28-16, ResNet-50 and the pre-activation Inception-ResNet-v2, on He init and mid-training weights, each
# against one bf16 training step and against a float64 SVD (benchmarks/gpu_check.py), then the recipe's own
# images/s with and without SVB (benchmarks/recipe_throughput.py).
#
#   bash benchmarks/gpu_check.sh                      # on the GPU machine, from anywhere
#   bash benchmarks/gpu_check.sh --device cpu --small # smoke test on a CPU (figures mean nothing)
#
# Extra arguments go to both scripts (--help lists them; each ignores the other's). PYTHON picks the
# interpreter, GPU_CHECK_TIMEOUT the time limit of gpu_check.py in seconds (default 210), GPU_CHECK_TOTAL that
# of the whole check (default 295).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-$(command -v python || command -v python3 || echo python)}"
TIMEOUT="${GPU_CHECK_TIMEOUT:-210}"

echo "== gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ), repository $(pwd), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"

if ! "$PYTHON" -c "import timm_svb" >/dev/null 2>&1; then
    echo "== timm_svb is not importable: pip install -e ."
    if ! "$PYTHON" -m pip install -q -e .; then
        # no network on the machine: install without resolving dependencies, else run from the tree
        echo "== pip install -e . failed; retrying without dependencies"
        "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e . \
            || { echo "== install failed; using PYTHONPATH=$(pwd)"; export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"; }
    fi
    "$PYTHON" -c "import timm_svb" || { echo "== error: timm_svb still cannot be imported" >&2; exit 1; }
fi

if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
else
    echo "== nvidia-smi not found"
fi
"$PYTHON" -c "import torch; print('== torch', torch.__version__, '| CUDA available:', torch.cuda.is_available(), '|', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU')"

status=0
timeout --signal=INT --kill-after=10 "$TIMEOUT" "$PYTHON" benchmarks/gpu_check.py "$@" || status=$?
if [ "$status" -eq 124 ] || [ "$status" -eq 130 ]; then
    echo "== error: gpu_check.py ran past ${TIMEOUT}s and was stopped" >&2
elif [ "$status" -ne 0 ]; then
    echo "== error: gpu_check.py failed with status $status" >&2
fi

# ------------------------------------------------------------------------------------------------------------
# Last step: the recipe's own images/s with and without SVB next to the bare step (recipes/train.py on generated
# images on disk; benchmarks/recipe_throughput.py), in what is left of the 5-minute budget: GPU_CHECK_TOTAL
# seconds from the start of this script (default 295). The same extra arguments are passed; those meant for
# gpu_check.py only are ignored there with a note (--device cpu --small is the smoke test of both).
left=$(( ${GPU_CHECK_TOTAL:-295} - SECONDS ))
if [ "$left" -lt 30 ]; then
    echo "== error: no time left for recipe_throughput.py (${left}s of the budget)" >&2
    [ "$status" -ne 0 ] || status=1
else
    echo "== recipe_throughput.py (at most ${left}s)"
    recipe_status=0
    timeout --signal=INT --kill-after=10 "$left" "$PYTHON" benchmarks/recipe_throughput.py "$@" || recipe_status=$?
    if [ "$recipe_status" -ne 0 ]; then
        echo "== error: recipe_throughput.py failed or ran out of time (status $recipe_status)" >&2
        [ "$status" -ne 0 ] || status=$recipe_status
    fi
fi
exit "$status"
