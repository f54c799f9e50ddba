#!/usr/bin/env bash
# GPU check on one H100/H200 (< 10 minutes): attention / loss kernels / Liger ops vs eager, then bf16 step time, MFU
# and peak memory of the real trainer for a run matrix (compile on/off, liger on/off), started until --budget-s.
# Usage: tools/gpu_check.sh [OUT.json]   (installs wheels from .whl/ when deepspeed/omegaconf are missing: make them
# with tools/gpu_wheels.sh where PyPI is reachable and carry .whl/ to a GPU machine that has torch but no index)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import deepspeed, omegaconf" 2>/dev/null; then
  if [ -d .whl ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "deepspeed/omegaconf missing: pip install -e . first" >&2; exit 2
  fi
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
exec timeout "${GPU_CHECK_TIMEOUT:-590}" "$PYTHON" tools/gpu_check.py ${1:+--out "$1"} "${@:2}"
