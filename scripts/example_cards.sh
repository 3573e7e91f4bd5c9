#!/usr/bin/env bash
# Regenerates the example cards of model_cards/ from real offline runs on this machine, and records the runs.
#   bash scripts/example_cards.sh [NAME ...]     (default: all four; about 25 min on 2 cores)
# Each run is one of the README's demo commands as written (plus an output folder), so every figure in a card
# (hardware, duration, samples/s, metrics before and after) is what that run measured:
#   bi_encoder_lora       bash scripts/demo.sh
#   multi_vector_lora     bash scripts/demo_multi_vector.sh
#   reranker_full         bash scripts/demo_reranker.sh
#   reranker_qlora        bash scripts/demo_reranker.sh --load_in_4bit true --lora_r 16 --lora_alpha 32 --num_train_epochs 1
# It copies the card (README.md) and the facts it was rendered from (model_card.json) to model_cards/NAME.md/.json;
# tests/test_model_card.py renders each .json and compares it with its .md (it never rewrites them). The printed
# report of each run goes to benchmarks/results/example-cards/NAME.txt (command, wall time, versions, metrics).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${EXAMPLE_CARDS_OUT:-$ROOT/outputs/example-cards}"
RESULTS="$ROOT/benchmarks/results/example-cards"
mkdir -p "$OUT" "$RESULTS"

declare -A COMMANDS=(
  [bi_encoder_lora]="scripts/demo.sh"
  [multi_vector_lora]="scripts/demo_multi_vector.sh"
  [reranker_full]="scripts/demo_reranker.sh"
  [reranker_qlora]="scripts/demo_reranker.sh --load_in_4bit true --lora_r 16 --lora_alpha 32 --num_train_epochs 1"
)
NAMES=("$@")
[ ${#NAMES[@]} -gt 0 ] || NAMES=(bi_encoder_lora multi_vector_lora reranker_full reranker_qlora)

for name in "${NAMES[@]}"; do
  command="${COMMANDS[$name]:-}"
  [ -n "$command" ] || { echo "unknown card '$name'; known: ${!COMMANDS[*]}" >&2; exit 2; }
  echo "== $name: bash $command --output_dir $OUT/$name" >&2
  start=$(date +%s)
  # shellcheck disable=SC2086  # the command's flags are meant to split
  bash "$ROOT"/$command --output_dir "$OUT/$name" > "$OUT/$name.log" 2>&1 || { tail -30 "$OUT/$name.log" >&2; exit 1; }
  seconds=$(( $(date +%s) - start ))
  cp "$OUT/$name/README.md" "$ROOT/model_cards/$name.md"
  cp "$OUT/$name/model_card.json" "$ROOT/model_cards/$name.json"
  {
    echo "command: bash $command --output_dir outputs/example-cards/$name"
    echo "date: $(date -u +%Y-%m-%d)"
    echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), no GPU"
    echo "wall time: ${seconds} s (set-up, model load, evaluation before and after, training, save)"
    "$ROOT/.venv/bin/python" - <<'EOF'
from importlib.metadata import version
print("versions:", ", ".join(f"{n} {version(n)}" for n in ["torch", "transformers", "peft", "accelerate", "datasets"]))
EOF
    echo
    # the recipe's own report: the metrics table before -> after and where the model was saved
    sed -n '/before -> after/,$p' "$OUT/$name.log" | sed "s#$ROOT/##g"
  } > "$RESULTS/$name.txt"
  echo "$name: ${seconds} s, card -> model_cards/$name.md" >&2
done
