"""Independent references for what was checked only against our own code: the GradCache MaxSim losses against
colpali-engine 0.3.18 and sentence-transformers 6.3 on the model's gradients, the chat VLMs' ``scored_tokens="content"``
mask against the token spans found in the processor's own output, the learnable temperature's gradient against its
closed form, and the distillation losses on MaxSim scores against hand computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_all_rel_close, assert_rel_close
from images import color_rows, solid
from peft import LoraConfig
from torch import nn

from hf_mm_rerank import (
    BiEncoderCollator,
    ContrastiveLoss,
    MaxSimContrastiveLoss,
    MaxSimPairwiseLoss,
    MultiVectorEncoder,
)
from hf_mm_rerank.losses import EmbeddingDistillKLLoss, EmbeddingMarginMSELoss

LORA = dict(r=4, lora_alpha=8, init_lora_weights=False)


def _grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


# ----- 1. GradCache MaxSim losses against the reference libraries, on the model's gradients --------------------------
@pytest.mark.parametrize("reference", ["colpali-engine", "sentence-transformers"])
def test_gradcache_maxsim_losses_equal_the_reference_libraries_on_the_model_gradients(tiny_path, reference):
    """Ours with GradCache (mini-batches of 2 over 4 rows, queries of 4 different lengths) against the reference loss on
    one plain forward of the same model: the loss and every trainable parameter's gradient (LoRA and the projection).
    colpali-engine's ColbertPairwiseCELoss for MaxSimPairwiseLoss; sentence-transformers has no pairwise multi-vector
    loss, so its MultiVectorMultipleNegativesRankingLoss math (MeanMaxSim scores, cross-entropy) for the in-batch
    MaxSimContrastiveLoss."""
    from colpali_engine.loss.late_interaction_losses import ColbertPairwiseCELoss
    from sentence_transformers.multi_vector_encoder.scoring import mean_colbert_scores

    model = MultiVectorEncoder.from_pretrained(tiny_path("qwen2_vl"), lora_config=LoraConfig(**LORA))
    rows = [{"query": row["query"] + " now" * i, "positive": row["positive"]} for i, row in enumerate(color_rows()[:4])]
    temperature = 0.02
    loss_class = MaxSimPairwiseLoss if reference == "colpali-engine" else MaxSimContrastiveLoss
    model.zero_grad()
    value = loss_class(temperature, mini_batch_size=2)(model, BiEncoderCollator(model, mini_batch_size=2)(rows))
    value.backward()
    got = _grads(model)
    assert any("custom_text_proj" in name for name in got) and any("lora_" in name for name in got)

    model.zero_grad()
    batch = BiEncoderCollator(model)(rows)  # one chunk per column: a plain forward, no GradCache
    query, positive = model(batch["query"], batch["positive"])
    q_mask, p_mask = batch["query"][0]["token_mask"], batch["positive"][0]["token_mask"]
    if reference == "colpali-engine":
        # colpali-engine scores every vector it is given (zeros included): it gets each page's scored tokens only, as
        # its ColQwen2 returns them (the pages are the same size, so the same count each).
        counts = p_mask.sum(1)
        assert bool((counts == counts[0]).all())
        scored = positive[p_mask].view(len(rows), int(counts[0]), positive.shape[-1])
        want = ColbertPairwiseCELoss(temperature=temperature, normalize_scores=True)(query, scored)
    else:
        scores = mean_colbert_scores(query, positive.unsqueeze(1), q_mask, p_mask.unsqueeze(1))
        want = F.cross_entropy(scores / temperature, torch.arange(len(rows)))
    want.backward()
    assert_rel_close(value, want)
    assert_all_rel_close(got, _grads(model))


# ----- 2. the content mask of chat VLMs, from the processor's own output ------------------------------------------
def _starts(sequence: list[int], part: list[int]) -> list[int]:
    """Every position where ``part`` occurs in ``sequence``."""
    return [i for i in range(len(sequence) - len(part) + 1) if sequence[i:i + len(part)] == part]


def _scored(mask: torch.Tensor) -> set[int]:
    return set(mask.nonzero().flatten().tolist())


def _content_setup(tiny_path, family):
    """(our featurizer, the checkpoint's own processor, render(content, system) by the processor's chat template)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_path(family))
    featurizer = MultiVectorEncoder.from_pretrained(tiny_path(family), query_prompt="Find the page.").featurizer
    assert featurizer.scored_tokens == "content"  # the default for chat VLMs

    def render(content, system=None):
        messages = [{"role": "user", "content": content}]
        if system:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system}]})
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    return featurizer, processor, render


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_content_mask_of_a_text_query_is_exactly_its_text(tiny_path, family):
    """Expected positions from the processor alone: the query prompt's system turn and the user turn rendered by its
    chat template, its input_ids (padded batch), and the query tokenized on its own and searched for there."""
    featurizer, processor, render = _content_setup(tiny_path, family)
    queries = ["a red square", "hi"]  # different lengths: the shorter one is padded
    features = featurizer([featurizer.read(q, i, "query") for i, q in enumerate(queries)], "query")
    theirs = processor(text=[render([{"type": "text", "text": q}], "Find the page.") for q in queries],
                       padding=True, return_tensors="pt")
    assert torch.equal(features["input_ids"], theirs["input_ids"])
    for row, text in enumerate(queries):
        own = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        starts = _starts(theirs["input_ids"][row].tolist(), own)
        assert len(starts) == 1, starts
        assert _scored(features["token_mask"][row]) == set(range(starts[0], starts[0] + len(own))), text


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_content_mask_of_an_image_document_is_exactly_its_patches_and_text(tiny_path, family):
    """An image alone and an image with a caption (no document prompt: no system turn). Expected positions from the
    processor alone: its image pad tokens (as many as its image_grid_thw says) and the caption's tokens found by search;
    not the template around them (<|vision_start|> / <|vision_end|> are the chat template's, not the image's)."""
    featurizer, processor, render = _content_setup(tiny_path, family)
    tokenizer = processor.tokenizer
    image, caption = solid("red", (56, 84)), "a red square"
    documents = [featurizer.read(image, 0, "document"),
                 featurizer.read({"image": image, "text": caption}, 1, "document")]
    features = featurizer(documents, "document")
    theirs = processor(text=[render([{"type": "image"}]), render([{"type": "image"}, {"type": "text", "text": caption}])],
                       images=[image, image], padding=True, return_tensors="pt")
    assert torch.equal(features["input_ids"], theirs["input_ids"])
    merge = processor.image_processor.merge_size
    pads = [int(thw.prod()) // merge ** 2 for thw in theirs["image_grid_thw"]]
    own_caption = tokenizer(caption, add_special_tokens=False)["input_ids"]
    for row in range(2):
        ids = theirs["input_ids"][row]
        expected = _scored(ids == processor.image_token_id)
        assert len(expected) == pads[row]
        if row == 1:
            (start,) = _starts(ids.tolist(), own_caption)
            expected |= set(range(start, start + len(own_caption)))
        got = _scored(features["token_mask"][row])
        assert got == expected, (f"document {row}: scored but not its own: "
                                 f"{tokenizer.convert_ids_to_tokens(ids[sorted(got - expected)].tolist())}, "
                                 f"its own but not scored: {sorted(expected - got)}")


# ----- 3. the learnable temperature's gradient, in closed form ---------------------------------------------------
def _infonce_by_hand(query, documents, log_scale):
    """InfoNCE of ``query`` against ``documents`` (targets on the diagonal) in float64, with the closed form of its
    gradient in the log-scale ``t`` (scale ``s = e^t``, scores ``S``, softmax ``P``):
    ``L = mean_i [logsumexp_j s S_ij - s S_ii]``, ``dL/dt = s * mean_i [sum_j P_ij S_ij - S_ii]``."""
    scores = query.double() @ documents.double().T
    scale = math.exp(log_scale)
    logits, rows = scale * scores, torch.arange(query.shape[0])
    loss = (torch.logsumexp(logits, 1) - logits[rows, rows]).mean()
    grad = scale * ((torch.softmax(logits, 1) * scores).sum(1) - scores[rows, rows]).mean()
    return loss, float(grad.detach())


@pytest.mark.parametrize("case", ["in-batch", "hard-negatives", "symmetric"])
def test_learnable_temperature_gradient_equals_the_closed_form(case):
    q, p, n = _unit(6, 16, seed=1), _unit(6, 16, seed=2), _unit(6, 16, seed=3)
    negative = n if case == "hard-negatives" else None
    loss_fn = ContrastiveLoss(temperature=0.07, learnable_temperature=True, symmetric=case == "symmetric")
    inputs = [t.clone().requires_grad_(True) for t in (q, p)]
    value = loss_fn.objective(*inputs, negative)
    value.backward()
    log_scale = math.log(1 / 0.07)
    want, want_grad = _infonce_by_hand(q, torch.cat([p, n]) if negative is not None else p, log_scale)
    if case == "symmetric":
        back, back_grad = _infonce_by_hand(p, q, log_scale)
        want, want_grad = (want + back) / 2, (want_grad + back_grad) / 2
    assert_rel_close(value, want)
    assert_rel_close(loss_fn.log_scale.grad, torch.tensor(want_grad))
    # ... and the embeddings' gradients as the hand-written loss's (autograd in float64)
    leaves = [t.double().requires_grad_(True) for t in (q, p)]
    again = _infonce_by_hand(leaves[0], torch.cat([leaves[1], n]) if negative is not None else leaves[1], log_scale)[0]
    if case == "symmetric":
        again = (again + _infonce_by_hand(leaves[1], leaves[0], log_scale)[0]) / 2
    again.backward()
    assert_all_rel_close({"q": inputs[0].grad, "p": inputs[1].grad}, {"q": leaves[0].grad, "p": leaves[1].grad})


# ----- 4. distillation losses on MaxSim scores, by hand ---------------------------------------------------------
def _maxsim_by_hand(query, q_mask, document, d_mask) -> torch.Tensor:
    """One query's MaxSim against one document: over its scored tokens only, each query token's best document token."""
    similarity = torch.einsum("id,jd->ij", query[q_mask], document[d_mask])
    return similarity.max(dim=1).values.sum()


@pytest.mark.parametrize("kind, mini_batch_size", [("margin-mse", 2), ("kl", None)])  # the padded test: every pair
def test_distillation_losses_on_maxsim_equal_hand_computations(tiny_path, kind, mini_batch_size):
    """Rows of a query, a positive page and two negatives (a page and a text of varying length, so documents are
    padded); the reference embeds each column on its own, scores every (query, candidate) pair by hand from the
    featurizer's token masks, and computes MarginMSE / KL by hand: loss and every trainable parameter's gradient."""
    model = MultiVectorEncoder.from_pretrained(tiny_path("qwen2_vl"), lora_config=LoraConfig(**LORA))
    rows = [{"query": row["query"] + " now" * i, "positive": row["positive"], "negative_1": row["negative_1"],
             "negative_2": f"{color} paint" + " wet" * (i % 3), "teacher_scores": [3.0 - 0.2 * i, 1.0 + 0.3 * i, -i / 4]}
            for i, (row, color) in enumerate(zip(color_rows(negatives=2), ["red", "blue", "green", "black"]))]
    temperature, teacher_temperature = 0.5, 2.0
    if kind == "margin-mse":
        loss_fn = EmbeddingMarginMSELoss(temperature=temperature, mini_batch_size=mini_batch_size)
    else:
        loss_fn = EmbeddingDistillKLLoss(temperature=temperature, teacher_temperature=teacher_temperature,
                                         mini_batch_size=mini_batch_size)
    model.zero_grad()
    value = loss_fn(model, BiEncoderCollator(model, mini_batch_size=mini_batch_size)(rows))
    value.backward()
    got = _grads(model)

    model.zero_grad()
    featurizer = model.featurizer
    columns = [("query", "query"), ("positive", "document"), ("negative_1", "document"), ("negative_2", "document")]
    embedded = []
    for column, side in columns:
        features = featurizer([featurizer.read(row[column], i, column) for i, row in enumerate(rows)], side)
        embedded.append((model(features), features["token_mask"]))
    (query, q_mask), *candidates = embedded
    student = torch.stack([torch.stack([_maxsim_by_hand(query[i], q_mask[i], docs[i], d_mask[i])
                                        for docs, d_mask in candidates]) for i in range(len(rows))])
    teacher = torch.tensor([row["teacher_scores"] for row in rows])
    if kind == "margin-mse":  # mean over (row, negative) of (scale * student margin - teacher margin)^2
        want = (((student[:, :1] - student[:, 1:]) / temperature - (teacher[:, :1] - teacher[:, 1:])) ** 2).mean()
    else:  # sum over candidates of p_teacher * log(p_teacher / p_student), mean over rows, x teacher temperature^2
        p_teacher = torch.softmax(teacher / teacher_temperature, 1)
        log_student = torch.log_softmax(student / temperature, 1)
        want = (p_teacher * (p_teacher.log() - log_student)).sum(1).mean() * teacher_temperature ** 2
    want.backward()
    assert_rel_close(value, want)
    assert_all_rel_close(got, _grads(model))


class _Tokens(nn.Module):
    """A "model" whose outputs are its parameters: each column's token embeddings ``[N, T, d]`` (zeros: unscored), so
    the gradients are the token embeddings' own. A chunk names its column and rows; GradCache runs it like a model."""

    def __init__(self, tables: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.tables = nn.ParameterDict({name: nn.Parameter(t.clone()) for name, t in tables.items()})
        self.masks = {name: t.abs().amax(-1) > 0 for name, t in tables.items()}

    def forward(self, *sides):
        out = tuple(self._side(side) for side in sides)
        return out if len(out) > 1 else out[0]

    def _side(self, side):
        if isinstance(side, list):  # chunks: rows one after the other, zero-padded to the longest
            parts = [self._side(chunk) for chunk in side]
            width = max(p.shape[1] for p in parts)
            return torch.cat([F.pad(p, (0, 0, 0, width - p.shape[1])) for p in parts])
        name, start, stop = side["column"], *side["rows"]
        return self.tables[name][start:stop] * self.masks[name][start:stop, :, None]


def _padded_tokens(n, t, d, seed):
    """``n`` rows of unit vectors, each of a random length in 1..t, zero-padded to t."""
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, t, d, generator=g), dim=-1)
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    return x * (torch.arange(t)[None, :] < lengths[:, None]).unsqueeze(-1)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("mini_batch_size", [None, 2])
@pytest.mark.parametrize("kind", ["margin-mse", "kl"])
def test_distillation_losses_on_padded_token_embeddings_equal_hand_computations(kind, mini_batch_size, normalize):
    """Token embeddings of random lengths (zero-padded), and one negative whose every token is opposite to its query's
    (all similarities negative: a padding zero that took part in the max would win it). Loss and gradients w.r.t. every
    token embedding; the hand MaxSim scores also equal sentence-transformers' colbert_kd_scores."""
    from sentence_transformers.multi_vector_encoder.scoring import colbert_kd_scores

    rows, k, dim = 4, 2, 8
    query, positive, negative = _padded_tokens(rows, 5, dim, 1), _padded_tokens(rows, 7, dim, 2), _padded_tokens(
        rows * k, 7, dim, 3)
    cone = F.normalize(torch.randn(5, dim, generator=torch.Generator().manual_seed(4)) * 0.3 + 1.0, dim=-1)
    query[0] = cone * (query[0].abs().amax(-1, keepdim=True) > 0)  # query 0's tokens in one cone (all dots > 0) ...
    negative[1] = F.pad(-cone, (0, 0, 0, 2))  # ... its second negative opposite to them
    teacher = torch.tensor([[3.0, 1.0, -2.0], [0.5, 2.0, 1.0], [1.0, 1.0, 0.0], [-1.0, 2.5, 0.5]])
    model = _Tokens({"query": query, "positive": positive, "negative": negative})

    def chunks(column, count):
        size = mini_batch_size or count
        return [{"column": column, "rows": (s, min(s + size, count))} for s in range(0, count, size)]

    batch = {"query": chunks("query", rows), "positive": chunks("positive", rows),
             "negative": chunks("negative", rows * k), "teacher": teacher}
    temperature, teacher_temperature = 0.5, 2.0
    common = dict(temperature=temperature, mini_batch_size=mini_batch_size, normalize_by_query_length=normalize)
    if kind == "margin-mse":
        loss_fn = EmbeddingMarginMSELoss(**common)
    else:
        loss_fn = EmbeddingDistillKLLoss(teacher_temperature=teacher_temperature, **common)
    value = loss_fn(model, batch)
    value.backward()
    got = {name: p.grad.clone() for name, p in model.tables.items()}

    leaves = {name: t.clone().requires_grad_(True) for name, t in (("query", query), ("positive", positive),
                                                                  ("negative", negative))}
    masks = model.masks
    candidates = [[(leaves["positive"][i], masks["positive"][i])] + [
        (leaves["negative"][i * k + j], masks["negative"][i * k + j]) for j in range(k)] for i in range(rows)]
    student = torch.stack([torch.stack([_maxsim_by_hand(leaves["query"][i], masks["query"][i], doc, d_mask)
                                        for doc, d_mask in candidates[i]]) for i in range(rows)])
    if normalize:
        student = student / masks["query"].sum(1, keepdim=True)
    assert float(student[0, 2].detach()) < 0  # the opposite negative: only its real tokens scored
    documents = torch.stack([torch.stack([doc for doc, _ in row]) for row in candidates])
    d_masks = torch.stack([torch.stack([m for _, m in row]) for row in candidates])
    assert_rel_close(student, colbert_kd_scores(leaves["query"], documents, masks["query"], d_masks,
                                                length_normalize=normalize))
    if kind == "margin-mse":
        want = (((student[:, :1] - student[:, 1:]) / temperature - (teacher[:, :1] - teacher[:, 1:])) ** 2).mean()
    else:
        p_teacher = torch.softmax(teacher / teacher_temperature, 1)
        log_student = torch.log_softmax(student / temperature, 1)
        want = (p_teacher * (p_teacher.log() - log_student)).sum(1).mean() * teacher_temperature ** 2
    want.backward()
    assert_rel_close(value, want)
    assert_all_rel_close(got, {name: leaf.grad for name, leaf in leaves.items()})
