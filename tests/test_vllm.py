"""vLLM itself serves what the cards say, on the CPU: every folder and export the card sends to vLLM is loaded by
vLLM 0.32 with the card's own ``LLM(...)`` arguments (its ``vllm serve`` line parsed by vLLM's parser gives the same
engine arguments) and gives this library's embeddings and scores to 1e-5 of their scale, texts and images at the
trained pixel budget. What vLLM cannot serve is shown failing here, with vLLM's own error or the wrong outputs it
returns without one.

vLLM runs in a venv of its own (``scripts/vllm_env.sh``: its pins cannot share .venv), built once per machine by the
session fixture below; the tests then start one vLLM process per model family (``tests/vllm_worker.py``), which loads
each engine in turn. If the venv cannot be built, the tests fail with the reason: they never skip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from images import solid
from peft import LoraConfig
from test_pixels import photo

from hf_mm_rerank import BiEncoder, CrossEncoder
from hf_mm_rerank.data.inputs import MMInput
from hf_mm_rerank.publishing.export import export
from hf_mm_rerank.publishing.export_check import ExportError
from hf_mm_rerank.publishing.serving import serving_lines, serving_targets, vllm_recipes

pytestmark = pytest.mark.vllm
ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-5  # relative to the scale of the compared outputs
LORA = dict(r=4, lora_alpha=8, init_lora_weights=False)  # random non-zero adapters: they must take effect
# What the tests add to the card's arguments: float32 (the comparison's precision), eager mode and a short context
# (tiny models on a CPU); one process, no worker processes.
CPU = {"dtype": "float32", "enforce_eager": True, "max_model_len": 512, "distributed_executor_backend": "uni"}
QUERIES = ["a red square", "two cats on a sofa"]


@pytest.fixture(scope="session")
def vllm_python():
    """The vLLM venv's Python, built by scripts/vllm_env.sh (once; later sessions only check it)."""
    started = time.time()
    try:
        run = subprocess.run(["bash", str(ROOT / "scripts" / "vllm_env.sh")], capture_output=True, text=True,
                             timeout=1800)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"scripts/vllm_env.sh did not finish in 30 minutes building the vLLM venv ({error}).", pytrace=False)
    if run.returncode != 0:
        pytest.fail(f"scripts/vllm_env.sh could not build the vLLM venv (exit {run.returncode}): "
                    f"{(run.stderr or run.stdout)[-3000:]}\nFix: make PyPI reachable (the venv is installed from it) "
                    "and the disk hold about 7 GB under ${XDG_CACHE_HOME:-~/.cache}/hf_mm_rerank, then rerun.",
                    pytrace=False)
    python = run.stdout.strip().splitlines()[-1]
    print(f"vLLM venv: {python} ({time.time() - started:.0f} s)")
    return python


def rel(got, expected) -> float:
    expected = torch.as_tensor(expected, dtype=torch.float32)
    got = torch.as_tensor(got, dtype=torch.float32).reshape(expected.shape)
    return float((got - expected).abs().max() / expected.abs().max())


class Engines:
    """Engines for one vLLM process: each a folder with LLM(...) arguments, and the calls to run on it."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp, self.engines, self._images = tmp_path, [], {}

    def image(self, image) -> str:
        key = id(image)
        if key not in self._images:
            self._images[key] = str(self.tmp / f"image-{len(self._images)}.png")  # PNG: the same pixels back
            image.save(self._images[key])
        return self._images[key]

    def add(self, name: str, llm: dict, calls: list[dict], serve: str | None = None) -> None:
        kwargs = dict(llm)
        if name.startswith(("clip", "siglip", "vtde")):  # dual encoders refuse a context above their positions
            kwargs["max_model_len"] = 64
        engine = {"name": name, "llm": {**CPU, **kwargs}, "calls": calls}
        if serve:
            engine.update(serve=serve, serve_kwargs=llm)
        self.engines.append(engine)

    def add_recipe(self, name: str, recipe, calls: list[dict]) -> None:
        """The card's recipe as it is: LLM(model=..., **engine), its serve line checked against those arguments."""
        self.add(name, {"model": recipe.model, **recipe.engine}, calls, serve=recipe.serve_line())

    def run(self, vllm_python: str) -> dict:
        task = {"result_file": str(self.tmp / "vllm-out.json"), "engines": self.engines}
        (self.tmp / "vllm-task.json").write_text(json.dumps(task))
        started = time.time()
        run = subprocess.run([vllm_python, str(ROOT / "tests" / "vllm_worker.py"), str(self.tmp / "vllm-task.json")],
                             capture_output=True, text=True, timeout=600, cwd=str(self.tmp),
                             env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert run.returncode == 0, f"the vLLM worker failed (exit {run.returncode}): {run.stderr[-4000:]}"
        results = json.loads((self.tmp / "vllm-out.json").read_text())
        print(f"vLLM process: {time.time() - started:.1f} s (import {results['_import_s']:.1f} s); engines: " +
              ", ".join(f"{e['name']} {results[e['name']].get('start_s', float('nan')):.1f} s" for e in self.engines))
        for engine in self.engines:  # the card's serve lines give the engine arguments that ran
            assert results[engine["name"]].get("serve_mismatch", []) == [], (engine["name"], engine.get("serve"))
        return results


def ok(results: dict, engine: str, call: str) -> list:
    entry = results[engine]
    assert "start_error" not in entry, f"{engine}: vLLM could not load it: {entry['start_error']}"
    assert call in entry["calls"], f"{engine}/{call}: {entry['errors'].get(call)}"
    return entry["calls"][call]


def chat_inputs(model, items, side: str, engines: Engines) -> list[dict]:
    """The card's prompts: the chat template as the transformers snippet applies it, the image as multi_modal_data."""
    featurizer, out = model.featurizer, []
    for i, cell in enumerate(items):
        item = featurizer.read(cell, i, side)
        entry = {"prompt": featurizer.render(featurizer.messages(item, side))}
        if item.image is not None:
            entry["images"] = [engines.image(cell)]
        out.append(entry)
    return out


def pair_inputs(reranker, pairs, engines: Engines) -> list[dict]:
    featurizer, out = reranker.featurizer, []
    for query, document in pairs:
        doc = MMInput(text=document) if isinstance(document, str) else MMInput(image=document)
        entry = {"prompt": featurizer.render_pair(MMInput(text=query), doc)}
        if doc.image is not None:
            entry["images"] = [engines.image(document)]
        out.append(entry)
    return out


def embed_call(name: str, model, documents, engines: Engines, lora: str | None = None) -> tuple[dict, torch.Tensor]:
    """Queries then documents, and what hf_mm_rerank gives for them."""
    inputs = chat_inputs(model, QUERIES, "query", engines) + chat_inputs(model, documents, "document", engines)
    call = {"name": name, "method": "embed", "inputs": inputs}
    if lora:
        call["lora"] = {"name": name, "path": lora}
    return call, torch.cat([model.encode(QUERIES, side="query"), model.encode(documents, side="document")])


def noisy_head(reranker) -> None:
    with torch.no_grad():  # trained heads are not zero: give them values the comparison would notice
        for parameter in (reranker.head.parameters() if reranker.head is not None else []):
            parameter.add_(torch.randn_like(parameter) * 0.1)


def test_qwen2_vl(vllm_python, tiny_path, tmp_path):
    """Qwen2-VL: the embedder as the merged export, the sentence-transformers export and the re-keyed LoRA export
    (vision-tower LoRA with --enable-tower-connector-lora); the yes/no and linear rerankers as the classifier export
    and the yes/no override. Shown failing: the adapter as training saves it (ignored by vLLM's LoRA, no error),
    vision LoRA without the tower flag (ignored), modules_to_save (refused), a classifier with its score row at the
    top level (refused), the yes/no override without the text config's tie_word_embeddings (refused). A full
    fine-tune's folder (its bare Qwen2VLModel) loads as it is."""
    base = tiny_path("qwen2_vl_h32")
    engines = Engines(tmp_path)
    documents = [solid("red", (224, 224)), photo((90, 70), 2)]
    budget = 28 * 28 * 9  # below the processor's own cap: vLLM must be told the trained budget
    # Embedder, LoRA on the language model: merged, sentence-transformers and LoRA exports.
    embedder = BiEncoder.from_pretrained(base, lora_config=LoraConfig(**LORA), query_prompt="Find the picture.",
                                         max_pixels=budget)
    embedder.save_pretrained(str(tmp_path / "embedder"))
    for format in ("merged", "sentence-transformers", "lora"):
        export(str(tmp_path / "embedder"), str(tmp_path / f"embedder-{format}"), format)
    call, expected = embed_call("embed", embedder, documents, engines)
    (merged,), _, _ = vllm_recipes(embedder, str(tmp_path / "embedder-merged"), exported="merged")
    assert merged.engine == {"runner": "pooling", "mm_processor_kwargs": {"min_pixels": 3136, "max_pixels": budget}}
    engines.add_recipe("merged", merged, [call])
    (st,), _, _ = vllm_recipes(embedder, str(tmp_path / "embedder-sentence-transformers"),
                               exported="sentence-transformers")
    engines.add_recipe("st", st, [call])
    (lora,), _, _ = vllm_recipes(embedder, str(tmp_path / "embedder-lora"), base, exported="lora")
    assert lora.engine["max_lora_rank"] == 8 and lora.base == base  # r=4: vLLM takes 1, 8, 16, ... only
    as_saved = dict(call, name="as-saved", lora={"name": "as-saved", "path": str(tmp_path / "embedder")})
    base_call, base_expected = embed_call("base", BiEncoder.from_pretrained(base, query_prompt="Find the picture.",
                                                                            max_pixels=budget), documents, engines)
    # Vision-tower LoRA (the vision blocks' qkv) and an adapter with modules_to_save.
    vision = BiEncoder.from_pretrained(base, lora_config=LoraConfig(**LORA, target_modules=["qkv", "q_proj"]),
                                       query_prompt="Find the picture.", max_pixels=budget)
    vision.save_pretrained(str(tmp_path / "vision"))
    export(str(tmp_path / "vision"), str(tmp_path / "vision-lora"), "lora")
    vision_call, vision_expected = embed_call("vision", vision, documents, engines, str(tmp_path / "vision-lora"))
    (tower,), _, _ = vllm_recipes(vision, str(tmp_path / "vision-lora"), base, exported="lora")
    assert tower.engine["enable_tower_connector_lora"] is True
    saved = BiEncoder.from_pretrained(base, lora_config=LoraConfig(**LORA, target_modules=["q_proj", "v_proj"],
                                                                   modules_to_save=["merger"]), max_pixels=budget)
    saved.save_pretrained(str(tmp_path / "saved"))
    with pytest.raises(ExportError, match="modules_to_save.*Fix: export format='merged'"):
        export(str(tmp_path / "saved"), str(tmp_path / "saved-lora"), "lora")
    saved_call = dict(call, name="modules_to_save", lora={"name": "mts", "path": str(tmp_path / "saved")})
    engines.add_recipe("lora", lora, [dict(call, lora={"name": "lora", "path": str(tmp_path / "embedder-lora")}),
                                      as_saved, base_call, vision_call, saved_call])
    engines.add_recipe("lora-tower", tower, [vision_call])
    # Mean pooling, not normalised: the pooler configuration the card gives.
    mean = BiEncoder.from_pretrained(base, lora_config=LoraConfig(**LORA), pooling="mean", normalize=False,
                                     max_pixels=budget)
    export(mean, str(tmp_path / "mean-merged"), "merged")
    mean_call, mean_expected = embed_call("mean", mean, documents, engines)
    (mean_recipe,), _, _ = vllm_recipes(mean, str(tmp_path / "mean-merged"), exported="merged")
    assert mean_recipe.engine["pooler_config"] == {"pooling_type": "MEAN", "use_activation": False}
    engines.add_recipe("mean", mean_recipe, [mean_call])
    # A full fine-tune's folder as saved (its bare Qwen2VLModel).
    full = BiEncoder.from_pretrained(base, query_prompt="Find the picture.", max_pixels=budget)
    with torch.no_grad():
        for parameter in full.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    full.save_pretrained(str(tmp_path / "full"))
    full_call, full_expected = embed_call("full", full, documents, engines)
    (full_recipe,), _, _ = vllm_recipes(full, str(tmp_path / "full"))
    assert full_recipe.export is None  # the folder as saved
    engines.add_recipe("full-as-saved", full_recipe, [full_call])
    # Rerankers: yes/no (LoRA) and linear (bias 0), as the classifier export; yes/no also through the overrides.
    pairs = [("a red square", documents[0]), ("a red square", documents[1]), ("a red square", "a square that is red")]
    yes_no = CrossEncoder.from_pretrained(base, head="yes_no", lora_config=LoraConfig(**LORA), max_pixels=budget)
    yes_no.save_pretrained(str(tmp_path / "yes_no"))
    export(str(tmp_path / "yes_no"), str(tmp_path / "yes_no-cls"), "classifier")
    export(str(tmp_path / "yes_no"), str(tmp_path / "yes_no-merged"), "merged")
    score_call = {"name": "score", "method": "classify", "inputs": pair_inputs(yes_no, pairs, engines)}
    yes_no_expected = yes_no.score(pairs)
    recipes, _, _ = vllm_recipes(yes_no, str(tmp_path / "yes_no-cls"), exported="classifier")
    engines.add_recipe("yes_no-cls", recipes[0], [score_call])
    override = vllm_recipes(yes_no, str(tmp_path / "yes_no-merged"), exported="merged")[0][1]
    assert override.engine["hf_overrides"]["text_config"] == {"tie_word_embeddings": False}
    engines.add_recipe("yes_no-override", override, [score_call])
    without = {k: v for k, v in override.engine["hf_overrides"].items() if k != "text_config"}
    engines.add("override-without-fix", {"model": override.model, **override.engine, "hf_overrides": without},
                [score_call])
    top = tmp_path / "yes_no-cls-top-level"  # the score row where transformers would put it
    shutil.copytree(tmp_path / "yes_no-cls", top)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(top / "model.safetensors"))
    weights["score.weight"] = weights.pop("language_model.score.weight")
    save_file(weights, str(top / "model.safetensors"), metadata={"format": "pt"})
    engines.add("top-level-score", {"model": str(top), **recipes[0].engine}, [score_call])
    linear = CrossEncoder.from_pretrained(base, head="linear", lora_config=LoraConfig(**LORA), max_pixels=budget)
    noisy_head(linear)
    with torch.no_grad():
        linear.head.net[0].bias.zero_()
    export(linear, str(tmp_path / "linear-cls"), "classifier")
    (linear_recipe,), _, _ = vllm_recipes(linear, str(tmp_path / "linear-cls"), exported="classifier")
    linear_call = {"name": "score", "method": "classify", "inputs": pair_inputs(linear, pairs, engines)}
    engines.add_recipe("linear-cls", linear_recipe, [linear_call])

    results = engines.run(vllm_python)
    found = {}
    for engine, call_name, want in [("merged", "embed", expected), ("st", "embed", expected),
                                    ("lora", "embed", expected), ("lora", "base", base_expected),
                                    ("lora-tower", "vision", vision_expected), ("mean", "mean", mean_expected),
                                    ("full-as-saved", "full", full_expected)]:
        found[f"{engine}/{call_name}"] = rel(ok(results, engine, call_name), want)
    found["yes_no-cls"] = rel([v[0] for v in ok(results, "yes_no-cls", "score")], yes_no_expected)
    found["yes_no-override"] = rel([v[0] for v in ok(results, "yes_no-override", "score")], yes_no_expected)
    found["linear-cls"] = rel([v[0] for v in ok(results, "linear-cls", "score")], linear.score(pairs))
    print("max relative differences:", json.dumps(found))
    assert max(found.values()) <= TOLERANCE, found
    # What vLLM cannot serve, as the card says.
    assert rel(ok(results, "lora", "as-saved"), base_expected) <= TOLERANCE  # the adapter as saved: ignored
    assert rel(ok(results, "lora", "as-saved"), expected) > 0.01
    vision_plain = torch.tensor(ok(results, "lora", "vision"))  # vision LoRA without the tower flag: images off
    assert rel(vision_plain[:2], vision_expected[:2]) <= TOLERANCE < rel(vision_plain[2:], vision_expected[2:])
    assert "modules_to_save" in results["lora"]["errors"]["modules_to_save"]
    assert "tie_word_embeddings" in results["override-without-fix"]["start_error"]
    assert "no module or parameter named 'score'" in results["top-level-score"]["start_error"]
    # The cards send each model where it ran: the saved adapter to its LoRA export (rank 8), the rest to exports.
    adapter_target = {t.engine: t for t in serving_targets(embedder, "me/model", "tiny/base")}["vLLM"]
    assert adapter_target.status == "export" and adapter_target.how.startswith(
        "python -m hf_mm_rerank.publishing.export_cli me/model OUT --format lora && vllm serve tiny/base --runner "
        "pooling --enable-lora --max-lora-rank 8 ")
    assert adapter_target.how.endswith("--lora-modules adapter=OUT")
    card = "\n".join(serving_lines(embedder, "me/model", "tiny/base"))
    assert "--format merged" in card and "tests/test_vllm.py::test_qwen2_vl" in card
    saved_target = {t.engine: t for t in serving_targets(saved, "me/model")}["vLLM"]
    assert "--format merged" in saved_target.how and "refuses modules_to_save (merger)" in saved_target.note
    full_target = {t.engine: t for t in serving_targets(full, "me/model")}["vLLM"]
    assert full_target.status == "as is" and full_target.how.startswith("vllm serve me/model --runner pooling")
    reranker_target = {t.engine: t for t in serving_targets(yes_no, "me/model")}["vLLM"]
    assert reranker_target.how == ("python -m hf_mm_rerank.publishing.export_cli me/model OUT --format classifier && "
                                   "vllm serve OUT --runner pooling --mm-processor-kwargs "
                                   "'{\"min_pixels\": 3136, \"max_pixels\": 7056}'")


def dual_inputs(model, texts, images, engines: Engines, token_ids: bool = False) -> list[dict]:
    """The card's prompts for a dual encoder: the side's prompt and the text (SigLIP: as token ids padded as
    hf_mm_rerank pads them), or an empty prompt with the image."""
    featurizer, out = model.featurizer, []
    for text in texts:
        text = featurizer.prompts.get("query", "") + text
        if token_ids:
            out.append({"prompt_token_ids": featurizer.tokenizer(text, padding="max_length", truncation=True,
                                                                 max_length=featurizer._max_length())["input_ids"]})
        else:
            out.append({"prompt": text})
    return out + [{"prompt": "", "images": [engines.image(image)]} for image in images]


def test_dual_encoders(vllm_python, tiny_path, tmp_path):
    """CLIP as the merged export; SigLIP's images as the merged export (its texts: vLLM gives transformers' unpadded
    embeddings, not hf_mm_rerank's padded ones, even from padded token ids); the VisionTextDualEncoder (the demo's
    architecture) is refused by vLLM."""
    engines = Engines(tmp_path)
    images = [solid("red", (224, 224)), photo((90, 70), 2)]
    expected, models = {}, {}
    for family, settings in (("clip", {"query_prompt": "a photo of "}), ("siglip", {}), ("vtde", {})):
        model = BiEncoder.from_pretrained(tiny_path("clip_vllm" if family == "clip" else family), lora_config=LoraConfig(**LORA), **settings)
        model.save_pretrained(str(tmp_path / family))
        export(str(tmp_path / family), str(tmp_path / f"{family}-merged"), "merged")
        models[family] = model
        expected[family] = torch.cat([model.encode(QUERIES, side="query"), model.encode(images, side="document")])
    (clip,), _, _ = vllm_recipes(models["clip"], str(tmp_path / "clip-merged"), exported="merged")
    engines.add_recipe("clip", clip, [{"name": "embed", "method": "embed",
                                       "inputs": dual_inputs(models["clip"], QUERIES, images, engines)}])
    (siglip,), _, _ = vllm_recipes(models["siglip"], str(tmp_path / "siglip-merged"), exported="merged")
    assert "images only" in siglip.inputs
    siglip_inputs = dual_inputs(models["siglip"], QUERIES, images, engines)
    engines.add_recipe("siglip", siglip, [
        {"name": "embed", "method": "embed", "inputs": siglip_inputs},
        {"name": "padded", "method": "embed", "inputs": dual_inputs(models["siglip"], QUERIES, [], engines, True)}])
    from transformers import AutoModel, AutoProcessor

    plain = AutoModel.from_pretrained(str(tmp_path / "siglip-merged")).eval()  # SigLIP texts unpadded
    tokens = AutoProcessor.from_pretrained(str(tmp_path / "siglip-merged")).tokenizer(QUERIES[:1], return_tensors="pt")
    with torch.no_grad():
        unpadded = plain.get_text_features(**tokens)
    unpadded = torch.nn.functional.normalize(getattr(unpadded, "pooler_output", unpadded), dim=-1)
    recipes, reason, test = vllm_recipes(models["vtde"], str(tmp_path / "vtde-merged"), exported="merged")
    assert recipes == [] and "no VisionTextDualEncoderModel" in reason and test == "test_dual_encoders"
    engines.add("vtde", {"model": str(tmp_path / "vtde-merged"), "runner": "pooling"},
                [{"name": "embed", "method": "embed", "inputs": [{"prompt": QUERIES[0]}]}])

    results = engines.run(vllm_python)
    siglip_out = torch.tensor(ok(results, "siglip", "embed"))
    found = {"clip": rel(ok(results, "clip", "embed"), expected["clip"]),
             "siglip images": rel(siglip_out[2:], expected["siglip"][2:]),
             "siglip text vs transformers unpadded": rel(siglip_out[:1], unpadded)}
    print("max relative differences:", json.dumps(found))
    assert max(found.values()) <= TOLERANCE, found
    # SigLIP's texts: not hf_mm_rerank's (padded) embeddings, neither as text nor as padded token ids.
    assert rel(siglip_out[:2], expected["siglip"][:2]) > 0.01
    assert rel(ok(results, "siglip", "padded"), expected["siglip"][:2]) > 0.01
    assert "'VisionTextDualEncoderProcessor' object has no attribute '_get_num_multimodal_tokens'" in \
        results["vtde"]["start_error"], results["vtde"]
    targets = {family: {t.engine: t for t in serving_targets(models[family], "me/model")}["vLLM"] for family in models}
    assert targets["clip"].how == ("python -m hf_mm_rerank.publishing.export_cli me/model OUT --format merged && "
                                   "vllm serve OUT --runner pooling")
    assert targets["vtde"].status == "no" and "test_vllm.py::test_dual_encoders" in targets["vtde"].note


def test_qwen2_5_vl_and_qwen3_vl(vllm_python, tiny_path, tmp_path):
    """Qwen2.5-VL and Qwen3-VL (``convert="embed"``): the embedder as the merged and the LoRA export, the yes/no
    reranker as the classifier export (Qwen2.5-VL's score row inside the language model, Qwen3-VL's at the top level)
    and through the overrides; one vLLM process for both families."""
    engines = Engines(tmp_path)
    documents = [solid("red", (224, 224)), photo((90, 70), 2)]
    pairs = [("a red square", documents[0]), ("a red square", documents[1]), ("a red square", "a square that is red")]
    expected, rerankers = {}, {}
    for family, budget in (("qwen2_5_vl", 28 * 28 * 9), ("qwen3_vl", 32 * 32 * 9)):
        base = tiny_path(f"{family}_h32")
        embedder = BiEncoder.from_pretrained(base, lora_config=LoraConfig(**LORA), query_prompt="Find the picture.",
                                             document_prompt="Describe it.", max_pixels=budget)
        embedder.save_pretrained(str(tmp_path / family))
        for format in ("merged", "lora"):
            export(str(tmp_path / family), str(tmp_path / f"{family}-{format}"), format)
        call, expected[family] = embed_call("embed", embedder, documents, engines)
        (merged,), _, _ = vllm_recipes(embedder, str(tmp_path / f"{family}-merged"), exported="merged")
        assert merged.engine["convert"] == "embed"
        engines.add_recipe(f"{family}-merged", merged, [call])
        (lora,), _, _ = vllm_recipes(embedder, str(tmp_path / f"{family}-lora"), base, exported="lora")
        engines.add_recipe(f"{family}-lora", lora, [dict(call, lora={"name": family, "path": lora.source})])
        reranker = CrossEncoder.from_pretrained(base, head="yes_no", lora_config=LoraConfig(**LORA), max_pixels=budget)
        reranker.save_pretrained(str(tmp_path / f"{family}-yes_no"))
        for format in ("classifier", "merged"):
            export(str(tmp_path / f"{family}-yes_no"), str(tmp_path / f"{family}-yes_no-{format}"), format)
        score_call = {"name": "score", "method": "classify", "inputs": pair_inputs(reranker, pairs, engines)}
        (classifier,), _, _ = vllm_recipes(reranker, str(tmp_path / f"{family}-yes_no-classifier"),
                                           exported="classifier")
        engines.add_recipe(f"{family}-cls", classifier, [score_call])
        override = vllm_recipes(reranker, str(tmp_path / f"{family}-yes_no-merged"), exported="merged")[0][1]
        engines.add_recipe(f"{family}-override", override, [score_call])
        rerankers[family] = reranker.score(pairs)

    results = engines.run(vllm_python)
    found = {}
    for family in ("qwen2_5_vl", "qwen3_vl"):
        for engine in ("merged", "lora"):
            found[f"{family}-{engine}"] = rel(ok(results, f"{family}-{engine}", "embed"), expected[family])
        for engine in ("cls", "override"):
            found[f"{family}-{engine}"] = rel([v[0] for v in ok(results, f"{family}-{engine}", "score")],
                                              rerankers[family])
    print("max relative differences:", json.dumps(found))
    assert max(found.values()) <= TOLERANCE, found


def test_a_user_path_trained_exported_served_retrieve_and_rerank(vllm_python, tmp_path):
    """The path a user walks: the reranker demo's Qwen2-VL base (built offline) trained on the emoji data as an
    embedder (LoRA, in-batch contrastive) and as a yes/no reranker (full fine-tune, as the demo), saved, exported
    (merged; classifier) and served by vLLM in a fresh process with the card's LLM(...) arguments. Retrieval and
    retrieve-then-rerank computed from vLLM's embeddings and scores give the same rankings, so the same metrics, as
    hf_mm_rerank's evaluators on the trained models."""
    from transformers import TrainingArguments

    from hf_mm_rerank import BiEncoderTrainer, CrossEncoderTrainer, RetrievalEvaluator
    from hf_mm_rerank.recipes_kit.data import random_negatives
    from hf_mm_rerank.recipes_kit.demo import build_demo_reranker_base, emoji_splits
    from hf_mm_rerank.retrieval import core
    from hf_mm_rerank.retrieval.evaluation import ranking_metrics
    from hf_mm_rerank.retrieval.two_stage import RetrieveRerankEvaluator

    base = build_demo_reranker_base(tmp_path / "base")
    train, test = emoji_splits(test_fraction=0.25, limit=128)
    test = test.select(range(min(24, len(test))))

    def args(name: str) -> TrainingArguments:
        return TrainingArguments(str(tmp_path / name), max_steps=6, per_device_train_batch_size=16, learning_rate=1e-3,
                                 report_to="none", save_strategy="no", logging_steps=100, seed=0, use_cpu=True)

    torch.manual_seed(0)
    embedder = BiEncoder.from_pretrained(base, lora_config=LoraConfig(r=8, lora_alpha=16), query_prompt="Find the emoji.")
    before = embedder.encode(test["query"][:2], side="query")
    BiEncoderTrainer(model=embedder, args=args("embedder-run"), train_dataset=train).train()
    assert rel(embedder.encode(test["query"][:2], side="query"), before) > 1e-3  # training moved it
    embedder.save_pretrained(str(tmp_path / "embedder"))
    export(str(tmp_path / "embedder"), str(tmp_path / "embedder-merged"), "merged")
    reranker = CrossEncoder.from_pretrained(base, head="yes_no")
    CrossEncoderTrainer(model=reranker, args=args("reranker-run"), train_dataset=random_negatives(train, 3)).train()
    reranker.save_pretrained(str(tmp_path / "reranker"))
    export(str(tmp_path / "reranker"), str(tmp_path / "reranker-cls"), "classifier")

    queries, documents = list(test["query"]), list(test["positive"])
    n, top = len(queries), 4
    ids = list(range(n))
    relevant = {i: {i} for i in ids}
    ours = RetrievalEvaluator(dict(zip(ids, queries)), dict(zip(ids, documents)), relevant, k_values=(1, 5, 10))
    ours_rankings = ours.rankings(embedder, n)
    two_stage = RetrieveRerankEvaluator(embedder, dict(zip(ids, queries)), dict(zip(ids, documents)), relevant,
                                        top_k=top, k_values=(1, 4))
    ours_two_stage = two_stage(reranker)

    engines = Engines(tmp_path)
    embed_inputs = chat_inputs(embedder, queries, "query", engines) + chat_inputs(embedder, documents, "document",
                                                                                  engines)
    (served_embedder,), _, _ = vllm_recipes(embedder, str(tmp_path / "embedder-merged"), exported="merged")
    engines.add_recipe("embedder", served_embedder, [{"name": "embed", "method": "embed", "inputs": embed_inputs}])
    every_pair = [(query, document) for query in queries for document in documents]  # vLLM's candidates: any of them
    (served_reranker,), _, _ = vllm_recipes(reranker, str(tmp_path / "reranker-cls"), exported="classifier")
    engines.add_recipe("reranker", served_reranker, [{"name": "score", "method": "classify",
                                                      "inputs": pair_inputs(reranker, every_pair, engines)}])
    results = engines.run(vllm_python)

    vectors = torch.tensor(ok(results, "embedder", "embed"))
    _, best = core.top_k(core.DENSE, vectors[:n], vectors[n:], n)
    served_rankings = best.tolist()
    assert served_rankings == ours_rankings, "vLLM's embeddings rank the corpus otherwise"
    assert ranking_metrics(served_rankings, [relevant[i] for i in ids], (1, 5, 10), 100) == ours(embedder)
    scores = torch.tensor([v[0] for v in ok(results, "reranker", "score")]).view(n, n)
    candidates = [row[:top] for row in served_rankings]
    order = core.rank_groups([[float(scores[q, d]) for d in row] for q, row in enumerate(candidates)])
    reranked = [[row[i] for i in ranked] for row, ranked in zip(candidates, order)]
    served_two_stage = ranking_metrics(reranked, [relevant[i] for i in ids], (1, 4), top)
    assert served_two_stage == {k: v for k, v in ours_two_stage.items() if k in served_two_stage}
    assert rel(scores.flatten()[:top], reranker.score(every_pair[:top])) <= TOLERANCE
    print("ours:", json.dumps(ours(embedder)), json.dumps(ours_two_stage))


def test_multi_vector_qwen3_vl(vllm_python, tiny_path, tmp_path):
    """A Qwen3-VL multi-vector model (LoRA, the token projection in modules_to_save) as the merged export, the ColQwen3
    layout vLLM's late-interaction runner loads (sharded so that vLLM reads the projection's bias after its weight):
    its ``token_embed`` vectors are this model's token embeddings (every
    token, scored_tokens="all"), so MaxSim over them is this model's score. With scored_tokens="content" vLLM's
    vectors at the content positions are this model's, and MaxSim over all of vLLM's differs, as the card says. A
    Qwen2-VL multi-vector model has no layout vLLM loads: the export refuses it, and the card says why."""
    from hf_mm_rerank import MultiVectorEncoder
    from hf_mm_rerank.retrieval.core import maxsim

    engines = Engines(tmp_path)
    base, budget = tiny_path("qwen3_vl_h32"), 32 * 32 * 9
    documents = [solid("red", (224, 224)), photo((90, 70), 2)]
    models, expected, features = {}, {}, {}
    for scored in ("all", "content"):
        torch.manual_seed(0)
        model = MultiVectorEncoder.from_pretrained(base, lora_config=LoraConfig(**LORA), dim=32, scored_tokens=scored,
                                                   query_prompt="Find the picture.", max_pixels=budget)
        model.save_pretrained(str(tmp_path / scored))
        report = export(str(tmp_path / scored), str(tmp_path / f"{scored}-merged"), "merged")
        assert "ColQwen3" in " ".join(report.notes)
        (recipe,), _, test = vllm_recipes(model, str(tmp_path / f"{scored}-merged"), exported="merged")
        assert recipe.task == "token_embed" and test == "test_multi_vector_qwen3_vl"
        inputs = chat_inputs(model, QUERIES, "query", engines) + chat_inputs(model, documents, "document", engines)
        engines.add_recipe(scored, recipe, [{"name": "tokens", "method": "token_embed", "inputs": inputs}])
        items = [(q, "query") for q in QUERIES] + [(d, "document") for d in documents]
        # vLLM is compared with the export as hf_mm_rerank loads it (the export's own check bounds its distance to the
        # trained model at 1e-5: the LoRA merge's rounding, up to 8.8e-6 on these random adapters, is not vLLM's)
        model = MultiVectorEncoder.from_pretrained(str(tmp_path / f"{scored}-merged"))
        expected[scored] = [model.encode([item], side=side) for item, side in items]
        features[scored] = [model.featurizer([model.featurizer.read(item, 0, side)], side)["token_mask"][0]
                            for item, side in items]
        models[scored] = model
    results = engines.run(vllm_python)

    found = {}
    for scored in ("all", "content"):
        served = [torch.tensor(vectors) for vectors in ok(results, scored, "tokens")]
        for i, (mine, mask) in enumerate(zip(expected[scored], features[scored])):
            assert served[i].shape[0] == mask.shape[0]  # one vector per token of the prompt
            found[f"{scored}/{i}"] = rel(served[i][mask], mine.embeddings[0][mine.mask[0]])
        if scored == "all":  # MaxSim over vLLM's vectors is this model's score
            ones = [torch.ones(len(v), dtype=torch.bool) for v in served]
            model = models[scored]
            mine = model.score(model.encode(QUERIES, side="query"), model.encode(documents, side="document"))
            theirs = torch.tensor([[float(maxsim(served[q][None], ones[q][None], served[d][None], ones[d][None]))
                                    for d in (2, 3)] for q in (0, 1)])
            found["all/maxsim"] = rel(theirs, mine)
        else:  # every token's vector: MaxSim over them all is not this model's
            whole = float(maxsim(served[0][None], torch.ones(1, len(served[0]), dtype=torch.bool), served[2][None],
                                 torch.ones(1, len(served[2]), dtype=torch.bool)))
            mine = float(models[scored].score(expected[scored][0], expected[scored][2]))
            assert abs(whole - mine) > 0.01 * abs(mine)
    print("max relative differences:", json.dumps(found))
    assert max(found.values()) <= TOLERANCE, found
    qwen2 = MultiVectorEncoder.from_pretrained(tiny_path("qwen2_vl_h32"), lora_config=LoraConfig(**LORA), dim=32)
    recipes, reason, _ = vllm_recipes(qwen2, "me/model")
    assert recipes == [] and "no layout for a multi-vector qwen2_vl model" in reason, reason
    with pytest.raises(ExportError, match="has no export.*no ColQwen2 layout"):
        export(qwen2, str(tmp_path / "qwen2-merged"), "merged")

