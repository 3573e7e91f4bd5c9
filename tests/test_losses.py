import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_all_rel_close
from images import color_rows

from hf_mm_rerank import BiEncoder, BiEncoderCollator, CachedContrastiveLoss, ContrastiveLoss, MatryoshkaLoss


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_contrastive_equals_hand_computed_cross_entropy():
    q, p, n = _unit(4, 8, seed=1), _unit(4, 8, seed=2), _unit(8, 8, seed=3)
    loss = ContrastiveLoss(temperature=0.1).objective(q, p, n)
    scores = q @ torch.cat([p, n]).T / 0.1
    manual = -sum(torch.log_softmax(scores[i], 0)[i] for i in range(4)) / 4
    assert loss.item() == pytest.approx(manual.item(), rel=1e-5)


def test_a_fixed_temperature_below_one_hundredth_is_used_as_given():
    q, p = _unit(4, 8, seed=1), _unit(4, 8, seed=2)
    fixed = ContrastiveLoss(temperature=0.005)
    assert fixed.temperature == pytest.approx(0.005)
    assert fixed.objective(q, p, None).item() == pytest.approx(F.cross_entropy(q @ p.T / 0.005, torch.arange(4)).item(),
                                                                rel=1e-5)
    learnt = ContrastiveLoss(temperature=0.005, learnable_temperature=True)
    assert learnt.temperature == pytest.approx(0.01)  # the learnable one is capped, like CLIP's


def test_symmetric_adds_the_document_to_query_direction():
    q, p = _unit(4, 8, seed=1), _unit(4, 8, seed=2)
    one = ContrastiveLoss(temperature=0.1).objective(q, p, None)
    back = F.cross_entropy(p @ q.T / 0.1, torch.arange(4))
    both = ContrastiveLoss(temperature=0.1, symmetric=True).objective(q, p, None)
    assert both.item() == pytest.approx(((one + back) / 2).item(), rel=1e-5)


def test_learnable_temperature_gets_a_gradient():
    loss_fn = ContrastiveLoss(temperature=0.05, learnable_temperature=True)
    loss_fn.objective(_unit(4, 8), _unit(4, 8, seed=5), None).backward()
    assert loss_fn.log_scale.grad is not None and loss_fn.log_scale.grad.abs() > 0
    assert loss_fn.temperature == pytest.approx(0.05)


@pytest.mark.parametrize("temperature", [0.01, 0.005])
def test_a_learnable_temperature_at_the_cap_still_learns(temperature):
    """At the 1/100 cap (0.01 is a common setting; 0.005 starts above it) the temperature keeps its gradient: one SGD
    step on a batch whose loss wants a softer scale moves it down from the cap (a clamp inside the graph froze it)."""
    loss_fn = ContrastiveLoss(temperature=temperature, learnable_temperature=True)
    q, p = _unit(4, 8, seed=1), _unit(4, 8, seed=2)  # random pairs: a large scale is overconfident, the loss wants less
    loss_fn.objective(q, p, None).backward()
    grad = loss_fn.log_scale.grad
    assert grad is not None and grad.item() > 1.0, grad  # d loss / d log scale > 0: lowering the scale helps
    with torch.no_grad():
        loss_fn.log_scale -= 0.01 * grad
    assert loss_fn.temperature > 0.01 * 1.0001  # moved off the cap


def test_matryoshka_is_the_weighted_sum_over_prefixes():
    q, p = _unit(4, 8, seed=1), _unit(4, 8, seed=2)
    base = ContrastiveLoss()
    got = MatryoshkaLoss(base, dims=[8, 4], weights=[1.0, 0.5]).objective(q, p, None)
    want = base.objective(q, p, None) + 0.5 * base.objective(F.normalize(q[:, :4], dim=-1),
                                                             F.normalize(p[:, :4], dim=-1), None)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)
    with pytest.raises(ValueError, match="larger than the model's embedding size"):
        MatryoshkaLoss(base, dims=[16]).objective(q, p, None)


def test_bad_loss_arguments():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        ContrastiveLoss(temperature=0)
    with pytest.raises(ValueError, match="mini_batch_size must be >= 1"):
        CachedContrastiveLoss(mini_batch_size=0)
    with pytest.raises(ValueError, match="one per dim"):
        MatryoshkaLoss(ContrastiveLoss(), dims=[4, 2], weights=[1.0])


def _grads(model, loss_fn, mini_batch_size, seed=0):
    model.zero_grad()
    rows = color_rows(negatives=1)
    batch = BiEncoderCollator(model, mini_batch_size=mini_batch_size)(rows)
    torch.manual_seed(seed)
    loss = loss_fn(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads


@pytest.mark.parametrize("family, dropout", [("clip", False), ("qwen2_vl", False), ("clip", True)])
def test_gradcache_gradients_equal_the_uncached_loss(tiny_path, family, dropout):
    from peft import LoraConfig

    model = BiEncoder.from_pretrained(tiny_path(family), lora_config=LoraConfig(
        r=4, lora_dropout=0.3 if dropout else 0.0, init_lora_weights=False))
    model.train()
    # With dropout the uncached loss runs the same mini-batches in the same order, so both draw identical
    # masks in pass 1; the cached second pass must replay them (RNG restore) for the gradients to match.
    plain_loss, plain = _grads(model, ContrastiveLoss(), 3 if dropout else None)
    cached_loss, cached = _grads(model, CachedContrastiveLoss(mini_batch_size=3), 3)
    assert plain and plain.keys() == cached.keys()
    assert cached_loss == pytest.approx(plain_loss, rel=1e-5)
    assert_all_rel_close(cached, plain)


def test_gradcache_with_matryoshka(tiny_path):
    from peft import LoraConfig

    model = BiEncoder.from_pretrained(tiny_path("clip"), lora_config=LoraConfig(r=4, init_lora_weights=False))
    plain_loss, plain = _grads(model, MatryoshkaLoss(ContrastiveLoss(), dims=[64, 16]), None)
    cached_loss, cached = _grads(model, MatryoshkaLoss(CachedContrastiveLoss(mini_batch_size=2), dims=[64, 16]), 2)
    assert cached_loss == pytest.approx(plain_loss, rel=1e-5)
    assert_all_rel_close(cached, plain)


def test_cached_loss_under_no_grad_returns_the_same_value(tiny_path):
    model = BiEncoder.from_pretrained(tiny_path("clip"))
    batch = BiEncoderCollator(model, mini_batch_size=3)(color_rows())
    with torch.no_grad():
        cached = CachedContrastiveLoss(mini_batch_size=3)(model, batch)
        plain = ContrastiveLoss()(model, batch)
    assert math.isclose(cached.item(), plain.item(), rel_tol=1e-5)


@pytest.mark.parametrize("towers", ["text", "both"])
def test_gradcache_pass_one_keeps_no_graph_and_reruns_only_chunks_that_train(tiny_path, towers):
    """Pass 1 runs under no_grad (the reference algorithm's cost) but for the very last mini-batch when it trains: its
    graph is kept and pass 2 does not run it again. With LoRA on the text tower only, only the text chunks run again
    in pass 2 (the image chunks go through a frozen tower, the last one included)."""
    from peft import LoraConfig

    targets = None if towers == "text" else ["q_proj", "v_proj"]  # default: the text tower; both: the vision one too
    model = BiEncoder.from_pretrained(tiny_path("clip"), lora_config=LoraConfig(r=4, target_modules=targets))
    calls = []
    forward = model.forward

    def spy(*features):
        calls.append((torch.is_grad_enabled(), "text" in features[0]))
        return forward(*features)

    model.forward = spy
    batch = BiEncoderCollator(model, mini_batch_size=3)(color_rows())  # 8 rows: 3 query, 3 positive, 3 negative chunks
    CachedContrastiveLoss(mini_batch_size=3)(model, batch).backward()
    first, second = calls[:9], calls[9:]
    if towers == "text":
        assert not any(grad for grad, _ in first)
        assert len(second) == 3 and all(grad and text for grad, text in second)
    else:
        assert [grad for grad, _ in first] == [False] * 8 + [True]
        assert len(second) == 8 and all(grad for grad, _ in second) and sum(text for _, text in second) == 3


@pytest.mark.parametrize("family", ["clip", "siglip", "qwen2_vl", "qwen2_vl-reranker", "bert-reranker",
                                    "qwen2_vl-multivector", "qwen2_vl-colpali"])
def test_token_cost_is_what_the_featurizer_makes(tiny_path, tmp_path, family):
    """Tokens(n) counts an input as the model sees it: special tokens, the chat template (system prompt, turn
    markers, a reranker's instruction), the truncated text and the visual tokens, as the featurizer's own output."""
    from images import solid
    from test_cross_encoder import _bert_classifier

    from hf_mm_rerank import CrossEncoder, MMInput, MultiVectorEncoder

    name = family.split("-")[0]
    kind = family.split("-")[1] if "-" in family else "bi"
    if kind == "reranker":
        model = CrossEncoder.from_pretrained(_bert_classifier(tmp_path) if name == "bert" else tiny_path(name),
                                             **({} if name == "bert" else {"head": "yes_no"}))
    elif kind in ("multivector", "colpali"):
        model = MultiVectorEncoder.from_pretrained(tiny_path(name), query_augmentation=3,
                                                   **({"template": "colpali"} if kind == "colpali" else {}))
    else:
        model = BiEncoder.from_pretrained(tiny_path(name), query_prompt="Find the picture: ", max_length=12)
    featurizer = model.featurizer
    text, long_text = MMInput(text="a red square"), MMInput(text="a very long caption " * 20)
    image = MMInput(image=solid("red", (64, 48)))
    both = MMInput(text="a red square", image=solid("blue", (40, 90)))
    if kind == "reranker":
        inputs = [(text, text), (text, long_text)] + ([] if name == "bert" else [(text, image), (image, both)])
        sides = ["pair"]
    else:
        inputs, sides = [text, long_text, image, both], ["query", "document"]
    for side in sides:
        for item in inputs:
            features = featurizer([item], side)
            if "text" in features or "image" in features:  # dual encoders: one tower per part
                made = (features["text"]["input_ids"].shape[1] if "text" in features else 0) + (
                    featurizer.image_tokens if "image" in features else 0)
            else:
                made = int(features["attention_mask"].sum())
            assert featurizer.cost(item, side) == made, (side, item)


def test_a_token_budget_bounds_the_padded_mini_batch(tiny_path):
    """Under Tokens(n) every mini-batch of a chat-VLM reranker (long system prompt, images of different sizes) and
    bi-encoder holds at most n positions, padding included, unless one input alone is over n."""
    from images import solid

    from hf_mm_rerank import CrossEncoder, CrossEncoderCollator, Tokens

    sizes = [(40, 30), (200, 150), (64, 64), (30, 300), (120, 90), (48, 36)]
    rows = [{"query": f"query {i}" + " word" * i, "positive": solid("red", size), "negative": f"doc {i}" * (i + 1)}
            for i, size in enumerate(sizes)]
    reranker = CrossEncoder.from_pretrained(tiny_path("qwen2_vl"), head="yes_no")
    encoder = BiEncoder.from_pretrained(tiny_path("qwen2_vl"))
    for budget in (400, 900, 2000):
        chunks = CrossEncoderCollator(reranker, mini_batch_size=Tokens(budget))(rows)["pairs"]
        batch = BiEncoderCollator(encoder, mini_batch_size=Tokens(budget))(rows)
        chunks += [c for column in ("query", "positive", "negative") for c in batch[column]]
        assert all(c["input_ids"].numel() <= budget or c["input_ids"].shape[0] == 1 for c in chunks), budget
        assert any(c["input_ids"].shape[0] > 1 for c in chunks)  # the budget groups inputs, not only splits them


def test_token_budget_mini_batches(tiny_path):
    """mini_batch_size=Tokens(n): consecutive inputs up to n tokens (text + visual) per GradCache mini-batch. On rows
    whose costs make the same chunks as 3 inputs, the gradients are those of mini_batch_size=3; on rows of different
    costs, those of the uncached loss."""
    from peft import LoraConfig

    from hf_mm_rerank import Tokens
    from hf_mm_rerank.data.minibatch import pack

    assert [list(g) for g in pack([5, 5, 5, 9, 1, 20, 2], 10)] == [[0, 1], [2], [3], [4], [5], [6]]
    assert [list(g) for g in pack([2, 2, 3, 6, 1], 10)] == [[0, 1, 2], [3], [4]]  # 3 x 3 fits; 4 x 6 padded does not
    model = BiEncoder.from_pretrained(tiny_path("clip"), lora_config=LoraConfig(r=4, init_lora_weights=False))
    image = model.featurizer.image_tokens
    assert image == (32 // 8) ** 2 + 1
    same = [{**row, "query": f"square number {i}"} for i, row in enumerate(color_rows(negatives=1))]  # 15 tokens each
    by_tokens = BiEncoderCollator(model, mini_batch_size=Tokens(3 * image))(same)
    assert [len(c["image_index"]) for c in by_tokens["positive"]] == [3, 3, 2]
    assert [int(c["size"]) for c in by_tokens["query"]] == [3, 3, 2]
    results = []
    for size in (3, Tokens(3 * image)):
        model.zero_grad()
        CachedContrastiveLoss(mini_batch_size=size)(model, BiEncoderCollator(model, mini_batch_size=size)(same)).backward()
        results.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert_all_rel_close(results[1], results[0])
    varied = [{**row, "query": row["query"] + " now" * i} for i, row in enumerate(color_rows(negatives=1))]
    model.zero_grad()
    batch = BiEncoderCollator(model, mini_batch_size=Tokens(40))(varied)
    assert len({int(c["size"]) for c in batch["query"]}) > 1  # chunks of different input counts
    CachedContrastiveLoss(mini_batch_size=Tokens(40))(model, batch).backward()
    cached = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    ContrastiveLoss()(model, BiEncoderCollator(model)(varied)).backward()
    assert_all_rel_close(cached, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
