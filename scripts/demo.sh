#!/usr/bin/env bash
# The main job on the embedded default: a real LoRA fine-tune on offline data, printing retrieval metrics
# before and after training. Extra flags override the config, e.g. --num_train_epochs 2. Each run writes over
# outputs/demo (--overwrite_output_dir true); pass --output_dir elsewhere to keep a run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1
exec accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  recipes/train_bi_encoder.py --config recipes/configs/demo.yaml --overwrite_output_dir true "$@"
