#!/usr/bin/env bash
# Submit a sweep manifest (`megadistill sweep SWEEP.yaml -o DIR`) as SLURM job arrays of slurm/sweep.sbatch.
#   slurm/submit_sweep.sh SWEEP_DIR|manifest.jsonl [key=value ...]       (run it where `megadistill sweep` ran)
# Runs without unfinished dependencies (teachers, supervised baselines) go first; each teacher's students form an
# array with --dependency=afterok:<teacher array job>_<teacher task>. Runs whose run dir has DONE are skipped and
# finished teachers impose no dependency, so resubmitting a sweep (after failures or edits) is safe. Every run is
# validated against its layout (nodes x GPUS_PER_NODE) before anything is submitted.
# Env: NODES (nodes per run, default 1), NODES_MAP (per model size, e.g. "12.6B=8,2.72B=2"), GPUS_PER_NODE (8),
#      ARRAY_LIMIT (most tasks of one array running at once), LOG_ROOT (default logs/slurm), PYTHON,
#      DRY_RUN=1 (print the sbatch commands; fake job ids from DRY_RUN_JOB_ID, default 1000).
#      Partition, account, time limit and QOS come from sbatch's own SBATCH_PARTITION, SBATCH_ACCOUNT,
#      SBATCH_TIMELIMIT, SBATCH_QOS variables.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 SWEEP_DIR|manifest.jsonl [key=value ...]   (env: NODES NODES_MAP GPUS_PER_NODE ARRAY_LIMIT DRY_RUN)" >&2
  exit 2
fi
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
MANIFEST=$(cd "$(dirname "$1")" && pwd)/$(basename "$1")
shift
NODES=${NODES:-1}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
LOG_ROOT=${LOG_ROOT:-$REPO/logs/slurm}
if [ -d "$MANIFEST" ]; then NAME=$(basename "$MANIFEST"); else NAME=$(basename "$(dirname "$MANIFEST")"); fi

PLAN=$("$PYTHON" "$REPO/slurm/jobtool.py" plan --nodes "$NODES" --nodes-map "${NODES_MAP:-}" \
       --gpus-per-node "$GPUS_PER_NODE" "$MANIFEST" "$@")
[ -n "${DRY_RUN:-}" ] || mkdir -p "$LOG_ROOT"

declare -A TASK_JOB=()  # run name -> "<array job id>_<task index>"
next_fake=${DRY_RUN_JOB_ID:-1000}
n_arrays=0
n_tasks=0
while IFS=$'\t' read -r kind nodes deps indices runs; do
  if [ "$kind" = skip ]; then
    echo "# skip $nodes: finished (DONE)"
    continue
  fi
  dep_args=()
  if [ "$deps" != "-" ]; then
    spec=afterok
    IFS=, read -r -a dep_runs <<<"$deps"
    for d in "${dep_runs[@]}"; do
      spec+=":${TASK_JOB[$d]:?internal error: $d was not submitted before its dependants}"
    done
    dep_args=(--dependency="$spec" --kill-on-invalid-dep=yes)
  fi
  cmd=(sbatch --parsable --job-name="$NAME" --nodes="$nodes" --gpus-per-node="$GPUS_PER_NODE"
       --array="$indices${ARRAY_LIMIT:+%$ARRAY_LIMIT}" --output="$LOG_ROOT/%x-%A_%a.out"
       --export=ALL,MEGADISTILL_ROOT="$REPO" "${dep_args[@]}" "$REPO/slurm/sweep.sbatch" "$MANIFEST" "$@")
  if [ -n "${DRY_RUN:-}" ]; then
    printf '%q ' "${cmd[@]}"; echo
    job=$next_fake
    next_fake=$(( next_fake + 1 ))
    echo "# -> job $job (dry run): $runs"
  else
    job=$("${cmd[@]}")
    job=${job%%;*}  # --parsable prints "id" or "id;cluster"
    after=""
    [ "$deps" = "-" ] || after=", after $deps"
    echo "submitted array job $job ($nodes node(s) per task$after): $runs"
  fi
  IFS=, read -r -a idx <<<"$indices"
  IFS=, read -r -a names <<<"$runs"
  for k in "${!idx[@]}"; do
    TASK_JOB[${names[$k]}]=${job}_${idx[$k]}
  done
  n_arrays=$(( n_arrays + 1 ))
  n_tasks=$(( n_tasks + ${#idx[@]} ))
done <<<"$PLAN"
echo "# $n_tasks run(s) in $n_arrays array job(s) from $MANIFEST"
