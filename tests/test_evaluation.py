import math

import evaluate
import pytest
import torch

from hf_mm_rerank import RETRIEVAL_METRIC_PATH, RetrievalEvaluator, ranking_metrics


def test_metrics_equal_hand_computed_values():
    rankings = [["d2", "d1", "d3"], ["d3", "d2", "d1"]]
    relevant = [{"d1"}, {"d1", "d2"}]
    m = ranking_metrics(rankings, relevant, k_values=(1, 2), map_at=3)
    # query 1: first hit at rank 2; query 2: hits at ranks 2 and 3.
    assert m["mrr@1"] == 0.0
    assert m["mrr@2"] == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert m["recall@2"] == pytest.approx((1 + 0.5) / 2)
    ndcg_q1 = (1 / math.log2(3)) / 1.0
    ndcg_q2 = (1 / math.log2(3)) / (1 + 1 / math.log2(3))
    assert m["ndcg@2"] == pytest.approx((ndcg_q1 + ndcg_q2) / 2)
    ap_q1 = 1 / 2
    ap_q2 = (1 / 2 + 2 / 3) / 2
    assert m["map@3"] == pytest.approx((ap_q1 + ap_q2) / 2)


def test_queries_without_relevant_documents_are_skipped():
    m = ranking_metrics([["a"], ["b"]], [{"a"}, set()], k_values=(1,))
    assert m["mrr@1"] == 1.0


def test_evaluate_module_loads_offline_and_matches():
    metric = evaluate.load(RETRIEVAL_METRIC_PATH)
    preds = [["d2", "d1", "d3"], ["d3", "d2", "d1"]]
    refs = [["d1"], ["d1", "d2"]]
    got = metric.compute(predictions=preds, references=refs, k_values=[1, 2], map_at=3)
    want = ranking_metrics(preds, [set(r) for r in refs], (1, 2), 3)
    assert got == pytest.approx(want)


class _FixedModel:
    """encode() returns fixed vectors so the evaluator's ranking is known by hand."""

    def __init__(self, table):
        self.table = table

    def encode(self, inputs, side, batch_size):
        return torch.tensor([self.table[x] for x in inputs], dtype=torch.float)


def test_evaluator_ranks_by_dot_product():
    model = _FixedModel({"q1": [1, 0], "q2": [0, 1], "A": [0.9, 0.1], "B": [0.2, 0.8], "C": [0.5, 0.5]})
    ev = RetrievalEvaluator({"1": "q1", "2": "q2"}, {"a": "A", "b": "B", "c": "C"}, {"1": {"c"}, "2": {"b"}},
                            k_values=(1, 3))
    m = ev(model)
    # q1 ranks a, c, b (hit at 2); q2 ranks b first.
    assert m["mrr@1"] == pytest.approx(0.5)
    assert m["mrr@3"] == pytest.approx((0.5 + 1) / 2)


def test_evaluator_rejects_unknown_ids():
    with pytest.raises(ValueError, match="not in queries / corpus"):
        RetrievalEvaluator({"1": "q"}, {"a": "A"}, {"1": {"zzz"}})
