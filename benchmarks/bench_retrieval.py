"""Corpus-scale scoring: the retrieval core's chunked running top-k against the one score matrix the evaluators used
to build (``queries @ corpus.T`` then a stable sort), on random embeddings; dense and MaxSim (late interaction).

    python benchmarks/bench_retrieval.py [--output benchmarks/results/<file>.md]

Each case runs in a fresh subprocess: peak memory of the scoring step above the embeddings themselves (peak RSS
after scoring minus RSS before it), and wall time. Both must give the same rankings: a digest of every query's top 100
is compared, and a case where one run failed says "not compared", never "yes".
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from datetime import date
from pathlib import Path

CASES = [  # (name, scorer, queries, documents, query tokens, document tokens, dim)
    ("dense 2,000 x 200,000 (64-d)", "dense", 2000, 200_000, 1, 1, 64),
    ("dense 5,000 x 200,000 (64-d)", "dense", 5000, 200_000, 1, 1, 64),
    ("MaxSim 100 x 20,000 (8 x 32 tokens, 32-d)", "maxsim", 100, 20_000, 8, 32, 32),
    ("MaxSim 1,000 x 20,000 (8 x 32 tokens, 32-d)", "maxsim", 1000, 20_000, 8, 32, 32),
]

CHILD = r"""
import hashlib, json, resource, sys, time
import torch
name, scorer, nq, nc, tq, td, dim, mode = json.loads(sys.argv[1])
torch.manual_seed(0)
torch.set_num_threads(2)
from hf_mm_rerank.retrieval.core import DENSE, MAXSIM, TokenEmbeddings, maxsim, top_k
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
if scorer == "dense":
    q = torch.nn.functional.normalize(torch.randn(nq, dim), dim=-1)
    c = torch.nn.functional.normalize(torch.randn(nc, dim), dim=-1)
else:
    q = TokenEmbeddings(torch.nn.functional.normalize(torch.randn(nq, tq, dim), dim=-1), torch.ones(nq, tq, dtype=torch.bool))
    c = TokenEmbeddings(torch.nn.functional.normalize(torch.randn(nc, td, dim), dim=-1), torch.ones(nc, td, dtype=torch.bool))
before = rss()
start = time.perf_counter()
if mode == "one matrix":
    scores = q @ c.T if scorer == "dense" else maxsim(q.embeddings, q.mask, c.embeddings, c.mask)
    best = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :100]
else:
    best = top_k(DENSE if scorer == "dense" else MAXSIM, q, c, 100)[1]
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
digest = hashlib.sha256(best.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()
print(json.dumps({"seconds": seconds, "peak_above_embeddings": max(0, peak - before), "queries": int(best.shape[0]),
                  "digest": digest}))
"""


def run(case: tuple, mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps([*case, mode])], capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1][:120]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=None)
    options = parser.parse_args()
    import torch

    rows = []
    for case in CASES:
        chunked, whole = run(case, "chunked"), run(case, "one matrix")
        if "error" in whole or "error" in chunked:
            same = "not compared"
        else:
            same = "yes" if (chunked["queries"], chunked["digest"]) == (whole["queries"], whole["digest"]) else "NO"
            same += f" ({chunked['queries']:,} queries)"
        rows.append((case[0], whole, chunked, same))
        print(case[0], whole, chunked, flush=True)

    def cell(result: dict) -> tuple[str, str]:
        if "error" in result:
            return f"failed ({result['error']})", "-"
        return f"{result['peak_above_embeddings'] / 2**20:,.0f} MB", f"{result['seconds']:.2f} s"

    lines = [f"# Corpus-scale scoring: chunked running top-k vs one score matrix ({date.today()})", "",
             "Command: `python benchmarks/bench_retrieval.py` (2 torch threads, random L2-normalised embeddings, top 100; "
             f"{platform.machine()}, torch {torch.__version__}). Memory: the scoring step's peak RSS above the embeddings "
             "themselves; each case in a fresh process. \"same top 100\": the top-100 lists of every query are equal (a digest of "
             "all of them); \"not compared\" where one run failed.", "",
             "| case | one matrix: memory | one matrix: time | chunked: memory | chunked: time | memory ratio | same top 100 |",
             "|---|---|---|---|---|---|---|"]
    for name, whole, chunked, same in rows:
        (wm, wt), (cm, ct) = cell(whole), cell(chunked)
        ratio = "-" if "error" in whole or "error" in chunked or not whole["peak_above_embeddings"] else \
            f"{chunked['peak_above_embeddings'] / whole['peak_above_embeddings']:.1%}"
        lines.append(f"| {name} | {wm} | {wt} | {cm} | {ct} | {ratio} | {same} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if options.output:
        Path(options.output).write_text(text)


if __name__ == "__main__":
    main()
