import math

import evaluate
import pytest
import torch

from hf_mm_rerank import RETRIEVAL_METRIC_PATH, RetrievalEvaluator, ranking_metrics
from hf_mm_rerank.data.inputs import to_input


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


# ----- against an independent implementation (pytrec_eval, i.e. trec_eval) ----------------------------------
def _trec(rankings, qrels, measures):
    import pytrec_eval

    run = {q: {d: float(len(docs) - i) for i, d in enumerate(docs)} for q, docs in rankings.items()}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    names = next(iter(per_query.values())).keys()
    return {name: sum(per_query[q][name] for q in per_query) / len(per_query) for name in names}


def test_graded_metrics_equal_pytrec_eval():
    import random

    rng = random.Random(0)
    docs = [f"d{i}" for i in range(30)]
    rankings, qrels = {}, {}
    for q in range(25):
        rankings[f"q{q}"] = rng.sample(docs, 20)  # some relevant documents are never retrieved
        judged = rng.sample(docs, 8)
        qrels[f"q{q}"] = {d: rng.choice([0, 0, 1, 2, 3]) for d in judged}
        qrels[f"q{q}"][judged[0]] = 2  # at least one relevant per query
    ours = ranking_metrics([rankings[q] for q in qrels], [qrels[q] for q in qrels], k_values=(1, 5, 10), map_at=10)
    trec = _trec(rankings, qrels, {"ndcg_cut.1,5,10", "map_cut.10", "recall.1,5,10", "recip_rank"})
    for k in (1, 5, 10):
        assert ours[f"ndcg@{k}"] == pytest.approx(trec[f"ndcg_cut_{k}"], abs=1e-9)
        assert ours[f"recall@{k}"] == pytest.approx(trec[f"recall_{k}"], abs=1e-9)
    assert ours["map@10"] == pytest.approx(trec["map_cut_10"], abs=1e-9)
    full = ranking_metrics([rankings[q] for q in qrels], [qrels[q] for q in qrels], k_values=(20,))
    assert full["mrr@20"] == pytest.approx(trec["recip_rank"], abs=1e-9)


def test_grade_zero_is_not_relevant():
    graded = ranking_metrics([["a", "b"]], [{"a": 0, "b": 1}], k_values=(1, 2))
    assert graded["mrr@1"] == 0.0 and graded["recall@2"] == 1.0 and graded["mrr@2"] == 0.5


def test_map_divides_by_every_relevant_document():
    # 3 relevant documents, a cut-off of 2: trec_eval's map_cut_2 divides by 3, not by min(3, 2).
    m = ranking_metrics([["a", "b", "x"]], [{"a", "b", "c"}], k_values=(1,), map_at=2)
    assert m["map@2"] == pytest.approx((1 + 1) / 3)
    assert m["map@2"] == pytest.approx(_trec({"q": ["a", "b", "x"]}, {"q": {"a": 1, "b": 1, "c": 1}},
                                             {"map_cut.2"})["map_cut_2"])


def test_ties_are_broken_by_corpus_order_whatever_the_scores_backend_does():
    # Every document scores the same: the ranking is the corpus order, on every run and every corpus size.
    for size in (5, 50, 500):
        corpus = {f"d{i}": "same" for i in range(size)}
        model = _FixedModel({"q": [1.0, 0.0], "same": [0.5, 0.5]})
        last = RetrievalEvaluator({"q": "q"}, corpus, {"q": {f"d{size - 1}"}}, k_values=(1,), map_at=size)(model)
        first = RetrievalEvaluator({"q": "q"}, corpus, {"q": {"d0"}}, k_values=(1,), map_at=size)(model)
        assert first["mrr@1"] == 1.0 and last["map@" + str(size)] == pytest.approx(1 / size)


# ----- datasets shaped like real ones --------------------------------------------------------------------
class _PerfectModel:
    """Embeds each caption 'cap-<colour>-<j>' and each solid-colour image onto the colour's axis."""

    def encode(self, inputs, side, batch_size):
        from images import COLORS

        names = list(COLORS)
        out = torch.zeros(len(inputs), len(names))
        for i, cell in enumerate(inputs):
            colour = cell.split("-")[1] if isinstance(cell, str) else names[list(COLORS.values()).index(
                to_input(cell).image.getpixel((0, 0)))]
            out[i, names.index(colour)] = 1.0
        return out


@pytest.mark.parametrize("captions", [2, 5])
def test_a_perfect_model_scores_one_with_several_captions_per_image(captions):
    from datasets import Dataset
    from images import COLORS, solid

    rows = [{"query": f"cap-{c}-{j}", "positive": solid(c)} for c in COLORS for j in range(captions)]
    evaluator = RetrievalEvaluator.from_dataset(Dataset.from_list(rows))
    assert len(evaluator.corpus) == len(COLORS) and len(evaluator.queries) == len(COLORS) * captions
    metrics = evaluator(_PerfectModel())
    assert metrics["recall@1"] == 1.0 and metrics["ndcg@10"] == 1.0 and metrics["map@100"] == 1.0


def test_a_query_on_several_rows_is_relevant_to_all_their_positives():
    from datasets import Dataset
    from images import solid

    rows = [{"query": "cap-red-0", "positive": solid("red")}, {"query": "cap-red-0", "positive": solid("blue")},
            {"query": "cap-green-0", "positive": solid("green")}]
    evaluator = RetrievalEvaluator.from_dataset(Dataset.from_list(rows))
    assert [len(r) for r in evaluator.relevant] == [2, 1]
