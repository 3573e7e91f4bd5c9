"""README features that had no test of their own ("Every claim shown", item 6): hard-negative mining's rank range,
margin and random sampling; checksums on resume; staging folders removed at interpreter exit; pointwise teacher
scores; the recipe flags --mini_batch_tokens, --late_loss, --hub_push_export and --card_datasets; the RuntimeError and
SafetensorError branches of a failed save; and a dual encoder's multi-vector folder in sentence-transformers."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from helpers import assert_rel_close
from images import color_rows, solid

from hf_mm_rerank import mine_hard_negatives


# ----- mine_hard_negatives: range_min / range_max, margin, sampling="random" --------------------------------------
class Scores:
    """A bi-encoder stand-in whose query-document dot products are set by hand: query [1, 0], document [s, 0]."""

    def __init__(self, scores: dict[str, float]):
        self.scores = scores

    def encode(self, inputs, side="query", batch_size=32, **kwargs):
        return torch.tensor([[1.0, 0.0] if side == "query" else [self.scores[x], 0.0] for x in inputs])


# The corpus ranked for the query: d0 (rank 0) d1 (1) p (2, the positive) d2 (3) d3 (4) d4 (5) d5 (6) d6 (7).
SCORES = {"p": 0.80, "d0": 0.95, "d1": 0.85, "d2": 0.78, "d3": 0.70, "d4": 0.60, "d5": 0.50, "d6": 0.40}


def _mine(**kwargs) -> list[str]:
    pairs = Dataset.from_list([{"query": "q", "positive": "p"}])
    mined = mine_hard_negatives(Scores(SCORES), pairs, list(SCORES), duplicate_threshold=None, **kwargs)
    if len(mined) == 0:  # skipped: fewer eligible candidates than num_negatives
        return []
    return [mined[0][name] for name in mined.column_names if name.startswith("negative_")]


def test_mining_rank_range_margin_and_random_sampling_pick_the_hand_computed_negatives():
    assert _mine(num_negatives=2) == ["d0", "d1"]  # no limits: the top two, the positive excluded
    assert _mine(num_negatives=2, range_min=1) == ["d1", "d2"]  # rank 0 is skipped
    assert _mine(num_negatives=6, range_min=0, range_max=7) == ["d0", "d1", "d2", "d3", "d4", "d5"]  # not d6 (rank 7)
    # margin 0.05: only candidates scoring <= 0.80 - 0.05 = 0.75, so d1 (0.85) and d2 (0.78) go; ranks [1, 7) leave
    # d3 d4 d5 eligible.
    window = dict(range_min=1, range_max=7, margin=0.05)
    assert _mine(num_negatives=2, **window) == ["d3", "d4"]
    assert _mine(num_negatives=3, **window) == ["d3", "d4", "d5"]
    assert _mine(num_negatives=4, **window) == []  # 4 negatives from 3 eligible: the row is skipped
    # Random sampling draws within the eligible set only, reproducibly per seed, and not always the top ones.
    draws = {seed: _mine(num_negatives=2, sampling="random", seed=seed, **window) for seed in range(12)}
    assert all(set(pick) <= {"d3", "d4", "d5"} and len(set(pick)) == 2 for pick in draws.values())
    assert {d for pick in draws.values() for d in pick} == {"d3", "d4", "d5"}
    assert {tuple(pick) for pick in draws.values()} != {("d3", "d4")}
    assert _mine(num_negatives=2, sampling="random", seed=5, **window) == draws[5]


# ----- checksums on resume -----------------------------------------------------------------------------------------
def test_resume_refuses_a_checkpoint_whose_weights_changed_after_saving(tiny_path, tmp_path):
    from test_long_runs import _clip_trainer

    out = tmp_path / "out"
    _clip_trainer(tiny_path("clip"), out, max_steps=2, save_steps=1).train()
    weights = out / "checkpoint-2" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01  # one bit of the last tensor's data: the file still parses and would load silently
    weights.write_bytes(bytes(data))
    resumed = _clip_trainer(tiny_path("clip"), out, max_steps=3, save_steps=1)
    with pytest.raises(ValueError, match=r"checkpoint-2/adapter_model\.safetensors is not the file that was saved"):
        resumed.train(resume_from_checkpoint=True)


# ----- staging folders removed when the interpreter exits ----------------------------------------------------------
def test_push_staging_folders_are_removed_at_interpreter_exit(tmp_path):
    """A staged copy still held (a push thread killed, a hung upload) is removed when Python exits, normally or on
    an uncaught exception (a forked child, so that hf_mm_rerank is imported once)."""
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "adapter_config.json").write_text("{}")
    temp = tmp_path / "temp"
    temp.mkdir()
    code = textwrap.dedent(f"""
        import os
        from hf_mm_rerank.training.hub_push import stage
        child = os.fork()
        staging = stage({str(tmp_path / "model")!r})
        line = f"{{'child' if child == 0 else 'parent'}} {{staging}} {{sorted(os.listdir(staging))}}\\n"
        os.write(1, line.encode())  # one write: the processes share the pipe (print writes piece by piece unbuffered)
        if child == 0:
            raise RuntimeError("training crashed")
        _, status = os.waitpid(child, 0)
        os.write(1, f"child exit {{os.waitstatus_to_exitcode(status)}}\\n".encode())
    """)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TMPDIR": str(temp)})
    assert run.returncode == 0, run.stderr[-2000:]
    assert "training crashed" in run.stderr and "child exit 1" in run.stdout
    for who in ("parent", "child"):  # (searched, not read line by line: the two processes write to one pipe)
        found = re.search(rf"\b{who} (/\S+) \[", run.stdout)
        assert found, f"no {who!r} line in the output: {run.stdout!r} / {run.stderr[-1000:]!r}"
        staging = found.group(1)
        assert staging.startswith(str(temp)) and "adapter_config.json" in run.stdout  # it was staged, in TMPDIR
        assert not os.path.exists(staging)
    assert list(temp.iterdir()) == []


# ----- score_with_teacher on pointwise rows ------------------------------------------------------------------------
def test_pointwise_teacher_score_equals_the_teachers_own_scores(tiny_path):
    from test_reranking import _reranker

    from hf_mm_rerank.retrieval.two_stage import score_with_teacher

    reranker = _reranker(tiny_path("qwen2_vl"), head="yes_no")
    rows = [{"query": "a red square", "document": "the square is red", "label": 1.0},
            {"query": "a red square", "document": "the square is blue", "label": 0.0},
            {"query": "a green square", "document": "grass", "label": 0.0}]
    data = Dataset.from_list(rows)
    scored = score_with_teacher(reranker, data, batch_size=2)
    assert "teacher_score" in scored.column_names and "teacher_scores" not in scored.column_names
    assert scored["label"] == [1.0, 0.0, 0.0]
    expected = reranker.score([(r["query"], r["document"]) for r in rows])
    assert_rel_close(torch.tensor(scored["teacher_score"]), expected.float())
    assert len(set(scored["teacher_score"])) == 3  # three different pairs, three scores (not one repeated)


# ----- recipe flags ------------------------------------------------------------------------------------------------
def _recipe_run(tiny_path, tmp_path, monkeypatch, *flags):
    """train_bi_encoder.py's main() for 2 steps on the tiny CLIP; returns the trainer it built."""
    from test_recipes import _json_data, _recipe

    module = _recipe()
    built = []

    class Recording(module.BiEncoderTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(module, "BiEncoderTrainer", Recording)
    module.main(["--model_name_or_path", tiny_path("clip"), "--data_files", _json_data(tmp_path / "data"),
                 "--dataset_name", "json", "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
                 "--per_device_train_batch_size", "4", "--use_cpu", "true", "--dataloader_num_workers", "0",
                 "--save_strategy", "no", "--report_to", "none", "--lora_r", "4", "--lora_alpha", "8", *flags])
    assert len(built) == 1
    return built[0]


def test_recipe_late_loss_pairwise_mini_batch_tokens_and_card_datasets(tiny_path, tmp_path, monkeypatch):
    from hf_mm_rerank import MultiVectorEncoder, Tokens
    from hf_mm_rerank.losses import MaxSimPairwiseLoss

    trainer = _recipe_run(tiny_path, tmp_path, monkeypatch, "--multi_vector", "true", "--projection_dim", "16",
                          "--late_loss", "pairwise", "--mini_batch_tokens", "48", "--card_datasets", "me/color-squares")
    assert isinstance(trainer.model, MultiVectorEncoder)
    assert type(trainer.loss) is MaxSimPairwiseLoss  # --late_loss pairwise (not the contrastive default it extends)
    assert any("train_loss" in row for row in trainer.state.log_history)  # it trained with it
    # --mini_batch_tokens 48: GradCache mini-batches counted in tokens.
    assert isinstance(trainer.loss.mini_batch_size, Tokens) and trainer.loss.mini_batch_size == 48
    # --card_datasets: the card's metadata names the dataset.
    metadata = (tmp_path / "out" / "README.md").read_text().split("---")[1]
    assert "datasets:" in metadata and "me/color-squares" in metadata


@pytest.mark.slow  # the export is checked in a subprocess, then pushed: about a minute on 2 cores
def test_recipe_hub_push_export_pushes_the_checked_export(tiny_path, tmp_path, monkeypatch, hub):
    from hf_mm_rerank import CachedContrastiveLoss

    trainer = _recipe_run(tiny_path, tmp_path, monkeypatch, "--mini_batch_size", "2", "--card_datasets",
                          "me/color-squares", "--hub_push_on", "end", "--hub_model_id", "me/rf", "--export", "merged",
                          "--hub_push_export", "repo")
    assert isinstance(trainer.loss, CachedContrastiveLoss)
    assert "me/color-squares" in hub.files("me/rf")["README.md"].decode()  # the pushed card too
    # --hub_push_export repo: the checked merged export is pushed to <hub_model_id>-merged, full weights, no adapter.
    pushed = set(hub.files("me/rf-merged"))
    assert {"config.json", "model.safetensors", "README.md"} <= pushed and "adapter_config.json" not in pushed
    assert "adapter_config.json" in set(hub.files("me/rf"))


# ----- a failed save: RuntimeError (torch.save) and SafetensorError (safetensors) ----------------------------------
def _safetensors_error(*args, **kwargs):
    from safetensors import SafetensorError

    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def _torch_error(*args, **kwargs):
    raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0: file write failed")


@pytest.mark.parametrize("error", ["RuntimeError", "SafetensorError"])
def test_a_failed_write_of_either_kind_is_named_and_leaves_no_partial_checkpoint(tiny_path, tmp_path, monkeypatch,
                                                                                 error):
    import peft.peft_model
    from test_long_runs import _check_failed_save_left_nothing, _clip_trainer

    from hf_mm_rerank.training.checkpoints import CheckpointWriteError

    real_torch, real_safetensors = torch.save, peft.peft_model.safe_save_file

    def torch_save(obj, f, *args, **kwargs):  # checkpoint-4's optimizer.pt fails half written
        if error == "RuntimeError" and str(f).endswith(os.path.join("checkpoint-4", "optimizer.pt")):
            Path(f).write_bytes(b"\0" * 1000)
            _torch_error()
        return real_torch(obj, f, *args, **kwargs)

    def safe_save(tensors, path, *args, **kwargs):  # checkpoint-4's adapter weights fail
        if error == "SafetensorError" and os.path.join("checkpoint-4", "") in str(path):
            _safetensors_error()
        return real_safetensors(tensors, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", torch_save)
    monkeypatch.setattr(peft.peft_model, "safe_save_file", safe_save)
    out = tmp_path / "out"
    trainer = _clip_trainer(tiny_path("clip"), out)
    with pytest.raises(CheckpointWriteError) as caught:
        trainer.train()
    assert f"{error}: " in str(caught.value) and isinstance(caught.value.__cause__, (RuntimeError, Exception))
    assert type(caught.value.__cause__).__name__ == error
    # "No space left on device" in the message is a full disk; torch's "file write failed" is only an I/O error.
    assert caught.value.errno == (errno.ENOSPC if error == "SafetensorError" else errno.EIO)
    # The final save (trainer.save_model) fails the same way: named, as a model rather than a checkpoint.
    monkeypatch.setattr(torch, "save", _torch_error if error == "RuntimeError" else real_torch)
    monkeypatch.setattr(peft.peft_model, "safe_save_file",
                        _safetensors_error if error == "SafetensorError" else real_safetensors)
    with pytest.raises(CheckpointWriteError, match=rf"could not write the model .*final: {error}: "):
        trainer.save_model(str(tmp_path / "final"))
    monkeypatch.setattr(torch, "save", real_torch)
    monkeypatch.setattr(peft.peft_model, "safe_save_file", real_safetensors)
    if error == "SafetensorError":  # a full disk: the shared check (named, nothing partial, resumes at step 3)
        _check_failed_save_left_nothing(out, caught.value, tiny_path("clip"))
    else:
        from transformers.trainer_utils import get_last_checkpoint

        assert str(out / "checkpoint-4") in str(caught.value) and "resume_from_checkpoint=True" in str(caught.value)
        assert sorted(p.name for p in out.iterdir() if p.name.startswith(("checkpoint", "_partial"))) == ["checkpoint-2"]
        assert get_last_checkpoint(str(out)).endswith("checkpoint-2")


# ----- a dual encoder's multi-vector folder and sentence-transformers ----------------------------------------------
def test_dual_encoder_multi_vector_folder_says_why_it_has_no_sentence_transformers_layout(tiny_path, tmp_path):
    """The demo's kind of model (a VisionTextDualEncoder, one vector per token and patch) used to save an empty
    modules.json, on which sentence-transformers fails ("An empty modules list was passed"). sentence-transformers
    6.3 cannot encode its image patches at all (no attention mask), so the folder has no sentence-transformers files;
    it says why in a file of its own and in the card's Serving section, and hf_mm_rerank reloads it."""
    from helpers import args
    from peft import LoraConfig

    from hf_mm_rerank import BiEncoderTrainer, MultiVectorEncoder
    from hf_mm_rerank.losses import MaxSimContrastiveLoss
    from hf_mm_rerank.modeling.st_format import NO_ST_FILE, ST_CONFIG_FILES

    torch.manual_seed(0)
    model = MultiVectorEncoder.from_pretrained(tiny_path("vtde"), lora_config=LoraConfig(r=4, target_modules=["query"]),
                                               dim=16)
    out = tmp_path / "mv"
    out.mkdir()
    (out / "modules.json").write_text("[]")  # what an earlier save left: replaced, not kept
    trainer = BiEncoderTrainer(model=model, args=args(tmp_path, max_steps=1, per_device_train_batch_size=4),
                               train_dataset=Dataset.from_list(color_rows(repeat=1)), loss=MaxSimContrastiveLoss())
    trainer.train()
    trainer.save_model(str(out))
    assert not any((out / name).exists() for name in ST_CONFIG_FILES)
    note = (out / NO_ST_FILE).read_text()
    assert "KeyError 'attention_mask'" in note and "MultiVectorEncoder.from_pretrained" in note
    card = (out / "README.md").read_text()
    serving = card[card.index("Serving"):]
    assert "sentence-transformers (6.3) MultiVectorEncoder cannot encode a dual encoder's image patches" in serving
    assert "| sentence-transformers | not served |" in serving and "MultiVectorEncoder(" not in serving
    again = MultiVectorEncoder.from_pretrained(str(out))
    assert_rel_close(again.encode([solid("red")], side="document").embeddings,
                     model.encode([solid("red")], side="document").embeddings)
    # The reason holds in sentence-transformers itself: its MultiVectorEncoder with the dual encoder's token outputs
    # encodes text but not images; and the empty module list that used to be written does not load.
    from sentence_transformers import MultiVectorEncoder as STMultiVectorEncoder
    from sentence_transformers.base.modules import Normalize, Transformer

    tokens = Transformer(tiny_path("vtde"), module_output_name="token_embeddings", modality_config={
        "text": {"method": "get_text_features", "method_output_name": "last_hidden_state"},
        "image": {"method": "get_image_features", "method_output_name": "last_hidden_state"}})
    st = STMultiVectorEncoder(modules=[tokens, Normalize(module_input_name="token_embeddings",
                                                                   module_output_name="token_embeddings")], device="cpu")
    assert st.encode_query(["a red square"])[0].shape[-1] == 64
    with pytest.raises(KeyError, match="attention_mask"):
        st.encode_document([solid("red")])
    (tmp_path / "empty").mkdir()
    for name in os.listdir(out):
        if (out / name).is_file():
            (tmp_path / "empty" / name).write_bytes((out / name).read_bytes())
    (tmp_path / "empty" / "modules.json").write_text("[]")
    with pytest.raises(Exception, match="empty modules list|no Transformer module"):
        STMultiVectorEncoder(str(tmp_path / "empty"), device="cpu")
