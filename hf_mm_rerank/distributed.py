"""Multi-process plumbing shared by the losses, GradCache, evaluators and mining.

- :func:`gather_with_grad`: cross-rank negatives (the local slice keeps its gradient);
- :func:`sharded_inference`: every rank encodes/scores a share of the items, all ranks get every output, in
  the single-process order and from the same batches (so metrics and mined negatives equal one process);
- :func:`no_sync`: DDP's ``no_sync`` for GradCache chunks, so a step all-reduces its gradients once;
- :func:`check_launch`: refuse launches whose processes would train as independent copies;
- :func:`close_process_group`: the orderly end of a multi-process run.

Everything is a no-op in a single process (no process group, or a group of one).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the running process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def close_process_group() -> None:
    """Wait for every rank, then destroy the default process group, if this process has one.

    A process that exits with its group alive can abort in the interpreter's teardown (gloo's worker threads still
    hold work: SIGABRT, "terminate called without an active exception"; pytorch/pytorch#190489), which turns a
    finished run into a failed launch. Call it only after a run that succeeded on every rank: a rank that failed
    never reaches the barrier, and the others would wait for it.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class _AllGather(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for the local slice (each rank's loss uses it)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return tuple(parts)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> torch.Tensor:
        stacked = torch.stack(grads).contiguous()
        dist.all_reduce(stacked)
        return stacked[dist.get_rank()]


def _padded(x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """``x`` padded with zero rows to the largest row count of any rank, and every rank's row count."""
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
    sizes = [int(s) for s in sizes]
    return F.pad(x, (0, 0) * (x.dim() - 1) + (0, max(sizes) - x.shape[0])), sizes


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All-gather ``x`` across ranks keeping the local slice's gradient; returns (gathered, local offset).

    Ranks may hold different row counts (a last, smaller batch): rows are padded, gathered and unpadded. Token
    embeddings ``[N, T, d]`` are padded to the longest T of any rank first.
    """
    rank, size = world()
    if size == 1:
        return x, 0
    if x.dim() >= 3:  # token embeddings: every rank's tokens padded to the longest (zero vectors are not scored)
        width = torch.tensor([x.shape[1]], device=x.device)
        dist.all_reduce(width, op=dist.ReduceOp.MAX)
        x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, int(width) - x.shape[1]))
    padded, sizes = _padded(x)
    parts = _AllGather.apply(padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]), sum(sizes[:rank])


def batch_share(count: int, device: torch.device) -> float:
    """``world * count / total count`` over ranks. A rank's mean loss times this makes DDP's gradient average
    the gradient of the mean over the global batch, also when ranks hold different row counts (1.0 when equal)."""
    _, size = world()
    if size == 1:
        return 1.0
    total = torch.tensor([float(count)], device=device)
    dist.all_reduce(total)
    return size * count / float(total)


@torch.no_grad()
def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over ranks (no gradient); ``x`` itself in one process."""
    _, size = world()
    if size == 1:
        return x
    total = x.detach().clone()
    dist.all_reduce(total)
    return total / size


@torch.no_grad()
def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``x`` (any row counts), concatenated in rank order; no gradient."""
    _, size = world()
    if size == 1:
        return x
    padded, sizes = _padded(x)
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def sharded_inference(total: int, batch_size: int, run_batch: Callable[[int, int], torch.Tensor],
                      device: torch.device, shard: bool = True, *, progress: Any = None) -> torch.Tensor:
    """Outputs of ``run_batch(start, stop)`` over ``range(0, total, batch_size)``, concatenated on the CPU.

    With a process group of several ranks (and ``shard``), rank r runs batches r, r + W, r + 2W, ... and the
    outputs are gathered (through ``device``, which the backend must support: CUDA for NCCL) and put back in
    order: every rank returns what one process would, computed from the very same batches. Every rank must
    call it (as Trainer does with evaluators); a single process runs every batch itself. ``progress(count)``, when
    given, is a context giving a bar of this rank's ``count`` items (:func:`hf_mm_rerank.progress.bar`).
    """
    rank, size = world() if shard else (0, 1)
    starts = list(range(0, total, batch_size))
    mine = starts[rank::size]
    outputs = []
    with progress(sum(min(batch_size, total - s) for s in mine)) if progress else nullcontext() as shown:
        for start in mine:
            outputs.append(run_batch(start, min(start + batch_size, total)).cpu())
            if shown is not None:
                shown.update(min(batch_size, total - start))
    local = torch.cat(outputs) if outputs else None
    if size == 1:
        return local if local is not None else torch.empty(0)
    # Ranks without a batch still take part in the gather: they need the output's trailing shape and dtype.
    meta: list[Any] = [None] * size
    dist.all_gather_object(meta, (tuple(local.shape[1:]), local.dtype) if local is not None else None)
    tail, dtype = next(m for m in meta if m is not None)
    if local is None:
        local = torch.empty((0, *tail), dtype=dtype)
    gathered = gather_rows(local.to(device)).cpu()
    order = [i for r in range(size) for start in starts[r::size] for i in range(start, min(start + batch_size, total))]
    result = torch.empty_like(gathered)
    result[torch.tensor(order, dtype=torch.long)] = gathered
    return result


def shard_kwargs(shard: bool) -> dict[str, bool]:
    """``{"shard_across_ranks": True}`` when sharding applies (asked for, several ranks), else ``{}``: callers
    pass it to ``encode`` / ``score``, so single-process duck-typed models need not know the argument."""
    return {"shard_across_ranks": True} if shard and world()[1] > 1 else {}


def no_sync(model: nn.Module) -> Any:
    """``model.no_sync()`` for a DDP-wrapped model (gradients accumulate locally), else a null context."""
    return model.no_sync() if isinstance(model, nn.parallel.DistributedDataParallel) else nullcontext()


def all_parameters_term(model: nn.Module) -> torch.Tensor | None:
    """``0 x`` one element of every trainable parameter of a DDP-wrapped ``model`` that does not search for unused
    parameters (else None). Added to what a backward starts from, it makes every parameter take part in that backward,
    also a tower the batch did not use (text-only rows, a GradCache chunk of images): DDP then needs no
    ``find_unused_parameters=True`` (an extra graph traversal per step, and a warning from every rank), and the
    gradients are unchanged."""
    if not isinstance(model, nn.parallel.DistributedDataParallel) or model.find_unused_parameters:
        return None
    touched = [p.reshape(-1)[:1] for p in model.module.parameters() if p.requires_grad and p.numel()]
    return torch.cat(touched).sum() * 0.0 if touched else None


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (calls on it skip DDP's reducer and buffer broadcasts)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def average_gradients(parameters: list[nn.Parameter]) -> None:
    """Average the ``.grad`` of ``parameters`` over ranks in one all-reduce: for parameters outside the
    DDP-wrapped model (a learnable loss temperature), called before each optimizer step."""
    _, size = world()
    grads = [p.grad for p in parameters if p.grad is not None]
    if size == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def check_launch(args: Any) -> None:
    """Refuse what would silently train independent copies of the model.

    - Launched as several processes (``WORLD_SIZE`` > 1) while ``TrainingArguments`` runs each one on its own
      (e.g. ``accelerate launch --multi_gpu`` on CPUs without ``--use_cpu true --ddp_backend gloo``): each
      process would train alone and overwrite the others' output folder.
    - One process driving several GPUs with ``nn.DataParallel`` (a plain ``python recipe.py`` on a multi-GPU
      machine): it replicates the model every step and its replicas cannot run our multi-call training steps.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and args.world_size != launched:
        raise RuntimeError(
            f"this process was launched as one of {launched} (WORLD_SIZE={launched}), but TrainingArguments "
            f"runs it as a world of {args.world_size}: the processes would train independent copies and overwrite "
            "each other's output_dir. Fix: on GPUs, `accelerate launch --multi_gpu --num_processes N recipe.py ...`; "
            "on CPUs add `--use_cpu true --ddp_backend gloo` (TrainingArguments(use_cpu=True, ddp_backend='gloo')): "
            "`accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no "
            "--dynamo_backend no recipe.py ... --use_cpu true --ddp_backend gloo`.")
    if args.n_gpu > 1:
        raise RuntimeError(
            f"one process sees {args.n_gpu} GPUs, so Trainer would wrap the model in nn.DataParallel, which "
            "hf_mm_rerank does not support (its steps call the model several times per batch). Fix: one process "
            f"per GPU, `accelerate launch --multi_gpu --num_processes {args.n_gpu} recipe.py ...` (or torchrun "
            "--nproc_per_node), or use one GPU: CUDA_VISIBLE_DEVICES=0 python recipe.py ...")
