"""Checkpoints that appear only when complete.

Trainer writes ``checkpoint-N`` in place: a kill or a full disk mid-save leaves a partial folder that
``resume_from_checkpoint=True`` then picks. Here every checkpoint is written into ``_partial-checkpoint-N/``
(a name neither ``get_last_checkpoint`` nor checkpoint rotation matches, and that Trainer's Hub push skips)
and renamed to ``checkpoint-N`` once every file of every rank is written. A failed write removes the partial
folder and raises :class:`CheckpointWriteError`, naming the folder and the free space left.
"""

from __future__ import annotations

import errno
import fnmatch
import glob
import logging
import os
import shutil
from typing import Any

from safetensors import SafetensorError
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from ..modeling.st_format import st_paths

logger = logging.getLogger(__name__)

STAGING_PREFIX = "_partial-"
# What a failed write raises: OSError (Python), RuntimeError (torch.save's C++ stream), SafetensorError (Rust I/O).
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)
# The learnable parameters of a training loss (e.g. its temperature), saved with each checkpoint for resuming.
LOSS_WEIGHTS = "loss_state.safetensors"
# Training state, never pushed: optimizer/scheduler/scaler/RNG state, loss state, trainer state and arguments.
TRAINING_STATE = ["optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state*.pth", "trainer_state.json",
                  "training_args.bin", LOSS_WEIGHTS, "*.pt", "*.pth", "*.bin"]


def loadable_files(directory: str) -> list[str]:
    """Files of a saved model/checkpoint folder that a user needs to load it (no training state), relative to it:
    the top-level files and sentence-transformers' module folders (``1_Pooling/config.json``, ...)."""
    top = [name for name in os.listdir(directory) if os.path.isfile(os.path.join(directory, name))
           and not any(fnmatch.fnmatch(name, pattern) for pattern in TRAINING_STATE)]
    return sorted(set(top) | set(st_paths(directory)))


def copy_files(source: str, target: str, names: list[str]) -> None:
    """Copy ``names`` (relative paths, maybe in subfolders) from ``source`` to ``target``."""
    for name in names:
        os.makedirs(os.path.dirname(os.path.join(target, name)), exist_ok=True)
        shutil.copy2(os.path.join(source, name), os.path.join(target, name))


class CheckpointWriteError(OSError):
    """A checkpoint or saved model could not be written (a full disk, a quota, a vanished mount).

    Example:
        >>> try:
        ...     trainer.train()
        ... except CheckpointWriteError as error:   # an OSError: errno.ENOSPC when the disk is full, else EIO
        ...     print(error)                        # which folder, why, the free space left and the fix
        >>> trainer.train(resume_from_checkpoint=True)   # once there is room: from the last complete checkpoint
    """


def _is_disk_full(error: BaseException) -> bool:
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(seen) or "StorageFull" in str(seen):  # torch and safetensors say it so
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _free_bytes(folder: str) -> int | None:
    path = os.path.abspath(folder)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def write_error(folder: str, error: BaseException, what: str = "the checkpoint") -> CheckpointWriteError:
    """The error a failed save raises: which folder, why, how much room is left, and what to do."""
    free = _free_bytes(folder)
    full = _is_disk_full(error) or (free is not None and free < 64 * 2**20)
    room = "" if free is None else f" The disk holding it has {free / 2**20:.1f} MiB free{' (it is full)' if full else ''}."
    return CheckpointWriteError(
        errno.ENOSPC if full else errno.EIO,
        f"could not write {what} {folder}: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}."
        f"{room} Nothing partial was left behind, and earlier checkpoints are intact. Fix: free space (or set "
        "save_total_limit, or point output_dir at a bigger disk), then rerun with resume_from_checkpoint=True.")


class AtomicCheckpointsMixin:
    """Trainer mixin: ``_save_checkpoint`` writes aside and renames; failed writes get a clear error."""

    _checkpoint_staging: str | None = None
    _deferred_push: bool = False

    def _get_output_dir(self, trial: Any) -> str:
        # Trainer's _save_checkpoint writes into <_get_output_dir()>/checkpoint-N: point it at the staging folder.
        return self._checkpoint_staging or super()._get_output_dir(trial)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        if self._checkpoint_staging is not None:  # Trainer's push runs in the background: push the renamed folder
            self._deferred_push = True
            return
        super()._push_from_checkpoint(checkpoint_folder)

    def _save_process_state(self, folder: str) -> None:
        """Each process writes its own state into the checkpoint here (as Trainer writes its RNG state), before the
        folder appears under its final name. Nothing by default."""

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        args = self.args
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging, final = os.path.join(run_dir, STAGING_PREFIX + name), os.path.join(run_dir, name)
        if args.should_save:  # leftovers of a killed run: never resumable, never pushed
            for leftover in glob.glob(os.path.join(run_dir, f"{STAGING_PREFIX}{PREFIX_CHECKPOINT_DIR}-*")):
                shutil.rmtree(leftover, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._checkpoint_staging, self._deferred_push = staging, False
        try:
            super()._save_checkpoint(model, trial)
            written = os.path.join(staging, name)
            self._save_process_state(written)
            if self.state.best_model_checkpoint == written:  # Trainer recorded the staging path: record the real one
                self.state.best_model_checkpoint = final
                if args.should_save:
                    self.state.save_to_json(os.path.join(written, "trainer_state.json"))
        except WRITE_ERRORS as error:
            if args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            raise write_error(final, error) from error
        finally:
            self._checkpoint_staging = None
        self.accelerator.wait_for_everyone()  # every rank's RNG state (and own state) is in before the folder appears
        if (args.should_save or args.local_process_index == 0) and os.path.isdir(written):
            _replace(written, final)
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        if self._deferred_push:
            self._deferred_push = False
            self._push_from_checkpoint(final)
        if args.should_save:
            rotate_checkpoints(output_dir=run_dir, save_total_limit=args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)


def _replace(source: str, target: str) -> None:
    """Rename ``source`` to ``target``; an existing ``target`` (the same step saved again) is swapped out."""
    if not os.path.exists(target):
        try:
            os.rename(source, target)
            return
        except FileNotFoundError:  # another node's local rank 0 renamed it first (a shared file system)
            return
    old = f"{target}.old"
    shutil.rmtree(old, ignore_errors=True)
    os.rename(target, old)
    os.rename(source, target)
    shutil.rmtree(old, ignore_errors=True)
