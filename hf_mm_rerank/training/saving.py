"""How the trainers save and reload: the model's own layout and card in every save, learnable loss parameters and
each process's count of rows read in every checkpoint, and the reloads (best model, resume) that restore them.

Checkpoints appear only when complete (:class:`~.checkpoints.AtomicCheckpointsMixin`); under FSDP / DeepSpeed the
sharded parameters go through Trainer's own loaders.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..publishing.gallery import GALLERY_FILE, draw_gallery
from ..publishing.model_card import write_model_card
from .checkpoints import LOSS_WEIGHTS, WRITE_ERRORS, AtomicCheckpointsMixin, copy_files, loadable_files, write_error
from .hub_push import warn_if_local_base

logger = logging.getLogger(__name__)

ROWS_READ = "rows_read_{}.pt"  # in each checkpoint, per process (like Trainer's rng_state_N.pth)


class SavingMixin(AtomicCheckpointsMixin):
    """Trainer's save and reload hooks, for models saved in this package's layout (see the module doc)."""

    loss: nn.Module

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The full hf_mm_rerank layout (adapter or weights, head, processor, config), the loss's learnable
        parameters (if any) and the model card. ``state_dict`` is what Trainer gathered under FSDP / DeepSpeed
        ZeRO-3 (the live parameters are shards there): when given, it is what gets written."""
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        try:
            os.makedirs(output_dir, exist_ok=True)
            self.accelerator.unwrap_model(self.model).save_pretrained(output_dir, state_dict=state_dict)
            loss_state = self.loss.state_dict()
            if loss_state:
                save_file({k: v.detach().cpu().contiguous() for k, v in loss_state.items()},
                          os.path.join(output_dir, LOSS_WEIGHTS))
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
            gallery = self._write_gallery(output_dir)
        except WRITE_ERRORS as error:
            if self._checkpoint_staging is not None:  # a checkpoint: _save_checkpoint cleans up and explains
                raise
            raise write_error(output_dir, error, what="the model") from error
        self._write_card(output_dir, gallery=gallery)

    def keep_gallery(self, evaluators: Any) -> None:
        """The first and the latest gallery of the first evaluator that keeps one (``RetrievalEvaluator(gallery=)``):
        the card's "before" and "after" panels, titled by their step."""
        for evaluator in evaluators:
            shown = getattr(evaluator, "last_gallery", None)
            if shown:
                kept = getattr(self, "galleries", None) or {}
                self.galleries = {**dict(list(kept.items())[:1]), f"step {self.state.global_step}": shown}
                return

    def _write_gallery(self, output_dir: str) -> str | None:
        """``retrieval_gallery.png`` from the kept galleries (its file name, for the card), or None."""
        if not getattr(self, "galleries", None):
            return None
        draw_gallery(self.galleries).save(os.path.join(output_dir, GALLERY_FILE), optimize=True)
        return GALLERY_FILE

    def _write_card(self, output_dir: str, **overrides: Any) -> None:

        repo_id = self.hub_model_id if self.args.push_to_hub and hasattr(self, "hub_model_id") else None
        if overrides.get("gallery") is None and os.path.isfile(os.path.join(output_dir, GALLERY_FILE)):
            overrides["gallery"] = GALLERY_FILE  # a card rewritten later (Trainer.push_to_hub) keeps the picture
        try:
            fields = {**self.model_card_kwargs, **{k: v for k, v in overrides.items() if v is not None}}
            write_model_card(self, output_dir, repo_id=repo_id, **fields)
        except Exception as error:  # a card must never cost a checkpoint
            logger.warning("hf_mm_rerank: could not write the model card (%s).", error)

    def create_model_card(self, language: str | None = None, license: str | None = None, tags: Any = None,
                          model_name: str | None = None, finetuned_from: str | None = None, tasks: Any = None,
                          dataset_tags: Any = None, dataset: Any = None, dataset_args: Any = None) -> None:
        """Trainer.push_to_hub calls this: write our card (not Trainer's) into ``output_dir``."""
        if not self.is_world_process_zero():
            return
        warn_if_local_base(self.accelerator.unwrap_model(self.model), getattr(self, "hub_model_id", None))
        datasets = [dataset_tags] if isinstance(dataset_tags, str) else dataset_tags
        self._write_card(self.args.output_dir, language=language, license=license, model_name=model_name,
                         datasets=datasets)

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # Trainer copies only its own modeling files to output_dir before uploading it; copy every loadable
        # file (head, hf_mm_rerank config, processor, card) so each checkpoint push is a complete repo.

        if self.is_world_process_zero() and self._checkpoint_staging is None:  # (else pushed once renamed)
            copy_files(checkpoint_folder, self.args.output_dir, loadable_files(checkpoint_folder))
        super()._push_from_checkpoint(checkpoint_folder)

    def _load_best_model(self) -> None:
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:  # sharded parameters: Trainer's own loaders
            super()._load_best_model()
        else:
            logger.info("Loading best model from %s (score: %s).", self.state.best_model_checkpoint,
                        self.state.best_metric)
            self.accelerator.unwrap_model(self.model).load_trained_weights(self.state.best_model_checkpoint)
        self._load_loss_state(self.state.best_model_checkpoint)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if not os.path.isfile(os.path.join(resume_from_checkpoint, "trainer_state.json")):
            raise FileNotFoundError(
                f"{resume_from_checkpoint} is incomplete (no trainer_state.json): its save was interrupted, e.g. by "
                "a full disk or a kill. Fix: delete that folder and resume again (resume_from_checkpoint=True then "
                "picks the previous checkpoint), or pass resume_from_checkpoint=<a complete checkpoint>.")
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:  # sharded parameters: Trainer's own loaders
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        else:
            target = model if model is not None else self.model
            self.accelerator.unwrap_model(target).load_trained_weights(resume_from_checkpoint)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        # Every engine's resume (DDP, FSDP, DeepSpeed) comes here: learnable loss parameters are restored with the
        # optimizer state that goes with them.
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            self._load_loss_state(checkpoint)
            self._load_rows_read(checkpoint)

    def _save_process_state(self, folder: str) -> None:
        # Each process's count of the rows it read (the stream's skip limit and the card's "rows read"), so that a
        # resumed run goes on counting from the checkpoint instead of from 0.
        os.makedirs(folder, exist_ok=True)
        torch.save({"rows_read": self.rows_read, "skipped_rows": self.skipped_rows.state()},
                   os.path.join(folder, ROWS_READ.format(self.args.process_index)))

    def _load_rows_read(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, ROWS_READ.format(self.args.process_index))
        if os.path.isfile(path):
            saved = torch.load(path, weights_only=True)
            self.rows_read = int(saved["rows_read"])
            self.skipped_rows.restore(saved.get("skipped_rows", []))
        else:  # written by an older version, or by fewer processes
            self.rows_read = 0
            logger.info("hf_mm_rerank: %s has no %s: the counts of training rows read and skipped start again from 0.",
                        checkpoint, os.path.basename(path))

    def _load_loss_state(self, directory: str) -> None:
        """Restore learnable loss parameters (e.g. the temperature) saved beside the model."""
        expected = self.loss.state_dict()
        if not expected:
            return
        path = os.path.join(directory, LOSS_WEIGHTS)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{directory} has no {LOSS_WEIGHTS}, but the loss has learnable parameters "
                                    f"({sorted(expected)}); refusing to restart them from their initial values. "
                                    "Fix: resume from a checkpoint written with the same loss.")
        self.loss.load_state_dict(load_file(path, device=str(self.args.device)), strict=True)
