"""Reloads an export with plain transformers (neither peft nor hf_mm_rerank importable) and saves its outputs.

Run by :mod:`.export_check` in a subprocess: ``python -m hf_mm_rerank.publishing.plain_check TASK.json``. Python
imports the (lazy, light) package ``hf_mm_rerank`` to find this file; both are then made unimportable, so the
transformers code below cannot lean on them.
"""
import sys

sys.modules["peft"] = None  # neither may be needed: from here on, importing them fails
sys.modules["hf_mm_rerank"] = None

# Imported after the two lines above on purpose (E402), so that nothing they pull in can lean on peft or hf_mm_rerank.
import json  # noqa: E402

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import AutoModel, AutoModelForSequenceClassification, AutoProcessor, AutoTokenizer  # noqa: E402

task = json.load(open(sys.argv[1]))
folder, out = task["folder"], []
red, blue = Image.new("RGB", (224, 224), (220, 20, 20)), Image.new("RGB", (224, 224), (20, 20, 220))
if task["mode"] == "snippet":  # the card's own transformers code, run once per probe input
    found = {name: [] for name in task["results"]}
    for values in task["runs"]:
        namespace = {}
        code = task["code"].replace('MODEL = "."', f"MODEL = {folder!r}")
        for name, value in values.items():
            code = code.replace(name, value)
        exec(compile(code, "<card>", "exec"), namespace)
        for name in task["results"]:
            found[name].append(torch.as_tensor(namespace[name]).float().reshape(-1))
    out = [value for name in task["results"] for value in found[name]]
elif task["mode"] == "classifier":
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for text in task["texts"]:
        args = text if isinstance(text, list) else [text]
        inputs = tokenizer(*args, return_tensors="pt", truncation="only_second" if len(args) == 2 else True)
        with torch.no_grad():
            out.append(model(**inputs).logits[0, :1].float())
elif task["mode"] == "tokens":  # a late-interaction export: the inner model, its token projection, L2-normalised
    import glob

    from safetensors.torch import load_file

    model = AutoModel.from_pretrained(folder).eval()
    weights = {k: v for path in sorted(glob.glob(folder + "/*.safetensors")) for k, v in load_file(path).items()}
    weight, bias = weights["custom_text_proj.weight"].float(), weights.get("custom_text_proj.bias")
    for features in torch.load(task["features_file"]):
        with torch.no_grad():
            hidden = model(**features, use_cache=False).last_hidden_state[0].float()
        vectors = hidden @ weight.T + (bias.float() if bias is not None else 0)
        out.append(torch.nn.functional.normalize(vectors, dim=-1))
else:  # a *ForSequenceClassification transformers has no class for: its inner model plus the score row
    from safetensors.torch import load_file

    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    weights = load_file(folder + "/model.safetensors")  # the score row: top level, or inside the language model (vLLM's
    score = next(v for k, v in weights.items() if k.split(".")[-2:] == ["score", "weight"]).float()  # Qwen2-VL layout)
    for text, image in zip(task["texts"], [red, blue]):
        extra = {"images_kwargs": task["images_kwargs"]} if task["images"] and task.get("images_kwargs") else {}
        inputs = processor(text=[text], images=[image] if task["images"] else None, return_tensors="pt", **extra)
        with torch.no_grad():
            hidden = model(**inputs, use_cache=False).last_hidden_state[0, -1].float()
        out.append(hidden @ score[0])
torch.save(torch.cat([o.reshape(-1) for o in out]), task["result_file"])
