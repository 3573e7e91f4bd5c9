#!/usr/bin/env bash
# The late-interaction demo, offline on a CPU: the demo's dual encoder as a multi-vector model (one 128-d vector per
# token and image patch, MaxSim), printing retrieval metrics before and after beside those of scripts/demo.sh. Extra
# flags override the config; each run writes over outputs/demo-multi-vector (--output_dir elsewhere keeps a run).
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh" 1 recipes/train_bi_encoder.py recipes/configs/demo_multi_vector.yaml "$@"
