"""False negatives out of the contrastive losses (content ids, GIST margin filtering), and the directions / hardness
options, against hand computations and sentence-transformers 6.3's MultipleNegativesRankingLoss, GISTEmbedLoss and
CachedGISTEmbedLoss on the same embeddings: values and the gradients of the raw embeddings (relative 1e-5)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_all_rel_close, assert_rel_close, rel_diff
from images import color_rows
from torch import nn

from hf_mm_rerank import BiEncoder, BiEncoderCollator, CachedContrastiveLoss, ContrastiveLoss, MatryoshkaLoss
from hf_mm_rerank.data.dedup import content_id
from hf_mm_rerank.losses import MaxSimContrastiveLoss, MaxSimPairwiseLoss
from hf_mm_rerank.losses import contrastive as contrastive_module
from hf_mm_rerank.losses import false_negatives as false_negatives_module

QD, QQ, DQ, DD = "query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"
FIGURES: dict[str, float] = {}  # the largest relative difference per comparison (printed with -s)


def _raw(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _unit(*shape, seed=0):
    return F.normalize(_raw(*shape, seed=seed), dim=-1)


def _check(name, got, want, got_grads, want_grads):
    assert_rel_close(got, want, msg=name)
    assert_all_rel_close(got_grads, want_grads)
    FIGURES[name] = max([rel_diff(got, want)] + [rel_diff(got_grads[k], want_grads[k]) for k in want_grads])
    print(f"{name}: max relative difference {FIGURES[name]:.1e}")


# ----- (a) masking by content ids, by hand ------------------------------------------------------------------------
def _hand_loss(logits: torch.Tensor, targets: torch.Tensor, removed: list[tuple[int, int]]) -> torch.Tensor:
    """Mean over rows of -log softmax at the target, each row over its columns minus the ``removed`` (row, column)."""
    total = 0.0
    for row in range(logits.shape[0]):
        keep = [c for c in range(logits.shape[1]) if (row, c) not in removed]
        total = total - torch.log_softmax(logits[row, keep], 0)[keep.index(int(targets[row]))]
    return total / logits.shape[0]


def test_a_shared_positive_and_a_copy_among_the_negatives_leave_the_softmax():
    """Rows 0 and 2 share a positive (ids 20), row 3's hard negative is a copy of row 1's positive (21): each row's
    softmax without those columns, by hand; 3 masked pairs; without ids, or mask_duplicates=False, the plain loss."""
    q, p, n = _unit(4, 8, seed=1), _unit(4, 8, seed=2), _unit(4, 8, seed=3)
    p[2], n[3] = p[0], p[1]
    ids = {"query": torch.tensor([10, 11, 12, 13]), "positive": torch.tensor([20, 21, 20, 23]),
           "negative": torch.tensor([30, 31, 32, 21])}
    loss_fn = ContrastiveLoss(temperature=0.1)
    got = loss_fn.objective(q, p, n, content_ids=ids)
    logits = q @ torch.cat([p, n]).T / 0.1
    want = _hand_loss(logits, torch.arange(4), removed=[(0, 2), (2, 0), (1, 7)])
    assert_rel_close(got, want)
    assert loss_fn.last_masked == 3
    plain = ContrastiveLoss(temperature=0.1).objective(q, p, n)
    assert rel_diff(got, plain) > 1e-3  # the masking changes the loss
    unmasked = ContrastiveLoss(temperature=0.1, mask_duplicates=False)
    assert_rel_close(unmasked.objective(q, p, n, content_ids=ids), plain)
    assert unmasked.last_masked == 0


def test_symmetric_masks_the_queries_of_a_shared_positive_and_copies_of_the_query():
    """doc_to_query: document 0 (shared with row 2) drops query 2, and rows 1 and 3 have the same query (ids 11), so
    document 1 drops query 3 and document 3 drops query 1; query_to_doc: rows 1 and 3 also drop each other's positive
    (a query with two positives)."""
    q, p = _unit(4, 8, seed=4), _unit(4, 8, seed=5)
    p[2], q[3] = p[0], q[1]
    ids = {"query": torch.tensor([10, 11, 12, 11]), "positive": torch.tensor([20, 21, 20, 23])}
    loss_fn = ContrastiveLoss(temperature=0.1, symmetric=True)
    got = loss_fn.objective(q, p, None, content_ids=ids)
    forward = _hand_loss(q @ p.T / 0.1, torch.arange(4), removed=[(0, 2), (2, 0), (1, 3), (3, 1)])
    backward = _hand_loss(p @ q.T / 0.1, torch.arange(4), removed=[(0, 2), (2, 0), (1, 3), (3, 1)])
    assert_rel_close(got, (forward + backward) / 2)
    assert loss_fn.last_masked == 8


def test_maxsim_losses_mask_copies_of_the_positive():
    """Token embeddings: MaxSimContrastiveLoss shares the objective; MaxSimPairwiseLoss takes neither a copy of the
    positive as the hardest in-batch negative nor a copied hard negative into its mean."""
    q, p, n = _unit(3, 4, 8, seed=6), _unit(3, 5, 8, seed=7), _unit(3, 5, 8, seed=8)
    p[1], n[2] = p[0], p[2]
    ids = {"query": torch.tensor([1, 2, 3]), "positive": torch.tensor([4, 4, 6]), "negative": torch.tensor([7, 8, 6])}
    contrastive = MaxSimContrastiveLoss(temperature=0.5, normalize_by_query_length=False)
    scores = contrastive.similarity(q, torch.cat([p, n]))
    want = _hand_loss(scores / 0.5, torch.arange(3), removed=[(0, 1), (1, 0), (2, 5)])
    assert_rel_close(contrastive.objective(q, p, n, content_ids=ids), want)
    assert contrastive.last_masked == 3

    pairwise = MaxSimPairwiseLoss(temperature=0.5, normalize_by_query_length=False, in_batch_weight=0.5)
    s = pairwise.similarity(q, p)
    hardest = torch.stack([s[0, 2], s[1, 2], s[2, :2].max()])  # rows 0 and 1: the copy is not a negative
    in_batch = F.softplus((hardest - s.diagonal()) / 0.5).mean()
    sn = pairwise.similarity(q, n).diagonal()
    explicit = F.softplus((sn[:2] - s.diagonal()[:2]) / 0.5).mean()  # row 2's negative is its positive: left out
    assert_rel_close(pairwise.objective(q, p, n, content_ids=ids), 0.5 * explicit + 0.5 * in_batch)
    assert pairwise.last_masked == 3


def test_ids_are_gathered_in_the_order_of_the_embeddings(monkeypatch):
    """As rank 1 of 2 with uneven rows (rank 0: 3 rows, rank 1: 2), the gathers patched to put rank 0's rows first as
    torch.distributed would: rank 1's row 1 shares its positive with rank 0's row 0, rank 1's hard negative 0 copies
    rank 0's positive 2, which rank 1's query 0 has for positive too. The loss is the single-process loss over the
    5 rows restricted to rank 1's rows (by hand, the copies removed), times rank 1's share."""
    k, rows0, rows1 = 1, 3, 2
    q, p, n = _unit(5, 8, seed=9), _unit(5, 8, seed=10), _unit(5, 8, seed=11)
    p[4] = p[0]
    p[3] = p[2]
    n[3] = p[2]
    qid, pid, nid = torch.arange(5) + 100, torch.tensor([200, 201, 202, 202, 200]), torch.arange(5) + 300
    nid[3] = 202
    mine = slice(rows0, rows0 + rows1)

    def fake_gather_with_grad(x):  # rank 0's block first: [positives_0, negatives_0]; rank 1's is x
        other = torch.cat([p[:rows0], n[:rows0 * k]]) if x.shape[0] == rows1 * (1 + k) else q[:rows0]
        return torch.cat([other, x]), other.shape[0]

    def fake_gather_rows(x):
        if x.shape[1] == 3:  # documents' (id, owner query id, is positive)
            other = torch.stack([torch.cat([pid[:rows0], nid[:rows0]]), torch.cat([qid[:rows0], qid[:rows0]]),
                                 torch.tensor([1] * rows0 + [0] * rows0)], 1)
        else:  # queries' (id, positive id)
            other = torch.stack([qid[:rows0], pid[:rows0]], 1)
        return torch.cat([other, x])

    monkeypatch.setattr(contrastive_module, "gather_with_grad", fake_gather_with_grad)
    monkeypatch.setattr(contrastive_module, "world", lambda: (1, 2))
    monkeypatch.setattr(false_negatives_module, "gather_rows", fake_gather_rows)
    loss_fn = ContrastiveLoss(temperature=0.1)
    got = loss_fn.objective(q[mine], p[mine], n[mine], content_ids={"query": qid[mine], "positive": pid[mine],
                                                                    "negative": nid[mine]})
    # Gathered documents: [p0 p1 p2 n0 n1 n2 | p3 p4 n3 n4]; rank 1's rows are global rows 3 and 4.
    documents = torch.cat([p[:3], n[:3], p[3:], n[3:]])
    logits = q[mine] @ documents.T / 0.1
    removed = [(0, 2), (0, 8), (1, 0)]  # row 3: rank 0's p2 and its own n3 copy its positive; row 4: rank 0's p0
    want = _hand_loss(logits, torch.tensor([6, 7]), removed) * (4 * 2 / 10)
    assert_rel_close(got, want)
    assert loss_fn.last_masked == 3


def test_the_gather_of_ids_with_a_process_group_of_one(tmp_path):
    """A real (gloo) process group of world size 1: gather_rows of int64 ids returns them as they are (in the order
    of the embeddings), and the masked loss equals the loss without a process group."""
    import torch.distributed as dist

    from hf_mm_rerank.distributed import gather_rows

    q, p, n = _unit(4, 8, seed=1), _unit(4, 8, seed=2), _unit(4, 8, seed=3)
    p[2] = p[0]
    ids = {"query": torch.tensor([10, 11, 12, 13]), "positive": torch.tensor([20, 21, 20, 23]),
           "negative": torch.tensor([30, 31, 32, 33])}
    alone = ContrastiveLoss(temperature=0.1, symmetric=True).objective(q, p, n, content_ids=ids)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        big = torch.tensor([2 ** 62 + 5, 7, 2 ** 62 + 5])
        assert torch.equal(gather_rows(big), big) and gather_rows(big).dtype == torch.int64
        loss_fn = ContrastiveLoss(temperature=0.1, symmetric=True)
        assert_rel_close(loss_fn.objective(q, p, n, content_ids=ids), alone)
        assert loss_fn.last_masked == 4
    finally:
        dist.destroy_process_group()


# ----- (b) against sentence-transformers 6.3 ---------------------------------------------------------------------
def _ours(loss_fn, q, p, n, **extras):
    """Our loss on the normalised raw embeddings; value and the raw embeddings' gradients."""
    leaves = {name: t.clone().requires_grad_(True) for name, t in (("q", q), ("p", p), ("n", n)) if t is not None}
    value = loss_fn.objective(*(F.normalize(leaves[k], dim=-1) if k in leaves else None for k in "qpn"), **extras)
    value.backward()
    return value.detach(), {k: t.grad for k, t in leaves.items()}


def _mnrl(loss_fn, q, p, n, k):
    leaves = {name: t.clone().requires_grad_(True) for name, t in (("q", q), ("p", p), ("n", n)) if t is not None}
    columns = [F.normalize(leaves["q"], dim=-1), F.normalize(leaves["p"], dim=-1)]
    if n is not None:  # our negatives are row-major [B*k]: sentence-transformers' columns negative_1..k
        columns += list(F.normalize(leaves["n"], dim=-1).view(q.shape[0], k, -1).unbind(1))
    value = loss_fn.compute_loss_from_embeddings(columns, None)
    value.backward()
    return value.detach(), {name: t.grad for name, t in leaves.items()}


MNRL_CASES = [  # (directions, partition_mode, hardness_mode)
    ((QD,), "joint", None),
    ((QD, DQ), "joint", None),
    ((QD, DQ), "per_direction", None),
    ((QD, QQ), "joint", None),
    ((QD, DD), "joint", None),
    ((QD, QQ, DQ, DD), "joint", None),
    ((QD,), "joint", "in_batch_negatives"),
    ((QD,), "joint", "hard_negatives"),
    ((QD,), "joint", "all_negatives"),
    ((QD, QQ, DQ, DD), "joint", "all_negatives"),
    ((QD, DQ), "per_direction", "in_batch_negatives"),
]


# (hard_negatives without negatives weighs nothing: that pair is left out, not skipped)
@pytest.mark.parametrize("directions, partition_mode, hardness_mode, k", [
    (*case, k) for case in MNRL_CASES for k in (0, 2) if not (case[2] == "hard_negatives" and k == 0)])
def test_directions_partitions_and_hardness_equal_multiple_negatives_ranking_loss(directions, partition_mode,
                                                                                    hardness_mode, k):
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    rows = 6
    q, p = _raw(rows, 16, seed=21), _raw(rows, 16, seed=22)
    n = _raw(rows * k, 16, seed=23) if k else None
    strength = 5.0 if hardness_mode else 0.0
    ours = ContrastiveLoss(temperature=0.05, directions=directions, partition_mode=partition_mode,
                           hardness_mode=hardness_mode, hardness_strength=strength)
    theirs = MultipleNegativesRankingLoss(None, scale=20.0, directions=directions, partition_mode=partition_mode,
                                          hardness_mode=hardness_mode, hardness_strength=strength)
    name = f"MNRL {'+'.join(d.replace('_to_', '2') for d in directions)} {partition_mode} {hardness_mode} k={k}"
    _check(name, *_pair(_ours(ours, q, p, n), _mnrl(theirs, q, p, n, k)))
    # ... and each option moves the loss (the comparison could fail)
    if directions != (QD,) or hardness_mode:
        assert rel_diff(_ours(ContrastiveLoss(temperature=0.05), q, p, n)[0], _ours(ours, q, p, n)[0]) > 1e-3


def _pair(ours, theirs):
    return ours[0], theirs[0], ours[1], theirs[1]


def test_symmetric_is_the_per_direction_pair():
    q, p, n = _raw(5, 8, seed=1), _raw(5, 8, seed=2), _raw(5, 8, seed=3)
    a = _ours(ContrastiveLoss(temperature=0.1, symmetric=True), q, p, n)
    b = _ours(ContrastiveLoss(temperature=0.1, directions=(QD, DQ), partition_mode="per_direction"), q, p, n)
    assert torch.equal(a[0], b[0])
    with pytest.raises(ValueError, match="pass one or the other"):
        ContrastiveLoss(symmetric=True, directions=(QD,))


class _Fixed(nn.Module):
    """A stand-in for a SentenceTransformer that returns the embeddings its features carry under ``key``."""

    def __init__(self, key: str) -> None:
        super().__init__()
        from tokenizers import Tokenizer
        from tokenizers.models import WordLevel
        from transformers import PreTrainedTokenizerFast

        self.key, self.max_seq_length = key, 8
        self.tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"[UNK]": 0}, unk_token="[UNK]")))
        self.anchor = nn.Parameter(torch.zeros(1))  # a device for sentence-transformers to read

    def __getitem__(self, index):  # model[0]: the input module sentence-transformers inspects (no StaticEmbedding)
        return self

    def forward(self, features):
        return {"sentence_embedding": features[self.key]}


def _gist(kind, k, margin, strategy, anchors, positives, guide_is_model, q, p, n, gq, gp, gn):
    from sentence_transformers.sentence_transformer.losses import CachedGISTEmbedLoss, GISTEmbedLoss

    model, guide = _Fixed("embedding"), _Fixed("embedding" if guide_is_model else "guide")
    options = dict(temperature=0.01, margin_strategy=strategy, margin=margin, contrast_anchors=anchors,
                   contrast_positives=positives)
    leaves = {name: t.clone().requires_grad_(True) for name, t in (("q", q), ("p", p), ("n", n)) if t is not None}
    columns = [F.normalize(leaves["q"], dim=-1), F.normalize(leaves["p"], dim=-1)]
    guides = [gq, gp]
    if k:
        columns += list(F.normalize(leaves["n"], dim=-1).view(q.shape[0], k, -1).unbind(1))
        guides += list(gn.view(q.shape[0], k, -1).unbind(1))
    if kind == "cached":  # CachedGISTEmbedLoss' loss on given embeddings (it takes several negative columns)
        loss_fn = CachedGISTEmbedLoss(model, guide, mini_batch_size=4, **options)
        value = loss_fn.calculate_loss([[c] for c in columns], [[g] for g in (columns if guide_is_model else guides)])
    else:
        loss_fn = GISTEmbedLoss(model, guide, **options)
        value = loss_fn([{"embedding": c, "guide": g} for c, g in zip(columns, guides)], None)
    value.backward()
    return value.detach(), {name: t.grad for name, t in leaves.items()}


GIST_CASES = [  # (GISTEmbedLoss or CachedGISTEmbedLoss, k, contrast_anchors, contrast_positives, the guide is the model)
    ("gist", 0, True, True, False),
    ("gist", 0, False, False, False),
    ("gist", 0, True, False, False),
    ("gist", 0, False, True, False),
    ("gist", 1, True, False, False),
    ("gist", 1, False, False, False),
    ("cached", 2, True, False, False),
    ("cached", 2, False, False, False),
    ("gist", 0, True, True, True),
    ("cached", 2, True, False, True),
]


@pytest.mark.parametrize("strategy, margin", [("absolute", 0.0), ("absolute", 0.1), ("relative", 0.1),
                                              ("relative", 0.5)])
@pytest.mark.parametrize("kind, k, anchors, positives, guide_is_model", GIST_CASES)
def test_guide_filtering_equals_gist_embed_loss(kind, k, anchors, positives, guide_is_model, strategy, margin):
    """GISTEmbedLoss' contrast_anchors / contrast_positives are our query_to_query / doc_to_doc (with negatives its
    positive-positive term leaves them out, ours not: compared without it). The guide: a guide model's embeddings
    (correlated with the model's, as a guide's are) or the model itself (ours: guide='self')."""
    rows, dim = 6, 16
    q, p = _raw(rows, dim, seed=31), _raw(rows, dim, seed=32)
    n = _raw(rows * k, dim, seed=33) if k else None
    gq, gp = q[:, :12] + 0.7 * _raw(rows, 12, seed=34), p[:, :12] + 0.7 * _raw(rows, 12, seed=35)
    gn = n[:, :12] + 0.7 * _raw(rows * k, 12, seed=36) if k else None
    directions = (QD,) + ((QQ,) if anchors else ()) + ((DD,) if positives else ())
    ours = ContrastiveLoss(temperature=0.01, directions=directions, guide_margin=margin, margin_strategy=strategy,
                           guide="self" if guide_is_model else "batch")
    guide = None if guide_is_model else {"query": gq, "positive": gp, **({"negative": gn} if k else {})}
    got = _ours(ours, q, p, n, guide_embeddings=guide)
    assert ours.last_masked > 0  # the guide filters something: the comparison could fail
    want = _gist(kind, k, margin, strategy, anchors, positives, guide_is_model, q, p, n, gq, gp, gn)
    name = (f"{'Cached' if kind == 'cached' else ''}GIST {strategy} {margin} k={k} anchors={anchors} "
            f"positives={positives} guide={'self' if guide_is_model else 'batch'}")
    _check(name, *_pair(got, want))
    unfiltered = _ours(ContrastiveLoss(temperature=0.01, directions=directions), q, p, n)
    assert rel_diff(unfiltered[0], got[0]) > 1e-3


def test_self_pairs_and_own_documents_are_not_counted_as_masked():
    """query_to_query's self-pairs and doc_to_doc's own documents leave the softmax as in sentence-transformers, but
    they are not negatives: with ids that mark nothing, nothing is counted; a shared positive is counted once per
    direction where it is a candidate (query_to_doc, doc_to_doc for rows 0 and 2; query_to_query for rows 0 and 2)."""
    q, p, n = _unit(4, 8, seed=1), _unit(4, 8, seed=2), _unit(4, 8, seed=3)
    ids = {"query": torch.arange(4), "positive": torch.arange(4) + 10, "negative": torch.arange(4) + 20}
    loss_fn = ContrastiveLoss(directions=(QD, QQ, DD))
    loss_fn.objective(q, p, n, content_ids=ids)
    assert loss_fn.last_masked == 0
    ids["positive"] = torch.tensor([10, 11, 10, 13])
    loss_fn.objective(q, p, n, content_ids=ids)
    assert loss_fn.last_masked == 6


def test_guide_filtering_needs_the_guide_embeddings():
    q, p = _unit(3, 8, seed=1), _unit(3, 8, seed=2)
    with pytest.raises(ValueError, match="guide_embeddings"):
        ContrastiveLoss(guide_margin=0.1).objective(q, p, None)
    with pytest.raises(ValueError, match="guide must be one of"):
        ContrastiveLoss(guide="teacher")
    with pytest.raises(ValueError, match="partition_mode='joint'"):
        ContrastiveLoss(directions=(QD, QQ), partition_mode="per_direction")


# ----- (c) GradCache: the same loss and gradients with ids and guide filtering --------------------------------------
def _with_extras(rows, batch, guide):
    """The batch with every input's content id (the images of color_rows: row i's negative is row i+1's positive) and
    the guide embeddings."""
    batch["content_ids"] = {side: torch.tensor([content_id(row[side]) for row in rows])
                            for side in ("query", "positive", "negative")}
    if guide is not None:
        batch["guide_embeddings"] = guide
    return batch


def _model_grads(model, loss_fn, mini_batch_size, guide):
    model.zero_grad()
    rows = color_rows(negatives=1)
    batch = _with_extras(rows, BiEncoderCollator(model, mini_batch_size=mini_batch_size)(rows), guide)
    loss = loss_fn(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("filtering", ["ids", "guide-batch", "guide-self", "directions+hardness", "matryoshka"])
def test_gradcache_equals_the_plain_loss_with_false_negatives_masked(tiny_path, filtering):
    from peft import LoraConfig

    model = BiEncoder.from_pretrained(tiny_path("clip"), lora_config=LoraConfig(r=4, init_lora_weights=False))
    rows = len(color_rows(negatives=1))
    guide = {"query": _raw(rows, 12, seed=41), "positive": _raw(rows, 12, seed=42),
             "negative": _raw(rows, 12, seed=43)}
    options = {"ids": {}, "guide-batch": dict(guide_margin=0.05), "guide-self": dict(guide_margin=0.02, guide="self"),
               "directions+hardness": dict(directions=(QD, QQ, DQ, DD), hardness_mode="all_negatives",
                                           hardness_strength=5.0, guide_margin=0.05, margin_strategy="relative"),
               "matryoshka": dict(guide_margin=0.05)}[filtering]

    def make(cached):
        inner = CachedContrastiveLoss(mini_batch_size=3, **options) if cached else ContrastiveLoss(**options)
        return MatryoshkaLoss(inner, dims=[64, 16]) if filtering == "matryoshka" else inner

    plain_fn, cached_fn = make(False), make(True)
    plain_loss, plain = _model_grads(model, plain_fn, None, guide)
    cached_loss, cached = _model_grads(model, cached_fn, 3, guide)
    assert plain_fn.last_masked >= rows  # each row's positive is another row's negative (by ids), and more by guide
    assert cached_fn.last_masked == plain_fn.last_masked
    assert plain and plain.keys() == cached.keys()
    assert_rel_close(cached_loss, plain_loss)
    assert_all_rel_close(cached, plain)
    FIGURES[f"GradCache {filtering}"] = max([rel_diff(cached_loss, plain_loss)]
                                            + [rel_diff(cached[k], plain[k]) for k in plain])
    print(f"GradCache {filtering}: max relative difference {FIGURES[f'GradCache {filtering}']:.1e}")
    unmasked_loss, _ = _model_grads(model, ContrastiveLoss(mask_duplicates=False), None, None)
    assert rel_diff(unmasked_loss, plain_loss) > 1e-3


# ----- (d) without ids nothing changes --------------------------------------------------------------------------
PREVIOUS = {  # the objective's values before false-negative masking existed (commit d997823), same inputs
    "plain": 4.114786624908447,
    "negatives": 5.873892307281494,
    "symmetric": 3.1047749519348145,
    "learnable": 3.0838499069213867,
    "maxsim": 10.505902290344238,
    "maxsim_symmetric": 8.6364164352417,
    "matryoshka": 14.034908294677734,
}


def _previous_cases():
    q, p, n = _unit(6, 16, seed=11), _unit(6, 16, seed=12), _unit(12, 16, seed=13)
    tq, tp, tn = _unit(6, 5, 8, seed=14), _unit(6, 7, 8, seed=15), _unit(12, 7, 8, seed=16)
    tq[:, 4:] = 0
    tp[0, 5:] = 0
    return {
        "plain": (ContrastiveLoss(temperature=0.05), (q, p, None)),
        "negatives": (ContrastiveLoss(temperature=0.05), (q, p, n)),
        "symmetric": (ContrastiveLoss(temperature=0.1, symmetric=True), (q, p, n)),
        "learnable": (ContrastiveLoss(temperature=0.07, learnable_temperature=True, symmetric=True), (q, p, None)),
        "maxsim": (MaxSimContrastiveLoss(), (tq, tp, tn)),
        "maxsim_symmetric": (MaxSimContrastiveLoss(symmetric=True), (tq, tp, tn)),
        "matryoshka": (MatryoshkaLoss(ContrastiveLoss(symmetric=True), dims=[16, 8]), (q, p, n)),
    }


@pytest.mark.parametrize("case", list(PREVIOUS))
def test_without_ids_the_loss_is_the_previous_one(case):
    loss_fn, (q, p, n) = _previous_cases()[case]
    value = loss_fn.objective(q, p, n)
    assert value.item() == pytest.approx(PREVIOUS[case], rel=1e-5)
    assert loss_fn.last_masked == 0
    # ids that mark nothing (every input distinct) change nothing either
    rows = q.shape[0]
    ids = {"query": torch.arange(rows), "positive": torch.arange(rows) + 100}
    if n is not None:
        ids["negative"] = torch.arange(n.shape[0]) + 200
    assert loss_fn.objective(q, p, n, content_ids=ids).item() == pytest.approx(PREVIOUS[case], rel=1e-5)
