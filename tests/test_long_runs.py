"""Long runs that survive a kill: SIGKILL after a checkpoint, then ``resume_from_checkpoint=True``, ends on the
same trainable weights and the same count of rows read (the model card's) as a run never interrupted, with LoRA
dropout and a learnable temperature: each kind with the library's default persistent DataLoader workers (asked for
explicitly: the suite's conftest turns them off), the bi-encoder also with batches built in the training process;
and a run with workers ends where one without does. Then checkpoints that appear only when complete."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_all_rel_close

WORKER = Path(__file__).with_name("resume_worker.py")


def _run(kind: str, model: str, out: Path, loading: str, kill_at: int = 0) -> subprocess.CompletedProcess:
    """One worker run; ``loading`` ("workers" or "main") is passed as an argument and as the variable, not inherited."""
    auto_workers = {"workers": "1", "main": "0"}[loading]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_MM_RERANK_AUTO_WORKERS": auto_workers}
    run = subprocess.run([sys.executable, str(WORKER), kind, model, str(out), str(kill_at), loading], env=env,
                         capture_output=True, text=True, timeout=600)
    if run.returncode == 0 or kill_at:
        assert f"loading: {loading} " in run.stdout, run.stdout[-2000:] + run.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def straight_run(tiny_path, tmp_path_factory):
    """straight_run(kind, family, loading) -> the output folder of an uninterrupted run (each run once per module)."""
    done: dict[tuple[str, str, str], Path] = {}

    def get(kind: str, family: str, loading: str) -> Path:
        if (kind, family, loading) not in done:
            out = tmp_path_factory.mktemp(f"straight-{kind}-{loading}") / "run"
            run = _run(kind, tiny_path(family), out, loading)
            assert run.returncode == 0, run.stderr[-3000:]
            done[kind, family, loading] = out
        return done[kind, family, loading]

    return get


def _facts(out: Path) -> dict:
    return json.loads((out / "facts.json").read_text())


@pytest.mark.parametrize(("kind", "family", "kill_at", "loading"), [
    ("bi_encoder", "clip", 4, "workers"),  # killed at an epoch boundary (4 steps per epoch)
    ("bi_encoder", "clip", 6, "main"),  # no DataLoader workers, killed mid-epoch
    ("grad_cache", "clip", 6, "workers"),  # killed mid-epoch
    ("reranker", "qwen2_vl", 6, "workers"),
    ("stream", "clip", 6, "workers"),  # a streamed training set, killed in its second pass
    ("mixture", "clip", 6, "workers"),  # two datasets mixed, no duplicates: killed mid-epoch, the mixture goes on
])
def test_sigkill_and_resume_equals_a_straight_run(tiny_path, straight_run, tmp_path, kind, family, kill_at, loading):
    model = tiny_path(family)
    straight = straight_run(kind, family, loading)
    killed = _run(kind, model, tmp_path / "resumed", loading, kill_at=kill_at)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (tmp_path / "resumed" / "final.pt").exists()
    resumed = _run(kind, model, tmp_path / "resumed", loading)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from checkpoint-{kill_at}" in resumed.stdout  # it did resume, from the checkpoint the kill left
    a = torch.load(straight / "final.pt")
    b = torch.load(tmp_path / "resumed" / "final.pt")
    assert a.keys() == b.keys() and len(a) > 2
    assert_all_rel_close(b, a, rel=1e-6)  # (one torch thread in every run: OMP_NUM_THREADS=1; measured: identical)
    # The rows read count the checkpoint's rows too (a stream's card says "a stream: 40 rows read"), not only the
    # rows read since the resume.
    assert _facts(tmp_path / "resumed") == _facts(straight)
    assert _facts(straight)["rows_read"] == 10 * 4


def test_training_with_dataloader_workers_equals_training_without(straight_run):
    # Dropout masks come from the training process's global RNG; workers must not change what it draws (each
    # DataLoader has a seeded generator of its own: a new iterator per epoch without persistent workers, one with).
    with_workers = straight_run("bi_encoder", "clip", "workers")
    without = straight_run("bi_encoder", "clip", "main")
    a, b = torch.load(without / "final.pt"), torch.load(with_workers / "final.pt")
    assert a.keys() == b.keys() and len(a) > 2
    assert_all_rel_close(b, a, rel=1e-6)  # (measured: identical)
    assert _facts(with_workers) == _facts(without)


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
    from hf_mm_rerank.training.checkpoints import CheckpointWriteError

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
    from hf_mm_rerank.training.checkpoints import CheckpointWriteError

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
