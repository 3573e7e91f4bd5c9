"""Training throughput in every log: rows, images and text tokens per second, and peak memory."""

from __future__ import annotations

import time
from typing import Any

from transformers import TrainerCallback


def batch_counts(batch: dict[str, Any]) -> dict[str, int]:
    """Rows, images and text tokens in one collated batch (bi-encoder or reranker)."""
    counts = {"samples": 0, "images": 0, "tokens": 0}
    if "pairs" in batch:  # reranker: rows are queries (groups of 1 + k pairs)
        counts["samples"] = int(batch["targets"].numel()) // max(1, int(batch.get("group_size") or 1))
    for key, chunks in batch.items():
        if not isinstance(chunks, list):
            continue
        for chunk in chunks:
            if key == "query":
                counts["samples"] += int(chunk["size"]) if "size" in chunk else int(chunk["input_ids"].shape[0])
            _count_chunk(chunk, counts)
    return counts


def _count_chunk(chunk: dict[str, Any], counts: dict[str, int]) -> None:
    if "image_index" in chunk:
        counts["images"] += int(chunk["image_index"].numel())
    if "image_grid_thw" in chunk:
        counts["images"] += int(chunk["image_grid_thw"].shape[0])
    text = chunk.get("text", chunk)
    if isinstance(text, dict) and "attention_mask" in text:
        counts["tokens"] += int(text["attention_mask"].sum())


class ThroughputCallback(TrainerCallback):
    """Adds training throughput to every log: ``samples_per_second``, ``images_per_second``,
    ``tokens_per_second`` (rows, images and text tokens the trainer consumed since the last log, across all
    processes' share counted on this one and scaled by the world size) and ``peak_memory_gb`` (peak accelerator
    memory, or the process's peak RSS on CPU).

    The hf_mm_rerank trainers count the inputs and place this callback first, so console, TensorBoard and
    W&B (``report_to``) all receive the figures. On by default in the recipes.
    """

    def __init__(self) -> None:
        self.trainer: Any = None
        self._since: float | None = None

    def attach(self, trainer: Any) -> None:
        self.trainer = trainer

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._since = time.perf_counter()
        if self.trainer is not None:
            self.trainer.input_counts.clear()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if logs is None or self._since is None or "loss" not in logs or self.trainer is None:
            return
        now = time.perf_counter()
        elapsed, self._since = max(now - self._since, 1e-9), now
        counts = self.trainer.input_counts
        world = max(1, args.world_size)
        added = {f"{name}_per_second": round(counts.get(name, 0) * world / elapsed, 2)
                 for name in ("samples", "images", "tokens")}
        added["peak_memory_gb"] = round(_peak_memory_bytes() / 2**30, 3)
        counts.clear()
        logs.update(added)  # the reporters called after this callback receive the same dict
        if state.log_history and state.log_history[-1].get("loss") == logs["loss"]:
            state.log_history[-1].update(added)


def _peak_memory_bytes() -> int:
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux


class PipelinePolicy(TrainerCallback):
    """Gives the training step every CPU core once the first steps show that it, not the input pipeline, is the
    bottleneck. The trainers add it when they picked DataLoader workers and torch threads themselves on a CPU
    (explicit settings are never touched): workers decode while the step runs with ``cores - workers`` threads. Over
    steps 2 to ``2 + window`` it measures how long each step waited for its batch; below ``max_wait`` of the step time
    the workers keep up with fewer cores than they hold, so the step takes them all (compute-bound runs: GradCache,
    chat VLMs); otherwise the split stays (decoding-bound runs). The choice is logged once, with its reason."""

    def __init__(self, threads: tuple[int, int], window: int = 5, max_wait: float = 0.1) -> None:
        self.all, self.beside = threads
        self.window, self.max_wait = window, max_wait
        self.waited: list[float] = []
        self.worked: list[float] = []
        self._end: float | None = None
        self._begin = 0.0
        self.decision: str | None = None

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._begin = time.perf_counter()
        if self._end is not None and self.decision is None and state.global_step >= 1:
            self.waited.append(self._begin - self._end)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._end = time.perf_counter()
        if self.decision is not None or state.global_step < 2:
            return
        self.worked.append(self._end - self._begin)
        if len(self.waited) >= self.window:
            self.decide()

    def decide(self) -> str:
        import logging

        import torch

        waited, worked = sum(self.waited[-self.window:]), sum(self.worked[-self.window:])
        share = waited / max(1e-9, waited + worked)
        if share < self.max_wait:
            torch.set_num_threads(self.all)
            self.decision = (f"compute-bound: batches waited {share:.0%} of the step time, so the step now uses all "
                             f"{self.all} threads (the workers keep up on what is left)")
        else:
            self.decision = (f"decoding-bound: batches waited {share:.0%} of the step time, so the step keeps "
                             f"{self.beside} thread(s) beside the DataLoader workers")
        logging.getLogger(__name__).info("hf_mm_rerank: %s.", self.decision)
        return self.decision
