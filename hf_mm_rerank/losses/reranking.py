"""Reranker (cross-encoder) losses: pointwise BCE, listwise softmax, pairwise LambdaLoss, distillation.

Reranker batches are ``{"pairs": chunks, "targets": [N], "group_size": g, "teacher": [N]?}`` (see
:class:`~hf_mm_rerank.data.collators.CrossEncoderCollator`): grouped rows give ``g = 1 + k`` consecutive pairs
per query, positive first. With ``mini_batch_size`` a loss scores the pairs one mini-batch at a time
(GradCache): the same loss and gradients with the activation memory of one mini-batch, so large groups fit.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.minibatch import check_mini_batch_size
from ..distributed import batch_share, mean_over_ranks
from .base import TrainerLoss
from .grad_cache import grad_cached


class RerankingLoss(TrainerLoss):
    """Base class: scores the batch's pairs, then applies :meth:`objective` to ``[N]`` scores.

    Args:
        mini_batch_size: score this many pairs per forward pass with GradCache (None: all at once).
    """

    needs_groups = False
    needs_teacher = False
    normalizes_across_ranks = False  # True: objective() already divides by a global normaliser

    def __init__(self, mini_batch_size: int | None = None) -> None:
        super().__init__()
        self.mini_batch_size = check_mini_batch_size(mini_batch_size)

    def forward(self, model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
        if self.mini_batch_size:
            scores = grad_cached(model, batch, ["pairs"])["pairs"]
        else:
            scores = model(batch["pairs"])
        targets = batch["targets"].to(scores.device)
        teacher = batch.get("teacher")
        group_size = int(batch.get("group_size") or 1)
        if self.needs_groups and group_size < 2:
            raise ValueError(f"{type(self).__name__} compares documents within a query's group, but the batch is "
                             "pointwise (one document per row). Fix: use grouped rows (query, positive, "
                             "negative_1..k), or BinaryCrossEntropyLoss for pointwise rows.")
        if self.needs_teacher and teacher is None:
            raise ValueError(f"{type(self).__name__} distils teacher scores, but the rows have none. Fix: add "
                             "teacher_scores (a list, positive first) or teacher_score_0..k columns.")
        loss = self.objective(scores, targets, group_size, teacher.to(scores.device) if teacher is not None else None)
        if self.normalizes_across_ranks:
            return loss
        # Weighted by this rank's share of the global batch, so ranks with a smaller last batch weigh less in DDP's
        # gradient average (a no-op in one process and when ranks hold equal rows).
        return loss * batch_share(scores.shape[0], scores.device)

    def objective(self, scores: torch.Tensor, targets: torch.Tensor, group_size: int,
                  teacher: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


class BinaryCrossEntropyLoss(RerankingLoss):
    """Pointwise BCE on the logits against labels in [0, 1] (grouped rows: positive 1, negatives 0).

    Args:
        pos_weight: weight of the positive term; ``"auto"`` uses negatives per positive in the batch, which
            balances grouped rows with k hard negatives. None: 1.

    Example:
        >>> ds = Dataset.from_dict({"query": ["a red car", "a red car"], "document": ["car.jpg", "boat.jpg"],
        ...                         "label": [1.0, 0.0]})                  # pointwise rows, labels in [0, 1]
        >>> trainer = CrossEncoderTrainer(model=reranker, args=args, train_dataset=ds,
        ...                               loss=BinaryCrossEntropyLoss(pos_weight="auto"))
    """

    def __init__(self, pos_weight: float | str | None = None, mini_batch_size: int | None = None) -> None:
        super().__init__(mini_batch_size)
        if isinstance(pos_weight, str) and pos_weight != "auto" or isinstance(pos_weight, (int, float)) and pos_weight <= 0:
            raise ValueError(f"pos_weight must be a positive number, 'auto' or None; received {pos_weight!r}.")
        self.pos_weight = pos_weight

    def objective(self, scores: torch.Tensor, targets: torch.Tensor, group_size: int,
                  teacher: torch.Tensor | None) -> torch.Tensor:
        weight = self.pos_weight
        if weight == "auto":
            positives = targets.sum().clamp(min=1.0)
            weight = ((targets.numel() - positives) / positives).clamp(min=1.0)
        weight = torch.as_tensor(weight, device=scores.device, dtype=torch.float32) if weight is not None else None
        return F.binary_cross_entropy_with_logits(scores.float(), targets, pos_weight=weight)


class _TemperatureLoss(RerankingLoss):
    """A group loss whose scores are divided by a temperature before a softmax."""

    needs_groups = True

    def __init__(self, temperature: float = 1.0, mini_batch_size: int | None = None) -> None:
        super().__init__(mini_batch_size)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, received {temperature}.")
        self.temperature = temperature


class ListwiseSoftmaxLoss(_TemperatureLoss):
    """Softmax cross-entropy over each query's group (positive against its k negatives; graded targets
    become a target distribution).

    Args:
        temperature: divides the scores before the softmax.

    Example:
        >>> ds = Dataset.from_dict({"query": ["a red car"], "positive": ["car.jpg"],
        ...                         "negative_1": ["boat.jpg"], "negative_2": ["a blue bus"]})   # grouped rows
        >>> trainer = CrossEncoderTrainer(model=reranker, args=args, train_dataset=ds,
        ...                               loss=ListwiseSoftmaxLoss(temperature=0.5))
    """

    def objective(self, scores: torch.Tensor, targets: torch.Tensor, group_size: int,
                  teacher: torch.Tensor | None) -> torch.Tensor:
        logits = scores.float().view(-1, group_size) / self.temperature
        weights = targets.view(-1, group_size)
        total = weights.sum(-1, keepdim=True)
        keep = total.squeeze(-1) > 0  # groups without any relevant document carry no signal
        if not keep.any():
            return logits.sum() * 0.0
        distribution = weights[keep] / total[keep]
        return -(distribution * F.log_softmax(logits[keep], dim=-1)).sum(-1).mean()


class LambdaLoss(RerankingLoss):
    """Pairwise logistic loss over every (more relevant, less relevant) pair of a group, weighted by the
    NDCG change of swapping the two (LambdaRank); ``weighting=None`` gives plain RankNet.

    Args:
        weighting: ``"ndcg"`` (default) or None.
        sigma: slope of the pairwise logistic.

    Example:
        >>> ds = mine_hard_negatives(bi_encoder, ds)    # grouped rows: query, positive, negative_1 ... negative_4
        >>> trainer = CrossEncoderTrainer(model=reranker, args=args, train_dataset=ds,
        ...                               loss=LambdaLoss(weighting="ndcg", sigma=1.0))
    """

    needs_groups = True
    normalizes_across_ranks = True

    def __init__(self, weighting: str | None = "ndcg", sigma: float = 1.0, mini_batch_size: int | None = None) -> None:
        super().__init__(mini_batch_size)
        if weighting not in ("ndcg", None):
            raise ValueError(f"weighting must be 'ndcg' or None, received {weighting!r}.")
        self.weighting = weighting
        self.sigma = sigma

    def objective(self, scores: torch.Tensor, targets: torch.Tensor, group_size: int,
                  teacher: torch.Tensor | None) -> torch.Tensor:
        s = scores.float().view(-1, group_size)
        t = targets.view(-1, group_size)
        better = (t.unsqueeze(2) > t.unsqueeze(1)).float()  # [G, i, j]: i more relevant than j
        pair_loss = F.softplus(-self.sigma * (s.unsqueeze(2) - s.unsqueeze(1)))
        weight = better * self._swap_delta(s.detach(), t) if self.weighting == "ndcg" else better
        # Normalised by the pair weights of the global batch (their mean over ranks): DDP's gradient average is then
        # that of one process holding every group.
        return (weight * pair_loss).sum() / mean_over_ranks(weight.sum()).clamp(min=1e-12)

    @staticmethod
    def _swap_delta(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """|ΔNDCG| of swapping each pair in the current (score) order."""
        ranks = scores.argsort(dim=-1, descending=True).argsort(dim=-1).float()
        discount = 1.0 / torch.log2(ranks + 2.0)
        gain = targets.exp2() - 1.0
        ideal = (gain.sort(dim=-1, descending=True).values
                 / torch.log2(torch.arange(targets.shape[-1], device=targets.device) + 2.0)).sum(-1)
        delta = (gain.unsqueeze(2) - gain.unsqueeze(1)) * (discount.unsqueeze(2) - discount.unsqueeze(1))
        return delta.abs() / ideal.clamp(min=1e-12).view(-1, 1, 1)


class MarginMSELoss(RerankingLoss):
    """Distillation: the student's margin s(q, pos) - s(q, neg) regresses the teacher's margin (Hofstätter et
    al.), for every negative of a group.

    Example:
        >>> ds = score_with_teacher(teacher_reranker, ds)   # grouped rows get teacher_scores, positive first
        >>> trainer = CrossEncoderTrainer(model=reranker, args=args, train_dataset=ds, loss=MarginMSELoss())
    """

    needs_groups = True
    needs_teacher = True

    def objective(self, scores: torch.Tensor, targets: torch.Tensor, group_size: int,
                  teacher: torch.Tensor | None) -> torch.Tensor:
        s = scores.float().view(-1, group_size)
        t = teacher.view(-1, group_size)
        return F.mse_loss(s[:, :1] - s[:, 1:], t[:, :1] - t[:, 1:])


class DistillKLLoss(_TemperatureLoss):
    """Distillation: KL(teacher || student) between the softmax distributions over each group, scaled by T².

    Example:
        >>> ds = score_with_teacher(teacher_reranker, ds)   # grouped rows get teacher_scores, positive first
        >>> trainer = CrossEncoderTrainer(model=reranker, args=args, train_dataset=ds,
        ...                               loss=DistillKLLoss(temperature=2.0))
    """

    needs_teacher = True

    def objective(self, scores: torch.Tensor, targets: torch.Tensor, group_size: int,
                  teacher: torch.Tensor | None) -> torch.Tensor:
        student = F.log_softmax(scores.float().view(-1, group_size) / self.temperature, dim=-1)
        target = F.log_softmax(teacher.view(-1, group_size) / self.temperature, dim=-1)
        kl = F.kl_div(student, target, log_target=True, reduction="batchmean")
        return kl * self.temperature ** 2


RERANKING_LOSSES = {
    "bce": BinaryCrossEntropyLoss,
    "listwise": ListwiseSoftmaxLoss,
    "lambda": LambdaLoss,
    "margin_mse": MarginMSELoss,
    "kl": DistillKLLoss,
}

__all__ = ["RERANKING_LOSSES", "BinaryCrossEntropyLoss", "DistillKLLoss", "LambdaLoss", "ListwiseSoftmaxLoss",
           "MarginMSELoss", "RerankingLoss"]
