#!/usr/bin/env bash
# The demo on two CPU processes (DDP over gloo): the README's two-process command, runnable in a fresh shell (it
# sets up and uses .venv like scripts/demo.sh). Extra flags override the config; the model lands in
# outputs/demo-2cpu, which each run writes over (--output_dir elsewhere keeps a run).
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh" 2 recipes/train_bi_encoder.py recipes/configs/demo.yaml --output_dir outputs/demo-2cpu "$@"
