"""Content ids: equal content, equal id, so that a copy of a row's positive is never taken for its negative.

A cell's id is a 63-bit hash of what it holds: a text's UTF-8 bytes; an image's encoded bytes (a ``datasets.Image``
cell's ``bytes``, a file's bytes are not read: its path is hashed instead), or a PIL image's pixels, size and mode.
The collators put each batch's ids under ``batch["content_ids"]`` (the losses mask the duplicates), and
:func:`with_content_ids` stores every row's ids in the dataset once (cached by ``datasets``) for the batch samplers
that keep duplicates out of a batch (:mod:`hf_mm_rerank.data.sampling`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any

from .schema import negative_cells, negative_columns

IDS_COLUMN = "_content_ids"  # [query id, positive id, negative ids ...] of each row, written by with_content_ids


def content_id(cell: Any) -> int:
    """The id of one cell (text, image, image file, ``{"text", "image"}`` dict, ``datasets.Image`` cell)."""
    digest = hashlib.blake2b(digest_size=8)
    _feed(digest, cell)
    return int.from_bytes(digest.digest(), "little") >> 1  # 63 bits: a non-negative int64


def _feed(digest: Any, cell: Any) -> None:
    if cell is None:
        digest.update(b"\x00none")
    elif isinstance(cell, str):
        digest.update(b"\x01" + cell.encode("utf-8"))
    elif isinstance(cell, bytes):
        digest.update(b"\x02" + cell)
    elif isinstance(cell, dict) and ("bytes" in cell or "path" in cell) and not ({"text", "image"} & set(cell)):
        data, path = cell.get("bytes"), cell.get("path")  # a datasets.Image cell left undecoded
        digest.update(b"\x02" + data if data is not None else b"\x03" + os.path.abspath(str(path)).encode("utf-8"))
    elif isinstance(cell, dict):
        for key in sorted(cell):
            digest.update(b"\x04" + key.encode("utf-8"))
            _feed(digest, cell[key])
    elif hasattr(cell, "tobytes") and hasattr(cell, "size") and hasattr(cell, "mode"):  # a PIL image
        digest.update(f"\x05{cell.mode}{cell.size}".encode() + cell.tobytes())
    elif isinstance(cell, os.PathLike):
        digest.update(b"\x03" + os.path.abspath(os.fspath(cell)).encode("utf-8"))
    else:
        digest.update(b"\x06" + repr(cell).encode("utf-8"))


def row_content_ids(row: dict[str, Any], negatives: Sequence[str]) -> list[int]:
    """``[query id, positive id, negative ids ...]`` of a bi-encoder row (or a grouped reranker row)."""
    cells = [row["query"], row["positive"], *(cell for cell, _ in negative_cells(row, list(negatives)))]
    return [content_id(cell) for cell in cells]


def with_content_ids(dataset: Any) -> Any:
    """``dataset`` with a column of each row's ids (:data:`IDS_COLUMN`), computed once by ``datasets.map``, which
    caches it beside the dataset's own cache files: a second run reads it back instead of hashing again."""
    if IDS_COLUMN in dataset.column_names:
        return dataset
    negatives = negative_columns(dataset.column_names)
    return dataset.map(lambda row: {IDS_COLUMN: row_content_ids(row, negatives)},
                       desc="hf_mm_rerank: hashing contents (kept for later runs)")
