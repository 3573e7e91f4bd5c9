"""A LoRA adapter that sentence-transformers trains itself (its own ``add_adapter(LoraConfig)``, its own trainer,
its own ``save_pretrained``) on a family both libraries support (CLIP), then loaded here.

Runs on the newest releases (peft 0.22) and on the oldest that pyproject.toml allows (peft 0.21.0, transformers 5.23,
sentence-transformers 6.2: scripts/test_oldest.sh). Its CLIP embeddings are ``get_text_features`` /
``get_image_features`` without a Normalize module, which our loader reads from its ``modules.json`` (no normalisation); relative to
scale, 1e-5 (observed: 0 to 1e-7).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import assert_rel_close
from images import solid

from hf_mm_rerank import BiEncoder

pytest.importorskip("sentence_transformers")  # a test extra; scripts/setup.sh installs it

REL = 1e-5
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
COLOURS = ["red", "green", "blue", "yellow", "black", "white", "purple", "orange"]
QUERIES = ["a red square", "two cats on a sofa"]
DOCUMENTS = [solid("red", (40, 30)), solid("blue"), "a square that is blue"]


@pytest.fixture(scope="module")
def st_trained(tmp_path_factory, tiny_path):
    """(sentence-transformers model after 2 steps of its own trainer on its own LoRA, the folder it saved, the
    parameters before training)."""
    from datasets import Dataset
    from peft import LoraConfig
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    tmp = tmp_path_factory.mktemp("st_lora")
    st = SentenceTransformer(tiny_path("clip"), device="cpu")
    st.add_adapter(LoraConfig(**LORA))
    before = {name: p.detach().clone() for name, p in st.named_parameters()}
    rows = Dataset.from_dict({"anchor": [f"a {c} square" for c in COLOURS], "positive": [solid(c) for c in COLOURS]})
    args = SentenceTransformerTrainingArguments(output_dir=str(tmp / "out"), per_device_train_batch_size=4, max_steps=2,
                                                learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                                                disable_tqdm=True, seed=0)
    SentenceTransformerTrainer(model=st, args=args, train_dataset=rows, loss=MultipleNegativesRankingLoss(st)).train()
    st.eval()
    st.save_pretrained(str(tmp / "st_lora"))
    return st, str(tmp / "st_lora"), before


def _st_embeddings(st):
    queries = st.encode_query(QUERIES, convert_to_tensor=True)
    # one call per input: sentence-transformers encodes a dual encoder's text and images in separate batches
    documents = torch.cat([st.encode_document([d], convert_to_tensor=True) for d in DOCUMENTS])
    return queries, documents


def test_sentence_transformers_trains_and_saves_a_lora_adapter(st_trained, tiny_path):
    """Its own add_adapter + trainer changed only LoRA weights, and its folder is a plain PEFT adapter that
    transformers + peft (an independent loader) turn into the same embeddings."""
    from peft import PeftModel
    from transformers import AutoTokenizer, CLIPModel

    st, folder, before = st_trained
    changed = {name for name, p in st.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all("lora_" in name for name in changed), sorted(changed)[:5]
    assert {"adapter_config.json", "adapter_model.safetensors", "modules.json"} <= set(os.listdir(folder))
    with open(os.path.join(folder, "adapter_config.json")) as handle:
        assert json.load(handle)["base_model_name_or_path"] == tiny_path("clip")

    plain = PeftModel.from_pretrained(CLIPModel.from_pretrained(tiny_path("clip")), folder).eval()
    st_queries, _ = _st_embeddings(st)
    tokens = AutoTokenizer.from_pretrained(folder)(QUERIES, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert_rel_close(plain.get_text_features(**tokens).pooler_output, st_queries, REL, msg="transformers + peft")
        base = BiEncoder.from_pretrained(tiny_path("clip"), normalize=False).encode(QUERIES, side="query")
    assert float((base - st_queries).abs().max()) > 1e-2 * float(base.abs().max())  # the adapter took effect


def test_bi_encoder_loads_the_sentence_transformers_lora_folder(st_trained, tiny_path):
    """The plain PEFT folder (no hf_mm_rerank_config.json) loads on the base its adapter_config.json names; its
    modules.json lists no Normalize module, so neither do we normalise (no normalize= given)."""
    st, folder, _ = st_trained
    model = BiEncoder.from_pretrained(folder)
    assert model.is_peft and model.spec.adapter and model.spec.base_model == tiny_path("clip")
    assert model.spec.family == "dual_encoder" and model.spec.settings["normalize"] is False
    st_queries, st_documents = _st_embeddings(st)
    assert_rel_close(model.encode(QUERIES, side="query"), st_queries, REL, msg="queries")
    assert_rel_close(model.encode(DOCUMENTS, side="document"), st_documents, REL, msg="documents")
