#!/usr/bin/env bash
# The demo on two CPU processes (DDP over gloo): the README's two-process command, runnable in a fresh shell (it
# sets up and uses .venv like scripts/demo.sh). Extra flags override the config; the model lands in
# outputs/demo-2cpu, which each run writes over (--output_dir elsewhere keeps a run).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1
exec accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
  recipes/train_bi_encoder.py --config recipes/configs/demo.yaml --output_dir outputs/demo-2cpu \
  --use_cpu true --ddp_backend gloo --overwrite_output_dir true "$@"
