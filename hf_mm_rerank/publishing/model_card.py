"""Model cards for trained bi-encoders and rerankers, rendered from ``templates/model_card.md``.

:func:`card_info` gathers what a card says from a trainer (model, adapter, quantization, loss, arguments,
logged metrics); :func:`render_card` turns that plain dict into the card with ``huggingface_hub.ModelCard``.
The two are separate so a card is reproducible from its info (the golden cards in ``model_cards/``).
A card never holds a token, a local path or a host name: only Hub ids, numbers and settings.
"""

from __future__ import annotations

import json
import os
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from .. import __version__
from ..data.sampling import MixtureDataset
from ..data.schema import ROW_KEY, negative_cells, negative_columns
from ..data.streams import first_rows, is_stream
from .card_usage import library_usage, plain_usage, usage_info
from .serving import serving_lines

TEMPLATE = Path(__file__).parent / "templates" / "model_card.md"
CARD_NAME = "README.md"
CARD_INFO_NAME = "model_card.json"  # the facts the card was rendered from
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_METRIC = re.compile(r"^eval_(?!loss|runtime|samples_per_second|steps_per_second)(.+)$")
PIPELINE_TAGS = {"bi_encoder": "feature-extraction", "multi_vector": "visual-document-retrieval",
                 "cross_encoder": "text-ranking"}
KIND_TEXT = {"bi_encoder": "bi-encoder (embedding model)",
             "multi_vector": "multi-vector bi-encoder (late interaction, MaxSim; ColPali-style)",
             "cross_encoder": "cross-encoder (reranker)"}


def hub_id(name: str | None) -> str | None:
    """``name`` when it looks like a Hub repo id and is not a local folder, else None (never leak a path)."""
    if not name or os.path.isabs(name) or os.path.exists(name) or name.startswith((".", "~")):
        return None
    return name if _HUB_ID.match(name) and ".." not in name else None


def _versions(quantized: bool) -> dict[str, str]:

    out = {"hf_mm_rerank": __version__}
    for name in ["transformers", "peft", "torch", "accelerate", "datasets", "huggingface_hub"] + (
            ["bitsandbytes"] if quantized else []):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def _hardware(world_size: int) -> str:
    import torch

    if torch.cuda.is_available():
        return f"{world_size} x {torch.cuda.get_device_name(0)}"
    return f"{world_size} x CPU ({os.cpu_count()} cores)" if world_size > 1 else f"CPU ({os.cpu_count()} cores)"


def _lora(model: Any) -> dict[str, Any] | None:
    config = getattr(model.backbone, "peft_config", {}).get("default") if model.is_peft else None
    if config is None:
        return None
    from peft.tuners.lora import LoraLayer

    adapted = [name for name, module in model.backbone.named_modules() if isinstance(module, LoraLayer)]
    kinds = sorted({name.rsplit(".", 1)[-1] for name in adapted})
    return {"r": config.r, "alpha": config.lora_alpha, "dropout": config.lora_dropout,
            "targets": f"{', '.join(kinds)} ({len(adapted)} modules)",
            "modules_to_save": sorted(config.modules_to_save or [])}


def _quantization(spec: Any) -> str | None:
    q = spec.quantization
    if not q:
        return None
    if q.get("load_in_4bit"):
        double = ", double quantization" if q.get("bnb_4bit_use_double_quant") else ""
        return f"4-bit {str(q.get('bnb_4bit_quant_type', 'fp4')).upper()}{double}, compute {q.get('bnb_4bit_compute_dtype')}"
    return "8-bit (LLM.int8)" if q.get("load_in_8bit") else None


def _loss(loss: Any) -> dict[str, Any]:
    if loss is None:
        return {"name": "unknown", "params": {}}
    params = {k: v for k, v in vars(loss).items() if not k.startswith("_") and k != "training"
              and isinstance(v, (int, float, str, bool))}
    if hasattr(loss, "temperature") and "temperature" not in params:
        params["temperature"] = round(float(loss.temperature), 4)
    if hasattr(loss, "loss") and hasattr(loss, "dims"):  # Matryoshka
        params["dims"] = loss.dims
        params["inner"] = type(loss.loss).__name__
    return {"name": type(loss).__name__, "params": dict(sorted(params.items()))}


def _pooling(model: Any) -> str | None:
    """The pooling actually used, as a phrase."""
    pooling = getattr(model, "pooling", None)
    if pooling is None:
        return None
    if model.spec.family == "dual_encoder":
        return "the towers' own pooling and projection (get_text_features / get_image_features)"
    return {"last": "last token", "mean": "mean over tokens"}.get(pooling, pooling)


def _negatives(dataset: Any, kind: str) -> str:
    if isinstance(dataset, MixtureDataset):  # each dataset's own
        return "; ".join(f"{name}: {_negatives(d, kind)}" for name, d in dataset.sources.items())
    first = ((first_rows(dataset) or [{}])[0] if is_stream(dataset) else None)
    columns = list(first or getattr(dataset, "column_names", None) or [])
    columns = [c for c in columns if c != ROW_KEY]
    if not columns:
        return "n/a"
    if "document" in columns:
        return "pointwise rows (query, document, label)"
    negatives = negative_columns(columns)
    first = first if first is not None else dataset[0]
    count = len(negative_cells(first, negatives)) if negatives else 0
    prefix = "in-batch + " if kind != "cross_encoder" else ""
    return f"{prefix}{count} negative(s)" if count else "in-batch only"


def _training_rows(trainer: Any, facts: Any, world: int) -> Any:
    dataset = trainer.train_dataset
    if hasattr(dataset, "__len__"):
        return len(dataset)
    read = facts.rows_read  # this process's share of the stream
    if not read:
        return "a stream"
    return f"a stream: {read} rows read" if world == 1 else f"a stream: {read} rows read by process 0 of {world}"


def _eval(history: list[dict[str, Any]], baseline: dict[str, float] | None) -> tuple[dict[str, float], dict[str, float]]:
    """(before, after): the evaluation before training (kept by the trainer, else the first logged one) and the
    last logged one."""
    evals = [{m.group(1): v for k, v in row.items() if (m := _METRIC.match(k)) and isinstance(v, (int, float))}
             for row in history]
    evals = [e for e in evals if e]
    if not evals:
        return {}, {}
    return baseline or (evals[0] if len(evals) > 1 else {}), evals[-1]


def card_info(trainer: Any, *, repo_id: str | None = None, **overrides: Any) -> dict[str, Any]:
    """Everything the card says, as plain data, gathered from a trainer after (or during) training.

    Args:
        trainer: a :class:`BiEncoderTrainer` or :class:`CrossEncoderTrainer`.
        repo_id: the Hub repo the card will live in (used in the usage snippets).
        **overrides: ``license``, ``datasets`` (Hub ids), ``language``, ``model_name``, ``dataset_name``,
            ``base_model`` (the Hub id of a base that was loaded from a local folder), ``gallery`` (the retrieval
            gallery's file name in the folder, shown in the card).
    """
    model = trainer.accelerator.unwrap_model(trainer.model)
    spec, args, state = model.spec, trainer.args, trainer.state
    world = max(1, args.world_size)
    runtime = next((row for row in reversed(state.log_history) if "train_runtime" in row), {})
    facts = trainer.run_facts()  # rows read and skipped, the bad-row rule, the evaluation before training
    before, after = _eval(state.log_history, facts.metrics_before_training)
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else str(model.compute_dtype).replace("torch.", "")
    settings = spec.settings
    info = {
        "kind": spec.kind, "family": spec.family, "adapter": model.is_peft,
        "base_model": hub_id(spec.base_model), "repo_id": repo_id or hub_id(getattr(args, "hub_model_id", None)),
        "quantization": _quantization(spec), "lora": _lora(model),
        "head": settings.get("head"), "pooling": _pooling(model),
        "normalize": getattr(model, "normalize", None),
        "modalities": ["text", "image"] if model.featurizer.supports_images else ["text"],
        "loss": _loss(trainer.loss),
        "training": {
            "global batch": args.per_device_train_batch_size * args.gradient_accumulation_steps * world,
            "negatives per query": _negatives(trainer.train_dataset, spec.kind),
            "epochs": round(float(state.epoch or 0), 2), "steps": state.global_step,
            "learning rate": args.learning_rate, "scheduler": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
            "warmup steps": args.get_warmup_steps(state.max_steps) if state.max_steps else args.warmup_steps,
            "weight decay": args.weight_decay,
            "optimizer": str(getattr(args.optim, "value", args.optim)), "precision": precision,
            "gradient checkpointing": bool(args.gradient_checkpointing), "hardware": _hardware(world),
            "duration": f"{runtime['train_runtime']:.0f} s" if runtime else "n/a",
            "samples/s": round(runtime["train_samples_per_second"], 2) if runtime else "n/a",
            "training rows": _training_rows(trainer, facts, world),
            **({"rows skipped as unreadable (bad_rows='skip')": facts.skipped_rows} if facts.bad_rows == "skip" else {}),
        },
        "eval": {"before": before, "after": after},
        "versions": _versions(bool(spec.quantization)),
        "usage": usage_info(model, args.output_dir),
        "serving": [],
        "license": None, "datasets": [], "language": None, "model_name": None, "dataset_name": None,
    }
    if facts.datasets:  # a mixture: each dataset, its rows and its share of the batches
        info["training"]["datasets (rows, share of the batches)"] = "; ".join(
            f"{name}: {d['rows']} rows, {d['share']:.0%}" for name, d in facts.datasets.items())
    dropped = overrides.pop("dropped_rows", 0)
    if dropped:
        info["training"]["rows dropped by the data check (--validate_data)"] = dropped
    negatives = overrides.pop("negatives", None)  # how the recipe made them: "random", "mined with <model>", ...
    if negatives and info["training"]["negatives per query"] not in ("n/a", "in-batch only"):
        info["training"]["negatives per query"] += f" ({negatives})"
    info.update({k: v for k, v in overrides.items() if v is not None})
    if not info["model_name"] and not info["repo_id"]:
        info["model_name"] = os.path.basename(os.path.normpath(args.output_dir)) or None
    info["base_model"] = hub_id(info["base_model"])  # an override may name the Hub original of a local copy
    info["datasets"] = [d for d in (info["datasets"] or []) if hub_id(d)]

    info["serving"] = serving_lines(model, info["repo_id"] or ".", info["base_model"] or "BASE")
    return info


def _method(info: dict[str, Any]) -> tuple[str, str]:
    if not info["adapter"]:
        return "full fine-tuning", "finetune"
    return ("QLoRA" if info["quantization"] else "LoRA"), "adapter"


def _usage(info: dict[str, Any]) -> tuple[str, str]:

    return library_usage(info), plain_usage(info)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) or "none"
    return str(value)


def _metadata(info: dict[str, Any], relation: str, method: str) -> Any:
    from huggingface_hub import EvalResult, ModelCardData

    kind_tag = {"bi_encoder": "embeddings", "multi_vector": "late-interaction"}.get(info["kind"], "reranker")
    tags = ["hf_mm_rerank", method.lower().replace(" ", "-"), "multimodal", *info["modalities"], kind_tag]
    task = PIPELINE_TAGS[info["kind"]]
    name = info["model_name"] or (info["repo_id"] or "hf_mm_rerank model").split("/")[-1]
    results = [EvalResult(task_type=task, dataset_type=info["dataset_name"] or "custom",
                          dataset_name=info["dataset_name"] or "held-out evaluation set",
                          metric_type=metric.replace("@", "_at_"), metric_name=metric, metric_value=round(value, 4))
               for metric, value in info["eval"]["after"].items()] or None
    return ModelCardData(
        library_name="peft" if info["adapter"] else "transformers", base_model=info["base_model"],
        base_model_relation=relation if info["base_model"] else None, pipeline_tag=task, tags=tags,
        datasets=info["datasets"] or None, license=info["license"], language=info["language"],
        model_name=name if results else None, eval_results=results)


def render_card(info: dict[str, Any]) -> str:
    """The card (YAML metadata + markdown body) for ``info`` as returned by :func:`card_info`."""
    from huggingface_hub import ModelCard

    method, relation = _method(info)
    library, plain = _usage(info)
    kind_text = KIND_TEXT[info["kind"]]
    summary = {"bi_encoder": "Embeds queries and documents (text, images, or both) into one vector space for retrieval.",
               "multi_vector": "Embeds queries and documents (text, images, or both) as one small vector per token or "
                               "image patch; a query scores a document by MaxSim (late interaction).",
               }.get(info["kind"], "Reads a (query, document) pair (text, images, or both on each side) and outputs "
                                   "one relevance score.")
    lora = info["lora"]
    lora_rows = [("rank r", lora["r"]), ("alpha", lora["alpha"]), ("dropout", lora["dropout"]),
                 ("target modules", lora["targets"]), ("modules trained fully", _fmt(lora["modules_to_save"])),
                 ("base weights", info["quantization"] or "unquantized")] if lora else []
    before, after = info["eval"]["before"], info["eval"]["after"]
    eval_rows = [(k, _fmt(before[k]) if k in before else "n/a", _fmt(v)) for k, v in after.items()]
    card = ModelCard.from_template(
        _metadata(info, relation, method), template_path=str(TEMPLATE),
        title=info["model_name"] or (info["repo_id"] or "hf_mm_rerank model").split("/")[-1], summary=summary,
        kind_text=kind_text, base_model_text=f"[{info['base_model']}](https://huggingface.co/{info['base_model']})"
        if info["base_model"] else "a local checkpoint (not on the Hub)",
        method_text=method + (f" ({info['quantization']})" if info["quantization"] else ""),
        head_text=info["head"], modalities=info["modalities"], head=info["head"], pooling=info["pooling"],
        normalize=info["normalize"], adapter=info["adapter"], usage_library=library, usage_plain=plain,
        training_rows=[(k, _fmt(v)) for k, v in info["training"].items()], lora_rows=lora_rows,
        loss=info["loss"], eval_rows=eval_rows, versions=info["versions"], serving=info.get("serving") or [],
        gallery=info.get("gallery"),
        eval_text=f"On {info['dataset_name'] or 'the held-out evaluation set'}, before and after fine-tuning.")
    return str(card)


def write_model_card(trainer: Any, directory: str, **kwargs: Any) -> str:
    """Render the card for ``trainer`` into ``directory/README.md`` (replacing peft's stub) and return its path.

    The facts it was rendered from go beside it as ``model_card.json``: ``render_card(json.load(...))`` gives the
    card again (``scripts/example_cards.sh`` keeps the example cards of ``model_cards/`` checkable that way).
    """
    info = card_info(trainer, **kwargs)
    path = os.path.join(directory, CARD_NAME)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(render_card(info))
    with open(os.path.join(directory, CARD_INFO_NAME), "w", encoding="utf-8") as handle:
        json.dump(info, handle, indent=1)  # key order is the card's row order
        handle.write("\n")
    return path
