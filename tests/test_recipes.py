"""Every recipe config runs: checkpoints that cannot be downloaded are swapped for a tiny model of their family."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from datasets import Dataset
from helpers import rel_diff
from images import COLORS, solid

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "recipes" / "configs"
FAMILY = {"demo.yaml": None, "demo_multi_vector.yaml": None, "colqwen2_5_lora.yaml": "qwen2_vl",
          "clip_vit_b32_lora.yaml": "clip", "siglip_full.yaml": "siglip",
          "qwen3_vl_embedding_2b_qlora.yaml": "qwen3_vl"}
RERANKER_FAMILY = {"qwen3_vl_reranker_2b_lora.yaml": "qwen3_vl", "qwen2_vl_2b_qlora_yes_no.yaml": "qwen2_vl",
                   "text_cross_encoder.yaml": "bert", "demo_reranker.yaml": None}
DISTILL_FAMILY = {"qwen3_vl_distill_2b.yaml": ("qwen3_vl", "qwen3_vl")}  # (student, teacher)


def _recipe(name: str = "train_bi_encoder"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _json_data(folder: Path) -> str:
    (folder / "images").mkdir(parents=True)
    rows = []
    for i, color in enumerate(COLORS):
        solid(color).save(folder / "images" / f"{color}.png")
        other = list(COLORS)[(i + 1) % len(COLORS)]
        rows.append({"query": f"a {color} square", "positive": f"images/{color}.png",
                     "negative": f"images/{other}.png"})
    path = folder / "train.json"
    path.write_text("\n".join(json.dumps(r) for r in rows * 2))
    return str(path)


def _steps_run(folder: Path) -> int:
    """The optimizer steps the run took, as the saved card's facts record them (the Trainer's global_step)."""
    return json.loads((folder / "model_card.json").read_text())["training"]["steps"]


def _smallest_lora_b(folder: Path) -> float:
    """The smallest max-abs value among the saved adapter's LoRA B matrices (all zero until a step moves them)."""
    from safetensors.torch import load_file

    weights = load_file(folder / "adapter_model.safetensors")
    lora_b = [float(v.abs().max()) for k, v in weights.items() if "lora_B" in k]
    assert lora_b, f"no LoRA B in the adapter: {sorted(weights)[:5]}"
    return min(lora_b)


def _assert_same_metrics(reported: dict, direct: dict, names=("ndcg@10", "mrr@10")) -> None:
    for name in names:
        assert reported[f"eval_{name}"] == pytest.approx(direct[name], abs=1e-6), (name, reported, direct)


def test_every_config_names_its_launch_command():
    configs = sorted(CONFIGS.glob("*.yaml"))
    # every config the tests know is there (an empty or moved folder would leave the loop nothing to check)
    assert {c.name for c in configs} >= {*FAMILY, *RERANKER_FAMILY, *DISTILL_FAMILY}, sorted(c.name for c in configs)
    for config in configs:
        first = config.read_text().splitlines()[0]
        recipe = ("train_bi_encoder" if config.name in FAMILY else "distill_reranker_to_bi_encoder"
                  if config.name in DISTILL_FAMILY else "train_cross_encoder")
        assert first.startswith(f"# accelerate launch recipes/{recipe}.py --config") and config.name in first
        assert config.name in {**FAMILY, **RERANKER_FAMILY, **DISTILL_FAMILY}, f"add {config.name} to the recipe tests"


@pytest.mark.parametrize("recipe, flags", [
    ("train_bi_encoder", ("--mini_batch_size", "--pooling", "--matryoshka_dims")),
    ("train_cross_encoder", ("--head", "--loss", "--num_negatives", "--mining_model", "--yes_token")),
])
def test_help_renders(recipe, flags):
    out = subprocess.run([sys.executable, str(ROOT / "recipes" / f"{recipe}.py"), "--help"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    for flag in ("--config", "--model_name_or_path", "--lora_r", "--load_in_4bit", "--per_device_train_batch_size",
                 "--bad_rows", "--validate_data", "--overwrite_output_dir", *flags):
        assert flag in out.stdout


@pytest.mark.parametrize("config", [c for c in FAMILY if FAMILY[c]])
def test_config_runs_two_steps_on_a_tiny_model_of_its_family(tiny_path, tmp_path, config):
    settings = yaml.safe_load((CONFIGS / config).read_text())
    argv = ["--config", str(CONFIGS / config), "--model_name_or_path", tiny_path(FAMILY[config]),
            "--data_files", _json_data(tmp_path / "data"), "--eval_fraction", "0.25", "--output_dir",
            str(tmp_path / "out"), "--max_steps", "2", "--per_device_train_batch_size", "4", "--use_cpu", "true",
            "--bf16", "false", "--dtype", "float32", "--dataloader_num_workers", "0", "--eval_steps", "1",
            "--save_steps", "1", "--max_pixels", "4096", "--attn_implementation", "sdpa"]
    if settings.get("mini_batch_size"):
        argv += ["--mini_batch_size", "2"]
    if config == "clip_vit_b32_lora.yaml":
        argv += ["--cache_images", "true"]
    report = _recipe().main(argv)
    assert "eval_ndcg@10" in report["after"]
    final = tmp_path / "out"
    assert (final / "hf_mm_rerank_config.json").is_file()
    assert (final / ("model.safetensors" if settings.get("lora_r") == 0 else "adapter_model.safetensors")).is_file()


def _text_pairs(folder: Path) -> str:
    folder.mkdir(parents=True)
    names = list(COLORS)
    rows = [{"query": f"which square is {c}", "document": f"the square is {names[(i + j) % len(names)]}",
             "label": float(j == 0)} for i, c in enumerate(names) for j in range(3)]
    path = folder / "pairs.json"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


@pytest.mark.parametrize("config", [c for c in RERANKER_FAMILY if RERANKER_FAMILY[c]])
def test_reranker_config_runs_two_steps_on_a_tiny_model_of_its_family(tiny_path, tmp_path, config):
    from test_cross_encoder import _bert_classifier

    settings = yaml.safe_load((CONFIGS / config).read_text())
    family = RERANKER_FAMILY[config]
    model = _bert_classifier(tmp_path) if family == "bert" else tiny_path(family)
    data = _text_pairs(tmp_path / "data") if family == "bert" else _json_data(tmp_path / "data")
    argv = ["--config", str(CONFIGS / config), "--model_name_or_path", model, "--data_files", data,
            "--eval_fraction", "0.3", "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
            "--per_device_train_batch_size", "2", "--num_negatives", "2", "--use_cpu", "true", "--bf16", "false",
            "--dtype", "float32", "--dataloader_num_workers", "0", "--eval_steps", "1", "--save_steps", "1",
            "--max_pixels", "4096"]
    if settings.get("mini_batch_size"):
        argv += ["--mini_batch_size", "3"]
    if settings.get("head") == "yes_no":
        argv += ["--assistant_prefix", ""]  # the tiny byte tokenizer has no <think> tokens (they would still work)
    report = _recipe("train_cross_encoder").main(argv)
    assert {"eval_ndcg@10", "eval_mrr@10", "eval_map", "eval_base_map"} <= set(report["after"])
    final = tmp_path / "out"
    assert (final / "hf_mm_rerank_config.json").is_file()
    assert (final / ("model.safetensors" if settings.get("lora_r") == 0 else "adapter_model.safetensors")).is_file()
    assert (tmp_path / "out" / "checkpoint-2" / "hf_mm_rerank_config.json").is_file()
    card = (final / "README.md").read_text()
    assert "hard negative" not in card  # the data's own negatives (or random ones) are not called hard


def test_cli_flags_override_the_yaml(tmp_path):
    from transformers import TrainingArguments

    from hf_mm_rerank.recipes_kit.cli import parse_with_config
    from hf_mm_rerank.recipes_kit.data import DataArguments

    config = tmp_path / "c.yaml"
    config.write_text("output_dir: from_yaml\nlearning_rate: 0.5\ndata_files: [a.json, b.json]\n")
    data, args = parse_with_config((DataArguments, TrainingArguments), ["--config", str(config), "--learning_rate", "0.25"])
    assert args.output_dir == "from_yaml" and args.learning_rate == 0.25 and data.data_files == ["a.json", "b.json"]


def test_yaml_values_keep_their_types(tmp_path):
    from transformers import TrainingArguments

    from hf_mm_rerank.recipes_kit.cli import parse_with_config
    from hf_mm_rerank.recipes_kit.data import DataArguments

    config = tmp_path / "c.yaml"
    config.write_text("output_dir: out\nlr_scheduler_type: cosine_with_min_lr\nlr_scheduler_kwargs: {min_lr: 1e-6}\n"
                      "learning_rate: 2e-5\nbf16: false\ndata_files: [a.json]\nwarmup_steps: 0.1\n")
    data, args = parse_with_config((DataArguments, TrainingArguments), ["--config", str(config)])
    assert args.lr_scheduler_kwargs == {"min_lr": 1e-6} and isinstance(args.lr_scheduler_kwargs["min_lr"], float)
    assert args.learning_rate == 2e-5 and args.bf16 is False and args.warmup_steps == 0.1
    assert data.data_files == ["a.json"]
    config.write_text("output_dir: out\nlerning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"unknown keys \['lerning_rate'\]"):
        parse_with_config((DataArguments, TrainingArguments), ["--config", str(config)])


def test_demo_runs_offline_end_to_end(tmp_path, capsys, monkeypatch):
    from hf_mm_rerank.recipes_kit.demo import EMOJI_FONT

    if not os.path.isfile(EMOJI_FONT):
        pytest.fail("fonts-noto-color-emoji is missing: scripts/setup.sh installs it")
    report = _recipe().main(["--config", str(CONFIGS / "demo.yaml"), "--output_dir", str(tmp_path / "demo"),
                             "--max_steps", "2", "--max_train_samples", "64", "--max_eval_samples", "32",
                             "--per_device_train_batch_size", "16", "--dataloader_num_workers", "0",
                             "--export", "sentence-transformers"])
    assert (tmp_path / "demo" / "adapter_model.safetensors").is_file()
    printed = capsys.readouterr().out
    table = printed[printed.index("before -> after"):].splitlines()
    assert table[0].split() == ["before", "->", "after", "@1", "@5", "@10", "@100"]
    assert table[1].startswith("ndcg") and table[1].count("->") >= 3 and len(table) < 12  # compact
    assert f"Saved to {tmp_path / 'demo'}" in printed and "hf_mm_rerank.BiEncoder.from_pretrained(" in printed
    assert json.loads((tmp_path / "demo" / "metrics.json").read_text())["after"] == report["after"]
    # The card's two snippets run as written from the card's own folder (moved elsewhere, base model and all) and
    # print the same similarity.
    from test_first_hour import python_blocks, run_block

    moved = tmp_path / "elsewhere" / "my-demo"
    shutil.copytree(tmp_path / "demo", moved)
    card = (moved / "README.md").read_text()
    numbers = []
    monkeypatch.chdir(moved)
    for block in python_blocks(card):
        assert 'MODEL = "."' in block
        _, out = run_block(block)
        numbers.append(float(out.strip().splitlines()[-1].split()[0]))
    monkeypatch.chdir(ROOT)
    assert len(numbers) == 2 and numbers[0] == pytest.approx(numbers[1], abs=1e-5)
    # The printed "after" metrics are those of the saved model, reloaded and evaluated on the same held-out rows.
    from hf_mm_rerank import BiEncoder, RetrievalEvaluator
    from hf_mm_rerank.recipes_kit.data import DataArguments, load_data

    _, held_out = load_data(DataArguments(max_eval_samples=32))
    again = RetrievalEvaluator.from_dataset(held_out)(BiEncoder.from_pretrained(str(tmp_path / "demo")))
    assert report["after"]["eval_ndcg@10"] == pytest.approx(again["ndcg@10"], abs=1e-6)
    assert report["after"]["eval_recall@10"] == pytest.approx(again["recall@10"], abs=1e-6)
    # Training ran as asked and moved the weights; "before" is the untrained model (LoRA starts as the identity, so
    # the base itself), evaluated directly: a run that trained nothing, or swapped before and after, fails here.
    assert _steps_run(tmp_path / "demo") == 2
    # Adam moves each weight by about the learning rate per step; warmup gives step 1 a rate of 0 and step 2 1e-4:
    # every LoRA B (zero at the start) measured 1.0e-4 max-abs here and in the multi-vector demo.
    assert _smallest_lora_b(tmp_path / "demo") > 5e-5
    base = RetrievalEvaluator.from_dataset(held_out)(BiEncoder.from_pretrained(str(tmp_path / "demo" / "_base_model")))
    _assert_same_metrics(report["before"], base, ("ndcg@10", "recall@10"))
    assert 0 < report["before"]["eval_ndcg@10"] < 1
    # --export: the demo in sentence-transformers, in a fresh process from another folder, gives our embeddings.
    assert "sentence-transformers export in" in printed and "reloaded with sentence-transformers" in printed
    import torch
    from helpers import assert_rel_close

    held = [held_out[i] for i in range(4)]
    trained = BiEncoder.from_pretrained(str(tmp_path / "demo"))
    expected = torch.cat([trained.encode([r["query"] for r in held]),
                          trained.encode([r["positive"] for r in held], side="document")])
    code = ("import torch; from datasets import load_from_disk; from sentence_transformers import SentenceTransformer; "
            f"st = SentenceTransformer({str(tmp_path / 'demo-sentence-transformers')!r}, device='cpu'); "
            f"rows = load_from_disk({str(tmp_path / 'held')!r}); "
            "got = torch.cat([st.encode_query(rows['query'], convert_to_tensor=True), "
            "st.encode_document(list(rows['positive']), convert_to_tensor=True)]); "
            f"torch.save(got, {str(tmp_path / 'got.pt')!r})")
    held_out.select(range(4)).save_to_disk(str(tmp_path / "held"))
    run = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path / "elsewhere"), capture_output=True, text=True,
                         timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    assert_rel_close(torch.load(tmp_path / "got.pt"), expected)


def test_reranker_demo_runs_offline_end_to_end(tmp_path, capsys, monkeypatch):
    """The offline reranker config: its base is built here, it trains, prints reranking metrics before and after,
    and the saved reranker reloads from another folder and scores as it did, also through its card's snippets."""
    out = tmp_path / "rr"
    report = _recipe("train_cross_encoder").main([
        "--config", str(CONFIGS / "demo_reranker.yaml"), "--output_dir", str(out), "--max_steps", "2",
        "--max_train_samples", "32", "--max_eval_samples", "16", "--per_device_train_batch_size", "4",
        "--dataloader_num_workers", "0"])
    printed = capsys.readouterr().out
    table = printed[printed.index("before -> after"):].splitlines()
    assert table[1].split()[0] == "ndcg" and "base_mrr" in printed and f"Saved to {out}" in printed
    assert {"eval_ndcg@10", "eval_mrr@10", "eval_map", "eval_base_map"} <= set(report["after"])
    assert (out / "_base_model" / "config.json").is_file() and (out / "model.safetensors").is_file()
    from safetensors.torch import load_file

    from hf_mm_rerank import CrossEncoder, RerankingEvaluator
    from hf_mm_rerank.recipes_kit.cli import add_negatives
    from hf_mm_rerank.recipes_kit.data import DataArguments, load_data

    # Two optimizer steps ran and moved the fully trained weights away from the base's; "before" is the base itself
    # evaluated directly on the same held-out rows and negatives (a swap of before and after fails here).
    assert _steps_run(out) == 2
    base_weights, trained = load_file(out / "_base_model" / "model.safetensors"), load_file(out / "model.safetensors")
    assert trained.keys() == base_weights.keys()
    # Every tensor moved by about one Adam step (step 2's learning rate 1e-4; step 1's warmup rate is 0) over its
    # scale: measured 9.8e-5 to 1.4e-3 of it across the 57 tensors.
    assert min(rel_diff(trained[k], base_weights[k]) for k in trained) > 5e-5
    _, held_out = load_data(DataArguments(max_train_samples=32, max_eval_samples=16), seed=42)
    held_out = add_negatives(held_out, 3, None, seed=42)
    base = CrossEncoder.from_pretrained(str(out / "_base_model"), head="yes_no", system_prompt="", instruction="")
    _assert_same_metrics(report["before"], RerankingEvaluator.from_dataset(held_out, batch_size=64)(base),
                         ("ndcg@10", "mrr@10", "map"))

    moved = tmp_path / "elsewhere" / "reranker"
    shutil.copytree(out, moved)
    monkeypatch.chdir(moved.parent)
    reranker = CrossEncoder.from_pretrained("reranker")
    assert reranker.head_type == "yes_no"
    from test_first_hour import python_blocks, run_block

    monkeypatch.chdir(moved)
    library, plain = python_blocks((moved / "README.md").read_text())
    with_library, _ = run_block(library)
    without, _ = run_block(plain)
    assert abs(without["score"] - float(with_library["scores"][0])) <= 1e-5 * max(1.0, abs(without["score"]))


def test_multi_vector_demo_runs_offline_end_to_end(tmp_path, capsys):
    """The late-interaction demo: the demo's dual encoder, one vector per token and patch, scored by MaxSim."""
    from hf_mm_rerank import MultiVectorEncoder

    out = tmp_path / "mv"
    argv = ["--config", str(CONFIGS / "demo_multi_vector.yaml"), "--output_dir", str(out), "--max_steps", "2",
            "--max_train_samples", "32", "--max_eval_samples", "16", "--per_device_train_batch_size", "8",
            "--dataloader_num_workers", "0"]
    report = _recipe().main(argv)
    printed = capsys.readouterr().out
    assert "before -> after" in printed and "MultiVectorEncoder.from_pretrained(" in printed
    # Two optimizer steps ran and moved the LoRA weights; "before" is the untrained model (its new token projections
    # drawn from the run's seed, as the recipe draws them), evaluated directly: a swap of before and after fails here.
    assert _steps_run(out) == 2
    assert _smallest_lora_b(out) > 5e-5  # measured 1.0e-4 for all 36 (the second step's learning rate, as above)
    from transformers import TrainingArguments, set_seed

    from hf_mm_rerank import RetrievalEvaluator
    from hf_mm_rerank.recipes_kit.cli import PublishArguments, parse_with_config
    from hf_mm_rerank.recipes_kit.data import DataArguments, load_data

    recipe = _recipe()
    model_args, data_args, _, run_args = parse_with_config(
        (recipe.ModelArguments, DataArguments, PublishArguments, TrainingArguments),
        [*argv, "--overwrite_output_dir", "true"])  # (only parsed: the run's folder is read, its base reused)
    set_seed(run_args.seed)
    untrained = recipe.build_model(model_args, run_args)
    _, held_out = load_data(data_args, seed=run_args.seed)
    _assert_same_metrics(report["before"], RetrievalEvaluator.from_dataset(held_out, batch_size=128)(untrained))
    again = MultiVectorEncoder.from_pretrained(str(out))
    tokens = again.encode(["grinning face"])
    assert tokens.embeddings.shape[-1] == 128 and tokens.mask.sum() > 1
    assert "late interaction" in (out / "README.md").read_text()


def test_building_the_demo_base_leaves_the_global_rng_alone(tmp_path):
    import torch

    from hf_mm_rerank.recipes_kit.demo import build_demo_base

    state = torch.random.get_rng_state()
    build_demo_base(tmp_path / "base")
    assert torch.equal(torch.random.get_rng_state(), state)  # a fresh and a reused base train identically


def test_imagefolder_style_columns_are_renamed(tmp_path):
    from hf_mm_rerank.recipes_kit.data import DataArguments, load_data

    rows = [{"caption": f"a {c} square", "image": f"{c}.png"} for c in COLORS]
    for c in COLORS:
        solid(c).save(tmp_path / f"{c}.png")
    path = tmp_path / "data.json"
    Dataset.from_list(rows).to_json(str(path))
    train, held = load_data(DataArguments(dataset_name="json", data_files=[str(path)], query_column="caption",
                                          positive_column="image", eval_fraction=0.25))
    assert set(train.column_names) == {"query", "positive"} and len(held) == 2
    assert os.path.isabs(train[0]["positive"]) and os.path.isfile(train[0]["positive"])


def test_every_config_says_what_it_needs_and_the_readme_lists_it():
    readme = (ROOT / "README.md").read_text()
    configs = sorted(CONFIGS.glob("*.yaml"))
    assert {c.name for c in configs} >= {*FAMILY, *RERANKER_FAMILY, *DISTILL_FAMILY}, sorted(c.name for c in configs)
    for config in configs:
        lines = config.read_text().splitlines()
        assert lines[1].startswith("# Needs: "), f"{config.name}: second line must say what it needs"
        row = next((line for line in readme.splitlines() if line.startswith(f"| `{config.name}` |")), None)
        assert row is not None, f"README's config table lacks {config.name}"
        settings = yaml.safe_load(config.read_text())
        offline_cpu = not settings.get("bf16") and str(settings.get("model_name_or_path", "")).startswith("builtin:")
        assert row.rstrip(" |").split("|")[-1].strip().startswith("yes" if offline_cpu else "no"), row


def test_a_yaml_mixture_trains_the_demo_on_two_datasets_and_the_card_lists_them(tmp_path):
    """``mixture:`` in the YAML: the built-in emoji and a JSON file of another layout (with negatives), each with its
    own prompt and weight; the card lists both with their rows and shares."""
    config = yaml.safe_load((CONFIGS / "demo.yaml").read_text())
    config["mixture"] = {"no_duplicates": True, "datasets": [
        {"name": "emoji", "dataset_name": "builtin:emoji", "max_train_samples": 64, "max_eval_samples": 16,
         "weight": 3},
        {"name": "squares", "data_files": [_json_data(tmp_path / "data")], "dataset_name": "builtin:emoji",
         "query_prompt": "find the square: ", "weight": 1}]}
    path = tmp_path / "mixture.yaml"
    path.write_text(yaml.safe_dump(config))
    _recipe().main(["--config", str(path), "--output_dir", str(tmp_path / "out"), "--max_steps", "4",
                    "--per_device_train_batch_size", "8", "--dataloader_num_workers", "0"])
    facts = json.loads((tmp_path / "out" / "model_card.json").read_text())["training"]
    listed = facts["datasets (rows, share of the batches)"]
    assert listed.startswith("emoji: 64 rows, ") and "; squares: 16 rows, " in listed
    share = float(listed.split("emoji: 64 rows, ")[1].split("%")[0])
    assert 50 <= share <= 100  # weight 3 of 4 (drawn: the first epoch's schedule)
    with pytest.raises(ValueError, match=r"mixture.datasets\[0\].*unknown: \['colour'\]"):
        bad = dict(config, mixture={"datasets": [{"name": "x", "colour": "red"}]})
        path.write_text(yaml.safe_dump(bad))
        _recipe().main(["--config", str(path), "--output_dir", str(tmp_path / "bad")])
