"""sentence-transformers' own configuration, written beside every saved model, so that sentence-transformers 6.2's
``SentenceTransformer(folder)`` and ``CrossEncoder(folder)`` compute what :class:`BiEncoder.encode` and
:meth:`CrossEncoder.score` compute: the module list (``modules.json``), the model's processing
(``sentence_bert_config.json``: modalities, chat template, pixel budget, text truncation), pooling as used,
normalisation, the query/document prompts, the similarity function and, for rerankers, raw logits (no sigmoid).

Only ``sentence_transformers.*`` modules are named (anything else needs ``trust_remote_code``), and nothing is added to
the files ``save_pretrained`` already writes. What sentence-transformers cannot express is listed by
:func:`st_layout` and recorded in ``hf_mm_rerank_config.json`` and the model card.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from safetensors.torch import save_file

from .backbone import DUAL
from .spec import base_reference

ST_MODULES = {
    "transformer": "sentence_transformers.base.modules.transformer.Transformer",
    "pooling": "sentence_transformers.sentence_transformer.modules.pooling.Pooling",
    "normalize": "sentence_transformers.base.modules.normalize.Normalize",
    "dense": "sentence_transformers.base.modules.dense.Dense",
    "logit_score": "sentence_transformers.cross_encoder.modules.logit_score.LogitScore",
    "multi_vector_mask": "sentence_transformers.multi_vector_encoder.modules.multi_vector_mask.MultiVectorMask",
}
ST_CONFIG_FILES = ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json")
IDENTITY = "torch.nn.modules.linear.Identity"
# A dual encoder's multi-vector folder gets no sentence-transformers configuration, and this file says why instead.
NO_ST_FILE = "SENTENCE_TRANSFORMERS.md"
DUAL_MULTI_VECTOR_REASON = (
    "sentence-transformers (6.3) MultiVectorEncoder cannot encode a dual encoder's image patches (it needs an "
    "attention_mask for every batch and the image processor gives none: KeyError 'attention_mask'), so this folder has "
    "no sentence-transformers configuration (an empty module list would fail to load): encode with "
    "hf_mm_rerank.MultiVectorEncoder.from_pretrained(folder) (chat-VLM multi-vector folders do load there)")


def _forward(output: str) -> dict[str, str]:
    return {"method": "forward", "method_output_name": output}


def _chat_modalities(output: str) -> dict[str, Any]:
    return {"text": _forward(output), "image": _forward(output), "message": {**_forward(output), "format": "structured"}}


class _Layout:
    """The files of one sentence-transformers layout: modules in order, each with its config and weights."""

    def __init__(self) -> None:
        self.modules: list[dict[str, Any]] = []
        self.files: dict[str, Any] = {}

    def add(self, kind: str, config: dict[str, Any] | None = None, weights: dict[str, torch.Tensor] | None = None,
            name: str | None = None) -> None:
        index = len(self.modules)
        path = "" if kind == "transformer" else f"{index}_{name or kind.title().replace('_', '')}"
        self.modules.append({"idx": index, "name": str(index), "path": path, "type": ST_MODULES[kind]})
        if config is not None:
            self.files[os.path.join(path, "config.json") if path else "sentence_bert_config.json"] = config
        if weights is not None:
            self.files[os.path.join(path, "model.safetensors")] = weights


def st_layout(model: Any, directory: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """``({relative path: JSON object, tensors or text}, [what sentence-transformers does differently])`` for ``model``
    (a :class:`BiEncoder` or :class:`CrossEncoder`) saved in ``directory``."""

    layout, limits = _Layout(), []
    featurizer, spec = model.featurizer, model.spec
    if featurizer.fast_decode:
        limits.append("fast_decode=True: images were decoded at reduced scale and pre-shrunk here; sentence-transformers "
                      "hands the original to the processor (embeddings differ by about 5e-3 of their scale)")
    if model.is_peft and base_reference(str(spec.base_model), directory or ".").startswith("./"):
        limits.append("the adapter's base model is stored inside this folder, which sentence-transformers looks for "
                      "from the working directory: run from inside the folder, or load the sentence-transformers export "
                      "(python -m hf_mm_rerank.publishing.export_cli FOLDER OUT --format sentence-transformers)")
    if spec.quantization:
        limits.append("trained on a 4/8-bit base: sentence-transformers loads the base in full precision, as the "
                      "merged export does (the card states the measured difference)")
    if model.kind == "multi_vector":
        config = _multi_vector(model, layout, limits)
    elif model.kind == "bi_encoder":
        config = _bi_encoder(model, layout, limits)
    else:
        config = _cross_encoder(model, layout, limits)
    if config is not None:
        layout.files["modules.json"] = layout.modules
        layout.files["config_sentence_transformers.json"] = config
    return layout.files, limits


def _bi_encoder(model: Any, layout: _Layout, limits: list[str]) -> dict[str, Any]:
    featurizer = model.featurizer
    prompts = {"query": featurizer.prompts.get("query", ""), "document": featurizer.prompts.get("document", "")}
    if model.spec.family == DUAL:
        text = {"padding": featurizer._padding(), "truncation": True}
        if featurizer._max_length():
            text["max_length"] = featurizer._max_length()
        layout.add("transformer", {
            "transformer_task": "feature-extraction",
            "modality_config": {"text": {"method": "get_text_features", "method_output_name": "pooler_output"},
                                "image": {"method": "get_image_features", "method_output_name": "pooler_output"}},
            "module_output_name": "sentence_embedding", "processing_kwargs": {"text": text}})
        limits.append("an input holding both text and an image (the two towers' embeddings averaged here) is refused "
                      "by sentence-transformers: embed the text and the image separately")
    else:
        layout.add("transformer", {
            "transformer_task": "feature-extraction", "modality_config": _chat_modalities("last_hidden_state"),
            "module_output_name": "token_embeddings", "processing_kwargs": _chat_processing(featurizer)})
        layout.add("pooling", {"embedding_dimension": _hidden_size(model),
                               "pooling_mode": "lasttoken" if model.pooling == "last" else "mean", "include_prompt": True})
        limits.append("a {'image': ..., 'text': ...} input must list the image first, as here (sentence-transformers "
                      "keeps the dict's order)")
    if model.normalize:
        layout.add("normalize", {"module_input_name": "sentence_embedding", "module_output_name": "sentence_embedding"})
    return {"model_type": "SentenceTransformer", "prompts": prompts, "default_prompt_name": None,
            "similarity_fn_name": "cosine" if model.normalize else "dot"}


def _multi_vector(model: Any, layout: _Layout, limits: list[str]) -> dict[str, Any] | None:
    """Transformer -> Dense (the token projection) -> MultiVectorMask -> Normalize, sentence-transformers 6's
    MultiVectorEncoder layout (chat VLMs); None for a dual encoder, which has none (see DUAL_MULTI_VECTOR_REASON)."""
    featurizer = model.featurizer
    prompts = {"query": featurizer.prompts.get("query", ""), "document": featurizer.prompts.get("document", "")}
    if model.spec.family == DUAL:  # no layout at all: an empty module list fails to load, a partial one misleads
        limits.append(DUAL_MULTI_VECTOR_REASON)
        layout.files[NO_ST_FILE] = _no_st_note()
        return None
    if featurizer.template == "colpali":
        limits.append("template='colpali' (raw text queries, a fixed visual prompt) is rendered through the chat "
                      "template by sentence-transformers")
    if featurizer.scored_tokens == "content":
        limits.append("scored_tokens='content' leaves the chat template's tokens out of MaxSim; sentence-transformers "
                      "scores every attended token (save with scored_tokens='all' for equal scores)")
    if featurizer.query_augmentation:
        limits.append("query augmentation tokens are appended here; sentence-transformers' query expansion does not "
                      "combine with chat backbones")
    layout.add("transformer", {
        "transformer_task": "feature-extraction", "modality_config": _chat_modalities("last_hidden_state"),
        "module_output_name": "token_embeddings", "processing_kwargs": _chat_processing(featurizer)})
    projection = model._projection("custom_text_proj")
    if hasattr(projection, "modules_to_save"):  # peft's wrapper: the trained copy
        projection = projection.modules_to_save[next(iter(projection.modules_to_save))]
    state = {k: v.detach().float().cpu().contiguous() for k, v in projection.state_dict().items()}
    layout.add("dense", _dense_config(projection.in_features, projection.out_features, True, IDENTITY,
                                      "token_embeddings", "token_embeddings"),
               {"linear.weight": state["weight"], "linear.bias": state["bias"]})
    layout.add("multi_vector_mask", {"skiplist_words": [], "skiplist_tasks": ["document"], "keep_only_token_ids": None})
    layout.add("normalize", {"module_input_name": "token_embeddings", "module_output_name": "token_embeddings"})
    return {"model_type": "MultiVectorEncoder", "prompts": prompts, "default_prompt_name": None,
            "similarity_fn_name": "maxsim"}


def _no_st_note() -> str:
    return (f"# Not a sentence-transformers folder\n\nThere is no `modules.json` here: {DUAL_MULTI_VECTOR_REASON}.\n\n"
            "```python\nfrom hf_mm_rerank import MultiVectorEncoder\n\n"
            "model = MultiVectorEncoder.from_pretrained(\"FOLDER\")\n"
            "model.score(model.encode([\"a query\"]), model.encode([image], side=\"document\"))  # MaxSim\n```\n")


def _cross_encoder(model: Any, layout: _Layout, limits: list[str]) -> dict[str, Any]:
    featurizer, head = model.featurizer, model.head_type
    if head == "classification":
        limit = featurizer.max_length or getattr(featurizer.tokenizer, "model_max_length", None)
        limit = limit if limit and limit < 100_000 else 512
        layout.add("transformer", {
            "transformer_task": "sequence-classification", "modality_config": {"text": _forward("logits")},
            "module_output_name": "scores", "config_kwargs": {"num_labels": int(model.config.num_labels)},
            "processing_kwargs": {"text": {"truncation": "only_second", "max_length": limit}}})
        if model.config.num_labels == 2:  # score = logit[1] - logit[0]
            layout.add("dense", _dense_config(2, 1, False, IDENTITY, "scores", "scores"),
                       {"linear.weight": torch.tensor([[-1.0, 1.0]])})
        limits.append(f"a query longer than {3 * limit // 4} tokens is cut to that here first; sentence-transformers "
                      "cuts only the document (pairs within the limit are the same)")
    elif head == "yes_no":
        task = "any-to-any" if getattr(model.config, "vision_config", None) is not None else "text-generation"
        layout.add("transformer", {
            "transformer_task": task, "modality_config": _chat_modalities("logits"),
            "module_output_name": "causal_logits", "processing_kwargs": _chat_processing(featurizer),
            "processor_kwargs": {"chat_template": pair_template(featurizer)}})
        yes, no = model.yes_no_ids
        layout.add("logit_score", {"true_token_id": yes, "false_token_id": no, "module_input_name": "causal_logits"})
    else:  # linear / mlp head on the last token's hidden state
        layout.add("transformer", {
            "transformer_task": "feature-extraction", "modality_config": _chat_modalities("last_hidden_state"),
            "module_output_name": "token_embeddings", "processing_kwargs": _chat_processing(featurizer),
            "processor_kwargs": {"chat_template": pair_template(featurizer)}})
        hidden = _hidden_size(model)
        layout.add("pooling", {"embedding_dimension": hidden, "pooling_mode": "lasttoken", "include_prompt": True})
        state = {k: v.detach().float().cpu().contiguous() for k, v in model.head.state_dict().items()}
        if head == "mlp":
            layout.add("dense", _dense_config(hidden, hidden, True, "torch.nn.modules.activation.GELU",
                                              "sentence_embedding", "sentence_embedding"),
                       {"linear.weight": state["net.0.weight"], "linear.bias": state["net.0.bias"]}, name="Dense")
        last = "net.2" if head == "mlp" else "net.0"
        layout.add("dense", _dense_config(hidden, 1, True, IDENTITY, "sentence_embedding", "scores"),
                   {"linear.weight": state[f"{last}.weight"], "linear.bias": state[f"{last}.bias"]}, name="Dense")
    return {"model_type": "CrossEncoder", "prompts": {}, "default_prompt_name": None, "activation_fn": IDENTITY}


def _dense_config(inputs: int, outputs: int, bias: bool, activation: str, source: str, target: str) -> dict[str, Any]:
    return {"in_features": inputs, "out_features": outputs, "bias": bias, "activation_function": activation,
            "module_input_name": source, "module_output_name": target}


def _hidden_size(model: Any) -> int:
    config = model.config
    return int((config.get_text_config() if hasattr(config, "get_text_config") else config).hidden_size)


def _chat_processing(featurizer: Any) -> dict[str, Any]:
    """The chat template with its generation prompt (the pooled last token), and the pixel budget as the featurizer
    hands it to the image processor."""
    processing: dict[str, Any] = {"chat_template": {"add_generation_prompt": True}}
    image = featurizer.image_kwargs()
    if image and not featurizer.fast_decode:
        processing["image"] = image
    return processing


def pair_template(featurizer: Any) -> str:
    """The model's own chat template behind a prelude that turns sentence-transformers' (query, document) messages
    into the one system + user turn :class:`~hf_mm_rerank.data.pair_featurizers.ChatPairFeaturizer` renders (instruction and
    prefixes, each side's image before its text), and appends the assistant prefix after the generation prompt.
    Other conversations render exactly as with the original template."""
    p = featurizer.prompt
    head = (f"<Instruct>: {p['instruction']}\n" if p["instruction"] else "") + p["query_prefix"]
    literal = json.dumps  # a JSON string is a valid Jinja string literal
    prelude = (
        "{%- set ns = namespace(parts=[], system=none, paired=false) -%}"
        "{%- for m in messages -%}"
        "{%- if m.role in ['query', 'document'] -%}"
        "{%- set ns.paired = true -%}"
        "{%- set prefix = " + literal(head) + " if m.role == 'query' else " + literal(p["document_prefix"]) + " -%}"
        "{%- if prefix -%}{%- set ns.parts = ns.parts + [{'type': 'text', 'text': prefix}] -%}{%- endif -%}"
        "{%- set content = m.content if m.content is not string else [{'type': 'text', 'text': m.content}] -%}"
        "{%- for c in content if c.type == 'image' -%}{%- set ns.parts = ns.parts + [c] -%}{%- endfor -%}"
        "{%- for c in content if c.type == 'text' -%}{%- set ns.parts = ns.parts + [c] -%}{%- endfor -%}"
        "{%- elif m.role == 'system' -%}{%- set ns.system = m.content -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if ns.paired -%}"
        "{%- set sys = ns.system if ns.system is not none else ([{'type': 'text', 'text': "
        + literal(p["system_prompt"]) + "}] if " + literal(p["system_prompt"]) + " else none) -%}"
        "{%- set messages = ([{'role': 'system', 'content': sys}] if sys is not none else []) + "
        "[{'role': 'user', 'content': ns.parts}] -%}"
        "{%- endif -%}"
    )
    suffix = "{%- if ns.paired and add_generation_prompt -%}{{ " + literal(p["assistant_prefix"]) + " }}{%- endif -%}"
    original = getattr(featurizer.processor, "chat_template", None) or featurizer.tokenizer.chat_template
    return prelude + original + suffix


def write_st_files(model: Any, directory: str) -> list[str]:
    """Write :func:`st_layout`'s files into ``directory``; returns what sentence-transformers does differently."""
    files, limits = st_layout(model, directory)
    stale = ST_CONFIG_FILES if NO_ST_FILE in files else (NO_ST_FILE,)  # from an earlier save into this folder
    for name in stale:
        if os.path.isfile(os.path.join(directory, name)):
            os.remove(os.path.join(directory, name))
    for relative, content in files.items():
        path = os.path.join(directory, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if relative.endswith(".safetensors"):
            save_file(content, path)
        elif isinstance(content, str):
            with open(path, "w") as handle:
                handle.write(content)
        else:
            with open(path, "w") as handle:
                json.dump(content, handle, indent=2)
    return limits


def st_paths(directory: str) -> list[str]:
    """The sentence-transformers files of a saved folder, relative to it (configs and module folders' files)."""
    if not os.path.isfile(os.path.join(directory, "modules.json")):
        return []
    with open(os.path.join(directory, "modules.json")) as handle:
        modules = json.load(handle)
    paths = [name for name in ST_CONFIG_FILES if os.path.isfile(os.path.join(directory, name))]
    for module in modules:
        folder = module.get("path") or ""
        if folder and os.path.isdir(os.path.join(directory, folder)):
            paths += [os.path.join(folder, name) for name in sorted(os.listdir(os.path.join(directory, folder)))]
    return paths
