"""GradCache: the memory of one mini-batch for losses that couple a whole batch (contrastive, listwise).

Pass 1 runs every mini-batch under ``no_grad`` (but the last, whose graph is kept) and returns the outputs as leaves
that require grad. When the Trainer calls ``backward``, a hook back-propagates the cached output gradients through the
kept graph, then re-runs each other mini-batch that reaches a trainable parameter with a graph (same RNG state, same
autocast) and back-propagates through it: one forward fewer than the reference algorithm, at its peak memory.
Mini-batches stay on the CPU until their turn.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..distributed import all_parameters_term, no_sync, unwrap


class _RandomState:
    """Captures the CPU/CUDA RNG so a chunk's second (gradient) pass sees the same dropout masks."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @contextmanager
    def replay(self) -> Iterator[None]:
        with torch.random.fork_rng(devices=[self.device] if self.cuda is not None else []):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda, self.device)
            yield


def grad_cached(model: nn.Module, batch: dict[str, Any], columns: Sequence[str]) -> dict[str, torch.Tensor]:
    """``{column: model outputs of all its mini-batches}``; gradients reach the model through a backward hook.

    Under DDP (``model`` is the wrapped model), the first pass calls the inner module, so no reducer or buffer
    broadcast is involved, and the second pass runs every mini-batch but the last inside ``no_sync()``: one
    gradient all-reduce per step, not one per mini-batch. Mini-batches whose output needs no gradient (inputs
    through a frozen tower) are not run again.

    Args:
        model: called on one featurized mini-batch at a time (may be DDP-wrapped).
        batch: ``{column: [mini-batch, ...]}`` as the collators build it.
        columns: the columns to run.
    """
    inner = unwrap(model)
    device = _device_of(inner)
    training = torch.is_grad_enabled()
    trains = getattr(inner, "trains", None)
    plan: list[_Chunk] = []
    leaves = {}
    for index, column in enumerate(columns):
        parts, start = [], 0
        for number, chunk in enumerate(batch[column]):
            state = _RandomState(device)
            # Which chunks reach a trainable parameter is known from the modules they run through (a frozen tower's
            # chunks are not run again, and never with DDP's gradient sync, which would reduce nothing).
            trained = training and (trains(chunk) if trains is not None else _any_trainable(inner))
            # Pass 1 keeps no graph, as the reference algorithm, except for the very last mini-batch: its graph is
            # the one pass 2 would rebuild first, at the same peak memory (no other mini-batch runs while it lives).
            keep = trained and index == len(columns) - 1 and number == len(batch[column]) - 1
            with nullcontext() if keep else torch.no_grad():
                output = inner(chunk)
            if trained:
                plan.append(_Chunk(index, chunk, state, start, start + output.shape[0], tuple(output.shape[1:]),
                                   output if keep else None))
            parts.append(output.detach())
            start += output.shape[0]
        leaves[column] = _cat(parts).requires_grad_(training)
    if training:
        autocast = _autocast_state(device)
        torch.autograd.graph.register_multi_grad_hook(
            [leaves[c] for c in columns], lambda grads: _second_pass(model, plan, grads, autocast))
    return leaves


def _any_trainable(model: nn.Module) -> bool:
    return any(p.requires_grad for p in model.parameters())


@dataclass
class _Chunk:
    """A mini-batch to run again with a graph: its column, features, RNG state and rows in the column."""

    column: int
    features: Any
    state: _RandomState
    start: int
    stop: int
    shape: tuple[int, ...] = ()  # an output row's shape (token embeddings: [T, d], T differing between chunks)
    kept: torch.Tensor | None = None  # the output with its pass-1 graph (the last mini-batch), not run again


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    """Chunk outputs as one tensor; token embeddings ``[n, T, d]`` zero-padded to the longest T (zeros: unscored)."""
    if parts[0].dim() < 3:
        return torch.cat(parts)
    width = max(p.shape[1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, 0, 0, width - p.shape[1])) for p in parts])


def _second_pass(model: nn.Module, plan: list[_Chunk], grads: Sequence[torch.Tensor | None],
                 autocast: Callable[[], Any]) -> None:
    todo = [chunk for chunk in plan if grads[chunk.column] is not None]
    wrapped = model is not unwrap(model)
    # The kept graph goes first: it was built past DDP's reducer, so its backward cannot be the one that synchronises
    # the gradients (with nothing else to run, the chunk is run again through the wrapper instead).
    todo.sort(key=lambda chunk: chunk.kept is None)
    if wrapped and len(todo) == 1:
        todo[0].kept = None
    for i, chunk in enumerate(todo):
        last = i == len(todo) - 1
        # Only the last backward may synchronise gradients across ranks (it sees those accumulated before).
        with nullcontext() if last else no_sync(model):
            if chunk.kept is not None:
                output, chunk.kept = chunk.kept, None
            else:
                with chunk.state.replay(), torch.enable_grad(), autocast():
                    output = model(chunk.features)
            with torch.enable_grad():
                extra = all_parameters_term(model) if last else None  # the other chunks' parameters take part too
            seed = grads[chunk.column][chunk.start:chunk.stop]
            if seed.dim() >= 3:  # this chunk's own tokens (the leaves were padded to the longest chunk)
                seed = seed[:, :chunk.shape[0]]
            outputs, seeds = [output], [seed]
            if extra is not None:
                outputs.append(extra)
                seeds.append(torch.ones_like(extra))
            torch.autograd.backward(outputs, seeds)


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _autocast_state(device: torch.device) -> Callable[[], Any]:
    device_type = device.type
    if not torch.is_autocast_enabled(device_type):
        return nullcontext
    dtype = torch.get_autocast_dtype(device_type)
    return lambda: torch.autocast(device_type, dtype=dtype)
