"""Late interaction: MaxSim scores and losses against colpali-engine 0.3.18 and sentence-transformers 6.2 (test
extras), GradCache, the chunked retrieval core, token pooling, and the saved model in sentence-transformers'
MultiVectorEncoder; a colpali-engine ColQwen2 checkpoint loads with equal token embeddings."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from helpers import assert_all_rel_close, assert_rel_close
from images import COLORS, color_rows, solid
from peft import LoraConfig

from hf_mm_rerank import (
    BiEncoderCollator,
    MaxSimContrastiveLoss,
    MaxSimPairwiseLoss,
    MultiVectorEncoder,
    RetrievalEvaluator,
    TokenEmbeddings,
    pool_tokens,
)
from hf_mm_rerank.retrieval.core import DENSE, MAXSIM, maxsim, top_k

LORA = dict(r=4, lora_alpha=8, init_lora_weights=False)


def _tokens(n, t, d=16, seed=0, pad_to=None):
    """``n`` rows of ``t`` unit vectors; with ``pad_to``, rows of random lengths zero-padded to it."""
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, pad_to or t, d, generator=g), dim=-1)
    if pad_to:
        lengths = torch.randint(1, pad_to + 1, (n,), generator=g)
        x = x * (torch.arange(pad_to)[None, :] < lengths[:, None]).unsqueeze(-1)
    return x


# ----- scores and losses against the two reference libraries -----------------------------------------------------
def test_maxsim_equals_colpali_engine_and_sentence_transformers():
    from colpali_engine.utils.maxsim import _torch_maxsim
    from sentence_transformers.util import maxsim as st_maxsim

    q, d = _tokens(4, 5, seed=1), _tokens(6, 7, seed=2)
    ones = torch.ones(4, 5, dtype=torch.bool), torch.ones(6, 7, dtype=torch.bool)
    assert_rel_close(maxsim(q, ones[0], d, ones[1]), _torch_maxsim(q, d))
    qp, dp = _tokens(4, 0, seed=3, pad_to=6), _tokens(5, 0, seed=4, pad_to=9)  # zero padding, masked
    masks = qp.abs().amax(-1) > 0, dp.abs().amax(-1) > 0
    assert_rel_close(maxsim(qp, masks[0], dp, masks[1]), st_maxsim(qp, dp, a_mask=masks[0], b_mask=masks[1]))


def _value_and_grads(fn, *tensors):
    tensors = [t.clone().requires_grad_(True) for t in tensors]
    value = fn(*tensors)
    value.backward()
    return value.detach(), {str(i): t.grad for i, t in enumerate(tensors)}


@pytest.mark.parametrize("case", ["inbatch", "pairwise", "pairwise-negatives"])
def test_losses_equal_colpali_engine(case):
    from colpali_engine.loss.late_interaction_losses import (
        ColbertLoss,
        ColbertPairwiseCELoss,
        ColbertPairwiseNegativeCELoss,
    )

    q, p, n = _tokens(4, 6, seed=5), _tokens(4, 8, seed=6), _tokens(8, 8, seed=7)  # 2 negatives per query
    if case == "inbatch":
        ours = MaxSimContrastiveLoss(temperature=0.02)
        theirs = ColbertLoss(temperature=0.02, normalize_scores=True)
        got = _value_and_grads(lambda a, b: ours.objective(a, b, None), q, p)
        want = _value_and_grads(lambda a, b: theirs(a, b), q, p)
    elif case == "pairwise":
        ours = MaxSimPairwiseLoss(temperature=0.5)
        theirs = ColbertPairwiseCELoss(temperature=0.5, normalize_scores=True)
        got = _value_and_grads(lambda a, b: ours.objective(a, b, None), q, p)
        want = _value_and_grads(lambda a, b: theirs(a, b), q, p)
    else:
        ours = MaxSimPairwiseLoss(temperature=0.02, in_batch_weight=0.5)
        theirs = ColbertPairwiseNegativeCELoss(temperature=0.02, normalize_scores=True, in_batch_term_weight=0.5)
        got = _value_and_grads(lambda a, b, c: ours.objective(a, b, c), q, p, n)
        want = _value_and_grads(lambda a, b, c: theirs(a, b, c.view(4, 2, 8, 16)), q, p, n)
    assert_rel_close(got[0], want[0])
    assert_all_rel_close(got[1], want[1])


def test_contrastive_loss_with_hard_negatives_equals_sentence_transformers():
    """sentence-transformers' MultiVectorMultipleNegativesRankingLoss (its scoring and cross-entropy), on token
    counts that differ between rows (zero-padded here, masked there)."""
    from sentence_transformers.multi_vector_encoder.scoring import colbert_scores

    q, p, n = _tokens(4, 0, seed=8, pad_to=5), _tokens(4, 0, seed=9, pad_to=7), _tokens(4, 0, seed=10, pad_to=7)
    scale = 3.0
    got = _value_and_grads(lambda a, b, c: MaxSimContrastiveLoss(temperature=1 / scale, normalize_by_query_length=False)
                           .objective(a, b, c), q, p, n)

    def st_loss(a, b, c):
        documents = torch.stack([b, c], dim=1)  # [Q, N, Td, d]: query-major groups, positive first
        scores = colbert_scores(a, documents, a.abs().amax(-1) > 0, documents.abs().amax(-1) > 0)
        return F.cross_entropy(scores * scale, torch.arange(4) * 2)

    want = _value_and_grads(st_loss, q, p, n)
    assert_rel_close(got[0], want[0])
    assert_all_rel_close(got[1], want[1])


@pytest.mark.parametrize("family", ["qwen2_vl", "clip"])
def test_gradcache_gives_the_uncached_gradients(tiny_path, family):
    model = MultiVectorEncoder.from_pretrained(tiny_path(family), lora_config=LoraConfig(**LORA))
    rows = [{**row, "query": row["query"] + " now" * i} for i, row in enumerate(color_rows(negatives=1))]
    results = []
    for loss in (MaxSimContrastiveLoss(), MaxSimContrastiveLoss(mini_batch_size=3)):
        model.zero_grad()
        value = loss(model, BiEncoderCollator(model, mini_batch_size=loss.mini_batch_size)(rows))
        value.backward()
        results.append((value.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (plain, g1), (cached, g2) = results
    assert any("custom_text_proj" in name for name in g1)  # the projection trains (modules_to_save)
    assert_rel_close(cached, plain)
    assert_all_rel_close(g2, g1)


# ----- the retrieval core -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["dense", "maxsim"])
def test_chunked_top_k_equals_one_sorted_matrix_ties_included(kind):
    if kind == "dense":
        queries, corpus = F.normalize(torch.randn(7, 8), dim=-1), F.normalize(torch.randn(40, 8), dim=-1)
        corpus[20:30] = corpus[5]  # ten exact ties with document 5
        scorer, full = DENSE, queries @ corpus.T
    else:
        q, c = _tokens(7, 0, seed=11, pad_to=4), _tokens(40, 0, seed=12, pad_to=6)
        c[20:30] = c[5]
        queries = TokenEmbeddings(q, q.abs().amax(-1) > 0)
        corpus = TokenEmbeddings(c, c.abs().amax(-1) > 0)
        scorer, full = MAXSIM, maxsim(q, queries.mask, c, corpus.mask)
    expected = torch.sort(full, dim=1, descending=True, stable=True)
    for budget in (1, 50, 1 << 30):  # one document per chunk, a few, all at once
        scores, indices = top_k(scorer, queries, corpus, 15, budget=budget)
        assert torch.equal(indices, expected.indices[:, :15])  # the same documents in the same order, ties included
        assert_rel_close(scores, expected.values[:, :15])  # (a chunk's matmul rounds like the whole one, to 1e-7)


def test_the_chunked_evaluator_equals_one_matrix_and_pytrec_eval(tiny_path, monkeypatch):
    import pytrec_eval

    import hf_mm_rerank.retrieval.core as core

    model = MultiVectorEncoder.from_pretrained(tiny_path("qwen2_vl"), lora_config=LoraConfig(**LORA))
    queries = {c: f"a {c} square" for c in COLORS}
    corpus = {c: solid(c) for c in COLORS} | {f"text-{c}": f"{c} paint" for c in COLORS}
    relevant = {c: {c, f"text-{c}"} for c in COLORS}
    evaluator = RetrievalEvaluator(queries, corpus, relevant, k_values=(1, 5, 10), batch_size=5)
    one_matrix = evaluator(model)
    monkeypatch.setattr(core, "SCORE_BUDGET", 64)  # a corpus chunk of one or two documents at a time
    monkeypatch.setattr(core.top_k, "__kwdefaults__", {"budget": 64})
    assert evaluator(model) == one_matrix
    scores = model.score(model.encode(list(queries.values())), model.encode(list(corpus.values()), side="document"))
    run = {q: {d: float(s) for d, s in zip(corpus, row)} for q, row in zip(queries, scores)}
    trec = pytrec_eval.RelevanceEvaluator({q: {d: 1 for d in docs} for q, docs in relevant.items()},
                                          {"ndcg_cut.10", "recall.5"}).evaluate(run)
    assert one_matrix["ndcg@10"] == pytest.approx(sum(r["ndcg_cut_10"] for r in trec.values()) / len(trec), abs=1e-9)
    assert one_matrix["recall@5"] == pytest.approx(sum(r["recall_5"] for r in trec.values()) / len(trec), abs=1e-9)


def test_token_pooling():
    x = _tokens(3, 0, seed=13, pad_to=12)
    embeddings = TokenEmbeddings(x, x.abs().amax(-1) > 0)
    assert pool_tokens(embeddings, 1) is embeddings  # factor 1: the identity
    pooled = pool_tokens(embeddings, 3)
    assert pooled.mask.sum(1).tolist() == [max(n // 3, 1) if n > 1 else n for n in embeddings.mask.sum(1).tolist()]
    assert_rel_close(pooled.embeddings[pooled.mask].norm(dim=-1), torch.ones(int(pooled.mask.sum())))
    four = _tokens(1, 4, seed=14)
    twins = torch.cat([four, four], dim=1)  # every token twice: pooling by 2 finds the pairs
    pooled = pool_tokens(TokenEmbeddings(twins, torch.ones(1, 8, dtype=torch.bool)), 2)
    assert_rel_close(torch.sort(pooled.embeddings[0], dim=0).values, torch.sort(four[0], dim=0).values)


# ----- models ------------------------------------------------------------------------------------------------
def test_saved_folder_loads_in_sentence_transformers_multi_vector_encoder(tiny_path, tmp_path):
    from sentence_transformers import MultiVectorEncoder as STMultiVectorEncoder

    model = MultiVectorEncoder.from_pretrained(tiny_path("qwen2_vl"), lora_config=LoraConfig(**LORA),
                                               scored_tokens="all", query_prompt="Find the page.")
    model.save_pretrained(str(tmp_path / "mv"))
    again = MultiVectorEncoder.from_pretrained(str(tmp_path / "mv"))
    st = STMultiVectorEncoder(str(tmp_path / "mv"), device="cpu")
    queries, documents = ["a red square", "two cats"], [solid("red"), solid("blue", (90, 70)), "a page of text"]
    ours_q, ours_d = again.encode(queries), again.encode(documents, side="document")
    theirs_q = st.encode_query(queries)
    theirs_d = [st.encode_document([d])[0] for d in documents]
    for mine, theirs in zip([ours_q[i] for i in range(2)] + [ours_d[i] for i in range(3)], list(theirs_q) + theirs_d):
        assert_rel_close(mine.embeddings[0][mine.mask[0]], theirs)
    assert_rel_close(again.score(ours_q, ours_d), st.similarity(theirs_q, theirs_d))
    assert model.spec.sentence_transformers == []  # nothing sentence-transformers does differently


def test_a_colpali_engine_colqwen2_checkpoint_loads_with_equal_token_embeddings(tiny_path, tmp_path):
    from colpali_engine.models import ColQwen2, ColQwen2Processor
    from peft import get_peft_model
    from transformers import AutoProcessor

    tiny = AutoProcessor.from_pretrained(tiny_path("qwen2_vl"))
    processor = ColQwen2Processor(image_processor=tiny.image_processor, tokenizer=tiny.tokenizer,
                                  video_processor=tiny.video_processor, chat_template=tiny.chat_template)
    base = ColQwen2.from_pretrained(tiny_path("qwen2_vl")).eval()  # colpali-engine's own loading of the weights
    base.save_pretrained(tmp_path / "colqwen2-base")
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                 target_modules=["q_proj", "v_proj"], modules_to_save=["custom_text_proj"]))
    with torch.no_grad():
        peft_model.base_model.model.custom_text_proj.modules_to_save["default"].weight.add_(0.1)
    peft_model.save_pretrained(tmp_path / "colqwen2-adapter")
    processor.save_pretrained(tmp_path / "colqwen2-adapter")
    queries, images = ["a red square", "what is the revenue"], [solid("red", (56, 56)), solid("blue", (90, 70))]
    with torch.no_grad():
        colpali_q = peft_model(**processor.process_queries(queries))
        colpali_d = peft_model(**processor.process_images(images))
    ours = MultiVectorEncoder.from_pretrained(str(tmp_path / "colqwen2-adapter"))
    assert ours.featurizer.template == "colpali" and ours.featurizer.query_augmentation == 10
    for got, want in ((ours.encode(queries), colpali_q), (ours.encode(images, side="document"), colpali_d)):
        for i in range(len(want)):
            assert_rel_close(got[i].embeddings[0][got[i].mask[0]], want[i][want[i].abs().amax(-1) > 0])
    # ... and it fine-tunes from there: the adapter and the projection train.
    loss = MaxSimContrastiveLoss()(ours.train(), BiEncoderCollator(ours)(color_rows()))
    loss.backward()
    assert any(p.grad is not None for n, p in ours.named_parameters() if "custom_text_proj" in n)


def test_multi_vector_mining_and_retrieve_then_rerank(tiny_path):
    from test_reranking import _reranker

    from hf_mm_rerank import mine_hard_negatives, retrieve_and_rerank

    model = MultiVectorEncoder.from_pretrained(tiny_path("qwen2_vl"), lora_config=LoraConfig(**LORA))
    pairs = Dataset.from_list([{"query": f"a {c} square", "positive": solid(c)} for c in COLORS])
    mined = mine_hard_negatives(model, pairs, num_negatives=2, duplicate_threshold=0.999)
    assert len(mined) == len(COLORS) and mined.column_names == ["query", "positive", "negative_1", "negative_2"]
    corpus = {c: solid(c) for c in COLORS}
    scores = model.score(model.encode(list(pairs["query"])), model.encode(list(corpus.values()), side="document"))
    for row, query_scores in zip(mined, scores):
        own = list(corpus)[[solid(c).tobytes() for c in COLORS].index(row["positive"].tobytes())]
        ranked = [list(corpus)[j] for j in torch.sort(query_scores, descending=True, stable=True).indices.tolist()]
        picked = [list(corpus)[[solid(c).tobytes() for c in COLORS].index(row[f"negative_{k}"].tobytes())]
                  for k in (1, 2)]
        assert picked == [c for c in ranked if c != own][:2]  # the two best-scored documents but the positive
    reranker = _reranker(tiny_path("qwen2_vl"), head="yes_no")
    results = retrieve_and_rerank(model, reranker, {"q": "a red square"}, corpus, top_k=3)
    assert [r["retrieval_score"] for r in sorted(results["q"], key=lambda r: -r["retrieval_score"])] == \
        pytest.approx(torch.sort(scores[0], descending=True).values[:3].tolist(), abs=1e-5)


def test_token_pooling_in_the_evaluator_reports_the_index_size(tiny_path):
    model = MultiVectorEncoder.from_pretrained(tiny_path("clip"), lora_config=LoraConfig(**LORA))
    queries = {c: f"a {c} square" for c in COLORS}
    corpus, relevant = {c: solid(c, (64, 64)) for c in COLORS}, {c: {c} for c in COLORS}
    full = RetrievalEvaluator(queries, corpus, relevant)(model)
    pooled = RetrievalEvaluator(queries, corpus, relevant, token_pooling=3)(model)
    assert full["index_vectors"] == 8 * 17  # CLIP at 32 px, patch 8: a class token and 16 patches per image
    assert pooled["index_vectors"] == 8 * (17 // 3) and set(pooled) == set(full)
