"""The row schema: which columns a dataset's rows have and what they mean, shared by the collators, the trainers'
checks, the evaluators, mining, the two-stage tools, validation and the model card.

- bi-encoder rows: ``query``, ``positive`` and optionally ``negative`` (a cell, or a list) or ``negative_1 ... negative_k``;
- reranker rows: pointwise (``query``, ``document``, ``label`` in [0, 1], optional ``teacher_score``) or grouped
  (``query``, ``positive``, negatives as above, optional ``teacher_scores`` / ``teacher_score_0 ... teacher_score_k``);
- ``_row``: the row's index in its dataset (added by the trainers), so errors name the dataset row.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from .inputs import InputError

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
