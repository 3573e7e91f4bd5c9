#!/usr/bin/env bash
# The main job on the embedded default: a real LoRA fine-tune on offline data, printing retrieval metrics
# before and after training. Extra flags override the config, e.g. --num_train_epochs 2. Each run writes over
# outputs/demo (--overwrite_output_dir true); pass --output_dir elsewhere to keep a run.
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh" 1 recipes/train_bi_encoder.py recipes/configs/demo.yaml "$@"
