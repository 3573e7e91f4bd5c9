"""The two usage snippets of a model card, written so that they run as printed.

- with hf_mm_rerank: load, then embed (or score) a query and an image the snippet makes itself;
- with plain transformers (+ peft): the same result without this library, down to the L2-normalised embedding
  (dual encoders: the towers' feature functions; chat VLMs: the chat template with the recorded prompts and
  the recorded pooling) or the reranker's score (the recorded pair prompt, then the yes/no logits or the trained
  head in ``head.safetensors``).

The example image is a solid colour on the model's patch grid (224 x 224), so every resize path gives the same
pixels and the two snippets agree to float precision (tests/test_first_hour.py runs both and compares them).
"""

from __future__ import annotations

import os
from typing import Any

QUERY = "a red square"
IMAGE = 'Image.new("RGB", (224, 224), (220, 20, 20))  # or Image.open("your_photo.jpg")'
OTHER = 'Image.new("RGB", (224, 224), (20, 20, 220))'
DOCUMENT_TEXT = "A red square on a white page."
# peft imports bitsandbytes when it is installed, which on some CPUs logs a notice about an optional kernel package.
PEFT_IMPORT = "from peft import PeftModel  # (with bitsandbytes installed, a notice about an optional CPU kernel is harmless)"


def usage_info(model: Any, output_dir: str | None = None) -> dict[str, Any]:
    """What the snippets need to know about ``model`` beyond the card's facts."""
    featurizer = model.featurizer
    info: dict[str, Any] = {"family": model.spec.family, "prompts": dict(featurizer.prompts),
                            "pooling": getattr(model, "pooling", None),
                            "image_kwargs": featurizer.image_kwargs() if featurizer.supports_images else {}}
    base = str(model.spec.base_model or "")
    if base.startswith("./") and model.is_peft:  # a base saved inside the model's own folder (the demo's)
        info["base_inside"] = base[2:]
    elif output_dir and model.is_peft and os.path.isabs(base):
        inside = os.path.relpath(base, os.path.abspath(output_dir))
        if not inside.startswith(".."):
            info["base_inside"] = inside
    if model.kind == "bi_encoder" and model.spec.family == "dual_encoder":
        info["text_kwargs"] = {"padding": featurizer._padding(), "truncation": True,
                               "max_length": featurizer._max_length()}
    if model.kind == "cross_encoder":
        info["pair_prompt"] = dict(getattr(featurizer, "prompt", {}) or {})
        settings = model.spec.settings
        info["yes_no"] = [settings.get("yes_token", "yes"), settings.get("no_token", "no")]
        info["num_labels"] = int(getattr(model.backbone.config, "num_labels", 1) or 1)
    return info


def _model_lines(info: dict[str, Any]) -> list[str]:
    repo = info["repo_id"]
    if repo:
        return [f'MODEL = "{repo}"']
    return ['MODEL = "."  # this folder: run from inside it, or put its path (or its Hub id once pushed) here']


def _base_lines(info: dict[str, Any]) -> list[str]:
    base = info["base_model"]
    if base:
        return [f'BASE = "{base}"']
    inside = (info.get("usage") or {}).get("base_inside")
    if inside:
        return [f'BASE = os.path.join(MODEL, "{inside}")  # the base model is saved inside this folder']
    return ['BASE = "path/to/the/base/model"  # the base was a local folder when trained: pass it (or its Hub id) here']


def library_usage(info: dict[str, Any]) -> str:
    lines = ["from PIL import Image", ""]
    if info["kind"] == "multi_vector":
        lines += ["from hf_mm_rerank import MultiVectorEncoder", "", *_model_lines(info),
                  "model = MultiVectorEncoder.from_pretrained(MODEL)", f'query = "{QUERY}"', f"image = {IMAGE}",
                  'query_tokens = model.encode([query], side="query")      # TokenEmbeddings: [1, T, D] + mask',
                  'image_tokens = model.encode([image], side="document")',
                  "print(model.score(query_tokens, image_tokens).item())  # MaxSim"]
        return "\n".join(lines)
    if info["kind"] == "bi_encoder":
        lines += ["from hf_mm_rerank import BiEncoder", "", *_model_lines(info),
                  "model = BiEncoder.from_pretrained(MODEL)", f'query = "{QUERY}"', f"image = {IMAGE}",
                  'query_embedding = model.encode([query], side="query")      # [1, D]',
                  'image_embedding = model.encode([image], side="document")  # [1, D]',
                  "print((query_embedding @ image_embedding.T).item())  # cosine similarity"]
        return "\n".join(lines)
    text_only = info["modalities"] == ["text"]
    document, other = (f'"{DOCUMENT_TEXT}"', '"A blue circle."') if text_only else (IMAGE, OTHER)
    lines = ([] if text_only else lines) + ["from hf_mm_rerank import CrossEncoder", "", *_model_lines(info),
                                           "reranker = CrossEncoder.from_pretrained(MODEL)", f'query = "{QUERY}"',
                                           f"document = {document}", f"other = {other}",
                                           "scores = reranker.score([(query, document), (query, other)])  # raw logits",
                                           "print(scores.tolist())"]
    return "\n".join(lines)


def plain_usage(info: dict[str, Any]) -> str:
    usage = info.get("usage") or {}
    if info["kind"] == "multi_vector" and info.get("family") == "dual_encoder":
        return "\n".join(["# A dual encoder's token vectors have no plain-transformers or sentence-transformers form:",
                          "# sentence-transformers cannot encode its image patches (see Serving and",
                          "# SENTENCE_TRANSFORMERS.md in this folder); encode with hf_mm_rerank, as above."])
    if info["kind"] == "multi_vector":
        return "\n".join(["# The token vectors need hf_mm_rerank's token masks and projection; without it, load the",
                          "# sentence-transformers configuration saved in this folder (see Serving):",
                          "from sentence_transformers import MultiVectorEncoder", "", *_model_lines(info),
                          "model = MultiVectorEncoder(MODEL)", f'print(model.encode_query(["{QUERY}"])[0].shape)'])
    if info["kind"] == "bi_encoder":
        body = _dual_embedding(info, usage) if usage.get("family") == "dual_encoder" else _chat_embedding(info, usage)
    elif info["head"] == "classification":
        body = _classification_score(info)
    else:
        body = _chat_score(info, usage)
    return "\n".join(body)


def _load(info: dict[str, Any], auto: str) -> list[str]:
    if info["adapter"]:
        quantized = ([f"# Trained on a quantized base ({info['quantization']}): pass the same BitsAndBytesConfig as "
                      "quantization_config= for the training-time numbers."] if info.get("quantization") else [])
        return [*_model_lines(info), *_base_lines(info), *quantized,
                f"model = PeftModel.from_pretrained({auto}.from_pretrained(BASE), MODEL).eval()",
                "processor = AutoProcessor.from_pretrained(MODEL)"]
    return [*_model_lines(info), f"model = {auto}.from_pretrained(MODEL).eval()",
            "processor = AutoProcessor.from_pretrained(MODEL)"]


def _imports(info: dict[str, Any], auto: str, extra: tuple[str, ...] = ()) -> list[str]:
    """Import lines, standard library first, then the rest sorted by module."""
    if (info.get("usage") or {}).get("base_inside") and not info["base_model"] and "import os" not in extra:
        extra = ("import os", *extra)
    stdlib = [line for line in extra if line.startswith("import os")]
    others = ["import torch", "from PIL import Image", *(line for line in extra if line not in stdlib)]
    if info["adapter"]:
        others.append(PEFT_IMPORT)
    others.append(f"from transformers import AutoProcessor, {auto}")
    return [*stdlib, *([""] if stdlib else []), *sorted(others, key=lambda line: line.split()[1].lower()), ""]


def _dual_embedding(info: dict[str, Any], usage: dict[str, Any]) -> list[str]:
    kwargs = ", ".join(f"{k}={v!r}" for k, v in usage.get("text_kwargs", {}).items())
    prompts = usage.get("prompts", {})
    query = f'{prompts["query"]!r} + "{QUERY}"' if prompts.get("query") else f'"{QUERY}"'
    return [*_imports(info, "AutoModel"), *_load(info, "AutoModel"),
            f"image = {IMAGE}",
            "",
            "def features(output):  # transformers returns the projected embedding, or an output holding it",
            '    return output if isinstance(output, torch.Tensor) else output.pooler_output',
            "",
            "",
            "with torch.no_grad():",
            f"    text = processor.tokenizer([{query}], {kwargs}, return_tensors=\"pt\")",
            "    query_embedding = features(model.get_text_features(**text))",
            '    pixels = processor.image_processor(images=[image], return_tensors="pt")',
            "    image_embedding = features(model.get_image_features(**pixels))",
            *(["query_embedding = torch.nn.functional.normalize(query_embedding, dim=-1)",
               "image_embedding = torch.nn.functional.normalize(image_embedding, dim=-1)"] if info["normalize"] else []),
            "print((query_embedding @ image_embedding.T).item())  # the same as with hf_mm_rerank"]


def _chat_embedding(info: dict[str, Any], usage: dict[str, Any]) -> list[str]:
    prompts = usage.get("prompts", {})
    pool = ("hidden[:, -1]  # last-token pooling" if usage.get("pooling") == "last"
            else "hidden.mean(dim=1)  # mean pooling")
    lines = [*_imports(info, "AutoModel"), *_load(info, "AutoModel"),
             f"image = {IMAGE}", "", "",
             "def embed(content, system):",
             "    messages = [{\"role\": \"user\", \"content\": content}]",
             "    if system:",
             "        messages.insert(0, {\"role\": \"system\", \"content\": [{\"type\": \"text\", \"text\": system}]})",
             "    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)",
             "    images = [image] if any(part[\"type\"] == \"image\" for part in content) else None",
             f"    inputs = processor(text=[text], images=images, return_tensors=\"pt\"{_image_kwargs(usage)})",
             "    with torch.no_grad():",
             "        hidden = model(**inputs, use_cache=False).last_hidden_state",
             f"    embedding = {pool}",
             "    return torch.nn.functional.normalize(embedding.float(), dim=-1)" if info["normalize"]
             else "    return embedding.float()",
             "", "",
             f"query_embedding = embed([{{\"type\": \"text\", \"text\": \"{QUERY}\"}}], system={prompts.get('query', '')!r})",
             f"image_embedding = embed([{{\"type\": \"image\"}}], system={prompts.get('document', '')!r})",
             "print((query_embedding @ image_embedding.T).item())  # the same as with hf_mm_rerank"]
    return lines


def _image_kwargs(usage: dict[str, Any]) -> str:
    """The pixel budget the model was trained with, as the processor call's argument (empty when there is none)."""
    kwargs = usage.get("image_kwargs") or {}
    return f", images_kwargs={kwargs!r}" if kwargs else ""


def _chat_score(info: dict[str, Any], usage: dict[str, Any]) -> list[str]:
    prompt = usage.get("pair_prompt", {})
    head = info["head"]
    auto = "AutoModel" if head in ("linear", "mlp") else "AutoModelForImageTextToText"
    extra = ("import os", "from huggingface_hub import hf_hub_download", "from safetensors.torch import load_file") \
        if head in ("linear", "mlp") else ()
    instruct = f"<Instruct>: {prompt.get('instruction')}\n" if prompt.get("instruction") else ""
    lines = [*_imports(info, auto, extra), *_load(info, auto),
             f"query = \"{QUERY}\"", f"document = {IMAGE}",
             f"SYSTEM = {prompt.get('system_prompt', '')!r}",
             f"QUERY_PREFIX = {instruct + prompt.get('query_prefix', '')!r}",
             f"DOCUMENT_PREFIX = {prompt.get('document_prefix', '')!r}",
             f"ASSISTANT_PREFIX = {prompt.get('assistant_prefix', '')!r}",
             "content = ([{\"type\": \"text\", \"text\": QUERY_PREFIX}] if QUERY_PREFIX else []) + "
             "[{\"type\": \"text\", \"text\": query}]",
             "content += ([{\"type\": \"text\", \"text\": DOCUMENT_PREFIX}] if DOCUMENT_PREFIX else []) + "
             "[{\"type\": \"image\"}]",
             "messages = [{\"role\": \"user\", \"content\": content}]",
             "if SYSTEM:",
             "    messages.insert(0, {\"role\": \"system\", \"content\": [{\"type\": \"text\", \"text\": SYSTEM}]})",
             "text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + "
             "ASSISTANT_PREFIX",
             f"inputs = processor(text=[text], images=[document], return_tensors=\"pt\"{_image_kwargs(usage)})"]
    if head == "yes_no":
        yes, no = usage.get("yes_no", ["yes", "no"])
        lines += [f"yes, no = (processor.tokenizer.encode(t, add_special_tokens=False)[0] for t in ({yes!r}, {no!r}))",
                  "with torch.no_grad():",
                  "    logits = model(**inputs, use_cache=False).logits[0, -1].float()",
                  "score = (logits[yes] - logits[no]).item()  # the same as hf_mm_rerank's score"]
    else:
        net = ("torch.nn.functional.linear(hidden, head[\"net.0.weight\"], head[\"net.0.bias\"])" if head == "linear"
               else "torch.nn.functional.linear(torch.nn.functional.gelu(torch.nn.functional.linear(hidden, "
                    "head[\"net.0.weight\"], head[\"net.0.bias\"])), head[\"net.2.weight\"], head[\"net.2.bias\"])")
        lines += ["# The trained score head, applied to the last token's hidden state:",
                  "head_file = (os.path.join(MODEL, \"head.safetensors\") if os.path.isdir(MODEL)",
                  "             else hf_hub_download(MODEL, \"head.safetensors\"))",
                  "head = load_file(head_file)",
                  "with torch.no_grad():",
                  "    hidden = model(**inputs, use_cache=False).last_hidden_state[0, -1].float()",
                  f"    score = {net}.item()  # the same as hf_mm_rerank's score"]
    return [*lines, "print(score)"]


def _classification_score(info: dict[str, Any]) -> list[str]:
    auto = "AutoModelForSequenceClassification"
    lines = ["import torch"] + ([PEFT_IMPORT] if info["adapter"] else []) + [
        f"from transformers import AutoTokenizer, {auto}", ""]
    load = (_load(info, auto) if info["adapter"] else [*_model_lines(info), f"model = {auto}.from_pretrained(MODEL).eval()"])
    load = [line for line in load if "AutoProcessor" not in line]  # a text classifier needs only its tokenizer
    return [*lines, *load, "tokenizer = AutoTokenizer.from_pretrained(MODEL)",
            f"inputs = tokenizer(\"{QUERY}\", \"{DOCUMENT_TEXT}\", truncation=\"only_second\", return_tensors=\"pt\")",
            "with torch.no_grad():",
            "    logits = model(**inputs).logits[0].float()",
            "score = (logits[0] if logits.numel() == 1 else logits[1] - logits[0]).item()  # as hf_mm_rerank scores",
            "print(score)"]
