"""Training on several datasets at once, and batches without duplicates.

- :class:`MixtureDataset`: named map-style datasets behind one index; each row carries its source's name
  (``_source``), so the collator and the loss know whose batch it is.
- :class:`SourceBatchSampler`: the batches. Every *global* batch (``per_device_train_batch_size x processes`` rows:
  one batch per process, consecutive, as accelerate hands them out) comes from one source, on every rank alike,
  so in-batch and cross-device negatives stay within one source. Which source each step draws from follows the
  mixing rule: ``"proportional"`` (every batch of every source once per epoch, in a random order: sentence-
  transformers' ``PROPORTIONAL``), ``"round_robin"`` (one batch of each in turn until the smallest runs out: its
  ``ROUND_ROBIN``) or ``"temperature"`` (each step draws source s with probability proportional to
  ``size_s ** alpha``: alpha 1 is proportional in expectation, 0 uniform; small sources are revisited, with a fresh
  shuffle each time they run out) or ``"weighted"`` (the same draw with probabilities proportional to given weights).
- With ``no_duplicates``, no global batch holds two rows sharing content (a query, a positive or a negative, compared
  by :mod:`.dedup` ids): a row that would repeat content is deferred to a later batch, never dropped, and counted
  (``deferred``). Within a source's pass the algorithm is sentence-transformers' ``NO_DUPLICATES`` (the same shuffle
  for the same seed and epoch, the same greedy, first-come order); where it ends a pass and reshuffles, rows it
  deferred go first into the next pass here (after a fresh shuffle, when they alone cannot fill a batch), and a
  dataset with too few distinct contents for the batch size is refused with the fix.

Epoch ``e`` of a sampler is a pure function of ``(seed, e)``: a resumed run replays the same batches.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterator
from typing import Any

import torch

from .dedup import IDS_COLUMN, row_content_ids
from .schema import negative_columns

SOURCE_KEY = "_source"  # each row of a MixtureDataset: the name of the dataset it comes from
MIXING = ("proportional", "round_robin", "temperature", "weighted")
MAX_FRUITLESS_PASSES = 20  # no_duplicates: shuffles in a row that fill no batch before the sampler gives up


class MixtureDataset(torch.utils.data.Dataset):
    """Named map-style datasets behind one index (``datasets.Dataset`` or lists of row dicts).

    Example:
        >>> mixture = MixtureDataset({"coco": coco, "docs": docs})
        >>> mixture[len(coco)]["_source"]
        'docs'
    """

    def __init__(self, sources: dict[str, Any]) -> None:
        if not sources:
            raise ValueError("train_dataset: an empty dict of datasets. Fix: give at least one named dataset.")
        self.sources = dict(sources)
        self.names = list(self.sources)
        self.sizes = [len(d) for d in self.sources.values()]
        self.offsets = [0]
        for size in self.sizes:
            self.offsets.append(self.offsets[-1] + size)
        self.epoch = 0

    def __len__(self) -> int:
        return self.offsets[-1]

    def __getitem__(self, index: int) -> dict[str, Any]:
        source = bisect.bisect_right(self.offsets, index) - 1
        row = dict(self.sources[self.names[source]][index - self.offsets[source]])
        row[SOURCE_KEY] = self.names[source]
        return row

    @property
    def column_names(self) -> list[str]:
        """Every column of the datasets (their union, in first-seen order)."""
        names = (getattr(d, "column_names", None) or list(d[0]) if len(d) else [] for d in self.sources.values())
        return list(dict.fromkeys(c for columns in names for c in columns))

    def set_epoch(self, epoch: int) -> None:
        """Called by accelerate's loader at each epoch; the batch sampler reads it."""
        self.epoch = epoch

    def content_ids(self, source: int) -> list[list[int]]:
        """Every row's content ids of one source (hashed once; ``datasets`` caches them: see :func:`.dedup.with_content_ids`)."""
        dataset = self.sources[self.names[source]]
        if IDS_COLUMN in (getattr(dataset, "column_names", None) or []):
            return [list(ids) for ids in dataset[IDS_COLUMN]]
        rows = [dataset[i] for i in range(len(dataset))]
        negatives = negative_columns(list(rows[0])) if rows else []
        return [row_content_ids(row, negatives) for row in rows]


class SourceBatchSampler(torch.utils.data.Sampler):
    """The batch sampler of a :class:`MixtureDataset` (see the module doc): lists of indices, ``processes`` local
    batches of ``batch_size`` per step, all of one source.

    Args:
        dataset: the :class:`MixtureDataset` (its ``epoch`` is the sampler's).
        batch_size: rows per process and step (``per_device_train_batch_size``).
        processes: the number of processes (``world_size``).
        mixing: ``"proportional"``, ``"round_robin"`` or ``"temperature"``.
        alpha: the temperature rule's exponent.
        weights: ``"weighted"``: one weight per source, in the dataset's order.
        no_duplicates: keep rows that share content out of one global batch.
        seed: the run's seed.

    Example:
        >>> sampler = SourceBatchSampler(MixtureDataset({"a": a, "b": b}), batch_size=32, mixing="round_robin")
        >>> [batch for batch in sampler][:2]  # a batch of "a", then one of "b"
    """

    def __init__(self, dataset: MixtureDataset, batch_size: int, processes: int = 1, *, mixing: str = "proportional",
                 alpha: float = 0.5, no_duplicates: bool = False, seed: int = 0,
                 weights: list[float] | None = None) -> None:
        if mixing not in MIXING:
            raise ValueError(f"mixing={mixing!r}: use one of {MIXING}.")
        if (mixing == "weighted") != (weights is not None) or weights is not None and (
                len(weights) != len(dataset.names) or min(weights) < 0 or sum(weights) <= 0):
            raise ValueError(f"mixing={mixing!r} with weights={weights}: 'weighted' takes one weight >= 0 per dataset "
                             f"({dataset.names}), not all 0; the other rules take none.")
        self.weights = weights
        self.dataset, self.batch_size, self.processes = dataset, int(batch_size), int(processes)
        self.mixing, self.alpha, self.no_duplicates, self.seed = mixing, float(alpha), no_duplicates, int(seed)
        self.drop_last = True  # (read by accelerate's BatchSamplerShard) every batch is full
        self.global_size = self.batch_size * self.processes
        self.batches_per_source = [size // self.global_size for size in dataset.sizes]
        small = [f"'{n}' ({s} rows)" for n, s, k in zip(dataset.names, dataset.sizes, self.batches_per_source) if k == 0]
        if small:
            raise ValueError(f"train_dataset: {', '.join(small)} cannot fill one global batch of {self.global_size} rows "
                             f"({self.batch_size} per process x {self.processes} process(es)); every batch comes from "
                             "one dataset. Fix: a smaller per_device_train_batch_size, or leave that dataset out.")
        self._ids = [dataset.content_ids(s) for s in range(len(dataset.names))] if no_duplicates else None
        self.deferred = 0  # rows deferred to a later batch (no_duplicates), this epoch so far

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def steps(self) -> int:
        """Global batches per epoch."""
        if self.mixing == "round_robin":
            return min(self.batches_per_source) * len(self.batches_per_source)
        return sum(self.batches_per_source)

    def __len__(self) -> int:
        return self.steps() * self.processes

    def schedule(self, epoch: int) -> list[int]:
        """The source of each global batch of ``epoch``."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        sources = range(len(self.batches_per_source))
        if self.mixing == "round_robin":
            return [s for _ in range(min(self.batches_per_source)) for s in sources]
        if self.mixing == "proportional":  # as sentence-transformers' ProportionalBatchSampler draws it
            slots = [s for s in sources for _ in range(self.batches_per_source[s])]
            return [slots[i] for i in torch.randperm(len(slots), generator=generator).tolist()]
        weights = torch.tensor(self.weights if self.weights is not None else
                               [float(size) ** self.alpha for size in self.dataset.sizes], dtype=torch.float64)
        return torch.multinomial(weights, self.steps(), replacement=True, generator=generator).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self.dataset.epoch
        self.deferred = 0
        streams = [self._source_batches(s, epoch) for s in range(len(self.batches_per_source))]
        for source in self.schedule(epoch):
            offset = self.dataset.offsets[source]
            rows = next(streams[source])
            for rank in range(self.processes):
                yield [offset + i for i in rows[rank * self.batch_size:(rank + 1) * self.batch_size]]

    def _source_batches(self, source: int, epoch: int) -> Iterator[list[int]]:
        """Endless global batches of one source: pass after pass, each a fresh shuffle."""
        size = self.dataset.sizes[source]
        generator = torch.Generator().manual_seed(self.seed + epoch + 7919 * source)
        pending: deque[int] = deque()
        fruitless = 0  # passes in a row that completed no batch
        while True:
            order = torch.randperm(size, generator=generator, dtype=torch.int32).tolist()
            if self._ids is None:
                for start in range(0, size - self.global_size + 1, self.global_size):
                    yield order[start:start + self.global_size]
                continue
            # Rows the last pass deferred stay pending; a fresh shuffle goes first when they alone could not fill
            # a batch (first come, first placed would otherwise try the same rows again and again).
            pending = deque(order) + pending if pending else deque(order)
            placed = False
            while (batch := self._fill(pending, self._ids[source])) is not None:
                placed = True
                yield batch
            fruitless = 0 if placed else fruitless + 1
            if fruitless == MAX_FRUITLESS_PASSES:
                name = self.dataset.names[source]
                raise ValueError(
                    f"train_dataset[{name!r}]: {MAX_FRUITLESS_PASSES} shuffles of its {size} rows gave no batch of "
                    f"{self.global_size} rows without shared content (a query, positive or negative seen twice): too "
                    "few distinct contents for this batch size. Fix: a smaller per_device_train_batch_size, fewer "
                    "negatives per row, or Mixing(no_duplicates=False) (duplicates are still masked in the loss).")

    def _fill(self, pending: deque[int], ids: list[list[int]]) -> list[int] | None:
        """One global batch without shared content, taken from the front of ``pending`` (first come, first placed; a
        row that repeats content waits at the front, in its order); None, with ``pending`` as it was, when what is
        pending cannot fill one."""
        batch: list[int] = []
        seen: set[int] = set()
        waiting: list[int] = []
        taken: list[int] = []
        while pending and len(batch) < self.global_size:
            row = pending.popleft()
            taken.append(row)
            if seen.isdisjoint(ids[row]):
                batch.append(row)
                seen.update(ids[row])
            else:
                waiting.append(row)
        if len(batch) < self.global_size:
            pending.extendleft(reversed(taken))
            return None
        pending.extendleft(reversed(waiting))
        self.deferred += len(waiting)
        return batch
