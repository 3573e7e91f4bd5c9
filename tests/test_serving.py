"""Saved folders load, unchanged, in sentence-transformers 6.2 (a test extra, never a dependency) and give this
library's embeddings and scores: every bi-encoder family and every reranker head, from another folder and from the
loopback Hub with an empty cache."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import assert_rel_close
from images import solid
from peft import LoraConfig
from test_cross_encoder import PLAIN_PROMPT, _bert_classifier
from test_pixels import jpeg, photo, upright

from hf_mm_rerank import BiEncoder, CrossEncoder

pytest.importorskip("sentence_transformers")  # a test extra; scripts/setup.sh installs it

ST = 1e-5  # relative to scale (the bar); observed: 0 to 3e-7
LORA = dict(r=4, lora_alpha=8, init_lora_weights=False)  # random non-zero adapters: the adapter must take effect
QUERIES = ["a red square", "two cats on a sofa"]
DOCUMENTS = [solid("red", (40, 30)), photo((90, 70), 2), jpeg(photo((640, 480), 3)), "a square that is red"]


def _moved(model, tmp_path):
    """Save, then move the folder: what is loaded never depends on where it was written."""
    model.save_pretrained(str(tmp_path / "saved"))
    shutil.move(str(tmp_path / "saved"), str(tmp_path / "elsewhere"))
    return str(tmp_path / "elsewhere")


BI_CASES = {
    "clip": ("clip", {"query_prompt": "a photo of "}),
    "siglip": ("siglip", {}),
    "vtde": ("vtde", {}),
    "qwen2_vl-last": ("qwen2_vl", {"query_prompt": "Retrieve images relevant to the query."}),
    "qwen3_vl-last": ("qwen3_vl", {"query_prompt": "Find the picture.", "document_prompt": "Describe it."}),
    "qwen2_vl-mean": ("qwen2_vl", {"pooling": "mean"}),
}


@pytest.mark.parametrize("case", list(BI_CASES))
def test_sentence_transformer_loads_the_folder_and_gives_our_embeddings(tiny_path, tmp_path, monkeypatch, case):
    from sentence_transformers import SentenceTransformer

    family, settings = BI_CASES[case]
    model = BiEncoder.from_pretrained(tiny_path(family), lora_config=LoraConfig(**LORA), **settings)
    folder = _moved(model, tmp_path)
    monkeypatch.chdir(tmp_path)
    st = SentenceTransformer(folder, device="cpu")
    ours_q, ours_d = model.encode(QUERIES, side="query"), model.encode(DOCUMENTS, side="document")
    assert_rel_close(st.encode_query(QUERIES, convert_to_tensor=True), ours_q, ST, msg="queries")
    as_st = [upright(d) if isinstance(d, bytes) else d for d in DOCUMENTS]  # it takes decoded images, not file bytes
    # (one call per input: sentence-transformers encodes a dual encoder's text and images in separate batches)
    got = torch.cat([st.encode_document([d], convert_to_tensor=True) for d in as_st])
    assert_rel_close(got, ours_d, ST, msg="documents")
    assert torch.allclose(ours_q.norm(dim=-1), torch.ones(2))  # normalised, as ours: the similarity is the cosine
    assert st.similarity_fn_name == "cosine"
    if family.startswith("qwen"):  # image and text in one input, image first (as listed in the folder's notes)
        both = [{"image": solid("blue"), "text": "a blue square"}]
        assert_rel_close(st.encode_document(both, convert_to_tensor=True), model.encode(both, side="document"), ST)
        assert any("image first" in note for note in model.spec.sentence_transformers)
    else:
        assert any("refused by sentence-transformers" in note for note in model.spec.sentence_transformers)


RERANK_CASES = {
    "yes_no-qwen2_vl": ("qwen2_vl", {"head": "yes_no"}),
    "yes_no-qwen3_vl": ("qwen3_vl", {"head": "yes_no", "assistant_prefix": "\n\n", "instruction": "Match colours."}),
    "linear": ("qwen2_vl", {"head": "linear", **PLAIN_PROMPT}),
    "mlp": ("qwen2_vl", {"head": "mlp"}),
    "classification": ("bert", {"head": "classification"}),
    "classification-2-labels": ("bert", {"head": "classification", "num_labels": 2}),
}
PAIRS = [("a red square", solid("red")), ("a red square", "a square that is red"),
         ("dogs", {"image": solid("blue"), "text": "a dog"}), ({"image": solid("green"), "text": "find it"}, solid("red"))]
TEXT_PAIRS = [("a red square", "the square is red"), ("which colour", "blue, mostly"), ("q", "a longer document " * 3)]


@pytest.mark.parametrize("case", list(RERANK_CASES))
def test_sentence_transformers_cross_encoder_loads_the_folder_and_gives_our_scores(tiny_path, tmp_path, monkeypatch,
                                                                                  case):
    from sentence_transformers import CrossEncoder as STCrossEncoder

    family, settings = RERANK_CASES[case]
    base = _bert_classifier(tmp_path, bare=True) if family == "bert" else tiny_path(family)
    reranker = CrossEncoder.from_pretrained(base, lora_config=LoraConfig(**LORA), **settings)
    with torch.no_grad():  # trained heads are not zero: give them values the comparison would notice
        for parameter in (reranker.head.parameters() if reranker.head is not None else []):
            parameter.add_(torch.randn_like(parameter) * 0.1)
    folder = _moved(reranker, tmp_path)
    monkeypatch.chdir(tmp_path)
    st = STCrossEncoder(folder, device="cpu")
    pairs = TEXT_PAIRS if family == "bert" else PAIRS
    assert_rel_close(st.predict(pairs, convert_to_tensor=True), reranker.score(pairs), ST)  # raw logits, no sigmoid


def test_the_loopback_hub_with_an_empty_cache(hub, tiny_path, tmp_path):
    """Pushed (base and adapter as Hub repos), then loaded by sentence-transformers into an empty cache."""
    from huggingface_hub import HfApi
    from sentence_transformers import SentenceTransformer

    api = HfApi()
    api.create_repo("tiny/qwen2-vl-base")
    api.upload_folder(repo_id="tiny/qwen2-vl-base", folder_path=tiny_path("qwen2_vl"))
    model = BiEncoder.from_pretrained("tiny/qwen2-vl-base", lora_config=LoraConfig(**LORA), query_prompt="Find it.")
    model.save_pretrained(str(tmp_path / "out"))
    api.create_repo("me/embedder")
    api.upload_folder(repo_id="me/embedder", folder_path=str(tmp_path / "out"))
    st = SentenceTransformer("me/embedder", device="cpu", cache_folder=str(tmp_path / "empty-cache"))
    assert_rel_close(st.encode_query(QUERIES, convert_to_tensor=True), model.encode(QUERIES), ST)
    assert_rel_close(st.encode_document(DOCUMENTS[:2], convert_to_tensor=True),  # (PIL images)
                     model.encode(DOCUMENTS[:2], side="document"), ST)


def test_the_serving_check_names_the_engines_that_take_the_adapter_as_it_is(tiny_path, tmp_path):
    from hf_mm_rerank.publishing.serving import serving_targets

    def engines(model):
        return {t.engine: t for t in serving_targets(model, "me/model", "tiny/base")}

    plain = engines(BiEncoder.from_pretrained(tiny_path("qwen2_vl"), lora_config=LoraConfig(r=4)))
    # vLLM ignores the adapter as saved (test_vllm.py::test_qwen2_vl): the re-keyed LoRA export, rank 4 -> 8
    assert plain["vLLM"].status == "export" and "--format lora && vllm serve tiny/base" in plain["vLLM"].how
    assert "--enable-lora --max-lora-rank 8" in plain["vLLM"].how and "adapter=OUT" in plain["vLLM"].how
    assert plain["sentence-transformers"].status == "as is" and plain["TEI"].status == "no"
    saved = engines(BiEncoder.from_pretrained(tiny_path("qwen2_vl"), lora_config=LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["merger"])))
    assert saved["vLLM"].status == "export" and "refuses modules_to_save (merger)" in saved["vLLM"].note
    assert saved["vLLM"].how.startswith("python -m hf_mm_rerank.publishing.export_cli me/model OUT --format merged && vllm serve OUT")
    vision = engines(BiEncoder.from_pretrained(tiny_path("qwen2_vl"), lora_config=LoraConfig(
        r=4, target_modules=["qkv", "q_proj"])))  # qkv: the vision blocks' attention
    assert vision["vLLM"].status == "export" and "--enable-tower-connector-lora" in vision["vLLM"].how
    reranker = engines(CrossEncoder.from_pretrained(tiny_path("qwen2_vl"), head="yes_no", lora_config=LoraConfig(r=4)))
    assert reranker["vLLM"].status == "export" and "--format classifier" in reranker["vLLM"].how
    assert engines(CrossEncoder.from_pretrained(tiny_path("qwen2_vl"), head="mlp"))["vLLM"].status == "no"
    bert = engines(CrossEncoder.from_pretrained(_bert_classifier(tmp_path), head="classification"))
    assert bert["TEI"].status == "as is" and bert["TEI"].how == "text-embeddings-router --model-id me/model"
    clip = engines(BiEncoder.from_pretrained(tiny_path("clip"), lora_config=LoraConfig(r=4)))
    # CLIP is served from the merged export (test_vllm.py::test_dual_encoders)
    assert clip["vLLM"].status == "export" and "--format merged && vllm serve OUT --runner pooling" in clip["vLLM"].how
    assert clip["TEI"].status == "no"


def test_the_push_callback_pushes_the_export_beside_the_adapter(hub, tiny_path, tmp_path):
    """The adapter repo carries sentence-transformers' files (module folders included); the export goes to a repo of
    its own, or to a branch, each loading from the loopback Hub with an empty cache."""
    from datasets import Dataset
    from helpers import args
    from images import color_rows
    from sentence_transformers import SentenceTransformer

    from hf_mm_rerank import BiEncoderTrainer, HubPushCallback

    model = BiEncoder.from_pretrained(tiny_path("qwen2_vl"), lora_config=LoraConfig(**LORA), query_prompt="Find it.")
    to_repo = HubPushCallback("me/embedder", push_on="end", backoff=0.01, export="sentence-transformers")
    to_branch = HubPushCallback("me/embedder-b", push_on="end", backoff=0.01, export="merged",
                                export_revision="merged")
    trainer = BiEncoderTrainer(model=model, args=args(tmp_path, max_steps=1, per_device_train_batch_size=4),
                               train_dataset=Dataset.from_list(color_rows()), callbacks=[to_repo, to_branch])
    trainer.train()
    assert to_repo.exports.commit_url and to_branch.exports.commit_url, [r.error for r in to_repo.exports.records]
    assert {"modules.json", "1_Pooling/config.json", "2_Normalize/config.json"} <= set(hub.files("me/embedder"))
    exported = hub.files("me/embedder-sentence-transformers")
    assert "adapter_config.json" not in exported and "README.md" in exported and "modules.json" in exported
    st = SentenceTransformer("me/embedder-sentence-transformers", device="cpu", cache_folder=str(tmp_path / "c1"))
    assert_rel_close(st.encode_query(QUERIES, convert_to_tensor=True), model.encode(QUERIES), ST)
    merged = hub.files("me/embedder-b", "merged")
    assert "model.safetensors" in merged and "adapter_model.safetensors" not in merged
    again = BiEncoder.from_pretrained("me/embedder-b", revision="merged", cache_dir=str(tmp_path / "c2"))
    assert_rel_close(again.encode(QUERIES), model.encode(QUERIES), ST)
