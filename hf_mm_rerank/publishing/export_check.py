"""The check of an export: its reload by the loader it is meant for, compared with the trained model on probe inputs.

Merged and classifier exports are reloaded in a subprocess where peft and hf_mm_rerank cannot be imported
(:mod:`.plain_check`); sentence-transformers exports by sentence-transformers itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any

import torch

from ..data.inputs import MMInput
from ..modeling.backbone import native_key_layout
from ..modeling.base import to_device
from ..modeling.bi_encoder import last_token_pool, mean_pool
from .card_usage import DOCUMENT_TEXT, IMAGE, OTHER, QUERY, plain_usage, usage_info

TOLERANCE = 1e-5  # relative to the scale of the compared outputs


class ExportError(RuntimeError):
    """An export that could not be made, or whose reload does not reproduce the trained model."""



def relative_difference(got: torch.Tensor, expected: torch.Tensor) -> float:
    scale = float(expected.abs().max()) or 1.0
    return float((got.float() - expected.float()).abs().max()) / scale


def torch_dtype(dtype: Any) -> torch.dtype:
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def tolerance(dtype: Any) -> float:
    """The relative difference an export may show: float32's 1e-5, or four machine epsilons of a half-precision
    export (bfloat16 3.1e-2, float16 3.9e-3): the reloading loader rounds and sums in another order, which moved a
    two-layer model's half-precision outputs by about 2.3 epsilons; a wrong or missing weight moves them by the order
    of the outputs themselves, while a change smaller than the precision's own rounding cannot be checked at all."""
    if dtype is None:
        return TOLERANCE
    return max(TOLERANCE, 4 * torch.finfo(torch_dtype(dtype)).eps)


PLAIN_CHECK = "hf_mm_rerank.publishing.plain_check"  # run with python -m in a subprocess


def probe_outputs(model: Any) -> torch.Tensor:
    """The trained model's outputs on the probe inputs (the same ones the card's snippets use)."""
    from PIL import Image


    red, blue = Image.new("RGB", (224, 224), (220, 20, 20)), Image.new("RGB", (224, 224), (20, 20, 220))
    if model.kind == "multi_vector":
        return torch.cat([model._embed(features)[0] for features in token_probe_features(model)])
    if model.kind == "bi_encoder":
        queries, documents = [QUERY, "a blue circle"], [red, blue] if model.featurizer.supports_images else []
        return torch.cat([model.encode(queries, side="query"), model.encode(documents, side="document")])
    documents = [red, blue] if model.featurizer.supports_images else [DOCUMENT_TEXT, "A blue circle."]
    return model.score([(QUERY, d) for d in documents])


def token_probe_features(model: Any) -> list[dict[str, Any]]:
    """A multi-vector model's probe inputs (a query; an image document), one per batch, every token scored (the
    chat template's too: a late-interaction engine returns them all)."""
    featurizer = model.featurizer
    items = [(QUERY, "query")] + ([(_probe_image(), "document")] if featurizer.supports_images else [])
    out = []
    for item, side in items:
        features = featurizer([featurizer.read(item, 0, side)], side)
        features["token_mask"] = features["attention_mask"].bool()
        out.append(features)
    return out


def reload_outputs(folder: str, format: str, model: Any) -> tuple[torch.Tensor, str]:
    if format == "lora":
        return _reload_lora(folder, model), "peft on the base's *ForConditionalGeneration"
    if format == "sentence-transformers":
        return _reload_sentence_transformers(folder, model), "sentence-transformers"
    return _reload_plain(folder, format, model), "plain transformers (a subprocess without peft and hf_mm_rerank)"


def _reload_sentence_transformers(folder: str, model: Any) -> torch.Tensor:
    try:
        import sentence_transformers
    except ImportError:
        raise ExportError("the sentence-transformers export is checked by loading it with sentence-transformers, "
                          "which is not installed. Fix: pip install 'sentence-transformers>=6.2', or pass "
                          "verify=False (--no_verify).") from None
    from PIL import Image


    red, blue = Image.new("RGB", (224, 224), (220, 20, 20)), Image.new("RGB", (224, 224), (20, 20, 220))
    if model.kind == "bi_encoder":
        st = sentence_transformers.SentenceTransformer(folder, device="cpu")
        queries = st.encode_query([QUERY, "a blue circle"], convert_to_tensor=True)
        documents = st.encode_document([red, blue], convert_to_tensor=True) if model.featurizer.supports_images else \
            queries[:0]
        return torch.cat([queries, documents]).cpu()
    st = sentence_transformers.CrossEncoder(folder, device="cpu")
    documents = [red, blue] if model.featurizer.supports_images else [DOCUMENT_TEXT, "A blue circle."]
    return st.predict([(QUERY, d) for d in documents], convert_to_tensor=True).cpu()


def _reload_lora(folder: str, model: Any) -> torch.Tensor:
    """The re-keyed adapter loaded by peft onto the base's ``*ForConditionalGeneration``; its inner ``*Model`` embeds
    the probe inputs as the bi-encoder does (featurizer, pooling, normalisation)."""
    import transformers
    from peft import PeftModel

    config = json.load(open(os.path.join(folder, "adapter_config.json")))
    outer = getattr(transformers, base_architecture(model.base_model))
    with native_key_layout():
        base = outer.from_pretrained(config["base_model_name_or_path"], dtype=torch.float32)
        inner = getattr(PeftModel.from_pretrained(base, folder).eval().get_base_model(), outer.base_model_prefix)
    red, blue = _probe_image(), _probe_image((20, 20, 220))
    rows = []
    for side, items in (("query", [QUERY, "a blue circle"]), ("document", [red, blue])):
        features = model.featurizer([model.featurizer.read(item, i, side) for i, item in enumerate(items)], side)
        features = to_device(features, torch.device("cpu"), torch.float32, model.featurizer)
        with torch.no_grad():
            hidden = inner(**features, use_cache=False).last_hidden_state
        pooled = (last_token_pool if model.pooling == "last" else mean_pool)(hidden, features["attention_mask"]).float()
        rows.append(torch.nn.functional.normalize(pooled, dim=-1) if model.normalize else pooled)
    return torch.cat(rows)


def _reload_plain(folder: str, format: str, model: Any) -> torch.Tensor:
    """Run the export in a subprocess where peft and hf_mm_rerank cannot be imported."""
    import transformers

    task: dict[str, Any] = {"folder": os.path.abspath(folder)}
    if model.kind == "multi_vector":  # the probe's token ids and pixels, run by the inner model and the projection
        task["mode"] = "tokens"
    elif format == "merged":
        task.update(snippet_task(model))
    else:
        name = json.load(open(os.path.join(folder, "config.json")))["architectures"][0]
        texts = _pair_texts(model)
        task.update({"mode": "classifier" if hasattr(transformers, name) else "inner", "texts": texts,
                     "images": model.featurizer.supports_images,  # at the trained pixel budget:
                     "images_kwargs": model.featurizer.image_kwargs() if model.featurizer.supports_images else {}})
    with tempfile.TemporaryDirectory() as scratch:
        task["result_file"] = os.path.join(scratch, "out.pt")
        if task["mode"] == "tokens":
            task["features_file"] = os.path.join(scratch, "features.pt")
            features = [to_device({k: v for k, v in f.items() if k != "token_mask"}, torch.device("cpu"),
                                  torch.float32, model.featurizer) for f in token_probe_features(model)]
            torch.save(features, task["features_file"])  # pixels normalised as the model's forward takes them
        task_file = os.path.join(scratch, "task.json")
        with open(task_file, "w") as handle:
            json.dump(task, handle)
        run = subprocess.run([sys.executable, "-m", PLAIN_CHECK, task_file], capture_output=True, text=True,
                             env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=scratch)
        if run.returncode != 0:
            raise ExportError(f"plain transformers could not load the {format} export: "
                              f"{run.stderr.strip().splitlines()[-1] if run.stderr.strip() else run.returncode}")
        result = torch.load(task["result_file"])
    if model.kind == "multi_vector":
        return result.view(-1, model.dim)
    return result.view(4, -1) if model.kind == "bi_encoder" else result


def _pair_texts(model: Any) -> list[Any]:
    """The probe pairs as the reranker's featurizer renders them (a chat string, or a (query, document) text pair)."""

    featurizer = model.featurizer
    if not featurizer.supports_images:
        return [[QUERY, DOCUMENT_TEXT], [QUERY, "A blue circle."]]
    image = MMInput(image=_probe_image())
    return [featurizer.render_pair(MMInput(text=QUERY), image)] * 2


def _probe_image(color: tuple[int, int, int] = (220, 20, 20)) -> Any:
    from PIL import Image

    return Image.new("RGB", (224, 224), color)


def snippet_task(model: Any, info_only: bool = False) -> dict[str, Any]:
    """The card's transformers snippet for the merged folder, with the probe inputs swapped in (``info_only``: the
    snippet's facts, for :func:`~hf_mm_rerank.publishing.card_usage.plain_usage`)."""

    info = {"kind": model.kind, "adapter": False, "repo_id": None, "base_model": None, "quantization": None,
            "head": model.spec.settings.get("head"), "normalize": getattr(model, "normalize", None),
            "modalities": ["text", "image"] if model.featurizer.supports_images else ["text"],
            "usage": usage_info(model)}
    info["usage"].pop("base_inside", None)
    if info_only:
        return info
    code = plain_usage(info)
    if model.kind == "bi_encoder":  # [query 1, query 2, image 1, image 2], as probe_outputs orders them
        runs = [{}, {f'"{QUERY}"': '"a blue circle"', IMAGE: OTHER}]
        return {"mode": "snippet", "code": code, "results": ["query_embedding", "image_embedding"], "runs": runs}
    swap = {IMAGE: OTHER} if model.featurizer.supports_images else {f'"{DOCUMENT_TEXT}"': '"A blue circle."'}
    return {"mode": "snippet", "code": code, "results": ["score"], "runs": [{}, swap]}


def base_architecture(model: Any) -> str | None:
    """The architecture ``model`` came from. A full fine-tune was saved as its bare ``*Model`` (so its config names
    that): the family's ``*ForConditionalGeneration`` then, from transformers' image-text-to-text mapping."""
    architectures = getattr(model.config, "architectures", None) or []
    name = architectures[0] if architectures else None
    if name is None or name == type(model).__name__:
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

        name = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(getattr(model.config, "model_type", None), name)
    return name
