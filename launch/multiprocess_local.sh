#!/usr/bin/env bash
# Multi-process launcher on one machine: N processes, each with its own devices, joined by
# jax.distributed into one job (the path a multi-host TPU/GPU run takes, testable on a laptop).
#
# Usage:
#   launch/multiprocess_local.sh NUM_PROCESSES CONFIG WORKDIR [--config.x=y ...]
# Examples:
#   launch/multiprocess_local.sh 2 configs/tiny.py runs/tiny2
#   DEVICES_PER_PROCESS=4 launch/multiprocess_local.sh 2 configs/demo.py runs/demo2
#
# Environment:
#   DEVICES_PER_PROCESS  CPU devices each process simulates (default 2; CPU runs only).
#   PORT                 coordinator port on 127.0.0.1 (default: a free one).
#   JAX_PLATFORMS        default 'cpu'. On a multi-GPU host set JAX_PLATFORMS=cuda and give each
#                        process its GPUs with CUDA_VISIBLE_DEVICES in a wrapper of your own.
# Process i logs to WORKDIR/logs/process_i.log; process 0 also prints to the terminal. If any
# process fails, the others are stopped and the script exits with its status.
set -euo pipefail

if [[ $# -lt 3 ]]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
  exit 2
fi
NUM="$1"; CONFIG="$2"; WORKDIR="$3"; shift 3
if ! [[ "${NUM}" =~ ^[1-9][0-9]*$ ]]; then
  echo "NUM_PROCESSES must be a positive integer, got '${NUM}'." >&2
  exit 2
fi

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -x "${REPO_ROOT}/.venv/bin/python" ]]; then PYTHON="${REPO_ROOT}/.venv/bin/python"; else PYTHON="python3"; fi
export PYTHONPATH="${REPO_ROOT}${PYTHONPATH:+:${PYTHONPATH}}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
DEVICES="${DEVICES_PER_PROCESS:-2}"
PORT="${PORT:-$("${PYTHON}" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
XLA_FLAGS="$(echo "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[^ ]*//g')"
if [[ "${JAX_PLATFORMS}" == cpu ]]; then
  XLA_FLAGS="${XLA_FLAGS} --xla_force_host_platform_device_count=${DEVICES}"
fi
export XLA_FLAGS

mkdir -p "${WORKDIR}/logs"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "${pid}" 2>/dev/null || true; done; }
trap cleanup EXIT INT TERM

for ((i = 0; i < NUM; i++)); do
  args=(-m mmjax.main --config="${CONFIG}" --workdir="${WORKDIR}"
        --config.distributed.coordinator_address="127.0.0.1:${PORT}"
        --config.distributed.num_processes="${NUM}" --config.distributed.process_id="${i}" "$@")
  if [[ $i -eq 0 ]]; then
    "${PYTHON}" "${args[@]}" > >(tee "${WORKDIR}/logs/process_0.log") 2>&1 &
  else
    "${PYTHON}" "${args[@]}" > "${WORKDIR}/logs/process_${i}.log" 2>&1 &
  fi
  pids+=($!)
done

# Wait for all; the first failure stops the rest (a lone survivor would block in a collective).
declare -A running
for pid in "${pids[@]}"; do running[$pid]=1; done
while (( ${#running[@]} > 0 )); do
  status=0
  wait -n -p done_pid "${!running[@]}" || status=$?
  unset "running[${done_pid}]"
  if (( status != 0 )); then
    echo "Process ${done_pid} exited with status ${status}; stopping the others (logs in ${WORKDIR}/logs)." >&2
    exit "${status}"
  fi
done
trap - EXIT
