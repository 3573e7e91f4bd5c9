"""Run by test_distributed.py under torch.distributed.run (2 CPU processes, gloo)."""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from test_distributed import _data  # noqa: E402

from hf_mm_rerank import ContrastiveLoss  # noqa: E402

dist.init_process_group("gloo")
rank = dist.get_rank()
q, p, n = _data()
part = slice(3 * rank, 3 * rank + 3)
local_q = q[part].clone().requires_grad_()
loss = ContrastiveLoss(temperature=0.1, symmetric=True).objective(local_q, p[part], n[part])
loss.backward()
total = loss.detach().clone()
dist.all_reduce(total)
torch.save({"loss": (total / 2).item(), "grad": local_q.grad}, os.path.join(sys.argv[1], f"{rank}.pt"))
dist.destroy_process_group()
