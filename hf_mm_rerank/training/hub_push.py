"""Trainer callbacks: background pushes of adapters + model cards to the Hub.

A push never costs the user their run: uploads run on a background thread, each attempt is bounded by a
timeout, failures are retried with exponential backoff and then reported, and local checkpoints are never
touched (the callback uploads a staged copy of the loadable files only).
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainerCallback

from ..modeling.spec import CONFIG_NAME, set_json_field
from ..publishing.export import FORMATS, export
from ..publishing.model_card import hub_id, write_model_card
from .checkpoints import LOSS_WEIGHTS, copy_files, loadable_files

logger = logging.getLogger(__name__)

PUSH_ON = ("save", "best", "end")
# The exclusion of the training state (checkpoints.TRAINING_STATE) for a manual upload of a checkpoint (hf CLI flags).
UPLOAD_EXCLUDES = " ".join(f'--exclude "{pattern}"' for pattern in ("*.pt", "*.pth", "*.bin", "trainer_state.json",
                                                                      LOSS_WEIGHTS))

# Staging folders not yet removed; whatever a killed push thread leaves is removed when the interpreter exits.
_LIVE_STAGING: set[str] = set()


def _remove_staging(staging: str) -> None:
    shutil.rmtree(staging, ignore_errors=True)
    _LIVE_STAGING.discard(staging)


atexit.register(lambda: [_remove_staging(path) for path in list(_LIVE_STAGING)])


def stage(directory: str) -> str:
    """Copy the loadable files of ``directory`` into a fresh temporary folder (checkpoints may be rotated
    away by the Trainer while an upload is still running). A failed copy (a full temp disk) leaves nothing."""
    staging = tempfile.mkdtemp(prefix="hf_mm_rerank_push_")
    _LIVE_STAGING.add(staging)
    try:
        copy_files(directory, staging, loadable_files(directory))
    except BaseException:
        _remove_staging(staging)
        raise
    return staging


@dataclass
class PushRecord:
    """What happened to one push."""

    label: str
    source: str | None = None  # the local folder holding the same files (a checkpoint), if any
    commit_url: str | None = None
    error: str | None = None
    attempts: int = 0
    files: list[str] = field(default_factory=list)


class HubPushCallback(TrainerCallback):
    """Pushes what a user needs to load the model (adapter + config, any trained head, processor,
    ``hf_mm_rerank_config.json``, model card) to a Hub repo while training runs.

    Args:
        repo_id: ``"user/name"``; created if missing.
        private: visibility when the repo is created.
        revision: branch to push to (created from main if missing); default main.
        push_on: ``"save"`` (every checkpoint), ``"best"`` (checkpoints that are the best so far by
            ``metric_for_best_model``) or ``"end"`` (the final model once, after training).
        token: Hub token (default: the logged-in / ``HF_TOKEN`` one). Never written anywhere.
        endpoint: Hub endpoint (default: ``HF_ENDPOINT`` or huggingface.co), e.g. a private Hub.
        max_retries: retries per push after the first attempt.
        backoff: seconds before the first retry; doubles each time.
        attempt_timeout: seconds one attempt may take before it counts as failed (a hung server). A timed-out
            attempt is abandoned: every commit names its parent commit, so an abandoned attempt that reaches the
            Hub later is refused there rather than moving the repo back to an older checkpoint.
        wait_at_end: seconds ``on_train_end`` waits for queued pushes (default 2 minutes) before it logs what is
            still pending, and where its files are, and lets the run end (a hung Hub never holds a run long).
        card: extra model-card fields (``license``, ``datasets``, ``language``, ``model_name``, ``dataset_name``).
        export: also push, at the end of training, the final model exported for serving engines (``"merged"``,
            ``"classifier"`` or ``"sentence-transformers"``, see :func:`hf_mm_rerank.publishing.export.export`; checked before it
            is pushed), with its own card, through the same retried, ordered pushes.
        export_repo_id: where the export goes (default ``"<repo_id>-<export>"``, e.g. ``me/clip-lora-merged``); or
        export_revision: a branch of ``repo_id`` instead of a repo of its own.

    After training, ``records`` lists every push and ``commit_url`` is the last successful commit (the export's:
    ``exports.records`` / ``exports.commit_url``).

    Example:
        >>> trainer = BiEncoderTrainer(model=model, args=args, train_dataset=ds,
        ...                            callbacks=[HubPushCallback("me/clip-lora", push_on="best")])
    """

    def __init__(self, repo_id: str, *, private: bool | None = None, revision: str | None = None,
                 push_on: str = "save", token: str | None = None, endpoint: str | None = None,
                 max_retries: int = 4, backoff: float = 2.0,
                 attempt_timeout: float = 600.0, wait_at_end: float = 120.0, card: dict[str, Any] | None = None,
                 export: str | None = None, export_repo_id: str | None = None, export_revision: str | None = None,
                 ) -> None:

        if push_on not in PUSH_ON:
            raise ValueError(f"push_on={push_on!r}: use one of {PUSH_ON}.")
        if export is not None and export not in FORMATS:
            raise ValueError(f"export={export!r}: use one of {FORMATS}.")
        if export_repo_id and export_revision:
            raise ValueError("pass export_repo_id (a repo of its own) or export_revision (a branch of repo_id), not both.")
        if "/" not in repo_id:
            raise ValueError(f"repo_id={repo_id!r}: use the full 'user_or_org/name' form.")
        self.repo_id, self.private, self.revision, self.push_on = repo_id, private, revision, push_on
        self._token = token
        self.endpoint = endpoint
        self.max_retries, self.backoff = max_retries, backoff
        self.attempt_timeout, self.wait_at_end = attempt_timeout, wait_at_end
        self.card = dict(card or {})
        self.records: list[PushRecord] = []
        self.trainer: Any = None
        self._jobs: queue.Queue = queue.Queue()
        self._worker: threading.Thread | None = None
        self._repo_ready = False
        self._head: str | None = None  # the commit our next push must sit on
        self._replace = False  # remove what the pushed folder does not hold (exports: a branch starts as a copy of main)
        self.export = export
        self.exports: HubPushCallback | None = None  # pushes the export (its repo or branch has its own history)
        if export:
            self.exports = HubPushCallback(
                export_repo_id or (repo_id if export_revision else f"{repo_id}-{export}"), private=private,
                revision=export_revision, push_on="end", token=token, endpoint=endpoint, max_retries=max_retries,
                backoff=backoff, attempt_timeout=attempt_timeout, wait_at_end=wait_at_end)
            self.exports._replace = True  # an export is the whole content of its repo or branch

    def __repr__(self) -> str:  # never show the token
        return f"HubPushCallback(repo_id={self.repo_id!r}, push_on={self.push_on!r}, revision={self.revision!r})"

    @property
    def commit_url(self) -> str | None:
        return next((r.commit_url for r in reversed(self.records) if r.commit_url), None)

    def attach(self, trainer: Any) -> None:
        """Called by the hf_mm_rerank trainers: lets the callback render cards and save the final model."""
        self.trainer = trainer

    # ----- Trainer events -----------------------------------------------------------------------------
    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.push_on == "best" and not args.metric_for_best_model:
            raise ValueError("HubPushCallback(push_on='best') needs TrainingArguments(metric_for_best_model=...), "
                             "e.g. 'ndcg@10', and an evaluation strategy.")
        if state.is_world_process_zero:
            warn_if_local_base(model, self.repo_id)

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero or self.push_on == "end":
            return
        if self.push_on == "best" and state.best_global_step != state.global_step:
            return
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(checkpoint):
            self._guarded(f"step {state.global_step}", lambda: stage(checkpoint), source=checkpoint)

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        target = self.trainer.accelerator.unwrap_model(self.trainer.model) if self.trainer else model
        if self.push_on == "end":
            self._guarded(f"end of training (step {state.global_step})", lambda: _saved_copy(target))
        if self.exports is not None:
            self.exports._guarded(f"{self.export} export (step {state.global_step})",
                                  lambda: _exported_copy(target, self.export))
        self.wait(self.wait_at_end)
        self._report()
        if self.exports is not None:
            self.exports.wait(self.wait_at_end)
            self.exports._report()

    def _guarded(self, label: str, make_staging: Callable[[], str], source: str | None = None) -> None:
        """Stage and queue a push; a local failure here (disk full, ...) is reported, never raised."""
        try:
            self._submit(label, make_staging(), source)
        except Exception as error:
            self.records.append(PushRecord(label, source, error=f"could not stage the files: {_describe(error)}"))
            logger.error("HubPushCallback: could not stage %s for pushing (%s); training goes on.", label, error)

    # ----- background work ----------------------------------------------------------------------------
    def _submit(self, label: str, staging: str, source: str | None = None) -> None:
        try:
            if self.trainer is not None:
                self._write_card(staging)
            record = PushRecord(label, source, files=sorted(os.listdir(staging)))
        except BaseException:
            _remove_staging(staging)
            raise
        self.records.append(record)
        self._jobs.put((record, staging))
        if self._worker is None:
            self._worker = threading.Thread(target=self._run, name="hf_mm_rerank-hub-push", daemon=True)
            self._worker.start()

    def _write_card(self, staging: str) -> None:

        try:
            fields = {**getattr(self.trainer, "model_card_kwargs", {}), **self.card}
            write_model_card(self.trainer, staging, repo_id=self.repo_id, **fields)
        except Exception as error:  # a card problem must not block the weights from being shared
            logger.warning("HubPushCallback: could not render the model card (%s); pushing without it.", error)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until queued pushes are done (True) or ``timeout`` seconds pass (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._jobs.unfinished_tasks:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def _run(self) -> None:
        while True:
            record, staging = self._jobs.get()
            try:
                self._push(record, staging)
            finally:
                _remove_staging(staging)
                self._jobs.task_done()

    def _push(self, record: PushRecord, staging: str) -> None:
        from huggingface_hub import HfApi

        api = HfApi(token=self._token, endpoint=self.endpoint)
        last_error: BaseException | None = None
        for attempt in range(self.max_retries + 1):
            record.attempts = attempt + 1
            try:
                if not self._repo_ready:
                    self._bounded(lambda: self._prepare_repo(api))
                    self._repo_ready = True
                hub_base = {**getattr(self.trainer, "model_card_kwargs", {}), **self.card}.get("base_model")
                self._bounded(lambda base=hub_base: point_base_at_hub(staging, base, api.repo_exists))
                info = self._bounded(lambda parent=self._head: api.upload_folder(
                    repo_id=self.repo_id, folder_path=staging, revision=self.revision, parent_commit=parent,
                    commit_message=f"hf_mm_rerank: {record.label}", delete_patterns="*" if self._replace else None))
                self._head = info.oid or self._head
                record.commit_url, record.error = info.commit_url, None
                logger.info("HubPushCallback: pushed %s to %s (%s).", record.label, self.repo_id, info.commit_url)
                return
            except Exception as error:  # network, server, auth: retry, then report; never raise into training
                last_error = error
                if attempt == self.max_retries:
                    break
                if _status(error) in (409, 412):
                    # The branch moved since our last commit (an abandoned attempt of ours landed after all, or
                    # someone else pushed): put this newer push on top of what is there now.
                    logger.warning("HubPushCallback: %s moved since our last push; pushing %s on top of it.",
                                   self.repo_id, record.label)
                    self._repo_ready = False
                    continue
                delay = self.backoff * 2 ** attempt
                logger.warning("HubPushCallback: push of %s failed (%s); retrying in %.1f s.", record.label,
                               _describe(error), delay)
                time.sleep(delay)
        record.error = _describe(last_error) + _auth_hint(last_error)
        logger.error("HubPushCallback: giving up on pushing %s to %s after %d attempt(s): %s. Training goes on and "
                     "local checkpoints are intact; push one later with `hf upload %s <checkpoint> %s`.", record.label,
                     self.repo_id, record.attempts, record.error, self.repo_id, UPLOAD_EXCLUDES)

    def _prepare_repo(self, api: Any) -> None:
        api.create_repo(self.repo_id, private=self.private, exist_ok=True)
        if self.revision:
            api.create_branch(self.repo_id, branch=self.revision, exist_ok=True)
        self._head = api.repo_info(self.repo_id, revision=self.revision).sha

    def _bounded(self, call: Callable[[], Any]) -> Any:
        """Run ``call`` on a daemon thread; a hung connection counts as a failed attempt after the timeout."""
        result: dict[str, Any] = {}

        def target() -> None:
            try:
                result["value"] = call()
            except BaseException as error:  # handed back to the caller
                result["error"] = error

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        thread.join(self.attempt_timeout)
        if thread.is_alive():
            raise TimeoutError(f"no answer from the Hub within {self.attempt_timeout:g} s")
        if "error" in result:
            raise result["error"]
        return result["value"]

    def _report(self) -> None:
        pending = [r for r in self.records if r.commit_url is None and r.error is None]
        failed = [r for r in self.records if r.error]
        if self.commit_url:
            logger.warning("HubPushCallback: last push of %s is at %s", self.repo_id, self.commit_url)
        if failed:
            logger.error("HubPushCallback: %d push(es) to %s failed: %s", len(failed), self.repo_id,
                         "; ".join(f"{r.label}: {r.error}" for r in failed))
        for record in pending:
            where = (f"the files are in {record.source}; push the loadable ones with `hf upload {self.repo_id} "
                     f"{record.source} {UPLOAD_EXCLUDES}`"
                     if record.source else "save the model (trainer.save_model()) and push that folder with "
                     f"`hf upload {self.repo_id} <folder>`")
            logger.error("HubPushCallback: still pushing %s to %s after waiting %g s; not waiting longer (a late "
                         "attempt cannot overwrite a newer push). If it does not land, %s.", record.label,
                         self.repo_id, self.wait_at_end, where)


def point_base_at_hub(staging: str, hub_base: str | None, exists: Callable[[str], bool]) -> None:
    """In a staged push: a base recorded as a local folder becomes ``hub_base`` (the Hub id the user named for it,
    e.g. ``--card_base_model``) when that repo exists, so the pushed repo loads elsewhere and holds no local path."""
    import json


    if not hub_id(hub_base) or not exists(hub_base):
        return
    for name, key in ((CONFIG_NAME, "base_model"), ("adapter_config.json", "base_model_name_or_path")):
        path = os.path.join(staging, name)
        if os.path.isfile(path):
            with open(path) as handle:
                recorded = json.load(handle).get(key)
            if recorded and not hub_id(recorded):  # a local folder (absolute, or inside the saved folder)
                set_json_field(path, key, hub_base)


def warn_if_local_base(model: Any, repo_id: str | None) -> None:
    """A pushed adapter whose base is a local folder loads nowhere else: say so, and how to load it anyway."""
    spec = getattr(model, "spec", None)
    if spec is not None and spec.adapter and os.path.isabs(spec.base_model):  # (unless the card names its Hub id)
        logger.warning("hf_mm_rerank: %s will not load elsewhere as it is: its base model is the local folder %s, "
                       "which is not pushed. Train from the base's Hub id, or load the repo with from_pretrained(..., "
                       "base_model='<Hub id or folder of that base>').", repo_id or "the pushed repo", spec.base_model)


def _saved_copy(model: Any) -> str:
    """The model's ``save_pretrained`` output, staged like a checkpoint."""
    saved = tempfile.mkdtemp(prefix="hf_mm_rerank_save_")
    try:
        model.save_pretrained(saved)
        return stage(saved)
    finally:
        shutil.rmtree(saved, ignore_errors=True)


def _exported_copy(model: Any, format: str) -> str:
    """The model's export (made from its saved folder, so a QLoRA adapter merges into a full-precision base), staged."""

    saved = tempfile.mkdtemp(prefix="hf_mm_rerank_save_")
    staging = tempfile.mkdtemp(prefix="hf_mm_rerank_push_")
    _LIVE_STAGING.add(staging)
    try:
        model.save_pretrained(saved)
        report = export(saved, os.path.join(staging, "export"), format)
        logger.info("HubPushCallback: %s", report)
        for name in os.listdir(os.path.join(staging, "export")):
            shutil.move(os.path.join(staging, "export", name), os.path.join(staging, name))
        os.rmdir(os.path.join(staging, "export"))
        return staging
    except BaseException:
        _remove_staging(staging)
        raise
    finally:
        shutil.rmtree(saved, ignore_errors=True)


def _describe(error: BaseException | None) -> str:
    if error is None:
        return "unknown error"
    status = getattr(getattr(error, "response", None), "status_code", None)
    text = str(error).splitlines()[0][:300] if str(error) else type(error).__name__
    return f"HTTP {status}: {text}" if status else f"{type(error).__name__}: {text}"


def _status(error: BaseException | None) -> int | None:
    return getattr(getattr(error, "response", None), "status_code", None)


def _auth_hint(error: BaseException | None) -> str:
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status in (401, 403):
        return " The token was refused: check HF_TOKEN or run `hf auth login` with a token that can write."
    return ""
