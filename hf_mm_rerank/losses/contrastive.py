"""Bi-encoder losses: contrastive (in-batch + hard negatives, cross-rank gather), GradCache, Matryoshka.

Bi-encoder batches are ``{"query": chunks, "positive": chunks, "negative": chunks?}`` (see the collators).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.minibatch import check_mini_batch_size
from ..distributed import gather_with_grad, world
from ..retrieval.core import grouped_maxsim, maxsim
from .base import TrainerLoss
from .grad_cache import grad_cached

Objective = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None"], torch.Tensor]

MAX_LOG_SCALE = math.log(100.0)  # a learnt temperature stays >= 1/100


class ContrastiveLoss(TrainerLoss):
    """InfoNCE over in-batch and hard negatives (MultipleNegativesRanking / CLIP-style loss).

    Each query is scored against every positive and negative in the global batch (other GPUs' included
    when ``gather_across_devices``); its own positive is the target.

    Args:
        temperature: softmax temperature (default 0.05), used as given. With ``learnable_temperature`` it is
            the start value of a trained log-scale, whose temperature is kept >= 1/100 like CLIP's.
        symmetric: add the document->query direction (positives scored against all queries).
        gather_across_devices: gather embeddings from all ranks so negatives span the global batch.
        normalize_by_query_length: for token embeddings (:class:`~hf_mm_rerank.MultiVectorEncoder`), MaxSim divided
            by the number of scored query tokens.

    Example:
        >>> trainer = BiEncoderTrainer(model=model, args=args, train_dataset=ds,
        ...                            loss=ContrastiveLoss(temperature=0.02, symmetric=True))
    """

    def __init__(self, temperature: float = 0.05, *, learnable_temperature: bool = False, symmetric: bool = False,
                 gather_across_devices: bool = True, normalize_by_query_length: bool = False) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, received {temperature}.")
        self.symmetric = symmetric
        self.normalize_by_query_length = normalize_by_query_length
        self.gather_across_devices = gather_across_devices
        log_scale = torch.tensor(math.log(1.0 / temperature))
        if learnable_temperature:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale, persistent=False)

    @property
    def scale(self) -> torch.Tensor:
        if isinstance(self.log_scale, nn.Parameter):
            # A learnt temperature is capped at 1/100, like CLIP's: the parameter itself is clamped (as open_clip does
            # after each step), so its gradient keeps flowing at the cap; a clamp inside the graph would give it a
            # zero gradient there for good (temperature=0.01 would never move).
            if self.log_scale.detach() > MAX_LOG_SCALE:
                with torch.no_grad():
                    self.log_scale.clamp_(max=MAX_LOG_SCALE)
            return self.log_scale.exp()
        return self.log_scale.exp()  # a fixed one is used as given

    @property
    def temperature(self) -> float:
        return float(1.0 / self.scale.detach())

    def forward(self, model: nn.Module, batch: dict[str, Any], objective: Objective | None = None) -> torch.Tensor:
        # One model call for every side: under DDP a step must run one forward per backward.
        sides = [batch[c] for c in ("query", "positive", "negative") if batch.get(c)]
        query, positive, *negative = model(*sides)
        return (objective or self.objective)(query, positive, negative[0] if negative else None)

    def similarity(self, query: torch.Tensor, documents: torch.Tensor) -> torch.Tensor:
        """``[Q, C]``: dot products of ``[N, D]`` embeddings, or MaxSim of ``[N, T, d]`` token embeddings."""
        return similarity(query, documents, self.normalize_by_query_length)

    def objective(self, query: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor | None) -> torch.Tensor:
        """The loss from embeddings: query ``[B, D]``, positive ``[B, D]``, negative ``[B*k, D]`` or None (token
        embeddings ``[B, T, d]`` alike, scored by MaxSim)."""
        gather = self.gather_across_devices
        documents = positive if negative is None else cat_rows([positive, negative])
        # Each rank's positives lead its own block of the gathered documents: targets start at that block.
        all_documents, block_start = gather_with_grad(documents) if gather else (documents, 0)
        scale = self.scale.to(query.device)
        labels = torch.arange(query.shape[0], device=query.device) + block_start
        loss = self.classify(scale * self.similarity(query, all_documents), labels)
        if self.symmetric:
            all_queries, offset = gather_with_grad(query) if gather else (query, 0)
            back = scale * self.similarity(positive, all_queries)
            loss = (loss + self.classify(back, torch.arange(positive.shape[0], device=query.device) + offset)) / 2
        # This rank's share of the global batch (1 when ranks hold equal rows): DDP's gradient average is then the
        # gradient of the mean over every query, also when the last batch leaves ranks with unequal rows.
        return loss * (documents.shape[0] * world()[1] / all_documents.shape[0]) if gather else loss


    def classify(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The loss of scaled scores ``[B, C]`` whose targets are ``labels``: softmax cross-entropy (InfoNCE)."""
        return F.cross_entropy(logits, labels)


def cat_rows(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate along rows; token embeddings ``[N, T, d]`` of different T are zero-padded (zeros are unscored)."""
    if parts[0].dim() < 3:
        return torch.cat(list(parts))
    width = max(p.shape[1] for p in parts)
    return torch.cat([F.pad(p, (0, 0, 0, width - p.shape[1])) for p in parts])


def similarity(query: torch.Tensor, documents: torch.Tensor, normalize_by_query_length: bool = False) -> torch.Tensor:
    """``[Q, C]`` scores: dot products, or for token embeddings (zero vectors: not scored) MaxSim, optionally over
    the number of scored query tokens."""
    if query.dim() < 3:
        return query.float() @ documents.float().T

    q_mask, d_mask = query.abs().amax(-1) > 0, documents.abs().amax(-1) > 0
    scores = maxsim(query, q_mask, documents, d_mask)
    return scores / q_mask.sum(1, keepdim=True).clamp(min=1) if normalize_by_query_length else scores


def candidate_scores(query: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                     normalize_by_query_length: bool = False) -> torch.Tensor:
    """``[rows, 1 + k]``: each query against its own positive and its k negatives (row-major ``[rows * k, ...]``);
    dot products, or MaxSim for token embeddings (optionally over the number of scored query tokens)."""
    rows = query.shape[0]
    if query.dim() < 3:
        candidates = torch.cat([positive.unsqueeze(1), negative.view(rows, -1, negative.shape[-1])], dim=1)
        return torch.einsum("bd,bkd->bk", query.float(), candidates.float())

    documents = cat_rows([positive, negative])
    candidates = torch.cat([documents[:rows].unsqueeze(1), documents[rows:].view(rows, -1, *documents.shape[1:])], 1)
    scores = grouped_maxsim(query, candidates)
    if normalize_by_query_length:
        scores = scores / (query.abs().amax(-1) > 0).sum(1, keepdim=True).clamp(min=1)
    return scores


class CachedContrastiveLoss(ContrastiveLoss):
    """GradCache version of :class:`ContrastiveLoss`: same loss and gradients, memory of one mini-batch.

    Pass 1 embeds every mini-batch without a graph; the loss is computed on those embeddings as leaves.
    When the Trainer calls ``backward``, a hook re-embeds each mini-batch with a graph and back-propagates
    the cached embedding gradients (same RNG state, same autocast). The collator featurizes mini-batches
    separately, and the trainer leaves them on the CPU: each moves to the device only when it is embedded.

    Args:
        mini_batch_size: inputs per forward pass (default 32).
        **kwargs: as :class:`ContrastiveLoss`.

    Example:
        >>> args = TrainingArguments("out", per_device_train_batch_size=1024)   # 1024 queries share their negatives
        >>> trainer = BiEncoderTrainer(model=model, args=args, train_dataset=ds,  # query, positive[, negative_1..k]
        ...                            loss=CachedContrastiveLoss(mini_batch_size=32, temperature=0.02))
    """

    def __init__(self, mini_batch_size: int = 32, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mini_batch_size = check_mini_batch_size(mini_batch_size, allow_none=False)

    def forward(self, model: nn.Module, batch: dict[str, Any], objective: Objective | None = None) -> torch.Tensor:
        leaves = grad_cached(model, batch, [c for c in ("query", "positive", "negative") if batch.get(c)])
        return (objective or self.objective)(leaves["query"], leaves["positive"], leaves.get("negative"))


class MatryoshkaLoss(TrainerLoss):
    """Applies a contrastive loss at several embedding sizes (Matryoshka Representation Learning).

    Embeddings are computed once; the wrapped loss's objective runs on each prefix ``[:, :dim]``
    (re-normalised), weighted by ``weights`` (default 1 each). Works with :class:`CachedContrastiveLoss`.

    Example:
        >>> loss = MatryoshkaLoss(ContrastiveLoss(), dims=[768, 256, 64])
    """

    def __init__(self, loss: ContrastiveLoss, dims: Sequence[int], weights: Sequence[float] | None = None,
                 renormalize: bool = True) -> None:
        super().__init__()
        if not dims or any(int(d) < 1 for d in dims):
            raise ValueError(f"dims must be positive sizes, received {list(dims)}.")
        if weights is not None and len(weights) != len(dims):
            raise ValueError(f"weights: expected {len(dims)} values (one per dim), received {len(weights)}.")
        self.loss = loss
        self.dims = [int(d) for d in dims]
        self.weights = list(weights) if weights is not None else [1.0] * len(self.dims)
        self.renormalize = renormalize

    @property
    def mini_batch_size(self) -> int | None:
        return self.loss.mini_batch_size

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        return self.loss(model, batch, objective=self.objective)

    def _cut(self, x: torch.Tensor | None, dim: int) -> torch.Tensor | None:
        if x is None:
            return None
        if dim > x.shape[-1]:
            raise ValueError(f"dims: {dim} is larger than the model's embedding size {x.shape[-1]}.")
        x = x[:, :dim]
        return F.normalize(x, dim=-1) if self.renormalize else x

    def objective(self, query: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor | None) -> torch.Tensor:
        return sum(w * self.loss.objective(self._cut(query, d), self._cut(positive, d), self._cut(negative, d))
                   for d, w in zip(self.dims, self.weights))
