"""Model cards: golden renders (model_cards/*.md) and the card a real training run writes.

Regenerate the golden files after an intended template change with ``UPDATE_GOLDEN=1 pytest tests/test_model_card.py``.
"""

import os
from pathlib import Path

import pytest
import yaml
from datasets import Dataset
from helpers import args
from images import color_rows
from peft import LoraConfig

from hf_mm_rerank import BiEncoder, BiEncoderTrainer
from hf_mm_rerank.data.featurizers import RERANK_PROMPT_DEFAULTS
from hf_mm_rerank.publishing.model_card import card_info, hub_id, render_card

GOLDEN = Path(__file__).resolve().parent.parent / "model_cards"
VERSIONS = {"hf_mm_rerank": "0.1.0", "transformers": "5.24.0", "peft": "0.21.2", "torch": "2.14.1",
            "accelerate": "1.15.0", "datasets": "5.2.0", "huggingface_hub": "2.4.0"}

BI_ENCODER_LORA = {
    "kind": "bi_encoder", "family": "dual_encoder", "adapter": True, "base_model": "openai/clip-vit-base-patch32",
    "repo_id": "hf-mm-rerank/clip-vit-b32-products-lora", "quantization": None,
    "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "targets": "fc1, fc2, k_proj, out_proj, q_proj, v_proj (72 modules)",
             "modules_to_save": ["text_projection", "visual_projection"]},
    "head": None, "pooling": "the towers' own pooling and projection (get_text_features / get_image_features)",
    "normalize": True, "modalities": ["text", "image"],
    "usage": {"family": "dual_encoder", "prompts": {}, "pooling": "model",
              "text_kwargs": {"padding": True, "truncation": True, "max_length": 77}},
    "loss": {"name": "CachedContrastiveLoss", "params": {"gather_across_devices": True, "mini_batch_size": 64,
                                                         "symmetric": True, "temperature": 0.05}},
    "training": {"global batch": 1024, "negatives per query": "in-batch + 1 negative(s) (mined)", "epochs": 3.0,
                 "steps": 2931, "learning rate": 0.0001, "scheduler": "cosine", "warmup steps": 0.05,
                 "weight decay": 0.01, "optimizer": "adamw_torch_fused", "precision": "bf16",
                 "gradient checkpointing": False, "hardware": "1 x NVIDIA H200", "duration": "1480 s",
                 "samples/s": 2027.5, "training rows": 1000000},
    "eval": {"before": {"ndcg@10": 0.4121, "mrr@10": 0.3655, "recall@10": 0.5803},
             "after": {"ndcg@10": 0.6034, "mrr@10": 0.5512, "recall@10": 0.7718}},
    "versions": VERSIONS, "license": "mit", "datasets": ["hf-mm-rerank/product-photos"], "language": "en",
    "model_name": None, "dataset_name": "product-photos (held-out 5%)",
}

RERANKER_QLORA = {
    "kind": "cross_encoder", "family": "chat_vlm", "adapter": True, "base_model": "Qwen/Qwen2-VL-2B-Instruct",
    "repo_id": "hf-mm-rerank/qwen2-vl-2b-reranker-qlora",
    "quantization": "4-bit NF4, double quantization, compute bfloat16",
    "lora": {"r": 32, "alpha": 64, "dropout": 0.05, "targets": "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, "
             "v_proj (196 modules)", "modules_to_save": []},
    "head": "yes_no", "pooling": None, "normalize": None, "modalities": ["text", "image"],
    "usage": {"family": "chat_vlm", "prompts": {}, "pooling": None, "yes_no": ["yes", "no"], "num_labels": 1,
              "pair_prompt": dict(RERANK_PROMPT_DEFAULTS)},
    "loss": {"name": "BinaryCrossEntropyLoss", "params": {"pos_weight": "auto"}},
    "training": {"global batch": 8, "negatives per query": "3 negative(s) (mined with a fine-tuned CLIP)", "epochs": 1.0, "steps": 1250,
                 "learning rate": 0.0002, "scheduler": "linear", "warmup steps": 0.05, "weight decay": 0.0,
                 "optimizer": "adamw_torch_fused", "precision": "bf16", "gradient checkpointing": True,
                 "hardware": "1 x NVIDIA H200", "duration": "2210 s", "samples/s": 4.52, "training rows": 10000},
    "eval": {"before": {"ndcg@10": 0.5511, "mrr@10": 0.4902, "map": 0.4815},
             "after": {"ndcg@10": 0.7420, "mrr@10": 0.6983, "map": 0.6877}},
    "versions": {**VERSIONS, "bitsandbytes": "0.50.2"}, "license": None, "datasets": [], "language": None,
    "model_name": None, "dataset_name": None,
}


@pytest.mark.parametrize("name, info", [("bi_encoder_lora.md", BI_ENCODER_LORA), ("reranker_qlora.md", RERANKER_QLORA)])
def test_golden_cards(name, info):
    text = render_card(info)
    if os.environ.get("UPDATE_GOLDEN"):
        (GOLDEN / name).write_text(text)
    assert text == (GOLDEN / name).read_text(), f"model_cards/{name} is stale (UPDATE_GOLDEN=1 to regenerate)"


def test_card_metadata_holds_the_required_fields():
    meta = yaml.safe_load(render_card(RERANKER_QLORA).split("---\n")[1])
    assert meta["library_name"] == "peft" and meta["base_model"] == "Qwen/Qwen2-VL-2B-Instruct"
    assert meta["base_model_relation"] == "adapter" and meta["pipeline_tag"] == "text-ranking"
    assert {"hf_mm_rerank", "qlora", "multimodal", "text", "image", "reranker"} <= set(meta["tags"])
    (result,) = meta["model-index"]
    metrics = {m["name"]: m["value"] for m in result["results"][0]["metrics"]}
    assert metrics == {"ndcg@10": 0.742, "mrr@10": 0.6983, "map": 0.6877}
    full = dict(BI_ENCODER_LORA, adapter=False, lora=None)
    meta = yaml.safe_load(render_card(full).split("---\n")[1])
    assert meta["library_name"] == "transformers" and meta["base_model_relation"] == "finetune"
    assert meta["datasets"] == ["hf-mm-rerank/product-photos"] and meta["license"] == "mit"


def test_hub_ids_never_leak_local_paths(tmp_path):
    assert hub_id("openai/clip-vit-base-patch32") == "openai/clip-vit-base-patch32"
    for local in (str(tmp_path), "/models/clip", "./clip", "~/clip", "../x/y"):
        assert hub_id(local) is None


def test_card_from_a_real_run_reports_training_and_evaluation(tiny_path, tmp_path, color_evaluator):
    model = BiEncoder.from_pretrained(tiny_path("clip"), lora_config=LoraConfig(r=4, lora_alpha=8))
    trainer = BiEncoderTrainer(model=model, args=args(tmp_path, max_steps=4, per_device_train_batch_size=4,
                                                      gradient_accumulation_steps=2),
                               train_dataset=Dataset.from_list(color_rows(2)), evaluator=color_evaluator)
    trainer.evaluate()
    trainer.train()
    trainer.evaluate()
    info = card_info(trainer, repo_id="me/model")
    assert info["base_model"] is None  # a local folder is never named
    assert info["lora"]["r"] == 4 and info["lora"]["alpha"] == 8
    training = info["training"]
    assert training["global batch"] == 8 and training["steps"] == 4 and training["learning rate"] == 5e-3
    assert training["negatives per query"] == "in-batch + 1 negative(s)"  # not called hard: nobody mined them
    assert training["samples/s"] != "n/a" and training["precision"] == "float32"
    assert info["loss"]["name"] == "ContrastiveLoss" and info["loss"]["params"]["temperature"] == 0.05
    assert set(info["eval"]["before"]) == set(info["eval"]["after"]) >= {"ndcg@10", "mrr@10", "map@100"}
    trainer.save_model(str(tmp_path / "saved"))
    card = (tmp_path / "saved" / "README.md").read_text()
    assert "| ndcg@10 |" in card and "a local checkpoint (not on the Hub)" in card and str(tmp_path) not in card
    assert "# out\n" in card  # titled after the output folder, not "hf_mm_rerank model"
    assert 'BASE = "path/to/the/base/model"  # the base was a local folder' in card
    serving = card[card.index("## Serving"):card.index("## Training details")]  # the serving check, on save
    assert "| sentence-transformers | this folder as it is | `from sentence_transformers import SentenceTransformer" \
        in serving and "| TEI | not served |" in serving and "| vLLM |" in serving
    assert "| warmup steps | 0 |" in card
