#!/usr/bin/env bash
# One node's part of a SLURM training job (srun starts one per node): torchrun through launch/train.sh with
# NODE_RANK=$SLURM_NODEID, and SIGUSR1 / SIGTERM passed on to the trainer processes so that they checkpoint at the
# next step boundary and exit 0 (megadistill.train.trainer handles both signals).
#   srun --ntasks-per-node=1 bash slurm/node.sh CONFIG.yaml [key=value ...]
#   env: NNODES MASTER_ADDR MASTER_PORT (set by slurm/train.sbatch), NPROC (default: SLURM_GPUS_ON_NODE or the GPU
#        count), LAUNCHER (default launch/train.sh), FORWARD_INTERVAL (seconds between re-sent signals, default 30),
#        DRY_RUN=1 (print the torchrun command of this node).
#
# Why a wrapper: torchrun starts its workers in new sessions, so a signal that SLURM sends to the task's process
# group never reaches them, and torchrun itself would die on SIGUSR1 (default action) or turn SIGTERM into a kill
# of its workers 30 s later. Here torchrun ignores both signals and this script hands them to the workers.
set -uo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export NODE_RANK=${SLURM_NODEID:-${NODE_RANK:-0}}
export NNODES=${NNODES:-${SLURM_NNODES:-1}}
export RDZV_ID=${RDZV_ID:-${SLURM_JOB_ID:-megadistill}}
if [ -z "${NPROC:-}" ] && [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then
  export NPROC=$SLURM_GPUS_ON_NODE
fi
# CPU threads per trainer process: the node's cores shared by its processes (data loading, optimizer on CPU)
if [ -z "${OMP_NUM_THREADS:-}" ] && [ -n "${SLURM_CPUS_ON_NODE:-}" ] && [ -n "${NPROC:-}" ]; then
  threads=$(( SLURM_CPUS_ON_NODE / NPROC ))
  (( threads < 1 )) && threads=1
  (( threads > 16 )) && threads=16
  export OMP_NUM_THREADS=$threads
fi
LAUNCHER=${LAUNCHER:-$REPO/launch/train.sh}
FORWARD_INTERVAL=${FORWARD_INTERVAL:-30}

if [ -n "${DRY_RUN:-}" ]; then
  exec bash "$LAUNCHER" "$@"
fi

children() {  # pids whose parent is $1
  if command -v pgrep >/dev/null 2>&1; then
    pgrep -P "$1" || true
  else
    local d
    for d in /proc/[0-9]*; do
      [ "$(awk '/^PPid:/ {print $2}' "$d/status" 2>/dev/null)" = "$1" ] && echo "${d#/proc/}"
    done
  fi
}

# torchrun (and, until the trainer installs its handlers, the workers) ignore USR1 and TERM; torchrun must not
# register its own SIGTERM handler, which would kill the workers after 30 s instead of letting them checkpoint.
# PET_SIGNALS_TO_HANDLE is torchrun's --signals-to-handle; older torch versions read TORCHELASTIC_SIGNALS_TO_HANDLE.
export PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT TORCHELASTIC_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT
( trap '' USR1 TERM; exec bash "$LAUNCHER" "$@" ) &
launcher_pid=$!
pending=""  # the signal to (re-)send, once one has arrived
last_sent=0

forward() {
  pending=$1
  last_sent=$SECONDS
  local pids
  pids=$(children "$launcher_pid" | tr '\n' ' ')
  echo "node.sh[node $NODE_RANK]: SIG$1 -> trainer processes ${pids:-(none yet)}" >&2
  [ -n "$pids" ] && kill -s "$1" $pids 2>/dev/null
  return 0
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM

# Wait for torchrun; a trapped signal interrupts `wait`, so loop until it is gone. A worker still starting up
# ignores the signal (inherited) until the trainer's handler is installed: re-send it every FORWARD_INTERVAL s.
rc=0
while kill -0 "$launcher_pid" 2>/dev/null; do
  if [ -n "$pending" ]; then
    sleep 1 &
    wait $! 2>/dev/null
    if (( SECONDS - last_sent >= FORWARD_INTERVAL )) && kill -0 "$launcher_pid" 2>/dev/null; then
      forward "$pending"
    fi
    continue
  fi
  wait "$launcher_pid"
  rc=$?
done
wait "$launcher_pid" 2>/dev/null
rc2=$?
# `wait` on an already reaped child returns 127: keep the status the loop saw then
if [ "$rc2" != 127 ]; then rc=$rc2; fi
exit "$rc"
