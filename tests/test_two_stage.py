"""Retrieve, then rerank: the two-stage evaluator against a hand computation, retrieve_and_rerank against scoring
every candidate by hand, and teacher scores from a reranker (images included, cached by datasets)."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset, load_from_disk
from helpers import assert_rel_close
from images import solid
from test_reranking import _reranker

from hf_mm_rerank import BiEncoder
from hf_mm_rerank.retrieval.two_stage import RetrieveRerankEvaluator, retrieve_and_rerank, score_with_teacher


class Table:
    """A bi-encoder / reranker stand-in with fixed embeddings and scores, for hand-computed expectations."""

    def __init__(self, vectors=None, scores=None):
        self.vectors, self.scores, self.calls = vectors or {}, scores or {}, 0

    def encode(self, inputs, side="query", batch_size=32, **kwargs):
        return torch.tensor([self.vectors[x] for x in inputs], dtype=torch.float32)

    def score(self, pairs, batch_size=16, **kwargs):
        self.calls += 1
        return torch.tensor([self.scores[p] for p in pairs], dtype=torch.float32)


# Two queries, five documents. The retriever ranks q1: d1 d2 d3 | d4 d5 and q2: d3 d2 d1 | ... ; with top_k=3
# q1's relevant d4 is missed. The reranker reverses each candidate list.
VECTORS = {"q1": [1.0, 0.0], "q2": [0.0, 1.0], "d1": [0.9, 0.1], "d2": [0.8, 0.2], "d3": [0.7, 0.75],
           "d4": [0.1, 0.0], "d5": [0.0, 0.05]}
RELEVANT = {"q1": {"d1", "d4"}, "q2": {"d1"}}


def test_two_stage_metrics_equal_a_hand_computation():
    retriever = Table(VECTORS)
    reranker = Table(scores={("q1", "d1"): 0.1, ("q1", "d2"): 0.2, ("q1", "d3"): 0.3,
                             ("q2", "d3"): 0.1, ("q2", "d2"): 0.2, ("q2", "d1"): 0.3})
    queries, corpus = {"q1": "q1", "q2": "q2"}, {d: d for d in ("d1", "d2", "d3", "d4", "d5")}
    evaluator = RetrieveRerankEvaluator(retriever, queries, corpus, RELEVANT, top_k=3, k_values=(1, 3))
    metrics = evaluator(reranker)
    # Retriever: q1 -> d1 d2 d3 (d1 at 1, d4 missed), q2 -> d3 d2 d1 (d1 at 3).
    assert metrics["retriever_mrr@1"] == pytest.approx((1 + 0) / 2)
    assert metrics["retriever_recall@3"] == pytest.approx((0.5 + 1) / 2)
    # Reranked: q1 -> d3 d2 d1 (d1 at 3; d4 still missed), q2 -> d1 d2 d3 (d1 at 1).
    assert metrics["mrr@3"] == pytest.approx((1 / 3 + 1) / 2)
    assert metrics["recall@1"] == pytest.approx((0 + 1) / 2)
    ndcg_q1 = (1 / 2) / (1 + 1 / 1.584962500721156)  # gain at rank 3 over the ideal (two relevant)
    assert metrics["ndcg@3"] == pytest.approx((ndcg_q1 + 1) / 2)
    assert metrics["map@3"] == pytest.approx(((1 / 3) / 2 + 1) / 2)  # d4 missed still counts in q1's denominator
    assert metrics["recall@3"] == pytest.approx(0.75)  # the ceiling: the reranker can never find d4
    assert metrics["recall@3"] >= metrics["recall@1"]
    evaluator(reranker)
    assert reranker.calls == 2  # scored twice, but the retriever's candidates were computed once
    assert evaluator.candidates() == [[0, 1, 2], [2, 1, 0]]
    # The retriever is judged at every cut-off, also beyond the candidates it hands over.
    narrow = RetrieveRerankEvaluator(retriever, queries, corpus, RELEVANT, top_k=2, k_values=(1, 3))(reranker)
    assert narrow["retriever_recall@3"] == pytest.approx(0.75) and narrow["recall@2"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['query'\]"):
        score_with_teacher(reranker, Dataset.from_dict({"question": ["q1"], "positive": ["d1"]}))


def test_retrieve_and_rerank_orders_like_scoring_by_hand(tiny_path):
    embedder = BiEncoder.from_pretrained(tiny_path("clip"))
    reranker = _reranker(tiny_path("qwen2_vl"), head="yes_no")
    corpus = {name: solid(name) for name in ("red", "green", "blue", "yellow", "black")}
    queries = ["a red square", "a blue square"]
    results = retrieve_and_rerank(embedder, reranker, queries, corpus, top_k=4, rerank_k=3)
    embeddings = embedder.encode(list(corpus.values()), side="document")
    again = retrieve_and_rerank(embedder, reranker, queries, corpus, top_k=4, rerank_k=3,
                                corpus_embeddings=embeddings)
    assert again == results
    names = list(corpus)
    retrieval = embedder.encode(queries) @ embeddings.T
    for q, query in enumerate(queries):
        top = torch.sort(retrieval[q], descending=True, stable=True).indices[:4].tolist()
        by_hand = reranker.score([(query, corpus[names[j]]) for j in top[:3]]).tolist()
        expected = [names[top[i]] for i in sorted(range(3), key=lambda i: -by_hand[i])] + [names[top[3]]]
        assert [r["corpus_id"] for r in results[q]] == expected
        assert_rel_close([r["score"] for r in results[q][:3]], sorted(by_hand, reverse=True))
        assert results[q][3]["score"] is None
        assert results[q][0]["retrieval_score"] == pytest.approx(float(retrieval[q, names.index(expected[0])]),
                                                                 abs=1e-5)
    with pytest.raises(ValueError, match="rerank_k"):
        retrieve_and_rerank(embedder, reranker, queries, corpus, top_k=2, rerank_k=3)
    # Queries as {id: query}, as the evaluators take them: keyed results, the queries' texts encoded (not the keys).
    keyed = retrieve_and_rerank(embedder, reranker, {"q-red": queries[0], "q-blue": queries[1]}, corpus, top_k=4,
                                rerank_k=3)
    assert keyed == {"q-red": results[0], "q-blue": results[1]}
    with pytest.raises(TypeError, match="wrap a single query in a list"):
        retrieve_and_rerank(embedder, reranker, "a red square", corpus)


def test_teacher_scores_with_images_are_batched_and_cached(tiny_path, tmp_path):
    reranker = _reranker(tiny_path("qwen2_vl"), head="yes_no")
    rows = [{"query": f"a {c} square", "positive": solid(c), "negative_1": solid("black"), "negative_2": "text"}
            for c in ("red", "green", "blue")]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "rows"))
    data = load_from_disk(str(tmp_path / "rows"))
    calls = []
    real = reranker.score

    def counting(pairs, **kwargs):
        calls.append(len(pairs))
        return real(pairs, **kwargs)

    reranker.score = counting
    scored = score_with_teacher(reranker, data, batch_size=2)
    assert calls == [6, 3]  # batches of 2 rows x 3 documents, then the last row
    expected = real([(r["query"], d) for r in rows for d in (r["positive"], r["negative_1"], r["negative_2"])])
    got = torch.tensor([s for row in scored["teacher_scores"] for s in row])
    assert_rel_close(got, expected.float())
    assert scored.features["positive"].decode  # images decode as before
    score_with_teacher(reranker, data, batch_size=2)
    assert calls == [6, 3]  # the rerun reused the cached scores


# ----- the distillation recipe ---------------------------------------------------------------------------------
def _distill_argv(tiny_path, tmp_path, out):
    from test_recipes import CONFIGS, _json_data

    return ["--config", str(CONFIGS / "qwen3_vl_distill_2b.yaml"), "--model_name_or_path", tiny_path("clip"),
            "--teacher", tiny_path("qwen3_vl"), "--teacher_head", "yes_no", "--data_files",
            _json_data(tmp_path / "data"), "--eval_fraction", "0.25", "--output_dir", str(out), "--max_steps", "2",
            "--per_device_train_batch_size", "4", "--num_negatives", "2", "--mini_batch_size", "3", "--top_k", "3",
            "--use_cpu", "true", "--bf16", "false", "--dtype", "float32", "--dataloader_num_workers", "0",
            "--eval_strategy", "no", "--save_strategy", "no", "--query_prompt", "", "--max_pixels", "4096"]


def test_distill_recipe_runs_on_tiny_models(tiny_path, tmp_path, capsys):
    from test_recipes import _recipe

    recipe = _recipe("distill_reranker_to_bi_encoder")
    argv = _distill_argv(tiny_path, tmp_path, tmp_path / "out")
    from hf_mm_rerank.recipes_kit.cli import parse_with_config
    from hf_mm_rerank.recipes_kit.data import DataArguments, load_data

    data_args, training = parse_with_config((recipe.DistillArguments, DataArguments, recipe.PublishArguments,
                                             recipe.TrainingArguments), argv)[1::2]  # the recipe's own data split
    report = recipe.main(argv)
    for stage in ("before", "after"):
        assert {"eval_ndcg@10", "eval_retriever_ndcg@10", "eval_recall@3"} <= set(report[stage])
    # By hand, on the recipe's held-out rows: "before" is the untrained student (LoRA starts as the identity),
    # "after" the saved one; each retrieves its top 3, which the teacher reorders.
    from hf_mm_rerank import CrossEncoder, RetrievalEvaluator

    held = RetrievalEvaluator.from_dataset(load_data(data_args, seed=training.seed)[1])
    relevant, queries, corpus = [set(r) for r in held.relevant], list(held.queries), list(held.corpus)
    assert held.query_ids and all(relevant)
    teacher = CrossEncoder.from_pretrained(tiny_path("qwen3_vl"), head="yes_no", is_trainable=False).eval()
    for stage, student in (("before", BiEncoder.from_pretrained(tiny_path("clip"), query_prompt="", max_pixels=4096)),
                           ("after", BiEncoder.from_pretrained(str(tmp_path / "out")))):
        similarity = student.encode(queries) @ student.encode(corpus, side="document").T
        found, first, retrieved_first = [], [], []
        for q, rel in enumerate(relevant):
            top = torch.sort(similarity[q], descending=True, stable=True).indices[:3].tolist()
            scores = teacher.score([(queries[q], corpus[j]) for j in top]).tolist()
            best = top[max(range(3), key=lambda i: (scores[i], -i))]  # ties keep the retrieval order
            found.append(len(rel & {held.doc_ids[j] for j in top}) / len(rel))
            first.append(float(held.doc_ids[best] in rel) / len(rel))
            retrieved_first.append(float(held.doc_ids[top[0]] in rel) / len(rel))
        metrics = report[stage]
        assert metrics["eval_recall@3"] == pytest.approx(sum(found) / len(found)), stage  # the ceiling
        assert metrics["eval_recall@1"] == pytest.approx(sum(first) / len(first)), stage
        assert metrics["eval_retriever_recall@1"] == pytest.approx(sum(retrieved_first) / len(first)), stage
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert "| negatives per query | in-batch + 2 negative(s) (mined by the student, scored by the teacher reranker) |" in (
        tmp_path / "out" / "README.md").read_text()
    assert "Saved to" in capsys.readouterr().out


def test_distill_recipe_under_the_two_process_command(tiny_path, tmp_path):
    from test_scale_out import CPU_DDP, _launch

    out = tmp_path / "ddp"
    run = _launch("distill_reranker_to_bi_encoder", [*_distill_argv(tiny_path, tmp_path, out), *CPU_DDP], cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.count("Saved to") == 1 and "2 x CPU" in (out / "README.md").read_text()


def test_two_stage_evaluator_plugs_into_the_reranker_trainer(tiny_path, tmp_path):
    from helpers import args
    from images import COLORS, color_rows

    from hf_mm_rerank import CrossEncoderTrainer

    embedder = BiEncoder.from_pretrained(tiny_path("clip"))
    reranker = _reranker(tiny_path("qwen2_vl"), head="yes_no")
    queries = {c: f"a {c} square" for c in COLORS}
    corpus = {**{c: solid(c) for c in COLORS}, "note": "a page of text about squares"}  # images and text
    evaluator = RetrieveRerankEvaluator(embedder, queries, corpus, {c: {c} for c in COLORS}, top_k=4)
    trainer = CrossEncoderTrainer(model=reranker, args=args(tmp_path, max_steps=1, per_device_train_batch_size=2),
                                  train_dataset=Dataset.from_list(color_rows()), evaluator=evaluator)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert {"eval_ndcg@10", "eval_retriever_ndcg@10", "eval_recall@4"} <= set(after)
    assert after["eval_retriever_ndcg@10"] == before["eval_retriever_ndcg@10"]  # the same cached candidates
    # By hand: each query's 4 nearest documents by the embedder, reordered by the trained reranker's scores.
    names = list(corpus)
    similarity = embedder.encode(list(queries.values())) @ embedder.encode(list(corpus.values()), side="document").T
    found, first = 0, 0
    for q, colour in enumerate(queries):
        top = torch.sort(similarity[q], descending=True, stable=True).indices[:4].tolist()
        scores = reranker.score([(queries[colour], corpus[names[j]]) for j in top]).tolist()
        best = top[max(range(4), key=lambda i: (scores[i], -i))]  # ties keep the retrieval order
        found += names.index(colour) in top
        first += names[best] == colour
    assert after["eval_recall@4"] == pytest.approx(found / len(queries))
    assert after["eval_recall@1"] == pytest.approx(first / len(queries))
