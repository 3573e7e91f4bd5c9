"""Input-pipeline helpers that work on a whole ``datasets.Dataset`` before training.

- :func:`cache_images`: decode every image once and keep the size its processor resizes it to, as a
  lossless PNG column: later epochs, workers and runs (``datasets`` caches by fingerprint) skip full-size
  JPEG decoding, and the pixels the model sees are unchanged.
- :func:`add_lengths`: a ``length`` column (text tokens + visual tokens per row) so that
  ``TrainingArguments(train_sampling_strategy="group_by_length")`` batches VLM sequences of similar length
  together (the trainers add it themselves when that strategy is chosen).
"""

from __future__ import annotations

import io
import math
from typing import Any

from PIL import Image

from .featurizers import featurizer_of
from .inputs import looks_like_image_path

IMAGE_COLUMNS_HINT = ("query", "positive", "document", "negative")


def _image_columns(dataset: Any, columns: list[str] | None) -> list[str]:
    from datasets import Image as ImageFeature

    if columns is not None:
        return columns
    return [name for name, feature in dataset.features.items()
            if isinstance(feature, ImageFeature) or name.startswith(IMAGE_COLUMNS_HINT) and _has_images(dataset, name)]


def _has_images(dataset: Any, column: str) -> bool:
    sample = dataset[0][column] if len(dataset) else None
    return isinstance(sample, Image.Image) or isinstance(sample, str) and looks_like_image_path(sample)


def undecoded_images(dataset: Any) -> Any:
    """``dataset`` with its ``datasets.Image`` columns cast to ``decode=False``: ``datasets`` would decode every
    JPEG at full size on access, while the collator decodes it at reduced scale (PIL draft) when the model
    needs far fewer pixels, and :func:`add_lengths` reads only the headers."""
    from datasets import Image as ImageFeature

    for name, feature in (getattr(dataset, "features", None) or {}).items():
        if isinstance(feature, ImageFeature) and feature.decode:
            dataset = dataset.cast_column(name, ImageFeature(decode=False))
    return dataset


def cache_images(dataset: Any, model: Any, columns: list[str] | None = None, num_proc: int | None = None) -> Any:
    """Return ``dataset`` with every image cell replaced by the image the model's processor resizes it to, stored
    as a lossless PNG, when that smaller image gives exactly the same pixels (checked per image; otherwise the cell
    is kept). With ``fast_decode`` models: the image shrunk to the pixel budget, as the collator would.

    Args:
        dataset: a ``datasets.Dataset``; image columns are found from the features (``datasets.Image``).
        model: a :class:`BiEncoder` / :class:`CrossEncoder` (or its featurizer): gives the pixel budget.
        columns: the image columns (default: ``datasets.Image`` columns, and query/positive/document/negative*
            columns holding PIL images or image file paths).
        num_proc: processes for ``dataset.map``.

    Example:
        >>> train = cache_images(train, model, num_proc=8)   # once; reused by every epoch and later runs
    """
    from datasets import Image as ImageFeature

    featurizer = featurizer_of(model)
    names = _image_columns(dataset, columns)
    dataset = undecoded_images(dataset)  # decoded by hf_mm_rerank's own decoder, exactly as in training

    def shrink(row: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for name in names:
            item = featurizer.read(row[name], column=name)
            small = featurizer.cache_form(item) if item.image is not None else None
            if small is None:  # text, or no smaller image gives the same pixels: the cell stays as it is
                out[name] = _as_image_cell(row[name])
                continue
            buffer = io.BytesIO()
            small.save(buffer, "PNG")
            out[name] = {"bytes": buffer.getvalue(), "path": None}
        return out

    features = dataset.features.copy()
    for name in names:
        features[name] = ImageFeature()
    return dataset.map(shrink, features=features, num_proc=num_proc, desc="hf_mm_rerank: caching shrunk images")


def _as_image_cell(cell: Any) -> Any:
    """A cell kept as it is, in the form a ``datasets.Image`` column stores (text stays text)."""
    if isinstance(cell, Image.Image):
        buffer = io.BytesIO()
        cell.save(buffer, "PNG")
        return {"bytes": buffer.getvalue(), "path": None}
    if isinstance(cell, (bytes, bytearray)):
        return {"bytes": bytes(cell), "path": None}
    if isinstance(cell, str) and looks_like_image_path(cell):
        return {"bytes": None, "path": cell}
    return cell


def add_lengths(dataset: Any, model: Any, column: str = "length", num_proc: int | None = None) -> Any:
    """Add ``column``: the estimated tokens of each row (text tokens + visual tokens after the pixel budget),
    read from image headers only (no pixel decoding)."""

    featurizer = featurizer_of(model)
    tokenizer = featurizer.tokenizer
    processor = getattr(featurizer.processor, "image_processor", None)
    patch = (getattr(processor, "patch_size", None) or 0) * (getattr(processor, "merge_size", 1) or 1)
    raw = undecoded_images(dataset)
    inputs = [n for n in raw.column_names if n.startswith(IMAGE_COLUMNS_HINT)]

    def measure(row: dict[str, Any]) -> dict[str, int]:
        total = 0
        for name in inputs:
            cells = row[name] if isinstance(row[name], list) else [row[name]]
            total += sum(_cell_tokens(cell, tokenizer, featurizer.max_pixels, patch) for cell in cells)
        return {column: total}

    lengths = raw.map(measure, remove_columns=raw.column_names, num_proc=num_proc, desc="hf_mm_rerank: lengths")
    return dataset.add_column(column, lengths[column])


def _cell_tokens(cell: Any, tokenizer: Any, max_pixels: int | None, patch: int) -> int:
    if cell is None:
        return 0
    if isinstance(cell, str) and not looks_like_image_path(cell):
        return len(tokenizer(cell, add_special_tokens=False)["input_ids"])
    if isinstance(cell, dict) and "text" in cell:
        return _cell_tokens(cell.get("text"), tokenizer, max_pixels, patch) + _cell_tokens(
            cell.get("image"), tokenizer, max_pixels, patch)
    if not patch:
        return 0  # dual encoders: images are resized to one fixed size
    width, height = _image_size(cell)
    if max_pixels and width * height > max_pixels:
        scale = math.sqrt(max_pixels / (width * height))
        width, height = width * scale, height * scale
    return max(1, round(width * height / patch**2))


def _image_size(cell: Any) -> tuple[int, int]:
    if isinstance(cell, Image.Image):
        return cell.size
    if isinstance(cell, dict):  # datasets.Image(decode=False): {"bytes", "path"}
        source = io.BytesIO(cell["bytes"]) if cell.get("bytes") else cell["path"]
    elif isinstance(cell, (bytes, bytearray)):
        source = io.BytesIO(cell)
    else:
        source = cell
    with Image.open(source) as image:  # reads the header only
        return image.size

