"""Assembles benchmarks/results/<date>-gpu-<kind>.md from a GPU plan's $OUT (env.json and the check JSONs).

    python benchmarks/gpu/report.py OUT_DIR [--kind h200] [--output FILE]

``--kind`` defaults to the device name's last word in lower case (``NVIDIA H200`` -> ``h200``; ``cpu`` for the
miniature).
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHECKS = ("clip", "gradcache", "qlora", "multivector", "distributed")
SHOWN = ("samples_per_second", "peak_memory_mb", "losses", "wrapped_type", "wrapped_ok", "zero_stage", "fsdp_modules",
         "error")


def cell(value) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.3g}"
    if isinstance(value, list):
        return ", ".join(cell(v) for v in value)
    if isinstance(value, dict):
        return "; ".join(f"{k} {cell(v)}" for k, v in value.items())
    return "" if value is None else str(value).replace("|", "/")


def render(out: Path) -> tuple[str, str]:
    env = json.loads((out / "env.json").read_text()) if (out / "env.json").is_file() else {}
    device = env.get("device", "unknown device")
    kind = "cpu" if env.get("mode") == "cpu" else device.split()[-1].lower()
    lines = [f"# GPU plan, {device} ({date.today().isoformat()})", "",
             f"- command: `bash benchmarks/gpu/run.sh{' --cpu' if env.get('mode') == 'cpu' else ''}` "
             "(carry: benchmarks/gpu/.wheels)",
             f"- python {env.get('python')}; " + ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items()),
             f"- nvidia-smi: {env.get('nvidia_smi')}", ""]
    for check in CHECKS:
        path = out / f"{check}.json"
        if not path.is_file():
            lines += [f"## {check}: no result (not reached, or its process never started)", ""]
            continue
        data = json.loads(path.read_text())
        lines += [f"## {check}: {data['status']} ({data.get('seconds', '?')} s)", "",
                  "plan: " + cell(data.get("plan", {})), "", "| run | repeat | " + " | ".join(SHOWN) + " |",
                  "|---|---|" + "---|" * len(SHOWN)]
        for run in data["runs"]:
            lines.append(f"| {run.get('name')} | {run.get('repeat', '')} | "
                         + " | ".join(cell(run.get(k)) for k in SHOWN) + " |")
        lines += [""] + [f"- {k}: {cell(v)}" for k, v in data.get("summary", {}).items()]
        lines += [f"- note: {n}" for n in data.get("notes", [])] + [""]
    return kind, "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--kind", default=None)
    parser.add_argument("--output", type=Path, default=None)
    options = parser.parse_args()
    kind, text = render(options.out)
    target = options.output or ROOT / "benchmarks" / "results" / f"{date.today().isoformat()}-gpu-{options.kind or kind}.md"
    target.write_text(text)
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
