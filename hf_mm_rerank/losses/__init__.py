"""Training losses. Each is an ``nn.Module`` called as ``loss(model, batch)`` by the trainers.

- bi-encoders (:mod:`.contrastive`): :class:`ContrastiveLoss`, :class:`CachedContrastiveLoss` (GradCache),
  :class:`MatryoshkaLoss`, late interaction (:mod:`.late_interaction`): :class:`MaxSimContrastiveLoss`,
  :class:`MaxSimPairwiseLoss`, and distillation from teacher scores (:mod:`.distillation`):
  :class:`EmbeddingMarginMSELoss`, :class:`EmbeddingDistillKLLoss`;
- rerankers (:mod:`.reranking`): :class:`BinaryCrossEntropyLoss`, :class:`ListwiseSoftmaxLoss`,
  :class:`LambdaLoss`, :class:`MarginMSELoss`, :class:`DistillKLLoss`.

Each declares what the trainers read (:class:`TrainerLoss`: ``mini_batch_size``, ``needs_groups``,
``needs_teacher``); a loss of your own reads through :func:`loss_contract` with defaults for what it lacks.
"""

from .base import LossContract, TrainerLoss, loss_contract
from .contrastive import CachedContrastiveLoss, ContrastiveLoss, MatryoshkaLoss
from .distillation import EmbeddingDistillKLLoss, EmbeddingMarginMSELoss
from .grad_cache import grad_cached
from .late_interaction import MaxSimContrastiveLoss, MaxSimPairwiseLoss
from .reranking import (
    RERANKING_LOSSES,
    BinaryCrossEntropyLoss,
    DistillKLLoss,
    LambdaLoss,
    ListwiseSoftmaxLoss,
    MarginMSELoss,
    RerankingLoss,
)

__all__ = [
    "RERANKING_LOSSES",
    "BinaryCrossEntropyLoss",
    "CachedContrastiveLoss",
    "ContrastiveLoss",
    "DistillKLLoss",
    "EmbeddingDistillKLLoss",
    "EmbeddingMarginMSELoss",
    "LambdaLoss",
    "LossContract",
    "ListwiseSoftmaxLoss",
    "MarginMSELoss",
    "MatryoshkaLoss",
    "MaxSimContrastiveLoss",
    "MaxSimPairwiseLoss",
    "RerankingLoss",
    "TrainerLoss",
    "grad_cached",
    "loss_contract",
]
