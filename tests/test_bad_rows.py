"""Bad rows of scraped datasets get an error naming the row and column (or are refused before training), never a
crash deep in a tokenizer, processor or sampler."""

from __future__ import annotations

import io
import os

import pytest
from datasets import Dataset
from helpers import args
from images import color_rows, solid
from PIL import Image

from hf_mm_rerank import BiEncoder, BiEncoderCollator, BiEncoderTrainer, CrossEncoderTrainer, InputError
from hf_mm_rerank.data.featurizers import DEFAULT_TEXT_TOKENS
from hf_mm_rerank.data.schema import ROW_KEY as ROW


def _collate(model, **cells):
    return BiEncoderCollator(model)([{ROW: 41, "query": "q", "positive": solid("red"), **cells}])


def test_an_image_over_the_pixel_limit_is_named_before_decoding(tiny_path, monkeypatch):
    model = BiEncoder.from_pretrained(tiny_path("clip"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a 100x100 PNG is then like a 10000x10000 one
    buffer = io.BytesIO()
    solid("red", (100, 100)).save(buffer, "PNG")
    with pytest.raises(InputError, match=r"row 41, column 'positive': the image has 10,000 pixels, over the limit of "
                                         r"1,000 pixels \(refused from its header.*HF_MM_RERANK_MAX_IMAGE_PIXELS=<pixels>"
                                         ):  # PIL's own bomb check (at 2 x its limit), in the same words
        _collate(model, positive=buffer.getvalue())
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)  # over the limit but under twice it: PIL would decode it
    with pytest.raises(InputError, match=r"row 41, column 'positive': the image is 100x100 \(10,000 pixels\), over the "
                                         r"limit of 6,000 pixels .*HF_MM_RERANK_MAX_IMAGE_PIXELS=<pixels>"):
        _collate(model, positive=buffer.getvalue())
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # what importing with the variable set does
    monkeypatch.setenv("HF_MM_RERANK_MAX_IMAGE_PIXELS", "5000")  # the setting, in pixels
    with pytest.raises(InputError, match=r"100x100 \(10,000 pixels\), over the limit of 5,000 pixels"):
        _collate(model, positive=buffer.getvalue())
    monkeypatch.setenv("HF_MM_RERANK_MAX_IMAGE_PIXELS", "20000")
    assert _collate(model, positive=buffer.getvalue())["positive"][0]["image_index"].numel() == 1
    monkeypatch.setenv("HF_MM_RERANK_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ValueError, match="give a number of pixels"):
        _collate(model, positive=buffer.getvalue())


def test_the_pixel_limit_setting_replaces_pils_in_a_fresh_process(tmp_path):
    import subprocess
    import sys

    big = tmp_path / "big.png"
    Image.new("L", (1000, 1000)).save(big)  # 1 megapixel
    code = ("import PIL.Image as I; I.MAX_IMAGE_PIXELS = 100_000; import hf_mm_rerank.data.inputs as m; "
            f"print(m.to_input({str(big)!r}).image.size)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "HF_MM_RERANK_MAX_IMAGE_PIXELS": "2000000"})
    assert run.returncode == 0 and "(1000, 1000)" in run.stdout, run.stderr[-2000:]


def test_a_lone_surrogate_is_named(tiny_path):
    model = BiEncoder.from_pretrained(tiny_path("qwen2_vl"))
    with pytest.raises(InputError, match=r"row 41, column 'query': the text is not valid Unicode \(surrogates"):
        _collate(model, query="broken \udcff text")
    with pytest.raises(InputError, match="not valid Unicode"):
        model.encode([{"text": "also \ud800 here", "image": solid("red")}])


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_aspect_ratio_beyond_the_processor_limit_is_named_and_199_to_1_passes(tiny_path, family):
    model = BiEncoder.from_pretrained(tiny_path(family))
    batch = _collate(model, positive=Image.new("RGB", (398, 2), (200, 10, 10)))  # 199:1 is accepted, as is
    assert batch["positive"][0]["image_grid_thw"].shape[0] == 1
    with pytest.raises(InputError, match=r"row 41, column 'positive': the image is 402x2 pixels, an aspect ratio over "
                                         r"200:1"):
        _collate(model, positive=Image.new("RGB", (402, 2)))
    with pytest.raises(InputError, match=r"row 0, column 'query'.*aspect ratio"):
        model.encode([Image.new("RGB", (2, 500))])


@pytest.mark.parametrize("fast_decode", [False, True])
def test_a_199_to_1_strip_with_a_real_pixel_budget_trains(tiny_path, fast_decode):
    """19950x100 (ratio 199.5) at 768 visual tokens: the processor sizes it to 28 x 10948 (ratio 391). Resizing it
    once, from the original (or not again, with fast_decode), keeps Qwen-VL's 200:1 check from refusing it."""
    model = BiEncoder.from_pretrained(tiny_path("qwen2_vl"), max_pixels=768 * 28 * 28, fast_decode=fast_decode)
    batch = _collate(model, positive=Image.new("RGB", (19950, 100), (200, 10, 10)))
    assert batch["positive"][0]["image_grid_thw"].tolist() == [[1, 2, 782]]
    assert model(batch["positive"]).shape == (1, 64)


def test_chat_vlm_text_is_bounded_by_default(tiny_path):
    model = BiEncoder.from_pretrained(tiny_path("qwen2_vl"))
    batch = _collate(model, query="word " * 20_000)  # 100,000 characters
    assert DEFAULT_TEXT_TOKENS < batch["query"][0]["input_ids"].shape[1] < DEFAULT_TEXT_TOKENS + 64


def test_empty_and_contrast_free_datasets_are_refused_before_training(tiny_path, tmp_path):
    model = BiEncoder.from_pretrained(tiny_path("clip"))
    empty = Dataset.from_dict({"query": [], "positive": []})
    with pytest.raises(ValueError, match=r"train_dataset has no rows \(columns \['query', 'positive'\]\)"):
        BiEncoderTrainer(model=model, args=args(tmp_path), train_dataset=empty)
    one = Dataset.from_list([{"query": "a red square", "positive": solid("red")}])
    with pytest.raises(ValueError, match="loss is 0 and nothing trains"):
        BiEncoderTrainer(model=model, args=args(tmp_path), train_dataset=one)
    with pytest.raises(ValueError, match="loss is 0 and nothing trains"):
        BiEncoderTrainer(model=model, args=args(tmp_path, per_device_train_batch_size=1),
                         train_dataset=Dataset.from_list(color_rows()).remove_columns("negative"))
    with pytest.raises(ValueError, match="eval_dataset has no rows"):
        CrossEncoderTrainer(model=_reranker(tiny_path), args=args(tmp_path), eval_dataset=Dataset.from_dict(
            {"query": [], "document": [], "label": []}), train_dataset=Dataset.from_list(
            [{"query": "q", "document": "d", "label": 1.0}]))


def _reranker(tiny_path):
    from test_cross_encoder import PLAIN_PROMPT

    from hf_mm_rerank import CrossEncoder

    return CrossEncoder.from_pretrained(tiny_path("qwen2_vl"), head="yes_no", **PLAIN_PROMPT)


def test_mixed_negative_counts_name_the_rows_before_training(tiny_path, tmp_path):
    model = BiEncoder.from_pretrained(tiny_path("clip"))
    rows = [{"query": f"q{i}", "positive": f"p{i}", "negative": ["n1", "n2"] if i not in (3, 7) else ["n1"]}
            for i in range(10)]
    with pytest.raises(InputError, match=r"1 in rows \[3, 7\]; 2 in rows \[0, 1, 2, 4, 5\] \.\.\."):
        BiEncoderTrainer(model=model, args=args(tmp_path), train_dataset=Dataset.from_list(rows))
    # Numbered negative columns with an empty cell reach the collator: it names the rows too.
    with pytest.raises(InputError, match=r"row 41, column 'negative_1': received None"):
        _collate(model, negative_1=None)


def test_a_bad_row_met_in_a_dataloader_worker_reaches_the_user_as_that_one_error(tiny_path, tmp_path):
    model = BiEncoder.from_pretrained(tiny_path("clip"))
    paths = []
    for i in range(8):
        paths.append(str(tmp_path / f"{i}.png"))
        solid("red").save(paths[-1])
    paths[5] = str(tmp_path / "gone.png")  # a missing file in row 5
    rows = Dataset.from_dict({"query": [f"query {i}" for i in range(8)], "positive": paths})
    trainer = BiEncoderTrainer(model=model, args=args(tmp_path, max_steps=1, dataloader_num_workers=1),
                               train_dataset=rows)
    with pytest.raises(InputError) as info:
        trainer.train()
    message = str(info.value)
    assert message.startswith("row 5, column 'positive': received the image path") and "gone.png" in message
    assert "DataLoader worker" not in message and "Traceback" not in message  # not the worker's wrapped traceback
