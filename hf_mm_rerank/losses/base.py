"""What the trainers read from a loss, declared once: :class:`TrainerLoss` (the base of every hf_mm_rerank loss) and
:func:`loss_contract` (how the trainers and the dataset checks read it, from any ``nn.Module`` loss)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from torch import nn

from ..data.schema import GROUPED


class TrainerLoss(nn.Module):
    """Base of the hf_mm_rerank losses: an ``nn.Module`` called as ``loss(model, batch)`` that declares what the
    trainers need to know about it.

    Attributes:
        mini_batch_size: GradCache mini-batch (inputs, or ``Tokens(n)``); None for one forward per batch. When set,
            the collator builds mini-batches, the trainer leaves them on the CPU, and the loss adds the
            all-parameters term itself in its second pass.
        needs_groups: the loss compares each query's candidates, so rows need negatives (grouped rows).
        needs_teacher: the loss distils teacher scores, so rows need ``teacher_score(s)`` columns.
        last_masked: after each call, the (row, candidate) pairs this process masked as false negatives (logged by
            the trainers as ``masked_negatives``); None for a loss that masks nothing.

    A loss of your own need not inherit it: any ``nn.Module`` taking ``(model, batch)`` works, with these defaults
    for the attributes it does not have (see :func:`loss_contract`).

    Example:
        >>> class MyLoss(TrainerLoss):
        ...     needs_groups = True
        ...     def forward(self, model, batch): ...
    """

    mini_batch_size: Any = None
    needs_groups: bool = False
    needs_teacher: bool = False
    last_masked: int | None = None


@dataclass(frozen=True)
class LossContract:
    """What a loss declares (see :class:`TrainerLoss`), as read by the trainers and the dataset checks."""

    mini_batch_size: Any = None
    needs_groups: bool = False
    needs_teacher: bool = False


def loss_contract(loss: nn.Module | None) -> LossContract:
    """The one place the trainers and the dataset checks read a loss's declarations: a :class:`TrainerLoss` declares
    them; any other ``nn.Module`` (a user's own loss) gets each of these attributes it has, else the default
    (None / False)."""
    if isinstance(loss, TrainerLoss):
        return LossContract(loss.mini_batch_size, loss.needs_groups, loss.needs_teacher)
    return LossContract(**{f.name: getattr(loss, f.name, f.default) for f in fields(LossContract)})


def check_loss_fits(loss: nn.Module, name: str, layout: str, teacher: list[str]) -> None:
    """Before training: a loss that needs grouped rows or teacher scores refused, by name, on a dataset without them."""
    contract = loss_contract(loss)
    if contract.needs_groups and layout != GROUPED:
        raise ValueError(f"{name}: {type(loss).__name__} needs grouped rows (query, positive, negative_1..k); the "
                         "dataset is pointwise (query, document, label). Fix: use BinaryCrossEntropyLoss, or "
                         "group the rows (mine_hard_negatives() builds grouped rows).")
    if contract.needs_teacher and not teacher:
        raise ValueError(f"{name}: {type(loss).__name__} distils teacher scores, but the dataset has no "
                         "teacher_scores / teacher_score_0..k column. Fix: add the teacher's scores per document.")
