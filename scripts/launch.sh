#!/usr/bin/env bash
# Shared by the demo scripts: sets up .venv (scripts/setup.sh), then runs a recipe offline with accelerate.
#   source scripts/launch.sh PROCESSES RECIPE CONFIG [flags...]
# PROCESSES 1: one process; 2 or more: DDP over gloo on the CPU. Each run writes over its output folder
# (--overwrite_output_dir true); extra flags override the config.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1
PROCESSES="$1" RECIPE="$2" CONFIG="$3"
shift 3
if [ "$PROCESSES" -gt 1 ]; then
  set -- --use_cpu true --ddp_backend gloo "$@"
  MULTI=(--multi_gpu)
else
  MULTI=()
fi
exec accelerate launch "${MULTI[@]}" --num_processes "$PROCESSES" --num_machines 1 --mixed_precision no \
  --dynamo_backend no "$RECIPE" --config "$CONFIG" --overwrite_output_dir true "$@"
