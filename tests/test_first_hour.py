"""What a newcomer copies runs as written: the model card's two snippets (with hf_mm_rerank, and with plain
transformers + peft, which must give the same numbers), the recipes' help, data and output-folder checks, and a
quiet first run."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Dataset
from helpers import args, assert_rel_close
from images import color_rows
from peft import LoraConfig

from hf_mm_rerank import BiEncoder, BiEncoderTrainer, CrossEncoder, CrossEncoderTrainer, HubPushCallback

ROOT = Path(__file__).resolve().parent.parent


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def run_block(code: str, namespace: dict | None = None) -> tuple[dict, str]:
    namespace = {} if namespace is None else namespace
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "<card>", "exec"), namespace)  # noqa: S102  (the card's code, as a user runs it)
    return namespace, out.getvalue()


def _publish_base(hub, folder: str, repo: str) -> str:
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo, exist_ok=True)
    api.upload_folder(repo_id=repo, folder_path=folder)
    return repo


# (name, family of the tiny base, kind, from_pretrained settings)
CARD_CASES = [
    ("clip", "clip", "bi", {}),
    ("siglip", "siglip", "bi", {"query_prompt": "query: "}),
    ("qwen-embedder", "qwen2_vl", "bi", {"query_prompt": "Find the image.", "document_prompt": "Describe it."}),
    ("qwen-yes-no", "qwen2_vl", "rerank", {"head": "yes_no", "instruction": "Match colours."}),
    ("qwen-linear", "qwen2_vl", "rerank", {"head": "linear"}),
    ("bert", "bert", "rerank", {"head": "classification"}),
]


@pytest.mark.parametrize(("name", "family", "kind", "settings"), CARD_CASES, ids=[c[0] for c in CARD_CASES])
def test_card_snippets_run_and_agree(hub, tiny_path, tmp_path, name, family, kind, settings):
    if family == "bert":
        from test_cross_encoder import _bert_classifier

        folder = str(_bert_classifier(tmp_path / "bert"))
    else:
        folder = tiny_path(family)
    base = _publish_base(hub, folder, f"tiny/{name}-base")
    lora = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False)
    callback = HubPushCallback(f"me/{name}", push_on="end", backoff=0.01)
    training = args(tmp_path, max_steps=1, per_device_train_batch_size=4)
    if kind == "bi":
        model = BiEncoder.from_pretrained(base, lora_config=lora, **settings)
        trainer = BiEncoderTrainer(model=model, args=training, train_dataset=Dataset.from_list(color_rows()),
                                   callbacks=[callback])
    else:
        model = CrossEncoder.from_pretrained(base, lora_config=lora, **settings)
        rows = ([{"query": f"q{i}", "document": f"d{i}", "label": float(i % 2)} for i in range(8)]
                if family == "bert" else color_rows())
        trainer = CrossEncoderTrainer(model=model, args=training, train_dataset=Dataset.from_list(rows),
                                      callbacks=[callback])
    trainer.train()
    assert callback.wait(60) and callback.commit_url, [r.error for r in callback.records]
    card = hub.files(f"me/{name}")["README.md"].decode()
    library, plain = python_blocks(card)
    assert "<base model>" not in plain and f'BASE = "{base}"' in plain
    with_library, printed = run_block(library)
    without, printed_plain = run_block(plain)
    assert printed.strip() and printed_plain.strip()
    if kind == "bi":
        for side in ("query_embedding", "image_embedding"):
            assert_rel_close(without[side].float(), with_library[side].float())
        assert abs(float(printed.strip()) - float(printed_plain.strip().split()[0])) < 1e-5
    else:
        assert_rel_close(without["score"], float(with_library["scores"][0]))
    # The facts match the run.
    if family == "qwen2_vl" and kind == "bi":
        assert "**Pooling:** last token, L2-normalised" in card
    if family == "bert":
        assert "**Inputs:** text on either side" in card and '"family": "text_encoder"' in \
            hub.files(f"me/{name}")["hf_mm_rerank_config.json"].decode()
    adapted = sum(1 for n, _ in model.backbone.named_modules() if n.endswith(".lora_A"))
    assert f"({adapted} modules)" in card


# ----- recipes ------------------------------------------------------------------------------------------------
def _bi_recipe():
    from test_recipes import _recipe

    return _recipe("train_bi_encoder")


def test_a_file_builder_without_data_files_names_the_flag(tmp_path):
    from test_recipes import CONFIGS

    with pytest.raises(ValueError, match=r"--dataset_name json reads local files, and none were given\. Fix: pass "
                                         r"--data_files"):
        _bi_recipe().main(["--config", str(CONFIGS / "clip_vit_b32_lora.yaml"), "--output_dir", str(tmp_path / "o"),
                           "--use_cpu", "true", "--bf16", "false"])


def _tiny_bi_argv(tiny_path, tmp_path, data: str) -> list[str]:
    return ["--model_name_or_path", tiny_path("clip"), "--data_files", data, "--output_dir", str(tmp_path / "o"),
            "--max_steps", "1", "--per_device_train_batch_size", "4", "--use_cpu", "true", "--dataloader_num_workers",
            "0", "--eval_fraction", "0.25", "--report_to", "none"]


def test_data_files_alone_are_read_by_their_suffix_never_ignored(tiny_path, tmp_path):
    from test_recipes import _json_data

    data = _json_data(tmp_path / "data")
    jsonl = Path(data).with_suffix(".jsonl")
    Path(data).rename(jsonl)  # no --dataset_name: the suffix says json (the emoji demo data must not be used)
    report = _bi_recipe().main(_tiny_bi_argv(tiny_path, tmp_path, str(jsonl)))
    queries = {line.split('"query": "')[1].split('"')[0] for line in jsonl.read_text().splitlines()}
    assert report["after"] and (tmp_path / "o" / "README.md").is_file()
    from hf_mm_rerank.recipes_kit.data import DataArguments, load_data

    train, held_out = load_data(DataArguments(data_files=[str(jsonl)], eval_fraction=0.25))
    assert set(train["query"]) | set(held_out["query"]) == queries  # the file's rows, not the emoji
    odd = tmp_path / "rows.txt"
    odd.write_text("a red square\n")
    with pytest.raises(ValueError, match=r"--data_files .*rows\.txt: cannot tell how to read files ending in "
                                         r"\['\.txt'\]\. Fix: pass --dataset_name json, csv or parquet"):
        _bi_recipe().main(_tiny_bi_argv(tiny_path, tmp_path / "odd", str(odd)))


def test_a_recipe_error_reaches_the_user_as_one_message(tmp_path):
    odd = tmp_path / "rows.txt"
    odd.write_text("a red square\n")
    run = subprocess.run([sys.executable, str(ROOT / "recipes" / "train_bi_encoder.py"), "--data_files", str(odd),
                          "--output_dir", str(tmp_path / "o"), "--use_cpu", "true"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert run.stderr.strip().splitlines()[-1].startswith("error: --data_files ") and "Fix: pass --dataset_name" in \
        run.stderr


def test_wrong_columns_name_the_recipe_flags(tiny_path, tmp_path):
    import json

    data = tmp_path / "wrong_cols.json"
    data.write_text("\n".join(json.dumps({"caption": f"a {c} square", "image": "x.png"}) for c in ("red", "blue")))
    with pytest.raises(ValueError, match=r"wrong_cols\.json: the rows have columns \['caption', 'image'\], without "
                                         r"\['query', 'positive'\].*Fix: name your columns with --query_column <your "
                                         r"query column> --positive_column <your positive column>"):
        _bi_recipe().main(_tiny_bi_argv(tiny_path, tmp_path, str(data)))
    with pytest.raises(ValueError, match=r"--data_dir .* without --dataset_name: say how to read it, e.g. "
                                         r"--dataset_name imagefolder"):
        _bi_recipe().main([*_tiny_bi_argv(tiny_path, tmp_path / "dir", str(data))[:2], "--data_dir", str(tmp_path),
                           "--output_dir", str(tmp_path / "dir"), "--use_cpu", "true"])


def test_another_runs_output_dir_is_not_overwritten_unless_asked(tiny_path, tmp_path):
    from test_recipes import CONFIGS, _json_data

    out = tmp_path / "out"
    argv = ["--config", str(CONFIGS / "clip_vit_b32_lora.yaml"), "--model_name_or_path", tiny_path("clip"),
            "--data_files", _json_data(tmp_path / "data"), "--output_dir", str(out), "--max_steps", "2",
            "--save_steps", "2", "--per_device_train_batch_size", "4", "--use_cpu", "true", "--bf16", "false",
            "--dtype", "float32", "--dataloader_num_workers", "0", "--eval_fraction", "0", "--eval_strategy", "no",
            "--load_best_model_at_end", "false"]
    _bi_recipe().main(argv)
    first = (out / "adapter_model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match=r"already holds another run's files .*--overwrite_output_dir true to "
                                              r"write over it or --resume_from_checkpoint true"):
        _bi_recipe().main([*argv, "--learning_rate", "0.1"])
    with pytest.raises(FileNotFoundError, match="has no checkpoint-\\* folder to resume from"):
        _bi_recipe().main([*argv, "--output_dir", str(tmp_path / "fresh"), "--resume_from_checkpoint", "true"])
    assert (out / "adapter_model.safetensors").read_bytes() == first  # untouched
    _bi_recipe().main([*argv, "--max_steps", "4", "--resume_from_checkpoint", "true"])  # continuing is fine
    _bi_recipe().main([*argv, "--overwrite_output_dir", "true", "--learning_rate", "0.1"])
    assert (out / "adapter_model.safetensors").read_bytes() != first


def test_reranker_recipe_card_says_how_negatives_were_made(tiny_path, tmp_path):
    from test_recipes import CONFIGS, _recipe

    data = tmp_path / "pairs.jsonl"
    rows = [{"query": f"a {c} square", "positive": f"the colour {c}"} for c in ("red", "green", "blue", "black")] * 2
    data.write_text("\n".join(__import__("json").dumps(r) for r in rows))
    out = tmp_path / "rr"
    _recipe("train_cross_encoder").main([
        "--config", str(CONFIGS / "qwen3_vl_reranker_2b_lora.yaml"), "--model_name_or_path", tiny_path("qwen2_vl"),
        "--data_files", str(data), "--output_dir", str(out), "--max_steps", "1", "--per_device_train_batch_size", "2",
        "--num_negatives", "2", "--use_cpu", "true", "--bf16", "false", "--dtype", "float32",
        "--dataloader_num_workers", "0", "--eval_fraction", "0", "--eval_strategy", "no", "--assistant_prefix", "",
        "--load_best_model_at_end", "false"])
    assert "| negatives per query | 2 negative(s) (random) |" in (out / "README.md").read_text()


def test_first_imports_print_no_optional_kernel_notice():
    code = "import hf_mm_rerank; from transformers import TrainingArguments, Trainer; import peft; print('ok')"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "kernels-community" not in run.stderr + run.stdout, run.stderr[-2000:]
    helped = subprocess.run([sys.executable, str(ROOT / "recipes" / "train_bi_encoder.py"), "--help"],
                            capture_output=True, text=True, timeout=300)
    assert "--config FILE.yaml" in helped.stdout and "kernels-community" not in helped.stderr


# ----- README ---------------------------------------------------------------------------------------------------
def test_readme_python_blocks_run_as_written(hub, tiny_path, tmp_path, monkeypatch):
    """Every Python block of README.md, in order (the Hub block continues the first), with the tiny models in place
    of the Hub checkpoints it names, run in a fresh folder on the CPU against the loopback Hub."""
    blocks = python_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 3
    swap = {"openai/clip-vit-base-patch32": tiny_path("clip"), "Qwen/Qwen3-VL-Reranker-2B": tiny_path("qwen3_vl")}
    monkeypatch.chdir(tmp_path)
    namespaces: list[dict] = []
    printed = []
    for block in blocks:
        for hub_id, local in swap.items():
            block = block.replace(f'"{hub_id}"', repr(local))
        assert "bf16=True" not in block  # a CPU cannot run it
        namespace, out = run_block(block, dict(namespaces[0]) if "Continues the minimal example" in block else {})
        namespaces.append(namespace)
        printed.append(out)
    ndcg = [float(line) for line in printed[0].splitlines() if re.fullmatch(r"[0-9.]+", line.strip())]
    assert len(ndcg) == 1 and 0 <= ndcg[0] <= 1 and "torch.Size([3," in printed[0]
    assert (tmp_path / "out" / "final" / "README.md").is_file()
    assert "index" in printed[1] and "adapter_model.safetensors" in hub.files("me/clip-lora")
    # The sentence-transformers block loads the saved folder and prints BiEncoder's cosine similarity.
    st = next(i for i, block in enumerate(blocks) if "SentenceTransformer(" in block)
    similarity = float(re.findall(r"-?\d+\.\d+", printed[st])[0])
    embeddings = namespaces[0]["embeddings"]
    assert abs(similarity - float(embeddings[0] @ embeddings[1])) < 1e-4
