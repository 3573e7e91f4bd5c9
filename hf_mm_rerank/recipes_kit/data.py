"""The recipes' training data: where rows come from (``--dataset_name``, ``--data_files``, the built-in demo data,
streams), their canonical columns, the held-out split, the data check, and random negatives."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, replace
from typing import Any

from transformers import TrainingArguments

from ..data.dedup import content_id
from ..data.pipeline import undecoded_images
from ..data.streams import first_rows, is_stream, stream_columns
from ..data.validation import validate_dataset
from .demo import DEMO_DATA, emoji_splits

logger = logging.getLogger(__name__)


@dataclass
class DataArguments:
    """Where the training rows come from (``datasets.load_dataset`` or the built-in demo data)."""

    dataset_name: str = field(default="builtin:emoji", metadata={
        "help": "Hub dataset name, a loader (json, csv, parquet, imagefolder) with --data_files/--data_dir, "
                "or builtin:emoji (offline demo data). --data_files alone picks json/csv/parquet from the suffix."})
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    data_files: list[str] | None = field(default=None, metadata={"help": "Local data files (json/csv/parquet)."})
    data_dir: str | None = field(default=None, metadata={"help": "Folder for imagefolder-style datasets."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    eval_split: str | None = field(default=None, metadata={"help": "Split for the retrieval evaluator."})
    eval_fraction: float = field(default=0.0, metadata={"help": "Hold out this fraction when no eval_split."})
    query_column: str = field(default="query", metadata={"help": "Column renamed to 'query'."})
    positive_column: str = field(default="positive", metadata={"help": "Column renamed to 'positive'."})
    image_root: str | None = field(default=None, metadata={
        "help": "Relative image paths are resolved against this folder (default: the first data file's folder)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set."})
    max_eval_samples: int | None = field(default=None, metadata={
        "help": "Truncate the evaluation set; with --streaming and no --eval_split, hold out the stream's first N rows "
                "(training starts after them)."})
    cache_images: bool = field(default=False, metadata={
        "help": "Decode and shrink every training image once to the model's pixel budget (cached by datasets), "
                "so later epochs skip full-size decoding."})
    bad_rows: str = field(default="raise", metadata={
        "help": "An unreadable row: 'raise' (stop, naming row, column and fix) or 'skip' (drop it, log and count it).",
        "choices": ["raise", "skip"]})
    max_skipped_fraction: float = field(default=0.05, metadata={
        "help": "With --bad_rows skip: stop once more than this fraction of the training rows was skipped."})
    streaming: bool = field(default=False, metadata={
        "help": "Read --dataset_name / --data_files as a stream (datasets streaming=True; nothing is downloaded or "
                "converted up front): train with --max_steps; held-out rows come from --eval_split or the stream's "
                "first --max_eval_samples rows (kept out of training); random or mined negatives, --cache_images and "
                "--validate_data need the whole set and are refused."})
    validate_data: bool = field(default=False, metadata={
        "help": "Scan the training rows first (text; image headers, then pixels: truncated files are found) and list "
                "every unreadable one; with --bad_rows raise the run stops there, with skip those rows are dropped "
                "before training."})

    mixture: dict | str | None = field(default=None, metadata={
        "help": "Train on several datasets at once (in the --config YAML): {strategy: proportional | round_robin | "
                "temperature | weighted, alpha: 0.5, no_duplicates: true, datasets: [{name: ..., weight: 1.0, "
                "query_prompt / document_prompt (embedders) or instruction (rerankers): ..., and any data flag: "
                "dataset_name, data_files, query_column, positive_column, max_train_samples, ...}]}. The held-out "
                "rows come from the first dataset that has some."})

    dropped_rows = 0  # rows --validate_data dropped (recorded in the model card)

    def row_rules(self) -> dict[str, Any]:
        """The trainer's bad-row settings."""
        return {"bad_rows": self.bad_rows, "max_skipped_fraction": self.max_skipped_fraction}


def validated(train: Any, model: Any, data: DataArguments, args: TrainingArguments) -> Any:
    """``--validate_data``: every unreadable row listed at once; stop (``--bad_rows raise``) or drop them (skip)."""
    if not data.validate_data:
        return train

    report = validate_dataset(train, model)
    if report.ok or data.bad_rows == "raise" or -1 in report.bad_rows:  # -1: dataset-wide (mixed negative counts)
        if args.process_index == 0 and report.ok:
            print(f"hf_mm_rerank: data check: {report}", flush=True)
        report.raise_if_bad()
        return train
    bad = set(report.bad_rows)
    if args.process_index == 0:
        print(f"hf_mm_rerank: data check: dropping {len(bad)} of {report.rows} rows before training "
              "(--bad_rows skip):\n" + "\n".join(f"  {b.reason}" for b in report.bad), flush=True)
    data.dropped_rows += len(bad)  # (a mixture's datasets add up)
    return train.select([i for i in range(len(train)) if i not in bad])


# datasets' packaged builders that read local files: without --data_files they would scan the working directory.
FILE_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "imagefolder", "audiofolder", "webdataset"}


def load_data(args: DataArguments, seed: int = 42) -> tuple[Any, Any]:
    """Return (train, eval) datasets with canonical column names; eval may be None."""
    from datasets import load_dataset


    builder = _builder(args)
    if args.streaming:
        return _load_stream(builder, args)
    if builder == DEMO_DATA:
        train, held_out = emoji_splits()
    elif builder in FILE_BUILDERS and not (args.data_files or args.data_dir):
        raise ValueError(f"--dataset_name {args.dataset_name} reads local files, and none were given. Fix: pass "
                         "--data_files train.jsonl (JSON lines, CSV or Parquet rows; see README 'Dataset format'), "
                         "--data_dir for an image folder, or --dataset_name <Hub dataset id>.")
    else:
        loaded = load_dataset(builder, args.dataset_config, data_files=args.data_files, data_dir=args.data_dir)
        train = loaded[args.train_split]
        held_out = loaded[args.eval_split] if args.eval_split else None
        if held_out is None and args.eval_fraction > 0:
            split = train.train_test_split(test_size=args.eval_fraction, seed=seed)
            train, held_out = split["train"], split["test"]
    train, held_out = (_canonical(d, args) if d is not None else None for d in (train, held_out))
    if args.max_train_samples:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if held_out is not None and args.max_eval_samples:
        held_out = held_out.select(range(min(args.max_eval_samples, len(held_out))))
    return train, held_out


def _load_stream(builder: str, args: DataArguments) -> tuple[Any, Any]:
    """``--streaming``: the training split as a stream; the held-out rows (a list's worth) in memory."""
    from datasets import Dataset, load_dataset

    if builder == DEMO_DATA:
        raise ValueError("--streaming reads --dataset_name / --data_files as a stream; the built-in demo data is in "
                         "memory already. Fix: drop --streaming, or pass --dataset_name / --data_files.")
    for flag, value, instead in (
            ("--cache_images", args.cache_images, ""),
            ("--validate_data", args.validate_data, " (with --bad_rows skip, unreadable rows are counted as they come)")):
        if value:
            raise ValueError(f"{flag} reads every training row before training; a --streaming run reads them as it "
                             f"trains. Fix: drop {flag}{instead}, or drop --streaming.")
    if builder in FILE_BUILDERS and not (args.data_files or args.data_dir):
        raise ValueError(f"--dataset_name {builder} reads local files, and none were given. Fix: pass --data_files.")
    loaded = load_dataset(builder, args.dataset_config, data_files=args.data_files, data_dir=args.data_dir,
                          streaming=True)
    train = loaded[args.train_split]
    if args.eval_fraction > 0 and not args.eval_split:
        raise ValueError(f"--eval_fraction {args.eval_fraction}: a stream has no length to take a fraction of. Fix: "
                         "--max_eval_samples N holds out the stream's first N rows (training starts after them), or "
                         "--eval_split names a split.")
    train, held_stream = _canonical(train, args), None
    if args.eval_split:
        held_stream = _canonical(loaded[args.eval_split], args)
        if args.max_eval_samples:
            held_stream = held_stream.take(args.max_eval_samples)
    elif args.max_eval_samples:
        held_stream, train = train.take(args.max_eval_samples), train.skip(args.max_eval_samples)

        if not first_rows(train):
            raise ValueError(f"--max_eval_samples {args.max_eval_samples} held out every row of the stream, so none is "
                             "left to train on. Fix: a smaller --max_eval_samples, or --eval_split.")
    if args.max_train_samples:
        train = train.take(args.max_train_samples)
    held_out = None
    if held_stream is not None:  # the evaluators hold their queries and corpus in memory anyway
        rows = list(held_stream)
        features = getattr(held_stream, "features", None)
        held_out = Dataset.from_list(rows, features=features) if features is not None else Dataset.from_list(rows)
    return train, held_out


# The builder a data file's suffix names, for --data_files without --dataset_name.
SUFFIX_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


def _builder(args: DataArguments) -> str:
    """``--dataset_name``, or for local files given alone the builder their suffix names (never the demo data)."""
    if args.dataset_name != DEMO_DATA or not (args.data_files or args.data_dir):
        return args.dataset_name
    if args.data_dir and not args.data_files:
        raise ValueError(f"--data_dir {args.data_dir} without --dataset_name: say how to read it, e.g. --dataset_name "
                         "imagefolder (or json / csv / parquet for files in that folder).")
    suffixes = {os.path.splitext(f.removesuffix(".gz"))[1].lower() for f in args.data_files}
    builders = {SUFFIX_BUILDERS.get(suffix) for suffix in suffixes}
    if len(builders) != 1 or None in builders:
        raise ValueError(f"--data_files {' '.join(args.data_files)}: cannot tell how to read files ending in "
                         f"{sorted(suffixes)}. Fix: pass --dataset_name json, csv or parquet (suffixes "
                         f"{sorted(SUFFIX_BUILDERS)} are recognised by themselves).")
    builder = builders.pop()
    logger.info("hf_mm_rerank: reading --data_files with the '%s' builder (from their suffix).", builder)
    return builder


def _canonical(dataset: Any, args: DataArguments) -> Any:

    columns = stream_columns(dataset, f"--{args.train_split} split") if is_stream(dataset) else dataset.column_names
    found = list(columns)
    for old, new in ((args.query_column, "query"), (args.positive_column, "positive")):
        if old != new and old in columns:
            dataset = dataset.rename_column(old, new)
            columns = [new if c == old else c for c in columns]
    _check_recipe_columns(columns, args, found)
    root = args.image_root or (os.path.dirname(os.path.abspath(args.data_files[0])) if args.data_files else None)
    if root and dataset.features is None:  # a stream read without a schema: its text cells, as they come
        return dataset.map(lambda row: {c: _rooted(v, root) for c, v in row.items() if isinstance(v, str)})
    string_columns = [c for c, f in dataset.features.items() if getattr(f, "dtype", None) == "string"] if root else []
    if string_columns:
        dataset = dataset.map(lambda row: {c: _rooted(row[c], root) for c in string_columns})
    return dataset


def _check_recipe_columns(columns: list[str], args: DataArguments, found: list[str] | None = None) -> None:
    """Rows a recipe cannot train on are named with the recipe's own flags (before any model is loaded); ``found``:
    the columns as the data has them, before the renames."""
    pointwise = {"query", "document", "label"} <= set(columns)
    if {"query", "positive"} <= set(columns) or pointwise:
        return
    source = " ".join(args.data_files) if args.data_files else args.dataset_name
    missing = [name for name in ("query", "positive") if name not in columns]
    flags = " ".join(f"--{name}_column <your {name} column>" for name in missing)
    raise ValueError(f"{source}: the rows have columns {list(found or columns)}, without {missing}. The recipes train on "
                     "'query' + 'positive' columns (rerankers also on pointwise 'query' + 'document' + 'label'). "
                     f"Fix: name your columns with {flags} (now --query_column {args.query_column} "
                     f"--positive_column {args.positive_column}).")


def _rooted(value: str | None, root: str) -> str | None:
    if value and not os.path.isabs(value):
        candidate = os.path.join(root, value)
        if os.path.isfile(candidate):
            return candidate
    return value


def random_negatives(dataset: Any, num_negatives: int, seed: int = 42) -> Any:
    """Each (query, positive) row gets ``negative_1..k``: other rows' positives drawn at random, never one whose
    content equals its own positive (rows sharing an image or text: a copy would be a false negative) nor two of the
    same content (Arrow-level: images are hashed from their bytes, not decoded)."""
    import random

    from datasets import concatenate_datasets

    size = len(dataset)
    if num_negatives >= size:
        raise ValueError(f"num_negatives={num_negatives} needs more than {num_negatives} rows; the dataset has {size}.")
    order = list(range(size))
    random.Random(seed).shuffle(order)
    slot = {row: t for t, row in enumerate(order)}
    ids = [content_id(cell) for cell in undecoded_images(dataset.select_columns(["positive"]))["positive"]]
    picks: list[list[int]] = []
    for i in range(size):
        # Row order[t] takes the positives of rows order[t + 1], order[t + 2], ... whose contents are new to it.
        chosen, seen = [], {ids[i]}
        for step in range(1, size):
            candidate = order[(slot[i] + step) % size]
            if ids[candidate] not in seen:
                chosen.append(candidate)
                seen.add(ids[candidate])
                if len(chosen) == num_negatives:
                    break
        if len(chosen) < num_negatives:
            raise ValueError(f"row {i}: the dataset has {len(seen)} distinct positives, too few for {num_negatives} "
                             "negatives that differ from the row's positive and from each other. Fix: a smaller "
                             "--num_negatives, or more distinct rows.")
        picks.append(chosen)
    base = dataset.select_columns(["query", "positive"])
    columns = [base]
    for j in range(num_negatives):
        column = base.select([row[j] for row in picks]).flatten_indices().select_columns(["positive"])
        columns.append(column.rename_column("positive", f"negative_{j + 1}"))
    return concatenate_datasets(columns, axis=1)


MIXTURE_KEYS = {"strategy", "alpha", "no_duplicates", "datasets"}
# a dataset's own prompts in the YAML -> the collator's: an embedder's sides, a chat reranker's framing
PROMPT_KEYS = {"query_prompt": "query", "document_prompt": "document", "instruction": "instruction",
               "system_prompt": "system_prompt"}


def load_mixture(args: DataArguments, seed: int = 42) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    """``mixture:`` of the YAML: ``({name: training rows}, held-out rows or None, the Mixing fields)``; each dataset is
    loaded by :func:`load_data` with the recipe's data flags overridden by its own entry."""
    spec = json.loads(args.mixture) if isinstance(args.mixture, str) else args.mixture  # (a flag gives JSON)
    if not isinstance(spec, dict) or not isinstance(spec.get("datasets"), list) or not spec["datasets"]:
        raise ValueError(f"mixture: received {spec!r}; it is a mapping with a non-empty 'datasets' list (in the --config "
                         "YAML). Fix: see --help for mixture, or the README section 'Several datasets at once'.")
    unknown = sorted(set(spec) - MIXTURE_KEYS)
    if unknown:
        raise ValueError(f"mixture: unknown keys {unknown}; use {sorted(MIXTURE_KEYS)}.")
    fields = set(DataArguments.__dataclass_fields__) - {"mixture"}
    sources: dict[str, Any] = {}
    held_out, prompts, weights = None, {}, {}
    for i, entry in enumerate(spec["datasets"]):
        name = str(entry.get("name") or f"dataset_{i}") if isinstance(entry, dict) else None
        bad = sorted(set(entry) - fields - {"name", "weight", *PROMPT_KEYS}) if isinstance(entry, dict) else None
        if name is None or bad or name in sources:
            raise ValueError(f"mixture.datasets[{i}]: received {entry!r}. Each entry is a mapping of a unique name, "
                             f"an optional weight and prompts ({', '.join(PROMPT_KEYS)}), and data flags "
                             f"({', '.join(sorted(fields))}){f'; unknown: {bad}' if bad else ''}.")
        own = replace(args, mixture=None, **{k: v for k, v in entry.items() if k in fields})
        sources[name], rows = load_data(own, seed=seed)
        held_out = held_out if held_out is not None else rows
        given = {PROMPT_KEYS[k]: v for k, v in entry.items() if k in PROMPT_KEYS}
        if given:
            prompts[name] = given
        weights[name] = float(entry.get("weight", 1.0))
    strategy = spec.get("strategy", "weighted" if any(w != 1.0 for w in weights.values()) else "proportional")
    mixing = {"strategy": strategy, "alpha": float(spec.get("alpha", 0.5)),
              "no_duplicates": bool(spec.get("no_duplicates", False)), "prompts": prompts,
              "weights": weights if strategy == "weighted" else None}
    return sources, held_out, mixing


def each_dataset(train: Any, apply: Any) -> Any:
    """``apply(dataset)`` on one training set, or on each of a mixture's (a dict), keeping their names."""
    return {name: apply(d) for name, d in train.items()} if isinstance(train, dict) else apply(train)


def load_training_data(args: DataArguments, seed: int = 42) -> tuple[Any, Any, dict[str, Any] | None]:
    """``(training rows, held-out rows, Mixing fields)``: a mixture's named datasets (``mixture:`` in the YAML), or one
    dataset and None."""
    if args.mixture:
        return load_mixture(args, seed)
    train, held_out = load_data(args, seed)
    return train, held_out, None
