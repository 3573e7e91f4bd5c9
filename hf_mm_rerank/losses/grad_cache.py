"""GradCache: the memory of one mini-batch for losses that couple a whole batch (contrastive, listwise).

Pass 1 runs every mini-batch without a graph and returns the outputs as leaves that require grad. When the
Trainer calls ``backward``, a hook re-runs each mini-batch with a graph (same RNG state, same autocast) and
back-propagates the cached output gradients. Mini-batches stay on the CPU until their turn.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import nn


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

    Args:
        model: called on one featurized mini-batch at a time.
        batch: ``{column: [mini-batch, ...]}`` as the collators build it.
        columns: the columns to run.
    """
    device = _device_of(model)
    states: dict[str, list[_RandomState]] = {c: [] for c in columns}
    leaves = {}
    training = torch.is_grad_enabled()
    for column in columns:
        parts = []
        with torch.no_grad():
            for chunk in batch[column]:
                states[column].append(_RandomState(device))
                parts.append(model(chunk))
        leaves[column] = torch.cat(parts).requires_grad_(training)
    if training:
        autocast = _autocast_state(device)
        torch.autograd.graph.register_multi_grad_hook(
            [leaves[c] for c in columns], lambda grads: _second_pass(model, batch, columns, states, grads, autocast))
    return leaves


def _second_pass(model: nn.Module, batch: dict[str, Any], columns: Sequence[str],
                 states: dict[str, list[_RandomState]], grads: Sequence[torch.Tensor | None],
                 autocast: Callable[[], Any]) -> None:
    for column, grad in zip(columns, grads):
        if grad is None:
            continue
        start = 0
        for chunk, state in zip(batch[column], states[column]):
            with state.replay(), torch.enable_grad(), autocast():
                output = model(chunk)
            if output.requires_grad:  # e.g. images through a frozen vision tower have nothing to train
                torch.autograd.backward(output, grad[start:start + output.shape[0]])
            start += output.shape[0]


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _autocast_state(device: torch.device) -> Callable[[], Any]:
    device_type = device.type
    if not torch.is_autocast_enabled(device_type):
        return nullcontext
    dtype = torch.get_autocast_dtype(device_type)
    return lambda: torch.autocast(device_type, dtype=dtype)
