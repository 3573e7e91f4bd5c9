"""Reranker data, losses, evaluation, hard-negative mining and a real-image reranking run."""

import math
import random

import pytest
import torch
from datasets import Dataset
from helpers import args, assert_all_rel_close, assert_rel_close, losses
from images import solid
from peft import LoraConfig
from test_cross_encoder import NAMES, PLAIN_PROMPT, red_rows

from hf_mm_rerank import (
    BiEncoder,
    CrossEncoder,
    CrossEncoderCollator,
    CrossEncoderTrainer,
    RerankingEvaluator,
    mine_hard_negatives,
)
from hf_mm_rerank.data.inputs import to_input
from hf_mm_rerank.losses import (
    BinaryCrossEntropyLoss,
    DistillKLLoss,
    LambdaLoss,
    ListwiseSoftmaxLoss,
    MarginMSELoss,
)


@pytest.fixture(scope="module")
def reranker_path(tiny_path):
    return tiny_path("qwen2_vl")


def _reranker(path, head="yes_no", **kwargs):
    return CrossEncoder.from_pretrained(path, head=head, **PLAIN_PROMPT, **kwargs)


# ----- collator -------------------------------------------------------------------------------------------
def test_grouped_rows_become_positive_first_groups(reranker_path):
    collator = CrossEncoderCollator(_reranker(reranker_path), mini_batch_size=3)
    rows = [{"query": "a red square", "positive": solid("red"), "negative_1": solid("blue"), "negative_2": "text",
             "teacher_scores": [2.0, 1.0, 0.0]}] * 2
    batch = collator(rows)
    assert batch["group_size"] == 3
    assert batch["targets"].tolist() == [1, 0, 0, 1, 0, 0]
    assert batch["teacher"].tolist() == [2, 1, 0, 2, 1, 0]
    assert [chunk["input_ids"].shape[0] for chunk in batch["pairs"]] == [3, 3]  # mini-batches of pairs
    pointwise = collator([{"query": "q", "document": solid("red"), "label": 0.5}])
    assert pointwise["group_size"] == 1 and pointwise["targets"].tolist() == [0.5]


def test_collator_runs_in_spawned_dataloader_workers(reranker_path):
    from torch.utils.data import DataLoader

    rr = _reranker(reranker_path)
    rows = red_rows(negatives=2, repeat=1)
    collator = CrossEncoderCollator(rr)
    loader = DataLoader(rows, batch_size=4, collate_fn=collator, num_workers=2, multiprocessing_context="spawn")
    batches = list(loader)
    assert batches[0]["targets"].tolist() == [1, 0, 0] * 4
    assert_rel_close(batches[0]["pairs"][0]["pixel_values"], collator(rows[:4])["pairs"][0]["pixel_values"])


@pytest.mark.parametrize("row, match", [
    ({"query": "q", "document": "d", "label": 2}, r"row 5, column 'label': received 2.*\[0, 1\]"),
    ({"query": "q", "document": "d", "label": "yes"}, r"column 'label': received 'yes'"),
    ({"query": "q", "positive": "p", "negative_1": None}, r"row 5, column 'negative_1': received None"),
    ({"query": "q", "positive": "p", "negative_1": "n", "teacher_score_0": 1.0}, r"teacher_score_0.*expected 2"),
    ({"query": "q", "positive": "p"}, r"no negative column"),
    ({"query": "q", "document": "d"}, r"missing column\(s\) \['label'\]"),
])
def test_bad_rows_name_the_row_and_column(reranker_path, row, match):
    with pytest.raises(ValueError, match=match):
        CrossEncoderCollator(_reranker(reranker_path))([{**row, "_row": 5}])  # the trainer adds _row


def test_loss_and_data_layout_are_checked_up_front(reranker_path, tmp_path):
    pointwise = Dataset.from_list([{"query": "q", "document": "d", "label": 1.0}])
    grouped = Dataset.from_list([{"query": "q", "positive": "p", "negative_1": "n"}])
    rr = _reranker(reranker_path)
    with pytest.raises(ValueError, match="ListwiseSoftmaxLoss needs grouped rows"):
        CrossEncoderTrainer(model=rr, args=args(tmp_path), train_dataset=pointwise, loss=ListwiseSoftmaxLoss())
    with pytest.raises(ValueError, match="MarginMSELoss distils teacher scores"):
        CrossEncoderTrainer(model=rr, args=args(tmp_path), train_dataset=grouped, loss=MarginMSELoss())
    assert isinstance(CrossEncoderTrainer(model=rr, args=args(tmp_path), train_dataset=grouped).loss, ListwiseSoftmaxLoss)
    assert isinstance(CrossEncoderTrainer(model=rr, args=args(tmp_path), train_dataset=pointwise).loss,
                      BinaryCrossEntropyLoss)


# ----- losses ---------------------------------------------------------------------------------------------
def _with_teacher(rows):
    return [{**row, "teacher_scores": [4.0, 1.0, 0.5, 0.0]} for row in rows]


@pytest.mark.parametrize("loss", [
    BinaryCrossEntropyLoss(pos_weight="auto"), ListwiseSoftmaxLoss(), LambdaLoss(), LambdaLoss(weighting=None),
    MarginMSELoss(), DistillKLLoss(temperature=2.0), ListwiseSoftmaxLoss(mini_batch_size=6),
], ids=["bce", "listwise", "lambda", "ranknet", "margin_mse", "kl", "listwise_cached"])
def test_each_loss_falls(reranker_path, tmp_path, loss):
    rr = _reranker(reranker_path, lora_config=LoraConfig(r=8, lora_alpha=16))
    data = Dataset.from_list(_with_teacher(red_rows()))
    trainer = CrossEncoderTrainer(model=rr, args=args(tmp_path, max_steps=8, learning_rate=3e-3), train_dataset=data,
                                  loss=loss)
    trainer.train()
    history = losses(trainer)
    assert sum(history[-2:]) / 2 < 0.8 * history[0], history


def test_losses_equal_hand_computed_values():
    scores = torch.tensor([2.0, 0.0, 1.0, -1.0, 0.5, 0.5])
    targets = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    teacher = torch.tensor([3.0, 1.0, 0.0, 2.0, 2.0, 1.0])
    listwise = ListwiseSoftmaxLoss().objective(scores, targets, 3, None)
    expected = -(math.log(math.exp(2) / (math.exp(2) + 1 + math.e)) +
                 math.log(math.exp(-1) / (math.exp(-1) + 2 * math.exp(0.5)))) / 2
    assert listwise.item() == pytest.approx(expected, rel=1e-5)
    margin = MarginMSELoss().objective(scores, targets, 3, teacher)
    assert margin.item() == pytest.approx(((2 - 2) ** 2 + (1 - 3) ** 2 + (-1.5 - 0) ** 2 + (-1.5 - 1) ** 2) / 4)
    ranknet = LambdaLoss(weighting=None).objective(scores, targets, 3, None)
    pairs = [2 - 0, 2 - 1, -1 - 0.5, -1 - 0.5]
    assert ranknet.item() == pytest.approx(sum(math.log1p(math.exp(-d)) for d in pairs) / 4, rel=1e-5)
    bce = BinaryCrossEntropyLoss(pos_weight="auto").objective(scores, targets, 3, None)
    manual = torch.nn.functional.binary_cross_entropy_with_logits(scores, targets, pos_weight=torch.tensor(2.0))
    assert bce.item() == pytest.approx(manual.item())


def test_lambda_loss_and_kl_distillation_equal_hand_computed_values():
    # Two groups of 3 with graded targets; LambdaLoss weights each (better, worse) pair by |delta NDCG| of a swap.
    scores = torch.tensor([0.5, 2.0, -1.0, 1.0, 0.0, 3.0])
    targets = torch.tensor([2.0, 1.0, 0.0, 0.0, 1.0, 2.0])
    total, weights = 0.0, 0.0
    for g in range(2):
        s, t = scores[3 * g:3 * g + 3].tolist(), targets[3 * g:3 * g + 3].tolist()
        rank = {j: r for r, j in enumerate(sorted(range(3), key=lambda j: -s[j]))}
        ideal = sum((2 ** v - 1) / math.log2(r + 2) for r, v in enumerate(sorted(t, reverse=True)))
        for i in range(3):
            for j in range(3):
                if t[i] > t[j]:
                    delta = abs((2 ** t[i] - 2 ** t[j]) * (1 / math.log2(rank[i] + 2) - 1 / math.log2(rank[j] + 2)))
                    delta /= ideal
                    total += delta * math.log1p(math.exp(-(s[i] - s[j])))
                    weights += delta
    lambda_loss = LambdaLoss().objective(scores, targets, 3, None)
    assert lambda_loss.item() == pytest.approx(total / weights, rel=1e-5)
    # KL(teacher || student) over each group at temperature 2, times 2^2, averaged over groups.
    teacher = torch.tensor([3.0, 1.0, 0.0, 2.0, 2.0, 1.0])
    kl = 0.0
    for g in range(2):
        p = torch.softmax(teacher[3 * g:3 * g + 3] / 2, 0).tolist()
        q = torch.softmax(scores[3 * g:3 * g + 3] / 2, 0).tolist()
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    distill = DistillKLLoss(temperature=2.0).objective(scores, targets, 3, teacher)
    assert distill.item() == pytest.approx(kl / 2 * 4, rel=1e-5)


def test_cached_listwise_loss_has_the_same_gradients(reranker_path):
    # (Dropout masks differ between one pass and per-chunk passes; RNG replay is tested on the bi-encoder.)
    rr = _reranker(reranker_path, lora_config=LoraConfig(r=4, lora_dropout=0.0))
    rows = _with_teacher(red_rows(repeat=1))[:3]
    rows[1] = {**rows[1], "query": "a longer query: chunks are padded to different lengths"}
    grads = []
    for loss in (ListwiseSoftmaxLoss(), ListwiseSoftmaxLoss(mini_batch_size=5)):
        batch = CrossEncoderCollator(rr, mini_batch_size=loss.mini_batch_size)(rows)
        rr.zero_grad()
        torch.manual_seed(0)
        value = loss(rr, batch)
        value.backward()
        grads.append((value.detach(), {n: p.grad.clone() for n, p in rr.named_parameters() if p.grad is not None}))
    (plain, g1), (cached, g2) = grads
    assert_rel_close(plain, cached)
    assert g1.keys() == g2.keys() and g1
    assert_all_rel_close(g2, g1)


# ----- evaluation -----------------------------------------------------------------------------------------
class FixedScores:
    """A stand-in reranker whose score is looked up from the document name."""

    def __init__(self, table):
        self.table = table

    def score(self, pairs, batch_size=16):
        return torch.tensor([self.table[doc] for _, doc in pairs])


def test_reranking_metrics_equal_hand_computed_values():
    samples = [
        {"query": "q1", "positive": ["a"], "negative": ["b", "c"], "documents": ["b", "c", "a"]},
        {"query": "q2", "positive": ["d", "e"], "negative": ["f"], "documents": ["d", "f", "e"]},
        {"query": "q3", "positive": ["z"], "negative": ["g"], "documents": ["g"]},  # retriever missed it
    ]
    model = FixedScores({"a": 0.5, "b": 0.9, "c": 0.1, "d": 0.2, "e": 0.8, "f": 0.1, "g": 1.0})
    metrics = RerankingEvaluator(samples)(model)
    # model order: q1 b,a,c (positive at 2); q2 e,d,f (both on top); q3 nothing relevant.
    ndcg_q1 = 1 / math.log2(3)
    assert metrics["ndcg@10"] == pytest.approx((ndcg_q1 + 1 + 0) / 3)
    assert metrics["mrr@10"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert metrics["map"] == pytest.approx((0.5 + 1 + 0) / 3)
    # incoming order: q1 positive at 3; q2 d at 1, e at 3.
    assert metrics["base_mrr@10"] == pytest.approx((1 / 3 + 1 + 0) / 3)
    assert metrics["base_map"] == pytest.approx((1 / 3 + (1 + 2 / 3) / 2 + 0) / 3)
    idcg2 = 1 + 1 / math.log2(3)
    assert metrics["base_ndcg@10"] == pytest.approx((1 / 2 + (1 + 1 / 2) / idcg2 + 0) / 3)


def test_reranking_evaluator_from_dataset_shuffles_the_incoming_order():
    data = Dataset.from_list([{"query": f"q{i}", "positive": f"p{i}", "negative_1": f"n{i}a", "negative_2": f"n{i}b"}
                              for i in range(40)])
    evaluator = RerankingEvaluator.from_dataset(data)
    positions = [docs.index(f"p{i}") for i, docs in enumerate(evaluator.candidates)]
    assert set(positions) == {0, 1, 2}  # not always first: the baseline is chance level
    table = {d: 1.0 if d.startswith("p") else 0.0 for docs in evaluator.candidates for d in docs}
    metrics = evaluator(FixedScores(table))
    assert metrics["mrr@10"] == 1.0 and metrics["base_mrr@10"] < 0.85


# ----- mining ---------------------------------------------------------------------------------------------
def test_mine_hard_negatives_with_image_documents(tiny_path, caplog):
    encoder = BiEncoder.from_pretrained(tiny_path("clip"))
    near_red = solid("red").copy()
    near_red.putpixel((0, 0), (229, 20, 20))  # a near-duplicate of the red positive
    queries = [f"a {c} square" for c in NAMES]
    data = Dataset.from_list([{"query": q, "positive": solid(c)} for q, c in zip(queries, NAMES)])
    corpus = [solid(c) for c in NAMES] + [near_red]
    mined = mine_hard_negatives(encoder, data, corpus, num_negatives=3, duplicate_threshold=0.999)
    assert mined.column_names == ["query", "positive", "negative_1", "negative_2", "negative_3"]
    assert len(mined) == len(NAMES)
    red = mined[0]
    negatives = [red[f"negative_{j}"] for j in (1, 2, 3)]
    assert all(n.tobytes() != solid("red").tobytes() for n in negatives), "the positive itself was mined"
    assert all(n.tobytes() != near_red.tobytes() for n in negatives), "a near-duplicate of the positive was mined"
    scores = encoder.encode([queries[0]]) @ encoder.encode(corpus, side="document").T
    allowed = [i for i in scores[0].argsort(descending=True).tolist() if i not in (0, len(NAMES))]
    expected = [corpus[i].tobytes() for i in allowed[:3]]
    assert [n.tobytes() for n in negatives] == expected  # the top-ranked eligible documents, in order
    with caplog.at_level("WARNING"):
        fewer = mine_hard_negatives(encoder, data, corpus[:3], num_negatives=3)
    assert len(fewer) == 5 and "skipped 3 of 8 rows" in caplog.text  # rows whose positive is in corpus[:3]


class _AxisEncoder:
    """Texts embed on their first word's axis, images on their colour's axis, nudged by their second pixel's red."""

    def encode(self, inputs, side="query", batch_size=32):
        out = torch.zeros(len(inputs), len(NAMES) + 1)
        for i, cell in enumerate(inputs):
            if isinstance(cell, str):
                out[i, NAMES.index(cell.split()[0])] = 1.0
            else:
                cell = to_input(cell).image  # datasets image values arrive undecoded, as in training
                colour = next(c for c in NAMES if solid(c).getpixel((0, 0)) == cell.getpixel((1, 1)))
                out[i, NAMES.index(colour)] = 1.0
                out[i, -1] = cell.getpixel((0, 0))[0] / 255  # images of one colour differ a little
        return torch.nn.functional.normalize(out, dim=-1)


def test_mining_excludes_every_positive_of_a_repeated_query():
    # "red" has three positive images (three rows); the miner must not hand one back as another's negative.
    reds = []
    for shade in (0, 120, 250):
        image = solid("red").copy()
        image.putpixel((0, 0), (shade, 20, 20))
        reds.append(image)
    rows = [{"query": "red square", "positive": image} for image in reds]
    rows += [{"query": f"{c} square", "positive": solid(c)} for c in NAMES[1:]]
    mined = mine_hard_negatives(_AxisEncoder(), Dataset.from_list(rows), num_negatives=2, duplicate_threshold=None)
    red_bytes = {image.tobytes() for image in reds}
    red_rows = [row for row in mined if row["query"] == "red square"]
    assert len(red_rows) == 3  # each red row was mined (a skipped row would leave the check below nothing to see)
    for row in red_rows:
        assert not {row[f"negative_{j}"].tobytes() for j in (1, 2)} & red_bytes


def test_a_positive_the_first_stage_missed_counts_like_trec_eval():
    import pytrec_eval

    # positives p1, p2; the first stage retrieved n1, p1, n2 (p2 missed); the reranker puts p1 first.
    samples = [{"query": "q", "positive": ["p1", "p2"], "negative": ["n1", "n2"], "documents": ["n1", "p1", "n2"]}]
    metrics = RerankingEvaluator(samples)(FixedScores({"n1": 0.2, "p1": 0.9, "n2": 0.1}))
    run = {"q": {"p1": 3.0, "n1": 2.0, "n2": 1.0}}
    trec = pytrec_eval.RelevanceEvaluator({"q": {"p1": 1, "p2": 1, "n1": 0, "n2": 0}},
                                          {"map", "ndcg_cut.10", "recip_rank"}).evaluate(run)["q"]
    assert metrics["map"] == pytest.approx(trec["map"]) == pytest.approx(0.5)
    assert metrics["ndcg@10"] == pytest.approx(trec["ndcg_cut_10"])
    assert metrics["mrr@10"] == pytest.approx(trec["recip_rank"])


def test_random_negatives_never_repeat_the_positive():
    from hf_mm_rerank.recipes_kit.data import random_negatives

    data = Dataset.from_list([{"query": f"q{i}", "positive": solid(c)} for i, c in enumerate(NAMES)])
    out = random_negatives(data, 3, seed=1)
    for row in out:
        cells = [row["positive"].tobytes()] + [row[f"negative_{j}"].tobytes() for j in (1, 2, 3)]
        assert len(set(cells)) == 4
    # Rows sharing a positive (three captions per image): a copy of the positive is never its negative.
    shared = Dataset.from_list([{"query": f"caption {k} of {c}", "positive": solid(c)} for c in NAMES for k in range(3)])
    for row in random_negatives(shared, 3, seed=1):
        cells = [row["positive"].tobytes()] + [row[f"negative_{j}"].tobytes() for j in (1, 2, 3)]
        assert len(set(cells)) == 4
    with pytest.raises(ValueError, match="too few for 8 negatives"):
        random_negatives(shared, 8, seed=1)  # 8 colours: 7 other contents at most


# ----- a real reranking run -------------------------------------------------------------------------------
def test_reranker_learns_to_match_emoji_images_to_their_names(reranker_path, tmp_path):
    """Real images with captions (Noto emoji): after 240 steps the reranker orders 8 candidates per name far
    better than the chance-level incoming order (memorisation of 8 pairs: a random tiny VLM cannot generalise).
    At learning rate 2e-3 the outcome swung with the seed and with float rounding (MRR 0.49 to 1.0 over seeds 0-3;
    a rounding-level change of the patch embedding moved seed 0 below the bar); at 5e-4 seeds 0-3 end at 0.88-1.0."""
    from hf_mm_rerank.recipes_kit.demo import emoji_pairs

    pairs = emoji_pairs(image_size=32)[::97][:8]
    rng = random.Random(0)
    rows = []
    for _ in range(30):
        for i, (image, caption) in enumerate(pairs):
            negatives = rng.sample([p[0] for j, p in enumerate(pairs) if j != i], 3)
            rows.append({"query": caption, "positive": image, **{f"negative_{k + 1}": n for k, n in enumerate(negatives)}})
    evaluator = RerankingEvaluator([{"query": caption, "positive": [image],
                                     "negative": [p[0] for p in pairs if p[1] != caption]} for image, caption in pairs])
    rr = _reranker(reranker_path, head="mlp")
    trainer = CrossEncoderTrainer(model=rr, args=args(tmp_path, max_steps=240, learning_rate=5e-4, warmup_steps=10,
                                                      logging_steps=10),
                                  train_dataset=Dataset.from_list(rows), evaluator=evaluator)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert after["eval_base_mrr@10"] == pytest.approx(before["eval_base_mrr@10"])
    # Measured at these settings over seeds 0-3 (torch.manual_seed before the model and TrainingArguments(seed=)
    # varied together): MRR@10 0.875 / 1.0 / 0.906 / 1.0 vs the bar 0.632 (incoming order 0.332 + 0.3), nDCG@10
    # 0.908 / 1.0 / 0.929 / 1.0 vs the bar 0.681 (untrained 0.481 + 0.2): every seed clears both by 0.23 or more.
    assert after["eval_mrr@10"] >= after["eval_base_mrr@10"] + 0.3, (before, after)
    assert after["eval_ndcg@10"] >= before["eval_ndcg@10"] + 0.2, (before, after)

