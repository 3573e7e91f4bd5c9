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

    Example:
        >>> trainer = BiEncoderTrainer(model=model, args=TrainingArguments("out", logging_steps=10), train_dataset=ds,
        ...                            callbacks=[ThroughputCallback()])
        >>> trainer.train()   # logs gain samples_per_second, images_per_second, tokens_per_second, peak_memory_gb
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
    """Chooses how many torch threads the training step gets beside DataLoader workers the trainers picked on a CPU
    (explicit settings are never touched), by trying both:

    * it starts from what the inputs suggest: all threads when the step is plainly compute-bound (GradCache encodes
      every batch twice), else ``cores - workers`` (workers decode while the step runs);
    * then it times ``window`` steps with that setting and ``window`` with the other one, each step from the end of
      the previous one (waiting for the batch included), and keeps the faster. Not timed: the first ``warmup`` steps
      (step 0 waits for the workers to start, and the next ones take the batches they prefetched meanwhile,
      ``workers x prefetch_factor``, which would make any setting look fast) and the first step after the switch.
      Step times swing with the workers' queue, so the windows are long (10 steps) and the other setting must be
      ``margin`` (10%) faster to replace the start.

    Measuring beats guessing here: whether decoding or compute dominates, and what oversubscribing the cores costs,
    depends on the model, the images and the machine (a tiny chat VLM at a small pixel budget is faster with the
    split, GradCache with every thread). A run shorter than ``min_steps`` keeps the start: trying the other setting
    costs a few slow steps (and a new thread pool), which only a longer run earns back. The choice is logged once,
    with both timings. The thread count is set when training starts and the process's own is restored when it ends
    (:meth:`restore`: the trainers call it if training stops on an error too)."""

    def __init__(self, threads: tuple[int, int], window: int = 10, compute_bound: str | None = None,
                 main_process: bool = True, warmup: int = 1, min_steps: int = 200, margin: float = 0.1) -> None:
        import logging

        self.all, self.beside = threads
        self.window, self.warmup, self.min_steps, self.margin = window, warmup, min_steps, margin
        self.steps, self._skip = 0, 0
        self.start = compute_bound  # the reason the inputs make the step compute-bound, or None
        self.order = (self.all, self.beside) if compute_bound else (self.beside, self.all)
        self.timings: dict[int, list[float]] = {self.all: [], self.beside: []}
        self._end: float | None = None
        self.decision: str | None = None
        self.say = logging.getLogger(__name__).info if main_process else logging.getLogger(__name__).debug
        self.current = self.order[0]  # what the step gets while training
        self._saved: int | None = None  # the process's own thread count, restored when training ends
        self.say("hf_mm_rerank: the step starts with %s; a run of %d steps or more then times %d with each thread "
                 "count and keeps the faster.", f"all {self.all} threads ({compute_bound})" if compute_bound else
                 f"{self.beside} thread(s) beside the DataLoader workers", min_steps, window)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        import torch

        if self._saved is None:
            self._saved = torch.get_num_threads()
        torch.set_num_threads(self.current)
        if self.decision is None and state.max_steps and state.max_steps < max(self.min_steps,
                                                                               self.warmup + 2 * self.window + 1):
            self.decision = (f"{self.order[0]} thread(s) for the step: a run of {state.max_steps} steps is too short "
                             "to try both")
            self.say("hf_mm_rerank: %s.", self.decision)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        import torch

        now = time.perf_counter()
        self.steps += 1
        if self.decision is None and self.steps > self.warmup:  # the time since the last step ended
            if self._skip:  # the first step after a switch: a new thread pool, a batch made under the old setting
                self._skip -= 1
                self._end = now
                return
            measured = self.order[0] if len(self.timings[self.order[0]]) < self.window else self.order[1]
            self.timings[measured].append(now - self._end)
            if len(self.timings[self.order[1]]) >= self.window:
                self.decide()
            elif len(self.timings[self.order[0]]) == self.window and not self.timings[self.order[1]]:
                self.current = self.order[1]
                torch.set_num_threads(self.current)
                self._skip = 1
        self._end = now

    def decide(self) -> str:
        import torch

        mean = {n: sum(t[-self.window:]) / self.window for n, t in self.timings.items()}
        first, second = self.order
        threads = second if mean[second] < (1 - self.margin) * mean[first] else first  # noise keeps the start
        self.current = threads
        torch.set_num_threads(threads)
        other = self.beside if threads == self.all else self.all
        self.decision = (f"{threads} thread(s) for the step: {mean[threads]:.3f} s per step against {mean[other]:.3f} s "
                         f"with {other}")
        self.say("hf_mm_rerank: %s.", self.decision)
        return self.decision

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.restore()

    def restore(self) -> None:
        """Give the process back the thread count it had when training started (the next start sets ours again)."""
        import torch

        if self._saved is not None:
            torch.set_num_threads(self._saved)
            self._saved = None
