"""The trainers' fix-ups of a plain ``transformers.TrainingArguments``: launch checks, DataLoader workers from the
CPU count, and a pickled form (``training_args.bin``) without tokens."""

from __future__ import annotations

import copy
import copyreg
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
from transformers import TrainingArguments

from ..distributed import check_launch

logger = logging.getLogger(__name__)


def _cpus_per_rank() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def auto_num_workers() -> int:
    """DataLoader workers per process: the CPUs this process may use, shared by the local ranks, minus one for
    the training step (at least 1, at most 16)."""
    return max(1, min(16, _cpus_per_rank() - 1))


_SECRET_NAME = re.compile(r"(?:^|_)(?:token|secret|password|passwd|api_?key|credentials?)$", re.IGNORECASE)
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{20,}")


def _secret(name: str, value: Any) -> bool:
    """A string field named like a secret (``hub_token``; not ``include_num_input_tokens_seen``, a setting), or a
    string shaped like a Hugging Face token in any field."""
    return isinstance(value, str) and bool(_SECRET_NAME.search(name) or _HF_TOKEN.search(value))


class _TrainingArgumentsWithoutSecrets(TrainingArguments):
    """The user's TrainingArguments, pickled without its tokens.

    Trainer writes ``training_args.bin`` (``torch.save(self.args)``) into every checkpoint and into the folder it
    pushes to the Hub: with ``hub_token`` set, the plaintext token would be uploaded. Pickled, this class leaves out
    every ``*_token`` field and loads back as a plain ``TrainingArguments``; in memory (copies included) it holds what
    the user's object holds, token and all. The trainers make one from a copy (:func:`own_copy`), never from the
    user's object itself. Left out: string fields named like a secret (``hub_token``, ``*_api_key``,
    ``*_password``, ...) and any string that looks like a Hugging Face token (``hf_...``), whatever its field.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        state = {k: None if _secret(k, v) else v for k, v in self.__dict__.items()}
        # copyreg's reconstructor: the file names only the standard library and TrainingArguments.
        return copyreg._reconstructor, (TrainingArguments, object, None), state

    def __copy__(self) -> _TrainingArgumentsWithoutSecrets:
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        return clone

    def __deepcopy__(self, memo: dict[int, Any]) -> _TrainingArgumentsWithoutSecrets:
        clone = object.__new__(type(self))
        memo[id(self)] = clone
        clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return clone


@dataclass
class AutoPipeline:
    """What the fix-ups picked where the user left the default (explicit settings are never touched); kept on the
    trainer (``trainer.auto_pipeline``), never written into the user's arguments.

    Attributes:
        workers: ``dataloader_num_workers`` was 0 and the trainer picked it from the CPU count.
        threads: ``(all, beside the workers)``: the torch thread counts :class:`~hf_mm_rerank.training.throughput.PipelinePolicy`
            chooses between while training on a CPU (applied when training starts, restored when it ends), or None.
    """

    workers: bool = False
    threads: tuple[int, int] | None = None

    def refit_threads(self, args: TrainingArguments) -> None:
        """After the trainers lowered the workers they picked (a stream with few shards): the threads beside them."""
        if self.threads is not None:
            every = self.threads[0]
            self.threads = (every, max(1, min(every, _cpus_per_rank() - args.dataloader_num_workers)))


def own_copy(args: TrainingArguments) -> TrainingArguments:
    """A shallow copy of the user's arguments for the trainer to change (the user's object stays as it was): a plain
    ``TrainingArguments`` becomes a :class:`_TrainingArgumentsWithoutSecrets` (pickled without tokens); a subclass of
    the user's own keeps its type (its pickling is theirs). Nested objects are shared: copy one before changing it."""
    if type(args) is TrainingArguments:
        clone = object.__new__(_TrainingArgumentsWithoutSecrets)
        clone.__dict__.update(args.__dict__)
        return clone
    return copy.copy(args)


def fix_training_arguments(args: TrainingArguments | None) -> tuple[TrainingArguments, AutoPipeline]:
    """What the trainers change in (a copy of) the user's plain ``TrainingArguments`` (each change said once in the
    log): launch checks, no token in pickled copies, raw columns kept, DataLoader workers picked from the CPU count.

    Returns the copy and what was picked for the user (:class:`AutoPipeline`); the user's object is left unchanged.
    """
    args = own_copy(args) if args is not None else own_copy(TrainingArguments(output_dir="hf_mm_rerank_output"))
    auto = AutoPipeline()
    check_launch(args)
    say = logger.info if args.process_index == 0 else logger.debug  # each change said once, by the main process
    if args.remove_unused_columns:
        # The default would drop our query/positive/negative columns (the model's forward does not name them).
        say("hf_mm_rerank: setting remove_unused_columns=False (the collator reads the raw columns).")
        args.remove_unused_columns = False
    if args.ddp_find_unused_parameters is None:
        # Every backward includes all trainable parameters (distributed.all_parameters_term), so DDP need not search
        # the graph for unused ones each step (and warn from every rank that it found none).
        args.ddp_find_unused_parameters = False
    if args.dataloader_pin_memory and args.device.type == "cpu":
        args.dataloader_pin_memory = False  # pinned memory only helps copies to an accelerator (torch warns on CPU)
    if args.dataloader_num_workers == 0 and os.environ.get("HF_MM_RERANK_AUTO_WORKERS", "1") != "0":
        # Image decoding and processing belong in DataLoader workers, beside the training step.
        args.dataloader_num_workers = auto_num_workers()
        args.dataloader_persistent_workers = True
        auto.workers = True
        say("hf_mm_rerank: dataloader_num_workers was 0; persistent DataLoader workers from the CPU count: %d (set "
            "HF_MM_RERANK_AUTO_WORKERS=0 to keep loading in the training process).", args.dataloader_num_workers)
        if args.device.type == "cpu":
            # Training on the CPU: leave the workers' cores to them (oversubscription halved throughput when decoding
            # is the bottleneck); PipelinePolicy measures the first steps and gives the step every core when it is not.
            # The thread count is set only while training (the process's setting is restored after it).
            threads = max(1, _cpus_per_rank() - args.dataloader_num_workers)
            if torch.get_num_threads() > threads:
                auto.threads = (torch.get_num_threads(), threads)
    return args, auto
