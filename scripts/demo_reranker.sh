#!/usr/bin/env bash
# The reranker demo, offline on a CPU: a small Qwen2-VL yes/no reranker built at first use, trained on the emoji data
# with random negatives (add --mining_model outputs/demo, after scripts/demo.sh, for hard negatives mined by the
# bi-encoder demo's model), printing reranking metrics before and after. Extra flags override the config; each run
# writes over outputs/demo-reranker (--output_dir elsewhere keeps a run).
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh" 1 recipes/train_cross_encoder.py recipes/configs/demo_reranker.yaml "$@"
