"""Run by test_ddp.py under torch.distributed.run (2 CPU processes, gloo): the scenarios of ddp_scenarios.py.

argv: JSON of tiny model paths, output folder, comma-separated scenario names. Each rank saves its results.
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import ddp_scenarios  # noqa: E402

from hf_mm_rerank.distributed import close_process_group  # noqa: E402

paths, out, names = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3].split(",")
rank = int(os.environ["RANK"])
for name in names:
    result = ddp_scenarios.run(name, paths, out)
    torch.save(result, os.path.join(out, f"{name}-rank{rank}.pt"))
close_process_group()  # without it rank 0 aborted at exit on CI (SIGABRT in gloo's teardown)
