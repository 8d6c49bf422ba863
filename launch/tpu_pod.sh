#!/usr/bin/env bash
# Run reval_jax on every worker of a Cloud TPU pod slice: the same command on all hosts.
# jax.distributed auto-detects the pod (TPU_WORKER_HOSTNAMES), so no process flags are needed.
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a REPO_DIR='~/reval_jax' \
#   launch/tpu_pod.sh --config=configs/qwen7b.py --workdir=/mnt/shared/runs/qwen7b
#
# Required: gcloud authenticated for the project; the repo cloned at REPO_DIR on every worker with
# `make .venv/.installed` run there (or `pip install -r requirements.txt`); the model directory and
# the workdir on storage every worker sees (e.g. a GCS FUSE or Filestore mount): checkpoints are
# written by all hosts together and metrics by process 0.
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
REPO_DIR=${REPO_DIR:-'~/reval_jax'}
ARGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
  "cd $REPO_DIR && .venv/bin/python -m reval_jax.train $ARGS"
