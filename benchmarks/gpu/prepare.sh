#!/usr/bin/env bash
# Run HERE (needs PyPI): fetches the wheels named in benchmarks/gpu/wheels.txt for the GPU machine (Python 3.12,
# manylinux x86_64) into benchmarks/gpu/.wheels, prints each with its size and the total, and fails when the wheels
# plus the working tree that travels with them pass the device's 64 MiB.
#   bash benchmarks/gpu/prepare.sh          download (skips wheels already there), list, check the size
#   bash benchmarks/gpu/prepare.sh --list   print name==version of each wheel it would fetch, download nothing
# Then, on the device: run bash benchmarks/gpu/run.sh with carry: ["benchmarks/gpu/.wheels"].
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="$ROOT/benchmarks/gpu"
DEST="$HERE/.wheels"
LIMIT=$((64 * 1024 * 1024))
SPECS="$(grep -v '^#' "$HERE/wheels.txt" | awk 'NF')"
if [ "${1:-}" = --list ] || [ "${1:-}" = --dry-run ]; then
  echo "$SPECS" | awk '{print $1}'
  exit 0
fi
PY="${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3)}"
mkdir -p "$DEST"
[ -f "$DEST/.gitignore" ] || echo "*" > "$DEST/.gitignore"  # ignored even before the root .gitignore names it
PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64
          --platform manylinux_2_17_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64)
KEEP=()
while read -r spec how; do
  name="$(echo "${spec%%==*}" | tr 'A-Z-' 'a-z_')"
  version="${spec##*==}"
  found="$(ls "$DEST" | grep -i "^${name}-${version}-" | head -1 || true)"
  if [ -z "$found" ]; then
    if [ "${how:-}" = build ]; then  # no binary on PyPI: build a pure-Python wheel here, without compiled ops
      DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$spec" 2>&1 | grep -v "is ignored" || true
    else
      "$PY" -m pip download -q --no-deps "${PLATFORM[@]}" -d "$DEST" "$spec" 2>&1 | grep -v "is ignored" || true
    fi
    found="$(ls "$DEST" | grep -i "^${name}-${version}-" | head -1 || true)"
    [ -n "$found" ] || { echo "error: could not fetch $spec" >&2; exit 1; }
  fi
  KEEP+=("$found")
done <<< "$SPECS"
# Only the listed wheels stay (two versions of one package stop the whole install there).
for file in "$DEST"/*; do
  base="$(basename "$file")"
  printf '%s\n' "${KEEP[@]}" | grep -qx "$base" || { echo "removing $base (not in wheels.txt)"; rm -f "$file"; }
done
TOTAL=0
for file in "${KEEP[@]}"; do
  size=$(stat -c %s "$DEST/$file")
  TOTAL=$((TOTAL + size))
  printf '%8.2f MB  %s\n' "$(echo "$size / 1000000" | bc -l)" "$file"
done
# What else travels: tracked files and untracked files git does not ignore.
TREE=$(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
printf 'wheels: %d files, %.1f MB (%.1f MiB); working tree %.1f MiB; together %.1f of 64 MiB\n' "${#KEEP[@]}" \
  "$(echo "$TOTAL / 1000000" | bc -l)" "$(echo "$TOTAL / 1048576" | bc -l)" "$(echo "$TREE / 1048576" | bc -l)" \
  "$(echo "($TOTAL + $TREE) / 1048576" | bc -l)"
if [ $((TOTAL + TREE)) -gt $LIMIT ]; then
  echo "error: over the device's 64 MiB: drop a wheel from wheels.txt (deepspeed's five: ZeRO then reports 'not importable')" >&2
  exit 1
fi
