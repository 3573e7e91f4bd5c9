"""Collators: dataset rows in, featurized (processor) tensors out. They run in DataLoader workers.

All image decoding, resizing and processor work happens here, never in the training step's process
(unless ``dataloader_num_workers=0``). Collators are picklable: a featurizer plus column names.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from .inputs import InputError, MMInput, to_input
from .processing import Featurizer

ROW_KEY = "_row"  # optional column holding each row's index in the dataset, for error messages
_NUMBERED = re.compile(r"^negative_(\d+)$")


def negative_columns(columns: Sequence[str]) -> list[str]:
    """The negative columns of a bi-encoder dataset: ``negative`` or ``negative_1 ... negative_k``.

    Raises:
        ValueError: both forms are present, or the numbered columns have gaps.
    """
    numbered = sorted((int(m.group(1)), c) for c in columns if (m := _NUMBERED.match(c)))
    if "negative" in columns and numbered:
        raise ValueError(f"columns: found both 'negative' and {[c for _, c in numbered]}; use one form.")
    if numbered and [n for n, _ in numbered] != list(range(1, len(numbered) + 1)):
        raise ValueError(f"columns: negative columns must be negative_1 ... negative_k without gaps, got "
                         f"{[c for _, c in numbered]}.")
    return ["negative"] if "negative" in columns else [c for _, c in numbered]


def check_columns(columns: Sequence[str], required: Sequence[str], what: str) -> None:
    missing = [c for c in required if c not in columns]
    if missing:
        raise ValueError(
            f"{what}: missing column(s) {missing}; found {list(columns)}. Fix: rename your columns with "
            f"dataset.rename_column(old, new) so the dataset has {list(required)}."
        )


def featurizer_of(model_or_featurizer: Any) -> Featurizer:
    featurizer = getattr(model_or_featurizer, "featurizer", model_or_featurizer)
    if not isinstance(featurizer, Featurizer):
        raise TypeError(f"expected a BiEncoder/CrossEncoder or a Featurizer, received "
                        f"{type(model_or_featurizer).__name__}.")
    return featurizer


class BiEncoderCollator:
    """Builds ``{"query": chunks, "positive": chunks, "negative": chunks}`` from (query, positive[, negatives])
    rows; each ``chunks`` is a list of featurized mini-batches (one when ``mini_batch_size`` is None).

    Negatives are flattened row-major: row 0's negatives, then row 1's, ... A ``negative`` cell may also hold
    a list of inputs (the same count in every row).

    Example:
        >>> collator = BiEncoderCollator(model)              # model: a BiEncoder
        >>> batch = collator([{"query": "red car", "positive": "car.jpg", "negative": "boat.jpg"}])
    """

    def __init__(self, model_or_featurizer: Any, *, mini_batch_size: int | None = None) -> None:
        self.featurizer = featurizer_of(model_or_featurizer)
        self.mini_batch_size = mini_batch_size

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        columns = list(rows[0].keys())
        check_columns(columns, ("query", "positive"), "bi-encoder dataset")
        negatives = negative_columns(columns)
        batch = {
            "query": self._column(rows, "query", "query"),
            "positive": self._column(rows, "positive", "document"),
        }
        if negatives:
            cells = [self._negatives(row, negatives, i) for i, row in enumerate(rows)]
            counts = {len(c) for c in cells}
            if len(counts) > 1:
                raise ValueError(f"column '{negatives[0]}': rows have different numbers of negatives "
                                 f"{sorted(counts)}; every row needs the same count.")
            items = [item for row_items in cells for item in row_items]
            batch["negative"] = self.featurizer.chunks(items, "document", self.mini_batch_size)
        return batch

    def _column(self, rows: list[dict[str, Any]], column: str, side: str) -> list[dict[str, Any]]:
        items = [self._input(row[column], row, i, column) for i, row in enumerate(rows)]
        return self.featurizer.chunks(items, side, self.mini_batch_size)

    def _negatives(self, row: dict[str, Any], columns: list[str], i: int) -> list[MMInput]:
        if columns == ["negative"] and isinstance(row["negative"], (list, tuple)):
            return [self._input(cell, row, i, "negative") for cell in row["negative"]]
        return [self._input(row[c], row, i, c) for c in columns]

    def _input(self, cell: Any, row: dict[str, Any], i: int, column: str) -> MMInput:
        where = row.get(ROW_KEY, f"{i} of the batch")
        if cell is None:
            raise InputError(f"row {where}, column '{column}': received None. Fix: drop or fill empty cells "
                             "(dataset.filter(lambda r: r[column] is not None)).")
        return to_input(cell, max_pixels=self.featurizer.max_pixels, row=where, column=column)
