#!/usr/bin/env bash
# Deletes a TPU VM / pod slice (nothing to do if it does not exist). Checkpoints in a gs://
# MODEL_DIR are kept; anything on the workers' disks is lost.
#
# Needs:
#   TPU_NAME, ZONE
# Optional:
#   PROJECT
#
# Example:
#   TPU_NAME=hypermoe ZONE=us-central2-b bash tpu_scripts/delete_tpu.sh [--dry-run]
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_flags "$@"
require TPU_NAME ZONE
gcloud_common_args

if ! exists yes gcloud compute tpus tpu-vm describe "$TPU_NAME" "${GCLOUD_ARGS[@]}"; then
  echo "TPU $TPU_NAME does not exist in $ZONE; nothing to do."
  exit 0
fi
run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${GCLOUD_ARGS[@]}" --quiet
