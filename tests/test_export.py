"""Exports for serving engines: each reloads with its target loader (plain transformers in a subprocess without peft
and hf_mm_rerank; sentence-transformers) and equals the trained model, or the export fails and leaves nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import assert_rel_close
from images import solid
from peft import LoraConfig
from test_cross_encoder import PLAIN_PROMPT, _bert_classifier

from hf_mm_rerank import BiEncoder, CrossEncoder
from hf_mm_rerank.publishing.export import export
from hf_mm_rerank.publishing.export_check import ExportError, probe_outputs

LORA = dict(r=4, lora_alpha=8, init_lora_weights=False)


def _saved(model, path) -> str:
    model.save_pretrained(str(path))
    return str(path)


@pytest.mark.parametrize("family, settings", [
    ("clip", {"lora_config": LoraConfig(**LORA, modules_to_save=["visual_projection"])}),
    ("qwen2_vl", {"lora_config": LoraConfig(**LORA), "query_prompt": "Find the image."}),
    ("qwen2_vl", {}),
], ids=["clip-with-modules_to_save", "qwen2_vl", "qwen2_vl-full-fine-tune"])
def test_merged_bi_encoder_loads_in_plain_transformers_in_the_base_architecture(tiny_path, tmp_path, family, settings):
    """A full fine-tune too: saved as its bare *Model, it goes back inside *ForConditionalGeneration."""
    model = BiEncoder.from_pretrained(tiny_path(family), **settings)
    if not settings:  # a full fine-tune: every weight moved
        torch.manual_seed(0)
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.01 * torch.randn_like(param))
    source = _saved(model, tmp_path / "trained")
    report = export(source, str(tmp_path / "merged"), "merged")
    assert report.difference <= 1e-5 and "without peft and hf_mm_rerank" in report.loader
    out = tmp_path / "merged"
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").is_file()
    base_arch = json.loads((open(os.path.join(tiny_path(family), "config.json"))).read())["architectures"]
    assert json.loads((out / "config.json").read_text())["architectures"] == base_arch  # e.g. ...ForConditionalGeneration
    assert (out / "preprocessor_config.json").is_file() or (out / "processor_config.json").is_file()
    card = (out / "README.md").read_text()
    assert "## Serving" in card and "## Usage" in card and "from_pretrained(MODEL)" in card
    assert str(tmp_path) not in card and "/trained" not in card  # no local path in a card
    assert_rel_close(BiEncoder.from_pretrained(str(out)).encode(["a red square"]), model.encode(["a red square"]))


def test_sentence_transformers_export_of_a_model_with_its_base_inside(tiny_path, tmp_path):
    """The demo's layout (the base saved inside the folder, which sentence-transformers cannot find from elsewhere):
    its export loads in sentence-transformers in a fresh process, from another working directory."""
    import shutil

    folder = tmp_path / "demo"
    shutil.copytree(tiny_path("vtde"), folder / "_base_model")
    model = BiEncoder.from_pretrained(str(folder / "_base_model"), lora_config=LoraConfig(**LORA))
    model.save_pretrained(str(folder))
    assert any("stored inside this folder" in note for note in BiEncoder.from_pretrained(str(folder)).spec
               .sentence_transformers)
    report = export(str(folder), str(tmp_path / "st"), "sentence-transformers")
    assert report.loader == "sentence-transformers" and report.difference <= 1e-5
    expected = model.encode(["a red square", solid("red")], side="document")
    torch.save(expected, tmp_path / "expected.pt")
    code = ("import sys, torch; from sentence_transformers import SentenceTransformer; from PIL import Image; "
            f"st = SentenceTransformer({str(tmp_path / 'st')!r}, device='cpu'); "
            "got = torch.cat([st.encode_document(['a red square'], convert_to_tensor=True), "
            "st.encode_document([Image.new('RGB', (40, 30), (230, 20, 20))], convert_to_tensor=True)]); "
            f"torch.save(got, {str(tmp_path / 'got.pt')!r})")
    run = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path.parent), capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert_rel_close(torch.load(tmp_path / "got.pt"), expected)


def test_classifier_exports_of_rerankers(tiny_path, tmp_path):
    yes_no = CrossEncoder.from_pretrained(tiny_path("qwen2_vl"), head="yes_no", lora_config=LoraConfig(**LORA))
    report = export(_saved(yes_no, tmp_path / "yes_no"), str(tmp_path / "yes_no-cls"), "classifier")
    config = json.loads((tmp_path / "yes_no-cls" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2VLForSequenceClassification"] and config["num_labels"] == 1
    assert report.difference <= 1e-5 and any("vLLM serves this checkpoint" in note for note in report.notes)
    # A two-logit text cross-encoder becomes one logit (logit[1] - logit[0]), loaded by AutoModelForSequenceClassification.
    bert = CrossEncoder.from_pretrained(_bert_classifier(tmp_path, bare=True), head="classification", num_labels=2,
                                        lora_config=LoraConfig(**LORA))
    report = export(_saved(bert, tmp_path / "bert"), str(tmp_path / "bert-cls"), "classifier")
    assert report.difference <= 1e-5
    assert len(json.loads((tmp_path / "bert-cls" / "config.json").read_text())["id2label"]) == 1
    # Heads with no one-row form are refused with the reason, and nothing is written.
    mlp = CrossEncoder.from_pretrained(tiny_path("qwen2_vl"), head="mlp", **PLAIN_PROMPT)
    with pytest.raises(ExportError, match="an mlp head .* is not one score row"):
        export(mlp, str(tmp_path / "mlp-cls"), "classifier")
    linear = CrossEncoder.from_pretrained(tiny_path("qwen2_vl"), head="linear", **PLAIN_PROMPT)
    with torch.no_grad():
        linear.head.net[0].bias.fill_(0.25)
    with pytest.raises(ExportError, match=r"the linear head has a bias \(0\.25\).*format='sentence-transformers'"):
        export(linear, str(tmp_path / "linear-cls"), "classifier")
    with torch.no_grad():
        linear.head.net[0].bias.zero_()
    assert export(linear, str(tmp_path / "linear-cls"), "classifier").difference <= 1e-5
    assert not (tmp_path / "mlp-cls").exists()
    with pytest.raises(ExportError, match="format='classifier' is for rerankers"):
        export(BiEncoder.from_pretrained(tiny_path("clip")), str(tmp_path / "bi-cls"), "classifier")


def test_a_qlora_export_equals_its_full_precision_base_plus_adapter(tiny_path, tmp_path):
    from transformers import BitsAndBytesConfig

    model = BiEncoder.from_pretrained(tiny_path("qwen2_vl"), lora_config=LoraConfig(**LORA),
                                      quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    source = _saved(model, tmp_path / "qlora")
    report = export(source, str(tmp_path / "merged"), "merged")
    full = BiEncoder.from_pretrained(source, quantization_config=False)
    assert_rel_close(BiEncoder.from_pretrained(str(tmp_path / "merged")).encode(["a red square"]),
                     full.encode(["a red square"]))
    assert report.difference <= 1e-5 and report.quantized_difference is not None and report.quantized_difference > 0
    card = (tmp_path / "merged" / "README.md").read_text()
    assert f"{report.quantized_difference:.1e} from the 4/8-bit model" in card


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_half_precision_export_is_checked_at_its_own_precision(tiny_path, tmp_path, dtype):
    """The README's `--dtype bfloat16`: the reloaded export differs from the trained model by float rounding of that
    precision (a few of its epsilons), which the check allows; float32's 1e-5 would refuse every such export."""
    from hf_mm_rerank.publishing.export_check import tolerance

    source = _saved(BiEncoder.from_pretrained(tiny_path("qwen2_vl"), lora_config=LoraConfig(**LORA)), tmp_path / "t")
    report = export(source, str(tmp_path / "half"), "merged", dtype=dtype)
    assert 1e-5 < report.difference <= tolerance(dtype) == 4 * torch.finfo(getattr(torch, dtype)).eps
    assert json.loads((tmp_path / "half" / "config.json").read_text()).get("dtype") == dtype
    assert tolerance(None) == tolerance("float32") == 1e-5


def test_a_mismatching_export_is_an_error_and_leaves_nothing(tiny_path, tmp_path, monkeypatch):
    import hf_mm_rerank.publishing.export as module

    model = BiEncoder.from_pretrained(tiny_path("clip"), lora_config=LoraConfig(**LORA))
    monkeypatch.setattr(module, "reload_outputs", lambda folder, format, m: (probe_outputs(m) * 1.01, "a broken loader"))
    with pytest.raises(ExportError, match=r"does not reproduce the trained model: reloaded with a broken loader, its "
                                          r"outputs differ by 1\.0\de-02 of their scale"):
        export(model, str(tmp_path / "out"), "merged")
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".export")]
    with pytest.raises(FileExistsError, match="overwrite"):
        export(model, str(tmp_path), "merged", verify=False)


def test_the_command_line(tiny_path, tmp_path):
    source = _saved(BiEncoder.from_pretrained(tiny_path("siglip"), lora_config=LoraConfig(**LORA)), tmp_path / "s")
    run = subprocess.run([sys.executable, "-m", "hf_mm_rerank.publishing.export_cli", source, str(tmp_path / "out"), "--format",
                          "sentence-transformers"], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    assert "sentence-transformers export in" in run.stdout and "reloaded with sentence-transformers" in run.stdout


@pytest.fixture()
def foreign_qwen3_vl_mapping():
    """A key conversion for every ``qwen3_vl`` model registered process-wide, as colpali-engine 0.3.18 registers
    ColQwen3's on import (``^model.`` -> ``""``); the registry is restored afterwards."""
    from transformers import conversion_mapping as mapping
    from transformers.core_model_loading import WeightRenaming

    mapping.get_checkpoint_conversion_mapping("qwen3_vl")  # builds the cache
    cache, registered = mapping._checkpoint_conversion_mapping_cache, mapping.USER_REGISTERED_MAPPINGS
    saved = (cache.get("qwen3_vl"), "qwen3_vl" in registered)
    mapping.register_checkpoint_conversion_mapping("qwen3_vl", [WeightRenaming(source_patterns=r"^model\.",
                                                                               target_patterns="")], overwrite=True)
    yield
    cache.pop("qwen3_vl", None)
    registered.discard("qwen3_vl")
    if saved[0] is not None:
        cache["qwen3_vl"] = saved[0]
    if saved[1]:
        registered.add("qwen3_vl")


def test_exports_keep_transformers_key_layout_when_another_library_registered_one(tiny_path, tmp_path,
                                                                                   foreign_qwen3_vl_mapping):
    """The full CI run failed here: after test_late_interaction imported colpali-engine, the Qwen3-VL merged export
    held model.model.* keys and plain transformers loaded random weights. Saving in transformers' own layout while
    a foreign mapping is registered: the merged export and a full fine-tune's folder load in plain transformers."""
    import transformers
    from safetensors import safe_open

    base = tiny_path("qwen3_vl")
    plain = transformers.Qwen3VLForConditionalGeneration.from_pretrained(base)
    plain.save_pretrained(str(tmp_path / "plain"))  # what the registration does to a plain save (the hazard is real)
    with safe_open(str(tmp_path / "plain" / "model.safetensors"), "pt") as handle:
        assert any(k.startswith("model.model.") for k in handle.keys())
    model = BiEncoder.from_pretrained(base, lora_config=LoraConfig(**LORA), query_prompt="Find the image.")
    report = export(model, str(tmp_path / "merged"), "merged")  # verified in a plain-transformers subprocess
    assert report.difference <= 1e-5
    with safe_open(str(tmp_path / "merged" / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
    assert "lm_head.weight" in keys and not any(k.startswith("model.model.") for k in keys)
    full = BiEncoder.from_pretrained(base)
    full.save_pretrained(str(tmp_path / "full"))
    with safe_open(str(tmp_path / "full" / "model.safetensors"), "pt") as handle:
        assert not any(k.startswith("model.") for k in handle.keys())  # a bare Qwen3VLModel: language_model.*, visual.*


def test_a_qwen3_vl_multi_vector_merged_export_is_the_colqwen3_layout(tiny_path, tmp_path):
    """The layout vLLM's late-interaction runner loads (tests/test_vllm.py::test_multi_vector_qwen3_vl serves it):
    architectures ColQwen3, no embed_dim (vLLM would drop the bias), the projection's bias in a shard after its
    weight; checked in plain transformers, and MultiVectorEncoder loads it back with the same token vectors."""
    from hf_mm_rerank import MultiVectorEncoder

    torch.manual_seed(0)
    model = MultiVectorEncoder.from_pretrained(tiny_path("qwen3_vl"), lora_config=LoraConfig(**LORA), dim=16)
    report = export(model, str(tmp_path / "merged"), "merged")
    assert report.difference <= 1e-5 and "ColQwen3" in report.notes[0]
    config = json.load(open(tmp_path / "merged" / "config.json"))
    assert config["architectures"] == ["ColQwen3"] and "embed_dim" not in config
    weight_map = json.load(open(tmp_path / "merged" / "model.safetensors.index.json"))["weight_map"]
    assert weight_map["custom_text_proj.weight"] < weight_map["custom_text_proj.bias"]  # files vLLM reads in order
    assert "lm_head.weight" in weight_map and "model.language_model.norm.weight" in weight_map
    again = MultiVectorEncoder.from_pretrained(str(tmp_path / "merged"))
    mine, theirs = model.encode(["a red square"]), again.encode(["a red square"])
    assert_rel_close(theirs.embeddings[theirs.mask], mine.embeddings[mine.mask], 1e-5)
    with pytest.raises(ExportError, match="exports only as format='merged' .the ColQwen3 layout"):
        export(model, str(tmp_path / "st"), "sentence-transformers")
    qwen2 = MultiVectorEncoder.from_pretrained(tiny_path("qwen2_vl"), lora_config=LoraConfig(**LORA), dim=16)
    with pytest.raises(ExportError, match="no ColQwen2 layout"):
        export(qwen2, str(tmp_path / "qwen2"), "merged")
    assert not (tmp_path / "qwen2").exists()


def test_a_dual_encoder_multi_vector_export_is_refused_with_the_reason(tiny_path, tmp_path):
    from hf_mm_rerank import MultiVectorEncoder

    model = MultiVectorEncoder.from_pretrained(tiny_path("clip"), dim=16)
    with pytest.raises(ExportError, match="multi-vector clip model has no export.*serves no multi-vector dual encoder"):
        export(model, str(tmp_path / "out"), "merged")
    with pytest.raises(ExportError, match="has no export"):
        export(model, str(tmp_path / "out"), "sentence-transformers")
    assert not (tmp_path / "out").exists()
