"""Where a trained model can be served, and how: the check behind the card's "Serving" section.

For each engine (sentence-transformers 6.2, vLLM, TEI) :func:`serving_targets` says whether it takes the saved folder
as it is, needs an export (:mod:`hf_mm_rerank.publishing.export`), or cannot serve the model, with the command to run and the
prompts and pooling to configure. The engine facts it encodes (verified against their documentation and, for
sentence-transformers, by the test suite):

- vLLM serves LoRA adapters on chat-VLM embedders (``--runner pooling --enable-lora``), but rejects adapters with
  ``modules_to_save`` weights and ignores LoRA on vision towers where it is not implemented; yes/no rerankers run as
  ``*ForSequenceClassification`` (an export, or ``hf_overrides`` with ``classifier_from_token``); a trained score
  head outside the model needs the ``classifier`` export;
- TEI serves text-only models from merged weights;
- sentence-transformers reads the configuration written beside every save (:mod:`.modeling.st_format`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..modeling.backbone import CHAT, DUAL, vision_roots

EXPORT = "python -m hf_mm_rerank.publishing.export_cli {model} {out} --format {format}"


@dataclass
class ServingTarget:
    engine: str
    status: str  # "as is", "export" or "no"
    how: str  # the command (or code) to run
    note: str = ""


def adapter_facts(model: Any) -> dict[str, Any]:
    """What an engine's LoRA support depends on: vision-tower targets and ``modules_to_save``."""
    if not model.is_peft:
        return {"adapter": False, "vision_targets": [], "modules_to_save": [], "rank": None}
    config = model.backbone.peft_config["default"]
    roots = vision_roots(model.base_model)
    targets = config.target_modules if isinstance(config.target_modules, (list, set, tuple)) else []
    adapted = [name for name, module in model.backbone.named_modules() if hasattr(module, "lora_A")]
    vision = sorted({root for root in roots for name in adapted if f".{root}." in f".{name}."}) or \
        sorted({t for t in targets if any(str(t).startswith(root) for root in roots)})
    return {"adapter": True, "vision_targets": vision, "modules_to_save": sorted(config.modules_to_save or []),
            "rank": config.r}


def serving_targets(model: Any, model_ref: str = "MODEL", base_ref: str = "BASE",
                    exported: str | None = None, notes: list[str] | None = None) -> list[ServingTarget]:
    """The engines for ``model`` (saved at ``model_ref``, on ``base_ref``); ``exported`` names the export format when
    ``model`` is described as that export, whose sentence-transformers ``notes`` replace the saved folder's."""
    facts = adapter_facts(model)
    family, kind = model.spec.family, model.kind
    head = getattr(model, "head_type", None)
    out = "OUT"
    targets = [_sentence_transformers(model, model_ref, exported, notes)]
    # vLLM
    if kind == "multi_vector":
        source = model_ref if exported == "merged" or not facts["adapter"] else out
        targets.append(ServingTarget("vLLM", "as is" if source == model_ref else "export",
                                     _with_export(model_ref, out, "merged", source, f"vllm serve {source} --runner pooling"),
                                     "late-interaction models are served merged, not as LoRA (token embeddings: the "
                                     "`token_embed` task); hf_mm_rerank has not run this"))
    elif kind == "bi_encoder" and family == CHAT:
        pooling = "" if model.pooling == "last" else " --pooler-config '{\"pooling_type\": \"MEAN\"}'"
        prompt = model.featurizer.prompts.get("query")
        note = (f"send queries as chat messages with the system turn {prompt!r} (the embeddings API takes `messages`)"
                if prompt else "inputs as chat messages: the image, then the text, in the user turn")
        problems = _lora_problems(facts)
        if facts["adapter"] and not problems and not exported:
            targets.append(ServingTarget("vLLM", "as is", f"vllm serve {base_ref} --runner pooling --enable-lora "
                                         f"--max-lora-rank {facts['rank']} --lora-modules adapter={model_ref}{pooling}",
                                         note))
        else:
            source = model_ref if exported == "merged" or not facts["adapter"] else out
            reason = f"merged weights: {problems}" if problems else "merged weights"
            targets.append(ServingTarget("vLLM", "as is" if source == model_ref else "export",
                                         _with_export(model_ref, out, "merged", source,
                                                      f"vllm serve {source} --runner pooling{pooling}"), f"{reason}; {note}"))
    elif kind == "cross_encoder" and head in ("yes_no", "linear", "classification") and family != DUAL:
        ready = exported == "classifier" or head == "classification" and not facts["adapter"] and \
            model.config.num_labels == 1
        source = model_ref if ready else out
        targets.append(ServingTarget("vLLM", "as is" if source == model_ref else "export",
                                     _with_export(model_ref, out, "classifier", source,
                                                  f"vllm serve {source} --runner pooling"),
                                     "one logit per pair (`/score`, `/rerank`; vLLM applies a sigmoid); pairs rendered "
                                     "with the pair prompt recorded in hf_mm_rerank_config.json"))
    else:
        reason = ("an mlp head has no *ForSequenceClassification form" if head == "mlp" else
                  "hf_mm_rerank has not checked vLLM's support for this architecture")
        targets.append(ServingTarget("vLLM", "no", "", reason))
    # TEI
    if model.featurizer.supports_images:
        targets.append(ServingTarget("TEI", "no", "", "TEI is text-only; this model takes images"))
    else:
        source = model_ref if exported in ("merged", "classifier") or not facts["adapter"] else out
        targets.append(ServingTarget("TEI", "as is" if source == model_ref else "export",
                                     _with_export(model_ref, out, "classifier", source,
                                                  f"text-embeddings-router --model-id {source}"),
                                     "merged weights, one logit (`/rerank`)"))
    return targets


def _lora_problems(facts: dict[str, Any]) -> str:
    problems = []
    if facts["modules_to_save"]:
        problems.append(f"vLLM rejects modules_to_save weights ({', '.join(facts['modules_to_save'])})")
    if facts["vision_targets"]:
        problems.append(f"LoRA on the vision tower ({', '.join(facts['vision_targets'])}) is not served as an adapter")
    return "; ".join(problems)


def _with_export(model_ref: str, out: str, format: str, source: str, command: str) -> str:
    if source == model_ref:
        return command
    return f"{EXPORT.format(model=model_ref, out=out, format=format)} && {command}"


def _sentence_transformers(model: Any, model_ref: str, exported: str | None,
                           notes: list[str] | None = None) -> ServingTarget:
    notes = list(model.spec.sentence_transformers or []) if notes is None else list(notes)
    if exported in ("merged", "classifier"):
        return ServingTarget("sentence-transformers", "export",
                             f"{EXPORT.format(model=model_ref, out='OUT', format='sentence-transformers')}",
                             "this export has no sentence-transformers configuration")
    if model.kind == "multi_vector" and model.spec.family == DUAL:  # no layout is written: st_format says why
        return ServingTarget("sentence-transformers", "no", "", "; ".join(notes))
    loader = {"bi_encoder": "SentenceTransformer", "multi_vector": "MultiVectorEncoder"}.get(model.kind, "CrossEncoder")
    how = (f"from sentence_transformers import {loader}; model = {loader}({model_ref!r})" if model_ref != "MODEL" else
           f"from sentence_transformers import {loader}; model = {loader}(MODEL)")
    if model.kind != "cross_encoder":
        how += "; model.encode_query([...]); model.encode_document([...])"
    else:
        how += "; model.predict([(query, document), ...])  # raw logits, as hf_mm_rerank's score()"
    return ServingTarget("sentence-transformers", "as is", how, "; ".join(notes))


def serving_lines(model: Any, model_ref: str = "MODEL", base_ref: str = "BASE",
                  exported: str | None = None, notes: list[str] | None = None) -> list[str]:
    """The card's "Serving" section as markdown lines."""
    lines = ["| engine | takes | how |", "|---|---|---|"]
    for target in serving_targets(model, model_ref, base_ref, exported, notes):
        status = {"as is": "this folder as it is", "export": "an export", "no": "not served"}[target.status]
        how = f"`{target.how}`" if target.how else ""
        note = f" ({target.note})" if target.note else ""
        lines.append(f"| {target.engine} | {status} | {how}{note} |")
    settings = {k: model.spec.settings.get(k) for k in ("pooling", "prompts", "prompt", "head", "max_pixels")
                if model.spec.settings.get(k) not in (None, {}, "")}
    lines += ["", f"Settings to configure in any engine: `{json.dumps(settings, sort_keys=True)}`."]
    return lines
