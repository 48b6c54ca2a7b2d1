#!/usr/bin/env bash
# Train K reference runs (LiRA, RMIA, aMINT-LR; docs/audit_power.md) as one Slurm job array, one run per task:
#   sbatch --array=0-7 slurm/reference_models.sh data.root=/data/amint/digits [hydra overrides]
# Task R trains the audited recipe with data.subset.seed=R (its members: the pool samples whose
# hash_unit(R, 'subset:'+key) < data.subset.fraction) into $REFS_DIR/r$R; then audit the target with
#   python launch/audit.py run.dir=RUN 'audit.reference_runs=[REFS_DIR/r0,...,REFS_DIR/r7]'
# Each task is resumable like any run: a requeued or resubmitted task finds $REFS_DIR/r$R/checkpoints/latest
# and continues with resume=latest; five minutes before the time limit Slurm sends USR1 (--signal), which is
# forwarded to the training ranks (checkpoint and exit 0), then the task requeues itself.
#
# Environment (all optional):
#   AMINT_REPO         repository checkout (default: the submit directory)
#   REFS_DIR           parent of the reference run dirs (default: $AMINT_REPO/refs)
#   GPUS_PER_NODE      ranks of each task (default: $SLURM_GPUS_ON_NODE, else 1)
#   ACCELERATE_CONFIG  (default: configs/accelerate/ddp.yaml; single.yaml for one process)
#   PYTHON_ACTIVATE    a script to source first (a venv's bin/activate, a module setup)
#
#SBATCH --job-name=amint-refs
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%A_%a.out

set -euo pipefail

: "${SLURM_ARRAY_TASK_ID:?submit as a job array: sbatch --array=0-7 slurm/reference_models.sh ...}"
AMINT_REPO=${AMINT_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
REFS_DIR=${REFS_DIR:-$AMINT_REPO/refs}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-configs/accelerate/ddp.yaml}
MASTER_PORT=${MASTER_PORT:-$((20000 + (${SLURM_ARRAY_JOB_ID:-0} + SLURM_ARRAY_TASK_ID) % 20000))}
RUN_DIR=$REFS_DIR/r$SLURM_ARRAY_TASK_ID
cd "$AMINT_REPO"
if [[ -n "${PYTHON_ACTIVATE:-}" ]]; then
  # shellcheck disable=SC1090  # the user's activation script
  source "$PYTHON_ACTIVATE"
fi

overrides=("run.dir=$RUN_DIR" "data.subset.seed=$SLURM_ARRAY_TASK_ID" "run.audit=false")
if [[ -f $RUN_DIR/checkpoints/latest ]]; then
  overrides+=("resume=latest")  # requeued or resubmitted: continue where the last checkpoint left off
elif [[ -e $RUN_DIR ]]; then
  mv "$RUN_DIR" "$RUN_DIR.incomplete.$(date +%s)"  # stopped before its first checkpoint: start afresh
fi
mkdir -p "$REFS_DIR"
echo "reference run $SLURM_ARRAY_TASK_ID (job ${SLURM_JOB_ID:-none}): $RUN_DIR, $GPUS_PER_NODE rank(s)"

stop_requested=0
# shellcheck disable=SC2329  # invoked by the trap below
forward_stop() {
  stop_requested=1
  echo "time limit near: USR1 to the training ranks (they checkpoint and exit 0), then requeue"
  kill -USR1 "$step_pid"
}
trap forward_stop USR1

# shellcheck disable=SC2016  # single quotes on purpose: expanded by the task's shell
srun --ntasks=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" bash -c '
  trap "" USR1 TERM
  exec accelerate launch "$@"
' reference_models --config_file "$ACCELERATE_CONFIG" --num_processes "$GPUS_PER_NODE" \
  --main_process_port "$MASTER_PORT" launch/train.py "${overrides[@]}" "$@" &
step_pid=$!
rc=0
while kill -0 "$step_pid" 2>/dev/null; do  # wait returns early when USR1 arrives: wait again for the checkpoint
  rc=0
  wait "$step_pid" || rc=$?
done
if ((stop_requested)); then
  echo "requeueing job ${SLURM_JOB_ID:-?} (resumes from $RUN_DIR/checkpoints/latest)"
  scontrol requeue "${SLURM_JOB_ID:?}"
fi
exit "$rc"
