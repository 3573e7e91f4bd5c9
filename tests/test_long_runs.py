"""Long runs that survive a kill: SIGKILL after a checkpoint, then ``resume_from_checkpoint=True``, ends on the
same trainable weights as a run never interrupted, at the library's defaults (persistent DataLoader workers,
LoRA dropout, a learnable temperature)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("resume_worker.py")


def _run(kind: str, model: str, out: Path, kill_at: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(WORKER), kind, model, str(out), str(kill_at)], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(("kind", "family", "kill_at"), [
    ("bi_encoder", "clip", 4),  # killed at an epoch boundary (4 steps per epoch)
    ("grad_cache", "clip", 6),  # killed mid-epoch
    ("reranker", "qwen2_vl", 6),
])
def test_sigkill_and_resume_equals_a_straight_run(tiny_path, tmp_path, kind, family, kill_at):
    model = tiny_path(family)
    straight = _run(kind, model, tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr[-3000:]
    killed = _run(kind, model, tmp_path / "resumed", kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (tmp_path / "resumed" / "final.pt").exists()
    resumed = _run(kind, model, tmp_path / "resumed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from checkpoint-{kill_at}" in resumed.stdout  # it did resume, from the checkpoint the kill left
    a = torch.load(tmp_path / "straight" / "final.pt")
    b = torch.load(tmp_path / "resumed" / "final.pt")
    assert a.keys() == b.keys() and len(a) > 2
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=0), (name, (a[name] - b[name]).abs().max())
