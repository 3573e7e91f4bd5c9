"""Where a trained model can be served, and how: the check behind the card's "Serving" section.

For each engine (sentence-transformers 6.2, vLLM, TEI) :func:`serving_targets` says whether it takes the saved folder
as it is, needs an export (:mod:`hf_mm_rerank.publishing.export`), or cannot serve the model, with the command to run and the
prompts and pooling to configure. The engine facts it encodes (verified against their documentation and, for
sentence-transformers, by the test suite):

- vLLM (0.32, run by ``tests/test_vllm.py`` on the CPU, each engine's outputs compared with this library's to 1e-5 of
  their scale): :func:`vllm_recipes` says which folder it loads, with which ``LLM(...)`` arguments / ``vllm serve``
  flags, and the test that runs exactly those; what it cannot serve is named with the test that shows it;
- TEI serves text-only models from merged weights;
- sentence-transformers reads the configuration written beside every save (:mod:`.modeling.st_format`).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from typing import Any

from ..modeling.backbone import CHAT, DUAL, vision_roots

EXPORT = "python -m hf_mm_rerank.publishing.export_cli {model} {out} --format {format}"


@dataclass
class ServingTarget:
    engine: str
    status: str  # "as is", "export", "no" or "unchecked" (no test ran the engine on this kind of model)
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
    out = "OUT"
    targets = [_sentence_transformers(model, model_ref, exported, notes)]
    targets.append(_vllm_target(model, model_ref, base_ref, exported, facts))
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


VLLM_TESTS = "tests/test_vllm.py"  # the tests that run every vLLM line below (vLLM 0.32 on the CPU)
# Chat VLMs whose serving by vLLM those tests run: model_type -> (LLM arguments the embedder needs, the test).
VLLM_CHAT = {"qwen2_vl": ({}, "test_qwen2_vl"),
             "qwen2_5_vl": ({"convert": "embed"}, "test_qwen2_5_vl_and_qwen3_vl"),
             "qwen3_vl": ({"convert": "embed"}, "test_qwen2_5_vl_and_qwen3_vl")}
VLLM_BARE = {"qwen2_vl"}  # a full fine-tune's folder (its bare *Model) loads as it is (the others: the merged export)
VLLM_DUAL = {"clip": "test_dual_encoders", "siglip": "test_dual_encoders"}
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the --max-lora-rank values vLLM 0.32 accepts (4 is refused)
VLLM_FLAGS_TESTED = "the tests add dtype='float32', enforce_eager=True, max_model_len=512 (CPU, tiny models)"


@dataclass
class VllmRecipe:
    """How vLLM serves a folder: ``LLM(model=..., **engine)`` or ``vllm serve`` with the same arguments, the task to
    call, and the test that runs exactly this (its outputs compared with hf_mm_rerank's)."""

    source: str  # the folder vLLM loads (for LoRA: the adapter folder)
    task: str  # "embed", "classify" or "token_embed"
    engine: dict[str, Any]
    test: str
    export: str | None = None  # the export to write first (None: the folder as it is)
    base: str | None = None  # for LoRA: the base model vLLM loads
    inputs: str = ""  # how requests are made

    @property
    def model(self) -> str:
        return self.base if self.base else self.source

    def llm_line(self) -> str:
        args = ", ".join([f"model={self.model!r}", *(f"{k}={v!r}" for k, v in self.engine.items())])
        return f"LLM({args})"

    def serve_line(self) -> str:
        words = ["vllm", "serve", shlex.quote(self.model)]
        for key, value in self.engine.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                words.append(flag)
            else:
                words += [flag, shlex.quote(json.dumps(value) if isinstance(value, (dict, list)) else str(value))]
        if self.base:
            words += ["--lora-modules", shlex.quote(f"adapter={self.source}")]
        return " ".join(words)

    def call_line(self) -> str:
        lora = ', lora_request=LoRARequest("adapter", 1, ADAPTER)' if self.base else ""
        if self.task == "classify":  # raw logits, as hf_mm_rerank's score() (vLLM's default adds a sigmoid)
            return f"llm.classify(prompts, pooling_params=PoolingParams(use_activation=False){lora})"
        if self.task == "token_embed":  # every token's vector; score by MaxSim
            return f'llm.encode(prompts, pooling_task="token_embed"{lora})'
        return f"llm.embed(prompts{lora})"


def _pixels(model: Any) -> dict[str, Any]:
    """The trained pixel budget as vLLM's ``mm_processor_kwargs`` (Qwen-VL processors)."""
    grid = model.featurizer._patch_grid() if hasattr(model.featurizer, "_patch_grid") else None
    return {"mm_processor_kwargs": {"min_pixels": grid[1], "max_pixels": grid[2]}} if grid else {}


def _chat_inputs(model: Any) -> str:
    prompts = model.featurizer.prompts
    system = (f"the side's prompt as the system turn ({', '.join(f'{k}: {v!r}' for k, v in prompts.items())}), then "
              if prompts else "")
    return ("prompts: `{\"prompt\": processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), "
            "\"multi_modal_data\": {\"image\": image}}` (no `multi_modal_data` for text), the messages: "
            f"{system}one user turn holding the image (`{{\"type\": \"image\"}}`) and then the text "
            "(`{\"type\": \"text\", \"text\": ...}`), whichever the input has")


def vllm_recipes(model: Any, model_ref: str = "MODEL", base_ref: str = "BASE",
                 exported: str | None = None) -> tuple[list[VllmRecipe], str, str]:
    """(recipes, why not, the test behind it) for ``model`` saved at ``model_ref`` (described as the export
    ``exported``). No recipe: the reason, and the test showing it (empty when no test ran vLLM on this kind of model)."""
    facts = adapter_facts(model)
    family, kind = model.spec.family, model.kind
    model_type = getattr(model.config, "model_type", None)
    head = getattr(model, "head_type", None)
    out = "OUT"
    if kind == "multi_vector":
        return _late_interaction(model, model_ref, exported)
    if kind == "bi_encoder" and family == CHAT:
        if model_type not in VLLM_CHAT:
            return [], f"hf_mm_rerank's tests have not run vLLM on {model_type}", ""
        needs, test = VLLM_CHAT[model_type]
        engine = {"runner": "pooling", **needs}
        pooler = {**({"pooling_type": "MEAN"} if model.pooling == "mean" else {}),
                  **({"use_activation": False} if not model.normalize else {})}
        if pooler:
            engine["pooler_config"] = pooler
        engine.update(_pixels(model))
        inputs = _chat_inputs(model)
        if exported in ("merged", "sentence-transformers") or (
                exported is None and not facts["adapter"] and model_type in VLLM_BARE):
            return [VllmRecipe(model_ref, "embed", engine, test, inputs=inputs)], "", test
        if exported == "lora" or (exported is None and facts["adapter"] and not facts["modules_to_save"]):
            rank = next(r for r in LORA_RANKS if r >= facts["rank"]) if facts["rank"] else 8
            lora = {"enable_lora": True, "max_lora_rank": rank,
                    **({"enable_tower_connector_lora": True} if facts["vision_targets"] else {})}
            lora_engine = {"runner": "pooling", **needs, **lora, **{k: v for k, v in engine.items()
                                                                      if k not in ("runner", *needs)}}
            source = model_ref if exported == "lora" else out
            recipes = [VllmRecipe(source, "embed", lora_engine, test, None if exported else "lora", base_ref, inputs)]
            if not exported:
                recipes.append(VllmRecipe(out, "embed", engine, test, "merged", inputs=inputs))
            return recipes, "", test
        return [VllmRecipe(out, "embed", engine, test, "merged", inputs=inputs)], "", test
    if kind == "bi_encoder":  # dual encoders
        if model_type not in VLLM_DUAL:
            reason = (f"vLLM 0.32 has no {type(model.base_model).__name__} in its registry, and its Transformers "
                      "fallback fails to load the folder ('VisionTextDualEncoderProcessor' object has no attribute "
                      "'_get_num_multimodal_tokens')"
                      if model_type == "vision-text-dual-encoder" else
                      f"hf_mm_rerank's tests have not run vLLM on {model_type}")
            return [], reason, "test_dual_encoders" if model_type == "vision-text-dual-encoder" else ""
        test = VLLM_DUAL[model_type]
        engine = {"runner": "pooling", **({"pooler_config": {"use_activation": False}} if not model.normalize else {})}
        prompts = model.featurizer.prompts
        inputs = ("prompts: the text" + (f" after the side's prompt ({', '.join(f'{k}: {v!r}' for k, v in prompts.items())})"
                                         if prompts else "") +
                  ", or `{\"prompt\": \"\", \"multi_modal_data\": {\"image\": image}}` (an input with both text and an "
                  "image is averaged by hf_mm_rerank; embed the two and average them)")
        if model_type == "siglip":
            inputs += ("; images only: vLLM embeds a SigLIP text unpadded (as transformers does without padding), while "
                       "hf_mm_rerank pads texts to the tokenizer's max length as SigLIP was trained, so its text "
                       "embeddings differ from this model's (padded token ids do not give them either)")
        source, export_format = (model_ref, None) if exported in ("merged", "sentence-transformers") else (out, "merged")
        return [VllmRecipe(source, "embed", engine, test, export_format, inputs=inputs)], "", test
    if kind == "cross_encoder" and head in ("yes_no", "linear") and family == CHAT:
        if model_type not in VLLM_CHAT:
            return [], f"hf_mm_rerank's tests have not run vLLM on {model_type}", ""
        test = VLLM_CHAT[model_type][1]
        engine = {"runner": "pooling", **_pixels(model)}
        inputs = ("prompts: each pair rendered with the pair prompt recorded in hf_mm_rerank_config.json (the "
                  "transformers snippet's `text`), with the pair's image as `multi_modal_data`")
        source, export_format = (model_ref, None) if exported == "classifier" else (out, "classifier")
        recipes = [VllmRecipe(source, "classify", engine, test, export_format, inputs=inputs)]
        if head == "yes_no" and exported in (None, "merged"):
            yes, no = model.spec.settings.get("yes_token", "yes"), model.spec.settings.get("no_token", "no")
            name = _classifier_name(model)
            overrides = {"architectures": [name], "classifier_from_token": [no, yes], "method": "from_2_way_softmax",
                         "text_config": {"tie_word_embeddings": False}}  # vLLM reads it from the text config
            recipes.append(VllmRecipe(model_ref if exported == "merged" else out, "classify",
                                      {"runner": "pooling", "hf_overrides": overrides, **_pixels(model)}, test,
                                      None if exported == "merged" else "merged", inputs=inputs))
        return recipes, "", test
    if head == "mlp":
        return [], "an mlp head has no *ForSequenceClassification form", ""
    return [], "hf_mm_rerank's tests have not run vLLM on this kind of model", ""


LATE_INTERACTION_TEST = "test_multi_vector_qwen3_vl"
# The architecture vLLM 0.32's late-interaction runner loads a chat VLM's multi-vector model as (its
# ``*ForConditionalGeneration`` weights plus a top-level ``custom_text_proj``: the merged export writes it). Qwen2-VL and
# Qwen2.5-VL have none there: colpali-engine's ColQwen2 layout is absent from its registry.
VLLM_LATE_INTERACTION = {"qwen3_vl": "ColQwen3"}


def _late_interaction(model: Any, model_ref: str, exported: str | None) -> tuple[list[VllmRecipe], str, str]:
    """A multi-vector model: its merged export in the ColQwen3 layout (Qwen3-VL), whose ``token_embed`` gives every
    token's vector; the others have no layout vLLM 0.32 loads."""
    model_type = getattr(model.config, "model_type", None)
    if model.spec.family != CHAT or model_type not in VLLM_LATE_INTERACTION:
        runner = (f"vLLM 0.32's late-interaction runner loads {', '.join(VLLM_LATE_INTERACTION.values())} (Qwen3-VL), "
                  "ColPali (PaliGemma), ColQwen3.5 and ColBERT layouts (its registry, not run here)")
        missing = ("it serves no multi-vector dual encoder" if model.spec.family != CHAT else
                   f"it has no layout for a multi-vector {model_type} model (colpali-engine's ColQwen2 is absent)")
        return [], f"{runner}; {missing}", ""
    engine = {"runner": "pooling", **_pixels(model)}
    scored = model.featurizer.scored_tokens == "all" or model.featurizer.template == "colpali"
    inputs = _chat_inputs(model) + ("; vLLM returns every token's vector (L2-normalised), as this model scores them"
                                    if scored else
                                    "; vLLM returns every token's vector (L2-normalised), the chat template's too, "
                                    "while this model scores only the input's own tokens (scored_tokens='content'): "
                                    "MaxSim over vLLM's vectors differs unless the template's tokens are dropped "
                                    "(train with scored_tokens='all' to serve it as it is)")
    source, export_format = (model_ref, None) if exported == "merged" else ("OUT", "merged")
    return [VllmRecipe(source, "token_embed", engine, LATE_INTERACTION_TEST, export_format, inputs=inputs)], "", \
        LATE_INTERACTION_TEST


def _classifier_name(model: Any) -> str:
    names = getattr(model.base_model.config, "architectures", None) or [type(model.base_model).__name__]
    name = names[0]
    for suffix in ("ForConditionalGeneration", "ForCausalLM", "Model"):
        if name.endswith(suffix):
            return name[: -len(suffix)] + "ForSequenceClassification"
    return name


def _vllm_target(model: Any, model_ref: str, base_ref: str, exported: str | None,
                 facts: dict[str, Any]) -> ServingTarget:
    recipes, reason, test = vllm_recipes(model, model_ref, base_ref, exported)
    if not recipes:
        checked = f"; checked by hf_mm_rerank's {VLLM_TESTS}::{test}" if test else ""
        status = "no" if test or "mlp" in reason else "unchecked"
        return ServingTarget("vLLM", status, "", reason + checked)
    first = recipes[0]
    how = first.serve_line()
    if first.export:
        how = f"{EXPORT.format(model=model_ref, out='OUT', format=first.export)} && {how}"
    notes = []
    if first.base:
        notes.append("the adapter re-keyed for vLLM's LoRA (`--format lora`): vLLM ignores adapters in the layout "
                     "training saves, without an error")
    if facts["modules_to_save"] and not exported:
        notes.append(f"vLLM's LoRA refuses modules_to_save ({', '.join(facts['modules_to_save'])}): the merged export")
    notes.append(f"checked by hf_mm_rerank's {VLLM_TESTS}::{first.test}")
    return ServingTarget("vLLM", "as is" if first.export is None else "export", how, "; ".join(notes))


def vllm_lines(model: Any, model_ref: str = "MODEL", base_ref: str = "BASE", exported: str | None = None) -> list[str]:
    """The card's vLLM paragraph: every line the tests ran for this kind of model, offline and served."""
    recipes, reason, test = vllm_recipes(model, model_ref, base_ref, exported)
    if not recipes:
        return []
    lines = ["", f"vLLM 0.32: hf_mm_rerank's `{VLLM_TESTS}::{test}` runs each `LLM(...)` line below on a tiny model of "
             "this family, on the CPU, and gets this kind of model's outputs to 1e-5 of their scale "
             f"({VLLM_FLAGS_TESTED}); each `vllm serve` line is parsed by vLLM's own `serve` parser into those same "
             "engine arguments (no server is started):", ""]
    for recipe in recipes:
        first = (f"`{EXPORT.format(model=model_ref, out='OUT', format=recipe.export)}`, then " if recipe.export
                 else "")
        lines.append(f"- {first}`{recipe.llm_line()}`, `{recipe.call_line()}`; served: `{recipe.serve_line()}`")
    lines.append(f"- {recipes[0].inputs}.")
    return lines


def _with_export(model_ref: str, out: str, format: str, source: str, command: str) -> str:
    if source == model_ref:
        return command
    return f"{EXPORT.format(model=model_ref, out=out, format=format)} && {command}"


def _sentence_transformers(model: Any, model_ref: str, exported: str | None,
                           notes: list[str] | None = None) -> ServingTarget:
    notes = list(model.spec.sentence_transformers or []) if notes is None else list(notes)
    if exported and model.kind == "multi_vector":  # the trained folder loads there; an export of it cannot be made
        return ServingTarget("sentence-transformers", "no", "", "this export has no sentence-transformers "
                             "configuration; the folder it was exported from loads in sentence-transformers' "
                             "MultiVectorEncoder")
    if exported in ("merged", "classifier", "lora"):
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
        status = {"as is": "this folder as it is", "export": "an export", "no": "not served",
                  "unchecked": "not checked"}[target.status]
        how = f"`{target.how}`" if target.how else ""
        note = f" ({target.note})" if target.note else ""
        lines.append(f"| {target.engine} | {status} | {how}{note} |")
    lines += vllm_lines(model, model_ref, base_ref, exported)
    settings = {k: model.spec.settings.get(k) for k in ("pooling", "prompts", "prompt", "head", "max_pixels")
                if model.spec.settings.get(k) not in (None, {}, "")}
    lines += ["", f"Settings to configure in any engine: `{json.dumps(settings, sort_keys=True)}`."]
    return lines
