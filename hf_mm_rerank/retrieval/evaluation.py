"""Retrieval metrics and the evaluator the bi-encoder trainer runs in ``evaluate()``.

:func:`ranking_metrics` is the one implementation of the metrics; the ``evaluate`` metric module shipped in
``hf_mm_rerank/retrieval/metrics/retrieval_metrics`` (see :data:`RETRIEVAL_METRIC_PATH`) wraps it, so
``evaluate.load(RETRIEVAL_METRIC_PATH)`` works offline.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import progress
from ..data.inputs import fingerprint
from ..data.pipeline import undecoded_images
from ..data.schema import negative_cells, negative_columns
from ..distributed import shard_kwargs
from . import core

logger = logging.getLogger(__name__)

RETRIEVAL_METRIC_PATH = str(Path(__file__).parent / "metrics" / "retrieval_metrics")


def _ndcg(gains: list[float], ideal_gains: list[float], k: int) -> float:
    dcg = sum(g / math.log2(i + 2) for i, g in enumerate(gains[:k]))
    ideal = sum(g / math.log2(i + 2) for i, g in enumerate(ideal_gains[:k]))
    return dcg / ideal if ideal else 0.0


def _mrr(hits: list[bool], k: int) -> float:
    return next((1.0 / (i + 1) for i, hit in enumerate(hits[:k]) if hit), 0.0)


def _average_precision(hits: list[bool], n_relevant: int, k: int) -> float:
    found, total = 0, 0.0
    for i, hit in enumerate(hits[:k]):
        if hit:
            found += 1
            total += found / (i + 1)
    return total / n_relevant if n_relevant else 0.0


def grades(relevant: Iterable[Hashable] | Mapping[Hashable, float]) -> dict[Hashable, float]:
    """``{doc: grade}`` from a set of relevant ids (grade 1 each) or a graded ``{doc: grade}`` mapping."""
    if isinstance(relevant, Mapping):
        return {doc: float(grade) for doc, grade in relevant.items()}
    return {doc: 1.0 for doc in relevant}


def ranking_metrics(rankings: Sequence[Sequence[Hashable]],
                    relevant: Sequence[Iterable[Hashable] | Mapping[Hashable, float]],
                    k_values: Sequence[int] = (1, 5, 10), map_at: int = 100) -> dict[str, float]:
    """Mean ndcg@k, mrr@k, recall@k (each k) and map@``map_at`` over queries, as trec_eval / pytrec_eval and
    BEIR define them.

    - Relevance: a set of relevant ids, or graded ``{doc: grade}``; a document is relevant when its grade is > 0
      (grade 0 means judged not relevant). ndcg uses the grades as gains (linear, as trec_eval); mrr, recall and
      map use relevant / not relevant.
    - map@k is trec_eval's ``map_cut_k``: precision summed at each relevant document in the top k, divided by
      the number of relevant documents (not by min(relevant, k)).
    - Relevant documents missing from a ranking (e.g. missed by a first stage) still count in the denominators.
    - Queries without any relevant document are skipped.

    Args:
        rankings: per query, document ids best first (ties already broken: the evaluators keep the corpus /
            candidate order among equal scores).
        relevant: per query, its relevant documents (a set, or ``{doc: grade}``).
    """
    if len(rankings) != len(relevant):
        raise ValueError(f"rankings ({len(rankings)}) and relevant ({len(relevant)}) must have one entry per query.")
    sums: dict[str, float] = {}
    counted = 0
    for ranked, rel in zip(rankings, relevant):
        graded = {doc: g for doc, g in grades(rel).items() if g > 0}
        if not graded:
            continue
        counted += 1
        gains = [graded.get(doc, 0.0) for doc in ranked]
        hits = [g > 0 for g in gains]
        ideal = sorted(graded.values(), reverse=True)
        for k in k_values:
            scores = {f"ndcg@{k}": _ndcg(gains, ideal, k), f"mrr@{k}": _mrr(hits, k),
                      f"recall@{k}": sum(hits[:k]) / len(graded)}
            for name, value in scores.items():
                sums[name] = sums.get(name, 0.0) + value
        sums[f"map@{map_at}"] = sums.get(f"map@{map_at}", 0.0) + _average_precision(hits, len(graded), map_at)
    return {name: value / counted for name, value in sums.items()} if counted else {}


GALLERY_TOP = 5  # documents per query in the gallery


class RetrievalEvaluator:
    """Embeds queries and a corpus with a :class:`BiEncoder` and reports ranking metrics.

    Args:
        queries: ``{query_id: input}``; inputs are text, images, paths, bytes or ``{"text", "image"}``.
        corpus: ``{doc_id: input}``, or a corpus too large for memory: a ``datasets.Dataset`` or ``IterableDataset``
            (a stream) with an id and a document column (``corpus_columns``), or a re-iterable of ``(doc_id, input)``
            pairs; it is read and encoded ``chunk_rows`` documents at a time (:class:`core.CorpusSource`).
        relevant: ``{query_id: {doc_id, ...}}``, or graded ``{query_id: {doc_id: grade}}`` (grade > 0 is relevant;
            ndcg uses the grades as gains). Metrics follow trec_eval (see :func:`ranking_metrics`); equal scores
            are ranked in corpus order.
        k_values: cut-offs for ndcg/mrr/recall (default 1, 5, 10).
        batch_size: inputs per forward pass while encoding.
        map_at: cut-off of MAP (default 100).
        shard_across_ranks: in a multi-process run, every rank encodes a share of the corpus and queries and
            gets all embeddings, so the metrics equal one process's. Every rank must then call the evaluator (as
            Trainer does); pass False to evaluate on one rank alone.
        token_pooling: multi-vector models: pool each document's token vectors by this factor before scoring
            (:func:`~hf_mm_rerank.retrieval.core.pool_tokens`); the metrics then include ``index_vectors``, the number of
            vectors the corpus keeps.
        corpus_columns: ``(id column, document column)`` of a dataset corpus (default ``("id", "document")``).
        store: a folder for the corpus's dense embeddings, memory-mapped (one file per process, rewritten at each
            evaluation), so they need not fit in memory; ``store_dtype`` ``"float16"`` halves it (scores are computed
            in float32 chunk by chunk). Scoring always runs in corpus chunks with a running top-k.
        show_progress: a bar over the corpus's encoding (default: 1,000 documents or more on a terminal; inside
            training, off with ``disable_tqdm``; see :mod:`hf_mm_rerank.progress`).
        gallery: keep, at each evaluation, this many queries' top 5 (the same queries every time, a seeded draw) as
            ``last_gallery``: ``[(query, [(document, relevant), ...])]``; the trainers draw them before and after
            training into ``retrieval_gallery.png`` beside the model, shown in its card
            (:mod:`hf_mm_rerank.publishing.gallery`). 0: none.

    Example:
        >>> evaluator = RetrievalEvaluator({"q1": "a red car"}, {"d1": "car.jpg", "d2": "boat.jpg"}, {"q1": {"d1"}})
        >>> evaluator(model)["ndcg@10"]
    """

    def __init__(self, queries: Mapping[Hashable, Any], corpus: Mapping[Hashable, Any],
                 relevant: Mapping[Hashable, Iterable[Hashable]], *, k_values: Sequence[int] = (1, 5, 10),
                 batch_size: int = 32, map_at: int = 100, shard_across_ranks: bool = True,
                 token_pooling: int | None = None, corpus_columns: tuple[str, str] = ("id", "document"),
                 store: str | None = None, store_dtype: str = "float32", chunk_rows: int = core.CHUNK_ROWS,
                 show_progress: bool | None = None, gallery: int = 0) -> None:
        corpus = core.CorpusSource(corpus, corpus_columns)
        self.show_progress = show_progress
        self.gallery, self.last_gallery = gallery, None
        unknown_q = [q for q in relevant if q not in queries]
        unknown_d = sorted({str(d) for docs in relevant.values() for d in docs if d not in corpus})
        if unknown_q or unknown_d:
            raise ValueError(f"relevant: names query ids {unknown_q[:5]} / doc ids {unknown_d[:5]} that are not in "
                             "queries / corpus. Fix: build relevant from the same ids.")
        if not corpus:
            raise ValueError("corpus is empty.")
        self.query_ids = [q for q in queries if any(g > 0 for g in grades(relevant.get(q, ())).values())]
        if len(self.query_ids) < len(queries):
            logger.warning("RetrievalEvaluator: %d queries without relevant documents are skipped.",
                           len(queries) - len(self.query_ids))
        self.queries = [queries[q] for q in self.query_ids]
        self.doc_ids = corpus.ids
        self.corpus = corpus
        self.store, self.store_dtype, self.chunk_rows = store, store_dtype, chunk_rows
        self.relevant = [grades(relevant[q]) for q in self.query_ids]
        self.k_values = tuple(k_values)
        self.batch_size = batch_size
        self.map_at = map_at
        self.shard_across_ranks = shard_across_ranks
        self.token_pooling = token_pooling

    @classmethod
    def from_dataset(cls, dataset: Any, **kwargs: Any) -> RetrievalEvaluator:
        """Build from (query, positive[, negatives]) rows: each query must retrieve its positives, with every
        row's positive and negatives as the corpus.

        Queries and documents are keyed by content (text and pixels), so an image with five captions is one
        corpus document relevant to five queries, and a query on several rows is relevant to all their positives.
        """

        negatives = negative_columns(dataset.column_names)
        dataset = undecoded_images(dataset)  # images decoded as in training (reduced-scale JPEG, EXIF)
        queries: dict[str, Any] = {}
        corpus: dict[str, Any] = {}
        relevant: dict[str, set[str]] = {}
        for row in dataset:
            query, positive = fingerprint(row["query"]), fingerprint(row["positive"])
            queries.setdefault(query, row["query"])
            corpus.setdefault(positive, row["positive"])
            relevant.setdefault(query, set()).add(positive)
            for cell, _ in negative_cells(row, negatives):
                corpus.setdefault(fingerprint(cell), cell)
        return cls(queries, corpus, relevant, **kwargs)

    def __call__(self, model: Any) -> dict[str, float]:
        depth = min(max(max(self.k_values), self.map_at), len(self.doc_ids))
        with progress.showing(self.show_progress):
            rankings = self.rankings(model, depth)
        if self.gallery:
            self.last_gallery = self._gallery(rankings)
        metrics = ranking_metrics(rankings, self.relevant, self.k_values, self.map_at)
        if self.index_vectors is not None:
            metrics["index_vectors"] = float(self.index_vectors)  # multi-vector: the corpus's stored vectors
        return metrics

    index_vectors: int | None = None

    def _gallery(self, rankings: list[list[Hashable]], top: int = GALLERY_TOP) -> list[tuple[Any, list[tuple[Any, bool]]]]:
        import random

        picked = sorted(random.Random(0).sample(range(len(self.queries)), min(self.gallery, len(self.queries))))
        where = {doc: j for j, doc in enumerate(self.doc_ids)}
        wanted = [[where[doc] for doc in rankings[i][:top]] for i in picked]
        cells = iter(self.corpus.cells([j for row in wanted for j in row]))
        return [(self.queries[i], [(next(cells), grades(self.relevant[i]).get(self.doc_ids[j], 0) > 0) for j in row])
                for i, row in zip(picked, wanted)]

    def rankings(self, model: Any, depth: int) -> list[list[Hashable]]:
        """Per query, the ids of its ``depth`` best documents (the model's scorer, scored in corpus chunks). For
        multi-vector models ``token_pooling=k`` pools each document's tokens first (:func:`core.pool_tokens`)."""
        documents = core.encode_corpus(model, self.corpus, self.batch_size, self.shard_across_ranks,
                                            store=self.store, dtype=self.store_dtype, chunk_rows=self.chunk_rows)
        if isinstance(documents, core.TokenEmbeddings):
            documents = core.pool_tokens(documents, self.token_pooling or 1)
            self.index_vectors = documents.tokens()
        queries = core.encode(model, self.queries, "query", self.batch_size, self.shard_across_ranks)
        _, best = core.top_k(core.scorer_of(model), queries, documents, depth)
        return [[self.doc_ids[i] for i in row] for row in best.tolist()]


class RerankingEvaluator:
    """Reranks each sample's candidates with a :class:`CrossEncoder` and reports ndcg@k, mrr@k and map,
    with the same metrics of the incoming order as ``base_*``.

    Args:
        samples: ``[{"query": q, "positive": [...], "negative": [...]}]`` (cells: text, images, paths, bytes,
            ``{"text", "image"}``). The incoming order is ``"documents"`` when a sample gives it (e.g. the
            first-stage retriever's order; positives are those also listed in ``"positive"``, and positives the
            first stage missed count as relevant documents ranked nowhere, as in trec_eval), else a seeded shuffle
            of positives and negatives, i.e. chance level. Equal scores keep the incoming order.
        at_k: cut-off of ndcg and mrr (default 10).
        batch_size: pairs per forward pass.
        seed: seed of the shuffle.
        shard_across_ranks: as for :class:`RetrievalEvaluator` (every rank scores a share of the pairs).

    Example:
        >>> evaluator = RerankingEvaluator([{"query": "a red car", "positive": ["car.jpg"], "negative": ["boat.jpg"]}])
        >>> evaluator(reranker)   # {"ndcg@10": ..., "mrr@10": ..., "map": ..., "base_ndcg@10": ..., ...}
    """

    def __init__(self, samples: Sequence[Mapping[str, Any]], *, at_k: int = 10, batch_size: int = 16,
                 seed: int = 0, shard_across_ranks: bool = True, show_progress: bool | None = None) -> None:
        import random

        self.show_progress = show_progress
        rng = random.Random(seed)
        self.queries, self.candidates, self.relevant = [], [], []
        for i, sample in enumerate(samples):
            positives, negatives = _as_list(sample, "positive", i), _as_list(sample, "negative", i, required=False)
            if "query" not in sample:
                raise ValueError(f"samples[{i}]: no 'query'. Fix: give each sample query, positive and negative.")
            if "documents" in sample:
                docs = list(sample["documents"])
                # Positives the first stage missed still count as relevant (ranked nowhere), as in trec_eval.
                found = {j for j, doc in enumerate(docs) if any(_same(doc, p) for p in positives)}
                missed = [p for p in positives if not any(_same(doc, p) for doc in docs)]
                rel = found | {("missed", m) for m in range(len(missed))}
            else:
                docs = positives + negatives
                order = list(range(len(docs)))
                rng.shuffle(order)
                rel = {order.index(j) for j in range(len(positives))}
                docs = [docs[j] for j in order]
            self.queries.append(sample["query"])
            self.candidates.append(docs)
            self.relevant.append(rel)
        if not self.queries:
            raise ValueError("RerankingEvaluator: no samples (pointwise rows need at least one label >= 0.5 per "
                             "query to count). Fix: pass samples with positives.")
        self.at_k = at_k
        self.batch_size = batch_size
        self.shard_across_ranks = shard_across_ranks

    @classmethod
    def from_dataset(cls, dataset: Any, **kwargs: Any) -> RerankingEvaluator:
        """Build from grouped rows (query, positive, negative / negative_1..k) or pointwise rows (query,
        document, label): pointwise rows of one query form one sample, label >= 0.5 meaning relevant."""

        dataset = undecoded_images(dataset)  # images decoded as in training (reduced-scale JPEG, EXIF)
        if "document" in dataset.column_names:
            return cls(_pointwise_samples(dataset), **kwargs)
        negatives = negative_columns(dataset.column_names)
        samples = [{"query": row["query"], "positive": [row["positive"]],
                    "negative": [cell for cell, _ in negative_cells(row, negatives)]} for row in dataset]
        return cls(samples, **kwargs)

    def __call__(self, model: Any) -> dict[str, float]:
        pairs = [(q, doc) for q, docs in zip(self.queries, self.candidates) for doc in docs]
        with progress.showing(self.show_progress):
            scores = model.score(pairs, batch_size=self.batch_size, **shard_kwargs(self.shard_across_ranks)).tolist()
        rankings = core.rank_groups(core.split_groups(scores, [len(docs) for docs in self.candidates]))
        incoming = [list(range(len(docs))) for docs in self.candidates]
        return {**self._metrics(rankings, ""), **self._metrics(incoming, "base_")}

    def _metrics(self, rankings: list[list[int]], prefix: str) -> dict[str, float]:
        depth = max(len(docs) for docs in self.candidates)
        metrics = ranking_metrics(rankings, self.relevant, (self.at_k,), map_at=depth)
        return {f"{prefix}ndcg@{self.at_k}": metrics[f"ndcg@{self.at_k}"],
                f"{prefix}mrr@{self.at_k}": metrics[f"mrr@{self.at_k}"], f"{prefix}map": metrics[f"map@{depth}"]}


def _as_list(sample: Mapping[str, Any], key: str, index: int, required: bool = True) -> list[Any]:
    value = sample.get(key)
    if value is None:
        if required:
            raise ValueError(f"samples[{index}]: no '{key}' documents. Fix: give at least one positive per sample.")
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:  # e.g. arrays without a truth value
        return False


def _pointwise_samples(dataset: Any) -> list[dict[str, Any]]:

    groups: dict[str, dict[str, Any]] = {}
    for row in dataset:
        sample = groups.setdefault(fingerprint(row["query"]), {"query": row["query"], "positive": [], "negative": []})
        sample["positive" if float(row["label"]) >= 0.5 else "negative"].append(row["document"])
    kept = [s for s in groups.values() if s["positive"]]
    if len(kept) < len(groups):
        logger.warning("RerankingEvaluator: %d queries without a relevant document are skipped.", len(groups) - len(kept))
    return kept
