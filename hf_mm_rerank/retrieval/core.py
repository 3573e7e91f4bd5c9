"""The one retrieval core, used by the evaluators, mining and retrieve-then-rerank: encode with the model, score
queries against the corpus in chunks with a running top-k (stable: equal scores keep the corpus order, exactly as one
sorted score matrix would), and split flat scores back into groups. The scorer is pluggable: dense dot products for
single-vector models, MaxSim (late interaction) for multi-vector ones.

Memory grows with queries x k plus one chunk of scores, not with queries x corpus.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .. import progress
from ..data.pipeline import undecoded_images
from ..data.streams import is_stream, stream_columns
from ..distributed import shard_kwargs, world

SCORE_BUDGET = 1 << 23  # scores (token-pair similarities, for MaxSim) computed at once: 32 MB, ~300 MB working set


@dataclass
class TokenEmbeddings:
    """Multi-vector embeddings: ``embeddings`` ``[N, T, d]`` (padded), ``mask`` ``[N, T]`` (True: a scored token).

    Example:
        >>> pages = model.encode(page_images, side="document")   # a MultiVectorEncoder's TokenEmbeddings
        >>> pages.embeddings.shape, pages.mask.shape, len(pages)  # [N, T, 128], [N, T], N
        >>> pages.tokens()                                        # scored vectors stored (the index size)
        >>> model.score(model.encode(["revenue in 2023"]), pages[:10])   # [1, 10] MaxSim scores
    """

    embeddings: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    def __getitem__(self, index: Any) -> TokenEmbeddings:
        """Rows ``index`` (a slice, list or tensor), trimmed to their longest token count."""
        embeddings, mask = self.embeddings[index], self.mask[index]
        if embeddings.dim() == 2:  # a single row
            embeddings, mask = embeddings[None], mask[None]
        width = int(mask.sum(1).max()) if mask.numel() else 0
        keep = torch.arange(mask.shape[1]) < width if mask.any() else torch.zeros(mask.shape[1], dtype=torch.bool)
        # rows are padded on the right after pack(): the first ``width`` positions hold every row's tokens
        return TokenEmbeddings(embeddings[:, keep], mask[:, keep])

    def tokens(self) -> int:
        """Stored vectors (the index size)."""
        return int(self.mask.sum())

    @staticmethod
    def pack(parts: Sequence[TokenEmbeddings]) -> TokenEmbeddings:
        """Concatenate, left-aligning every row's scored tokens and padding to the longest."""
        rows = [e[m] for part in parts for e, m in zip(part.embeddings, part.mask)]
        width = max((len(r) for r in rows), default=0)
        dim = parts[0].embeddings.shape[-1] if parts else 0
        embeddings = torch.zeros(len(rows), width, dim, dtype=parts[0].embeddings.dtype if parts else torch.float32)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, vectors in enumerate(rows):
            embeddings[i, :len(vectors)] = vectors
            mask[i, :len(vectors)] = True
        return TokenEmbeddings(embeddings, mask)


class Scorer(Protocol):
    """How a model's embeddings are scored: ``scores(queries, documents)`` gives ``[len(queries), len(documents)]``."""

    name: str

    def scores(self, queries: Any, documents: Any) -> torch.Tensor: ...

    def cost(self, queries: Any, documents: Any) -> int: ...

    def pairwise(self, queries: Any, documents: Any) -> torch.Tensor: ...

    def closeness(self, a: Any, b: Any) -> torch.Tensor: ...


class DenseScorer:
    """Dot products of single-vector embeddings (cosine for L2-normalised ones)."""

    name = "dot"

    def scores(self, queries: torch.Tensor, documents: torch.Tensor) -> torch.Tensor:
        return queries.float() @ documents.float().T

    def cost(self, queries: torch.Tensor, documents: torch.Tensor) -> int:
        return 1

    def pairwise(self, queries: torch.Tensor, documents: torch.Tensor) -> torch.Tensor:
        """``[N]``: query i against document i."""
        return (queries.float() * documents.float()).sum(-1)

    def closeness(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``[len(a), len(b)]`` cosine similarities: 1 for the same content (near-duplicate detection)."""
        normalize = torch.nn.functional.normalize
        return normalize(a.float(), dim=-1) @ normalize(b.float(), dim=-1).T


class MaxSimScorer:
    """Late interaction: for each query token its best document token, summed (ColBERT / ColPali)."""

    name = "maxsim"

    def scores(self, queries: TokenEmbeddings, documents: TokenEmbeddings) -> torch.Tensor:
        return maxsim(queries.embeddings, queries.mask, documents.embeddings, documents.mask)

    def cost(self, queries: TokenEmbeddings, documents: TokenEmbeddings) -> int:
        return max(1, queries.embeddings.shape[1] * documents.embeddings.shape[1])

    def pairwise(self, queries: TokenEmbeddings, documents: TokenEmbeddings) -> torch.Tensor:
        return torch.stack([self.scores(queries[i], documents[i])[0, 0] for i in range(len(queries))]) \
            if len(queries) else torch.empty(0)

    def closeness(self, a: TokenEmbeddings, b: TokenEmbeddings) -> torch.Tensor:
        """MaxSim of ``a`` against ``b`` over ``a``'s MaxSim with itself: 1 for the same content."""
        own = self.pairwise(a, a).clamp(min=1e-12)
        return self.scores(a, b) / own[:, None]


def maxsim(q: torch.Tensor, q_mask: torch.Tensor, d: torch.Tensor, d_mask: torch.Tensor) -> torch.Tensor:
    """``[Q, C]`` MaxSim scores of query tokens ``q`` ``[Q, Tq, d]`` against document tokens ``d`` ``[C, Td, d]``;
    masked document tokens never win a max, masked query tokens add nothing."""
    similarity = torch.einsum("qid,cjd->qcij", q.float(), d.float())
    similarity = similarity.masked_fill(~d_mask[None, :, None, :].to(similarity.device), float("-inf"))
    best = similarity.max(dim=-1).values.masked_fill(~q_mask[:, None, :].to(similarity.device), 0.0)
    return best.nan_to_num(neginf=0.0).sum(-1)  # a document without tokens scores 0


def grouped_maxsim(query: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """``[B, K]``: query i's MaxSim against its own K candidates ``[B, K, Td, d]``; zero vectors are not scored."""
    similarity = torch.einsum("bid,bkjd->bkij", query.float(), candidates.float())
    d_mask = candidates.abs().amax(-1) > 0
    q_mask = query.abs().amax(-1) > 0
    similarity = similarity.masked_fill(~d_mask[:, :, None, :], float("-inf"))
    best = similarity.max(dim=-1).values.masked_fill(~q_mask[:, None, :], 0.0)
    return best.nan_to_num(neginf=0.0).sum(-1)


DENSE = DenseScorer()
MAXSIM = MaxSimScorer()


def scorer_of(model: Any) -> Scorer:
    return getattr(model, "scorer", DENSE)


def encode(model: Any, inputs: Sequence[Any], side: str, batch_size: int, shard: bool) -> Any:
    """``model.encode`` with the evaluators' settings (sharded across ranks when asked and running several)."""
    return model.encode(inputs, side=side, batch_size=batch_size, **shard_kwargs(shard))


CHUNK_ROWS = 4096  # corpus documents read and encoded at a time by encode_corpus


class CorpusSource:
    """A corpus read chunk by chunk, so a corpus larger than memory can be encoded and searched.

    Accepts ``{doc_id: cell}`` (held as it is), a list of ``(doc_id, cell)`` tuples, a sequence of cells (ids
    0..n-1), a ``datasets.Dataset`` or
    ``IterableDataset`` (a stream: ``load_dataset(..., streaming=True)``) with an id column and a document column
    (``columns``; without the id column the row number is the id), or any re-iterable of ``(doc_id, cell)`` pairs
    (an object whose ``iter()`` starts again; a one-shot generator is refused, since every evaluation reads the
    corpus again). Only the ids are kept in memory; cells are read again for each encoding.
    """

    def __init__(self, corpus: Any, columns: tuple[str, str] = ("id", "document"), what: str = "corpus") -> None:
        from collections.abc import Mapping

        from datasets import Dataset, IterableDataset


        self.kind, self.what = None, what
        self.id_column, self.document_column = columns
        if isinstance(corpus, Mapping):
            self.kind, self.ids, self._cells = "cells", list(corpus), [corpus[d] for d in corpus]
        elif isinstance(corpus, (Dataset, IterableDataset)):
            names = stream_columns(corpus, what) if is_stream(corpus) else list(corpus.column_names)
            if self.document_column not in names:
                raise ValueError(f"{what}: no document column {self.document_column!r}; found {names}. Fix: pass "
                                 f"corpus_columns=(id column, document column), e.g. ('corpus-id', 'image').")
            self.kind = "stream" if is_stream(corpus) else "dataset"
            self._data = undecoded_images(corpus)  # images decoded as in training, chunk by chunk
            if self.id_column in names:
                ids = self._data.select_columns([self.id_column])
                self.ids = [row[self.id_column] for row in ids] if self.kind == "stream" else list(ids[self.id_column])
            else:
                self.ids = list(range(sum(1 for _ in self._data.select_columns([self.document_column]))
                                      if self.kind == "stream" else len(corpus)))
        elif isinstance(corpus, (list, tuple)) and corpus and all(isinstance(p, tuple) and len(p) == 2 for p in corpus):
            self.kind, self._pairs = "pairs", list(corpus)  # [(doc_id, cell), ...] (a cell is never a tuple)
            self.ids = [doc_id for doc_id, _ in corpus]
        elif hasattr(corpus, "__len__") and hasattr(corpus, "__getitem__") and not isinstance(corpus, (str, bytes)):
            self.kind, self.ids, self._cells = "cells", list(range(len(corpus))), list(corpus)  # a sequence of cells
        else:
            if iter(corpus) is corpus:
                raise TypeError(f"{what}: a one-shot iterator (a generator) can be read only once, and the corpus is "
                                "read again at every evaluation. Fix: pass a list, a dict, a datasets Dataset or "
                                "IterableDataset, or an object whose iter() starts again.")
            self.kind, self._pairs = "pairs", corpus
            self.ids = [doc_id for doc_id, _ in corpus]
        if len(set(self.ids)) != len(self.ids):
            from collections import Counter

            repeated = next(d for d, n in Counter(self.ids).items() if n > 1)
            raise ValueError(f"{what}: document ids repeat (e.g. {repeated!r}). Fix: one row per document id.")

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, doc_id: Any) -> bool:
        if not hasattr(self, "_id_set"):
            self._id_set = set(self.ids)
        return doc_id in self._id_set

    def __iter__(self) -> Any:
        """Every cell, in id order."""
        for chunk in self.chunks():
            yield from chunk

    def chunks(self, rows: int = CHUNK_ROWS) -> Any:
        """The cells, ``rows`` at a time, in id order."""
        if self.kind == "cells":
            for start in range(0, len(self._cells), rows):
                yield self._cells[start:start + rows]
        elif self.kind == "dataset":
            for start in range(0, len(self.ids), rows):
                yield self._data[start:start + rows][self.document_column]
        else:
            source = (row[self.document_column] for row in self._data) if self.kind == "stream" else (
                cell for _, cell in self._pairs)
            chunk: list[Any] = []
            for cell in source:
                chunk.append(cell)
                if len(chunk) == rows:
                    yield chunk
                    chunk = []
            if chunk:
                yield chunk

    def cells(self, indices: Sequence[int]) -> list[Any]:
        """The cells at ``indices`` (one pass over a stream)."""
        if self.kind == "cells":
            return [self._cells[i] for i in indices]
        if self.kind == "dataset":
            wanted = sorted(set(indices))
            found = dict(zip(wanted, self._data.select(wanted)[self.document_column]))
            return [found[i] for i in indices]
        wanted, found, position = set(indices), {}, 0
        for chunk in self.chunks():
            for cell in chunk:
                if position in wanted:
                    found[position] = cell
                position += 1
        return [found[i] for i in indices]


def encode_corpus(model: Any, source: CorpusSource, batch_size: int, shard: bool, *, store: str | None = None,
                  dtype: torch.dtype | str = torch.float32, chunk_rows: int = CHUNK_ROWS) -> Any:
    """The corpus's document embeddings, encoded ``chunk_rows`` documents at a time. With ``store`` (a folder),
    dense embeddings are written to a memory-mapped file there (``dtype`` float16 or float32; one file per process,
    rewritten at each call) and returned as a tensor over it, so the corpus's embeddings need not fit in memory:
    :func:`top_k` reads them one chunk at a time. Multi-vector (token) embeddings stay in memory."""
    import numpy as np

    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if dtype not in (torch.float16, torch.float32):
        raise ValueError(f"store_dtype / dtype={dtype}: corpus embeddings are stored as float16 or float32. Fix: "
                         "store_dtype='float16' (half the size) or 'float32'.")
    parts: list[Any] = []
    stored, written = None, 0
    with progress.bar(len(source), "Encoding the corpus", "documents") as shown:
        for chunk in source.chunks(chunk_rows):
            with progress.showing(False):  # one bar for the corpus, not one per chunk
                embeddings = encode(model, chunk, "document", batch_size, shard)
            shown.update(len(chunk))
            if isinstance(embeddings, TokenEmbeddings):
                if store is not None:
                    raise ValueError("store: token (multi-vector) embeddings are kept in memory; a store holds dense "
                                     "embeddings. Fix: leave store out (token_pooling shrinks the index).")
                parts.append(embeddings)
                continue
            if store is None:
                parts.append(embeddings.to(dtype))
                continue
            if stored is None:
                import os

                os.makedirs(store, exist_ok=True)
                name = f"corpus-rank{world()[0]}-{str(dtype).removeprefix('torch.')}.bin"
                stored = np.memmap(os.path.join(store, name), mode="w+", shape=(len(source), embeddings.shape[1]),
                                   dtype=np.float16 if dtype == torch.float16 else np.float32)
            stored[written:written + len(embeddings)] = embeddings.to(dtype).cpu().numpy()
            written += len(embeddings)
    if stored is not None:
        stored.flush()
        return torch.from_numpy(stored)
    if parts and isinstance(parts[0], TokenEmbeddings):
        return TokenEmbeddings.pack(parts)
    return torch.cat(parts) if parts else torch.empty(0, 0, dtype=dtype)


def _rows(embeddings: Any, start: int, stop: int) -> Any:
    return embeddings[start:stop]


def top_k(scorer: Scorer, queries: Any, corpus: Any, k: int, *, budget: int = SCORE_BUDGET,
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scores, indices)`` ``[len(queries), k]`` of each query's ``k`` best corpus entries, best first; among equal
    scores the lower corpus index first, exactly as a stable sort of the one ``queries x corpus`` matrix.

    Scored in blocks of queries x corpus chunks sized so that about ``budget`` scores (times token pairs, for MaxSim)
    exist at once; the running top-k holds ``queries x k``.
    """
    total_q, total_c = len(queries), len(corpus)
    k = min(k, total_c)
    out_scores = torch.empty(total_q, k)
    out_indices = torch.empty(total_q, k, dtype=torch.long)
    if not total_q or not k:
        return out_scores, out_indices
    per_pair = scorer.cost(_rows(queries, 0, 1), _rows(corpus, 0, 1))
    block = max(1, min(total_q, budget // max(1, per_pair * min(total_c, 1024))))
    for q_start in range(0, total_q, block):
        q_rows = _rows(queries, q_start, q_start + block)
        chunk = max(1, budget // max(1, len(q_rows) * per_pair))
        best_scores = torch.empty(len(q_rows), 0)
        best_indices = torch.empty(len(q_rows), 0, dtype=torch.long)
        for c_start in range(0, total_c, chunk):
            scores = scorer.scores(q_rows, _rows(corpus, c_start, c_start + chunk)).float().cpu()
            indices = torch.arange(c_start, c_start + scores.shape[1]).expand(len(q_rows), -1)
            merged_scores = torch.cat([best_scores, scores], dim=1)  # earlier (lower) indices first: ties keep them
            merged_indices = torch.cat([best_indices, indices], dim=1)
            order = torch.sort(merged_scores, dim=1, descending=True, stable=True).indices[:, :k]
            best_scores, best_indices = merged_scores.gather(1, order), merged_indices.gather(1, order)
        out_scores[q_start:q_start + len(q_rows)] = best_scores
        out_indices[q_start:q_start + len(q_rows)] = best_indices
    return out_scores, out_indices


def split_groups(flat: Sequence[float], sizes: Sequence[int]) -> list[list[float]]:
    """``flat`` cut into consecutive groups of ``sizes``."""
    groups, start = [], 0
    for size in sizes:
        groups.append(list(flat[start:start + size]))
        start += size
    return groups


def rank_groups(groups: Sequence[Sequence[float]]) -> list[list[int]]:
    """Per group, its positions best first; equal scores keep their order (a stable sort)."""
    return [sorted(range(len(group)), key=lambda j, g=group: -g[j]) for group in groups]


def pool_tokens(embeddings: TokenEmbeddings, factor: int) -> TokenEmbeddings:
    """Hierarchical token pooling: each row's token vectors clustered by Ward linkage (on the vectors) into at most
    ``len // factor`` groups, each group's mean L2-normalised. ``factor=1`` returns the embeddings as they are;
    factor 3 keeps about a third of the vectors (colpali-engine reports 97.8% of the retrieval score at 66.7% fewer).
    Needs scipy (``pip install scipy``)."""
    if factor < 1:
        raise ValueError(f"factor={factor}: pool at least 1 token per vector (1 = no pooling).")
    if factor == 1:
        return embeddings
    try:
        from scipy.cluster.hierarchy import fcluster, linkage
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("token pooling clusters with scipy: pip install scipy") from error
    rows = []
    for vectors, mask in zip(embeddings.embeddings, embeddings.mask):
        tokens = vectors[mask].float()
        if len(tokens) < 2:
            rows.append(tokens)
            continue
        groups = max(len(tokens) // factor, 1)
        labels = fcluster(linkage(tokens.numpy().astype("float64"), method="ward"), t=groups, criterion="maxclust")
        labels = torch.as_tensor(labels, dtype=torch.long) - 1
        pooled = torch.zeros(int(labels.max()) + 1, tokens.shape[1]).index_add_(0, labels, tokens)
        rows.append(torch.nn.functional.normalize(pooled, dim=-1))
    width = max((len(r) for r in rows), default=0)
    out = torch.zeros(len(rows), width, embeddings.embeddings.shape[-1])
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        out[i, :len(row)], mask[i, :len(row)] = row, True
    return TokenEmbeddings(out, mask)
