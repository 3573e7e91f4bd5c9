"""Mini-batches: GradCache's unit of work, counted in inputs or in tokens, built as the rows are read."""

from __future__ import annotations

from typing import Any


class Tokens(int):
    """A mini-batch size counted in tokens instead of inputs, e.g. ``CachedContrastiveLoss(mini_batch_size=
    Tokens(4096))``: each GradCache mini-batch holds consecutive inputs (at least one) whose positions, padding
    included, stay within that many tokens, so a mini-batch is bounded by what it costs, whatever the image sizes.

    An input's tokens are those its featurizer makes: special and chat-template tokens (system prompt, turn markers,
    a reranker's instruction), its text after truncation and its visual tokens. A mini-batch of ``k`` inputs costs
    ``k`` times its longest input (sequences are padded to the longest).

    Example:
        >>> loss = CachedContrastiveLoss(mini_batch_size=Tokens(4096))   # or any loss's / collator's mini_batch_size
        >>> trainer = BiEncoderTrainer(model=model, args=args, train_dataset=ds, loss=loss)
        >>> Tokens(4096) == 4096, repr(Tokens(4096))                    # (True, 'Tokens(4096)'): an int
    """

    def __new__(cls, value: Any) -> Tokens:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)) or (
                isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"Tokens(n): n must be a whole number of tokens; received {value!r}. Fix: e.g. "
                             "Tokens(4096).")
        return super().__new__(cls, value)

    def __repr__(self) -> str:
        return f"Tokens({int(self)})"


def opens_group(pending: int, longest: int, cost: int, budget: int) -> bool:
    """The greedy token rule: an input of ``cost`` tokens starts a new group when the current one holds ``pending``
    inputs, the longest of ``longest`` tokens, and padded to the longest with it would take over ``budget`` positions
    (an input over the budget alone is a group)."""
    return pending > 0 and (pending + 1) * max(longest, cost) > budget


def pack(costs: list[int], budget: int) -> list[range]:
    """Consecutive groups of ``costs`` whose padded size (count x longest) stays within ``budget`` (see
    :func:`opens_group`)."""
    groups, start, longest = [], 0, 0
    for i, cost in enumerate(costs):
        if opens_group(i - start, longest, cost, budget):
            groups.append(range(start, i))
            start, longest = i, 0
        longest = max(longest, cost)
    if costs:
        groups.append(range(start, len(costs)))
    return groups


class Chunker:
    """:meth:`Featurizer.chunks` fed one input at a time: each mini-batch is featurized as soon as it is full, so a
    collator that reads rows as it goes holds the decoded images of one mini-batch per column, not of the whole batch
    (a batch of 1,024 640x480 photos is 0.9 GB decoded). The mini-batches are the same as ``chunks`` makes of the
    whole list: ``size`` consecutive inputs, or :func:`pack`'s greedy groups of at most ``size`` tokens."""

    def __init__(self, featurizer: Any, side: str, size: int | None) -> None:  # a processing.Featurizer
        self.featurizer, self.side, self.size = featurizer, side, size
        self.pending: list[Any] = []
        self.longest = 0
        self.done: list[dict[str, Any]] = []

    def add(self, item: Any) -> None:
        if isinstance(self.size, Tokens):
            cost = self.featurizer.cost(item, self.side)
            if opens_group(len(self.pending), self.longest, cost, self.size):
                self._flush()
            self.longest = max(self.longest, cost)
        self.pending.append(item)
        if self.size and not isinstance(self.size, Tokens) and len(self.pending) == self.size:
            self._flush()

    def close(self) -> list[dict[str, Any]]:
        """Every mini-batch, the last one (partly filled) included."""
        if self.pending:
            self._flush()
        return self.done

    def _flush(self) -> None:
        self.done.append(self.featurizer(self.pending, self.side))
        self.pending, self.longest = [], 0


def check_mini_batch_size(value: Any, allow_none: bool = True) -> Any:
    """``value`` if it is a mini-batch size: a whole number of inputs >= 1, :class:`Tokens` >= 1 (or None where
    ``allow_none``); anything else (0, -1, 2.5, "3", True) is refused by name instead of silently making one chunk."""
    if value is None and allow_none:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"mini_batch_size must be >= 1: a whole number of inputs, Tokens(n) for n tokens"
                         f"{', or None for the whole batch' if allow_none else ''}; received {value!r}. Fix: e.g. "
                         "mini_batch_size=32 or mini_batch_size=Tokens(4096).")
    return value
