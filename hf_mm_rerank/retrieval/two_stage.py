"""The two model types together: the embedder retrieves the top k, the reranker reorders them, and the reranker's
judgement becomes teacher scores for distilling it back into the embedder.

- :class:`RetrieveRerankEvaluator`: reranker metrics on the candidates a retriever really gives it, the retriever's
  own metrics, and ``recall@top_k`` (the ceiling the reranker cannot pass);
- :func:`retrieve_and_rerank`: inference, both stages batched;
- :func:`score_with_teacher`: a dataset's rows get their reranker scores (``teacher_scores``), cached by
  ``datasets``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

import torch

from .. import progress
from ..data.pipeline import undecoded_images
from ..data.schema import check_columns, negative_cells, negative_columns
from ..distributed import shard_kwargs
from . import core
from .evaluation import RetrievalEvaluator, ranking_metrics


class RetrieveRerankEvaluator:
    """Judges a reranker on the candidates a bi-encoder retrieves: encodes the corpus once, keeps each query's
    ``top_k`` as its candidate list (cached across evaluations: the retriever does not change while a reranker
    trains), and reports

    - the reranked metrics (``ndcg@k``, ``mrr@k``, ``recall@k``, ``map@top_k``): relevant documents the retriever
      missed count as misses, ranked nowhere, as in trec_eval;
    - the retriever's metrics on the same queries, prefixed ``retriever_``;
    - ``recall@{top_k}``: the share of relevant documents among the candidates, the ceiling of any reranking.

    Plugs into ``CrossEncoderTrainer(evaluator=...)``. Text and image queries and documents; in a multi-process
    run every rank encodes and scores a share, and all get the same metrics.

    Args:
        bi_encoder: the retriever (a :class:`BiEncoder`).
        queries, corpus, relevant: as for :class:`RetrievalEvaluator`.
        top_k: candidates per query handed to the reranker.
        k_values: cut-offs of ndcg, mrr and recall.
        batch_size: inputs per forward pass of the retriever; ``rerank_batch_size``: pairs per reranker pass.
        show_progress: bars over the corpus's encoding and the scoring (see :mod:`hf_mm_rerank.progress`).

    Example:
        >>> evaluator = RetrieveRerankEvaluator(embedder, queries, corpus, relevant, top_k=50)
        >>> evaluator(reranker)   # {"ndcg@10": ..., "retriever_ndcg@10": ..., "recall@50": ..., ...}
    """

    def __init__(self, bi_encoder: Any, queries: Mapping[Hashable, Any], corpus: Mapping[Hashable, Any],
                 relevant: Mapping[Hashable, Iterable[Hashable]], *, top_k: int = 100,
                 k_values: Sequence[int] = (1, 5, 10), batch_size: int = 32, rerank_batch_size: int = 16,
                 shard_across_ranks: bool = True, show_progress: bool | None = None) -> None:
        if top_k < 1:
            raise ValueError(f"top_k={top_k}: keep at least one candidate per query.")
        self.retrieval = RetrievalEvaluator(queries, corpus, relevant, k_values=k_values, batch_size=batch_size,
                                            map_at=top_k, shard_across_ranks=shard_across_ranks,
                                            show_progress=show_progress)
        self.show_progress = show_progress
        self.bi_encoder = bi_encoder
        self.top_k = min(top_k, len(self.retrieval.doc_ids))
        self.k_values = tuple(k_values)
        self.rerank_batch_size = rerank_batch_size
        self.shard_across_ranks = shard_across_ranks
        self._candidates: list[list[int]] | None = None
        self._retriever: dict[str, float] = {}

    def candidates(self) -> list[list[int]]:
        """Per query, the corpus indices of its ``top_k`` candidates, best first (computed once)."""
        if self._candidates is None:
            r = self.retrieval
            depth = min(max(self.top_k, *self.k_values), len(r.doc_ids))  # the retriever is judged at every k
            rankings = r.rankings(self.bi_encoder, depth)
            where = {doc: j for j, doc in enumerate(r.doc_ids)}
            self._candidates = [[where[doc] for doc in row[:self.top_k]] for row in rankings]
            self._retriever = ranking_metrics(rankings, r.relevant, self.k_values, self.top_k)
            candidates = [row[:self.top_k] for row in rankings]
            found = ranking_metrics(candidates, r.relevant, (self.top_k,), self.top_k)[f"recall@{self.top_k}"]
            self._retriever[f"recall@{self.top_k}"] = found
        return self._candidates

    def __call__(self, reranker: Any) -> dict[str, float]:
        r = self.retrieval
        candidates = self.candidates()
        cells = r.corpus.cells([j for row in candidates for j in row])
        pairs = list(zip((query for query, row in zip(r.queries, candidates) for _ in row), cells))
        with progress.showing(self.show_progress):
            scores = reranker.score(pairs, batch_size=self.rerank_batch_size, **shard_kwargs(self.shard_across_ranks))
        order = core.rank_groups(core.split_groups(scores.float().tolist(), [len(c) for c in candidates]))
        rankings = [[r.doc_ids[row[i]] for i in ranked] for row, ranked in zip(candidates, order)]  # ties: retrieval order
        reranked = ranking_metrics(rankings, r.relevant, self.k_values, self.top_k)
        ceiling = self._retriever[f"recall@{self.top_k}"]
        return {**reranked, **{f"retriever_{k}": v for k, v in self._retriever.items()}, f"recall@{self.top_k}": ceiling}


def retrieve_and_rerank(bi_encoder: Any, reranker: Any, queries: Sequence[Any] | Mapping, corpus: Sequence[Any] | Mapping,
                        *, top_k: int = 100, rerank_k: int | None = None, corpus_embeddings: torch.Tensor | None = None,
                        batch_size: int = 32, rerank_batch_size: int = 16,
                        ) -> list[list[dict[str, Any]]] | dict[Hashable, list[dict[str, Any]]]:
    """Retrieve each query's ``top_k`` documents with ``bi_encoder``, rerank the first ``rerank_k`` (default all)
    with ``reranker``.

    Returns, per query, ``[{"corpus_id", "score", "retrieval_score"}]``: the reranked candidates by reranker score
    (ties keep the retrieval order), then any further retrieved ones in retrieval order with ``"score": None``.
    ``queries`` and ``corpus`` are sequences or ``{id: input}`` mappings (as the evaluators take them): a mapping of
    queries gives ``{query_id: results}``; ``corpus_id`` is the corpus key (a mapping) or index (a sequence). Pass
    ``corpus_embeddings`` (from ``bi_encoder.encode(corpus, side="document")``) to reuse them across calls.
    """
    if isinstance(queries, Mapping):  # keyed in, keyed out (encoding the keys would be silently wrong)
        keys = list(queries)
        ranked = retrieve_and_rerank(bi_encoder, reranker, [queries[k] for k in keys], corpus, top_k=top_k,
                                     rerank_k=rerank_k, corpus_embeddings=corpus_embeddings, batch_size=batch_size,
                                     rerank_batch_size=rerank_batch_size)
        return dict(zip(keys, ranked))
    if isinstance(queries, (str, bytes)) or not isinstance(queries, Sequence):
        raise TypeError(f"queries: expected a list of queries or a {{query_id: query}} mapping, received "
                        f"{type(queries).__name__}. Fix: wrap a single query in a list.")
    ids = list(corpus) if isinstance(corpus, Mapping) else list(range(len(corpus)))
    documents = [corpus[i] for i in ids]
    rerank_k = top_k if rerank_k is None else rerank_k
    if not 0 < rerank_k <= top_k:
        raise ValueError(f"rerank_k={rerank_k}: use 1 <= rerank_k <= top_k ({top_k}).")
    if corpus_embeddings is None:
        corpus_embeddings = bi_encoder.encode(documents, side="document", batch_size=batch_size)
    elif len(corpus_embeddings) != len(ids):
        raise ValueError(f"corpus_embeddings has {len(corpus_embeddings)} rows for {len(ids)} documents.")
    query_embeddings = bi_encoder.encode(list(queries), side="query", batch_size=batch_size)
    similarity, best = core.top_k(core.scorer_of(bi_encoder), query_embeddings, corpus_embeddings, top_k)
    best, similarity = best.tolist(), similarity.tolist()
    pairs = [(query, documents[j]) for query, row in zip(queries, best) for j in row[:rerank_k]]
    scores = reranker.score(pairs, batch_size=rerank_batch_size).float().tolist() if pairs else []
    groups = core.split_groups(scores, [len(row[:rerank_k]) for row in best])
    results = []
    for row, retrieved, group, ranked in zip(best, similarity, groups, core.rank_groups(groups)):
        out = [{"corpus_id": ids[row[i]], "score": group[i], "retrieval_score": retrieved[i]} for i in ranked]
        out += [{"corpus_id": ids[j], "score": None, "retrieval_score": r} for j, r in
                zip(row[rerank_k:], retrieved[rerank_k:])]
        results.append(out)
    return results


def score_with_teacher(reranker: Any, dataset: Any, *, batch_size: int = 16, column: str | None = None) -> Any:
    """``dataset`` with the reranker's scores of each row's documents: grouped rows (query, positive, negatives)
    get ``teacher_scores`` (positive first), pointwise rows (query, document) get ``teacher_score``.

    Text and image documents; batched through ``dataset.map``, whose cache (keyed by the dataset and the reranker's
    weights) makes a rerun, or a resumed run, reuse the scores instead of scoring again.
    """

    pointwise = "document" in dataset.column_names
    check_columns(dataset.column_names, ("query", "document") if pointwise else ("query", "positive"),
                  "score_with_teacher dataset (grouped: query/positive/negative_1..k; pointwise: query/document)")
    column = column or ("teacher_score" if pointwise else "teacher_scores")
    negatives = [] if pointwise else negative_columns(dataset.column_names)
    source = undecoded_images(dataset)

    def score(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        docs = [[row["document"]] if pointwise else [row["positive"], *(c for c, _ in negative_cells(row, negatives))]
                for row in rows]
        pairs = [(row["query"], doc) for row, group in zip(rows, docs) for doc in group]
        with progress.showing(False):  # datasets' map shows its own bar ("teacher scores")
            flat = reranker.score(pairs, batch_size=batch_size).float().tolist()
        out, start = [], 0
        for group in docs:
            out.append(flat[start] if pointwise else flat[start:start + len(group)])
            start += len(group)
        return {column: out}

    fingerprint = hashlib.sha256(json.dumps([getattr(source, "_fingerprint", ""), column, _weights_id(reranker)])
                                 .encode()).hexdigest()[:32]
    scored = source.map(score, batched=True, batch_size=batch_size, new_fingerprint=fingerprint,
                        desc="teacher scores")
    for name, feature in dataset.features.items():  # image columns decode again as they did (metadata only)
        if getattr(feature, "decode", None) is True:
            scored = scored.cast_column(name, feature)
    return scored


def _weights_id(model: Any) -> str:
    """An id of the model's weights: its saved checksums when loaded from a folder, else a hash of what it trains."""
    spec = getattr(model, "spec", None)
    if spec is not None and getattr(spec, "checksums", None):
        return json.dumps([spec.base_model, spec.checksums, spec.settings], sort_keys=True, default=str)
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if "lora_" in name or "head" in name or not getattr(model, "is_peft", False):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()
