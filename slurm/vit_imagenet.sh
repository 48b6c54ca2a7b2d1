#!/usr/bin/env bash
# Train an auditable ViT on ImageNet WebDataset shards across N nodes x G GPUs:
#   sbatch [--nodes N] slurm/vit_imagenet.sh [hydra overrides]
#   sbatch --nodes 4 slurm/vit_imagenet.sh experiment=vit_b16_imagenet data.root=/data/amint/imagenet
#
# One srun task per node runs `accelerate launch --machine_rank $SLURM_NODEID`, which starts G ranks there;
# the first host of the job is the main process; DeepSpeed uses its `standard` multi-node launcher (torchrun
# on every node, no ssh). The run dir is $RUNS_DIR/$SLURM_JOB_ID, so a requeued job (same id) finds its
# checkpoints and resumes from `latest`. Five minutes before the time limit Slurm sends USR1 (--signal) to
# this script, which forwards it to the training ranks (they checkpoint the step they reach and exit), then
# requeues the job. The audit is a separate job, submitted once at the first start with
# `--dependency=afterok:$SLURM_JOB_ID` (slurm/audit.sh; pass run.audit=false for none). Submit from the
# repository root (or set AMINT_REPO).
#
# Environment (all optional):
#   AMINT_REPO         repository checkout on a file system every node sees (default: the submit directory)
#   RUNS_DIR           parent of the run dir (default: $AMINT_REPO/runs); must be shared by all nodes
#   GPUS_PER_NODE      ranks per node (default: $SLURM_GPUS_ON_NODE, else 8)
#   GLOBAL_BATCH       member samples per optimizer step over all ranks (default 1024); the script passes
#                      train.batch_size=GLOBAL_BATCH/ranks unless the overrides set train.batch_size
#   ACCELERATE_CONFIG  (default: configs/accelerate/multinode_deepspeed.yaml; multinode_ddp.yaml for DDP)
#   DEEPSPEED_CONFIG   (default: configs/deepspeed/zero2.json; zero3_vit_l.json for ViT-L)
#   MASTER_PORT        rendezvous port on the first host (default: 20000 + SLURM_JOB_ID % 20000, so jobs
#                      sharing a node do not collide)
#   NCCL_DEBUG         NCCL's log level (default WARN; INFO to debug a hang or a slow ring)
#   AUDIT_ARGS         extra `sbatch` options for the dependent audit job (e.g. "--partition=short")
#   PYTHON_ACTIVATE    a script to source on every node first (a venv's bin/activate, a module setup)
#
#SBATCH --job-name=amint-vit
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -euo pipefail

: "${SLURM_JOB_ID:?run this script with sbatch}"
AMINT_REPO=${AMINT_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
RUNS_DIR=${RUNS_DIR:-$AMINT_REPO/runs}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
GLOBAL_BATCH=${GLOBAL_BATCH:-1024}
ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-configs/accelerate/multinode_deepspeed.yaml}
DEEPSPEED_CONFIG=${DEEPSPEED_CONFIG:-configs/deepspeed/zero2.json}
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
CPUS_PER_TASK=${SLURM_CPUS_PER_TASK:-1}
# A failed or timed-out NCCL collective ends the process (instead of hanging); the timeout itself is
# train.dist_timeout_s (Accelerate's InitProcessGroupKwargs). NCCL_ASYNC_ERROR_HANDLING: torch < 2.2 name.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
WORLD=$((NNODES * GPUS_PER_NODE))
RUN_DIR=$RUNS_DIR/$SLURM_JOB_ID
MAIN_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
cd "$AMINT_REPO"

overrides=("run.dir=$RUN_DIR")
if [[ " $* " != *" train.batch_size="* ]]; then
  if ((GLOBAL_BATCH % WORLD)); then
    echo "error: GLOBAL_BATCH=$GLOBAL_BATCH is not a multiple of $WORLD ranks" >&2
    exit 2
  fi
  overrides+=("train.batch_size=$((GLOBAL_BATCH / WORLD))")
fi
if [[ " $* " != *" run.audit=false "* ]]; then
  overrides+=("run.audit=false")  # the audit is a job of its own, after this one (slurm/audit.sh)
  audit_marker=$RUNS_DIR/.audit-job-$SLURM_JOB_ID  # a requeued job (same id) must not submit it again
  if [[ ! -f $audit_marker ]]; then
    mkdir -p "$RUNS_DIR"
    # shellcheck disable=SC2086  # AUDIT_ARGS is a list of sbatch options
    sbatch --parsable --dependency="afterok:$SLURM_JOB_ID" ${AUDIT_ARGS:-} slurm/audit.sh "$RUN_DIR" >"$audit_marker"
    echo "audit: job $(cat "$audit_marker") runs after this one succeeds (slurm/audit.sh $RUN_DIR)"
  fi
fi
if [[ -f $RUN_DIR/checkpoints/latest ]]; then
  overrides+=("resume=latest")  # a requeued job: continue where the last checkpoint left off
elif [[ -e $RUN_DIR ]]; then
  mv "$RUN_DIR" "$RUN_DIR.incomplete.$(date +%s)"  # killed before its first checkpoint: start afresh
fi
launch=(--config_file "$ACCELERATE_CONFIG" --num_machines "$NNODES" --num_processes "$WORLD"
        --main_process_ip "$MAIN_HOST" --main_process_port "$MASTER_PORT")
if grep -q "distributed_type: DEEPSPEED" "$ACCELERATE_CONFIG"; then
  launch+=(--deepspeed_config_file "$DEEPSPEED_CONFIG" --deepspeed_multinode_launcher standard)
fi

echo "job $SLURM_JOB_ID: $NNODES node(s) x $GPUS_PER_NODE ranks, main host $MAIN_HOST:$MASTER_PORT"
echo "run dir: $RUN_DIR"
echo "TensorBoard: tensorboard --logdir $RUN_DIR/tb"

stop_requested=0
# shellcheck disable=SC2329  # invoked by the trap below
forward_stop() {
  stop_requested=1
  echo "time limit near: USR1 to the training ranks (they finish the step, checkpoint and exit 0), then requeue"
  kill -USR1 "$step_pid"  # srun forwards it to every process of the step; accelerate launch ignores it (below)
}
trap forward_stop USR1

# One task per node; SLURM_NODEID is read inside the task, so each node gets its own machine rank. The task
# ignores USR1 and TERM, and so does accelerate launch (torchrun) that it becomes: only the training ranks,
# which install their own handlers, act on them (checkpoint at an agreed step, exit 0; docs/distributed.md).
# shellcheck disable=SC2016  # single quotes on purpose: expanded by the task's shell on its node
srun --ntasks-per-node=1 --cpus-per-task="$CPUS_PER_TASK" --kill-on-bad-exit=1 bash -c '
  set -euo pipefail
  trap "" USR1 TERM
  if [[ -n "${PYTHON_ACTIVATE:-}" ]]; then source "$PYTHON_ACTIVATE"; fi
  exec accelerate launch --machine_rank "$SLURM_NODEID" "$@"
' vit_imagenet "${launch[@]}" launch/train.py "${overrides[@]}" "$@" &
step_pid=$!
rc=0
while kill -0 "$step_pid" 2>/dev/null; do  # wait returns early when USR1 arrives: wait again for the checkpoint
  rc=0
  wait "$step_pid" || rc=$?
done
if ((stop_requested)); then
  echo "requeueing job $SLURM_JOB_ID (resumes from $RUN_DIR/checkpoints/latest)"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
