#!/usr/bin/env bash
# One command for the side-by-side benchmark: builds .venv-bench (hf_mm_rerank + sentence-transformers 6.0.1,
# which is never a dependency of the package) on first use, then runs benchmarks/bench_clip.py.
#   bash benchmarks/run.sh [--model tiny|vit-b32] [--batch 32] [--output benchmarks/results/<file>.md] ...
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv-bench/bin/python ]; then
  python3 -m venv .venv-bench
  .venv-bench/bin/pip install -q --upgrade pip
  .venv-bench/bin/pip install -q torch==2.14.1 torchvision==0.29.1
  .venv-bench/bin/pip install -q -e . "sentence-transformers==6.0.1"
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv-bench/bin/python benchmarks/bench_clip.py "$@"
