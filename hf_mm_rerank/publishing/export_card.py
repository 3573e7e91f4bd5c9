"""The card of an export: what it is, how it was checked, the code that loads it and where it can be served."""

from __future__ import annotations

import os
from typing import Any

from .card_usage import DOCUMENT_TEXT, IMAGE, QUERY, plain_usage
from .export_check import snippet_task
from .model_card import hub_id
from .serving import serving_lines, vllm_recipes

KIND_NAMES = {"bi_encoder": "bi-encoder", "multi_vector": "multi-vector encoder", "cross_encoder": "cross-encoder"}


def write_export_card(model: Any, folder: str, report: Any) -> None:
    """The export's card: what it is and where it came from (Hub ids only, never a local path), how it was checked,
    the code that loads it (the code the check ran, for merged exports) and where it can be served."""

    base = hub_id(str(model.spec.base_model))
    method = ("LoRA" + (" (QLoRA, merged into the full-precision base)" if model.spec.quantization else " merged")
              if model.is_peft else "fully fine-tuned")
    if report.format == "lora":
        method = "LoRA, the adapter alone, not merged"
    checked = (f"reloaded with {report.loader}, equal to the trained model to {report.difference:.1e} of the outputs' "
               "scale" + (f" ({report.quantized_difference:.1e} from the 4/8-bit model it was trained as)"
                          if report.quantized_difference is not None else ""))
    name = os.path.basename(os.path.normpath(report.destination))
    lines = [f"# {name}", "",
             f"The `{report.format}` export of an hf_mm_rerank {KIND_NAMES.get(model.kind, model.kind)} ({method}"
             f"{f', base [{base}](https://huggingface.co/{base})' if base else ''}), made by "
             f"`python -m hf_mm_rerank.publishing.export_cli SOURCE {name} --format {report.format}`.", "",
             f"- **Checked:** {checked}.", *(f"- **Note:** {note}" for note in report.notes), "",
             "## Usage", "", "```python", _export_usage(model, report.format), "```", "",
             "## Serving", "", *serving_lines(model, exported=report.format, notes=report.notes), ""]
    with open(os.path.join(folder, "README.md"), "w") as handle:
        handle.write("\n".join(lines))


def _export_usage(model: Any, format: str) -> str:
    """Code that loads the export where it is meant to be loaded (run from its folder, or put its path in MODEL)."""

    if model.kind == "multi_vector":  # the merged export: hf_mm_rerank loads it, vLLM's late-interaction runner serves it
        recipes, _, _ = vllm_recipes(model, ".", exported=format)
        served = [f"# vLLM (see Serving): llm = {recipes[0].llm_line()}; {recipes[0].call_line()}"] if recipes else []
        return "\n".join(["from PIL import Image", "from hf_mm_rerank import MultiVectorEncoder", "",
                          'MODEL = "."  # this folder (or its path, or its Hub id once pushed)',
                          "model = MultiVectorEncoder.from_pretrained(MODEL)", f"image = {IMAGE}",
                          f'query = model.encode(["{QUERY}"], side="query")',
                          'document = model.encode([image], side="document")',
                          "print(model.score(query, document))  # MaxSim", *served])
    if format == "sentence-transformers":
        image = model.featurizer.supports_images
        if model.kind == "cross_encoder":
            document = IMAGE if image else f'"{DOCUMENT_TEXT}"'
            return "\n".join(["from PIL import Image" if image else "", "from sentence_transformers import CrossEncoder",
                              "", 'MODEL = "."  # this folder (or its path, or its Hub id once pushed)',
                              "model = CrossEncoder(MODEL)", f"document = {document}",
                              f'print(model.predict([("{QUERY}", document)]))  # raw logits, as hf_mm_rerank\'s score()'
                              ]).lstrip()
        loader = "MultiVectorEncoder" if model.kind == "multi_vector" else "SentenceTransformer"
        return "\n".join(["from PIL import Image", f"from sentence_transformers import {loader}", "",
                          'MODEL = "."  # this folder (or its path, or its Hub id once pushed)',
                          f"model = {loader}(MODEL)", f"image = {IMAGE}",
                          f'query = model.encode_query(["{QUERY}"])', "document = model.encode_document([image])",
                          "print(model.similarity(query, document))"])
    if format == "lora":

        recipes, reason, _ = vllm_recipes(model, ".", hub_id(str(model.spec.base_model)) or "BASE", exported="lora")
        if not recipes:
            return f"# {reason}"
        recipe = recipes[0]
        return "\n".join(["from vllm import LLM",
                          "from vllm.lora.request import LoRARequest", "",
                          'ADAPTER = "."  # this folder (its path)', f"llm = {recipe.llm_line()}",
                          f"# {recipe.inputs}",
                          f"outputs = {recipe.call_line()}"])
    if format == "classifier":
        return "\n".join(["import torch", "from transformers import AutoModelForSequenceClassification, AutoTokenizer", "",
                          'MODEL = "."  # this folder (or its path, or its Hub id once pushed)',
                          "# vLLM: see Serving (the lines hf_mm_rerank's tests ran); with transformers,",
                          "# where it has this architecture (text models):",
                          "model = AutoModelForSequenceClassification.from_pretrained(MODEL).eval()",
                          "tokenizer = AutoTokenizer.from_pretrained(MODEL)",
                          "# inputs: each (query, document) pair rendered with the pair prompt in hf_mm_rerank_config.json"])
    return plain_usage(snippet_task(model, info_only=True))
