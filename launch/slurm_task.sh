#!/usr/bin/env bash
# One Slurm task (one host) of launch/slurm.sbatch: binds the node's GPUs and runs one
# `python -m mmjax.main` that joins the job through jax.distributed's Slurm detection
# (SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID).
#
# Usage (by srun; tests fake the SLURM variables to run it as 2 local processes):
#   launch/slurm_task.sh CONFIG WORKDIR [--config.x=y ...]
# Environment: MMJAX_VENV (default REPO/.venv), JAX_COORDINATOR_PORT (default: jax derives it
# from SLURM_JOB_ID), SLURM_GPUS_ON_NODE (set by Slurm with --gpus-per-node).
set -euo pipefail
if [[ $# -lt 2 ]]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
  exit 2
fi
for var in SLURM_JOB_ID SLURM_STEP_NODELIST SLURM_NTASKS SLURM_PROCID SLURM_LOCALID; do
  if [[ -z "${!var:-}" ]]; then
    echo "launch/slurm_task.sh: ${var} is not set; run it through srun (launch/slurm.sbatch)." >&2
    exit 2
  fi
done
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MMJAX_VENV:-${REPO_ROOT}/.venv}"
if [[ -x "${VENV}/bin/python" ]]; then PYTHON="${VENV}/bin/python"; else PYTHON="python3"; fi
export PYTHONPATH="${REPO_ROOT}${PYTHONPATH:+:${PYTHONPATH}}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"
if [[ -n "${SLURM_GPUS_ON_NODE:-}" && -z "${JAX_LOCAL_DEVICE_IDS:-}" ]]; then
  JAX_LOCAL_DEVICE_IDS="$(seq -s, 0 $((SLURM_GPUS_ON_NODE - 1)))"  # One task: all its GPUs.
  export JAX_LOCAL_DEVICE_IDS
fi
args=(-m mmjax.main --config="$1" --workdir="$2"
      --config.distributed.coordinator_address=auto "${@:3}")
exec "${PYTHON}" "${args[@]}"
