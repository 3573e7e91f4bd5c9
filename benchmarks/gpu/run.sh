#!/usr/bin/env bash
# The GPU plan (issue 31): one command for a lent H100/H200, run there through the device tool as
#   bash benchmarks/gpu/run.sh            with carry: ["benchmarks/gpu/.wheels"]   (made here by prepare.sh)
# and its miniature here, tiny models on the CPU, same checks and result files:
#   bash benchmarks/gpu/run.sh --cpu
# `--list` prints the wheels it installs (the test compares them with prepare.sh --list) and exits.
#
# Writes under $OUT (./gpu-out when unset): env.json, clip.json, gradcache.json, qlora.json, multivector.json,
# distributed.json, results.md and run.log: 8 files, the most the device returns. Scratch (models, JPEGs, trainer
# output) goes to $SCRATCH (/tmp/hf-mm-rerank-gpu). Each check runs under its own timeout, in order of value, so a
# timeout loses only the check it stopped; the planned total is 6 minutes of a 10-minute command (table below).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="$ROOT/benchmarks/gpu"
MODE=gpu
case "${1:-}" in
  --cpu) MODE=cpu ;;
  --list) grep -v '^#' "$HERE/wheels.txt" | awk 'NF {print $1}'; exit 0 ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu/run.sh [--cpu | --list]" >&2; exit 2 ;;
esac
cd "$ROOT"
OUT="${OUT:-$ROOT/gpu-out}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
export OUT SCRATCH="${SCRATCH:-/tmp/hf-mm-rerank-gpu}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 HF_HUB_DISABLE_TELEMETRY=1
# transformers 5.25's from_pretrained turns hub kernels on by default and raises without the `kernels` package; they
# come from the Hub, which the device cannot reach, so both modes run the torch implementations (kernels not carried).
export USE_HUB_KERNELS=NO
exec > >(tee -a "$OUT/run.log") 2>&1
START=$SECONDS
DEADLINE=570  # seconds: the device's 600-s command limit less a margin for the last lines and the copy back

# check | planned seconds (the check's soft budget: no repeat starts past it) | timeout (hard stop)
# GPU plan: install + env 20 s, then 115 + 90 + 45 + 35 + 55 = 340 s: 360 s planned (6 of the command's 10 minutes);
# the timeouts sum to 510 s, and no check starts past the 570-s deadline (checks.py's PLANS hold the sizes).
PLAN_gpu="clip 115 140
gradcache 90 150
qlora 45 75
multivector 35 60
distributed 55 85"

if [ "$MODE" = gpu ]; then
  PY=python3
  # The carried wheels, exactly those named in wheels.txt, into /tmp/site (first on the path: the device's own
  # transformers 5.17 is below our pyproject's >=5.23, so the carried 5.25.0, with huggingface_hub 2.5.0, shadows it,
  # for sentence-transformers too).
  FILES=()
  MISSING=()
  for spec in $(bash "$HERE/run.sh" --list); do
    name="$(echo "${spec%%==*}" | tr 'A-Z-' 'a-z_')"
    file="$(ls "$HERE/.wheels/"* 2>/dev/null | grep -i "/${name}-${spec##*==}-" | head -1)"
    if [ -n "$file" ]; then FILES+=("$file"); else MISSING+=("$spec"); fi
  done
  [ ${#MISSING[@]} -eq 0 ] || echo "warning: wheels missing from benchmarks/gpu/.wheels (run prepare.sh here, carry it): ${MISSING[*]}"
  if [ ${#FILES[@]} -gt 0 ]; then
    if $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${FILES[@]}"; then
      echo "installed ${#FILES[@]} wheels into /tmp/site in $((SECONDS - START)) s"
    else
      echo "warning: the wheel install failed: the checks run on the device's own packages (env.json says which)"
    fi
  fi
  export PYTHONPATH="/tmp/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}" DS_ACCELERATOR=cuda
  PLAN="$PLAN_gpu"
else
  PY="${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3)}"
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi

# env.json: the machine, the versions actually imported, what the install did.
$PY - "$MODE" <<'EOF' || echo "warning: env.json not written"
import json, os, platform, subprocess, sys
sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks", "gpu"))
import common
env = {"mode": sys.argv[1], "device": common.machine(), "python": platform.python_version(),
       "versions": common.versions(), "cpu_count": os.cpu_count(), "pythonpath": os.environ.get("PYTHONPATH")}
try:
    env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                        "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
except OSError:
    env["nvidia_smi"] = None
json.dump(env, open(os.path.join(os.environ["OUT"], "env.json"), "w"), indent=1)
line = (f"# GPU plan results ({sys.argv[1]}): {env['device']}\n\n- python {env['python']}; "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + "\n")
open(os.path.join(os.environ["OUT"], "results.md"), "a").write(line)
print(line)
EOF

run_check() {  # name timeout
  local left=$((DEADLINE - (SECONDS - START)))
  local limit=$(( $2 < left ? $2 : left ))
  if [ "$limit" -lt 15 ]; then
    echo "- **$1: not run**: $left s left of the command's $DEADLINE" | tee -a "$OUT/results.md"; return
  fi
  echo "=== $1 (timeout $limit s, $((SECONDS - START)) s into the plan)"
  timeout --kill-after=10 "$limit" $PY "$HERE/checks.py" "$1" $([ "$MODE" = cpu ] && echo --cpu)
  local rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
    echo "- **$1: timed out** after $limit s (its JSON keeps the runs it finished)" >> "$OUT/results.md"
  elif [ $rc -ne 0 ]; then
    echo "- **$1: exit $rc** (see run.log)" >> "$OUT/results.md"
  fi
}

if [ "$MODE" = gpu ]; then
  while read -r name planned limit; do run_check "$name" "$limit"; done <<< "$PLAN"
else
  # The miniature: all five checks in one process (four start-ups saved), one timeout for them all.
  echo "=== clip gradcache qlora multivector distributed (CPU miniature)"
  timeout --kill-after=10 300 $PY "$HERE/checks.py" clip gradcache qlora multivector distributed --cpu \
    || echo "- **miniature: exit $?** (see run.log)" >> "$OUT/results.md"
fi
echo "- plan: $((SECONDS - START)) s in all ($MODE)" >> "$OUT/results.md"
echo
cat "$OUT/results.md"
