"""Exports for serving engines: a trained folder (adapter or full) rewritten in the form an engine loads.

- ``merged``: full weights in the base's own architecture (LoRA merged, ``modules_to_save`` folded in; a QLoRA adapter
  merged into a full-precision load of its base, in the dtype asked for), with its processor and chat template:
  plain transformers loads it, with neither hf_mm_rerank nor peft installed;
- ``classifier`` (rerankers): a ``*ForSequenceClassification`` checkpoint with one logit (yes/no heads: the score row
  is the yes LM-head row minus the no row; linear heads: that layer; a 2-logit classifier: the difference of its
  rows), the form vLLM, TEI and sentence-transformers serve without overrides;
- ``sentence-transformers``: the merged folder with sentence-transformers' configuration (:mod:`.modeling.st_format`);
- ``lora`` (chat-VLM embedders): the adapter alone, re-keyed for the base's ``*ForConditionalGeneration`` (training
  adapts the bare ``*Model``), the layout vLLM's ``--enable-lora`` applies: vLLM ignores the adapter as training saves
  it, without an error (tests/test_vllm.py). Checked by peft on the base's ``*ForConditionalGeneration``.

Each export reloads itself with its target loader and compares with the trained model on probe inputs before it
reports success (:mod:`.export_check`); a mismatch raises :class:`ExportError` (nothing is left half-written at the
destination). The export's card is :mod:`.export_card`; the command line is :mod:`.export_cli`:

    python -m hf_mm_rerank.publishing.export_cli outputs/demo outputs/demo-merged --format merged [--dtype bfloat16]
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch

from ..modeling import BiEncoder, CrossEncoder, MultiVectorEncoder
from ..modeling.backbone import CHAT, is_quantized, native_key_layout, save_weights
from ..modeling.multi_vector import PROJECTIONS
from ..modeling.spec import HEAD_WEIGHTS, ModelSpec
from ..modeling.st_format import write_st_files
from .export_card import write_export_card
from .export_check import (
    ExportError,
    base_architecture,
    probe_outputs,
    relative_difference,
    reload_outputs,
    tolerance,
    torch_dtype,
)
from .serving import VLLM_LATE_INTERACTION

FORMATS = ("merged", "classifier", "sentence-transformers", "lora")
# Where vLLM 0.32 looks for a classifier's score row: its Qwen2-VL and Qwen2.5-VL keep the converted score layer inside
# the language model (a top-level score.weight is refused: "There is no module or parameter named 'score'"), its
# Qwen3-VL at the top level, as transformers names it (tests/test_vllm.py loads each).
VLLM_SCORE_KEYS = {"qwen2_vl": "language_model.score.weight", "qwen2_5_vl": "language_model.score.weight"}


@dataclass
class ExportReport:
    """What :func:`export` wrote and measured."""

    format: str
    destination: str
    loader: str  # what reloaded the export for the check
    difference: float  # max-abs difference over max-abs value, export vs the trained model in full precision
    quantized_difference: float | None = None  # the same against the 4/8-bit model it was trained as (QLoRA)
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        text = (f"{self.format} export in {self.destination}: reloaded with {self.loader}, equal to the trained "
                f"model to {self.difference:.1e} of the outputs' scale")
        if self.quantized_difference is not None:
            text += f" ({self.quantized_difference:.1e} from the 4/8-bit model it was trained as)"
        return text + "".join(f"\n  note: {note}" for note in self.notes)


def _load(source: Any, dtype: Any, **kwargs: Any) -> Any:
    """The model class a folder was saved by, loaded from ``source`` (a folder, Hub id, or a model itself)."""

    if not isinstance(source, str):
        return source
    spec = ModelSpec.find(source, **{k: v for k, v in kwargs.items() if k in ("revision", "token", "cache_dir")})
    if spec is None:
        raise ExportError(f"{source} was not saved by hf_mm_rerank (no hf_mm_rerank_config.json): there is nothing "
                          "to export. Fix: pass a folder written by save_pretrained / trainer.save_model.")
    cls = {"bi_encoder": BiEncoder, "multi_vector": MultiVectorEncoder}.get(spec.kind, CrossEncoder)
    extra = {"dtype": dtype} if dtype is not None else {}
    return cls.from_pretrained(source, is_trainable=False, **extra, **kwargs)


def export(source: Any, destination: str, format: str = "merged", *, dtype: str | torch.dtype | None = None,
           verify: bool = True, overwrite: bool = False, **load_kwargs: Any) -> ExportReport:
    """Write ``source`` (a saved folder / Hub repo, or a loaded :class:`BiEncoder` / :class:`CrossEncoder`) to
    ``destination`` in ``format`` and check it.

    Args:
        format: ``"merged"``, ``"classifier"`` (rerankers), ``"sentence-transformers"`` or ``"lora"`` (a chat-VLM
            embedder's adapter for vLLM's LoRA).
        dtype: weights dtype of the export (e.g. ``"bfloat16"``); default: the base checkpoint's own.
        verify: reload the export with its target loader and compare on probe inputs (default). A mismatch raises.
        overwrite: replace an existing ``destination``.
        **load_kwargs: for a folder source: ``base_model``, ``token``, ``revision``, ``cache_dir``, ...

    Example:
        >>> export("outputs/demo", "outputs/demo-st", format="sentence-transformers")
    """
    if format not in FORMATS:
        raise ValueError(f"format={format!r}: choose one of {FORMATS}.")
    if os.path.exists(destination) and not overwrite:
        raise FileExistsError(f"{destination} exists. Fix: pick another destination, or pass overwrite=True "
                              "(--overwrite).")
    if isinstance(source, str) and os.path.isdir(source) and os.path.abspath(source) == os.path.abspath(destination):
        raise ValueError("the destination is the source folder: write the export beside it.")
    quantized = None
    if isinstance(source, str):
        model = _load(source, dtype, quantization_config=False, **load_kwargs)

        if (ModelSpec.find(source) or model.spec).quantization:
            quantized = _load(source, None, **load_kwargs)  # the model as trained: 4/8-bit base + adapter
    else:
        model = source

        if is_quantized(model.base_model):
            raise ExportError("this model runs on a 4/8-bit base, which cannot be merged: export its saved folder "
                              "instead (export('folder', ...)), which reloads the base in full precision.")
    if format == "classifier" and model.kind != "cross_encoder":
        raise ExportError("format='classifier' is for rerankers (CrossEncoder); a BiEncoder exports as 'merged' or "
                          "'sentence-transformers'.")
    if model.kind == "multi_vector":
        _check_late_interaction(model, format)  # before anything runs: the reason, not a failure deep inside
    expected = probe_outputs(model)
    reference_quantized = probe_outputs(quantized) if quantized is not None else None
    parent = os.path.dirname(os.path.abspath(destination))
    os.makedirs(parent, exist_ok=True)
    partial = tempfile.mkdtemp(prefix=".export-", dir=parent)
    try:
        notes = _write(model, partial, format, dtype)
        report = ExportReport(format, destination, "(not checked: verify=False)", float("nan"), notes=notes)
        if verify:
            got, report.loader = reload_outputs(partial, format, model)
            report.difference = relative_difference(got, expected)
            allowed = tolerance(dtype)
            if not report.difference <= allowed:
                raise ExportError(f"the {format} export does not reproduce the trained model: reloaded with "
                                  f"{report.loader}, its outputs differ by {report.difference:.2e} of their scale "
                                  f"(allowed {allowed:g}). Nothing was written to {destination}.")
            if reference_quantized is not None:
                report.quantized_difference = relative_difference(got, reference_quantized)
        write_export_card(model, partial, report)
        if os.path.exists(destination):
            shutil.rmtree(destination)
        os.replace(partial, destination)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return report


def _write(model: Any, folder: str, format: str, dtype: Any) -> list[str]:
    """Write the export into ``folder``; returns notes for the report and card."""

    notes: list[str] = []
    if format == "lora":
        return _write_lora(model, folder)
    merged = _merged_copy(model)
    if model.kind == "multi_vector":
        notes += _write_late_interaction(merged, folder, format, dtype)
    elif format == "classifier":
        notes += _write_classifier(merged, folder, dtype)
    else:
        _write_full(merged, folder, dtype)
    model.processor.save_pretrained(folder)
    spec = ModelSpec(kind=model.kind, base_model=folder, family=model.spec.family, adapter=False,
                     settings=dict(model.spec.settings))
    if format == "classifier":
        spec.settings = {**spec.settings, "head": "classification", "num_labels": 1}
    if format == "sentence-transformers":

        spec.sentence_transformers = write_st_files(merged, folder)
        notes += spec.sentence_transformers
    spec.base_model = os.path.abspath(folder)  # its own weights: saved as "./." (it moves with the folder)
    spec.save(folder)
    return notes


def _merged_copy(model: Any) -> Any:
    """``model`` with its adapter merged (a copy: the caller's model keeps its adapter)."""
    import copy

    if not model.is_peft:
        return model
    merged = copy.deepcopy(model)
    merged.merge_and_unload()
    return merged


def _full_model(model: Any, dtype: Any) -> Any:
    """The merged weights in the base's own architecture: a bi-encoder's bare ``*Model`` (or a linear/mlp reranker's)
    goes back inside its ``*ForConditionalGeneration`` with the base's own LM head, so engines find the architecture
    they know."""
    import transformers


    backbone = model.base_model
    name = base_architecture(backbone)
    target = backbone
    bare = model.spec.family == CHAT and (model.kind in ("bi_encoder", "multi_vector") or
                                          model.head_type in ("linear", "mlp"))
    if bare and name and name != type(backbone).__name__ and hasattr(transformers, name):
        target = _base_with_head(name, model.spec.base_model, backbone)
        inner = getattr(target, target.base_model_prefix, None)
        if type(inner) is not type(backbone):
            raise ExportError(f"cannot place the merged {type(backbone).__name__} inside {name} (its base model is "
                              f"{type(inner).__name__}).")
        inner.load_state_dict({k: v for k, v in backbone.state_dict().items()  # a token projection stays outside
                               if k.split(".")[0] not in PROJECTIONS[CHAT]}, strict=True)
    return target.to(torch_dtype(dtype)) if dtype is not None else target


def _base_with_head(name: str, base: str, backbone: Any) -> Any:
    """``name`` (e.g. Qwen2VLForConditionalGeneration) loaded from the base checkpoint: the bare ``*Model`` saved by
    training has no LM head, so the base's own is taken. A base that is gone is named, with where it was looked for."""
    import transformers

    try:
        with native_key_layout():
            return getattr(transformers, name).from_pretrained(base, dtype=backbone.dtype)
    except OSError as error:
        where = (f"the folder {base}, which does not exist" if os.path.isabs(base) and not os.path.exists(base) else
                 f"'{base}' (recorded in hf_mm_rerank_config.json as the base model)")
        raise ExportError(
            f"the merged export puts the trained {type(backbone).__name__} back inside {name}, whose LM head (not "
            f"trained, so not saved with the model) comes from the base checkpoint; it was looked for in {where} and "
            f"could not be loaded ({str(error).splitlines()[0][:300]}). Fix: pass the base checkpoint's folder or Hub "
            "id: export(folder, ..., base_model='PATH_OR_ID') (python -m hf_mm_rerank.publishing.export_cli ... --base_model "
            "PATH_OR_ID), or restore it where it was.") from error


def _write_full(model: Any, folder: str, dtype: Any) -> None:
    """:func:`_full_model` saved; the trained head of a linear/mlp reranker stays in ``head.safetensors``."""
    save_weights(_full_model(model, dtype), folder)
    heads = model.heads()
    if heads is not None:
        from safetensors.torch import save_file


        save_file({k: v.detach().contiguous().cpu() for k, v in heads.state_dict().items()},
                  os.path.join(folder, HEAD_WEIGHTS))


def _write_classifier(model: Any, folder: str, dtype: Any) -> list[str]:
    """A one-logit ``*ForSequenceClassification``: the full model's weights as transformers saves them (its key
    layout, which engines read), without the LM head, plus a ``score`` row."""
    import transformers
    from safetensors.torch import load_file, save_file

    head = model.head_type
    if head == "mlp":
        raise ExportError("an mlp head (two layers with a GELU between) is not one score row, so it has no "
                          "*ForSequenceClassification form. Fix: export format='sentence-transformers' (Dense modules "
                          "keep both layers) or 'merged'.")
    if head == "classification":
        return _one_logit_classifier(model, folder, dtype)
    if head == "yes_no":
        lm_head = model.base_model.get_output_embeddings()
        yes, no = model.yes_no_ids
        row = (lm_head.weight[yes] - lm_head.weight[no]).detach().float()[None]
        if getattr(lm_head, "bias", None) is not None and float((lm_head.bias[yes] - lm_head.bias[no]).abs()) > 0:
            raise ExportError("the LM head has a bias, which a *ForSequenceClassification score row cannot hold.")
    else:  # linear: that layer, without its bias (a score layer has none)
        row = model.head.net[0].weight.detach().float()
        bias = float(model.head.net[0].bias.detach())
        if bias != 0.0:
            raise ExportError(f"the linear head has a bias ({bias:.4g}) and *ForSequenceClassification score layers "
                              "have none: every score would be shifted by that constant (rankings unchanged, values "
                              "not). Fix: export format='sentence-transformers' (its Dense module keeps the bias).")
    full = _full_model(model, dtype)
    save_weights(full, folder, max_shard_size="100000GB")  # one file: the LM head is dropped from it below
    weights = os.path.join(folder, "model.safetensors")
    state = {k: v for k, v in load_file(weights).items() if not k.endswith("lm_head.weight")}
    state[_score_key(model)] = row.to(next(iter(state.values())).dtype)
    save_file(state, weights, metadata={"format": "pt"})
    for leftover in ("generation_config.json",):
        if os.path.isfile(os.path.join(folder, leftover)):
            os.remove(os.path.join(folder, leftover))
    config = json.load(open(os.path.join(folder, "config.json")))
    name = config["architectures"][0]
    for suffix in ("ForConditionalGeneration", "ForCausalLM"):
        name = name[: -len(suffix)] + "ForSequenceClassification" if name.endswith(suffix) else name
    pad = model.featurizer.tokenizer.pad_token_id
    config.update({"architectures": [name], "num_labels": 1, "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0},
                   "pad_token_id": pad})
    if isinstance(config.get("text_config"), dict):
        config["text_config"]["pad_token_id"] = pad
    with open(os.path.join(folder, "config.json"), "w") as handle:
        json.dump(config, handle, indent=2)
    if hasattr(transformers, name):
        return []
    inner = type(getattr(full, full.base_model_prefix)).__name__
    return [f"transformers has no {name} class: vLLM serves this checkpoint (`vllm serve FOLDER --runner pooling`, "
            "run by hf_mm_rerank's tests/test_vllm.py); the check here loaded its weights into transformers' "
            f"{inner} plus the score row (`{_score_key(model)}`, where vLLM reads it), the computation that class runs"]


def _check_late_interaction(model: Any, format: str) -> None:
    """A multi-vector model exports only as the merged ColQwen3 layout (see :func:`_write_late_interaction`)."""
    model_type = getattr(model.config, "model_type", None)
    fix = ("Fix: serve the saved folder itself: hf_mm_rerank.MultiVectorEncoder.from_pretrained(folder), or "
           "sentence-transformers' MultiVectorEncoder(folder) for a chat VLM.")
    if model.spec.family != CHAT or model_type not in VLLM_LATE_INTERACTION:
        raise ExportError(f"a multi-vector {model_type} model has no export: the only one is the merged layout of "
                          f"vLLM's late-interaction runner, which exists for {', '.join(VLLM_LATE_INTERACTION)} "
                          f"({', '.join(VLLM_LATE_INTERACTION.values())}) only (vLLM 0.32 has no ColQwen2 layout and "
                          f"serves no multi-vector dual encoder). {fix}")
    if format != "merged":
        raise ExportError(f"a multi-vector model exports only as format='merged' (the "
                          f"{VLLM_LATE_INTERACTION[model_type]} layout vLLM loads), not {format!r}. {fix}")


def _write_late_interaction(model: Any, folder: str, format: str, dtype: Any) -> list[str]:
    """A chat VLM's multi-vector model in the layout vLLM's late-interaction runner loads: the merged weights inside
    the base's ``*ForConditionalGeneration``, ``custom_text_proj`` at the top level and the architecture vLLM knows it
    by. MultiVectorEncoder.from_pretrained loads it too (its hf_mm_rerank_config.json)."""
    from safetensors.torch import load_file, save_file

    _check_late_interaction(model, format)
    model_type = model.config.model_type
    full = _full_model(model, dtype)
    save_weights(full, folder, max_shard_size="100000GB")  # one file: the projection is added to it below
    weights = os.path.join(folder, "model.safetensors")
    state = load_file(weights)
    dtype_now = next(iter(state.values())).dtype
    projection = {f"custom_text_proj.{name}": value.detach().to(dtype_now).contiguous().cpu()
                  for name, value in model.base_model.custom_text_proj.state_dict().items()}
    # vLLM 0.32 reads the projection's bias only after its weight (the weight creates the layer; an earlier bias is
    # skipped and the load then fails), and it reads each file's tensors in name order: the bias goes in a second shard.
    bias = {k: v for k, v in projection.items() if k.endswith(".bias")}
    shards = [{**state, **{k: v for k, v in projection.items() if k not in bias}}] + ([bias] if bias else [])
    os.remove(weights)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(folder, name), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for s in shards for v in s.values())},
             "weight_map": {key: name for name, shard in zip(names, shards) for key in shard}}
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as handle:
        json.dump(index, handle, indent=2)
    config = json.load(open(os.path.join(folder, "config.json")))
    architecture = VLLM_LATE_INTERACTION[model_type]
    # no embed_dim in the config: vLLM then sizes the projection from its weights, bias included (given embed_dim, it
    # builds one without a bias and drops ours silently: every vector about 10% off, tests/test_vllm.py)
    config["architectures"] = [architecture]
    with open(os.path.join(folder, "config.json"), "w") as handle:
        json.dump(config, handle, indent=2)
    return [f"the {architecture} layout of vLLM's late-interaction runner (`token_embed`: every token's vector, "
            "L2-normalised)"]


def _score_key(model: Any) -> str:
    return VLLM_SCORE_KEYS.get(getattr(model.base_model.config, "model_type", None), "score.weight")


def _write_lora(model: Any, folder: str) -> list[str]:
    """The adapter alone, its keys and target modules moved under the ``*ForConditionalGeneration`` vLLM loads."""
    import transformers
    from safetensors.torch import load_file, save_file

    if model.kind != "bi_encoder" or model.spec.family != CHAT:
        raise ExportError(f"format='lora' re-keys a chat-VLM embedder's adapter for vLLM; this is a {model.kind} "
                          f"({model.spec.family}). Fix: export format='merged' (or 'classifier' for rerankers).")
    if not model.is_peft:
        raise ExportError("format='lora' exports an adapter, and this model has none (a full fine-tune). Fix: export "
                          "format='merged'.")
    config = model.backbone.peft_config["default"]
    if config.modules_to_save:
        raise ExportError(f"the adapter trains modules fully (modules_to_save={sorted(config.modules_to_save)}), which "
                          "vLLM's LoRA refuses ('vLLM only supports modules_to_save being either None or "
                          "[\"classifier\", \"score\"]'). Fix: export format='merged'.")
    name = base_architecture(model.base_model)
    outer = getattr(transformers, name, None) if name else None
    if outer is None or name == type(model.base_model).__name__:
        raise ExportError(f"format='lora': {type(model.base_model).__name__} has no *ForConditionalGeneration in "
                          "transformers to re-key the adapter for. Fix: export format='merged'.")
    prefix = outer.base_model_prefix  # "model": the bare *Model's place inside *ForConditionalGeneration
    save_weights(model.backbone, folder)
    weights = os.path.join(folder, "adapter_model.safetensors")
    inner = "base_model.model."
    state = {(inner + prefix + "." + k[len(inner):] if k.startswith(inner) else k): v
             for k, v in load_file(weights).items()}
    save_file(state, weights, metadata={"format": "pt"})
    path = os.path.join(folder, "adapter_config.json")
    adapter = json.load(open(path))
    children = {child for child, _ in model.base_model.named_children()}
    if isinstance(adapter.get("target_modules"), list):
        adapter["target_modules"] = sorted(f"{prefix}.{t}" if t.split(".")[0] in children else t
                                           for t in adapter["target_modules"])
    adapter["base_model_name_or_path"] = str(model.spec.base_model)
    with open(path, "w") as handle:
        json.dump(adapter, handle, indent=2)
    return [f"the adapter of {name} (keys under `{prefix}.`), for vLLM's `--enable-lora` on the base"]


def _one_logit_classifier(model: Any, folder: str, dtype: Any) -> list[str]:
    backbone = model.base_model
    if backbone.config.num_labels == 2:  # score = logit[1] - logit[0] -> one logit
        import copy

        backbone = copy.deepcopy(backbone)
        classifier = backbone.classifier if hasattr(backbone, "classifier") else backbone.score
        layer = classifier.out_proj if hasattr(classifier, "out_proj") else classifier
        with torch.no_grad():
            weight = (layer.weight[1] - layer.weight[0])[None]
            bias = (layer.bias[1] - layer.bias[0])[None] if layer.bias is not None else None
            new = torch.nn.Linear(weight.shape[1], 1, bias=bias is not None).to(weight.dtype)
            new.weight.copy_(weight)
            if bias is not None:
                new.bias.copy_(bias)
        if hasattr(classifier, "out_proj"):
            classifier.out_proj = new
        elif hasattr(backbone, "classifier"):
            backbone.classifier = new
        else:
            backbone.score = new
        backbone.config.num_labels = 1
        backbone.config.id2label, backbone.config.label2id = {0: "LABEL_0"}, {"LABEL_0": 0}
    if dtype is not None:
        backbone = backbone.to(torch_dtype(dtype))
    save_weights(backbone, folder)
    return []
