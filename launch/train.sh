#!/usr/bin/env bash
# torchrun wrapper: launch/train.sh CONFIG.yaml [more.yaml] [key=value ...]
#   single node: NPROC processes (default: the GPU count, or 2 on CPU)
#   multi-node : NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (c10d rendezvous hosted by node 0)
#   DRY_RUN=1 prints the command instead of running it; PYTHON picks the interpreter.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 CONFIG.yaml [key=value ...]   (env: NPROC NNODES NODE_RANK MASTER_ADDR MASTER_PORT DRY_RUN)" >&2
  exit 2
fi
PYTHON=${PYTHON:-python3}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
if [ -z "${NPROC:-}" ]; then
  NPROC=$("$PYTHON" -c "import torch; print(torch.cuda.device_count() or 2)")
fi
if [ "$NODE_RANK" = 0 ]; then IS_HOST=1; else IS_HOST=0; fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
cmd=("$PYTHON" -m torch.distributed.run
     --nnodes "$NNODES" --nproc-per-node "$NPROC" --node-rank "$NODE_RANK"
     --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "${RDZV_ID:-megadistill}"
     --rdzv-conf "is_host=$IS_HOST" --max-restarts "${MAX_RESTARTS:-0}"
     -m megadistill.cli train "$@")
if [ -n "${DRY_RUN:-}" ]; then
  printf '%q ' "${cmd[@]}"; echo
  exit 0
fi
exec "${cmd[@]}"
