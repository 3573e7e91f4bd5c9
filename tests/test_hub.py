"""Hub publishing against the loopback Hub server: HubPushCallback, Trainer's push_to_hub, reload from a repo."""

import copy
import logging
import os
import socket
import time

import pytest
import torch
import yaml
from conftest import HUB_TOKEN
from datasets import Dataset
from helpers import args, assert_rel_close
from images import COLORS, color_rows, solid
from peft import LoraConfig
from test_cross_encoder import PLAIN_PROMPT, red_rows
from transformers import TrainingArguments

from hf_mm_rerank import BiEncoder, BiEncoderTrainer, CrossEncoder, CrossEncoderTrainer, HubPushCallback
from hf_mm_rerank.training.hub_push import stage

TRAINING_STATE = {"optimizer.pt", "scheduler.pt", "trainer_state.json", "training_args.bin", "rng_state.pth"}
PROBE = ["a red square", solid("blue")]
REAL_SHAPED = "hf_" + "Xq7Lp2Rz9K" * 3 + "abcd"  # the shape of a real Hugging Face token (hf_ + 34 characters)


def _bi_trainer(tiny_path, tmp_path, callback=None, **overrides):
    model = BiEncoder.from_pretrained(tiny_path("clip"), lora_config=LoraConfig(r=4, init_lora_weights=False))
    settings = dict(max_steps=4, save_strategy="steps", save_steps=2)
    settings.update(overrides)
    return BiEncoderTrainer(model=model, args=args(tmp_path, **settings), train_dataset=Dataset.from_list(color_rows(2)),
                            callbacks=[callback] if callback else None,
                            model_card={"base_model": "openai/clip-vit-base-patch32", "license": "mit"})


def _card_metadata(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_callback_pushes_loadable_files_in_the_background_and_the_repo_reloads(hub, tiny_path, tmp_path):
    callback = HubPushCallback("me/clip-lora", backoff=0.01)
    trainer = _bi_trainer(tiny_path, tmp_path, callback)
    trainer.train()
    assert [r.label for r in callback.records] == ["step 2", "step 4"]
    assert all(r.commit_url and r.error is None for r in callback.records)
    assert callback.commit_url.startswith(hub.endpoint + "/me/clip-lora/commit/")
    files = hub.files("me/clip-lora")
    assert {"adapter_config.json", "adapter_model.safetensors", "hf_mm_rerank_config.json", "README.md",
            "tokenizer.json", "processor_config.json"} <= set(files)
    assert not TRAINING_STATE & set(files) and not any(name.endswith((".pt", ".pth", ".bin")) for name in files)
    assert os.path.isfile(tmp_path / "out" / "checkpoint-4" / "optimizer.pt")  # local checkpoints untouched

    reloaded = BiEncoder.from_pretrained("me/clip-lora", is_trainable=False)
    assert_rel_close(reloaded.encode(PROBE), trainer.model.encode(PROBE))
    card = files["README.md"].decode()
    meta = _card_metadata(card)
    assert meta["library_name"] == "peft" and meta["base_model"] == "openai/clip-vit-base-patch32"
    assert meta["base_model_relation"] == "adapter" and meta["license"] == "mit"
    assert {"hf_mm_rerank", "lora", "multimodal", "image", "text"} <= set(meta["tags"])
    assert 'MODEL = "me/clip-lora"' in card and "BiEncoder.from_pretrained(MODEL)" in card


def test_reranker_head_is_pushed_at_the_end_to_a_branch_and_reloads(hub, tiny_path, tmp_path):
    rr = CrossEncoder.from_pretrained(tiny_path("qwen2_vl"), head="mlp", lora_config=LoraConfig(r=4), **PLAIN_PROMPT)
    callback = HubPushCallback("me/reranker", push_on="end", revision="dev", private=True, backoff=0.01)
    trainer = CrossEncoderTrainer(model=rr, args=args(tmp_path, max_steps=3, learning_rate=3e-3),
                                  train_dataset=Dataset.from_list(red_rows(repeat=1)), callbacks=[callback])
    trainer.train()
    assert [r.label for r in callback.records] == ["end of training (step 3)"] and callback.commit_url
    assert hub.state.repos["me/reranker"].private
    assert "head.safetensors" not in hub.files("me/reranker", "main")
    files = hub.files("me/reranker", "dev")
    assert {"head.safetensors", "adapter_model.safetensors", "hf_mm_rerank_config.json", "README.md"} <= set(files)
    pairs = [("a red square", solid(c)) for c in COLORS]
    reloaded = CrossEncoder.from_pretrained("me/reranker", revision="dev", is_trainable=False)
    assert_rel_close(reloaded.score(pairs), rr.score(pairs))
    assert _card_metadata(files["README.md"].decode())["pipeline_tag"] == "text-ranking"


def test_push_on_best_pushes_only_new_best_checkpoints(hub, tiny_path, tmp_path, color_evaluator):
    callback = HubPushCallback("me/best", push_on="best", backoff=0.01)
    model = BiEncoder.from_pretrained(tiny_path("clip"), lora_config=LoraConfig(r=4))
    trainer = BiEncoderTrainer(model=model, args=args(tmp_path, max_steps=6, save_strategy="steps", save_steps=1,
                                                      eval_strategy="steps", eval_steps=1,
                                                      metric_for_best_model="ndcg@10", learning_rate=5e-3),
                               train_dataset=Dataset.from_list(color_rows(2)), evaluator=color_evaluator,
                               callbacks=[callback])
    trainer.train()
    history = [row["eval_ndcg@10"] for row in trainer.state.log_history if "eval_ndcg@10" in row]
    best_steps = [i + 1 for i, value in enumerate(history) if value > max(history[:i], default=-1)]
    assert [r.label for r in callback.records] == [f"step {s}" for s in best_steps]
    assert len(hub.state.commits) == len(best_steps) < 6


def test_server_errors_are_retried_with_backoff(hub, tiny_path, tmp_path):
    # huggingface_hub retries a commit 5 times itself; 7 failures outlast its first attempt, not our second.
    hub.state.fail_next_commits = 7
    callback = HubPushCallback("me/flaky", push_on="end", backoff=0.01)
    _bi_trainer(tiny_path, tmp_path, callback, save_strategy="no").train()
    (record,) = callback.records
    assert record.attempts == 2 and record.commit_url and record.error is None
    assert sum(path.endswith("/commit/main") for _, path in hub.state.requests) == 8
    assert "adapter_model.safetensors" in hub.files("me/flaky")


def test_failed_push_is_reported_and_training_and_checkpoints_survive(hub, tiny_path, tmp_path, caplog):
    hub.state.fail_next_commits = 100
    callback = HubPushCallback("me/down", max_retries=2, backoff=0.01)
    trainer = _bi_trainer(tiny_path, tmp_path, callback)
    with caplog.at_level(logging.ERROR, logger="hf_mm_rerank.training.hub_push"):
        trainer.train()
    assert trainer.state.global_step == 4
    assert all(r.attempts == 3 and "HTTP 500" in r.error for r in callback.records) and len(callback.records) == 2
    assert "giving up on pushing step 4 to me/down after 3 attempt(s)" in caplog.text
    again = BiEncoder.from_pretrained(str(tmp_path / "out" / "checkpoint-4"), is_trainable=False)
    assert_rel_close(again.encode(PROBE), trainer.model.encode(PROBE))


def test_hung_server_times_out_without_blocking_training(hub, tiny_path, tmp_path):
    hub.state.hang_commits = True
    callback = HubPushCallback("me/hung", push_on="end", max_retries=1, backoff=0.01, attempt_timeout=0.5)
    start = time.monotonic()
    trainer = _bi_trainer(tiny_path, tmp_path, callback, save_strategy="no")
    trainer.train()
    (record,) = callback.records
    assert record.attempts == 2 and "no answer from the Hub within 0.5 s" in record.error
    assert time.monotonic() - start < 30 and trainer.state.global_step == 4


def test_pushes_run_beside_training(hub, tiny_path, tmp_path, caplog):
    hub.state.hang_commits = True  # every upload hangs: training must not wait for it
    callback = HubPushCallback("me/slow", max_retries=0, attempt_timeout=60, wait_at_end=0.2)
    trainer = _bi_trainer(tiny_path, tmp_path, callback)
    with caplog.at_level(logging.ERROR, logger="hf_mm_rerank.training.hub_push"):
        trainer.train()
    assert trainer.state.global_step == 4 and os.path.isdir(tmp_path / "out" / "checkpoint-4")
    assert all(r.commit_url is None and r.error is None for r in callback.records)  # still in flight
    for step in (2, 4):
        assert (f"still pushing step {step} to me/slow after waiting 0.2 s" in caplog.text
                and f"the files are in {tmp_path / 'out' / f'checkpoint-{step}'}" in caplog.text)
    assert '--exclude "*.pt" --exclude "*.pth" --exclude "*.bin"' in caplog.text  # never the training state
    hub.state.release.set()


def test_a_late_attempt_cannot_move_the_repo_back_to_an_older_push(hub, tiny_path, tmp_path):
    hub.state.hold_next_commits = 1  # step 2's first commit hangs past the attempt timeout, and lands later
    callback = HubPushCallback("me/ordered", backoff=0.01, attempt_timeout=1.0)
    _bi_trainer(tiny_path, tmp_path, callback).train()
    assert [(r.label, r.attempts, r.error) for r in callback.records] == [("step 2", 2, None), ("step 4", 1, None)]
    newest = hub.files("me/ordered")
    hub.state.release.set()  # the abandoned attempt reaches the Hub now, after the step 4 push
    assert hub.state.held_done.wait(30)
    assert hub.files("me/ordered") == newest  # still step 4
    assert [c["summary"] for c in hub.state.commits] == ["hf_mm_rerank: step 2", "hf_mm_rerank: step 4"]
    assert [r["summary"] for r in hub.state.refused] == ["hf_mm_rerank: step 2"]


def test_a_push_lands_on_top_when_the_branch_moved(hub, tiny_path, tmp_path):
    from huggingface_hub import HfApi

    callback = HubPushCallback("me/moved", backoff=0.01)
    trainer = _bi_trainer(tiny_path, tmp_path, callback, max_steps=2)
    trainer.train()
    HfApi(token=HUB_TOKEN).upload_file(path_or_fileobj=b"notes", path_in_repo="NOTES.md", repo_id="me/moved")
    callback._guarded("again", lambda: stage(str(tmp_path / "out" / "checkpoint-2")))
    assert callback.wait(30) and callback.records[-1].commit_url and callback.records[-1].attempts == 2
    assert "NOTES.md" in hub.files("me/moved") and len(hub.state.refused) == 1


def test_staging_is_removed_on_every_path(hub, tiny_path, tmp_path, monkeypatch):
    import shutil
    import tempfile

    import hf_mm_rerank.training.hub_push as callbacks

    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    real_copy = shutil.copy2
    calls = []

    def copy_until_full(source, target):  # the temp disk fills up on the second file of each staging
        calls.append(source)
        if len(calls) % 2 == 0:
            raise OSError(28, "No space left on device")
        return real_copy(source, target)

    monkeypatch.setattr(callbacks.shutil, "copy2", copy_until_full)
    callback = HubPushCallback("me/staging", backoff=0.01)
    _bi_trainer(tiny_path, tmp_path, callback).train()
    assert all("No space left" in r.error for r in callback.records) and len(callback.records) == 2
    monkeypatch.setattr(callbacks.shutil, "copy2", real_copy)
    hub.state.fail_next_commits = 100  # pushes that fail remove their staging too
    failing = HubPushCallback("me/staging", backoff=0.01, max_retries=1)
    _bi_trainer(tiny_path, tmp_path / "again", failing).train()
    assert all(r.error for r in failing.records)
    hub.state.fail_next_commits = 0
    _bi_trainer(tiny_path, tmp_path / "ok", HubPushCallback("me/staging", backoff=0.01)).train()
    assert list(temp.iterdir()) == [] and not callbacks._LIVE_STAGING


def test_refused_token_is_retried_then_reported_without_leaking(hub, tiny_path, tmp_path, caplog):
    hub.state.token = "a-different-token"
    callback = HubPushCallback("me/private", push_on="end", max_retries=2, backoff=0.01)
    with caplog.at_level(logging.ERROR, logger="hf_mm_rerank.training.hub_push"):
        _bi_trainer(tiny_path, tmp_path, callback, save_strategy="no").train()
    (record,) = callback.records
    assert record.attempts == 3 and "HTTP 401" in record.error
    assert "token was refused" in caplog.text and HUB_TOKEN not in caplog.text and HUB_TOKEN not in repr(callback)


def test_no_network_is_retried_then_reported(tiny_path, tmp_path, caplog):
    import socket as sockets

    with sockets.socket() as probe:  # a local port nothing listens on: connection refused
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    callback = HubPushCallback("me/offline", push_on="end", endpoint=f"http://127.0.0.1:{port}", max_retries=1,
                               backoff=0.01)
    import huggingface_hub.constants as constants

    offline, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, False
    try:
        trainer = _bi_trainer(tiny_path, tmp_path, callback, save_strategy="no")
        trainer.train()
    finally:
        constants.HF_HUB_OFFLINE = offline
    (record,) = callback.records
    assert record.attempts == 2 and record.commit_url is None and "Connect" in record.error
    assert trainer.state.global_step == 4


def test_no_pushed_file_contains_the_token_a_path_or_the_host(hub, tiny_path, tmp_path):
    callback = HubPushCallback("me/clean", token=HUB_TOKEN, backoff=0.01)
    _bi_trainer(tiny_path, tmp_path, callback).train()
    assert hub.state.commits
    for body in hub.state.bodies:
        assert HUB_TOKEN.encode() not in body
    card = hub.files("me/clean")["README.md"].decode()
    for secret in (HUB_TOKEN, str(tmp_path), tiny_path("clip"), socket.gethostname()):
        assert secret not in card


def test_trainer_push_to_hub_makes_complete_repos_with_checkpoints(hub, tiny_path, tmp_path):
    trainer = _bi_trainer(tiny_path, tmp_path, push_to_hub=True, hub_model_id="me/trainer-push",
                          hub_strategy="checkpoint")
    trainer.train()
    trainer.push_to_hub()
    files = hub.files("me/trainer-push")
    for prefix in ("", "last-checkpoint/"):
        assert {f"{prefix}adapter_model.safetensors", f"{prefix}hf_mm_rerank_config.json",
                f"{prefix}tokenizer.json"} <= set(files), sorted(files)
    meta = _card_metadata(files["README.md"].decode())
    assert "hf_mm_rerank" in meta["tags"] and meta["library_name"] == "peft"
    reloaded = BiEncoder.from_pretrained("me/trainer-push", is_trainable=False)
    assert_rel_close(reloaded.encode(PROBE), trainer.model.encode(PROBE))


def test_no_token_in_any_saved_or_pushed_byte(hub, tiny_path, tmp_path):
    # The token everywhere a user may put it: hub_token, a callback token, from_pretrained(token=...), and a
    # token-shaped string in a free-text field.
    model = BiEncoder.from_pretrained(tiny_path("clip"), lora_config=LoraConfig(r=4), token=HUB_TOKEN)
    callback = HubPushCallback("me/secret-cb", token=HUB_TOKEN, backoff=0.01)
    trainer = BiEncoderTrainer(
        model=model, train_dataset=Dataset.from_list(color_rows(2)), callbacks=[callback],
        args=args(tmp_path, max_steps=4, save_strategy="steps", save_steps=2, push_to_hub=True,
                  hub_model_id="me/secret", hub_token=HUB_TOKEN, hub_strategy="checkpoint",
                  run_name=f"run with {REAL_SHAPED}"))
    trainer.train()
    trainer.save_model()
    trainer.push_to_hub()
    assert callback.wait(30)
    assert "training_args.bin" in hub.files("me/secret") and "README.md" in hub.files("me/secret-cb")
    assert len(hub.state.bodies) > 10
    for body in hub.state.bodies:  # every byte sent to the Hub
        assert HUB_TOKEN.encode() not in body and REAL_SHAPED.encode() not in body
    saved = [path for path in (tmp_path / "out").rglob("*") if path.is_file()]  # every byte written locally
    assert len([p for p in saved if p.name == "training_args.bin"]) >= 3
    assert {"README.md", "hf_mm_rerank_config.json", "adapter_config.json"} <= {p.name for p in saved}
    for path in saved:
        assert HUB_TOKEN.encode() not in path.read_bytes() and REAL_SHAPED.encode() not in path.read_bytes(), path
    loaded = torch.load(tmp_path / "out" / "training_args.bin", weights_only=False)
    assert type(loaded) is TrainingArguments and loaded.hub_token is None and loaded.run_name is None
    assert loaded.include_num_input_tokens_seen == trainer.args.include_num_input_tokens_seen  # settings stay
    assert loaded.hub_model_id == "me/secret" and loaded.max_steps == 4
    assert trainer.args.hub_token == HUB_TOKEN and copy.deepcopy(trainer.args).hub_token == HUB_TOKEN


def test_bad_callback_arguments_are_refused(tmp_path, tiny_path):
    with pytest.raises(ValueError, match="push_on='sometimes'"):
        HubPushCallback("me/x", push_on="sometimes")
    with pytest.raises(ValueError, match="user_or_org/name"):
        HubPushCallback("just-a-name")
    trainer = _bi_trainer(tiny_path, tmp_path, HubPushCallback("me/x", push_on="best"))
    with pytest.raises(ValueError, match="metric_for_best_model"):
        trainer.train()


def test_recipe_pushes_with_the_callback_and_trainer_push(hub, tiny_path, tmp_path):
    from test_recipes import CONFIGS, _json_data, _recipe

    data = _json_data(tmp_path / "data")
    _recipe("train_cross_encoder").main([
        "--config", str(CONFIGS / "qwen2_vl_2b_qlora_yes_no.yaml"), "--model_name_or_path", tiny_path("qwen2_vl"),
        "--data_files", data, "--eval_fraction", "0", "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
        "--per_device_train_batch_size", "2", "--num_negatives", "2", "--use_cpu", "true", "--bf16", "false",
        "--dtype", "float32", "--dataloader_num_workers", "0", "--eval_strategy", "no", "--save_steps", "1",
        "--max_pixels", "4096", "--load_in_4bit", "false", "--hub_model_id", "me/recipe-rr", "--hub_push_on", "save",
        "--push_to_hub", "true", "--card_license", "apache-2.0", "--card_base_model", "Qwen/Qwen2-VL-2B-Instruct"])
    files = hub.files("me/recipe-rr")
    assert {"adapter_model.safetensors", "hf_mm_rerank_config.json", "README.md"} <= set(files)
    assert not [f for f in files if f.startswith(("_base_model", "final", "checkpoint-"))]
    meta = _card_metadata(files["README.md"].decode())
    assert meta["license"] == "apache-2.0" and meta["base_model"] == "Qwen/Qwen2-VL-2B-Instruct"
    labels = [c["summary"] for c in hub.state.commits]
    assert "hf_mm_rerank: step 1" in labels and "hf_mm_rerank: step 2" in labels  # the callback's pushes


def test_a_local_staging_failure_is_reported_not_raised(hub, tiny_path, tmp_path, monkeypatch, caplog):
    import hf_mm_rerank.training.hub_push as callbacks

    def full_disk(directory):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(callbacks, "stage", full_disk)
    callback = HubPushCallback("me/full", backoff=0.01)
    trainer = _bi_trainer(tiny_path, tmp_path, callback)
    with caplog.at_level(logging.ERROR, logger="hf_mm_rerank.training.hub_push"):
        trainer.train()
    assert trainer.state.global_step == 4 and os.path.isdir(tmp_path / "out" / "checkpoint-4")
    assert [r.label for r in callback.records] == ["step 2", "step 4"]
    assert all("No space left" in r.error for r in callback.records) and "could not stage step 2" in caplog.text


def test_a_local_base_is_pushed_as_the_hub_id_the_card_names(hub, tiny_path, tmp_path):
    import json

    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo("tiny/clip-base", exist_ok=True)
    api.upload_folder(repo_id="tiny/clip-base", folder_path=tiny_path("clip"))  # the Hub copy of the local base
    callback = HubPushCallback("me/portable", push_on="end", backoff=0.01)
    trainer = _bi_trainer(tiny_path, tmp_path, callback, save_strategy="no")
    trainer.model_card_kwargs["base_model"] = "tiny/clip-base"
    trainer.train()
    assert callback.wait(30) and callback.commit_url
    files = hub.files("me/portable")
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == "tiny/clip-base"
    assert json.loads(files["hf_mm_rerank_config.json"])["base_model"] == "tiny/clip-base"
    assert all(tiny_path("clip").encode() not in data for data in files.values())  # no local path pushed
    reloaded = BiEncoder.from_pretrained("me/portable", is_trainable=False)
    assert_rel_close(reloaded.encode(PROBE), trainer.model.encode(PROBE))
