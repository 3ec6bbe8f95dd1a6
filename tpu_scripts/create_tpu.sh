#!/usr/bin/env bash
# Creates a Cloud TPU VM or pod slice (nothing to do if one with this name exists).
#
# Needs:
#   TPU_NAME          name of the TPU VM / slice
#   ZONE              e.g. us-central2-b
#   ACCELERATOR_TYPE  e.g. v4-8 (one host), v4-32 (4 hosts), v5p-64
#   RUNTIME_VERSION   TPU software version, e.g. tpu-ubuntu2204-base (v4), v2-alpha-tpuv5 (v5p)
# Optional:
#   PROJECT           gcloud project (default: gcloud's configured one)
#   SPOT=1            a Spot (preemptible) slice; training resumes from its last checkpoint
#
# Example:
#   TPU_NAME=hypermoe ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 \
#   RUNTIME_VERSION=tpu-ubuntu2204-base bash tpu_scripts/create_tpu.sh [--dry-run]
# Next: install.sh, then launch.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_flags "$@"
require TPU_NAME ZONE ACCELERATOR_TYPE RUNTIME_VERSION
gcloud_common_args

if exists no gcloud compute tpus tpu-vm describe "$TPU_NAME" "${GCLOUD_ARGS[@]}"; then
  echo "TPU $TPU_NAME already exists in $ZONE; nothing to do."
  exit 0
fi

create=(gcloud compute tpus tpu-vm create "$TPU_NAME" "${GCLOUD_ARGS[@]}"
        --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
if [[ "${SPOT:-0}" == 1 ]]; then create+=(--spot); fi
run "${create[@]}"
