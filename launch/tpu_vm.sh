#!/usr/bin/env bash
# Cloud TPU VM launcher: creates (or reuses) a TPU VM slice, copies this checkout to every worker,
# installs the locked dependencies + libtpu there, and runs one `python -m mmjax.main` on all
# workers at once (`--worker=all`), streaming their logs; the first worker that fails stops the
# launch with its status. jax.distributed finds the slice's workers itself
# (`--config.distributed.coordinator_address=auto`).
#
# Usage:
#   launch/tpu_vm.sh [--dry-run] NAME ACCELERATOR CONFIG WORKDIR [--config.x=y ...]
# Examples:
#   ZONE=us-west4-a launch/tpu_vm.sh mmjax-v5e v5litepod-16 configs/siglip_b16.py gs://bkt/run1
#   NUM_SLICES=2 ZONE=us-east5-b launch/tpu_vm.sh --dry-run mm v5litepod-256 configs/x.py gs://b/r
#
# Environment:
#   ZONE (required), PROJECT (default: gcloud's), RUNTIME (TPU software version, default
#   v2-alpha-tpuv5-lite), NUM_SLICES (default 1; > 1 creates a multislice queued resource, whose
#   workers get the MEGASCALE_* environment from the TPU runtime and join over DCN),
#   SPOT=1 (preemptible capacity: SIGTERM before preemption makes mmjax checkpoint and exit 0),
#   REMOTE_DIR (default mmjax, in each worker's home). WORKDIR should be a gs:// path or a
#   filesystem every worker mounts. --dry-run prints every command instead of running it.
set -euo pipefail

DRY_RUN=0
if [[ "${1:-}" == --dry-run ]]; then DRY_RUN=1; shift; fi
if [[ $# -lt 4 ]]; then
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
  exit 2
fi
NAME="$1"; ACCELERATOR="$2"; CONFIG="$3"; WORKDIR="$4"; shift 4
: "${ZONE:?set ZONE, e.g. ZONE=us-west4-a}"
RUNTIME="${RUNTIME:-v2-alpha-tpuv5-lite}"
NUM_SLICES="${NUM_SLICES:-1}"
REMOTE_DIR="${REMOTE_DIR:-mmjax}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LIBTPU="$(sed -n 's/.*"\(libtpu==[^"]*\)".*/\1/p' "${REPO_ROOT}/pyproject.toml" | head -1)"
LIBTPU="${LIBTPU:-libtpu}"
gcloud_tpu=(gcloud compute tpus)
common=(--zone="${ZONE}")
if [[ -n "${PROJECT:-}" ]]; then common+=(--project="${PROJECT}"); fi

run() {  # Prints (dry run) or runs one command; a failure stops the launch with its status.
  if [[ "${DRY_RUN}" == 1 ]]; then printf '+ '; printf '%q ' "$@"; echo; return 0; fi
  "$@"
}

# Worker nodes: NAME for one slice, NAME-0 .. NAME-(N-1) for the slices of a queued resource.
nodes=("${NAME}")
if (( NUM_SLICES > 1 )); then
  nodes=(); for ((i = 0; i < NUM_SLICES; i++)); do nodes+=("${NAME}-${i}"); done
fi

exists() {
  [[ "${DRY_RUN}" == 0 ]] && "${gcloud_tpu[@]}" tpu-vm describe "${nodes[0]}" "${common[@]}" \
      >/dev/null 2>&1
}
if exists; then
  echo "Reusing TPU VM ${NAME} in ${ZONE}." >&2
elif (( NUM_SLICES > 1 )); then
  run "${gcloud_tpu[@]}" queued-resources create "${NAME}" "${common[@]}" \
      --accelerator-type="${ACCELERATOR}" --runtime-version="${RUNTIME}" \
      --node-count="${NUM_SLICES}" --node-prefix="${NAME}" ${SPOT:+--spot}
  run "${gcloud_tpu[@]}" queued-resources wait "${NAME}" "${common[@]}" --state=ACTIVE
else
  run "${gcloud_tpu[@]}" tpu-vm create "${NAME}" "${common[@]}" \
      --accelerator-type="${ACCELERATOR}" --version="${RUNTIME}" ${SPOT:+--spot}
fi

# The code: this checkout's tracked files (what `git ls-files` lists), as one tarball.
tarball="/tmp/mmjax-${NAME}.tar.gz"
run git -C "${REPO_ROOT}" archive --format=tar.gz --prefix="${REMOTE_DIR}/" -o "${tarball}" HEAD
install="set -e; rm -rf ${REMOTE_DIR} && tar xzf mmjax.tar.gz && cd ${REMOTE_DIR}"
install+=" && python3 -m venv .venv && .venv/bin/pip install -q uv"
install+=" && .venv/bin/uv pip install -q --python .venv/bin/python -r requirements/runtime.lock"
install+=" && .venv/bin/uv pip install -q --python .venv/bin/python --no-deps -e . '${LIBTPU}'"
train="cd ${REMOTE_DIR} && TF_CPP_MIN_LOG_LEVEL=1 .venv/bin/python -m mmjax.main"
train+=" --config=$(printf '%q' "${CONFIG}") --workdir=$(printf '%q' "${WORKDIR}")"
train+=" --config.distributed.coordinator_address=auto"
for arg in "$@"; do train+=" $(printf '%q' "${arg}")"; done

# Hosts per slice, from the accelerator type: v5e/v6e name chips (4 per host, one host up to
# 8), v4/v5p name TensorCores (2 per chip, 4 chips per host).
size="${ACCELERATOR##*-}"
case "${ACCELERATOR}" in
  v5litepod-*|v5e-*|v6e-*) hosts=$(( size <= 8 ? 1 : size / 4 ));;
  v4-*|v5p-*) hosts=$(( size <= 8 ? 1 : size / 8 ));;
  *) hosts=0;;
esac
if [[ "${DRY_RUN}" == 1 ]]; then
  echo "# ${ACCELERATOR}: ${hosts:-?} host(s) per slice x ${NUM_SLICES} slice(s); every ssh"\
       "--worker=all runs its command on each of them (workers 0..$(( hosts - 1 )))."
fi

pids=()
for node in "${nodes[@]}"; do
  run "${gcloud_tpu[@]}" tpu-vm scp "${tarball}" "${node}:mmjax.tar.gz" "${common[@]}" --worker=all
  run "${gcloud_tpu[@]}" tpu-vm ssh "${node}" "${common[@]}" --worker=all --command="${install}"
done
for node in "${nodes[@]}"; do  # Every slice's workers at once; logs stream with --worker=all.
  if [[ "${DRY_RUN}" == 1 ]]; then
    run "${gcloud_tpu[@]}" tpu-vm ssh "${node}" "${common[@]}" --worker=all --command="${train}"
  else
    "${gcloud_tpu[@]}" tpu-vm ssh "${node}" "${common[@]}" --worker=all --command="${train}" &
    pids+=($!)
  fi
done
status=0
for _ in "${pids[@]}"; do  # The first failure stops the launch (the others are killed).
  wait -n || { status=$?; kill "${pids[@]}" 2>/dev/null || true; break; }
done
exit "${status}"
