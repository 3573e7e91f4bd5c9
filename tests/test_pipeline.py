"""Dataset-level pipeline helpers: image caching (same pixels, smaller files) and length-grouped batching."""

import torch
from datasets import Dataset
from datasets import Image as ImageFeature
from helpers import args
from test_throughput import _jpeg

from hf_mm_rerank import BiEncoder, BiEncoderCollator, BiEncoderTrainer
from hf_mm_rerank.pipeline import add_lengths, cache_images


def _jpeg_rows(colors=("red", "blue", "green", "yellow"), size=(640, 480)):
    data = Dataset.from_dict({"query": [f"a {c} picture" for c in colors],
                              "positive": [{"bytes": _jpeg(c, size), "path": None} for c in colors]})
    return data.cast_column("positive", ImageFeature())


def test_cached_images_give_the_same_pixels_from_small_files(tiny_path):
    for family in ("clip", "qwen2_vl"):
        model = BiEncoder.from_pretrained(tiny_path(family))
        data = _jpeg_rows()
        cached = cache_images(data, model)
        budget = model.featurizer.max_pixels
        assert all(w * h <= budget for w, h in (img.size for img in cached["positive"]))
        raw = cached.cast_column("positive", ImageFeature(decode=False))
        assert sum(len(c["bytes"]) for c in raw["positive"]) < sum(
            len(c["bytes"]) for c in data.cast_column("positive", ImageFeature(decode=False))["positive"])
        collator = BiEncoderCollator(model)
        before, after = collator(list(data)), collator(list(cached))
        torch.testing.assert_close(model(after["positive"]), model(before["positive"]), atol=0, rtol=0)


def test_lengths_count_text_and_visual_tokens_without_decoding(tiny_path, tmp_path):
    model = BiEncoder.from_pretrained(tiny_path("qwen2_vl"), max_pixels=28 * 28 * 16)
    data = Dataset.from_dict({"query": ["ab", "abcdef"], "positive": [
        {"bytes": _jpeg("red", (56, 56)), "path": None}, {"bytes": _jpeg("red", (640, 480)), "path": None}]})
    data = data.cast_column("positive", ImageFeature())
    lengths = add_lengths(data, model)["length"]
    # 56x56 px = 4 merged 28x28 patches (+2 text tokens); 640x480 shrinks to the 16-patch budget (+6 text tokens)
    assert lengths == [2 + 4, 6 + 16]
    trainer = BiEncoderTrainer(model=model, args=args(tmp_path, max_steps=2, per_device_train_batch_size=2,
                                                      train_sampling_strategy="group_by_length"),
                               train_dataset=data)
    assert "length" in trainer.train_dataset.column_names
    trainer.train()
    assert trainer.state.global_step == 2


def test_image_paths_are_cached_too(tiny_path, tmp_path):
    from images import solid

    for color in ("red", "blue"):
        solid(color, (300, 200)).save(tmp_path / f"{color}.png")
    data = Dataset.from_dict({"query": ["a red one", "a blue one"],
                              "positive": [str(tmp_path / "red.png"), str(tmp_path / "blue.png")]})
    model = BiEncoder.from_pretrained(tiny_path("clip"))
    cached = cache_images(data, model)
    assert isinstance(cached.features["positive"], ImageFeature) and cached["query"] == data["query"]
    assert all(w * h <= model.featurizer.max_pixels for w, h in (img.size for img in cached["positive"]))
