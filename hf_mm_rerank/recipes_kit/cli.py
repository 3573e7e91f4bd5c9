"""What the recipes share: ``--config file.yaml`` parsing, data loading and model building arguments."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any

import yaml
from transformers import HfArgumentParser, TrainingArguments

from ..data.minibatch import Tokens
from ..data.schema import negative_columns
from ..data.streams import check_max_steps, is_stream, stream_columns
from ..distributed import check_launch, close_process_group
from ..modeling import BiEncoder
from ..publishing.export import export
from ..retrieval.mining import mine_hard_negatives
from ..training.hub_push import HubPushCallback
from .data import random_negatives

logger = logging.getLogger(__name__)


def parse_with_config(dataclass_types: tuple[type, ...], argv: list[str] | None = None) -> tuple[Any, ...]:
    """``HfArgumentParser`` over ``dataclass_types``; ``--config x.yaml`` supplies defaults that flags override.

    YAML values keep their types (dicts such as ``lr_scheduler_kwargs: {min_lr: 1e-6}``, lists, bools, numbers);
    a key that no dataclass field names is an error.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(dataclass_types)
    parser.description = ("--config FILE.yaml gives defaults for any flag below (see recipes/configs/); flags on the "
                          "command line override it.")
    parser.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE.yaml",
                        help="YAML file whose keys are any of the flags below (e.g. recipes/configs/demo.yaml); flags "
                             "given on the command line override it.")
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ValueError("--config needs a YAML file path.")
        with open(argv[i + 1]) as handle:
            config = yaml.load(handle, Loader=_YamlLoader) or {}
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"{argv[i + 1]}: unknown keys {unknown}; every key must be a flag of this recipe "
                             "(see --help).")
        # As argparse defaults the values keep their YAML types (argparse converts only string defaults).
        parser.set_defaults(**{k: v for k, v in config.items() if v is not None})
        argv = argv[:i] + argv[i + 2:]
    parsed = parser.parse_args_into_dataclasses(args=argv)
    for value in parsed:
        if isinstance(value, TrainingArguments):
            check_launch(value)  # fail before any data or model is loaded
            overwrite = any(getattr(other, "overwrite_output_dir", False) for other in parsed)
            check_output_dir(value, overwrite)
            if any(getattr(other, "streaming", False) for other in parsed):
                check_max_steps(value, "--streaming's training split")  # before minutes of model loading
    return parsed


def resume_point(args: TrainingArguments) -> bool | str | None:
    """``--resume_from_checkpoint``: ``true`` (the last complete checkpoint in ``output_dir``), a checkpoint folder,
    or nothing (``false`` or absent). TrainingArguments keeps the flag as a string, which Trainer reads as a path."""
    value = args.resume_from_checkpoint
    if value is None or isinstance(value, bool):
        return value or None
    lowered = str(value).strip().lower()
    if lowered in ("true", "yes", "1"):
        return True
    return None if lowered in ("false", "no", "0", "none", "") else value


def check_output_dir(args: TrainingArguments, overwrite: bool) -> None:
    """Refuse to write into a non-empty ``output_dir`` (another run's results) unless asked, or resuming."""
    from transformers.trainer_utils import get_last_checkpoint

    folder = args.output_dir
    taken = os.path.isdir(folder) and any(os.scandir(folder))
    checkpoint = get_last_checkpoint(folder) if taken else None
    if taken and not overwrite and not resume_point(args):
        resume = " or --resume_from_checkpoint true to continue that run" if checkpoint else ""
        raise FileExistsError(
            f"--output_dir {folder} already holds another run's files ({', '.join(sorted(os.listdir(folder))[:5])}"
            f"{' ...' if len(os.listdir(folder)) > 5 else ''}). Fix: pass a new --output_dir, --overwrite_output_dir "
            f"true to write over it{resume}.")
    if resume_point(args) is True and checkpoint is None:
        raise FileNotFoundError(f"--resume_from_checkpoint true: {folder} has no checkpoint-* folder to resume from "
                                "(was the run saving? --save_strategy steps --save_steps N). Fix: start without it, "
                                "or pass a checkpoint folder.")
    from accelerate import PartialState

    PartialState().wait_for_everyone()  # no rank writes (e.g. the demo base) before every rank has looked


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-6`` as a string; this loader reads it as the float a user means (as YAML 1.2 does)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?|\.[0-9_]+(?:[eE][-+]?[0-9]+)?"
               r"|[0-9][0-9_]*[eE][-+]?[0-9]+|\.inf|\.Inf|\.INF|\.nan|\.NaN|\.NAN)$"),
    list("-+0123456789."))


@dataclass
class LoraArguments:
    """Backbone loading and adapter settings shared by the bi-encoder and reranker recipes."""

    lora_r: int = field(default=16, metadata={"help": "LoRA rank; 0 = full fine-tuning."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(default=None, metadata={
        "help": "Modules to adapt (default: the language model's linear layers)."})
    modules_to_save: list[str] | None = field(default=None, metadata={
        "help": "Modules trained fully and saved with the adapter (e.g. projection heads)."})
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: NF4 4-bit base weights."})
    load_in_8bit: bool = field(default=False, metadata={"help": "8-bit base weights."})
    dtype: str = field(default="auto", metadata={"help": "Weights dtype: auto, bfloat16, float16, float32."})
    attn_implementation: str | None = field(default=None, metadata={"help": "sdpa, flash_attention_2, eager."})
    max_pixels: int | None = field(default=None, metadata={"help": "Pixel budget per image."})
    fast_decode: bool = field(default=False, metadata={
        "help": "Decode JPEGs at reduced scale and pre-shrink images in the workers: faster on large photos, pixels "
                "slightly different from the processor's (default: exactly as the model's processor makes them)."})
    max_length: int | None = field(default=None, metadata={"help": "Token limit for the text part."})


@dataclass
class PublishArguments:
    """Hub publishing beyond Trainer's own ``--push_to_hub``: background pushes and model-card fields."""

    hub_push_on: str | None = field(default=None, metadata={
        "help": "Push with HubPushCallback to --hub_model_id on every 'save', the 'best' checkpoint, or at the 'end'."})
    hub_wait_at_end: float = field(default=120.0, metadata={
        "help": "With --hub_push_on: seconds the end of training waits for pending pushes."})
    hub_attempt_timeout: float = field(default=600.0, metadata={
        "help": "With --hub_push_on: seconds one push attempt may take before it is abandoned and retried."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Write into a non-empty --output_dir (refused otherwise, unless resuming)."})
    card_license: str | None = field(default=None, metadata={"help": "License named in the model card."})
    card_datasets: list[str] | None = field(default=None, metadata={"help": "Hub dataset ids named in the card."})
    card_base_model: str | None = field(default=None, metadata={
        "help": "Hub id of the base model, when it was loaded from a local folder."})
    export: str | None = field(default=None, metadata={
        "help": "At the end, also export the model for serving engines (checked by reloading it): merged, classifier "
                "(rerankers) or sentence-transformers; written to --export_dir.",
        "choices": ["merged", "classifier", "sentence-transformers"]})
    export_dir: str | None = field(default=None, metadata={"help": "Where --export writes (default <output_dir>-<format>)."})
    export_dtype: str | None = field(default=None, metadata={"help": "Weights dtype of the export (default: the base's)."})
    hub_push_export: str | None = field(default=None, metadata={
        "help": "With --hub_push_on and --export: push the export to a repo of its own (<hub_model_id>-<format>) or to a "
                "branch named after the format of --hub_model_id.", "choices": ["repo", "branch"]})

    def card(self) -> dict[str, Any]:
        return {"license": self.card_license, "datasets": self.card_datasets, "base_model": self.card_base_model}

    def callbacks(self, args: Any) -> list[Any]:

        if not self.hub_push_on:
            return []
        if not args.hub_model_id:
            raise ValueError("--hub_push_on needs --hub_model_id user/name.")
        if args.push_to_hub:
            logger.warning("hf_mm_rerank: both --push_to_hub (Trainer's own pushes) and --hub_push_on (the callback) "
                           "push to %s: every save is uploaded twice. Use one of them.", args.hub_model_id)
        if self.hub_push_export and not self.export:
            raise ValueError("--hub_push_export needs --export merged|classifier|sentence-transformers.")
        export = {"export": self.export, "export_revision": self.export if self.hub_push_export == "branch" else None} \
            if self.hub_push_export else {}
        return [HubPushCallback(args.hub_model_id, private=args.hub_private_repo, revision=args.hub_revision,
                                push_on=self.hub_push_on, token=args.hub_token, card=self.card(),
                                wait_at_end=self.hub_wait_at_end, attempt_timeout=self.hub_attempt_timeout, **export)]

    def export_model(self, args: Any) -> Any:
        """``--export``: the saved model exported (and checked) beside ``output_dir``; the main process only."""
        if not self.export or args.process_index != 0:
            return None

        report = export(args.output_dir, self.export_dir or f"{args.output_dir.rstrip('/')}-{self.export}",
                        self.export, dtype=self.export_dtype, overwrite=True)
        print(report, flush=True)
        return report


def mini_batch_flag(size: int, tokens: int, loss: str | None = None, auto: str = "auto") -> Any:
    """The GradCache mini-batch the recipes' ``--mini_batch_size`` / ``--mini_batch_tokens`` ask for (``Tokens(n)``
    when tokens are given, else the size, None for neither), checked when the flags are parsed, before any data or
    model is loaded: a negative number, or mini-batches with ``--loss auto`` (picked from the rows once they are
    loaded, and not a cached one), are refused there with the flag named."""

    for flag, value in (("--mini_batch_size", size), ("--mini_batch_tokens", tokens)):
        if value < 0:
            raise ValueError(f"{flag} {value}: give a positive number, or 0 for none.")
    given = "--mini_batch_tokens" if tokens else "--mini_batch_size" if size else None
    if given and loss == auto:
        raise ValueError(f"{given} needs an explicit --loss: --loss {auto} picks its loss from the rows once they are "
                         "loaded, without GradCache. Fix: add --loss listwise (grouped rows), --loss bce (pointwise "
                         "rows), or lambda, margin_mse, kl; each takes mini-batches.")
    return Tokens(tokens) if tokens else size or None


@contextlib.contextmanager
def hub_model(name: str, flag: str = "--model_name_or_path") -> Any:
    """Loading ``name`` for a recipe: a model that is neither a local folder nor in the Hub cache, with the Hub out of
    reach, is named with its flag and the ways out (transformers' own error names no model)."""
    try:
        yield
    except OSError as error:
        if os.path.isdir(name) or "couldn't connect" not in str(error).lower() and "offline" not in str(error).lower():
            raise
        raise OSError(f"{flag} {name}: could not load this model: it is not a local folder, it is not in the Hub cache, "
                      "and the Hub cannot be reached (no network, or HF_HUB_OFFLINE=1). Fix: download it once where "
                      f"the Hub is reachable (`hf download {name}`; later runs use the cache), pass a local folder, or "
                      "use a config that runs offline (recipes/configs/demo.yaml, demo_reranker.yaml).") from None


def build_lora(m: LoraArguments) -> Any:
    from peft import LoraConfig

    if not m.lora_r:
        return None
    return LoraConfig(r=m.lora_r, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout,
                      target_modules=m.lora_target_modules, modules_to_save=m.modules_to_save)


def build_quantization(m: LoraArguments, args: Any) -> Any:
    from transformers import BitsAndBytesConfig

    if not (m.load_in_4bit or m.load_in_8bit):
        return None
    return BitsAndBytesConfig(load_in_4bit=m.load_in_4bit, load_in_8bit=m.load_in_8bit, bnb_4bit_quant_type="nf4",
                              bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype="bfloat16" if args.bf16 else "float32")


def report_table(before: dict[str, float], after: dict[str, float]) -> dict[str, list[float]]:
    """``{metric: [before, after]}`` for the evaluator's metrics."""
    keys = [k for k in after if k.startswith("eval_") and ("@" in k or k.endswith("_map"))]
    return {k: [round(before.get(k, float("nan")), 4), round(after[k], 4)] for k in keys}


def run(main: Any) -> None:
    """A recipe's entry point: an error of ours (a message with its fix) is printed as that one message, without a
    traceback, and exits with status 2; anything else surfaces as it is. After a run that succeeded, a
    multi-process launch ends its process group in order (:func:`close_process_group`)."""
    try:
        main()
        close_process_group()
    except (ValueError, OSError) as error:
        if "Fix:" not in str(error):
            raise
        print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


def print_report(before: dict[str, float], after: dict[str, float], output_dir: str, loader: str) -> None:
    """The metrics as one compact table (metric x cutoff, "before -> after"; all of them in
    ``output_dir/metrics.json``) and a last line saying where the model is and how to load it."""
    table = {k.removeprefix("eval_"): v for k, v in report_table(before, after).items()}
    with open(os.path.join(output_dir, "metrics.json"), "w") as handle:
        json.dump({"before": before, "after": after}, handle, indent=2)
    if table:
        cutoffs = sorted({k.split("@")[1] for k in table if "@" in k}, key=int)
        names = list(dict.fromkeys(k.split("@")[0] for k in table))
        cell = "{:.4f} -> {:.4f}"
        lines = [f"{'before -> after':<16}" + "".join(f"{'@' + c:>18}" for c in cutoffs)]
        for name in names:
            values = [table.get(f"{name}@{c}") for c in cutoffs] if f"{name}@" in "|".join(table) else []
            row = "".join(f"{cell.format(*v) if v else '':>18}" for v in values)
            lines.append(f"{name:<16}{row}" if row else f"{name:<16}{cell.format(*table[name]):>18}  (no cutoff)")
        print("\n".join(lines))
    if not after:
        print("No evaluation was run: pass --eval_fraction 0.1 (a held-out share of the rows; with --streaming, "
              "--max_eval_samples N: the stream's first N rows) or --eval_split to see metrics before and after "
              "training.")
    print(f"Saved to {output_dir} (metrics: {os.path.join(output_dir, 'metrics.json')}). Load it with "
          f"{loader}.from_pretrained({os.path.abspath(output_dir)!r})", flush=True)


def add_negatives(dataset: Any, num_negatives: int, mining_model: str | None = None, seed: int = 42,
                  args: TrainingArguments | None = None) -> Any:
    """Give (query, positive) rows ``negative_1..k`` for reranker training; other layouts pass through.

    With ``mining_model`` (a BiEncoder folder/repo) the negatives are mined hard negatives, the model running on
    ``args.device`` (each rank's own: in a multi-process run the ranks share the encoding); otherwise they are
    other rows' positives drawn at random (Arrow-level: no image is decoded; the main process writes the
    ``datasets`` cache first).
    """

    if dataset is None:
        return dataset
    columns = stream_columns(dataset, "train_dataset") if is_stream(dataset) else dataset.column_names
    if "document" in columns or negative_columns(columns) or "positive" not in columns:
        return dataset
    if is_stream(dataset):
        raise ValueError("--streaming: the rows are (query, positive) pairs, and a reranker trains on candidates with "
                         "negatives; random or mined negatives need the whole set in memory. Fix: stream grouped rows "
                         "(query, positive, negative_1..k) or pointwise rows (query, document, label), e.g. mined "
                         "once with mine_hard_negatives() and saved; or drop --streaming.")
    if mining_model:

        with hub_model(mining_model, "--mining_model"):
            encoder = BiEncoder.from_pretrained(mining_model, is_trainable=False)
        if args is not None:
            encoder.to(args.device)
        return mine_hard_negatives(encoder, dataset.select_columns(["query", "positive"]), num_negatives=num_negatives)
    with main_process_first(args, "random negatives"):
        return random_negatives(dataset, num_negatives, seed)


def main_process_first(args: TrainingArguments | None, desc: str) -> Any:
    """``args.main_process_first``: the main process writes files or caches, then the others read them."""
    return args.main_process_first(desc=desc) if args is not None else contextlib.nullcontext()
