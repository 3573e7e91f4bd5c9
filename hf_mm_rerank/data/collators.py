"""Collators: dataset rows in, featurized (processor) tensors out. They run in DataLoader workers.

All image decoding, resizing and processor work happens here, never in the training step's process
(unless ``dataloader_num_workers=0``). Collators are picklable: a featurizer plus column names.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .dedup import IDS_COLUMN, content_id, row_content_ids
from .featurizers import Featurizer, featurizer_of
from .inputs import CELL_KINDS, InputError, MMInput
from .minibatch import Chunker, check_mini_batch_size
from .pair_featurizers import ChatPairFeaturizer
from .sampling import SOURCE_KEY
from .schema import (
    _NUMBERED,
    CONTENT_IDS,
    GUIDE_COLUMNS,
    GUIDE_EMBEDDINGS,
    POINTWISE,
    ROW_KEY,
    check_columns,
    negative_cells,
    negative_columns,
    reranker_layout,
    same_count,
    teacher_columns,
)

SOURCE = "source"  # in a batch of a mixture: the name of the dataset its rows come from (the loss is that source's)
SKIPPED_KEY = "skipped_rows"  # in a batch built with bad_rows="skip": [(row, reason), ...] of the rows dropped
ERROR_KEY = "_input_error"  # a batch that could not be built in a DataLoader worker: the InputError, raised by the step
BAD_ROWS = ("raise", "skip")


def _where(row: dict[str, Any], i: int) -> Any:
    where = row.get(ROW_KEY, f"{i} of the batch")
    return f"{where} of dataset {row[SOURCE_KEY]!r}" if SOURCE_KEY in row else where


def check_cell_types(cell_types: dict[str, str] | None) -> dict[str, str]:
    """``{"column": "text" | "image" | "auto"}``: how string cells of a column are read (``negative`` also covers
    ``negative_1 ... negative_k``)."""
    cell_types = dict(cell_types or {})
    bad = {column: kind for column, kind in cell_types.items() if kind not in CELL_KINDS}
    if bad:
        raise ValueError(f"cell_types={bad}: each column's kind must be one of {CELL_KINDS}.")
    return cell_types


def kind_of(cell_types: dict[str, str], column: str) -> str:
    if column in cell_types:
        return cell_types[column]
    return cell_types.get("negative", "auto") if _NUMBERED.match(column) else "auto"


def read_cell(featurizer: Featurizer, cell: Any, where: Any, column: str, decode: bool = True,
              kind: str = "auto") -> MMInput:
    """One cell -> :class:`MMInput` within the featurizer's pixel budget; errors name the row and column.
    ``decode=False`` checks image headers only; ``kind`` reads a string cell as text or image (see :func:`to_input`)."""
    if cell is None:
        raise InputError(f"row {where}, column '{column}': received None. Fix: drop or fill empty cells "
                         "(dataset.filter(lambda r: r[column] is not None)).")
    return featurizer.read(cell, where, column, decode=decode, kind=kind)


class _RowReader:
    """What both collators share: ``bad_rows="raise"`` (an unreadable row stops training with its row, column
    and fix) or ``"skip"`` (the row is dropped from its batch and reported in ``batch["skipped_rows"]``; the
    trainer logs and counts it). A batch whose every row is bad always raises."""

    def __init__(self, model_or_featurizer: Any, mini_batch_size: int | None, bad_rows: str,
                 cell_types: dict[str, str] | None = None) -> None:
        if bad_rows not in BAD_ROWS:
            raise ValueError(f"bad_rows={bad_rows!r}: use 'raise' (default) or 'skip'.")
        self.featurizer = featurizer_of(model_or_featurizer)
        self.mini_batch_size = check_mini_batch_size(mini_batch_size)
        self.bad_rows = bad_rows
        self.cell_types = check_cell_types(cell_types)
        self.defer_errors = False  # the trainers set it: see __call__
        # {dataset name: prompts}: a mixture's task instructions per source, set by the trainers from their ``prompts``
        # argument: {"query": ..., "document": ...} for embedders, {"instruction": ..., ...} for chat rerankers; a
        # source without one keeps the model's own.
        self.source_prompts: dict[str, dict[str, str]] = {}
        self._featurizers: dict[str, Featurizer] = {}

    def featurizer_for(self, rows: list[dict[str, Any]]) -> Featurizer:
        """The featurizer of the rows' source: the model's, with that source's prompts when it has its own."""
        source = rows[0].get(SOURCE_KEY) if rows else None
        if source not in self.source_prompts:
            return self.featurizer
        if source not in self._featurizers:
            featurizer, given = copy.copy(self.featurizer), self.source_prompts[source]
            if isinstance(featurizer, ChatPairFeaturizer):  # a reranker's: instruction, system_prompt, prefixes
                featurizer.prompt = {**featurizer.prompt, **given}
            else:
                featurizer.prompts = {**featurizer.prompts, **given}
            self._featurizers[source] = featurizer
        return self._featurizers[source]

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """The batch of ``rows``. With ``defer_errors`` (set by the trainers), a bad row met in a DataLoader worker
        comes back as ``{ERROR_KEY: error}`` so the training step raises that one error itself: raised in the worker,
        it would reach the user wrapped in the DataLoader's two tracebacks around its message."""
        if not self.defer_errors or torch.utils.data.get_worker_info() is None:
            return self.collate(rows)
        try:
            return self.collate(rows)
        except InputError as error:
            return {ERROR_KEY: error}

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        raise NotImplementedError

    def _read_rows(self, rows: list[dict[str, Any]], read: Any) -> tuple[list[Any], list[Any], list[tuple[Any, str]]]:
        """``read(row, where)`` for every row: (results, wheres, skipped)."""
        results, wheres, skipped = [], [], []
        columns = batch_columns(rows)
        for i, row in enumerate(rows):
            where = _where(row, i)
            try:
                _has_columns(row, columns, where)
                results.append(read(row, where))
                wheres.append(where)
            except InputError as error:
                if self.bad_rows == "raise":
                    raise
                skipped.append((where, str(error)))
        if not results:
            raise InputError(f"every row of this batch is unreadable, so bad_rows='skip' stops here: "
                             f"{'; '.join(reason for _, reason in skipped[:3])}. Fix: run "
                             "hf_mm_rerank.validate_dataset(dataset, model) to list every bad row, and clean them.")
        return results, wheres, skipped


def batch_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Every column of the batch's rows, in the order they first appear: rows given as dicts (not a
    ``datasets.Dataset``) can differ in their keys, and a column only later rows have must not be dropped unseen."""
    return list(dict.fromkeys(column for row in rows for column in row))


def _has_columns(row: dict[str, Any], columns: list[str], where: Any) -> None:
    """A row without a column other rows of its batch have is named (as dicts, rows can differ in their keys)."""
    missing = [column for column in columns if column not in row and column != ROW_KEY]
    if missing:
        raise InputError(f"row {where}: missing column(s) {missing} that other rows of the batch have; received the "
                         f"columns {list(row)}. Fix: give every row the same columns.")


@contextmanager
def _joined(where: Any) -> Iterator[None]:
    """Around adding a row's inputs to their mini-batches: an input error raised there (by featurizing a full
    mini-batch) must not be skipped as this row's, since part of the row has joined already."""
    try:
        yield
    except InputError as error:
        raise RuntimeError(f"featurizing the mini-batch that row {where} completed failed: {error}") from error


class BiEncoderCollator(_RowReader):
    """Builds ``{"query": chunks, "positive": chunks, "negative": chunks}`` from (query, positive[, negatives])
    rows; each ``chunks`` is a list of featurized mini-batches (one when ``mini_batch_size`` is None).

    Negatives are flattened row-major: row 0's negatives, then row 1's, ... A ``negative`` cell may also hold
    a list of inputs (the same count in every row).

    Example:
        >>> collator = BiEncoderCollator(model)              # model: a BiEncoder
        >>> batch = collator([{"query": "red car", "positive": "car.jpg", "negative": "boat.jpg"}])
    """

    def __init__(self, model_or_featurizer: Any, *, mini_batch_size: int | None = None, bad_rows: str = "raise",
                 cell_types: dict[str, str] | None = None) -> None:
        super().__init__(model_or_featurizer, mini_batch_size, bad_rows, cell_types)

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        columns = batch_columns(rows)
        check_columns(columns, ("query", "positive"), "bi-encoder dataset")
        negatives = negative_columns(columns)
        teacher = teacher_columns(columns)
        featurizer, size = self.featurizer_for(rows), self.mini_batch_size
        sides = {"query": "query", "positive": "document", **({"negative": "document"} if negatives else {})}
        chunkers = {column: Chunker(featurizer, side, size) for column, side in sides.items()}

        def read(row: dict[str, Any], where: Any) -> tuple[int, list[float], list[int]]:
            query, positive, others = read_bi_encoder_row(featurizer, row, where, negatives, self.cell_types)
            scores = _teacher_scores(row, teacher, 1 + len(others), where) if teacher else []
            ids = row.get(IDS_COLUMN) or row_content_ids(row, negatives)  # (hashed once by the no-duplicates sampler)
            with _joined(where):  # the whole row was read: its inputs join their mini-batches (see Chunker)
                chunkers["query"].add(query)
                chunkers["positive"].add(positive)
                for item in others if negatives else ():
                    chunkers["negative"].add(item)
            return len(others), scores, list(ids)

        read_rows, wheres, skipped = self._read_rows(rows, read)
        if negatives:
            same_count([r[0] for r in read_rows], wheres, negatives[0])
        batch: dict[str, Any] = {column: chunker.close() for column, chunker in chunkers.items()}
        ids = torch.tensor([r[2] for r in read_rows], dtype=torch.int64)  # [rows, 2 + k]
        batch[CONTENT_IDS] = {"query": ids[:, 0], "positive": ids[:, 1],
                              **({"negative": ids[:, 2:].reshape(-1)} if negatives else {})}
        if GUIDE_COLUMNS[0] in columns:  # a guide model's embeddings, precomputed (GIST filtering, guide="batch")
            placed = set(wheres)  # (rows skipped as unreadable are not in the batch)
            kept = [row for i, row in enumerate(rows) if _where(row, i) in placed]
            batch[GUIDE_EMBEDDINGS] = {side: torch.tensor([r[column] for r in kept], dtype=torch.float32)
                                       for side, column in (("query", GUIDE_COLUMNS[0]), ("positive", GUIDE_COLUMNS[1]))}
            if negatives:
                batch[GUIDE_EMBEDDINGS]["negative"] = torch.tensor(
                    [vector for r in kept for vector in r[GUIDE_COLUMNS[2]]], dtype=torch.float32)
        if SOURCE_KEY in rows[0]:
            batch[SOURCE] = rows[0][SOURCE_KEY]
        if teacher:  # [rows, 1 + k]: positive first (distillation losses)
            batch["teacher"] = torch.tensor([r[1] for r in read_rows], dtype=torch.float32)
        if skipped:
            batch[SKIPPED_KEY] = skipped
        return batch


class CrossEncoderCollator(_RowReader):
    """Builds ``{"pairs": chunks, "targets": [N], "group_size": int, "teacher": [N]?}`` for a reranker.

    Grouped rows become ``1 + k`` consecutive pairs per query (positive first, target 1, then negatives,
    target 0); pointwise rows one pair each (``group_size`` 1, target = ``label``). ``chunks`` is a list of
    featurized mini-batches of at most ``mini_batch_size`` pairs. All decoding and processing runs here,
    in DataLoader workers.

    Example:
        >>> collator = CrossEncoderCollator(reranker)
        >>> batch = collator([{"query": "red car", "positive": "car.jpg", "negative_1": "boat.jpg"}])
    """

    def __init__(self, model_or_featurizer: Any, *, mini_batch_size: int | None = None, bad_rows: str = "raise",
                 cell_types: dict[str, str] | None = None) -> None:
        super().__init__(model_or_featurizer, mini_batch_size, bad_rows, cell_types)

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        layout, negatives, teacher = reranker_layout(batch_columns(rows))
        featurizer = self.featurizer_for(rows)
        chunker = Chunker(featurizer, "pair", self.mini_batch_size)

        def read(row: dict[str, Any], where: Any) -> tuple[int, list[float], list[float]]:
            query, docs, row_targets, row_teachers = read_reranker_row(
                featurizer, row, where, layout, negatives, teacher, cell_types=self.cell_types)
            with _joined(where):  # featurized a mini-batch at a time, as the rows are read (see Chunker)
                for doc in docs:
                    chunker.add((query, doc))
            return len(docs), row_targets, row_teachers

        read_rows, wheres, skipped = self._read_rows(rows, read)
        sizes = [r[0] for r in read_rows]
        if len(set(sizes)) > 1:
            same_count([size - 1 for size in sizes], wheres, negatives[0])
        targets = [target for r in read_rows for target in r[1]]
        teachers = [score for r in read_rows for score in r[2]]
        batch = {"pairs": chunker.close(), "targets": torch.tensor(targets, dtype=torch.float32),
                 "group_size": sizes[0]}
        if teacher:
            batch["teacher"] = torch.tensor(teachers, dtype=torch.float32)
        if SOURCE_KEY in rows[0]:
            batch[SOURCE] = rows[0][SOURCE_KEY]
        if skipped:
            batch[SKIPPED_KEY] = skipped
        return batch


def read_bi_encoder_row(featurizer: Featurizer, row: dict[str, Any], where: Any, negatives: list[str],
                        cell_types: dict[str, str], decode: bool = True) -> tuple[MMInput, MMInput, list[MMInput]]:
    """One bi-encoder row: (query, positive, negatives); errors name the row and column."""
    def read(cell: Any, column: str) -> MMInput:
        return read_cell(featurizer, cell, where, column, decode, kind_of(cell_types, column))

    return (read(row["query"], "query"), read(row["positive"], "positive"),
            [read(cell, column) for cell, column in negative_cells(row, negatives)])


def read_reranker_row(featurizer: Featurizer, row: dict[str, Any], where: Any, layout: str, negatives: list[str],
                      teacher: list[str], decode: bool = True, cell_types: dict[str, str] | None = None,
                      ) -> tuple[MMInput, list[MMInput], list[float], list[float]]:
    """One reranker row: (query, documents, targets, teacher scores); errors name the row and column."""
    cell_types = cell_types or {}

    def read(cell: Any, column: str) -> MMInput:
        return read_cell(featurizer, cell, where, column, decode, kind_of(cell_types, column))

    query = read(row["query"], "query")
    if layout == POINTWISE:
        docs = [read(row["document"], "document")]
        targets = [_label(row["label"], where)]
    else:
        cells = [(row["positive"], "positive"), *negative_cells(row, negatives)]
        positive_id = content_id(row["positive"])
        for cell, column in cells[1:]:
            if content_id(cell) == positive_id:
                raise InputError(f"row {where}, column '{column}': this negative is the row's positive (the same "
                                 "content), so the reranker would learn to rank the positive below itself. Fix: drop or "
                                 "replace that negative (mine_hard_negatives never picks the positive), or pass "
                                 "bad_rows='skip' to leave such rows out, counted.")
        docs = [read(cell, column) for cell, column in cells]
        targets = [1.0] + [0.0] * (len(docs) - 1)
    return query, docs, targets, _teacher_scores(row, teacher, len(docs), where) if teacher else []


def _label(value: Any, where: Any) -> float:
    try:
        label = float(value)
    except (TypeError, ValueError):
        label = float("nan")
    if not 0.0 <= label <= 1.0:  # also rejects NaN
        raise InputError(f"row {where}, column 'label': received {value!r}; labels must be numbers in [0, 1]. "
                         "Fix: map graded relevance to [0, 1] (e.g. grade / max_grade).")
    return label


def _teacher_scores(row: dict[str, Any], columns: list[str], size: int, where: Any) -> list[float]:
    values = row[columns[0]] if columns == ["teacher_scores"] else [row[c] for c in columns]
    values = values if isinstance(values, (list, tuple)) else [values]
    try:
        scores = [float(v) for v in values]
    except (TypeError, ValueError):
        scores = []
    if len(scores) != size or any(s != s for s in scores):
        raise InputError(f"row {where}, column '{columns[0]}': received {values!r}; expected {size} teacher "
                         "score(s), one per (query, document) pair of the row, positive first. Fix: give one "
                         "number per document.")
    return scores
