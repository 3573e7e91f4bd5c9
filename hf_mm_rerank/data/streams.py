"""Streamed training data: a ``datasets.IterableDataset`` (``load_dataset(..., streaming=True)``,
``Dataset.to_iterable_dataset(num_shards=...)``, sharded Parquet/JSON, ``imagefolder``) read row by row, with no
length.

What the trainers do with a stream instead of what needs a length:

- the column checks read the first row (an empty stream is an error that says so);
- each row gets its position in the stream as the row key for error messages (counted by ``datasets`` within the
  share of the stream one DataLoader worker of one process reads, so it survives a resume from ``state_dict``);
- ``group_by_length`` lengths are not estimated (that would read the whole stream; Trainer ignores samplers for
  iterable datasets anyway), said in the log;
- accelerate's batch dispatching is switched off (each process reads its own shards, so no row is seen twice per
  pass and our chunked batches never need slicing): ``datasets`` gives each process ``n_shards / processes`` shards
  when it can, else each process keeps every ``processes``-th batch; DataLoader workers split a process's shards;
- the DataLoader workers the trainers pick themselves are lowered to the shards a process has (a worker with no shard
  reads nothing); a user's own count above it is kept and the idle workers are named, with the fix;
- ``bad_rows="skip"`` stops at ``max_skipped_fraction`` of the rows read so far (once ten rows have been skipped),
  not of a length it does not know.
"""

from __future__ import annotations

import logging
from itertools import islice
from typing import Any

from .schema import ROW_KEY

logger = logging.getLogger(__name__)


def is_stream(dataset: Any) -> bool:
    """A dataset read by iteration only (a ``datasets.IterableDataset`` or a torch ``IterableDataset``)."""
    import torch

    if dataset is None:
        return False
    try:
        from datasets import IterableDataset
    except ImportError:  # pragma: no cover - datasets is a dependency
        IterableDataset = ()
    return isinstance(dataset, (IterableDataset, torch.utils.data.IterableDataset))


def first_rows(dataset: Any, n: int = 1) -> list[dict[str, Any]]:
    """The first ``n`` rows of a stream (read again from the start; nothing is consumed)."""
    source = dataset.take(n) if hasattr(dataset, "take") else dataset
    return list(islice(iter(source), n))


def stream_columns(dataset: Any, name: str) -> list[str]:
    """A stream's column names: from its features when ``datasets`` knows them, else from its first row.

    Raises:
        ValueError: the stream has no rows.
    """
    names = getattr(dataset, "column_names", None)
    if names:
        if not first_rows(dataset):
            raise ValueError(f"{name} is a stream with no rows (columns {list(names)}). Fix: check the files or "
                             "split it reads, and any filter, skip or take that emptied it.")
        return list(names)
    rows = first_rows(dataset)
    if not rows:
        raise ValueError(f"{name} is a stream with no rows. Fix: check the files or split it reads, and any filter, "
                         "skip or take that emptied it.")
    return list(rows[0])


def check_max_steps(args: Any, name: str = "train_dataset") -> None:
    if args.max_steps is None or args.max_steps <= 0:
        raise ValueError(f"{name} is a stream (it has no length), so the number of steps cannot come from "
                         f"num_train_epochs. Fix: TrainingArguments(max_steps=N) (recipes: --max_steps N); one pass "
                         "is N x per_device_train_batch_size x processes rows.")


def shards_per_process(dataset: Any, world_size: int) -> int | None:
    """How many of the stream's shards one process reads (accelerate splits by shard when there are enough)."""
    shards = getattr(dataset, "num_shards", None) or getattr(dataset, "n_shards", None)
    if not shards:
        return None
    return shards // world_size if shards >= world_size else shards


def fit_workers(dataset: Any, args: Any, auto_workers: bool) -> None:
    """DataLoader workers beyond the shards a process reads get no rows: lower ours, name the user's."""
    shards = shards_per_process(dataset, max(1, args.world_size))
    workers = args.dataloader_num_workers
    if shards is None or workers <= shards:
        return
    say = logger.info if args.process_index == 0 else logger.debug
    if auto_workers:
        args.dataloader_num_workers = shards
        say("hf_mm_rerank: the training stream has %d shard(s) per process, so %d DataLoader worker(s) instead of %d "
            "(a worker without a shard reads nothing; more shards: Dataset.to_iterable_dataset(num_shards=N), or more "
            "data files).", shards, shards, workers)
    else:
        logger.warning(
            "hf_mm_rerank: dataloader_num_workers=%d, but the training stream has %d shard(s) per process (%s shard(s) "
            "over %d process(es)): %d worker(s) will read nothing. Fix: dataloader_num_workers=%d, or a stream with "
            "more shards (Dataset.to_iterable_dataset(num_shards=N), or more data files).", workers, shards,
            getattr(dataset, "num_shards", "?"), args.world_size, workers - shards, shards)


def _row_key(index: int, split: bool, rank: int) -> Any:
    if not split:
        return index
    import torch

    info = torch.utils.data.get_worker_info()
    worker = f", DataLoader worker {info.id}" if info is not None else ""
    return f"{index} of the stream's share read by process {rank}{worker}"


def with_stream_row_index(dataset: Any, args: Any) -> Any:
    """Each row's position in the stream as its row key (see the module's note), added lazily as it is read."""
    from datasets import Features, Value

    names = getattr(dataset, "column_names", None) or []
    if ROW_KEY in names or not hasattr(dataset, "map"):
        return dataset
    shards = getattr(dataset, "num_shards", 1) or 1
    split = args.world_size > 1 or (args.dataloader_num_workers > 1 and shards > 1)
    features = getattr(dataset, "features", None)
    if features is not None:
        features = Features({**features, ROW_KEY: Value("string" if split else "int64")})
    rank = args.process_index
    return dataset.map(lambda row, i: {ROW_KEY: _row_key(i, split, rank)}, with_indices=True, features=features)
