"""A trainer's side of training on several datasets at once (the sampler and the mixture are in
:mod:`hf_mm_rerank.data.sampling`): the named datasets, each one's loss and prompts, and the facts the card shows."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import TrainingArguments
from transformers.trainer_utils import seed_worker

from ..data.collators import SOURCE
from ..data.dedup import with_content_ids
from ..data.sampling import MIXING, MixtureDataset, SourceBatchSampler
from ..data.streams import is_stream
from ..losses.base import TrainerLoss, loss_contract

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Mixing:
    """How a trainer draws its batches (every field optional; the defaults train one dataset as Trainer does).

    Attributes:
        strategy: with several datasets, ``"proportional"`` (default), ``"round_robin"``, ``"temperature"`` or
            ``"weighted"`` (see :mod:`hf_mm_rerank.data.sampling`).
        alpha: the temperature rule's exponent (probability of a dataset proportional to its rows ** alpha).
        weights: ``"weighted"``: each dataset's weight, ``{"photos": 3, "pages": 1}`` (its probability per step).
        no_duplicates: no global batch holds two rows that share a query, a positive or a negative (by content);
            such rows are deferred to a later batch, counted in the logs as ``deferred_rows``.
        prompts: per dataset, its own prompts: ``{"docs": {"query": "Find the page that answers the question."}}``
            for embedders, ``{"docs": {"instruction": ...}}`` for chat rerankers.

    Example:
        >>> trainer = BiEncoderTrainer(model=model, args=args, train_dataset={"photos": photos, "pages": pages},
        ...                            mixing=Mixing(strategy="temperature", alpha=0.5, no_duplicates=True,
        ...                                          prompts={"pages": {"query": "Find the page."}}))
    """

    strategy: str = "proportional"
    alpha: float = 0.5
    no_duplicates: bool = False
    prompts: dict[str, dict[str, str]] = field(default_factory=dict)
    weights: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if self.strategy not in MIXING:
            raise ValueError(f"Mixing(strategy={self.strategy!r}): use one of {MIXING}.")
        if (self.strategy == "weighted") != (self.weights is not None):
            raise ValueError(f"Mixing(strategy={self.strategy!r}, weights={self.weights}): weights go with "
                             "strategy='weighted', and it needs them.")


def named_datasets(train_dataset: Any) -> dict[str, Any] | None:
    """The named datasets of a dict / ``DatasetDict`` ``train_dataset``, or None for one dataset."""
    if isinstance(train_dataset, MixtureDataset):
        return dict(train_dataset.sources)
    if not isinstance(train_dataset, dict):  # (a DatasetDict is a dict)
        return None
    streams = [name for name, dataset in train_dataset.items() if is_stream(dataset)]
    if streams:
        raise ValueError(f"train_dataset[{streams[0]!r}] is a stream; a mixture draws each batch from one dataset by "
                         "index, so its datasets must be map-style. Fix: load them without streaming=True (or train "
                         "on one stream, or on datasets.interleave_datasets of the streams).")
    return dict(train_dataset)


def losses_by_name(loss: Any, names: list[str], default: nn.Module) -> dict[str, nn.Module]:
    """One loss per dataset: a dict names each one's (the others get ``default``), one loss serves them all."""
    if not isinstance(loss, dict):
        return dict.fromkeys(names, loss if loss is not None else default)
    unknown = sorted(set(loss) - set(names))
    if unknown:
        raise ValueError(f"loss: {unknown} name no dataset of train_dataset ({names}). Fix: key the losses by the "
                         "datasets' names.")
    return {name: loss.get(name, default) for name in names}


class SourceLosses(TrainerLoss):
    """Each batch's loss is its dataset's (every batch of a mixture comes from one dataset); a batch of no mixture (an
    evaluation set's) takes the first dataset's loss.

    Example:
        >>> loss = SourceLosses({"photos": CachedContrastiveLoss(mini_batch_size=64),
        ...                      "pages": CachedContrastiveLoss(mini_batch_size=64, temperature=0.02)})
    """

    def __init__(self, losses: dict[str, nn.Module]) -> None:
        super().__init__()
        self.losses = nn.ModuleDict(losses)
        sizes = {name: loss_contract(loss).mini_batch_size for name, loss in losses.items()}
        if len({repr(size) for size in sizes.values()}) > 1:
            raise ValueError(f"loss: the datasets' losses take different GradCache mini-batches ({sizes}); one "
                             "collator builds every batch. Fix: give them the same mini_batch_size.")
        self.mini_batch_size = next(iter(sizes.values()))

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> Any:
        loss = self.losses[batch[SOURCE]] if SOURCE in batch else next(iter(self.losses.values()))
        value = loss(model, batch)
        self.last_masked = loss.last_masked if isinstance(loss, TrainerLoss) else None
        return value


def mixture_of(sources: dict[str, Any], mixing: Mixing) -> MixtureDataset:
    """The prepared datasets as one :class:`MixtureDataset`; with ``no_duplicates``, their content ids hashed once."""
    if mixing.no_duplicates:
        sources = {name: with_content_ids(d) if hasattr(d, "map") else d for name, d in sources.items()}
    return MixtureDataset(sources)


def dataset_shares(mixture: MixtureDataset, steps_by_source: list[int]) -> dict[str, dict[str, float]]:
    """What the card lists: each dataset's rows and its share of the batches."""
    total = max(1, sum(steps_by_source))
    return {name: {"rows": size, "share": round(steps / total, 4)}
            for name, size, steps in zip(mixture.names, mixture.sizes, steps_by_source)}


class MixtureMixin:
    """The trainers' side of a mixture: which datasets, each one's prompts, the batch sampler and its loader, and
    what goes to the logs (``deferred_rows``, ``masked_negatives``) and the card."""

    args: TrainingArguments
    train_dataset: Any
    loss: nn.Module

    def _sources(self, train_dataset: Any, mixing: Mixing | None) -> dict[str, Any] | None:
        """The named training sets (a dict / DatasetDict, or one dataset when ``mixing.no_duplicates`` asks for the
        batch sampler), or None for one dataset the Trainer's own sampler reads."""
        self.mixing, self._source_sampler, self.masked_negatives = mixing or Mixing(), None, None
        sources = named_datasets(train_dataset)
        if sources is None and self.mixing.no_duplicates and train_dataset is not None:
            if is_stream(train_dataset):
                raise ValueError("Mixing(no_duplicates=True) places rows by index; the training set is a stream. Fix: "
                                 "load it map-style, or drop no_duplicates (duplicates are still masked in the loss).")
            sources = {"train": train_dataset}
        unknown = sorted(set(self.mixing.prompts) - set(sources or ()))
        if unknown:
            raise ValueError(f"Mixing(prompts=...): {unknown} name no dataset of train_dataset "
                             f"({sorted(sources or ())}). Fix: key the prompts by the datasets' names.")
        if self.mixing.weights is not None and set(self.mixing.weights) != set(sources or ()):
            raise ValueError(f"Mixing(weights=...) names {sorted(self.mixing.weights)}; train_dataset has "
                             f"{sorted(sources or ())}. Fix: one weight per dataset, keyed by its name.")
        return sources

    def _mixture(self, sources: dict[str, Any] | None, prepare: Callable[[Any], Any], args: TrainingArguments,
                 train_dataset: Any) -> Any:
        """One dataset as it is; named ones, each prepared (``prepare``), as a :class:`MixtureDataset`."""
        if sources is None:
            return train_dataset
        if args.train_sampling_strategy == "group_by_length":
            logger.info("hf_mm_rerank: train_sampling_strategy='group_by_length' is not used for a mixture: every "
                        "batch comes from one dataset, drawn by the mixing rule.")
        return mixture_of({name: prepare(d) for name, d in sources.items()}, self.mixing)

    def _batch_sampler(self) -> SourceBatchSampler:
        if self._source_sampler is None:  # (built once, on first use: the arguments are final then)
            self._source_sampler = SourceBatchSampler(
                self.train_dataset, self.args.per_device_train_batch_size, self.args.world_size,
                mixing=self.mixing.strategy, alpha=self.mixing.alpha, no_duplicates=self.mixing.no_duplicates,
                seed=self.args.seed, weights=self._weights())
        return self._source_sampler

    def _weights(self) -> list[float] | None:
        if self.mixing.weights is None:
            return None
        return [float(self.mixing.weights[name]) for name in self.train_dataset.names]  # (checked by _sources)

    def get_train_dataloader(self) -> Any:
        """A mixture's batches come from :class:`SourceBatchSampler` (accelerate hands each process its batch of
        every global batch); one dataset's from Trainer's own sampler."""
        if not isinstance(self.train_dataset, MixtureDataset):
            return super().get_train_dataloader()
        workers = self.args.dataloader_num_workers
        params: dict[str, Any] = dict(
            batch_sampler=self._batch_sampler(), collate_fn=self.data_collator, num_workers=workers,
            pin_memory=self.args.dataloader_pin_memory, persistent_workers=self.args.dataloader_persistent_workers,
            worker_init_fn=partial(seed_worker, num_workers=workers, rank=self.args.process_index),
            generator=torch.Generator().manual_seed(self.args.seed))
        if workers > 0:
            params["prefetch_factor"] = self.args.dataloader_prefetch_factor
            params["multiprocessing_context"] = self.args.dataloader_multiprocessing_context
        return self.accelerator.prepare(DataLoader(self.train_dataset, **params))

    def add_mixture_logs(self, logs: dict[str, float]) -> None:
        """Since the last log: the negatives the loss masked as false negatives (this process's); with
        ``no_duplicates``, the rows the sampler deferred so far this epoch."""
        if self.masked_negatives is not None:
            logs["masked_negatives"], self.masked_negatives = self.masked_negatives, 0
        if self.mixing.no_duplicates and isinstance(self.train_dataset, MixtureDataset):
            logs["deferred_rows"] = self._batch_sampler().deferred

    def count_masked(self) -> None:
        """After each loss call: add the loss's count of masked false negatives (losses that declare one)."""
        masked = self.loss.last_masked if isinstance(self.loss, TrainerLoss) else None
        if masked is not None:
            self.masked_negatives = (self.masked_negatives or 0) + int(masked)

    def mixture_facts(self) -> dict[str, dict[str, float]] | None:
        """A mixture's datasets with their rows and their share of the batches (epoch 0's draw), for the card."""
        if not isinstance(self.train_dataset, MixtureDataset):
            return None
        sampler = self._batch_sampler()
        steps = [sampler.schedule(0).count(s) for s in range(len(self.train_dataset.names))]
        return dataset_shares(self.train_dataset, steps)
