"""Distilling a reranker into a bi-encoder: both losses against hand computations, GradCache's gradients, and a
student whose candidate order moves toward the teacher's."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset
from helpers import args, assert_all_rel_close
from images import COLORS, solid
from peft import LoraConfig
from torch import nn

from hf_mm_rerank import BiEncoder, BiEncoderCollator, BiEncoderTrainer
from hf_mm_rerank.losses import EmbeddingDistillKLLoss, EmbeddingMarginMSELoss


class Fixed(nn.Module):
    """A model whose embeddings are given (the loss only needs ``model(*sides)``)."""

    def __init__(self, *embeddings):
        super().__init__()
        self.embeddings = [e.clone().requires_grad_(True) for e in embeddings]

    def forward(self, *sides):
        return tuple(self.embeddings)


def _embeddings():
    torch.manual_seed(0)
    q, p, n = torch.randn(2, 4), torch.randn(2, 4), torch.randn(4, 4)  # 2 rows, 2 negatives each
    teacher = torch.tensor([[3.0, 1.0, -2.0], [0.5, 2.0, 1.0]])
    return q, p, n, teacher


def _by_hand(q, p, n):
    return [[float(q[b] @ p[b])] + [float(q[b] @ n[2 * b + j]) for j in range(2)] for b in range(2)]


def test_margin_mse_equals_a_hand_computation():
    q, p, n, teacher = _embeddings()
    loss = EmbeddingMarginMSELoss(temperature=0.1)
    value = loss(Fixed(q, p, n), {"query": [1], "positive": [1], "negative": [1], "teacher": teacher})
    s = _by_hand(q, p, n)
    terms = [(10 * (s[b][0] - s[b][j]) - (teacher[b, 0] - teacher[b, j])) ** 2 for b in range(2) for j in (1, 2)]
    assert float(value) == pytest.approx(float(sum(terms)) / 4, rel=1e-5)


def test_distill_kl_equals_a_hand_computation():
    q, p, n, teacher = _embeddings()
    loss = EmbeddingDistillKLLoss(temperature=0.5, teacher_temperature=2.0)
    value = loss(Fixed(q, p, n), {"query": [1], "positive": [1], "negative": [1], "teacher": teacher})
    s = _by_hand(q, p, n)
    total = 0.0
    for b in range(2):
        t = [math.exp(x / 2.0) for x in teacher[b].tolist()]
        t = [x / sum(t) for x in t]
        z = [math.exp(x / 0.5) for x in s[b]]
        st = [x / sum(z) for x in z]
        total += sum(t[j] * math.log(t[j] / st[j]) for j in range(3))
    assert float(value) == pytest.approx(total / 2 * 4, rel=1e-5)
    with_contrastive = EmbeddingDistillKLLoss(temperature=0.5, teacher_temperature=2.0, contrastive_weight=0.5)
    extra = with_contrastive(Fixed(q, p, n), {"query": [1], "positive": [1], "negative": [1], "teacher": teacher})
    in_batch = with_contrastive.objective(q, p, n)
    assert float(extra) == pytest.approx(float(value) + 0.5 * float(in_batch), rel=1e-5)


def _rows(teacher_order=True):
    names = list(COLORS)
    rows = []
    for i, color in enumerate(names):
        a, b = names[(i + 1) % len(names)], names[(i + 3) % len(names)]
        # The teacher: the positive first, then the first negative well above the second.
        rows.append({"query": f"a {color} square", "positive": solid(color), "negative_1": solid(a),
                     "negative_2": solid(b), "teacher_scores": [4.0, 1.0, -3.0] if teacher_order else [0, 0, 0]})
    return rows


@pytest.mark.parametrize("loss_class", [EmbeddingMarginMSELoss, EmbeddingDistillKLLoss])
def test_grad_cache_gives_the_same_gradients(tiny_path, loss_class):
    model = BiEncoder.from_pretrained(tiny_path("clip"), lora_config=LoraConfig(r=4, init_lora_weights=False))
    rows = _rows()[:4]
    grads = []
    for mini in (None, 2):
        loss = loss_class(mini_batch_size=mini, contrastive_weight=0.3)
        batch = BiEncoderCollator(model, mini_batch_size=mini)(rows)
        model.zero_grad()
        loss(model, batch).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 4
    assert_all_rel_close(grads[1], grads[0])


def _agreement(model, rows) -> float:
    """Mean Kendall tau between the student's similarities over a row's candidates and the teacher's scores."""
    total = 0.0
    for row in rows:
        query = model.encode([row["query"]], side="query")
        docs = model.encode([row["positive"], row["negative_1"], row["negative_2"]], side="document")
        s, t = (query @ docs.T)[0].tolist(), row["teacher_scores"]
        pairs = [(i, j) for i in range(3) for j in range(i + 1, 3)]
        total += sum(math.copysign(1, (s[i] - s[j]) * (t[i] - t[j])) for i, j in pairs) / len(pairs)
    return total / len(rows)


def test_distillation_moves_the_student_toward_the_teacher(tiny_path, tmp_path):
    torch.manual_seed(0)
    model = BiEncoder.from_pretrained(tiny_path("clip"), lora_config=LoraConfig(r=8, lora_alpha=16))
    rows = _rows()
    before = _agreement(model, rows)
    # Temperature 0.2, not 0.5: at 0.5 the student's margins (cosines / 0.5) stay within 4, short of the teacher's 7,
    # so the loss saturated and the outcome sat near the bar. Measured (torch.manual_seed and args seed = 0..3, 30
    # steps): before -0.083 on every seed; after 0.83, 0.83, 0.75, 0.75 (at 0.5: 0.67, 0.67, 0.75, 0.67). The
    # smallest gain, 0.83, clears the bar of 0.5 by 0.33.
    trainer = BiEncoderTrainer(model=model, args=args(tmp_path, max_steps=30, learning_rate=1e-2,
                                                      per_device_train_batch_size=8),
                               train_dataset=Dataset.from_list(rows * 2), loss=EmbeddingMarginMSELoss(temperature=0.2))
    trainer.train()
    after = _agreement(model, rows)
    print(f"\nagreement with the teacher's order (mean Kendall tau): {before:.2f} -> {after:.2f}")  # README's figure
    assert after >= before + 0.5, (before, after)
    with pytest.raises(ValueError, match=r"no negative column\. Fix: mine them first \(mine_hard_negatives"):
        BiEncoderTrainer(model=model, args=args(tmp_path), loss=EmbeddingDistillKLLoss(),
                         train_dataset=Dataset.from_list([{"query": r["query"], "positive": r["positive"],
                                                           "teacher_scores": [1.0]} for r in rows]))
    with pytest.raises(ValueError, match="no teacher_scores / teacher_score_0..k column"):
        BiEncoderTrainer(model=model, args=args(tmp_path), loss=EmbeddingMarginMSELoss(),
                         train_dataset=Dataset.from_list([{k: v for k, v in r.items() if k != "teacher_scores"}
                                                          for r in rows]))
