"""One set of loading options for the three models (``LoadOptions``), and adapters this package did not write: a
plain PEFT folder (``PeftModel.save_pretrained``: adapter files alone, no processor, no config of ours) loads on the
base its ``adapter_config.json`` names, with the same outputs as the model that saved it."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import assert_rel_close
from images import solid
from peft import LoraConfig

from hf_mm_rerank import BiEncoder, CrossEncoder, LoadOptions, MultiVectorEncoder

PROBE = ["a red square", solid("blue")]
PAIRS = [("a red square", solid("red")), ("a red square", "the square is blue")]
PLAIN = dict(system_prompt="", instruction="", query_prefix="", document_prefix="")


def test_options_and_keywords_are_one_call_and_the_callers_options_stay_theirs(tiny_path):
    options = LoadOptions(lora_config=LoraConfig(r=4, init_lora_weights=False), max_pixels=28 * 28 * 4)
    torch.manual_seed(0)
    by_options = BiEncoder.from_pretrained(tiny_path("qwen2_vl"), options=options, max_length=24, dtype=torch.float32)
    torch.manual_seed(0)
    by_keywords = BiEncoder.from_pretrained(tiny_path("qwen2_vl"), lora_config=options.lora_config,
                                            max_pixels=28 * 28 * 4, max_length=24, dtype=torch.float32)
    for model in (by_options, by_keywords):
        assert model.is_peft and model.spec.settings["max_length"] == 24
        assert model.featurizer.max_pixels == 28 * 28 * 4
    assert_rel_close(by_options.encode(PROBE), by_keywords.encode(PROBE), 1e-6)
    assert options.max_length is None and options.model_kwargs == {}  # keywords went into a copy


def test_keywords_override_options_and_unknown_ones_reach_transformers():
    merged = LoadOptions.merged(LoadOptions(max_length=8, model_kwargs={"revision": "v1"}),
                                {"max_length": 16, "dtype": "float32", "token": "t"})
    assert merged.max_length == 16
    assert merged.model_kwargs == {"revision": "v1", "dtype": "float32", "token": "t"}
    assert merged.hub_kwargs == {"revision": "v1", "token": "t"}
    assert merged.settings() == {"max_length": 16}


def _plain_peft_save(model, folder) -> None:
    """What a user of peft alone saves: the adapter files, nothing else."""
    model.backbone.save_pretrained(str(folder))
    assert sorted(os.listdir(folder)) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize("family", ["qwen2_vl", "clip"])
def test_a_plain_peft_adapter_folder_loads_on_its_base(tiny_path, tmp_path, family):
    trained = BiEncoder.from_pretrained(tiny_path(family), lora_config=LoraConfig(r=4, init_lora_weights=False))
    _plain_peft_save(trained, tmp_path / "plain")
    loaded = BiEncoder.from_pretrained(str(tmp_path / "plain"), is_trainable=False)
    assert loaded.is_peft and loaded.spec.base_model == tiny_path(family)
    assert loaded.spec.family == trained.spec.family and loaded.spec.settings["normalize"] is True
    assert_rel_close(loaded.encode(PROBE), trained.encode(PROBE), 1e-5)
    base = BiEncoder.from_pretrained(tiny_path(family)).encode(PROBE)
    assert float((base - loaded.encode(PROBE)).abs().max()) > 1e-3  # the adapter took effect


def test_a_plain_peft_reranker_adapter_loads_with_the_head_its_base_implies(tiny_path, tmp_path):
    trained = CrossEncoder.from_pretrained(tiny_path("qwen2_vl"), head="yes_no", **PLAIN,
                                           lora_config=LoraConfig(r=4, init_lora_weights=False))
    _plain_peft_save(trained, tmp_path / "plain")
    loaded = CrossEncoder.from_pretrained(str(tmp_path / "plain"), head="yes_no", **PLAIN)
    assert loaded.is_peft and loaded.head_type == "yes_no"
    assert_rel_close(loaded.score(PAIRS), trained.score(PAIRS), 1e-5)


def test_a_plain_adapter_without_its_base_says_which_argument_fixes_it(tiny_path, tmp_path):
    trained = BiEncoder.from_pretrained(tiny_path("clip"), lora_config=LoraConfig(r=4))
    _plain_peft_save(trained, tmp_path / "plain")
    config = tmp_path / "plain" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "base_model_name_or_path": None}))
    with pytest.raises(ValueError, match=r"names no base model.*base_model="):
        BiEncoder.from_pretrained(str(tmp_path / "plain"))
    loaded = BiEncoder.from_pretrained(str(tmp_path / "plain"), base_model=tiny_path("clip"))
    assert_rel_close(loaded.encode(PROBE), trained.encode(PROBE), 1e-5)


def test_a_multi_vector_model_refuses_a_plain_adapter_it_cannot_complete(tiny_path, tmp_path):
    """Token projections live outside a plain adapter: such a folder is no multi-vector model (colpali-engine's
    layout, which saves them in modules_to_save, is read in test_late_interaction.py)."""
    trained = BiEncoder.from_pretrained(tiny_path("qwen2_vl"), lora_config=LoraConfig(r=4))
    _plain_peft_save(trained, tmp_path / "plain")
    with pytest.raises(ValueError, match="plain PEFT adapter: it holds no token projections.*Fix: load it with"):
        MultiVectorEncoder.from_pretrained(str(tmp_path / "plain"))
