"""Cross-rank negatives: with 2 CPU processes (gloo), the gathered loss equals the single-process loss."""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel_close

from hf_mm_rerank import ContrastiveLoss


def _data():
    g = torch.Generator().manual_seed(0)
    return tuple(F.normalize(torch.randn(6, 8, generator=g), dim=-1) for _ in range(3))


def test_gathered_loss_matches_the_global_batch(tmp_path):
    # Fresh processes (not fork): forking after torch started its thread pool can deadlock.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    worker = os.path.join(os.path.dirname(__file__), "ddp_worker.py")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29533", worker, str(tmp_path)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    q, p, n = _data()
    q = q.clone().requires_grad_()
    full = ContrastiveLoss(temperature=0.1, symmetric=True, gather_across_devices=False).objective(q, p, n)
    assert results[0]["loss"] == pytest.approx(full.item(), rel=1e-5)
    # Each rank sees the other rank's documents as negatives and the queries of both (symmetric term):
    # its query gradient is the global one, times 2 from averaging over the ranks.
    full.backward()
    assert_rel_close(torch.cat([results[0]["grad"], results[1]["grad"]]) / 2, q.grad)
