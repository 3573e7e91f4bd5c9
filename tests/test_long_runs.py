"""Long runs that survive a kill: SIGKILL after a checkpoint, then ``resume_from_checkpoint=True``, ends on the
same trainable weights as a run never interrupted, at the library's defaults (persistent DataLoader workers,
LoRA dropout, a learnable temperature)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_all_rel_close

WORKER = Path(__file__).with_name("resume_worker.py")


def _run(kind: str, model: str, out: Path, kill_at: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(WORKER), kind, model, str(out), str(kill_at)], env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(("kind", "family", "kill_at"), [
    ("bi_encoder", "clip", 4),  # killed at an epoch boundary (4 steps per epoch)
    ("grad_cache", "clip", 6),  # killed mid-epoch
    ("reranker", "qwen2_vl", 6),
    ("stream", "clip", 6),  # a streamed training set, killed in its second pass
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
    assert_all_rel_close(b, a)


# ----- checkpoints that appear only when complete ---------------------------------------------------------
def _clip_trainer(path, output_dir, evaluator=None, **overrides):
    from datasets import Dataset
    from helpers import args
    from images import color_rows
    from peft import LoraConfig

    from hf_mm_rerank import BiEncoder, BiEncoderTrainer

    torch.manual_seed(0)
    model = BiEncoder.from_pretrained(path, lora_config=LoraConfig(r=4))
    settings = dict(output_dir=str(output_dir), max_steps=4, save_strategy="steps", save_steps=2,
                    per_device_train_batch_size=4)
    settings.update(overrides)
    return BiEncoderTrainer(model=model, args=args(output_dir, **settings),
                            train_dataset=Dataset.from_list(color_rows(repeat=2)), evaluator=evaluator)


def _steps_run(trainer) -> list[int]:
    """Train with resume_from_checkpoint=True; the steps this run did."""
    from transformers import TrainerCallback

    steps = []

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            steps.append(state.global_step)

    trainer.add_callback(Record())
    trainer.train(resume_from_checkpoint=True)
    return steps


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _check_failed_save_left_nothing(out: Path, error: Exception, tiny) -> None:
    from transformers.trainer_utils import get_last_checkpoint

    message = str(error)
    assert str(out / "checkpoint-4") in message and "full" in message and "resume_from_checkpoint=True" in message
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("checkpoint", "_partial"))) == ["checkpoint-2"]
    assert get_last_checkpoint(str(out)).endswith("checkpoint-2")
    # Space freed (here: the next run saves nothing), the run resumes from the last complete checkpoint.
    resumed = _clip_trainer(tiny, out, save_strategy="no")
    assert _steps_run(resumed) == [3, 4]


def test_a_full_disk_mid_checkpoint_leaves_no_partial_checkpoint(tiny_path, tmp_path, monkeypatch):
    # The write that fails: optimizer.pt of checkpoint-4 (after the model files), half written, then ENOSPC.
    from hf_mm_rerank.checkpoints import CheckpointWriteError

    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if str(f).endswith(os.path.join("checkpoint-4", "optimizer.pt")):
            Path(f).write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "out"
    with pytest.raises(CheckpointWriteError) as caught:
        _clip_trainer(tiny_path("clip"), out).train()
    monkeypatch.setattr(torch, "save", real_save)
    _check_failed_save_left_nothing(out, caught.value, tiny_path("clip"))


def _mount_tmpfs(folder: Path, size: int) -> bool:
    if os.geteuid() != 0:
        return False
    folder.mkdir(parents=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode == 0


def test_a_real_full_disk_mid_checkpoint(tiny_path, tmp_path):
    from hf_mm_rerank.checkpoints import CheckpointWriteError

    probe = _clip_trainer(tiny_path("clip"), tmp_path / "probe", max_steps=2)
    probe.train()
    size = _folder_bytes(tmp_path / "probe" / "checkpoint-2")
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, size * 3 // 2 + 65536):
        pytest.skip("needs root and tmpfs mounts (the patched-write test above covers the same path)")
    try:
        out = disk / "out"
        with pytest.raises(CheckpointWriteError) as caught:
            _clip_trainer(tiny_path("clip"), out).train()
        assert caught.value.errno == errno.ENOSPC
        _check_failed_save_left_nothing(out, caught.value, tiny_path("clip"))
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=False)  # lazy: a file still open must not keep it


def test_a_save_killed_midway_is_never_resumed_and_is_cleaned_up(tiny_path, tmp_path):
    from transformers.trainer_utils import get_last_checkpoint

    out = tmp_path / "out"
    _clip_trainer(tiny_path("clip"), out, max_steps=2).train()
    leftover = out / "_partial-checkpoint-4" / "checkpoint-4"  # what a kill during the next save leaves
    leftover.mkdir(parents=True)
    (leftover / "adapter_model.safetensors").write_bytes(b"\0" * 100)
    assert get_last_checkpoint(str(out)).endswith("checkpoint-2")
    assert _steps_run(_clip_trainer(tiny_path("clip"), out, max_steps=6)) == [3, 4, 5, 6]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("checkpoint", "_partial"))) == \
        ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert (out / "checkpoint-4" / "trainer_state.json").is_file()


def test_rotation_and_best_checkpoint_see_only_renamed_folders(tiny_path, tmp_path, color_evaluator):
    import json

    out = tmp_path / "out"
    trainer = _clip_trainer(tiny_path("clip"), out, evaluator=color_evaluator, max_steps=4, save_steps=1,
                            save_total_limit=2, eval_strategy="steps", eval_steps=1, load_best_model_at_end=True,
                            metric_for_best_model="ndcg@10")
    trainer.train()
    kept = sorted(p.name for p in out.iterdir() if p.name.startswith(("checkpoint", "_partial")))
    best = trainer.state.best_model_checkpoint
    assert "_partial" not in best and os.path.isdir(best) and os.path.basename(best) in kept
    assert len(kept) <= 2 + 1 and "checkpoint-4" in kept  # the limit (plus the best), the newest always kept
    recorded = json.loads((Path(best) / "trainer_state.json").read_text())["best_model_checkpoint"]
    assert recorded == best  # the state written inside names the renamed folder, not the staging one
