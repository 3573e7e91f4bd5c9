#!/usr/bin/env bash
# The late-interaction demo, offline on a CPU: the demo's dual encoder as a multi-vector model (one 128-d vector per
# token and image patch, MaxSim), printing retrieval metrics before and after beside those of scripts/demo.sh. Extra
# flags override the config; each run writes over outputs/demo-multi-vector (--output_dir elsewhere keeps a run).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1
exec accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  recipes/train_bi_encoder.py --config recipes/configs/demo_multi_vector.yaml --overwrite_output_dir true "$@"
