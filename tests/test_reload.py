"""Saved models reload anywhere, as trained: moved folders, other working directories, missing bases, the Hub
(private, on a branch, empty cache), and QLoRA adapters on their recorded quantization."""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
from conftest import HUB_TOKEN
from datasets import Dataset
from helpers import args, assert_rel_close
from images import color_rows, solid
from peft import LoraConfig

from hf_mm_rerank import BiEncoder, BiEncoderTrainer, HubPushCallback

PROBE = ["a red square", solid("blue")]


def _lora(path, **kwargs):
    return BiEncoder.from_pretrained(str(path), lora_config=LoraConfig(r=4, init_lora_weights=False), **kwargs)


def _recorded_base(folder) -> tuple[str, str]:
    ours = json.loads((folder / "hf_mm_rerank_config.json").read_text())["base_model"]
    peft = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    return ours, peft


def test_a_base_inside_the_saved_folder_moves_with_it(tiny_path, tmp_path, monkeypatch):
    out = tmp_path / "outputs" / "demo"
    shutil.copytree(tiny_path("clip"), out / "_base_model")
    monkeypatch.chdir(tmp_path)
    model = _lora("outputs/demo/_base_model")  # a relative path, as the demo recipe gives it
    expected = model.encode(PROBE)
    model.save_pretrained("outputs/demo")
    assert _recorded_base(out) == ("./_base_model", "./_base_model")
    moved = tmp_path / "elsewhere" / "model"
    shutil.move(str(out), moved)
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert_rel_close(BiEncoder.from_pretrained("model").encode(PROBE), expected)
    monkeypatch.chdir("/")
    assert_rel_close(BiEncoder.from_pretrained(str(moved)).encode(PROBE), expected)


def test_a_base_elsewhere_is_absolute_and_a_missing_one_names_the_fix(tiny_path, tmp_path, monkeypatch):
    shutil.copytree(tiny_path("clip"), tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    model = _lora("base")
    expected = model.encode(PROBE)
    model.save_pretrained(str(tmp_path / "model"))
    assert _recorded_base(tmp_path / "model") == (str(tmp_path / "base"), str(tmp_path / "base"))
    shutil.move(str(tmp_path / "base"), tmp_path / "moved-base")
    with pytest.raises(FileNotFoundError, match=f"local base model {tmp_path / 'base'}, which is not there.*base_model="):
        BiEncoder.from_pretrained(str(tmp_path / "model"))
    reloaded = BiEncoder.from_pretrained(str(tmp_path / "model"), base_model=str(tmp_path / "moved-base"))
    assert_rel_close(reloaded.encode(PROBE), expected)


def test_hub_options_reach_every_lookup_private_repo_on_a_branch(hub, tiny_path, tmp_path):
    import tiny_models
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.endpoint, token=HUB_TOKEN)
    api.create_repo("me/base", private=True)
    api.upload_folder(folder_path=tiny_path("clip"), repo_id="me/base")  # main: hidden size 64
    api.create_branch("me/base", branch="wide")
    wide = tiny_models.make_clip(tmp_path / "wide", hidden=128)
    api.upload_folder(folder_path=str(wide), repo_id="me/base", revision="wide")  # the branch: hidden size 128
    hub.state.token = HUB_TOKEN  # every request needs the token from now on
    cache = tmp_path / "cache"
    model = BiEncoder.from_pretrained("me/base", revision="wide", token=HUB_TOKEN, cache_dir=str(cache),
                                      lora_config=LoraConfig(r=4))
    assert model.config.projection_dim == 128 and model.encode(["a red square"]).shape == (1, 128)
    model.save_pretrained(str(tmp_path / "saved"))
    assert _recorded_base(tmp_path / "saved")[0] == "me/base"  # a Hub id stays an id


def test_pushing_a_model_with_a_local_base_warns(hub, tiny_path, tmp_path, caplog):
    callback = HubPushCallback("me/local-base", push_on="end")
    trainer = BiEncoderTrainer(model=_lora(tiny_path("clip")), args=args(tmp_path, max_steps=1),
                               train_dataset=Dataset.from_list(color_rows()), callbacks=[callback])
    with caplog.at_level(logging.WARNING):
        trainer.train()
    assert "will not load elsewhere" in caplog.text and "base_model=" in caplog.text
    assert os.path.isabs(trainer.model.spec.base_model)


@pytest.mark.parametrize("damage, message, unchecked", [
    ("truncate adapter_model.safetensors", r"adapter_model.safetensors is not the file that was saved",
     r"adapter_model.safetensors is damaged or incomplete"),
    ("remove adapter_model.safetensors", r"adapter_model.safetensors is missing", None),
    ("truncate hf_mm_rerank_config.json", r"hf_mm_rerank_config.json is not valid JSON", None),
    ("truncate adapter_config.json", r"adapter_config.json is not valid JSON", None),
    ("truncate head.safetensors", r"head.safetensors is not the file that was saved",
     r"head.safetensors is damaged or incomplete"),
    ("flip head.safetensors", r"head.safetensors is not the file that was saved.*verify_checksums=False", "loads"),
    ("truncate tokenizer.json", r"tokenizer.json is damaged or incomplete .*Fix: copy or save the model again", None),
    ("truncate tokenizer_config.json", r"tokenizer_config.json is damaged or incomplete", None),
    ("truncate processor_config.json", r"processor_config.json is damaged or incomplete", None),
])
def test_damaged_saves_name_the_file_and_the_fix(tiny_path, tmp_path, damage, message, unchecked):
    from test_cross_encoder import PLAIN_PROMPT

    from hf_mm_rerank import CrossEncoder

    CrossEncoder.from_pretrained(tiny_path("qwen2_vl"), head="linear", lora_config=LoraConfig(r=4),
                                 **PLAIN_PROMPT).save_pretrained(str(tmp_path / "m"))
    action, name = damage.split()
    target = tmp_path / "m" / name
    data = target.read_bytes()
    if action == "remove":
        target.unlink()
    elif action == "flip":  # one byte inside the tensor data: loads silently without the checksum
        target.write_bytes(data[:-3] + bytes([data[-3] ^ 0x40]) + data[-2:])
    else:
        target.write_bytes(data[: len(data) // 2])
    with pytest.raises((OSError, ValueError, FileNotFoundError), match=message):
        CrossEncoder.from_pretrained(str(tmp_path / "m"))
    if unchecked == "loads":
        assert CrossEncoder.from_pretrained(str(tmp_path / "m"), verify_checksums=False).head is not None
    elif unchecked:
        with pytest.raises(OSError, match=unchecked):
            CrossEncoder.from_pretrained(str(tmp_path / "m"), verify_checksums=False)


def test_a_copy_without_its_base_folder_says_so(tiny_path, tmp_path):
    out = tmp_path / "model"
    shutil.copytree(tiny_path("clip"), out / "_base_model")
    _lora(out / "_base_model").save_pretrained(str(out))
    shutil.copytree(out, tmp_path / "copy", ignore=shutil.ignore_patterns("_base_model"))
    with pytest.raises(FileNotFoundError, match=r"recorded inside the saved folder as \./_base_model, which was not "
                                                r"copied along.*base_model="):
        BiEncoder.from_pretrained(str(tmp_path / "copy"))
