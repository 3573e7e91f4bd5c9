#!/usr/bin/env bash
# The reranker demo, offline on a CPU: a small Qwen2-VL yes/no reranker built at first use, trained on the emoji data
# with random negatives (add --mining_model outputs/demo, after scripts/demo.sh, for hard negatives mined by the
# bi-encoder demo's model), printing reranking metrics before and after. Extra flags override the config; each run
# writes over outputs/demo-reranker (--output_dir elsewhere keeps a run).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1
exec accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
  recipes/train_cross_encoder.py --config recipes/configs/demo_reranker.yaml --overwrite_output_dir true "$@"
