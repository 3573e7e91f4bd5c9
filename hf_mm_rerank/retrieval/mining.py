"""Hard-negative mining with a :class:`BiEncoder`: grouped reranker rows from (query, positive) pairs.

Works when documents are images (or text + image), unlike sentence-transformers' miner.
"""

from __future__ import annotations

import functools
import logging
import random
from collections.abc import Sequence
from typing import Any

import torch

from .. import progress
from ..data.inputs import fingerprint, to_input
from ..data.pipeline import undecoded_images
from ..data.schema import check_columns, negative_cells, negative_columns
from . import core

logger = logging.getLogger(__name__)


def mine_hard_negatives(
    bi_encoder: Any,
    dataset: Any,
    corpus: Sequence[Any] | None = None,
    num_negatives: int = 4,
    *,
    range_min: int = 0,
    range_max: int | None = 100,
    margin: float | None = None,
    duplicate_threshold: float | None = 0.98,
    sampling: str = "top",
    batch_size: int = 32,
    seed: int = 0,
    shard_across_ranks: bool = True,
    corpus_columns: tuple[str, str] = ("id", "document"),
    store: str | None = None,
    store_dtype: str = "float32",
    show_progress: bool | None = None,
) -> Any:
    """For each (query, positive) row, pick ``num_negatives`` documents the bi-encoder ranks high but that are
    not the positive: grouped rows ``query, positive, negative_1 ... negative_k`` for a reranker.

    Args:
        bi_encoder: a :class:`BiEncoder` (any object with ``encode(inputs, side=..., batch_size=...)``;
            ``shard_across_ranks=True`` is added in multi-process runs).
        dataset: a ``datasets.Dataset`` with ``query`` and ``positive`` columns (text or images).
        corpus: candidate documents (default: the dataset's distinct positives): a list of cells, or a corpus too
            large for memory, read and encoded chunk by chunk: a ``datasets.Dataset`` / ``IterableDataset`` with the
            document column ``corpus_columns[1]`` (default ``"document"``), or a re-iterable of ``(id, cell)``
            pairs (see :class:`core.CorpusSource`).
        num_negatives: negatives per row; rows with fewer eligible candidates are skipped and counted.
        range_min, range_max: only candidates ranked in ``[range_min, range_max)`` for the query are eligible
            (skipping the very top avoids unlabelled positives).
        margin: also exclude candidates scoring above ``score(query, positive) - margin`` (likely false
            negatives). None: no such limit.
        duplicate_threshold: exclude candidates whose embedding has cosine similarity >= this with a positive's
            (near-duplicates). Every positive of the row's query (on any row: repeated queries, several captions
            per image) is always excluded by content hash, and so are their near-duplicates.
        sampling: ``"top"`` (the highest-ranked eligible) or ``"random"`` (uniform among the eligible).
        batch_size: encoding batch size.
        seed: seed of ``"random"`` sampling.
        shard_across_ranks: in a multi-process run, every rank encodes a share and gets all embeddings, so every
            rank returns the negatives one process would mine (every rank must call it). The model runs where it
            is: put it on the rank's device first.
        store, store_dtype: a folder for the corpus's dense embeddings, memory-mapped (float16 or float32), as for
            :class:`RetrievalEvaluator`.
        show_progress: bars over the corpus's and the queries' encoding (see :mod:`hf_mm_rerank.progress`).

    Returns:
        A ``datasets.Dataset`` (query, positive, negative_1..k); images stay images.
    """
    from datasets import Dataset

    _check(dataset, num_negatives, sampling, range_min, range_max)
    undecoded = undecoded_images(dataset.select_columns(["query", "positive"]))  # decoded as in training
    queries, positives = list(undecoded["query"]), list(undecoded["positive"])
    derived = corpus is None
    source = core.CorpusSource(_distinct(positives) if derived else corpus, corpus_columns, "corpus")
    corpus_fp = [fingerprint(cell) for chunk in source.chunks() for cell in chunk]
    positive_fp = [fingerprint(cell) for cell in positives]
    scorer = core.scorer_of(bi_encoder)
    encode = functools.partial(core.encode, bi_encoder, batch_size=batch_size, shard=shard_across_ranks)
    with progress.showing(show_progress):
        docs = core.encode_corpus(bi_encoder, source, batch_size, shard_across_ranks, store=store, dtype=store_dtype)
        pos = _positive_embeddings(encode, positives, positive_fp, corpus_fp, docs)
        query_emb = encode(queries, side="query")
    depth = min(range_max or len(source), len(source))
    candidate_scores, order = core.top_k(scorer, query_emb, docs, depth)
    positive_scores = scorer.pairwise(query_emb, pos)
    # Every positive of a query (it may sit on several rows, e.g. one image per caption) is excluded for each of
    # its rows, and so are the near-duplicates of any of them.
    query_fp = [fingerprint(cell) for cell in queries]
    rows_of: dict[str, list[int]] = {}
    for i, fp in enumerate(query_fp):
        rows_of.setdefault(fp, []).append(i)
    positives_of = {fp: {positive_fp[i] for i in rows} for fp, rows in rows_of.items()}
    duplicates = None
    if duplicate_threshold is not None:  # closeness of each candidate to the nearest positive of the row's query
        duplicates = torch.stack([scorer.closeness(pos[rows_of[fp]], docs[order[i]]).max(dim=0).values
                                  for i, fp in enumerate(query_fp)])
    order = order.tolist()
    rng = random.Random(seed)
    rows: dict[str, list[Any]] = {"query": [], "positive": [], **{f"negative_{j + 1}": [] for j in range(num_negatives)}}
    picked: list[list[int]] = []
    skipped = 0
    for i, ranked in enumerate(order):
        own = positives_of[query_fp[i]]
        eligible = [j for rank, j in enumerate(ranked) if rank >= range_min and corpus_fp[j] not in own
                    and (duplicates is None or duplicates[i, rank] < duplicate_threshold)
                    and (margin is None or candidate_scores[i, rank] <= positive_scores[i] - margin)]
        if len(eligible) < num_negatives:
            skipped += 1
            continue
        chosen = eligible[:num_negatives] if sampling == "top" else rng.sample(eligible, num_negatives)
        rows["query"].append(queries[i])
        rows["positive"].append(positives[i])
        picked.append(chosen)
    cells = iter(source.cells([doc for chosen in picked for doc in chosen]))  # one read of the corpus at most
    for _ in picked:
        for j in range(num_negatives):
            rows[f"negative_{j + 1}"].append(next(cells))
    logger.info("mine_hard_negatives: %d rows with %d negatives each; %d rows skipped (fewer than %d eligible "
                "candidates after excluding the positive, near-duplicates%s).", len(rows["query"]), num_negatives,
                skipped, num_negatives, " and the margin" if margin is not None else "")
    if skipped:
        logger.warning("mine_hard_negatives: skipped %d of %d rows (not enough eligible candidates).", skipped,
                       len(order))
    features = _features(dataset, num_negatives, corpus_is_positives=derived)
    mined = Dataset.from_dict(rows, features=features)
    if features is None:  # negatives from a given corpus: query and positive still keep their (image) types
        for name in ("query", "positive"):
            mined = mined.cast_column(name, dataset.features[name])
    return mined


def _check(dataset: Any, num_negatives: int, sampling: str, range_min: int, range_max: int | None) -> None:

    check_columns(list(dataset.column_names), ("query", "positive"), "mine_hard_negatives dataset")
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be >= 1, received {num_negatives}.")
    if sampling not in ("top", "random"):
        raise ValueError(f"sampling must be 'top' or 'random', received {sampling!r}.")
    if range_min < 0 or range_max is not None and range_max <= range_min:
        raise ValueError(f"range_min/range_max: need 0 <= range_min < range_max, received {range_min}, {range_max}.")


def _distinct(cells: list[Any]) -> list[Any]:
    seen, out = set(), []
    for cell in cells:
        key = fingerprint(cell)
        if key not in seen:
            seen.add(key)
            out.append(cell)
    return out


def _positive_embeddings(encode: Any, positives: list[Any], positive_fp: list[str], corpus_fp: list[str],
                         docs: Any) -> Any:
    """Reuse the corpus embedding of a positive that is in the corpus; encode the others."""
    where = {fp: j for j, fp in enumerate(corpus_fp)}
    missing = [i for i, fp in enumerate(positive_fp) if fp not in where]
    if not missing:
        return docs[[where[fp] for fp in positive_fp]]
    encoded = encode([positives[i] for i in missing], side="document")
    slot = {i: n for n, i in enumerate(missing)}
    if isinstance(docs, torch.Tensor):
        return torch.stack([encoded[slot[i]] if i in slot else docs[where[positive_fp[i]]]
                            for i in range(len(positives))])
    return core.TokenEmbeddings.pack([encoded[slot[i]] if i in slot else docs[where[positive_fp[i]]]
                                           for i in range(len(positives))])


def _features(dataset: Any, num_negatives: int, corpus_is_positives: bool) -> Any:
    from datasets import Features

    features = getattr(dataset, "features", None)
    if features is None or not corpus_is_positives:
        return None
    return Features({"query": features["query"], "positive": features["positive"],
                     **{f"negative_{j + 1}": features["positive"] for j in range(num_negatives)}})


def add_guide_embeddings(dataset: Any, guide: Any, *, batch_size: int = 32) -> Any:
    """``dataset`` with a guide model's embeddings of each row's query, positive and negatives (columns
    ``guide_query``, ``guide_positive``, ``guide_negatives``), computed once, for GIST-style filtering during training:
    ``ContrastiveLoss(guide_margin=..., guide="batch")`` drops the in-batch and hard negatives the guide scores too
    close to the positive (the collator puts the vectors in every batch; the guide never runs in the training loop).

    Args:
        dataset: a ``datasets.Dataset`` of (query, positive[, negatives]) rows.
        guide: a :class:`~hf_mm_rerank.BiEncoder` (``encode``), or a sentence-transformers model
            (``encode_query`` / ``encode_document``; images decoded to PIL first).
        batch_size: inputs per forward pass of the guide.

    Example:
        >>> train = add_guide_embeddings(train, BiEncoder.from_pretrained("org/strong-embedder"))
        >>> loss = CachedContrastiveLoss(mini_batch_size=64, guide_margin=0.1, guide="batch")
    """
    check_columns(dataset.column_names, ("query", "positive"), "dataset")
    negatives = negative_columns(dataset.column_names)
    rows = undecoded_images(dataset)
    queries = rows["query"]
    positives = rows["positive"]
    others = [cell for row in rows for cell, _ in negative_cells(row, negatives)] if negatives else []
    encode = _guide_encoder(guide, batch_size)
    columns = {"guide_query": encode(queries, "query"), "guide_positive": encode(positives, "document")}
    if others:
        flat = encode(others, "document")
        columns["guide_negatives"] = flat.view(len(queries), -1, flat.shape[-1])
    for name, values in columns.items():
        dataset = dataset.add_column(name, values.tolist())
    return dataset


def _guide_encoder(guide: Any, batch_size: int) -> Any:
    """``encode(cells, side) -> [N, D]`` float32 for a BiEncoder or a sentence-transformers model."""
    if hasattr(guide, "encode_query") and hasattr(guide, "encode_document"):  # sentence-transformers

        def encode_st(cells: list[Any], side: str) -> torch.Tensor:
            items = [item.image if item.image is not None else item.text for item in map(to_input, cells)]
            method = guide.encode_query if side == "query" else guide.encode_document
            return torch.as_tensor(method(items, batch_size=batch_size, convert_to_numpy=True)).float()

        return encode_st
    return lambda cells, side: guide.encode(list(cells), side=side, batch_size=batch_size).float()
