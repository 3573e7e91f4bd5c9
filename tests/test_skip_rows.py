"""``bad_rows="skip"``: unreadable rows are dropped from their batches, logged, counted in the logs and the model
card, and training stops when too many are bad; ``validate_dataset`` lists every bad row at once without decoding
pixels; the recipes' ``--validate_data`` / ``--bad_rows`` flags."""

from __future__ import annotations

import logging

import pytest
from datasets import Dataset
from helpers import args
from images import COLORS, solid
from PIL import Image, ImageFile

from hf_mm_rerank import (
    BiEncoder,
    BiEncoderCollator,
    BiEncoderTrainer,
    CrossEncoderCollator,
    InputError,
    validate_dataset,
)
from hf_mm_rerank.data.schema import ROW_KEY

BAD = {5: ("positive", "never_downloaded.png', which does not exist"), 11: ("query", "an empty string"), 13: ("positive", "(10,000 pixels), over the limit of 6,000 pixels")}


def _rows(tmp_path, bad=BAD):
    """20 (query, image path) rows; the rows in ``bad`` have a missing file, an empty query or a pixel bomb."""
    paths = {}
    for color in COLORS:
        paths[color] = str(tmp_path / f"{color}.png")
        solid(color).save(paths[color])
    bomb = tmp_path / "bomb.png"
    solid("red", (100, 100)).save(bomb)  # beyond the pixel limit the tests set (PIL's own is 89 megapixels)
    rows = []
    for i in range(20):
        color = list(COLORS)[i % len(COLORS)]
        rows.append({"query": f"a {color} square", "positive": paths[color]})
    if 5 in bad:
        rows[5]["positive"] = str(tmp_path / "never_downloaded.png")
    if 11 in bad:
        rows[11]["query"] = "   "
    if 13 in bad:
        rows[13]["positive"] = str(bomb)
    return rows


@pytest.fixture()
def small_pixel_limit(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)  # a 100x100 image is then over the limit, 40x30 is not


def _trainer(tiny_path, tmp_path, rows, max_steps=5, **kwargs):
    model = BiEncoder.from_pretrained(tiny_path("clip"))
    return BiEncoderTrainer(model=model, args=args(tmp_path, per_device_train_batch_size=4, max_steps=max_steps,
                                                   save_strategy="no"),
                            train_dataset=Dataset.from_list(rows), **kwargs)


def test_skip_drops_logs_and_counts_bad_rows(tiny_path, tmp_path, small_pixel_limit, caplog):
    trainer = _trainer(tiny_path, tmp_path, _rows(tmp_path), max_steps=15, bad_rows="skip", max_skipped_fraction=0.2)
    with caplog.at_level(logging.WARNING, logger="hf_mm_rerank.data.validation"):
        trainer.train()
    assert trainer.state.global_step == 15  # three epochs (20 rows, 4 per batch), every batch trained
    assert sorted(row for row, _ in trainer.skipped_rows.rows) == [5, 11, 13]  # each bad row once, not per epoch
    for row, (column, reason) in BAD.items():
        assert caplog.text.count(f"skipping row {row} (bad_rows='skip'): row {row}, column '{column}'") == 1
        assert reason in caplog.text
    assert [r["skipped_rows"] for r in trainer.state.log_history if "skipped_rows" in r][-1] == 3
    trainer.save_model()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "rows skipped as unreadable (bad_rows='skip') | 3 |" in card


def test_raise_is_the_default_and_names_the_first_bad_row(tiny_path, tmp_path, small_pixel_limit):
    trainer = _trainer(tiny_path, tmp_path, _rows(tmp_path))
    trainer.args.train_sampling_strategy = "sequential"
    with pytest.raises(InputError, match=r"row 5, column 'positive': received the image path .*never_downloaded"):
        trainer.train()


def test_skip_stops_when_too_many_rows_are_bad(tiny_path, tmp_path, small_pixel_limit):
    trainer = _trainer(tiny_path, tmp_path, _rows(tmp_path), bad_rows="skip", max_skipped_fraction=0.1)
    with pytest.raises(InputError, match=r"3 rows skipped on this process, more than max_skipped_fraction=0.1 of its "
                                         r"share of the 20 training rows"):
        trainer.train()


def test_a_batch_of_only_bad_rows_stops(tiny_path):
    collator = BiEncoderCollator(BiEncoder.from_pretrained(tiny_path("clip")), bad_rows="skip")
    rows = [{ROW_KEY: 7, "query": "", "positive": solid("red")}, {ROW_KEY: 8, "query": "q", "positive": None}]
    with pytest.raises(InputError, match=r"every row of this batch is unreadable.*row 7, column 'query'"):
        collator(rows)
    with pytest.raises(ValueError, match="bad_rows='sometimes'"):
        BiEncoderCollator(collator.featurizer, bad_rows="sometimes")


def test_reranker_rows_are_skipped_too(tiny_path):
    from test_reranking import _reranker

    collator = CrossEncoderCollator(_reranker(tiny_path("qwen2_vl")), bad_rows="skip")
    rows = [{ROW_KEY: 0, "query": "a red square", "document": solid("red"), "label": 1.0},
            {ROW_KEY: 1, "query": "a red square", "document": solid("blue"), "label": 7.0},  # not in [0, 1]
            {ROW_KEY: 2, "query": "a red square", "document": solid("green"), "label": 0.0}]
    batch = collator(rows)
    assert batch["targets"].tolist() == [1.0, 0.0]
    [(row, reason)] = batch["skipped_rows"]
    assert row == 1 and "column 'label': received 7.0" in reason


def test_validate_dataset_lists_every_bad_row_without_decoding_an_image_over_the_limit(tiny_path, tmp_path,
                                                                                        small_pixel_limit, monkeypatch):
    model = BiEncoder.from_pretrained(tiny_path("clip"))
    data = Dataset.from_list(_rows(tmp_path))
    load = ImageFile.ImageFile.load

    def no_bomb_decoding(self):  # the other images are decoded (truncated files are found: test_named_errors.py)
        if self.size[0] * self.size[1] > Image.MAX_IMAGE_PIXELS:
            raise AssertionError("validate_dataset decoded an image over the pixel limit")
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_bomb_decoding)
    report = validate_dataset(data, model)
    assert not report.ok and report.rows == 20 and report.bad_rows == [5, 11, 13]
    assert [(b.row, b.column) for b in report.bad] == [(5, "positive"), (11, "query"), (13, "positive")]
    assert "3 of 20 rows are unreadable" in str(report) and "over the limit" in str(report)
    with pytest.raises(InputError, match="3 of 20 rows"):
        report.raise_if_bad()
    assert validate_dataset(data.select([0, 1, 2, 3]), model).ok


def test_recipe_validate_data_flag(tiny_path, tmp_path, small_pixel_limit, capsys):
    import json

    from test_recipes import CONFIGS, _recipe

    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in _rows(tmp_path)))
    argv = ["--config", str(CONFIGS / "demo.yaml"), "--model_name_or_path", tiny_path("clip"),
            "--dataset_name", "json", "--data_files", str(data), "--output_dir", str(tmp_path / "out"),
            "--max_steps", "2", "--per_device_train_batch_size", "4", "--dataloader_num_workers", "0",
            "--eval_fraction", "0", "--validate_data", "true"]
    with pytest.raises(InputError, match="3 of 20 rows are unreadable"):
        _recipe("train_bi_encoder").main(argv)
    _recipe("train_bi_encoder").main([*argv, "--bad_rows", "skip", "--output_dir", str(tmp_path / "skip")])
    assert "data check: dropping 3 of 20 rows before training (--bad_rows skip)" in capsys.readouterr().out
    card = (tmp_path / "skip" / "README.md").read_text()
    assert "| training rows | 17 |" in card and "| rows dropped by the data check (--validate_data) | 3 |" in card


def test_skipped_rows_are_counted_on_after_a_resume(tiny_path, tmp_path):
    """The rows skipped before a checkpoint stay counted after resuming from it (the card's line and the skip limit):
    row 5 is read in step 2, before checkpoint-2, and not again in steps 3-4."""
    rows = _rows(tmp_path, bad={5: BAD[5]})

    def trainer(max_steps):
        model = BiEncoder.from_pretrained(tiny_path("clip"))
        settings = args(tmp_path, per_device_train_batch_size=4, max_steps=max_steps, save_strategy="steps",
                        save_steps=2, train_sampling_strategy="sequential")
        return BiEncoderTrainer(model=model, args=settings, train_dataset=Dataset.from_list(rows), bad_rows="skip",
                                max_skipped_fraction=0.2)

    first = trainer(2)
    first.train()
    assert [row for row, _ in first.skipped_rows.rows] == [5]
    resumed = trainer(4)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 4 and resumed.rows_read == 16
    assert [row for row, _ in resumed.skipped_rows.rows] == [5], resumed.skipped_rows.rows
