"""Input pipeline defaults and throughput logging; training and inference see the same pixels."""

import io
import logging
import os

import pytest
import torch
from datasets import Dataset
from datasets import Image as ImageFeature
from helpers import RecordThreads, args, assert_rel_close
from images import COLORS, color_rows, solid
from PIL import Image

from hf_mm_rerank import BiEncoder, BiEncoderCollator, BiEncoderTrainer, CrossEncoder, CrossEncoderCollator
from hf_mm_rerank.training.arguments import auto_num_workers
from hf_mm_rerank.training.throughput import PipelinePolicy, ThroughputCallback, batch_counts


def test_batch_counts_rows_images_and_tokens(tiny_path):
    clip = BiEncoder.from_pretrained(tiny_path("clip"))
    rows = [{"query": "ab", "positive": solid("red"), "negative": "xyz"}, {"query": "c", "positive": "d",
                                                                          "negative": solid("blue")}]
    counts = batch_counts(BiEncoderCollator(clip, mini_batch_size=1)(rows))
    # tokens: "ab", "c", "d", "xyz" with CLIP's start/end tokens: 4 + 3 + 3 + 5
    assert counts == {"samples": 2, "images": 2, "tokens": 15}
    rr = CrossEncoder.from_pretrained(tiny_path("qwen2_vl"), head="yes_no")
    batch = CrossEncoderCollator(rr)([{"query": "q", "positive": solid("red"), "negative_1": "n"}] * 3)
    counts = batch_counts(batch)
    assert counts["samples"] == 3 and counts["images"] == 3
    assert counts["tokens"] == int(batch["pairs"][0]["attention_mask"].sum())


def test_throughput_is_logged_first_for_every_reporter(tiny_path, tmp_path, monkeypatch):
    import hf_mm_rerank.training.throughput as throughput

    model = BiEncoder.from_pretrained(tiny_path("clip"))
    callback = ThroughputCallback()
    rows = color_rows(2)  # 16 rows: each log (every 2 steps of 8 rows) covers one epoch, every row once
    trainer = BiEncoderTrainer(model=model, args=args(tmp_path, max_steps=4, logging_steps=2),
                               train_dataset=Dataset.from_list(rows), callbacks=[callback])
    assert trainer.callback_handler.callbacks[0] is callback
    # The callback's clock reads 0.25 s per finished step, so each log spans exactly 0.5 s and its rates follow
    # from the rows, images and tokens the trainer consumed.
    clock = type("Clock", (), {"perf_counter": staticmethod(lambda: 0.25 * trainer.state.global_step)})
    monkeypatch.setattr(throughput, "time", clock)
    trainer.train()
    assert trainer.state.global_step == 4
    logged = [row for row in trainer.state.log_history if "loss" in row]
    assert len(logged) == 2
    epoch = batch_counts(BiEncoderCollator(model)(rows))  # attention-mask tokens do not depend on the batching
    assert epoch["samples"] == 16 and epoch["images"] == 32  # one image positive and one image negative per row
    for row in logged:
        assert row["samples_per_second"] == 16 / 0.5
        assert row["images_per_second"] == 32 / 0.5
        assert row["tokens_per_second"] == round(epoch["tokens"] / 0.5, 2)
        assert row["peak_memory_gb"] > 0


def test_workers_are_chosen_from_the_cpu_count_when_left_at_zero(tiny_path, tmp_path, monkeypatch, caplog,
                                                                   keep_threads):
    monkeypatch.delenv("HF_MM_RERANK_AUTO_WORKERS")
    torch.set_num_threads(os.cpu_count())
    model = BiEncoder.from_pretrained(tiny_path("clip"))
    with caplog.at_level(logging.INFO, logger="hf_mm_rerank.training.arguments"):
        trainer = BiEncoderTrainer(model=model, args=args(tmp_path, max_steps=2),
                                   train_dataset=Dataset.from_list(color_rows(2)))
    workers = trainer.args.dataloader_num_workers
    assert workers == auto_num_workers() >= 1 and trainer.args.dataloader_persistent_workers
    assert caplog.text.count("persistent DataLoader workers") == 1
    assert torch.get_num_threads() == os.cpu_count()  # the constructor leaves the process's threads alone
    record = RecordThreads()
    trainer.add_callback(record)
    trainer.train()  # the collator runs in the worker processes
    assert trainer.state.global_step == 2
    # CPU training leaves the workers their cores, and the process gets its own thread count back after it
    assert record.seen == [max(1, len(os.sched_getaffinity(0)) - workers)] * 2
    assert torch.get_num_threads() == os.cpu_count()
    assert any(isinstance(cb, PipelinePolicy) for cb in trainer.callback_handler.callbacks)  # measuring the split
    chosen = BiEncoderTrainer(model=model, args=args(tmp_path, dataloader_num_workers=3),
                              train_dataset=Dataset.from_list(color_rows(1)))
    assert chosen.args.dataloader_num_workers == 3  # a user's choice is kept


def test_the_pipeline_policy_tries_both_thread_counts_and_keeps_the_faster(monkeypatch):
    """It starts where the inputs point (all threads for a compute-bound step, else the split), times 2 steps with
    each setting and keeps the faster. Not timed: the warm-up steps (the workers' start, their prefetched batches,
    here 30 s and 0.01 s) and the first step after the switch (a new thread pool: 20 s). A short run keeps the start."""
    from types import SimpleNamespace

    import hf_mm_rerank.training.throughput as throughput

    clock = [0.0]
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: clock[0])
    chosen = []
    monkeypatch.setattr(torch, "set_num_threads", chosen.append)
    for reason, faster, expected in ((None, 8, [3, 8, 8]), (None, 3, [3, 8, 3]), ("GradCache", 8, [8, 3, 8]),
                                     ("GradCache", 3, [8, 3, 3])):
        chosen.clear()
        policy = PipelinePolicy((8, 3), window=2, compute_bound=reason, warmup=3, min_steps=10, margin=0.1)
        assert chosen == []  # nothing set before training starts
        policy.on_train_begin(None, SimpleNamespace(max_steps=100), None)
        assert chosen == expected[:1]  # before the first step
        for step in range(12):
            switched = step == 5
            seconds = 30.0 if step == 0 else 0.01 if step < 3 else 20.0 if switched else (
                1.0 if chosen[-1] == faster else 1.5)
            clock[0] += seconds
            policy.on_step_end(None, SimpleNamespace(global_step=step + 1), None)
            if step < 7:
                assert policy.decision is None, step  # 3 warm-up steps, 2 timed, the switch, 2 timed
        assert chosen == expected, (reason, faster)
        assert policy.decision.startswith(f"{faster} thread(s) for the step: 1.000 s per step against 1.500 s")
        policy.on_train_end(None, None, None)
        assert chosen[-1] == torch.get_num_threads()  # the process's own count, restored
    chosen.clear()
    short = PipelinePolicy((8, 3), window=2, compute_bound="GradCache", min_steps=50)
    short.on_train_begin(None, SimpleNamespace(max_steps=40), None)
    for step in range(40):
        clock[0] += 1.0
        short.on_step_end(None, SimpleNamespace(global_step=step + 1), None)
    assert chosen == [8] and "a run of 40 steps is too short" in short.decision


def test_the_inputs_choose_the_start(tiny_path):
    from hf_mm_rerank import CachedContrastiveLoss, ContrastiveLoss, CrossEncoder
    from hf_mm_rerank.training.trainers import _compute_bound

    clip, qwen = BiEncoder.from_pretrained(tiny_path("clip")), BiEncoder.from_pretrained(tiny_path("qwen2_vl"))
    assert _compute_bound(clip, ContrastiveLoss()) is None  # a dual encoder beside JPEG decoding
    assert "GradCache" in _compute_bound(clip, CachedContrastiveLoss(mini_batch_size=4))
    assert _compute_bound(qwen, ContrastiveLoss()) is None  # a chat VLM's processor work is measured, not guessed
    assert _compute_bound(CrossEncoder.from_pretrained(tiny_path("qwen2_vl"), head="yes_no"), None) is None


def _jpeg(color: str, size=(640, 480)) -> bytes:
    buffer = io.BytesIO()
    gradient = Image.linear_gradient("L").resize(size)
    Image.merge("RGB", [gradient, Image.new("L", size, COLORS[color][1]), gradient.transpose(Image.FLIP_LEFT_RIGHT)]
                ).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize("fast_decode", [False, True])
def test_training_and_inference_see_the_same_pixels(tiny_path, fast_decode):
    """A 640x480 JPEG goes through decoding (with fast_decode: at reduced scale, then shrunk) and resizing in the
    collator; encode() must match."""
    for family in ("clip", "qwen2_vl"):
        model = BiEncoder.from_pretrained(tiny_path(family), fast_decode=fast_decode)
        data = Dataset.from_dict({"query": ["q"], "positive": [{"bytes": _jpeg("red"), "path": None}]}).cast_column(
            "positive", ImageFeature())
        batch = BiEncoderCollator(model)([data[0]])
        direct = model.featurizer([model.featurizer.read(data[0]["positive"])], "document")
        key = "image" if family == "clip" else None
        trained = batch["positive"][0][key]["pixel_values"] if key else batch["positive"][0]["pixel_values"]
        inferred = direct[key]["pixel_values"] if key else direct["pixel_values"]
        torch.testing.assert_close(trained, inferred, atol=0, rtol=0)
        assert_rel_close(model.encode([data[0]["positive"]], side="document"), model(batch["positive"]).detach())


def _compiled_losses(tiny_path, tmp_path, **compile_args):
    from helpers import losses

    model = BiEncoder.from_pretrained(tiny_path("clip"))
    trainer = BiEncoderTrainer(model=model, args=args(tmp_path, max_steps=4, **compile_args),
                               train_dataset=Dataset.from_list(color_rows(2)))
    trainer.train()
    return trainer, losses(trainer)


def test_torch_compile_trains_like_eager(tiny_path, tmp_path):
    """TrainingArguments(torch_compile=True) traces our model through dynamo (backend 'eager' keeps the test
    fast; the inductor backend runs in the slow test below) and trains to the same losses."""
    _, plain = _compiled_losses(tiny_path, tmp_path / "plain")
    trainer, compiled = _compiled_losses(tiny_path, tmp_path / "compiled", torch_compile=True,
                                         torch_compile_backend="eager")
    assert type(trainer.model_wrapped).__name__ == "OptimizedModule"
    assert compiled == pytest.approx(plain, rel=1e-5)


@pytest.mark.slow
def test_torch_compile_with_inductor(tiny_path, tmp_path):
    _, plain = _compiled_losses(tiny_path, tmp_path / "plain")
    _, compiled = _compiled_losses(tiny_path, tmp_path / "compiled", torch_compile=True)
    assert compiled == pytest.approx(plain, rel=1e-4)
