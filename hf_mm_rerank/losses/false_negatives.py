"""False negatives of the contrastive losses: the candidates taken out of a row's softmax (their logit set to -inf, as
sentence-transformers does), never counted as negatives.

- by content (:data:`~hf_mm_rerank.data.schema.CONTENT_IDS`, one hash per input: equal content, equal id), always when
  the batch has ids: for a query, every document whose content is its positive's (another row's positive, a hard
  negative, on any rank) and every positive of another row with the same query (a query with several positives); for a
  document (the ``doc_to_query`` direction), every query whose content is its own query's and every query of another
  row with the same positive. The same two relations serve ``query_to_query`` and ``doc_to_doc``.
- by margin, as sentence-transformers' ``GISTEmbedLoss`` (optional): a candidate whose guide similarity to the row's
  query (its positive, for ``doc_to_query`` / ``doc_to_doc``) is above ``guide_pos_sim - margin`` (absolute) or
  ``guide_pos_sim - |guide_pos_sim| * margin`` (relative), the row's own target excepted. The guide is the model itself
  (its similarities, detached) or a guide model's embeddings precomputed per row
  (:data:`~hf_mm_rerank.data.schema.GUIDE_EMBEDDINGS`), scored by cosine.

Every mask is computed from detached values (ids, guide scores): with GradCache the cached gradients stay exact.
Under ``torch.distributed`` the ids and guide embeddings are gathered in the order the embeddings are
(:func:`~hf_mm_rerank.distributed.gather_rows`, the same rank order and unpadding as ``gather_with_grad``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..distributed import gather_rows

QUERY_TO_DOC, QUERY_TO_QUERY, DOC_TO_QUERY, DOC_TO_DOC = "query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"
DIRECTIONS = (QUERY_TO_DOC, QUERY_TO_QUERY, DOC_TO_QUERY, DOC_TO_DOC)
QUERY_CANDIDATES = (QUERY_TO_QUERY, DOC_TO_QUERY)  # directions whose candidates are the (gathered) queries
HARDNESS_MODES = (None, "in_batch_negatives", "hard_negatives", "all_negatives")
MARGIN_STRATEGIES = ("absolute", "relative")
GUIDES = ("batch", "self")


@dataclass(frozen=True)
class Layout:
    """Where this rank's rows sit among the gathered candidates: documents are every rank's ``[positives (rows),
    negatives (rows * per_row, row-major)]`` in rank order, queries every rank's queries in rank order."""

    rows: int
    per_row: int
    doc_start: int
    query_start: int
    gather: bool

    def doc_targets(self, device: torch.device) -> torch.Tensor:
        return torch.arange(self.rows, device=device) + self.doc_start

    def query_targets(self, device: torch.device) -> torch.Tensor:
        return torch.arange(self.rows, device=device) + self.query_start

    def own_documents(self, columns: int, device: torch.device) -> torch.Tensor:
        """``[rows, columns]``: True at each row's own positive and own hard negatives."""
        rows, k = self.rows, self.per_row
        own = torch.zeros(rows, columns, dtype=torch.bool, device=device)
        index = torch.arange(rows, device=device)
        own[index, self.doc_start + index] = True
        if k:
            negatives = self.doc_start + rows + index[:, None] * k + torch.arange(k, device=device)
            own[index[:, None], negatives] = True
        return own

    def own_negatives(self, columns: int, device: torch.device) -> torch.Tensor:
        own = self.own_documents(columns, device)
        own[torch.arange(self.rows, device=device), self.doc_targets(device)] = False
        return own

    def gathered(self, x: torch.Tensor) -> torch.Tensor:
        return gather_rows(x) if self.gather else x


def flat(value: Any, device: torch.device) -> torch.Tensor | None:
    """A batch entry as one tensor on ``device``: a tensor, or a list of per-mini-batch tensors (concatenated)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        value = torch.cat([torch.as_tensor(v) for v in value]) if len(value) else None
        if value is None:
            return None
    return torch.as_tensor(value).to(device)


def _side(entry: dict[str, Any], name: str, key: str, rows: int, device: torch.device) -> torch.Tensor | None:
    value = flat(entry.get(name), device)
    if value is not None and value.shape[0] != rows:
        raise ValueError(f"batch['{key}']['{name}']: {value.shape[0]} rows for {rows} embeddings; the collator must "
                         "give one per input, row-major like the embeddings.")
    return value


@torch.no_grad()
def related_by_content(content_ids: dict[str, Any], layout: Layout, device: torch.device,
                       with_queries: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(documents [rows, M], queries [rows, N] or None)``: True where the candidate is relevant to the row by the
    batch's content ids (see the module docstring); the row's own target included (the caller protects it)."""
    rows, k = layout.rows, layout.per_row
    query = _side(content_ids, "query", "content_ids", rows, device).long()
    positive = _side(content_ids, "positive", "content_ids", rows, device).long()
    negative = _side(content_ids, "negative", "content_ids", rows * k, device) if k else None
    if k and negative is None:
        raise ValueError("batch['content_ids'] has no 'negative' ids, but the batch has negatives: the collator must "
                         "give every input's id (or no content_ids at all).")
    owner = torch.cat([query, query.repeat_interleave(k)])  # each document's row's query
    ids = positive if negative is None else torch.cat([positive, negative.long()])
    is_positive = (torch.arange(ids.shape[0], device=device) < rows).long()
    documents = layout.gathered(torch.stack([ids, owner, is_positive], 1))
    related_documents = (documents[:, 0][None] == positive[:, None]) | (
        documents[:, 2].bool()[None] & (documents[:, 1][None] == query[:, None]))
    if not with_queries:
        return related_documents, None
    queries = layout.gathered(torch.stack([query, positive], 1))
    related_queries = (queries[:, 0][None] == query[:, None]) | (queries[:, 1][None] == positive[:, None])
    return related_documents, related_queries


@torch.no_grad()
def guide_similarities(guide_embeddings: dict[str, Any], layout: Layout, directions: Sequence[str],
                       device: torch.device) -> dict[str, torch.Tensor]:
    """The guide's cosine similarities per direction, ``[rows, candidates]`` like the model's, from its precomputed
    embeddings (gathered across ranks as the model's are)."""
    if not guide_embeddings:
        raise ValueError("guide_margin with guide='batch' needs the guide model's embeddings in "
                         "batch['guide_embeddings'] ({'query', 'positive', 'negative'}). Fix: have the collator compute "
                         "them, or use guide='self' (the model's own similarities).")
    rows, k = layout.rows, layout.per_row

    def unit(name: str, count: int) -> torch.Tensor | None:
        value = _side(guide_embeddings, name, "guide_embeddings", count, device)
        return None if value is None else F.normalize(value.float(), dim=-1)

    query, positive = unit("query", rows), unit("positive", rows)
    negative = unit("negative", rows * k) if k else None
    if query is None or positive is None or (k and negative is None):
        raise ValueError(f"batch['guide_embeddings'] has {sorted(guide_embeddings)}: it needs 'query', 'positive' and "
                         "(when rows have negatives) 'negative'.")
    documents = layout.gathered(positive if negative is None else torch.cat([positive, negative]))
    sims = {QUERY_TO_DOC: query @ documents.T}
    queries = layout.gathered(query) if set(directions) & set(QUERY_CANDIDATES) else None
    if QUERY_TO_QUERY in directions:
        sims[QUERY_TO_QUERY] = query @ queries.T
    if DOC_TO_QUERY in directions:
        sims[DOC_TO_QUERY] = positive @ queries.T
    if DOC_TO_DOC in directions:
        sims[DOC_TO_DOC] = positive @ documents.T
    return sims


def above_margin(sims: dict[str, torch.Tensor], positive_sims: torch.Tensor, margin: float,
                 strategy: str) -> dict[str, torch.Tensor]:
    """GISTEmbedLoss' filter: per direction, True where the guide scores the candidate above the row's threshold."""
    threshold = positive_sims.view(-1, 1)
    bound = threshold - margin if strategy == "absolute" else threshold - threshold.abs() * margin
    return {direction: sim > bound for direction, sim in sims.items()}
