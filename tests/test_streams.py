"""Streamed training sets (``datasets.IterableDataset``): both trainers train on them as on the same rows map-style
(two processes: tests/ddp_scenarios.py's stream scenarios; SIGKILL + resume: test_long_runs.py), with the checks
that need a length done on the first rows, shards vs DataLoader workers named, and bad rows counted per stream."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from datasets import Dataset, load_dataset
from helpers import args, assert_all_rel_close
from images import COLORS, color_rows, solid
from peft import LoraConfig

from hf_mm_rerank import BiEncoder, BiEncoderTrainer, CrossEncoder, CrossEncoderTrainer, InputError


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _train(make_model, trainer_class, data, tmp_path, **overrides):
    torch.manual_seed(0)
    model = make_model()
    initial = _trainable(model)
    settings = dict(per_device_train_batch_size=4, max_steps=6, train_sampling_strategy="sequential")
    settings.update(overrides)
    trainer = trainer_class(model=model, args=args(tmp_path, **settings), train_dataset=data)
    trainer.train()
    return initial, _trainable(model), trainer


def test_a_streamed_bi_encoder_set_trains_as_the_same_rows_map_style(tiny_path, tmp_path):
    """16 rows, 6 steps of 4: one and a half passes, so the stream is read again from its start, as the epoch is."""
    rows = color_rows(repeat=2)
    clip = lambda: BiEncoder.from_pretrained(tiny_path("clip"), lora_config=LoraConfig(r=4))  # noqa: E731
    initial, mapped, _ = _train(clip, BiEncoderTrainer, Dataset.from_list(rows), tmp_path / "map")
    _, streamed, trainer = _train(clip, BiEncoderTrainer, Dataset.from_list(rows).to_iterable_dataset(num_shards=2),
                                  tmp_path / "stream")
    assert trainer.state.global_step == 6
    assert max(float((streamed[k] - initial[k]).abs().max()) for k in initial) > 1e-3  # it trained
    assert_all_rel_close(streamed, mapped)
    assert trainer.rows_read == 24
    card = (tmp_path / "stream" / "out" / "README.md")
    trainer.save_model()
    assert "a stream: 24 rows read" in card.read_text()


def _pointwise_rows() -> list[dict]:
    names = list(COLORS)
    return [{"query": f"a {c} square", "document": solid(names[(i + j) % 8]),
             "label": float(j == 0)} for i, c in enumerate(names) for j in range(2)]


def test_a_streamed_pointwise_reranker_set_trains_as_map_style(tiny_path, tmp_path):
    """The yes/no reranker on streamed (query, document, label) rows: once a shape error in the step."""
    rows = _pointwise_rows()
    reranker = lambda: CrossEncoder.from_pretrained(tiny_path("qwen2_vl"), head="yes_no",  # noqa: E731
                                                    lora_config=LoraConfig(r=4))
    initial, mapped, _ = _train(reranker, CrossEncoderTrainer, Dataset.from_list(rows), tmp_path / "map", max_steps=4)
    _, streamed, trainer = _train(reranker, CrossEncoderTrainer, Dataset.from_list(rows).to_iterable_dataset(),
                                  tmp_path / "stream", max_steps=4)
    assert max(float((streamed[k] - initial[k]).abs().max()) for k in initial) > 1e-4
    assert_all_rel_close(streamed, mapped)


def test_a_stream_without_features_is_checked_on_its_first_row(tiny_path, tmp_path):
    from datasets import IterableDataset

    def rows():
        for i in range(8):
            yield {"question": f"q{i}", "positive": f"d{i}"}

    stream = IterableDataset.from_generator(rows)
    assert stream.column_names is None  # datasets does not know them before reading
    model = BiEncoder.from_pretrained(tiny_path("clip"))
    with pytest.raises(ValueError, match=r"train_dataset: missing column\(s\) \['query'\]; found \['question', "):
        BiEncoderTrainer(model=model, args=args(tmp_path), train_dataset=stream)
    trainer = BiEncoderTrainer(model=model, args=args(tmp_path, max_steps=2, per_device_train_batch_size=4),
                               train_dataset=stream.rename_column("question", "query"))
    trainer.train()
    assert trainer.state.global_step == 2 and trainer.rows_read == 8
    path = tmp_path / "pairs.jsonl"  # a JSON-lines stream, as the recipes read one
    path.write_text("".join(json.dumps({"query": f"q{i}", "positive": f"d{i}"}) + "\n" for i in range(8)))
    stream = load_dataset("json", data_files=str(path), split="train", streaming=True)
    BiEncoderTrainer(model=model, args=args(tmp_path, max_steps=1, per_device_train_batch_size=4),
                     train_dataset=stream).train()


def test_an_empty_stream_and_a_stream_without_max_steps_are_named(tiny_path, tmp_path):
    model = BiEncoder.from_pretrained(tiny_path("clip"))
    stream = Dataset.from_list(color_rows()).to_iterable_dataset()
    with pytest.raises(ValueError, match="train_dataset is a stream with no rows"):
        BiEncoderTrainer(model=model, args=args(tmp_path), train_dataset=stream.filter(lambda row: False))
    with pytest.raises(ValueError, match=r"is a stream \(it has no length\).*max_steps=N"):
        BiEncoderTrainer(model=model, args=args(tmp_path, max_steps=-1), train_dataset=stream)


def test_workers_beyond_the_shards_are_lowered_or_named(tiny_path, tmp_path, monkeypatch, caplog):
    import hf_mm_rerank.training.arguments as arguments

    model = BiEncoder.from_pretrained(tiny_path("clip"))
    rows = Dataset.from_list(color_rows())
    with caplog.at_level(logging.WARNING, logger="hf_mm_rerank.data.streams"):
        trainer = BiEncoderTrainer(model=model, args=args(tmp_path, dataloader_num_workers=3),
                                   train_dataset=rows.to_iterable_dataset(num_shards=2))
    assert trainer.args.dataloader_num_workers == 3  # the user's choice is kept, and the idle worker named
    assert "dataloader_num_workers=3, but the training stream has 2 shard(s) per process" in caplog.text
    assert "1 worker(s) will read nothing. Fix: dataloader_num_workers=2" in caplog.text

    monkeypatch.delenv("HF_MM_RERANK_AUTO_WORKERS")
    monkeypatch.setattr(arguments, "_cpus_per_rank", lambda: 4)  # auto: 3 workers, 1 thread beside them
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    chosen = []
    monkeypatch.setattr(torch, "set_num_threads", chosen.append)
    trainer = BiEncoderTrainer(model=model, args=args(tmp_path), train_dataset=rows.to_iterable_dataset(num_shards=2))
    assert trainer.args.dataloader_num_workers == 2  # one per shard
    assert trainer.auto_pipeline.threads == (4, 2)  # and the freed core goes to the step
    assert chosen == []  # (set when training starts, not by the constructor)


def _bad_stream(tmp_path, bad: set[int], n: int = 16):
    for color in COLORS:
        solid(color).save(tmp_path / f"{color}.png")
    names = list(COLORS)
    rows = [{"query": f"a {names[i % 8]} square",
             "positive": str(tmp_path / ("missing.png" if i in bad else f"{names[i % 8]}.png"))} for i in range(n)]
    return Dataset.from_list(rows).to_iterable_dataset()


def test_bad_rows_in_a_stream_are_named_skipped_and_limited_by_the_rows_read(tiny_path, tmp_path):
    model = BiEncoder.from_pretrained(tiny_path("clip"))
    trainer = BiEncoderTrainer(model=model, args=args(tmp_path, max_steps=2, per_device_train_batch_size=4),
                               train_dataset=_bad_stream(tmp_path, {5}))
    with pytest.raises(InputError, match=r"row 5\b.*positive"):
        trainer.train()
    trainer = BiEncoderTrainer(model=model, args=args(tmp_path, max_steps=4, per_device_train_batch_size=4),
                               train_dataset=_bad_stream(tmp_path, {5}), bad_rows="skip")
    trainer.train()
    assert trainer.state.global_step == 4 and [row for row, _ in trainer.skipped_rows.rows] == [5]
    # every other row of the first 24 is bad: past max_skipped_fraction of the rows read, once ten are skipped
    many = _bad_stream(tmp_path, set(range(1, 24, 2)), n=40)
    trainer = BiEncoderTrainer(model=model, args=args(tmp_path, max_steps=10, per_device_train_batch_size=4),
                               train_dataset=many, bad_rows="skip", max_skipped_fraction=0.2)
    with pytest.raises(InputError, match=r"more than max_skipped_fraction=0.2 of the \d+ rows of the stream it has read"):
        trainer.train()
    assert trainer.state.global_step < 10


# ----- the recipes' --streaming ---------------------------------------------------------------------------------
def _recipe_argv(tiny_path, tmp_path, data: str, *extra: str) -> list[str]:
    return ["--model_name_or_path", tiny_path("clip"), "--data_files", data, "--streaming", "true",
            "--output_dir", str(tmp_path / "out"), "--per_device_train_batch_size", "4", "--use_cpu", "true",
            "--dataloader_num_workers", "0", "--save_strategy", "no", "--report_to", "none", *extra]


def test_the_bi_encoder_recipe_streams_its_data_files_and_holds_out_the_first_rows(tiny_path, tmp_path):
    from test_recipes import _json_data, _recipe

    data = _json_data(tmp_path / "data")  # 16 rows with relative image paths
    recipe = _recipe()
    report = recipe.main(_recipe_argv(tiny_path, tmp_path, data, "--max_steps", "2", "--max_eval_samples", "4"))
    assert "eval_ndcg@10" in report["before"] and "eval_ndcg@10" in report["after"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "a stream: 8 rows read" in card  # 2 steps x 4 rows, after the 4 held out
    from hf_mm_rerank.recipes_kit.data import DataArguments, load_data

    train, held = load_data(DataArguments(data_files=[data], streaming=True, max_eval_samples=4))
    assert [row["query"] for row in held] == [f"a {c} square" for c in list(COLORS)[:4]]
    assert next(iter(train))["query"] == f"a {list(COLORS)[4]} square"  # training starts after the held-out rows
    with pytest.raises(ValueError, match="no length to take a fraction of. Fix: --max_eval_samples N"):
        recipe.main(_recipe_argv(tiny_path, tmp_path / "a", data, "--max_steps", "2", "--eval_fraction", "0.25"))
    with pytest.raises(ValueError, match="--validate_data reads every training row"):
        recipe.main(_recipe_argv(tiny_path, tmp_path / "b", data, "--max_steps", "2", "--validate_data", "true"))
    no_steps = _recipe_argv(tiny_path, tmp_path / "c", data)
    no_steps[1] = "/nonexistent-model"  # refused at parsing, before the data or the model is read
    with pytest.raises(ValueError, match=r"recipes: --max_steps N"):
        recipe.main(no_steps)
    with pytest.raises(ValueError, match="--max_eval_samples 40 held out every row of the stream"):
        load_data(DataArguments(data_files=[data], streaming=True, max_eval_samples=40))
    with pytest.raises(ValueError, match=r"the rows have columns \['query', 'positive', 'negative'\], without \['query'\]"):
        load_data(DataArguments(data_files=[data], streaming=True, query_column="queries", positive_column="query"))


def test_the_reranker_recipe_refuses_to_invent_negatives_for_a_stream(tiny_path, tmp_path):
    from test_recipes import _recipe

    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"query": f"q{i}", "positive": f"d{i}"}) + "\n" for i in range(8)))
    argv = ["--model_name_or_path", tiny_path("qwen2_vl"), "--data_files", str(path), "--streaming", "true",
            "--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--use_cpu", "true"]
    with pytest.raises(ValueError, match="random or mined negatives need the whole set in memory"):
        _recipe("train_cross_encoder").main(argv)


# ----- corpora too large for memory: read and encoded chunk by chunk, embeddings memory-mapped -----------------
def _corpus_parts():
    names = list(COLORS)
    corpus = {f"img-{c}": solid(c) for c in names} | {f"txt-{c}": f"a {c} thing" for c in names}
    corpus["dup"] = "a red thing"  # the same text twice: equal scores, ranked in corpus order
    queries = {c: f"a {c} square" for c in names}
    relevant = {c: {f"img-{c}", f"txt-{c}"} for c in names}
    return queries, corpus, relevant


class _Pairs:
    """A re-iterable of (id, cell) pairs, as a user's own corpus reader would be."""

    def __init__(self, corpus):
        self.corpus = corpus

    def __iter__(self):
        return iter(self.corpus.items())


def test_the_evaluator_reads_a_corpus_dataset_stream_or_iterable_in_chunks(tiny_path, tmp_path):
    from hf_mm_rerank import RetrievalEvaluator
    from hf_mm_rerank.retrieval import core as retrieval

    model = BiEncoder.from_pretrained(tiny_path("clip"))
    queries, corpus, relevant = _corpus_parts()
    # (chunks of whole batches: a document's embedding then comes from the same batch as in one pass, bit for bit)
    exact = RetrievalEvaluator(queries, corpus, relevant, batch_size=4)
    expected_rankings = exact.rankings(model, 17)
    expected = exact(model)
    table = Dataset.from_list([{"id": k, "document": v} for k, v in corpus.items() if k.startswith("txt") or k == "dup"])
    texts = {k: v for k, v in corpus.items() if k.startswith("txt") or k == "dup"}
    text_relevant = {c: {f"txt-{c}"} for c in COLORS}
    exact_text = RetrievalEvaluator(queries, texts, text_relevant, batch_size=3)(model)
    for source in (table, table.to_iterable_dataset(num_shards=2)):
        for store, dtype in ((None, "float32"), (str(tmp_path / "store"), "float32")):
            got = RetrievalEvaluator(queries, source, text_relevant, batch_size=3, chunk_rows=3, store=store,
                                     store_dtype=dtype)(model)
            assert got == exact_text, (type(source).__name__, store)
    chunked = RetrievalEvaluator(queries, _Pairs(corpus), relevant, batch_size=4, chunk_rows=8,
                                 store=str(tmp_path / "s2"))
    assert chunked.rankings(model, 17) == expected_rankings and chunked(model) == expected  # ties included
    listed = RetrievalEvaluator(queries, list(corpus.items()), relevant, batch_size=4)  # [(id, cell), ...]
    assert listed.doc_ids == list(corpus) and listed(model) == expected
    half = RetrievalEvaluator(queries, _Pairs(corpus), relevant, chunk_rows=5, store=str(tmp_path / "s3"),
                              store_dtype="float16")
    assert abs(half(model)["ndcg@10"] - expected["ndcg@10"]) < 0.05
    stored = retrieval.encode_corpus(model, half.corpus, 32, False, store=str(tmp_path / "s3"), dtype="float16")
    path = tmp_path / "s3" / "corpus-rank0-float16.bin"
    assert stored.dtype == torch.float16 and path.stat().st_size == 17 * stored.shape[1] * 2
    assert str(path) in open("/proc/self/maps").read()  # the tensor is the memory-mapped file, not a copy in memory
    with pytest.raises(ValueError, match=r"document ids repeat \(e.g. 'a'\)"):
        RetrievalEvaluator(queries, [("a", "x"), ("b", "y"), ("a", "z")], {})
    with pytest.raises(TypeError, match="one-shot iterator"):
        RetrievalEvaluator(queries, (pair for pair in corpus.items()), relevant)
    with pytest.raises(ValueError, match=r"no document column 'document'.*corpus_columns"):
        RetrievalEvaluator(queries, Dataset.from_dict({"id": ["a"], "text": ["x"]}), {})


def test_mining_reads_a_streamed_corpus_and_equals_the_list_corpus(tiny_path, tmp_path):
    from hf_mm_rerank import mine_hard_negatives

    model = BiEncoder.from_pretrained(tiny_path("clip"))
    names = list(COLORS)
    pairs = Dataset.from_list([{"query": f"a {c} square", "positive": f"a {c} thing"} for c in names])
    documents = [f"a {c} {kind}" for c in names for kind in ("thing", "object", "shape")]
    expected = mine_hard_negatives(model, pairs, corpus=documents, num_negatives=2)
    stream = Dataset.from_dict({"document": documents}).to_iterable_dataset()
    got = mine_hard_negatives(model, pairs, corpus=stream, num_negatives=2, store=str(tmp_path / "store"))
    assert got.to_list() == expected.to_list() and len(got) == 8
