#!/usr/bin/env bash
# Audit a finished training run as a job of its own (one GPU). slurm/vit_imagenet.sh submits it, once, as
#   sbatch --dependency=afterok:$TRAINING_JOB_ID slurm/audit.sh RUN_DIR
# so it starts only when the training job (requeues included) ended successfully. By hand:
#   sbatch slurm/audit.sh runs/12345 [audit overrides, e.g. audit.n_boot=200]
#
# Environment (all optional): AMINT_REPO (default: the submit directory), PYTHON_ACTIVATE (a script to source
# first: a venv's bin/activate, a module setup).
#
#SBATCH --job-name=amint-audit
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --time=04:00:00
#SBATCH --output=slurm-%x-%j.out

set -euo pipefail

RUN_DIR=${1:?usage: sbatch slurm/audit.sh RUN_DIR [audit overrides]}
shift
AMINT_REPO=${AMINT_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$AMINT_REPO"
if [[ ! -f $RUN_DIR/model.safetensors ]]; then
  echo "error: $RUN_DIR has no model.safetensors: training did not finish" >&2
  exit 2
fi
if [[ -n "${PYTHON_ACTIVATE:-}" ]]; then
  # shellcheck disable=SC1090  # the user's activation script
  source "$PYTHON_ACTIVATE"
fi
echo "auditing $RUN_DIR (job ${SLURM_JOB_ID:-none})"
srun --ntasks=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" python launch/audit.py "run.dir=$RUN_DIR" "$@"
