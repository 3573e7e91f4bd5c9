"""The user's multi-process paths: the README's two-process launch of both recipes, what is refused, the
learnable temperature across a resume, and the gathered state dict FSDP / DeepSpeed hand to ``_save``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from helpers import args
from images import color_rows
from peft import LoraConfig
from safetensors.torch import load_file
from test_recipes import CONFIGS, ROOT, _json_data

from hf_mm_rerank import BiEncoder, BiEncoderTrainer, ContrastiveLoss, CrossEncoder, CrossEncoderTrainer
from hf_mm_rerank.training.checkpoints import loadable_files

# The README's two-CPU-process launch.
LAUNCH = ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29561"]
CPU_DDP = ["--use_cpu", "true", "--ddp_backend", "gloo"]


def _launch(recipe: str, argv: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *LAUNCH, str(ROOT / "recipes" / f"{recipe}.py"), *argv], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _fresh_shell_env() -> dict[str, str]:
    """A new shell's environment: no virtual environment on the PATH, no Python settings of this test run."""
    venv = os.path.dirname(sys.executable)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p != venv)
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON", "PYTEST"))}
    return {**keep, "PATH": path, "OMP_NUM_THREADS": "1"}


def test_demo_recipe_trains_once_under_the_readme_two_process_command(tmp_path):
    """The README's two-process command, as written (scripts/demo_2cpu.sh), from a shell without .venv activated."""
    out = tmp_path / "demo"  # fresh: both ranks need the demo base model, which only the main process builds
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/demo_2cpu.sh" in readme
    run = subprocess.run(["bash", str(ROOT / "scripts" / "demo_2cpu.sh"), "--output_dir", str(out), "--max_steps",
                          "2", "--max_train_samples", "32", "--max_eval_samples", "16", "--per_device_train_batch_size",
                          "4", "--dataloader_num_workers", "0"], cwd=tmp_path, env=_fresh_shell_env(),
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "find_unused_parameters" not in run.stderr and "pin_memory" not in run.stderr  # quiet
    assert run.stdout.count("Saved to") == 1 and run.stdout.count("before -> after") == 1  # rank 0 reports once
    assert "kernels-community" not in run.stderr  # no optional-kernel noise without quantization
    card = (out / "README.md").read_text()
    assert "2 x CPU" in card and "| global batch | 8 |" in card.replace("  ", " ")
    assert not list(out.parent.glob("demo/_base_model.partial-*"))
    # The saved model loads from another working directory and embeds.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.chdir(elsewhere)
    try:
        model = BiEncoder.from_pretrained(str(out))
    finally:
        os.chdir(ROOT)
    assert model.encode(["GRINNING FACE"]).shape == (1, 256)
    trained = load_file(out / "adapter_model.safetensors")
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in trained.items())


def test_reranker_recipe_with_mining_under_the_two_process_command(tiny_path, tmp_path):
    miner = tmp_path / "miner"
    BiEncoder.from_pretrained(tiny_path("clip")).save_pretrained(str(miner))
    out = tmp_path / "rr"
    run = _launch("train_cross_encoder", [
        "--config", str(CONFIGS / "qwen3_vl_reranker_2b_lora.yaml"), "--model_name_or_path", tiny_path("qwen3_vl"),
        "--data_files", _json_data(tmp_path / "data"), "--eval_fraction", "0.25", "--output_dir", str(out),
        "--max_steps", "2", "--per_device_train_batch_size", "2", "--num_negatives", "2", "--mining_model",
        str(miner), "--mini_batch_size", "3", "--assistant_prefix", "", "--bf16", "false", "--dtype", "float32",
        "--dataloader_num_workers", "0", "--eval_steps", "1", "--save_steps", "1", "--max_pixels", "4096",
        *CPU_DDP], cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:]
    assert run.stdout.count("Saved to") == 1
    assert "2 x CPU" in (out / "README.md").read_text()
    reranker = CrossEncoder.from_pretrained(str(out))
    assert reranker.head_type == "yes_no" and reranker.score([("a red square", "red")]).shape == (1,)


def test_a_launch_whose_processes_would_train_alone_is_refused(tmp_path):
    # The README's launch without --use_cpu/--ddp_backend on a CPU machine: two independent runs before.
    run = _launch("train_bi_encoder", ["--config", str(CONFIGS / "demo.yaml"), "--output_dir", str(tmp_path / "o")],
                  cwd=tmp_path, timeout=300)
    assert run.returncode != 0
    assert "WORLD_SIZE=2" in run.stderr and "--use_cpu true --ddp_backend gloo" in run.stderr
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_data_parallel_and_mismatched_worlds_are_refused(tiny_path, tmp_path, monkeypatch):
    model = BiEncoder.from_pretrained(tiny_path("clip"))
    data = Dataset.from_list(color_rows())
    several_gpus = args(tmp_path)
    several_gpus._n_gpu = 2  # what TrainingArguments reports for one process on a 2-GPU machine
    with pytest.raises(RuntimeError, match="nn.DataParallel.*accelerate launch --multi_gpu --num_processes 2"):
        BiEncoderTrainer(model=model, args=several_gpus, train_dataset=data)
    one_process = args(tmp_path)
    assert one_process.world_size == 1
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="independent copies"):
        BiEncoderTrainer(model=model, args=one_process, train_dataset=data)


def _temperature_run(path, tmp_path, max_steps, resume=None):
    torch.manual_seed(0)
    model = BiEncoder.from_pretrained(path, lora_config=LoraConfig(r=4))
    loss = ContrastiveLoss(temperature=0.1, learnable_temperature=True)
    trainer = BiEncoderTrainer(model=model, args=args(tmp_path, max_steps=max_steps, save_strategy="steps",
                                                      save_steps=2, learning_rate=0.05,
                                                      lr_scheduler_type="constant"),
                               train_dataset=Dataset.from_list(color_rows(repeat=2)), loss=loss)
    trainer.train(resume_from_checkpoint=resume)
    return loss.temperature


def test_learnable_temperature_is_checkpointed_and_resumed(tiny_path, tmp_path):
    straight = _temperature_run(tiny_path("clip"), tmp_path / "straight", 4)
    first = _temperature_run(tiny_path("clip"), tmp_path / "resumed", 2)
    checkpoint = tmp_path / "resumed" / "out" / "checkpoint-2"
    saved = load_file(checkpoint / "loss_state.safetensors")
    assert 1 / saved["log_scale"].exp().item() == pytest.approx(first, abs=1e-6)
    assert "loss_state.safetensors" not in loadable_files(str(checkpoint))  # training state: never pushed
    resumed = _temperature_run(tiny_path("clip"), tmp_path / "resumed", 4, resume=str(checkpoint))
    assert abs(straight - 0.1) > 1e-3 and abs(straight - first) > 1e-4  # it moved, also after step 2
    assert resumed == pytest.approx(straight, abs=1e-6)


def test_save_writes_the_state_dict_trainer_passes(tiny_path, tmp_path):
    # Under FSDP / DeepSpeed ZeRO-3 the live parameters are shards; Trainer gathers a full state dict and hands
    # it to _save, which must write it (and not the live, sharded parameters).
    model = CrossEncoder.from_pretrained(tiny_path("qwen2_vl"), head="linear", lora_config=LoraConfig(r=4))
    trainer = CrossEncoderTrainer(model=model, args=args(tmp_path), train_dataset=Dataset.from_list(
        [{"query": "q", "positive": "p", "negative_1": "n"}]))
    gathered = {k: torch.full_like(v, 0.5) for k, v in model.state_dict().items()}
    trainer._save(str(tmp_path / "saved"), state_dict=gathered)
    adapter = load_file(tmp_path / "saved" / "adapter_model.safetensors")
    head = load_file(tmp_path / "saved" / "head.safetensors")
    assert adapter and all(torch.all(v == 0.5) for v in adapter.values())
    assert head and all(torch.all(v == 0.5) for v in head.values())
    reloaded = CrossEncoder.from_pretrained(str(tmp_path / "saved"))
    assert torch.all(reloaded.head.net[0].weight == 0.5)


def test_accelerate_configs_parse_and_name_their_launch_line():
    from accelerate.commands.config.config_args import load_config_from_file

    configs = sorted((ROOT / "recipes" / "accelerate").glob("*.yaml"))
    assert {c.name for c in configs} == {"single_gpu.yaml", "multi_gpu.yaml", "fsdp.yaml", "deepspeed_zero2.yaml",
                                         "deepspeed_zero3.yaml"}
    for config in configs:
        first = config.read_text().splitlines()[0]
        assert first.startswith(f"# accelerate launch --config_file recipes/accelerate/{config.name} recipes/train_")
        recipe, recipe_config = first.split()[5], first.split()[7]
        assert (ROOT / recipe).is_file() and (ROOT / recipe_config).is_file()
        parsed = load_config_from_file(str(config))
        assert parsed.compute_environment.value == "LOCAL_MACHINE" and parsed.use_cpu is False
    fsdp = load_config_from_file(str(ROOT / "recipes" / "accelerate" / "fsdp.yaml")).fsdp_config
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    zero3 = load_config_from_file(str(ROOT / "recipes" / "accelerate" / "deepspeed_zero3.yaml")).deepspeed_config
    assert zero3["zero_stage"] == 3 and zero3["zero3_save_16bit_model"] is True


def test_fsdp_auto_wrap_finds_the_backbone_blocks(tiny_path):
    # accelerate's TRANSFORMER_BASED_WRAP reads _no_split_modules from the model it wraps (ours).
    model = BiEncoder.from_pretrained(tiny_path("qwen2_vl"), lora_config=LoraConfig(r=4))
    assert "Qwen2VLDecoderLayer" in model._no_split_modules


def test_recipe_seed_makes_lora_initialisation_reproducible(tiny_path, tmp_path):
    from test_recipes import _recipe

    recipe = _recipe()
    data = _json_data(tmp_path / "data")
    for name in ("a", "b"):
        recipe.main(["--model_name_or_path", tiny_path("clip"), "--dataset_name", "json", "--data_files", data,
                     "--output_dir", str(tmp_path / name), "--max_steps", "1", "--per_device_train_batch_size", "4",
                     "--lora_r", "4", "--use_cpu", "true", "--report_to", "none", "--seed", "3",
                     "--dataloader_num_workers", "0"])
    a, b = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_from_an_interrupted_checkpoint_says_what_to_do(tiny_path, tmp_path):
    def trainer(max_steps):
        model = BiEncoder.from_pretrained(tiny_path("clip"), lora_config=LoraConfig(r=4))
        return BiEncoderTrainer(model=model, args=args(tmp_path, max_steps=max_steps, save_strategy="steps",
                                                       save_steps=2), train_dataset=Dataset.from_list(color_rows()))

    trainer(4).train()
    (tmp_path / "out" / "checkpoint-4" / "trainer_state.json").unlink()  # a save cut short (full disk, kill)
    with pytest.raises(FileNotFoundError, match=r"checkpoint-4 is incomplete.*delete that folder"):
        trainer(6).train(resume_from_checkpoint=True)
