"""Model cards: the example cards of model_cards/ (real runs, rendered again from their facts) and the card a real
training run writes.

The example cards come from ``bash scripts/example_cards.sh`` (real offline runs); these tests never rewrite them.
"""

import json
from pathlib import Path

import yaml
from datasets import Dataset
from helpers import args
from images import color_rows
from peft import LoraConfig

from hf_mm_rerank import BiEncoder, BiEncoderTrainer
from hf_mm_rerank.publishing.model_card import card_info, hub_id, render_card

GOLDEN = Path(__file__).resolve().parent.parent / "model_cards"
EXAMPLES = ["bi_encoder_lora", "multi_vector_lora", "reranker_full", "reranker_qlora"]


def _example(name: str) -> dict:
    return json.loads((GOLDEN / f"{name}.json").read_text())


def test_the_example_cards_are_the_real_runs_rendered():
    """model_cards/ holds exactly the cards scripts/example_cards.sh wrote from real runs, each beside the facts it was
    rendered from (model_card.json of the run's folder); rendering those facts gives the committed card byte for byte.
    Never rewritten here: after a template change, rerun the script (its runs are the figures' source)."""
    assert sorted(p.stem for p in GOLDEN.glob("*.md")) == sorted(p.stem for p in GOLDEN.glob("*.json")) == sorted(EXAMPLES)
    for name in EXAMPLES:
        info = _example(name)
        assert render_card(info) == (GOLDEN / f"{name}.md").read_text(), f"model_cards/{name}.md: rerun scripts/example_cards.sh"
        training = info["training"]
        assert "GPU" not in training["hardware"] and training["hardware"].startswith("CPU")  # where they really ran
        assert isinstance(training["samples/s"], float) and training["steps"] > 0
        assert set(info["eval"]["before"]) == set(info["eval"]["after"]) and info["eval"]["after"]
        results = (GOLDEN.parent / "benchmarks" / "results" / "example-cards" / f"{name}.txt").read_text()
        assert results.startswith("command: bash scripts/demo") and "before -> after" in results


def test_the_example_cards_say_what_ran():
    qlora, full, multi = _example("reranker_qlora"), _example("reranker_full"), _example("multi_vector_lora")
    assert qlora["quantization"].startswith("4-bit NF4") and qlora["lora"]["r"] == 16 and qlora["adapter"]
    assert full["lora"] is None and not full["adapter"] and full["head"] == "yes_no"
    assert multi["kind"] == "multi_vector" and _example("bi_encoder_lora")["kind"] == "bi_encoder"


def test_card_metadata_holds_the_required_fields():
    hub = {"base_model": "Qwen/Qwen2-VL-2B-Instruct", "repo_id": "me/reranker"}  # as a Hub base would name them
    meta = yaml.safe_load(render_card({**_example("reranker_qlora"), **hub}).split("---\n")[1])
    assert meta["library_name"] == "peft" and meta["base_model"] == "Qwen/Qwen2-VL-2B-Instruct"
    assert meta["base_model_relation"] == "adapter" and meta["pipeline_tag"] == "text-ranking"
    assert {"hf_mm_rerank", "qlora", "multimodal", "text", "image", "reranker"} <= set(meta["tags"])
    (result,) = meta["model-index"]
    metrics = {m["name"]: m["value"] for m in result["results"][0]["metrics"]}
    assert metrics == {k: round(v, 4) for k, v in _example("reranker_qlora")["eval"]["after"].items()}  # 4 places
    full = dict(_example("bi_encoder_lora"), adapter=False, lora=None, base_model="openai/clip-vit-base-patch32",
                license="mit", datasets=["me/product-photos"])
    meta = yaml.safe_load(render_card(full).split("---\n")[1])
    assert meta["library_name"] == "transformers" and meta["base_model_relation"] == "finetune"
    assert meta["datasets"] == ["me/product-photos"] and meta["license"] == "mit"


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
    # the facts beside it render the same card (how the example cards of model_cards/ are checked)
    assert render_card(json.loads((tmp_path / "saved" / "model_card.json").read_text())) == card
    assert "| ndcg@10 |" in card and "a local checkpoint (not on the Hub)" in card and str(tmp_path) not in card
    assert "# out\n" in card  # titled after the output folder, not "hf_mm_rerank model"
    assert 'BASE = "path/to/the/base/model"  # the base was a local folder' in card
    serving = card[card.index("## Serving"):card.index("## Training details")]  # the serving check, on save
    assert "| sentence-transformers | this folder as it is | `from sentence_transformers import SentenceTransformer" \
        in serving and "| TEI | not served |" in serving and "| vLLM |" in serving
    assert "| warmup steps | 0 |" in card
