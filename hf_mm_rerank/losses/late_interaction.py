"""Late-interaction losses for :class:`~hf_mm_rerank.MultiVectorEncoder` (token embeddings ``[N, T, d]``, zero
vectors unscored), scored by MaxSim.

- :class:`MaxSimContrastiveLoss`: InfoNCE over in-batch and hard negatives (colpali-engine's ``ColbertLoss`` without
  negatives; sentence-transformers' ``MultiVectorMultipleNegativesRankingLoss``), other GPUs' documents included;
- :class:`MaxSimPairwiseLoss`: ``softplus((s_negative - s_positive) / temperature)`` against the hardest in-batch
  negative (colpali-engine's ``ColbertPairwiseCELoss``), and with explicit negatives the mean over them mixed with that
  in-batch term (``ColbertPairwiseNegativeCELoss``).

Both take ``mini_batch_size`` (GradCache: token embeddings cached per mini-batch, the same gradients) and
``normalize_by_query_length`` (scores over the number of scored query tokens, colpali-engine's default). Distillation
from a reranker uses :class:`~hf_mm_rerank.losses.EmbeddingMarginMSELoss` / ``EmbeddingDistillKLLoss``, which score
token embeddings by MaxSim too.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.minibatch import check_mini_batch_size
from ..distributed import batch_share, gather_with_grad
from .contrastive import ContrastiveLoss, Objective, batch_extras, candidate_scores, similarity
from .false_negatives import Layout, flat, related_by_content
from .grad_cache import grad_cached


class MaxSimContrastiveLoss(ContrastiveLoss):
    """MaxSim InfoNCE: each query against every positive and hard negative of the (global) batch.

    Args:
        temperature: softmax temperature over the (normalised) MaxSim scores (default 0.02, colpali-engine's).
        normalize_by_query_length: divide each score by the query's number of scored tokens (default True).
        mini_batch_size: GradCache mini-batch size (None: one forward for the whole batch).
        **kwargs: as :class:`ContrastiveLoss` (``symmetric``, ``learnable_temperature``, ``gather_across_devices``).

    Example:
        >>> trainer = BiEncoderTrainer(model=multi_vector_model, args=args, train_dataset=pages,
        ...                            loss=MaxSimContrastiveLoss(mini_batch_size=8))
    """

    def __init__(self, temperature: float = 0.02, *, normalize_by_query_length: bool = True,
                 mini_batch_size: int | None = None, **kwargs: Any) -> None:
        super().__init__(temperature, normalize_by_query_length=normalize_by_query_length, **kwargs)
        self.mini_batch_size = check_mini_batch_size(mini_batch_size)

    def forward(self, model: nn.Module, batch: dict[str, Any], objective: Objective | None = None) -> torch.Tensor:
        if not self.mini_batch_size:
            return super().forward(model, batch, objective)
        leaves = grad_cached(model, batch, [c for c in ("query", "positive", "negative") if batch.get(c)])
        return (objective or self.objective)(leaves["query"], leaves["positive"], leaves.get("negative"),
                                             **batch_extras(batch))


class MaxSimPairwiseLoss(MaxSimContrastiveLoss):
    """Pairwise softplus on MaxSim: ``softplus((s_neg - s_pos) / temperature)``, against each query's hardest in-batch
    negative; with explicit negatives, ``(1 - in_batch_weight)`` x the mean over them ``+ in_batch_weight`` x the
    in-batch term. With the batch's ``content_ids``, copies of a row's positive (and the positives of other rows with
    the same query) are not taken as its hardest in-batch negative, and its hard negatives that are copies of its
    positive leave the mean (``last_masked`` counts both, as :class:`ContrastiveLoss`).

    Args:
        temperature: default 0.02 (colpali-engine's for the loss with negatives; its in-batch-only loss uses 1.0).
        in_batch_weight: weight of the in-batch term when rows have negatives (default 0.5).
        **kwargs: as :class:`MaxSimContrastiveLoss`.

    Example:
        >>> trainer = BiEncoderTrainer(model=multi_vector_model, args=args, train_dataset=pages,  # has negative_1..k
        ...                            loss=MaxSimPairwiseLoss(in_batch_weight=0.5, mini_batch_size=8))
    """

    def __init__(self, temperature: float = 0.02, *, in_batch_weight: float = 0.5, **kwargs: Any) -> None:
        # The softmax losses' options, at their defaults (a recipe passes symmetric=False, say), are no options here.
        defaults = {"directions": None, "partition_mode": None, "hardness_mode": None, "hardness_strength": 0.0,
                    "guide_margin": None, "margin_strategy": "absolute", "guide": "batch", "symmetric": False}
        unsupported = sorted(k for k in set(kwargs) & set(defaults) if kwargs[k] != defaults[k])
        kwargs = {k: v for k, v in kwargs.items() if k not in defaults}
        if unsupported:
            raise ValueError(f"MaxSimPairwiseLoss does not take {unsupported} (options of the softmax losses): use "
                             "MaxSimContrastiveLoss for them.")
        super().__init__(temperature, **kwargs)
        if not 0 <= in_batch_weight <= 1:
            raise ValueError(f"in_batch_weight={in_batch_weight}: use a weight in [0, 1].")
        self.in_batch_weight = in_batch_weight

    def objective(self, query: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor | None, *,
                  content_ids: dict[str, Any] | None = None, guide_embeddings: Any = None) -> torch.Tensor:
        rows = query.shape[0]
        gather = self.gather_across_devices
        all_positives, offset = gather_with_grad(positive) if gather else (positive, 0)
        scores = similarity(query, all_positives, self.normalize_by_query_length)
        own = torch.arange(rows, device=scores.device) + offset
        positive_scores = scores[torch.arange(rows, device=scores.device), own]
        others = scores.clone()
        others[torch.arange(rows, device=scores.device), own] = float("-inf")
        duplicates, explicit_duplicates = None, None
        if self.mask_duplicates and content_ids:
            # The positives only: ids of the positive side, gathered as the positives are.
            positive_ids = {"query": content_ids["query"], "positive": content_ids["positive"]}
            duplicates, _ = related_by_content(positive_ids, Layout(rows, 0, offset, 0, gather), scores.device, False)
            duplicates[torch.arange(rows, device=scores.device), own] = False
            others = others.masked_fill(duplicates, float("-inf"))
        scale = self.scale.to(scores.device)
        loss = F.softplus((others.max(dim=1).values - positive_scores) * scale).mean()
        if negative is not None:
            grouped = candidate_scores(query, positive, negative, self.normalize_by_query_length)
            pairs = F.softplus((grouped[:, 1:] - grouped[:, :1]) * scale)
            if duplicates is not None:  # a hard negative that is a copy of the row's positive leaves the mean
                negative_ids = flat(content_ids.get("negative"), scores.device)
                if negative_ids is None or negative_ids.numel() != pairs.numel():
                    raise ValueError("batch['content_ids'] needs one 'negative' id per negative.")
                positive_ids = flat(content_ids["positive"], scores.device)
                explicit_duplicates = negative_ids.view_as(pairs) == positive_ids.view(-1, 1)
                kept = (~explicit_duplicates).float()
                explicit = (pairs * kept).sum() / kept.sum().clamp(min=1)
            else:
                explicit = pairs.mean()
            loss = (1 - self.in_batch_weight) * explicit + self.in_batch_weight * loss
        self.last_masked = sum(int(m.sum()) for m in (duplicates, explicit_duplicates) if m is not None)
        return loss * batch_share(rows, scores.device)
