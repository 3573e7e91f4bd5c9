"""Bi-encoder distillation: the embedder's similarities over each row's candidates (positive first, then its
negatives) learn the teacher's scores (e.g. a reranker's, from :func:`hf_mm_rerank.retrieval.two_stage.score_with_teacher`).

Rows carry ``teacher_scores`` (a list, positive first) or ``teacher_score_0 ... teacher_score_k``; the collator
puts them in ``batch["teacher"]`` as ``[rows, 1 + k]``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.minibatch import check_mini_batch_size
from ..distributed import batch_share
from .contrastive import ContrastiveLoss, batch_extras, candidate_scores
from .grad_cache import grad_cached


class _EmbeddingDistillation(ContrastiveLoss):
    needs_teacher = True
    needs_groups = True

    def __init__(self, *, contrastive_weight: float = 0.0, mini_batch_size: int | None = None,
                 **contrastive: Any) -> None:
        super().__init__(**contrastive)
        self.mini_batch_size = check_mini_batch_size(mini_batch_size)
        self.contrastive_weight = contrastive_weight

    def forward(self, model: nn.Module, batch: dict[str, Any], objective: Any = None) -> torch.Tensor:
        if "teacher" not in batch or not batch.get("negative"):
            raise ValueError(f"{type(self).__name__} needs rows with negatives and teacher scores (teacher_scores, "
                             "positive first). Fix: score_with_teacher(reranker, dataset) adds them.")
        names = ["query", "positive", "negative"]
        if self.mini_batch_size:  # GradCache: embeddings as leaves, gradients replayed mini-batch by mini-batch
            leaves = grad_cached(model, batch, names)
            query, positive, negative = (leaves[n] for n in names)
        else:
            query, positive, negative = model(*(batch[n] for n in names))
        student = self.student_scores(query, positive, negative)
        teacher = batch["teacher"].to(student.device, torch.float32).view_as(student)
        loss = self.distil(student, teacher) * batch_share(student.shape[0], student.device)
        if self.contrastive_weight:
            loss = loss + self.contrastive_weight * self.objective(query, positive, negative, **batch_extras(batch))
        return loss

    def student_scores(self, query: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        """``[rows, 1 + k]`` similarities of each query to its own positive and k negatives."""
        return candidate_scores(query, positive, negative, self.normalize_by_query_length)

    def distil(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class EmbeddingMarginMSELoss(_EmbeddingDistillation):
    """MarginMSE for a bi-encoder: the scaled similarity margins positive - negative_j match the teacher's margins,
    ``mean_j (scale * (s_pos - s_neg_j) - (t_pos - t_neg_j))^2`` with ``scale = 1 / temperature``.

    Args:
        temperature: the student's similarity scale is 1 / temperature (default 0.05, as for contrastive training).
        contrastive_weight: weight of an added in-batch :class:`ContrastiveLoss` term (default 0: none).
        mini_batch_size: GradCache mini-batches (same loss and gradients, the memory of one mini-batch).
        **contrastive: further :class:`ContrastiveLoss` settings of that term (``symmetric``, ...).

    Example:
        >>> ds = mine_hard_negatives(model, ds)         # query, positive -> + negative_1 ... negative_4
        >>> ds = score_with_teacher(reranker, ds)       # + teacher_scores (a list per row, positive first)
        >>> trainer = BiEncoderTrainer(model=model, args=args, train_dataset=ds,
        ...                            loss=EmbeddingMarginMSELoss(temperature=0.05, contrastive_weight=0.1))
    """

    def distil(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        scale = self.scale.to(student.device)
        margins = scale * (student[:, :1] - student[:, 1:])
        return F.mse_loss(margins, teacher[:, :1] - teacher[:, 1:])


class EmbeddingDistillKLLoss(_EmbeddingDistillation):
    """KL distillation for a bi-encoder: ``KL(softmax(t / teacher_temperature) || softmax(s / temperature))`` over
    each row's candidates, times ``teacher_temperature ** 2``.

    Args:
        temperature: the student's softmax temperature over its similarities (default 0.05).
        teacher_temperature: the teacher scores' temperature (default 1: logits as given).
        contrastive_weight, mini_batch_size, **contrastive: as for :class:`EmbeddingMarginMSELoss`.

    Example:
        >>> ds = score_with_teacher(reranker, mine_hard_negatives(model, ds))   # + negative_1..k, teacher_scores
        >>> trainer = BiEncoderTrainer(model=model, args=args, train_dataset=ds,
        ...                            loss=EmbeddingDistillKLLoss(temperature=0.05, teacher_temperature=2.0))
    """

    def __init__(self, *, teacher_temperature: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if teacher_temperature <= 0:
            raise ValueError(f"teacher_temperature must be > 0, received {teacher_temperature}.")
        self.teacher_temperature = teacher_temperature

    def distil(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        t = self.teacher_temperature
        log_student = F.log_softmax(student * self.scale.to(student.device), dim=-1)
        return F.kl_div(log_student, F.softmax(teacher / t, dim=-1), reduction="batchmean") * t * t
