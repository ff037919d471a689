#!/usr/bin/env bash
# One-process launcher: trains (and evaluates) CONFIG into WORKDIR on this machine's devices.
#
# Usage:
#   launch/local.sh CONFIG WORKDIR [--config.x=y ...] [--mode=eval|export]
# Examples:
#   launch/local.sh configs/demo.py runs/demo
#   launch/local.sh configs/tiny.py runs/tiny --config.total_steps=2
#
# CONFIG and WORKDIR are relative to the current directory. Runs this checkout's mmjax with the
# repository's .venv when there is one (`make install` creates it), else with python3.
set -euo pipefail

if [[ $# -lt 2 ]]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
  exit 2
fi

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -x "${REPO_ROOT}/.venv/bin/python" ]]; then
  PYTHON="${REPO_ROOT}/.venv/bin/python"
else
  PYTHON="python3"
fi

export PYTHONPATH="${REPO_ROOT}${PYTHONPATH:+:${PYTHONPATH}}"  # This checkout's mmjax and configs.
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"  # Keep XLA/TF C++ logs to warnings.
# XLA_PYTHON_CLIENT_PREALLOCATE, JAX_PLATFORMS, XLA_FLAGS: left as set by the caller.

exec "${PYTHON}" -m mmjax.main --config="$1" --workdir="$2" "${@:3}"
