"""Progress bars on long work outside the Trainer's own loop: encoding, scoring, evaluation, mining, teacher scores.

tqdm bars (transformers' and datasets' own), counted in inputs or pairs, with the rate and the time left, on the main
process only (rank 0 of a multi-process run, whose count is its share). Whether a job shows one, first that applies:

1. its own ``show_progress=True/False`` (``encode``, ``score``, the evaluators, mining, ``score_with_teacher``);
2. the setting of the job it runs in (:func:`showing`): an evaluator's ``show_progress`` reaches the encoding it
   does; inside training, ``TrainingArguments.disable_tqdm=True`` turns every bar off;
3. the environment: ``HF_MM_RERANK_PROGRESS=1`` (on) or ``0`` (off);
4. otherwise on for jobs of at least :data:`THRESHOLD` inputs when stderr is an interactive terminal (so never in
   tests, logs or CI output).

Example:
    >>> embeddings = model.encode(corpus, side="document", show_progress=True)
    Encoding documents:  42%|████▏     | 4200/10000 [00:31<00:43, 134.2 inputs/s]
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
from collections.abc import Iterator
from typing import Any

from .distributed import world

THRESHOLD = 1000  # inputs: shorter jobs show no bar unless asked to
ENV = "HF_MM_RERANK_PROGRESS"
_SETTING: contextvars.ContextVar[bool | None] = contextvars.ContextVar("hf_mm_rerank_progress", default=None)


def encoding(side: str) -> str:
    """The bar's label for encoding one side."""
    return {"query": "Encoding queries", "document": "Encoding documents"}.get(side, f"Encoding {side}")


def shown(show: bool | None, total: int) -> bool:
    """Whether a job of ``total`` inputs shows a bar (see the module's rules)."""
    if world()[0] != 0:
        return False
    for value in (show, _SETTING.get()):
        if value is not None:
            return bool(value)
    env = os.environ.get(ENV, "").strip().lower()
    if env in ("1", "true", "yes", "on"):
        return True
    if env in ("0", "false", "no", "off"):
        return False
    return total >= THRESHOLD and sys.stderr.isatty()


@contextlib.contextmanager
def showing(show: bool | None) -> Iterator[None]:
    """Jobs run inside without their own ``show_progress`` follow ``show`` (None: the setting stays as it is)."""
    if show is None:
        yield
        return
    token = _SETTING.set(bool(show))
    try:
        yield
    finally:
        _SETTING.reset(token)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass


@contextlib.contextmanager
def bar(total: int, desc: str, unit: str = "inputs", show: bool | None = None) -> Iterator[Any]:
    """A tqdm bar of ``total`` (``.update(n)``), or an object that ignores updates when none is shown."""
    if total <= 0 or not shown(show, total):
        yield _NoBar()
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=desc, unit=f" {unit}", dynamic_ncols=True, leave=False) as progress:
        yield progress
