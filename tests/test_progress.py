"""Progress bars on long work (hf_mm_rerank.progress): shown when asked, on the main process only, never by default
where stderr is no terminal (tests, logs), and off inside training with ``disable_tqdm``."""

from __future__ import annotations

import re

from images import COLORS, solid
from transformers import TrainingArguments

from hf_mm_rerank import BiEncoder, BiEncoderTrainer, CrossEncoder, RetrievalEvaluator, progress
from hf_mm_rerank.retrieval.mining import mine_hard_negatives

TEXTS = [f"a {color} square" for color in COLORS]  # 8 inputs


def bars(err: str) -> list[str]:
    """hf_mm_rerank's bar labels in what tqdm wrote (transformers' loading bars left out)."""
    found = {m.group(1) for m in re.finditer(r"([A-Z][a-z]+ [a-z ]+):\s+\d+%\|", err)}
    return sorted(label for label in found if label.startswith(("Encoding", "Scoring", "Validating")))


def test_encode_and_score_show_a_bar_when_asked_and_none_by_default(tiny_path, tmp_path, capfd, monkeypatch):
    from test_cross_encoder import _bert_classifier

    model = BiEncoder.from_pretrained(tiny_path("clip"))
    model.encode(TEXTS, batch_size=3, show_progress=True)
    err = capfd.readouterr().err
    assert bars(err) == ["Encoding queries"] and re.search(r"\d/8 \[", err), err[-500:]
    model.encode(TEXTS, batch_size=3)  # stderr is no terminal here: no bar by default
    model.encode(TEXTS, batch_size=3, show_progress=False)
    assert bars(capfd.readouterr().err) == []
    monkeypatch.setenv(progress.ENV, "1")
    model.encode([solid("red")], side="document", batch_size=3)
    assert bars(capfd.readouterr().err) == ["Encoding documents"]
    monkeypatch.setattr(progress, "world", lambda: (1, 2))  # not the main process: never
    model.encode(TEXTS, batch_size=3, show_progress=True)
    assert bars(capfd.readouterr().err) == []
    monkeypatch.undo()
    reranker = CrossEncoder.from_pretrained(_bert_classifier(tmp_path))
    reranker.score([("q", "d")] * 5, batch_size=2, show_progress=True)
    assert bars(capfd.readouterr().err) == ["Scoring pairs"]


def test_evaluators_and_mining_show_one_bar_per_job(tiny_path, capfd):
    model = BiEncoder.from_pretrained(tiny_path("clip"))
    corpus = {c: solid(c) for c in COLORS}
    evaluator = RetrievalEvaluator({c: f"a {c} square" for c in COLORS}, corpus, {c: {c} for c in COLORS},
                                   chunk_rows=3, show_progress=True)
    evaluator(model)
    err = capfd.readouterr().err
    # one bar over the corpus (3 chunks: not one bar each), one over the queries
    assert bars(err) == ["Encoding queries", "Encoding the corpus"] and "/8 [" in err
    assert err.count("Encoding documents") == 0
    RetrievalEvaluator({c: f"a {c} square" for c in COLORS}, corpus, {c: {c} for c in COLORS})(model)
    assert bars(capfd.readouterr().err) == []
    from datasets import Dataset

    rows = Dataset.from_dict({"query": TEXTS, "positive": [solid(c) for c in COLORS]})
    mine_hard_negatives(model, rows, num_negatives=2, show_progress=True)
    assert "Encoding the corpus" in bars(capfd.readouterr().err)


def test_inside_training_the_bars_follow_disable_tqdm(tiny_path, tmp_path, capfd, monkeypatch):
    """HF_MM_RERANK_PROGRESS=1 would show them; disable_tqdm=True turns them off for the evaluator the Trainer runs."""
    monkeypatch.setenv(progress.ENV, "1")
    model = BiEncoder.from_pretrained(tiny_path("clip"))
    evaluator = RetrievalEvaluator({c: f"a {c} square" for c in COLORS}, {c: solid(c) for c in COLORS},
                                   {c: {c} for c in COLORS})
    rows = [{"query": t, "positive": solid(c)} for t, c in zip(TEXTS, COLORS)]
    for disable, expected in ((True, []), (False, ["Encoding queries", "Encoding the corpus"])):
        args = TrainingArguments(str(tmp_path / str(disable)), report_to="none", disable_tqdm=disable, use_cpu=True)
        BiEncoderTrainer(model=model, args=args, train_dataset=rows, evaluator=evaluator).evaluate()
        assert bars(capfd.readouterr().err) == expected, disable


def test_validate_dataset_shows_a_bar_over_the_rows(tiny_path, capfd):
    from datasets import Dataset

    from hf_mm_rerank import validate_dataset

    rows = Dataset.from_dict({"query": TEXTS, "positive": [solid(c) for c in COLORS]})
    report = validate_dataset(rows, BiEncoder.from_pretrained(tiny_path("clip")), show_progress=True)
    assert report.rows == 8 and bars(capfd.readouterr().err) == ["Validating rows"]
