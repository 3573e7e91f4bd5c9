"""Every claim shown: bad input gets an error that names the dataset row and column (or a counted skip), never a crash
deep in torch or a library: plain-list rows skipped by their index, a merged export whose base is gone, truncated
images in ``validate_dataset``, image special tokens in text cells, and the recipes' ``--mini_batch_tokens``."""

from __future__ import annotations

import logging
import re

import pytest
from helpers import args
from images import COLORS, solid

from hf_mm_rerank import BiEncoder, BiEncoderTrainer, InputError

BAD_AT_ONE = (1, 5, 9, 13)  # with 4 rows a batch, read in order: the second row of each of four batches


def _list_rows(tmp_path):
    """20 (query, image path) rows as a plain list; the rows in BAD_AT_ONE name an image file that does not exist."""
    paths = {}
    for color in COLORS:
        paths[color] = str(tmp_path / f"{color}.png")
        solid(color).save(paths[color])
    rows = [{"query": f"a {c} square", "positive": paths[c]} for c in (list(COLORS) * 3)[:20]]
    for i in BAD_AT_ONE:
        rows[i]["positive"] = str(tmp_path / f"missing_{i}.png")
    return rows


def _list_trainer(tiny_path, tmp_path, rows, **kwargs):
    model = BiEncoder.from_pretrained(tiny_path("clip"))
    return BiEncoderTrainer(model=model, args=args(tmp_path, per_device_train_batch_size=4, max_steps=5,
                                                   train_sampling_strategy="sequential"),
                            train_dataset=rows, **kwargs)


def test_plain_list_rows_are_skipped_by_their_dataset_index_and_each_counted(tiny_path, tmp_path, caplog):
    rows = _list_rows(tmp_path)
    trainer = _list_trainer(tiny_path, tmp_path, rows, bad_rows="skip", max_skipped_fraction=0.25)
    with caplog.at_level(logging.WARNING, logger="hf_mm_rerank.data.validation"):
        trainer.train()
    assert sorted(row for row, _ in trainer.skipped_rows.rows) == list(BAD_AT_ONE)  # before: ["1 of the batch"]
    for i in BAD_AT_ONE:
        assert f"skipping row {i} (bad_rows='skip'): row {i}, column 'positive'" in caplog.text
        assert f"missing_{i}.png" in caplog.text
    assert "of the batch" not in caplog.text
    assert all("_row" not in row for row in rows)  # the caller's rows are left as they were
    # 4 of 20 rows bad: over a 10% limit, which a count of 1 never reached
    trainer = _list_trainer(tiny_path, tmp_path, rows, bad_rows="skip", max_skipped_fraction=0.1)
    with pytest.raises(InputError, match=r"3 rows skipped on this process, more than max_skipped_fraction=0.1 of its "
                                         r"share of the 20 training rows"):
        trainer.train()


def test_merged_export_of_a_full_fine_tune_whose_base_is_gone_names_it(tiny_path, tmp_path):
    import shutil

    from hf_mm_rerank.publishing.export import export
    from hf_mm_rerank.publishing.export_check import ExportError

    base = tmp_path / "base"
    shutil.copytree(tiny_path("qwen2_vl"), base)
    BiEncoder.from_pretrained(str(base)).save_pretrained(str(tmp_path / "trained"))  # a full fine-tune's layout
    moved = tmp_path / "moved"
    base.rename(moved)  # the base checkpoint is gone from where training recorded it
    with pytest.raises(ExportError, match=rf"back inside Qwen2VLForConditionalGeneration, whose LM head .* looked for "
                                          rf"in the folder {base}, which does not exist .* Fix: pass the base "
                                          r"checkpoint's folder or Hub id: export\(folder, \.\.\., base_model="):
        export(str(tmp_path / "trained"), str(tmp_path / "merged"), "merged", verify=False)
    assert not (tmp_path / "merged").exists()
    report = export(str(tmp_path / "trained"), str(tmp_path / "merged"), "merged", base_model=str(moved))
    assert report.difference <= 1e-5


def test_validate_dataset_refuses_truncated_jpeg_and_png_files_that_the_collator_would_fail_on(tiny_path, tmp_path):
    import io

    from datasets import Dataset
    from PIL import Image

    from hf_mm_rerank import BiEncoderCollator, validate_dataset

    photo = Image.effect_mandelbrot((160, 120), (-2, -1.5, 1, 1.5), 100).convert("RGB")
    for fmt in ("JPEG", "PNG"):
        whole = io.BytesIO()
        photo.save(whole, fmt)
        data = whole.getvalue()
        (tmp_path / f"whole.{fmt}").write_bytes(data)
        (tmp_path / f"cut.{fmt}").write_bytes(data[: len(data) * 2 // 3])  # a download that stopped early
    rows = [{"query": f"q{i}", "positive": str(tmp_path / "whole.JPEG"), "negative": str(tmp_path / "whole.PNG")}
            for i in range(6)]
    rows[2]["positive"] = str(tmp_path / "cut.JPEG")
    rows[4]["negative"] = str(tmp_path / "cut.PNG")
    model = BiEncoder.from_pretrained(tiny_path("clip"))
    report = validate_dataset(Dataset.from_list(rows), model)
    assert report.bad_rows == [2, 4]  # before: every row passed (headers only)
    assert [(b.row, b.column) for b in report.bad] == [(2, "positive"), (4, "negative")]
    assert "row 2, column 'positive': the JPEG file's header reads as 160x120 pixels, but its data could not be " \
           "decoded (image file is truncated" in report.bad[0].reason
    assert "row 4, column 'negative': the PNG file's" in report.bad[1].reason
    assert "Fix: download or re-encode the file again" in report.bad[0].reason
    assert validate_dataset(Dataset.from_list(rows), model, decode_images=False).ok  # the header-only scan
    for i in (2, 4):  # what the check saves: the collator fails on these rows mid-run
        with pytest.raises(InputError, match=rf"row {i}, column '(positive|negative)'"):
            BiEncoderCollator(model)([{"_row": i, **rows[i]}])


@pytest.mark.parametrize("token", ["<|image_pad|>", "<|vision_start|>", "<|video_pad|>"])
def test_an_image_special_token_in_a_text_cell_is_named_and_skippable(tiny_path, token):
    from hf_mm_rerank import BiEncoderCollator

    model = BiEncoder.from_pretrained(tiny_path("qwen2_vl"))
    rows = [{"_row": 0, "query": "a red square", "positive": solid("red")},
            {"_row": 1, "query": "a blue square", "positive": f"see the picture {token} below"},
            {"_row": 2, "query": {"text": f"{token}green", "image": solid("green")}, "positive": solid("green")}]
    with pytest.raises(InputError, match=rf"row 1, column 'positive': the text holds '{re.escape(token)}' \(at character 16"
                                         r".*image/vision special tokens .*Fix: remove it from the text"):
        BiEncoderCollator(model)(rows)  # before: the processor's "Found 1 <|image_pad|> tokens ..." (no row named)
    batch = BiEncoderCollator(model, bad_rows="skip")(rows)
    assert [row for row, _ in batch["skipped_rows"]] == [1, 2]
    assert "row 2, column 'query'" in batch["skipped_rows"][1][1]
    assert batch["query"][0]["input_ids"].shape[0] == 1  # the good row is kept


def test_the_reranker_recipe_refuses_mini_batches_with_loss_auto_at_parsing(tmp_path):
    from test_recipes import _json_data, _recipe

    argv = ["--model_name_or_path", "/nonexistent-model", "--data_files", _json_data(tmp_path / "data"),
            "--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--use_cpu", "true", "--eval_fraction", "0"]
    recipe = _recipe("train_cross_encoder")
    for flag in ("--mini_batch_tokens", "--mini_batch_size"):  # before: refused only once the model had loaded
        with pytest.raises(ValueError, match=rf"^{flag} needs an explicit --loss: --loss auto picks its loss from "
                                             r"the rows .* Fix: add --loss listwise"):
            recipe.main([*argv, flag, "512"])
    with pytest.raises(ValueError, match=r"^--mini_batch_tokens -1: give a positive number"):
        recipe.main([*argv, "--mini_batch_tokens", "-1", "--loss", "listwise"])
    with pytest.raises(ValueError, match=r"^--loss softmax: choose auto or one of"):
        recipe.main([*argv, "--loss", "softmax"])
    with pytest.raises(Exception, match="nonexistent-model") as error:  # with a loss, parsing lets it through
        recipe.main([*argv, "--mini_batch_tokens", "512", "--loss", "listwise"])
    assert "needs an explicit --loss" not in str(error.value)


def test_the_distillation_recipe_passes_mini_batch_tokens_to_its_cached_loss(tiny_path, tmp_path, monkeypatch):
    import json

    from test_cross_encoder import _bert_classifier
    from test_recipes import _recipe

    from hf_mm_rerank import Tokens

    names = list(COLORS)
    data = tmp_path / "pairs.json"
    data.write_text("\n".join(json.dumps({"query": f"which square is {c}", "positive": f"the square is {c}"})
                              for c in names * 2))
    recipe = _recipe("distill_reranker_to_bi_encoder")
    seen = []

    class Spy(recipe.LOSSES["margin_mse"]):
        def forward(self, model, inputs):
            seen.append((self.mini_batch_size, len(inputs["positive"])))
            return super().forward(model, inputs)

    monkeypatch.setitem(recipe.LOSSES, "margin_mse", Spy)
    recipe.main(["--model_name_or_path", tiny_path("clip"), "--teacher", _bert_classifier(tmp_path),
                 "--data_files", str(data), "--output_dir", str(tmp_path / "out"), "--max_steps", "1",
                 "--per_device_train_batch_size", "4", "--num_negatives", "2", "--use_cpu", "true", "--lora_r", "4",
                 "--dataloader_num_workers", "0", "--eval_fraction", "0", "--dtype", "float32", "--bf16", "false",
                 "--mini_batch_tokens", "40"])
    assert seen and all(isinstance(size, Tokens) and size == 40 for size, _ in seen)  # before: no such flag
    assert all(chunks > 1 for _, chunks in seen)  # 4 positives did not fit in one 40-token mini-batch
