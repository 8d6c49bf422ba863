#!/usr/bin/env bash
# One machine, all of its GPUs, one process (no jax.distributed needed).
#
#   launch/single_host_gpu.sh --config=configs/dpsk_r1_distill_1p5b.py --workdir=runs/r1
#
# Required: jax with CUDA in .venv (pip install "jax[cuda12]==0.10.2" on top of requirements.txt);
# CUDA_VISIBLE_DEVICES to pick GPUs. The default mesh (1,-1,1) shards parameters and optimizer
# state over every visible GPU (FSDP); use --config.mesh='(2,-1,1)' to add data parallelism.
set -euo pipefail
cd "$(dirname "$0")/.."
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
exec .venv/bin/python -m reval_jax.train "$@"
