"""Several training sets at once and batches without duplicates (hf_mm_rerank.data.sampling, training.mixing):
every global batch from one dataset on every rank, the mixing schedules of sentence-transformers 6.3, its
no-duplicates greedy, false negatives never reaching the loss, and the trainers, collators and card on a mixture."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from helpers import args as training_args
from helpers import assert_rel_close
from images import COLORS, color_rows, solid

from hf_mm_rerank import BiEncoder, BiEncoderTrainer, ContrastiveLoss
from hf_mm_rerank.data.collators import BiEncoderCollator
from hf_mm_rerank.data.dedup import content_id, with_content_ids
from hf_mm_rerank.data.pipeline import undecoded_images
from hf_mm_rerank.data.sampling import MixtureDataset, SourceBatchSampler
from hf_mm_rerank.publishing.model_card import card_info
from hf_mm_rerank.training.mixing import Mixing


def _texts(n: int, tag: str, repeat_every: int = 0) -> list[dict]:
    """n (query, positive) text rows; with ``repeat_every``, row i's positive is shared by i + repeat_every."""
    return [{"query": f"{tag} question {i}", "positive": f"{tag} answer {i % repeat_every if repeat_every else i}"}
            for i in range(n)]


def _source_of(mixture: MixtureDataset, index: int) -> int:
    return next(s for s in range(len(mixture.names)) if mixture.offsets[s] <= index < mixture.offsets[s + 1])


@pytest.mark.parametrize("mixing", ["proportional", "round_robin", "temperature"])
def test_every_global_batch_comes_from_one_source_on_every_rank(mixing):
    mixture = MixtureDataset({"a": _texts(24, "a"), "b": _texts(40, "b")})
    sampler = SourceBatchSampler(mixture, batch_size=4, processes=2, mixing=mixing, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) and len(batches) % 2 == 0
    assert all(len(b) == 4 for b in batches)
    for step in range(0, len(batches), 2):  # accelerate gives batch 2k to rank 0 and 2k + 1 to rank 1
        rows = batches[step] + batches[step + 1]
        assert len({_source_of(mixture, i) for i in rows}) == 1, rows
        assert len(set(rows)) == 8
    sources = [_source_of(mixture, b[0]) for b in batches[::2]]
    assert set(sources) == {0, 1}  # both datasets are drawn
    if mixing == "round_robin":
        assert sources == [0, 1] * 3  # until the smaller (24 rows: 3 global batches of 8) runs out
    if mixing == "proportional":
        assert sorted(sources) == [0] * 3 + [1] * 5  # every batch of each, once
    mixture.set_epoch(1)
    assert list(sampler) != batches  # a new epoch, a new order
    mixture.set_epoch(0)
    assert list(sampler) == batches  # an epoch is a function of (seed, epoch): a resume replays it


def _st_sources(sampler_class, sizes, batch_size, seed, epoch):
    """The dataset of each batch sentence-transformers' multi-dataset sampler yields."""
    from sentence_transformers.base.sampler import DefaultBatchSampler
    from torch.utils.data import ConcatDataset, RandomSampler

    datasets = [Dataset.from_list(_texts(n, str(k))) for k, n in enumerate(sizes)]
    children = [DefaultBatchSampler(RandomSampler(d, generator=torch.Generator().manual_seed(k)), batch_size=batch_size,
                                    drop_last=True) for k, d in enumerate(datasets)]  # as their trainer builds them
    sampler = sampler_class(ConcatDataset(datasets), children, generator=torch.Generator(), seed=seed)
    sampler.set_epoch(epoch)
    offsets = [0, sizes[0], sizes[0] + sizes[1], sum(sizes)]
    return [next(k for k in range(3) if offsets[k] <= b[0] < offsets[k + 1]) for b in sampler]


@pytest.mark.parametrize("strategy", ["proportional", "round_robin"])
@pytest.mark.parametrize("epoch", [0, 3])
def test_mixing_schedules_equal_sentence_transformers(strategy, epoch):
    from sentence_transformers.base.sampler import ProportionalBatchSampler, RoundRobinBatchSampler

    sizes = [20, 52, 36]
    theirs = _st_sources({"proportional": ProportionalBatchSampler, "round_robin": RoundRobinBatchSampler}[strategy],
                         sizes, 4, seed=7, epoch=epoch)
    mixture = MixtureDataset({str(k): _texts(n, str(k)) for k, n in enumerate(sizes)})
    ours = SourceBatchSampler(mixture, batch_size=4, mixing=strategy, seed=7).schedule(epoch)
    assert ours == theirs and len(set(ours)) == 3


def test_temperature_mixing_revisits_small_sets_as_alpha_says():
    mixture = MixtureDataset({"small": _texts(16, "s"), "large": _texts(400, "l")})
    uniform = SourceBatchSampler(mixture, batch_size=4, mixing="temperature", alpha=0.0, seed=0)
    schedule = uniform.schedule(0)
    assert len(schedule) == 104 and 0.35 < schedule.count(0) / 104 < 0.65  # alpha 0: either set alike
    rows = [i for b in uniform for i in b if i < 16]
    assert len(rows) > 16 and set(rows) == set(range(16))  # the small set, reshuffled as it runs out
    proportional = SourceBatchSampler(mixture, batch_size=4, mixing="temperature", alpha=1.0, seed=0).schedule(0)
    assert proportional.count(0) / 104 < 0.12  # alpha 1: about 16 / 416 of the batches


def test_no_duplicates_keeps_shared_content_out_of_every_global_batch():
    """20 photos with 5 captions each (as COCO has): plain sampling puts rows of one photo together (the second
    copy becomes a false negative of the first); the sampler never does, across both ranks' halves, and defers."""
    rows = [{"query": f"caption {j} of photo {p}", "positive": f"photo {p}"} for p in range(20) for j in range(5)]
    mixture = MixtureDataset({"coco": rows})
    plain = list(SourceBatchSampler(mixture, batch_size=4, processes=2, seed=0))
    sampler = SourceBatchSampler(mixture, batch_size=4, processes=2, no_duplicates=True, seed=0)
    batches = list(sampler)
    assert len(batches) == len(plain) == 24

    def shared(batches):
        return sum(len(g) - len({rows[i]["positive"] for i in g})
                   for g in (batches[k] + batches[k + 1] for k in range(0, len(batches), 2)))

    assert shared(plain) > 0  # (the test can fail: plain batches do hold duplicates)
    assert shared(batches) == 0
    assert sampler.deferred > 0


def test_no_duplicates_equals_sentence_transformers_greedy_on_its_first_pass():
    from sentence_transformers.base.sampler import NoDuplicatesBatchSampler

    data = Dataset.from_list(_texts(64, "t", repeat_every=40))  # 24 positives appear twice
    theirs = list(NoDuplicatesBatchSampler(data, batch_size=8, drop_last=False, generator=torch.Generator(), seed=5))
    first_pass = []
    for batch in theirs:  # their first pass: full batches until the first one it could not fill
        if len(batch) < 8:
            break
        first_pass.append(batch)
    ours = list(SourceBatchSampler(MixtureDataset({"t": with_content_ids(data)}), batch_size=8, no_duplicates=True,
                                   seed=5))
    assert len(first_pass) >= 4
    assert ours[:len(first_pass)] == first_pass


def test_too_few_distinct_contents_for_the_batch_is_refused_by_name():
    rows = [{"query": f"q{i}", "positive": "the same page"} for i in range(40)]
    sampler = SourceBatchSampler(MixtureDataset({"pages": rows}), batch_size=4, no_duplicates=True)
    with pytest.raises(ValueError, match=r"train_dataset\['pages'\].*too few distinct contents.*Fix"):
        list(sampler)


def test_content_ids_follow_content_not_columns_or_objects():
    red, same_red = solid("red"), solid("red")
    assert content_id(red) == content_id(same_red) != content_id(solid("blue"))
    assert content_id("a red square") == content_id("a red square") != content_id("a red square ")
    cell = {"bytes": b"\x89PNG...", "path": None}
    assert content_id(cell) == content_id({"bytes": b"\x89PNG...", "path": "elsewhere.png"})
    assert content_id({"text": "x", "image": red}) != content_id("x")


def test_collator_applies_each_datasets_prompts_and_names_its_source(tiny_path):
    model = BiEncoder.from_pretrained(tiny_path("clip"))
    collator = BiEncoderCollator(model)
    collator.source_prompts = {"docs": {"query": "find the page: "}}
    rows = [{"query": "red", "positive": "a red page", "_source": "docs"},
            {"query": "blue", "positive": "a blue page", "_source": "docs"}]
    batch = collator(rows)
    plain = BiEncoderCollator(model)([{k: v for k, v in r.items() if k != "_source"} for r in rows])
    prompted = model.featurizer.tokenizer(["find the page: red", "find the page: blue"], padding=True)
    assert batch["source"] == "docs" and "source" not in plain
    assert batch["query"][0]["text"]["input_ids"].tolist() == prompted["input_ids"]
    assert torch.equal(batch["positive"][0]["text"]["input_ids"], plain["positive"][0]["text"]["input_ids"])
    with pytest.raises(Exception, match="of dataset 'docs'"):  # a bad row names its dataset
        collator([{"query": None, "positive": "x", "_source": "docs", "_row": 3}])


class _Recording(ContrastiveLoss):
    def __init__(self, seen, **kwargs):
        super().__init__(**kwargs)
        self.seen = seen

    def forward(self, model, batch, objective=None):
        self.seen.append((batch["source"], batch["content_ids"]["positive"].tolist()))
        return super().forward(model, batch, objective)


def test_a_trainer_trains_a_mixture_with_a_loss_per_dataset_and_the_card_lists_it(tiny_path, tmp_path):
    photos = Dataset.from_list(color_rows(repeat=2))  # 16 rows, each with a hard negative (another colour)
    paints = Dataset.from_list([{"query": f"{c} paint", "positive": f"the colour {c}"} for c in COLORS] * 2)
    seen: list = []
    trainer = BiEncoderTrainer(
        model=BiEncoder.from_pretrained(tiny_path("clip")),
        args=training_args(tmp_path, per_device_train_batch_size=4, max_steps=8),
        train_dataset={"photos": photos, "paints": paints},
        loss={"photos": _Recording(seen), "paints": _Recording(seen, temperature=0.1)},
        mixing=Mixing(no_duplicates=True, prompts={"paints": {"query": "Find the paint: "}}))
    trainer.train()
    ids = {name: {content_id(r["positive"]) for r in undecoded_images(d)}  # as the collator sees the cells
           for name, d in (("photos", photos), ("paints", paints))}
    assert len(seen) == 8 and {name for name, _ in seen} == {"photos", "paints"}
    for name, positives in seen:  # every batch from the dataset it names, without a repeated positive
        assert set(positives) <= ids[name] and len(set(positives)) == 4
    logged = [row for row in trainer.state.log_history if "loss" in row]
    assert all("deferred_rows" in row and "masked_negatives" in row for row in logged)
    assert trainer.run_facts().datasets == {"photos": {"rows": 16, "share": 0.5}, "paints": {"rows": 16, "share": 0.5}}
    card = card_info(trainer)["training"]["datasets (rows, share of the batches)"]
    assert card == "photos: 16 rows, 50%; paints: 16 rows, 50%"


def test_duplicates_that_reach_a_batch_are_masked_in_the_loss_and_counted(tiny_path, tmp_path):
    """Without the sampler, 5 captions per photo put copies in one batch: the loss masks them (logged)."""
    rows = [{"query": f"caption {j} of {c}", "positive": solid(c)} for c in list(COLORS)[:4] for j in range(4)]
    trainer = BiEncoderTrainer(model=BiEncoder.from_pretrained(tiny_path("clip")),
                               args=training_args(tmp_path, per_device_train_batch_size=8, max_steps=2),
                               train_dataset=Dataset.from_list(rows))
    trainer.train()
    masked = [row["masked_negatives"] for row in trainer.state.log_history if "loss" in row]
    assert len(masked) == 2 and sum(masked) > 0


def test_mixture_errors_name_the_dataset():
    small = Dataset.from_list(_texts(3, "s"))
    with pytest.raises(ValueError, match=r"'small' \(3 rows\) cannot fill one global batch of 8"):
        SourceBatchSampler(MixtureDataset({"big": _texts(40, "b"), "small": small}), batch_size=8)
    with pytest.raises(ValueError, match="Mixing\\(strategy='random'\\)"):
        Mixing(strategy="random")


def test_a_reranker_trains_a_pointwise_and_a_grouped_dataset_each_with_its_own_loss(tiny_path, tmp_path):
    from hf_mm_rerank import CrossEncoder, CrossEncoderTrainer
    from hf_mm_rerank.losses import BinaryCrossEntropyLoss, ListwiseSoftmaxLoss

    names = list(COLORS)
    pointwise = Dataset.from_list([{"query": f"a {c} square", "document": solid(d), "label": float(c == d)}
                                   for c in names for d in (c, names[(names.index(c) + 1) % 8])])
    grouped = Dataset.from_list([{"query": f"{c} paint", "positive": f"the colour {c}",
                                  "negative_1": f"the colour {names[(i + 1) % 8]}"} for i, c in enumerate(names)])
    model = CrossEncoder.from_pretrained(tiny_path("qwen2_vl"), head="yes_no", system_prompt="", instruction="",
                                         query_prefix="", document_prefix="")
    trainer = CrossEncoderTrainer(model=model, args=training_args(tmp_path, per_device_train_batch_size=4, max_steps=4),
                                  train_dataset={"pointwise": pointwise, "grouped": grouped},
                                  mixing=Mixing(strategy="round_robin", prompts={"grouped": {"instruction": "Paints."}}))
    kinds = {name: type(loss) for name, loss in trainer.loss.losses.items()}
    assert kinds == {"pointwise": BinaryCrossEntropyLoss, "grouped": ListwiseSoftmaxLoss}  # each layout's default
    featurizer = trainer.data_collator.featurizer_for([{"_source": "grouped"}])
    assert featurizer.prompt["instruction"] == "Paints." and model.featurizer.prompt["instruction"] == ""
    trainer.train()
    assert trainer.state.global_step == 4 and all(row["loss"] > 0 for row in trainer.state.log_history if "loss" in row)


def test_a_guide_models_embeddings_filter_negatives_in_training(tiny_path, tmp_path):
    """GIST through the trainer: add_guide_embeddings stores the guide's vectors once; the collator puts them in each
    batch, and ContrastiveLoss(guide="batch") masks the negatives the guide scores above the positive (margin 0)."""
    from hf_mm_rerank import add_guide_embeddings

    guide = BiEncoder.from_pretrained(tiny_path("siglip"))
    rows = Dataset.from_list(color_rows(repeat=2))
    guided = add_guide_embeddings(rows, guide, batch_size=4)
    assert {"guide_query", "guide_positive", "guide_negatives"} <= set(guided.column_names)
    expected = guide.encode([rows[0]["query"]], side="query")[0]
    assert_rel_close(torch.tensor(guided[0]["guide_query"]), expected, 1e-5)  # the guide's own encode, stored
    batch = BiEncoderCollator(BiEncoder.from_pretrained(tiny_path("clip")))([guided[i] for i in range(4)])
    assert batch["guide_embeddings"]["negative"].shape == (4, expected.shape[0])
    trainer = BiEncoderTrainer(model=BiEncoder.from_pretrained(tiny_path("clip")),
                               args=training_args(tmp_path, per_device_train_batch_size=8, max_steps=2),
                               train_dataset=guided, loss=ContrastiveLoss(guide_margin=0.0, guide="batch"))
    trainer.train()
    masked = [row["masked_negatives"] for row in trainer.state.log_history if "loss" in row]
    assert len(masked) == 2 and sum(masked) > 0  # an untrained guide scores some negatives above the positive
    with pytest.raises(ValueError, match="guide"):  # guide="batch" without the columns: named
        BiEncoderTrainer(model=BiEncoder.from_pretrained(tiny_path("clip")), args=training_args(tmp_path, max_steps=1),
                         train_dataset=rows, loss=ContrastiveLoss(guide_margin=0.0, guide="batch")).train()


def test_a_rerankers_grouped_row_whose_negative_is_its_positive_is_named_or_skipped(tiny_path):
    from hf_mm_rerank import CrossEncoder, CrossEncoderCollator, InputError

    model = CrossEncoder.from_pretrained(tiny_path("qwen2_vl"), head="yes_no")
    rows = [{"query": "red", "positive": solid("red"), "negative_1": solid("blue"), "_row": 0},
            {"query": "blue", "positive": solid("blue"), "negative_1": solid("blue"), "_row": 1}]  # the same image
    with pytest.raises(InputError, match=r"row 1, column 'negative_1': this negative is the row's positive"):
        CrossEncoderCollator(model)(rows)
    batch = CrossEncoderCollator(model, bad_rows="skip")(rows)
    assert batch["targets"].tolist() == [1.0, 0.0] and [where for where, _ in batch["skipped_rows"]] == [1]


def test_evaluators_and_evaluation_sets_given_as_dicts_are_named_in_the_metrics(tiny_path, tmp_path):
    from hf_mm_rerank import RetrievalEvaluator

    def evaluator(colours):
        return RetrievalEvaluator({c: f"a {c} square" for c in colours}, {c: solid(c) for c in colours},
                                  {c: {c} for c in colours}, batch_size=4)

    names = list(COLORS)
    model = BiEncoder.from_pretrained(tiny_path("clip"))
    sets = {"warm": Dataset.from_list(color_rows()[:4]), "cold": Dataset.from_list(color_rows()[4:])}
    trainer = BiEncoderTrainer(model=model, args=training_args(tmp_path, max_steps=1), train_dataset=sets["warm"],
                               eval_dataset=sets, evaluator={"warm": evaluator(names[:4]), "cold": evaluator(names[4:])})
    metrics = trainer.evaluate()
    assert {"eval_warm_loss", "eval_cold_loss", "eval_warm_ndcg@10", "eval_cold_ndcg@10"} <= set(metrics)
    assert metrics["eval_warm_ndcg@10"] == evaluator(names[:4])(model)["ndcg@10"]
    assert metrics["eval_cold_ndcg@10"] == evaluator(names[4:])(model)["ndcg@10"]
    assert not any(k.startswith("eval_warm_cold") or k.startswith("eval_cold_warm") for k in metrics)
    single = BiEncoderTrainer(model=model, args=training_args(tmp_path, max_steps=1), train_dataset=sets["warm"],
                              eval_dataset=sets, evaluator=evaluator(names))
    metrics = single.evaluate()  # one evaluator with named sets: run once, unprefixed by a set's name
    assert "eval_ndcg@10" in metrics and not any(k.endswith("_ndcg@10") and k != "eval_ndcg@10" for k in metrics)
    alone = BiEncoderTrainer(model=model, args=training_args(tmp_path, max_steps=1), train_dataset=sets["warm"],
                             evaluator={"warm": evaluator(names[:4]), "cold": evaluator(names[4:])}).evaluate()
    assert {"eval_warm_ndcg@10", "eval_cold_ndcg@10"} <= set(alone)


def test_an_evaluation_set_beside_a_mixture_with_a_loss_per_dataset_gets_the_first_datasets_loss(tiny_path, tmp_path):
    photos = Dataset.from_list(color_rows(repeat=2))
    paints = Dataset.from_list([{"query": f"{c} paint", "positive": f"the colour {c}"} for c in COLORS] * 2)
    trainer = BiEncoderTrainer(model=BiEncoder.from_pretrained(tiny_path("clip")),
                               args=training_args(tmp_path, per_device_train_batch_size=4, max_steps=1),
                               train_dataset={"photos": photos, "paints": paints}, eval_dataset=photos,
                               loss={"photos": ContrastiveLoss(), "paints": ContrastiveLoss(temperature=0.5)})
    expected = BiEncoderTrainer(model=trainer.model, args=training_args(tmp_path, per_device_train_batch_size=4),
                                train_dataset=photos, eval_dataset=photos, loss=ContrastiveLoss()).evaluate()
    assert trainer.evaluate()["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-6)
