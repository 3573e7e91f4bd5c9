"""Trainer subclasses driven by a plain ``transformers.TrainingArguments``.

They override only what the task needs: ``__init__`` (collator, loss, argument fix-ups on a copy of the user's
arguments, launch checks), ``train`` (the process's torch thread count restored after it), ``compute_loss``,
``prediction_step``, ``evaluate`` / ``evaluation_loop`` (run the evaluator), ``_prepare_inputs`` (GradCache keeps
mini-batches off the device), ``_get_dataloader`` (a generator per loader, so a resume replays the straight run's
RNG), ``create_optimizer`` (learnable loss parameters, averaged across ranks) and ``log`` (skipped-row counts).
Saving and reloading (the model's layout and card, loss parameters, rows read, checkpoints written aside then
renamed) are :mod:`.saving`'s. Checkpointing, pushing, DDP and logging stay the Trainer's own.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.trainer_utils import IntervalStrategy

from .. import progress
from ..data.collators import ERROR_KEY, SKIPPED_KEY, BiEncoderCollator, CrossEncoderCollator
from ..data.pipeline import add_lengths, undecoded_images
from ..data.sampling import MixtureDataset
from ..data.schema import GROUPED, check_columns, negative_columns, reranker_layout, teacher_columns, with_row_index
from ..data.streams import check_max_steps, first_rows, fit_workers, is_stream, stream_columns, with_stream_row_index
from ..data.validation import SkipCounter, check_cell_type_columns, check_rows
from ..distributed import all_parameters_term, average_gradients
from ..losses import BinaryCrossEntropyLoss, ContrastiveLoss, ListwiseSoftmaxLoss, MaxSimContrastiveLoss, RerankingLoss
from ..losses.base import check_loss_fits, loss_contract
from ..modeling.backbone import TEXT
from .arguments import AutoPipeline, fix_training_arguments
from .hub_push import HubPushCallback
from .mixing import Mixing, MixtureMixin, SourceLosses, losses_by_name
from .saving import SavingMixin
from .throughput import PipelinePolicy, ThroughputCallback, batch_counts

logger = logging.getLogger(__name__)

def _compute_bound(model: Any, loss: Any) -> str | None:
    """Why the inputs alone make a training step compute-bound (PipelinePolicy's start), or None."""
    if loss_contract(loss).mini_batch_size:
        return "GradCache encodes every batch twice"
    spec = getattr(model, "spec", None)
    if getattr(spec, "family", None) == TEXT:
        return "text pairs: nothing to decode"
    return None


def _columns(dataset: Any, name: str = "dataset") -> list[str] | None:
    if is_stream(dataset):
        return stream_columns(dataset, name)
    names = getattr(dataset, "column_names", None)
    if isinstance(names, dict):  # a DatasetDict where one dataset is expected
        raise TypeError(f"{name}: a DatasetDict; here pass one split (e.g. dataset['train']). A dict of datasets "
                        "trains as a mixture when given as train_dataset (see Mixing).")
    return list(names) if names is not None else None


def _prepare_dataset(dataset: Any, model: Any, args: TrainingArguments) -> Any:
    """Image cells left undecoded for the collator (which decodes JPEGs at reduced scale), a row index for
    error messages, and with ``train_sampling_strategy="group_by_length"`` a length column estimated from text
    tokens and image headers (Trainer's own estimate reads ``input_ids``, which raw rows lack)."""
    if dataset is None or isinstance(dataset, MixtureDataset):  # (a mixture's datasets are prepared one by one)
        return dataset
    if isinstance(dataset, dict):  # named evaluation sets: Trainer evaluates each, its metrics prefixed by its name
        return {name: _prepare_dataset(d, model, args) for name, d in dataset.items()}
    if is_stream(dataset):
        if args.train_sampling_strategy == "group_by_length":
            logger.info("hf_mm_rerank: train_sampling_strategy='group_by_length' needs every row's length; the dataset "
                        "is a stream, so it is read in its own order (Trainer uses no sampler for streams).")
        return with_stream_row_index(undecoded_images(dataset), args)
    columns = _columns(dataset) or []
    dataset = undecoded_images(dataset)
    if args.train_sampling_strategy == "group_by_length" and columns and args.length_column_name not in columns:
        logger.info("hf_mm_rerank: grouping batches by length: estimating sequence lengths into column %r.",
                    args.length_column_name)
        dataset = add_lengths(dataset, model, column=args.length_column_name)
    return with_row_index(dataset)  # errors name the row (a column, or a key of each plain-list row)


def _named(dataset: Any, name: str) -> dict[str, Any]:
    """``{name: dataset}``, or for a dict of evaluation sets each one under ``name['key']`` (none for None)."""
    if dataset is None:
        return {}
    if isinstance(dataset, dict):
        return {f"{name}[{key!r}]": d for key, d in dataset.items()}
    return {name: dataset}


def _check_bi_encoder_data(name: str, dataset: Any, loss: nn.Module, args: TrainingArguments) -> None:
    """A bi-encoder dataset's columns and rows, against its loss, before training: the error names the dataset."""
    columns = _columns(dataset, name) if dataset is not None else None
    if columns is None:
        return
    contract = loss_contract(loss)
    check_columns(columns, ("query", "positive"), name)
    if not is_stream(dataset):
        check_rows(dataset, name)
    if contract.needs_groups and not negative_columns(columns):
        raise ValueError(f"{name}: {type(loss).__name__} compares each query's candidates (positive and "
                         "negatives), and the rows have no negative column. Fix: mine them first "
                         "(mine_hard_negatives(bi_encoder, dataset)), then score_with_teacher(reranker, ...).")
    if contract.needs_teacher and not teacher_columns(columns):
        raise ValueError(f"{name}: {type(loss).__name__} distils teacher scores, but the dataset has no "
                         "teacher_scores / teacher_score_0..k column. Fix: dataset = score_with_teacher(reranker, dataset).")
    rows = len(first_rows(dataset, 2)) if is_stream(dataset) else len(dataset)
    if not negative_columns(columns) and name.startswith("train_dataset") and (
            rows < 2 or args.per_device_train_batch_size * args.world_size < 2):
        raise ValueError(
            f"{name}: {rows} row(s), {args.per_device_train_batch_size} per batch on {args.world_size} process(es), "
            "and no negative column: each query would be scored against its own positive alone, so the loss is 0 "
            "and nothing trains. Fix: at least 2 rows per batch (per_device_train_batch_size x processes), or "
            "negative columns.")


@dataclass(frozen=True)
class RunFacts:
    """What a trainer knows about its run beyond ``trainer.state`` (read by the model card): see
    :meth:`RetrievalTrainerMixin.run_facts`.

    Attributes:
        rows_read: training rows this process read, kept and skipped (resumes count on from the checkpoint).
        skipped_rows: rows this process skipped as unreadable (``bad_rows="skip"``).
        bad_rows: the rule for unreadable rows, ``"raise"`` or ``"skip"``.
        metrics_before_training: the evaluator's metrics at step 0 (an evaluation before training), or None.
        datasets: a mixture's datasets: ``{name: {"rows": n, "share": fraction of the batches}}``; None for one.

    Example:
        >>> facts = trainer.run_facts(); print(facts.rows_read, facts.skipped_rows)
    """

    rows_read: int
    skipped_rows: int
    bad_rows: str
    metrics_before_training: dict[str, float] | None
    datasets: dict[str, dict[str, float]] | None = None


class RetrievalTrainerMixin(SavingMixin, MixtureMixin):
    """What both trainers share: argument fix-ups, evaluator-driven ``evaluate``, saving (checkpoints appear only
    when complete) and reloading."""

    loss: nn.Module
    evaluator: Any
    auto_pipeline: AutoPipeline  # what the argument fix-ups picked for the user (workers, threads)

    def _fix_args(self, args: TrainingArguments | None) -> TrainingArguments:
        """A fixed-up copy of the user's arguments (theirs stay as they were)."""
        args, self.auto_pipeline = fix_training_arguments(args)
        return args

    def run_facts(self) -> RunFacts:
        """This process's facts about the run so far (the model card reads them)."""
        return RunFacts(rows_read=self.rows_read, skipped_rows=len(self.skipped_rows), bad_rows=self.bad_rows,
                        metrics_before_training=self.metrics_before_training, datasets=self.mixture_facts())

    def train(self, *args: Any, **kwargs: Any) -> Any:
        # The thread count PipelinePolicy sets while training is the process's again after train(), even when it
        # stops on an error (on_train_end is not called then).
        try:
            return super().train(*args, **kwargs)
        finally:
            if self._pipeline_policy is not None:
                self._pipeline_policy.restore()

    def _validate_args(self) -> None:
        # Trainer refuses eval_strategy != "no" without an eval_dataset; an evaluator is enough for us.
        if self.evaluator is None or self.eval_dataset is not None or self.args.eval_strategy == IntervalStrategy.NO:
            return super()._validate_args()
        strategy, self.args.eval_strategy = self.args.eval_strategy, IntervalStrategy.NO
        try:
            super()._validate_args()
        finally:
            self.args.eval_strategy = strategy

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        skipped = inputs.pop(SKIPPED_KEY, None)
        counts = batch_counts(inputs) if model.training else {}
        if model.training:
            self.rows_read += counts["samples"] + len(skipped or ())
        if skipped:
            dataset = self.train_dataset if model.training else None
            if hasattr(dataset, "__len__"):
                self.skipped_rows.add(skipped, len(dataset), self.args.world_size)
            else:  # a stream: the share of the rows read so far
                self.skipped_rows.add(skipped, None, 1, rows_read=self.rows_read if model.training else None)
        for name, count in counts.items():
            self.input_counts[name] += count
        loss = self.loss(model, inputs)
        self.count_masked()
        if model.training and not loss_contract(self.loss).mini_batch_size:  # (GradCache adds it in its 2nd pass)
            extra = all_parameters_term(model)
            loss = loss if extra is None else loss + extra
        return (loss, {}) if return_outputs else loss

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple[torch.Tensor, None, None]:
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def _prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        if ERROR_KEY in inputs:  # a bad row met in a DataLoader worker: raised here, as itself
            raise inputs[ERROR_KEY]
        if loss_contract(self.loss).mini_batch_size:
            return inputs  # GradCache: the model moves each mini-batch to the device when it embeds it
        return super()._prepare_inputs(inputs)

    def _get_dataloader(self, *args: Any, **kwargs: Any) -> Any:
        # Each new DataLoader iterator draws its workers' base seed from the global RNG unless the loader has a
        # generator of its own. Persistent workers make that draw happen once per loader in a straight run, but
        # once more after a resume (the skip-ahead loader, then the epoch loader): the dropout masks that follow
        # would differ from the straight run's. A generator of the loader's own keeps the global RNG out of it.
        dataloader = super()._get_dataloader(*args, **kwargs)
        loader = getattr(dataloader, "base_dataloader", dataloader)  # accelerate's wrapper proxies its attributes
        if isinstance(loader, torch.utils.data.DataLoader) and loader.generator is None:
            loader.generator = torch.Generator().manual_seed(self.args.seed)
        return dataloader

    def create_optimizer(self, model: nn.Module | None = None) -> Any:
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        extra = [p for p in self.loss.parameters() if p.requires_grad]
        if extra and not any(p is q for group in optimizer.param_groups for p in group["params"] for q in extra):
            optimizer.add_param_group({"params": extra, "weight_decay": 0.0})
            # The loss lives outside the (DDP-wrapped) model, so neither DDP nor Trainer's model.zero_grad() reach
            # its parameters: average their gradients over ranks before each step and clear them after it.
            optimizer.register_step_pre_hook(lambda *_: average_gradients(extra))
            optimizer.register_step_post_hook(lambda *_: [setattr(p, "grad", None) for p in extra])
        return optimizer

    def evaluate(self, eval_dataset: Any = None, ignore_keys: list[str] | None = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """Loss on ``eval_dataset`` (if any) plus the evaluator's metrics, prefixed ``eval_``: one log and one
        ``on_evaluate`` with all of them (so ``EarlyStoppingCallback`` and ``metric_for_best_model`` see each
        evaluation once).

        Runs with only an evaluator too (Trainer itself refuses to evaluate without an eval_dataset).
        """
        if eval_dataset is not None or self.eval_dataset is not None:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)  # evaluation_loop adds ours
        if self.evaluator is None:
            raise ValueError("evaluate() needs an eval_dataset or an evaluator (evaluator=RetrievalEvaluator(...)).")
        metrics = self._evaluator_metrics(metric_key_prefix)
        self.log(dict(metrics))  # log() adds the epoch to the dict it is given
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def evaluation_loop(self, dataloader: Any, description: str, prediction_loss_only: bool | None = None,
                        ignore_keys: list[str] | None = None, metric_key_prefix: str = "eval") -> Any:
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        if self.evaluator is not None and description == "Evaluation":
            output.metrics.update(self._evaluator_metrics(metric_key_prefix))
        return output

    def _evaluator_metrics(self, prefix: str) -> dict[str, float]:
        """The evaluator's metrics as ``{prefix}_{metric}``; evaluators given as a dict each as
        ``{prefix}_{name}_{metric}``. With named evaluation sets (Trainer evaluates each, as ``eval_{set}``), a named
        evaluator runs with the set of its name, a single one once, with the first set, as ``eval_{metric}``."""
        sets = self.eval_dataset if isinstance(self.eval_dataset, dict) else {}
        named = self.evaluator if isinstance(self.evaluator, dict) else None
        current = next((name for name in sets if prefix.endswith(f"_{name}")), None)
        if named is None:
            if current is not None and current != next(iter(sets)):
                return {}  # (run once per evaluation, with the first set)
            runs = {prefix.removesuffix(f"_{current}") if current else prefix: self.evaluator}
        elif current is not None:
            runs = {prefix: named[current]} if current in named else {}
        else:
            runs = {f"{prefix}_{name}": evaluator for name, evaluator in named.items()}
        model = self.accelerator.unwrap_model(self.model)
        with progress.showing(False if self.args.disable_tqdm else None):  # the evaluators' bars follow disable_tqdm
            metrics = {f"{key}_{k}": float(v) for key, evaluator in runs.items() for k, v in evaluator(model).items()}
        self.keep_gallery(runs.values())
        if self.state.global_step == 0:  # train() resets the log history: keep the baseline for the model card
            base = prefix.split("_")[0] + "_"
            self.metrics_before_training = {**(self.metrics_before_training or {}),
                                            **{k.removeprefix(base): v for k, v in metrics.items()}}
        return metrics

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if len(self.skipped_rows) and "loss" in logs:  # bad_rows="skip": the running count (this process's)
            logs["skipped_rows"] = len(self.skipped_rows)
        if "loss" in logs:
            self.add_mixture_logs(logs)
        super().log(logs, *args, **kwargs)

    def _finish(self, model: nn.Module, args: TrainingArguments, losses: dict[str, nn.Module], collator_class: type,
                data_collator: Any, sources: dict[str, Any] | None, train_dataset: Any, eval_dataset: Any,
                evaluator: Any, model_card: dict[str, Any] | None, kwargs: dict[str, Any], bad_rows: str,
                max_skipped_fraction: float, cell_types: dict[str, str] | None) -> None:
        """What both constructors do once each dataset is checked against its loss: one loss (or one per dataset),
        the default collator, the mixture, then :meth:`_setup`."""
        loss = SourceLosses(losses) if len({id(x) for x in losses.values()}) > 1 else next(iter(losses.values()))
        if data_collator is None:
            data_collator = collator_class(model, mini_batch_size=loss_contract(loss).mini_batch_size,
                                           bad_rows=bad_rows, cell_types=cell_types)
        train = self._mixture(sources, lambda d: _prepare_dataset(d, model, args), args, train_dataset)
        self._setup(model, args, loss, evaluator, data_collator, train, eval_dataset, model_card, kwargs, bad_rows,
                    max_skipped_fraction)

    def _setup(self, model: nn.Module, args: TrainingArguments, loss: nn.Module, evaluator: Any, data_collator: Any,
               train_dataset: Any, eval_dataset: Any, model_card: dict[str, Any] | None, kwargs: dict[str, Any],
               bad_rows: str = "raise", max_skipped_fraction: float = 0.05) -> None:
        """What both constructors do once their datasets and loss are checked: Trainer's own __init__ with our
        collator and prepared datasets, then callbacks, counters and the loss on the device."""
        self.loss, self.evaluator = loss, evaluator
        check_cell_type_columns(getattr(data_collator, "cell_types", None), train_dataset, eval_dataset)
        collator_rule = getattr(data_collator, "bad_rows", bad_rows)
        if bad_rows == "skip" and collator_rule != "skip":
            raise ValueError("bad_rows='skip', but the data_collator passed raises on bad rows. Fix: build it with "
                             "bad_rows='skip', or leave data_collator out.")
        self.bad_rows, self.skipped_rows = collator_rule, SkipCounter(max_skipped_fraction)
        if hasattr(data_collator, "defer_errors") and not data_collator.defer_errors:
            # A bad row in a worker reaches the user as one error (_prepare_inputs); a collator passed in stays as it
            # was: the trainer sets this on its own copy.
            data_collator = copy.copy(data_collator)
            data_collator.defer_errors = True
        if self.mixing.prompts:  # the datasets' own prompts: set on the trainer's copy of the collator
            if not isinstance(data_collator, (BiEncoderCollator, CrossEncoderCollator)):
                raise ValueError("Mixing(prompts=...) is applied by hf_mm_rerank's collators; the data_collator passed "
                                 "is another. Fix: leave data_collator out, or apply the prompts in your collator.")
            data_collator = copy.copy(data_collator)
            data_collator.source_prompts, data_collator._featurizers = dict(self.mixing.prompts), {}
        if is_stream(train_dataset):  # see streams.py
            check_max_steps(args)
            if args.accelerator_config.dispatch_batches is None:
                args.accelerator_config = copy.copy(args.accelerator_config)  # (shared with the user's arguments)
                args.accelerator_config.dispatch_batches = False  # each process reads its own share of the stream
            fit_workers(train_dataset, args, auto_workers=self.auto_pipeline.workers)
            self.auto_pipeline.refit_threads(args)
        self.rows_read = 0  # training rows this process read (kept and skipped): the skip limit of a stream
        self.metrics_before_training: dict[str, float] | None = None  # set by an evaluation at step 0
        self._pipeline_policy: PipelinePolicy | None = None
        super().__init__(model=model, args=args, data_collator=data_collator,
                         train_dataset=_prepare_dataset(train_dataset, model, args),
                         eval_dataset=_prepare_dataset(eval_dataset, model, args), **kwargs)
        self.model_card_kwargs = dict(model_card or {})
        self.input_counts: Counter = Counter()
        callbacks = self.callback_handler.callbacks
        for callback in callbacks:
            if isinstance(callback, (HubPushCallback, ThroughputCallback)):
                callback.attach(self)
        if self.auto_pipeline.threads is not None:  # workers and threads were ours to pick: measure, then settle
            prefetched = self.args.dataloader_num_workers * (self.args.dataloader_prefetch_factor or 2)
            self._pipeline_policy = PipelinePolicy(self.auto_pipeline.threads, compute_bound=_compute_bound(model, loss),
                                                   main_process=self.args.process_index == 0, warmup=1 + prefetched)
            self.add_callback(self._pipeline_policy)
        # Throughput goes first so the reporting integrations (TensorBoard, W&B, console) see its figures.
        callbacks.sort(key=lambda cb: not isinstance(cb, ThroughputCallback))
        self.loss.to(self.args.device)


class BiEncoderTrainer(RetrievalTrainerMixin, Trainer):
    """Trains a :class:`BiEncoder` on (query, positive[, negatives]) rows with a plain ``TrainingArguments``.

    Args:
        model: the :class:`BiEncoder`.
        args: plain ``TrainingArguments`` (``remove_unused_columns`` is switched off, with a log line).
        train_dataset, eval_dataset: datasets with columns ``query``, ``positive`` and optionally ``negative``
            or ``negative_1 ... negative_k``; cells are text or images.
        loss: a loss from :mod:`hf_mm_rerank.losses` (default :class:`ContrastiveLoss`).
        evaluator: e.g. :class:`RetrievalEvaluator`; its metrics are returned by ``evaluate()`` as ``eval_*``.
        data_collator: default :class:`BiEncoderCollator` (mini-batched for cached losses).
        model_card: extra model-card fields (``license``, ``datasets``, ``language``, ``model_name``,
            ``dataset_name``); every save writes the card (README.md) beside the weights.
        bad_rows: ``"raise"`` (default: an unreadable row stops training, naming its row, column and the fix) or
            ``"skip"`` (the row is dropped from its batch, logged with its reason and counted as ``skipped_rows``
            in the logs and the model card). A batch of only bad rows always stops training.
        max_skipped_fraction: with ``bad_rows="skip"``, stop once more than this fraction of the training rows
            (each process: of its share) was skipped. :func:`validate_dataset` lists every bad row up front.
        **kwargs: anything else ``Trainer`` takes (callbacks, optimizers, ...).

    Example:
        >>> trainer = BiEncoderTrainer(model=model, args=TrainingArguments("out", num_train_epochs=1),
        ...                            train_dataset=ds, evaluator=RetrievalEvaluator(queries, corpus, relevant))
        >>> trainer.train(); trainer.evaluate()["eval_ndcg@10"]
    """

    def __init__(self, model: nn.Module, args: TrainingArguments | None = None, train_dataset: Any = None,
                 eval_dataset: Any = None, *, loss: nn.Module | dict[str, nn.Module] | None = None,
                 evaluator: Any = None, data_collator: Any = None, model_card: dict[str, Any] | None = None,
                 bad_rows: str = "raise", max_skipped_fraction: float = 0.05, cell_types: dict[str, str] | None = None,
                 mixing: Mixing | None = None, **kwargs: Any) -> None:
        args = self._fix_args(args)
        default = MaxSimContrastiveLoss() if getattr(model, "kind", None) == "multi_vector" else ContrastiveLoss()
        sources = self._sources(train_dataset, mixing)
        losses = losses_by_name(loss, list(sources or {"train_dataset": None}), default)
        for name, dataset in (sources or {"train_dataset": train_dataset}).items():
            _check_bi_encoder_data(f"train_dataset[{name!r}]" if sources else name, dataset, losses[name], args)
        for name, dataset in _named(eval_dataset, "eval_dataset").items():
            _check_bi_encoder_data(name, dataset, next(iter(losses.values())), args)
        self._finish(model, args, losses, BiEncoderCollator, data_collator, sources, train_dataset, eval_dataset,
                     evaluator, model_card, kwargs, bad_rows, max_skipped_fraction, cell_types)


class CrossEncoderTrainer(RetrievalTrainerMixin, Trainer):
    """Trains a :class:`CrossEncoder` (reranker) with a plain ``TrainingArguments``.

    Args:
        model: the :class:`CrossEncoder`.
        args: plain ``TrainingArguments`` (``remove_unused_columns`` is switched off, with a log line).
        train_dataset, eval_dataset: pointwise rows (``query``, ``document``, ``label`` in [0, 1]) or grouped rows
            (``query``, ``positive``, ``negative_1 ... negative_k``), optionally with teacher scores
            (``teacher_score`` / ``teacher_scores`` / ``teacher_score_0..k``).
        loss: a reranking loss from :mod:`hf_mm_rerank.losses` (default: :class:`BinaryCrossEntropyLoss` for
            pointwise rows, :class:`ListwiseSoftmaxLoss` for grouped rows).
        evaluator: e.g. :class:`RerankingEvaluator`; ``evaluate()`` returns its metrics as ``eval_*``.
        data_collator: default :class:`CrossEncoderCollator` (mini-batched when the loss has ``mini_batch_size``).
        model_card: extra model-card fields, as for :class:`BiEncoderTrainer`.
        bad_rows, max_skipped_fraction, cell_types: as for :class:`BiEncoderTrainer`.

    Example:
        >>> trainer = CrossEncoderTrainer(model=reranker, args=TrainingArguments("out"), train_dataset=ds,
        ...                               evaluator=RerankingEvaluator(samples))
        >>> trainer.train(); trainer.evaluate()["eval_ndcg@10"]
    """

    def __init__(self, model: nn.Module, args: TrainingArguments | None = None, train_dataset: Any = None,
                 eval_dataset: Any = None, *, loss: RerankingLoss | dict[str, RerankingLoss] | None = None,
                 evaluator: Any = None, data_collator: Any = None, model_card: dict[str, Any] | None = None,
                 bad_rows: str = "raise", max_skipped_fraction: float = 0.05, cell_types: dict[str, str] | None = None,
                 mixing: Mixing | None = None, **kwargs: Any) -> None:
        args = self._fix_args(args)
        sources = self._sources(train_dataset, mixing)
        named = {**(sources or _named(train_dataset, "train_dataset")), **_named(eval_dataset, "eval_dataset")}
        layouts = {name: reranker_layout(columns) for name, dataset in named.items()
                   if dataset is not None and (columns := _columns(dataset, name)) is not None}
        for name in layouts:
            if not is_stream(named[name]):
                check_rows(named[name], name)
        train_names = list(sources or {"train_dataset": None})
        grouped = any(layout == GROUPED for layout, _, _ in layouts.values())
        defaults = {name: ListwiseSoftmaxLoss() if layouts.get(name, (None,))[0] == GROUPED or (
            name not in layouts and grouped) else BinaryCrossEntropyLoss() for name in train_names}
        losses = {name: chosen if chosen is not None else defaults[name]
                  for name, chosen in losses_by_name(loss, train_names, None).items()}
        for name, (layout, _, teacher) in layouts.items():
            check_loss_fits(losses.get(name, next(iter(losses.values()))), name, layout, teacher)
        self._finish(model, args, losses, CrossEncoderCollator, data_collator, sources, train_dataset, eval_dataset,
                     evaluator, model_card, kwargs, bad_rows, max_skipped_fraction, cell_types)
