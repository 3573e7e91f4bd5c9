"""The row schema: which columns a dataset's rows have and what they mean, shared by the collators, the trainers'
checks, the evaluators, mining, the two-stage tools, validation and the model card.

- bi-encoder rows: ``query``, ``positive`` and optionally ``negative`` (a cell, or a list) or ``negative_1 ... negative_k``;
- reranker rows: pointwise (``query``, ``document``, ``label`` in [0, 1], optional ``teacher_score``) or grouped
  (``query``, ``positive``, negatives as above, optional ``teacher_scores`` / ``teacher_score_0 ... teacher_score_k``);
- ``_row``: the row's index in its dataset (added by the trainers: a column of a ``datasets.Dataset``, a key of each
  row of a plain list), so errors name the dataset row and skipped rows are counted once each.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from .inputs import InputError

ROW_KEY = "_row"  # optional column holding each row's index in the dataset, for error messages
# In a bi-encoder batch: {"query": int64 [B], "positive": int64 [B], "negative": int64 [B*k] (row-major, as the
# negative embeddings)}: each input's content hash (equal content, equal id), so the loss never takes a copy of a
# row's positive for its negative (:func:`hf_mm_rerank.data.dedup.content_id`).
CONTENT_IDS = "content_ids"
# In a bi-encoder batch, when a guide model's embeddings were precomputed: {"query": float [B, G], "positive": [B, G],
# "negative": [B*k, G]}; GIST-style filtering drops the negatives the guide scores too close to the positive.
GUIDE_EMBEDDINGS = "guide_embeddings"
# The dataset columns the collator builds it from (written by hf_mm_rerank.retrieval.mining.add_guide_embeddings):
# a vector per row for the query and the positive, a list of vectors for the negatives.
GUIDE_COLUMNS = ("guide_query", "guide_positive", "guide_negatives")
_NUMBERED = re.compile(r"^negative_(\d+)$")


class IndexedRows:
    """A plain sequence of row dicts (a ``list``, not a ``datasets.Dataset``) whose rows carry their index under
    ``_row``, as a ``datasets.Dataset`` gets it as a column: without it a bad row could only be named by its place in
    its batch ("1 of the batch"), and ``bad_rows="skip"`` would count every bad row at that place as one.

    Example:
        >>> IndexedRows([{"query": "red", "positive": "red.png"}])[0]
        {'query': 'red', 'positive': 'red.png', '_row': 0}
    """

    def __init__(self, rows: Sequence[Any]) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Any:
        row = self.rows[index]
        if isinstance(row, dict) and ROW_KEY not in row:
            return {**row, ROW_KEY: int(index)}  # a copy: the caller's rows stay as they were
        return row

    def __iter__(self) -> Any:
        return (self[i] for i in range(len(self)))


def with_row_index(dataset: Any) -> Any:
    """``dataset`` with each row's index under ``_row``: a column of a ``datasets.Dataset`` (cheap in Arrow), a key
    of each row of a plain list or tuple of dicts (:class:`IndexedRows`); anything else as it is."""
    if hasattr(dataset, "add_column") and hasattr(dataset, "__len__"):
        names = getattr(dataset, "column_names", None) or []
        return dataset if ROW_KEY in names else dataset.add_column(ROW_KEY, list(range(len(dataset))))
    if isinstance(dataset, (list, tuple)):
        return IndexedRows(dataset)
    return dataset


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


def negative_cells(row: dict[str, Any], columns: list[str]) -> list[tuple[Any, str]]:
    """A row's negatives as ``(cell, column)`` pairs: a ``negative`` cell holding a list, or one cell per column."""
    if columns == ["negative"] and isinstance(row["negative"], (list, tuple)):
        return [(cell, "negative") for cell in row["negative"]]
    return [(row[c], c) for c in columns]


_TEACHER = re.compile(r"^teacher_score_(\d+)$")
POINTWISE, GROUPED = "pointwise", "grouped"


def teacher_columns(columns: Sequence[str]) -> list[str]:
    """``["teacher_scores"]`` (a list per row, positive first) or ``teacher_score_0 ... teacher_score_k``."""
    if "teacher_scores" in columns:
        return ["teacher_scores"]
    numbered = sorted(int(m.group(1)) for m in map(_TEACHER.match, columns) if m)
    return [f"teacher_score_{n}" for n in numbered]


def reranker_layout(columns: Sequence[str]) -> tuple[str, list[str], list[str]]:
    """Classify reranker rows: ``(layout, negative columns, teacher columns)``.

    - pointwise: ``query``, ``document``, ``label`` in [0, 1], optional ``teacher_score``;
    - grouped: ``query``, ``positive``, ``negative`` (a cell or a list) or ``negative_1 ... negative_k``,
      optional ``teacher_scores`` (a list: positive first) or ``teacher_score_0 ... teacher_score_k``.
    """
    if "document" in columns:
        check_columns(columns, ("query", "document", "label"), "pointwise reranker dataset")
        return POINTWISE, [], ["teacher_score"] if "teacher_score" in columns else []
    check_columns(columns, ("query", "positive"), "reranker dataset (pointwise: query/document/label; grouped: "
                  "query/positive/negative_1..k)")
    negatives = negative_columns(columns)
    if not negatives:
        raise ValueError(f"grouped reranker dataset: no negative column in {list(columns)}. Fix: add negative_1 ... "
                         "negative_k (mine_hard_negatives() builds them), or use pointwise rows query/document/label.")
    return GROUPED, negatives, teacher_columns(columns)


def same_count(counts: list[int], rows: list[Any], column: str) -> None:
    """Every row needs the same number of negatives: name the rows of each count when they differ."""
    by_count: dict[int, list[Any]] = {}
    for count, row in zip(counts, rows):
        by_count.setdefault(count, []).append(row)
    if len(by_count) > 1:
        detail = "; ".join(f"{count} in rows {found[:5]}{' ...' if len(found) > 5 else ''}"
                           for count, found in sorted(by_count.items()))
        raise InputError(f"column '{column}': rows have different numbers of negatives ({detail}); every row needs "
                         "the same count. Fix: pad or trim the negatives, or filter those rows out.")


def check_negative_counts(dataset: Any) -> None:
    """Find rows whose list-valued ``negative`` cell differs in length before training starts (Arrow, no decoding)."""
    import pyarrow.compute as pc

    data = getattr(dataset, "data", None)
    if data is None or "negative" not in dataset.column_names:
        return
    column = data.column("negative")
    if not hasattr(column.type, "value_type"):  # one negative per cell
        return
    lengths = pc.fill_null(pc.list_value_length(column), 0).to_pylist()
    if len(set(lengths)) > 1:
        same_count(lengths, list(range(len(lengths))), "negative")
