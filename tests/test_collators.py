import pickle
import re

import pytest
import torch
from datasets import Dataset
from images import COLORS, color_rows, solid
from torch.utils.data import DataLoader

from hf_mm_rerank import BiEncoder, BiEncoderCollator
from hf_mm_rerank.data.minibatch import Tokens
from hf_mm_rerank.data.schema import negative_columns


@pytest.fixture(scope="module")
def clip(tiny_path):
    return BiEncoder.from_pretrained(tiny_path("clip"))


def test_batch_layout_and_negative_order(clip):
    rows = color_rows(negatives=2)[:3]
    batch = BiEncoderCollator(clip)(rows)
    assert set(batch) == {"query", "positive", "negative", "content_ids"}
    assert batch["query"][0]["text"]["input_ids"].shape[0] == 3
    # Content ids in the embeddings' order: row 0's negative_1 is row 1's positive (green), so their ids are equal.
    ids = batch["content_ids"]
    assert ids["query"].shape == ids["positive"].shape == (3,) and ids["negative"].shape == (6,)
    assert ids["negative"][0] == ids["positive"][1] and ids["negative"][2] == ids["positive"][2]
    assert len(set(ids["positive"].tolist())) == 3 and len(set(ids["query"].tolist())) == 3
    negatives = batch["negative"][0]
    assert negatives["image"]["pixel_values"].shape[0] == 6  # 3 rows x 2 negatives, row-major
    # Row 0's negatives come first: negative_1 of row 0 is row 1's colour (green).
    direct = clip.featurizer.processor.image_processor(images=[solid("green")], return_tensors="pt")
    pixels = negatives["image"]["pixel_values"]
    assert pixels.dtype == torch.uint8  # 8-bit from the workers, normalised on the model's device
    assert torch.equal(clip.featurizer.normalize_pixels(pixels, torch.float32)[0], direct["pixel_values"][0])


@pytest.mark.parametrize("family", ["clip", "qwen2_vl", "qwen3_vl", "siglip"])
def test_compact_pixels_normalise_exactly_as_the_image_processor(tiny_path, family):
    """8-bit pixels cross from the workers (a quarter of float32) and become, on the device, bit for bit what the
    image processor itself makes."""
    from PIL import Image

    model = BiEncoder.from_pretrained(tiny_path(family))
    featurizer = model.featurizer
    images = [Image.effect_noise((90, 70), 60).convert("RGB"), solid("red", (300, 200))]
    reference = featurizer.processor.image_processor(images=images, return_tensors="pt", **featurizer.image_kwargs())
    compact = featurizer.processor.image_processor(images=images, return_tensors="pt",
                                                   **featurizer.processor_image_kwargs())
    assert featurizer.compact_pixels and compact["pixel_values"].dtype == torch.uint8
    assert compact["pixel_values"].element_size() * 4 == reference["pixel_values"].element_size()
    assert torch.equal(featurizer.normalize_pixels(compact["pixel_values"], torch.float32), reference["pixel_values"])


def test_mini_batches_split_every_column(clip):
    batch = BiEncoderCollator(clip, mini_batch_size=3)(color_rows()[:8])
    assert [c["size"].item() for c in batch["query"]] == [3, 3, 2]
    assert len(batch["negative"]) == 3


def test_list_of_negatives_in_one_column(clip):
    rows = [{"query": "q", "positive": solid("red"), "negative": [solid("blue"), solid("green")]}] * 2
    assert BiEncoderCollator(clip)(rows)["negative"][0]["size"].item() == 4


def test_collator_is_picklable_and_runs_in_two_workers(clip):
    collator = pickle.loads(pickle.dumps(BiEncoderCollator(clip)))
    # spawn: workers get the collator by pickling, as on macOS/Windows (and no fork-after-threads deadlock)
    loader = DataLoader(Dataset.from_list(color_rows(repeat=2)), batch_size=4, num_workers=2, collate_fn=collator,
                        multiprocessing_context="spawn")
    batches = list(loader)
    assert len(batches) == 4
    assert all(b["positive"][0]["image"]["pixel_values"].shape == (4, 3, 32, 32) for b in batches)


@pytest.mark.parametrize("rows, message", [
    ([{"query": "q", "document": "d"}], r"missing column\(s\) \['positive'\]"),
    ([{"query": "q", "positive": "p", "negative": ["a"]}, {"query": "q", "positive": "p", "negative": ["a", "b"]}],
     "different numbers of negatives"),
    ([{"query": "q", "positive": None}], "row 0 of the batch, column 'positive': received None"),
    ([{"query": "q", "positive": 3.5, "_row": 17}], "row 17, column 'positive': received float"),
    ([{"query": "q", "positive": "p", "negative": "n"}, {"query": "q", "positive": "p"}],
     r"row 1 of the batch: missing column\(s\) \['negative'\] that other rows of the batch have"),
    ([{"query": "q", "positive": "p"}, {"query": "q", "positive": "p", "negative_1": "n"}],  # not dropped unseen
     r"row 0 of the batch: missing column\(s\) \['negative_1'\]"),
])
def test_bad_rows_get_clear_errors(clip, rows, message):
    with pytest.raises(ValueError, match=message):
        BiEncoderCollator(clip)(rows)


def test_a_row_missing_a_column_is_skipped_by_name(clip, tiny_path):
    """Rows as plain dicts may differ in their keys: with bad_rows='skip' such a row is counted, not a KeyError."""
    from hf_mm_rerank import CrossEncoder, CrossEncoderCollator

    rows = [{"query": "q", "positive": "p", "negative": "n"}, {"query": "q", "positive": "p"},
            {"query": "r", "positive": "s", "negative": "t"}]
    batch = BiEncoderCollator(clip, bad_rows="skip")(rows)
    assert [row for row, _ in batch["skipped_rows"]] == ["1 of the batch"]
    assert batch["query"][0]["text"]["input_ids"].shape[0] == 2
    reranker = CrossEncoder.from_pretrained(tiny_path("qwen2_vl"), head="yes_no")
    with pytest.raises(ValueError, match=r"row 1 of the batch: missing column\(s\) \['negative'\]"):
        CrossEncoderCollator(reranker)(rows)


def test_negative_column_forms():
    assert negative_columns(["query", "positive", "negative_2", "negative_1"]) == ["negative_1", "negative_2"]
    with pytest.raises(ValueError, match="both 'negative' and"):
        negative_columns(["negative", "negative_1"])
    with pytest.raises(ValueError, match="without gaps"):
        negative_columns(["negative_1", "negative_3"])


def test_rejects_non_model():
    with pytest.raises(TypeError, match="expected a BiEncoder"):
        BiEncoderCollator(object())


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
@pytest.mark.parametrize("cap", [None, "below_budget"])
@pytest.mark.parametrize("fast_decode", [False, True])
def test_preshrinking_never_changes_the_patch_grid(tiny_path, family, cap, fast_decode):
    """Whatever the collator does first (with fast_decode: reduced-scale JPEG decoding, shrinking to the pixel
    budget), the image reaches the model on the patch grid the processor picks for the original image under the
    same cap."""
    import copy
    import io

    from PIL import Image

    from hf_mm_rerank import BiEncoder
    from hf_mm_rerank.data.featurizers import ChatFeaturizer

    model = BiEncoder.from_pretrained(tiny_path(family), max_pixels=None if cap else 28 * 28 * 12,
                                      fast_decode=fast_decode)
    if cap:  # the processor's own cap below the (default) visual-token budget
        processor = copy.deepcopy(model.processor)
        processor.image_processor.size["longest_edge"] = 32 * 32 * 10
        model.featurizer = ChatFeaturizer(processor, fast_decode=fast_decode)
    featurizer = model.featurizer
    assert featurizer.max_pixels == (32 * 32 * 10 if cap else 28 * 28 * 12)
    reference = copy.deepcopy(featurizer.processor.image_processor)
    reference.size["longest_edge"] = min(reference.size["longest_edge"], featurizer.max_pixels)
    for width, height in [(640, 480), (300, 300), (1000, 200), (37, 500), (2000, 1500), (56, 56), (120, 3000),
                          (199, 1), (64, 900)]:
        original = Image.effect_noise((width, height), 40).convert("RGB")
        buffer = io.BytesIO()
        original.save(buffer, "JPEG", quality=90)
        expected = reference(images=[original], return_tensors="pt")["image_grid_thw"]
        for cell in (original, buffer.getvalue()):  # a decoded image, and JPEG bytes (reduced-scale decoding)
            batch = BiEncoderCollator(model)([{"query": "q", "positive": cell}])
            assert torch.equal(batch["positive"][0]["image_grid_thw"], expected), (width, height, type(cell))


def _jpeg(color: str) -> bytes:
    import io

    buffer = io.BytesIO()
    solid(color, (64, 48)).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize("size", [3, Tokens(40)], ids=["rows", "tokens"])
def test_mini_batches_are_featurized_as_the_rows_are_read(clip, monkeypatch, size):
    """A collator holds the decoded images of about one mini-batch per column, not the whole batch's (1,024 photos
    are 0.9 GB decoded), and makes the very mini-batches that featurizing each whole column at once makes, with a
    skipped row in the middle."""
    import weakref

    names = list(COLORS)
    rows = [{"query": f"a {c} square", "positive": _jpeg(c), "negative": _jpeg(names[(i + 1) % 8])}
            for i, c in enumerate(names)] * 2
    rows[4] = {**rows[4], "positive": b"not an image"}
    featurizer = clip.featurizer
    images, alive = [], []
    read, call = featurizer.read, type(featurizer).__call__

    def reading(*args, **kwargs):
        item = read(*args, **kwargs)
        if item.image is not None:
            images.append(weakref.ref(item.image))
        return item

    def featurizing(self, items, side="query"):
        alive.append(sum(ref() is not None for ref in images))
        return call(self, items, side)

    monkeypatch.setattr(featurizer, "read", reading)
    monkeypatch.setattr(type(featurizer), "__call__", featurizing)
    batch = BiEncoderCollator(clip, mini_batch_size=size, bad_rows="skip")(rows)
    monkeypatch.undo()
    assert [row for row, _ in batch["skipped_rows"]] == ["4 of the batch"]
    assert len(images) == 30 and max(alive) <= 8  # read all at once, all 30 would be alive at the first call
    kept = [row for i, row in enumerate(rows) if i != 4]
    for column, side in (("query", "query"), ("positive", "document"), ("negative", "document")):
        expected = featurizer.chunks([featurizer.read(row[column]) for row in kept], side, size)
        assert len(batch[column]) == len(expected) > 2
        for got, want in zip(batch[column], expected):
            part = "text" if column == "query" else "image"
            key = "input_ids" if column == "query" else "pixel_values"
            assert torch.equal(got[part][key], want[part][key])


@pytest.mark.parametrize("family", ["clip", "qwen2_vl", "siglip"])
def test_images_reach_the_processor_as_planar_tensors_with_the_same_pixels(tiny_path, family):
    """The featurizers hand torchvision-backend processors [3, H, W] uint8 tensors (cheaper than the processor's own
    conversion of a PIL image); the pixels are bit for bit those of the PIL image, images 3 pixels high or wide
    included."""
    from PIL import Image

    from hf_mm_rerank.data.inputs import MMInput

    featurizer = BiEncoder.from_pretrained(tiny_path(family)).featurizer
    images = [Image.effect_noise((90, 70), 60).convert("RGB"), Image.effect_noise((40, 3), 60).convert("RGB"),
              Image.effect_noise((3, 40), 60).convert("RGB")]
    converted, kwargs = featurizer.processor_images(images)
    assert all(isinstance(image, torch.Tensor) and image.shape[0] == 3 for image in converted)
    for image in images:  # one at a time: a Qwen-VL grid per image
        features = featurizer([MMInput(image=image)], "document")
        got = features["image"]["pixel_values"] if family != "qwen2_vl" else features["pixel_values"]
        want = featurizer.processor.image_processor(images=[image], return_tensors="pt",
                                                    **featurizer.processor_image_kwargs())["pixel_values"]
        assert torch.equal(got, want)


@pytest.mark.parametrize("value", [2.5, True, None, [3]])
def test_tokens_of_a_fraction_or_a_non_number_is_refused(value):
    with pytest.raises(ValueError, match=r"Tokens\(n\): n must be a whole number of tokens; received"):
        Tokens(value)
    assert Tokens(4096.0) == 4096 and repr(Tokens("12")) == "Tokens(12)"


@pytest.mark.parametrize("size", [0, -1, 2.5, "3", True, Tokens(0)])
def test_a_mini_batch_size_that_is_not_one_is_refused(clip, size):
    """Anything but a whole number of inputs >= 1, Tokens(n >= 1) or None is named, instead of silently making one
    chunk (GradCache would then save no memory)."""
    from hf_mm_rerank import CachedContrastiveLoss, CrossEncoderCollator

    for build in (lambda: BiEncoderCollator(clip, mini_batch_size=size),
                  lambda: CrossEncoderCollator(clip.featurizer, mini_batch_size=size),
                  lambda: CachedContrastiveLoss(mini_batch_size=size)):
        with pytest.raises(ValueError, match=rf"mini_batch_size must be >= 1: .* received {re.escape(repr(size))}"):
            build()
