#!/usr/bin/env bash
# Runs a gin-configured training run on every worker of a TPU VM / pod slice (the same command
# on all hosts; the trainer initialises jax.distributed itself on multi-host slices).
#
# Needs:
#   TPU_NAME, ZONE    the TPU (see create_tpu.sh; install.sh first)
#   GIN_FILE          gin file(s), space-separated, e.g. "models/hypermoe_base_8.gin runs/pretrain.gin"
#   MODEL_DIR         checkpoints and metrics; a gs:// path on pod slices (every host writes there)
# Optional:
#   GIN_ARGS          more trainer flags, e.g. "--gin.MIXTURE_OR_TASK_NAME=c4_span_corruption
#                     --gin.TRAIN_STEPS=100000" (split on spaces)
#   ENV_VARS          environment for the trainer, e.g. "TFDS_DATA_DIR=gs://b/tfds HYPERMOE_T5_SPM=gs://b/spm.model"
#   PROJECT           gcloud project
#   LOG_FILE          run detached (nohup) and write the log there on every worker, instead of
#                     streaming it through ssh (a dropped ssh connection then keeps the run going)
#
# Example:
#   TPU_NAME=hypermoe ZONE=us-central2-b GIN_FILE="models/hypermoe_base_8.gin runs/pretrain.gin" \
#   MODEL_DIR=gs://my-bucket/runs/hypermoe_base_8 \
#   GIN_ARGS="--gin.MIXTURE_OR_TASK_NAME=c4_span_corruption --gin.TRAIN_STEPS=524288" \
#   bash tpu_scripts/launch.sh [--dry-run]
# Re-running resumes from the latest checkpoint in MODEL_DIR.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
parse_flags "$@"
require TPU_NAME ZONE GIN_FILE MODEL_DIR
gcloud_common_args

train=(python3 -m hypermoe_jax.train)
read -r -a files <<<"$GIN_FILE"
for f in "${files[@]}"; do train+=("--gin_file=$f"); done
train+=("--gin.MODEL_DIR=$MODEL_DIR")
if [[ -n "${GIN_ARGS:-}" ]]; then
  read -r -a extra <<<"$GIN_ARGS"
  train+=("${extra[@]}")
fi
envs=()
if [[ -n "${ENV_VARS:-}" ]]; then read -r -a envs <<<"$ENV_VARS"; envs=(env "${envs[@]}"); fi

remote="$(remote_words ${envs[@]+"${envs[@]}"} "${train[@]}")"
if [[ -n "${LOG_FILE:-}" ]]; then
  remote="nohup $remote > $(quote "$LOG_FILE") 2>&1 &"
fi
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${GCLOUD_ARGS[@]}" --command="$remote"
