"""Dataset-level pipeline helpers: image caching (same pixels, smaller files) and length-grouped batching."""

import torch
from datasets import Dataset
from datasets import Image as ImageFeature
from helpers import REL, args, assert_rel_close, rel_diff
from test_throughput import _jpeg

from hf_mm_rerank import BiEncoder, BiEncoderCollator, BiEncoderTrainer
from hf_mm_rerank.data.pipeline import add_lengths, cache_images


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
        training = data.cast_column("positive", ImageFeature(decode=False))  # what the trainers hand the collator
        before, after = collator(list(training)), collator(list(cached))
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


def _rotated_jpeg(path, size=(640, 480), orientation=6):
    """A camera-style JPEG: pixels stored sideways, EXIF orientation 6 (view rotated 90 degrees clockwise)."""
    from PIL import Image

    noise = Image.effect_noise(size, 60).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = orientation
    noise.save(path, "JPEG", quality=92, exif=exif)
    return str(path)


def test_every_path_sees_the_same_upright_pixels(tiny_path, tmp_path):
    """Training, the evaluators' from_dataset, mining, cache_images and encode() on paths decode one way:
    reduced-scale JPEG decoding and the EXIF orientation applied."""
    from hf_mm_rerank import RerankingEvaluator, RetrievalEvaluator, mine_hard_negatives
    from hf_mm_rerank.data.inputs import to_input

    model = BiEncoder.from_pretrained(tiny_path("clip"))
    paths = [_rotated_jpeg(tmp_path / f"{i}.jpg") for i in range(3)]
    assert to_input(paths[0]).image.size == (480, 640)  # upright
    data = Dataset.from_dict({"query": ["a", "b", "c"], "positive": paths}).cast_column("positive", ImageFeature())
    collator = BiEncoderCollator(model)
    training = collator(list(data.cast_column("positive", ImageFeature(decode=False))))
    reference = model(training["positive"])

    def pixels_of(cells):
        return model(collator([{"query": "q", "positive": cell} for cell in cells])["positive"])

    retrieval = RetrievalEvaluator.from_dataset(data)
    reranking = RerankingEvaluator.from_dataset(
        data.add_column("negative_1", paths[1:] + paths[:1]).cast_column("negative_1", ImageFeature()))
    mined = mine_hard_negatives(model, data, num_negatives=1, duplicate_threshold=None)
    mined_negatives = {row["query"]: row["negative_1"] for row in mined.cast_column("negative_1", ImageFeature(
        decode=False))}
    cached = cache_images(data, model)
    paths_of = {"a": 0, "b": 1, "c": 2}
    checked = []
    for name, embeddings in {
        "RetrievalEvaluator.from_dataset": pixels_of(list(retrieval.corpus)),
        "RerankingEvaluator.from_dataset": pixels_of([next(c for c in docs if _same_file(c, p))
                                                      for docs, p in zip(reranking.candidates, paths)]),
        "cache_images": pixels_of(list(cached.cast_column("positive", ImageFeature(decode=False))["positive"])),
        "encode(paths)": model.encode(paths, side="document"),
    }.items():
        assert_rel_close(embeddings, reference, msg=str(name))
        checked.append(name)
    assert len(checked) == 4
    # Mined negatives are other rows' positives, with the same pixels: each matches exactly one reference row (to
    # the scale of the embeddings), never its own query's.
    assert sorted(mined_negatives) == ["a", "b", "c"]
    for query, negative in mined_negatives.items():
        embedding = pixels_of([negative])[0]
        other = [i for i in range(3) if rel_diff(embedding, reference[i]) < REL]
        assert len(other) == 1 and other[0] != paths_of[query], (query, other)


def _same_file(cell, path):
    from hf_mm_rerank.data.inputs import to_input

    return to_input(cell).image.tobytes() == to_input(path).image.tobytes()
