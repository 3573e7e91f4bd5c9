"""Bad rows before and during training: :func:`validate_dataset` lists every unreadable row of a dataset at once,
and the trainers' ``bad_rows="skip"`` drops unreadable rows from their batches, logs and counts them, and stops
when too many are bad."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from .. import progress
from .collators import check_cell_types, read_bi_encoder_row, read_reranker_row
from .featurizers import featurizer_of
from .inputs import InputError, check_decodes
from .pipeline import undecoded_images
from .schema import (
    GROUPED,
    ROW_KEY,
    check_columns,
    check_negative_counts,
    negative_cells,
    negative_columns,
    reranker_layout,
    same_count,
)

logger = logging.getLogger(__name__)


@dataclass
class BadRow:
    row: int
    column: str
    reason: str


@dataclass
class ValidationReport:
    """What :func:`validate_dataset` found: ``rows`` checked and every ``bad`` row (row, column, reason).

    Example:
        >>> report = validate_dataset(train, model)
        >>> report.ok, report.rows, report.bad_rows   # (False, 1000, [41, 97])
        >>> print(report)                             # each bad row's reason, then the fix
        >>> report.raise_if_bad()                     # InputError with the same text, unless report.ok
    """

    rows: int
    bad: list[BadRow] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.bad

    @property
    def bad_rows(self) -> list[int]:
        return sorted({b.row for b in self.bad})

    def __str__(self) -> str:
        if self.ok:
            return f"all {self.rows} rows are readable."
        lines = [f"{len(self.bad_rows)} of {self.rows} rows are unreadable:"]
        lines += [f"  {b.reason}" for b in self.bad]
        lines.append("Fix: repair or drop them (dataset.select([...]) without these rows), or train with "
                     "bad_rows='skip' to drop them as they come.")
        return "\n".join(lines)

    def raise_if_bad(self) -> None:
        if not self.ok:
            raise InputError(str(self))


def validate_dataset(dataset: Any, model: Any, *, cell_types: dict[str, str] | None = None,
                     decode_images: bool = True, show_progress: bool | None = None) -> ValidationReport:
    """Check every row of ``dataset`` the way ``model``'s trainer will read it, and report every bad row at once.

    Text is checked in full (empty, invalid Unicode, the model's own image/vision tokens); images first by their
    headers (format, size, PIL's pixel limit, the model's aspect-ratio limit: an image over the pixel limit is never
    decoded), then decoded, so a file damaged past its header (a truncated download) is named here and not mid-run.
    JPEGs decode at 1/8 scale (every byte is still read); the pixels are dropped as soon as they are checked.

    Args:
        dataset: a ``datasets.Dataset`` (one split) in the trainer's layout.
        model: the :class:`BiEncoder` or :class:`CrossEncoder` (or its featurizer) that will train on it.
        cell_types: the collator's per-column reading of string cells (``{"query": "text"}``), if any.
        decode_images: False checks image headers only (much faster; damaged pixel data is then met in training).
        show_progress: a bar over the rows (see :mod:`hf_mm_rerank.progress`).

    Example:
        >>> report = validate_dataset(train, model)
        >>> print(report); train = train.select([i for i in range(len(train)) if i not in set(report.bad_rows)])
    """

    featurizer = featurizer_of(model)
    columns = list(dataset.column_names)
    reranker = getattr(model, "kind", None) == "cross_encoder" or "document" in columns
    if reranker:
        layout, negatives, teacher = reranker_layout(columns)
    else:
        check_columns(columns, ("query", "positive"), "bi-encoder dataset")
        negatives = negative_columns(columns)
    types = check_cell_types(cell_types)
    report = ValidationReport(rows=len(dataset))
    counts: list[int] = []
    with progress.bar(len(dataset), "Validating rows", "rows", show_progress) as shown:
        for i, row in enumerate(undecoded_images(dataset)):
            where = row.get(ROW_KEY, i)
            try:
                if reranker:
                    query, docs, _, _ = read_reranker_row(featurizer, row, where, layout, negatives, teacher,
                                                          decode=False, cell_types=types)
                    items = [query, *docs]
                else:
                    query, positive, others = read_bi_encoder_row(featurizer, row, where, negatives, types,
                                                                  decode=False)
                    items = [query, positive, *others]
                firsts = ("query", "document") if reranker and layout != GROUPED else ("query", "positive")
                cells = [(row[c], c) for c in firsts] + (negative_cells(row, negatives) if negatives else [])
                _check_pixels(cells, items, where, decode_images)
                counts.append(len(items) - 2)  # negatives per row (reranker: documents besides the positive)
            except InputError as error:
                report.bad.append(BadRow(i, _column_of(str(error)), str(error)))
                counts.append(-1)
            shown.update()
    if negatives:
        good = [(count, i) for i, count in enumerate(counts) if count >= 0]
        try:
            same_count([c for c, _ in good], [i for _, i in good], negatives[0])
        except InputError as error:
            report.bad.append(BadRow(-1, negatives[0], str(error)))
    return report


def _check_pixels(cells: list[tuple[Any, str]], items: list[Any], where: Any, decode: bool) -> None:
    """Each image of a row decoded and dropped (``decode``; an image over the pixel limit never gets here), then
    closed. A PIL image given in the cell is the caller's: it is loaded (as training would), never shrunk or closed."""
    for (cell, column), item in zip(cells, items):
        if item.image is None:
            continue
        given = isinstance(cell, Image.Image) or isinstance(cell, dict) and isinstance(cell.get("image"), Image.Image)
        if decode:
            check_decodes(item.image, f"row {where}, column '{column}'", owned=not given)
        elif not given and hasattr(item.image, "fp"):  # opened from its header: close the file
            item.image.close()


def _column_of(reason: str) -> str:
    start = reason.find("column '")
    return reason[start + 8:reason.find("'", start + 8)] if start >= 0 else ""


class SkipCounter:
    """The trainer side of ``bad_rows="skip"``: logs each skipped row, counts them (``skipped_rows`` in the logs and
    the model card) and stops once more than ``max_fraction`` of this process's share of the dataset is skipped."""

    def __init__(self, max_fraction: float) -> None:
        if not 0 <= max_fraction < 1:
            raise ValueError(f"max_skipped_fraction={max_fraction}: use a fraction in [0, 1).")
        self.max_fraction = max_fraction
        self.rows: list[tuple[Any, str]] = []  # each bad row once (later epochs meet the same rows again)
        self._seen: set[Any] = set()

    def __len__(self) -> int:
        return len(self.rows)

    def state(self) -> list[tuple[Any, str]]:
        """The rows skipped so far, each with its reason (saved in each checkpoint, so a resume goes on counting)."""
        return list(self.rows)

    def restore(self, rows: list[tuple[Any, str]]) -> None:
        self.rows = [tuple(row) for row in rows]
        self._seen = {row for row, _ in self.rows}

    def add(self, skipped: list[tuple[Any, str]], dataset_rows: int | None, world_size: int,
            rows_read: int | None = None) -> None:
        """``dataset_rows``: the dataset's length; for a stream, ``rows_read``: the rows this process read so far
        (the limit then applies once ten rows are skipped, so one bad row early on does not stop the run)."""
        for row, reason in skipped:
            if row in self._seen:
                continue
            self._seen.add(row)
            self.rows.append((row, reason))
            logger.warning("hf_mm_rerank: skipping row %s (bad_rows='skip'): %s", row, reason)
        if dataset_rows or (rows_read and len(self.rows) >= 10):
            limit = self.max_fraction * (dataset_rows / max(1, world_size) if dataset_rows else rows_read)
            if len(self.rows) > limit:
                shown = "; ".join(reason for _, reason in self.rows[:3])
                of = (f"its share of the {dataset_rows} training rows" if dataset_rows else
                      f"the {rows_read} rows of the stream it has read")
                raise InputError(
                    f"bad_rows='skip': {len(self.rows)} rows skipped on this process, more than max_skipped_fraction="
                    f"{self.max_fraction:g} of {of}; stopping rather than "
                    f"training on what is left. First reasons: {shown}. Fix: run hf_mm_rerank.validate_dataset("
                    "dataset, model) to list every bad row and clean them, or raise max_skipped_fraction.")


def check_rows(dataset: Any, name: str) -> None:
    """Before training: an empty dataset, or list-valued negatives of different lengths, named here (not as a
    sampler error, or at the first mixed batch mid-run)."""
    if hasattr(dataset, "__len__") and len(dataset) == 0:
        raise ValueError(f"{name} has no rows (columns {list(dataset.column_names)}). Fix: check the split, and any filter or "
                         "select that emptied it.")
    check_negative_counts(dataset)


def check_cell_type_columns(cell_types: dict[str, str] | None, *datasets: Any) -> None:
    """``cell_types`` may only name columns the datasets have (``negative`` also covers ``negative_1..k``)."""
    columns = {c for d in datasets if d is not None for c in (getattr(d, "column_names", None) or [])}
    if not cell_types or not columns:
        return
    unknown = sorted(c for c in cell_types if c not in columns and not (c == "negative" and negative_columns(columns)))
    if unknown:
        raise ValueError(f"cell_types names column(s) {unknown} that the dataset does not have (columns: "
                         f"{sorted(columns)}). Fix: use the dataset's column names.")
