import json
import os

import pytest
import torch
from helpers import args, assert_rel_close, fixed_batch_loss, rel_diff
from images import solid
from peft import LoraConfig
from PIL import Image

from hf_mm_rerank import BiEncoder, BiEncoderTrainer

FAMILIES = ["clip", "siglip", "vtde", "qwen2_vl", "qwen3_vl"]
PROBE = ["a red square", solid("blue"), {"text": "green", "image": solid("green")}]


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_trains_saves_and_reloads(tiny_path, tmp_path, color_dataset, family):
    model = BiEncoder.from_pretrained(tiny_path(family), lora_config=LoraConfig(r=8, lora_alpha=16))
    before = _snapshot(model)
    trainer = BiEncoderTrainer(model=model, args=args(tmp_path, max_steps=8), train_dataset=color_dataset)
    initial_loss = fixed_batch_loss(trainer)
    trainer.train()
    after = _snapshot(model)
    lora = [n for n in before if "lora_" in n]
    assert lora and all(not torch.equal(before[n], after[n]) for n in lora if "lora_B" in n)
    assert all(torch.equal(before[n], after[n]) for n in before if "lora_" not in n)
    # vision tower frozen by default: no LoRA inside it
    assert not [n for n in lora if "vision" in n or "visual" in n]
    assert fixed_batch_loss(trainer) < 0.9 * initial_loss, (initial_loss, fixed_batch_loss(trainer))

    trainer.save_model(str(tmp_path / "final"))
    files = set(os.listdir(tmp_path / "final"))
    assert {"adapter_model.safetensors", "adapter_config.json", "hf_mm_rerank_config.json"} <= files
    assert "model.safetensors" not in files  # the adapter only, not the base weights
    spec = json.loads((tmp_path / "final" / "hf_mm_rerank_config.json").read_text())
    assert spec["base_model"] == tiny_path(family) and spec["adapter"] is True

    again = BiEncoder.from_pretrained(str(tmp_path / "final"))
    assert_rel_close(model.encode(PROBE), again.encode(PROBE))


@pytest.mark.parametrize("family", ["clip", "qwen2_vl"])
def test_full_fine_tune_and_reload(tiny_path, tmp_path, color_dataset, family):
    model = BiEncoder.from_pretrained(tiny_path(family))
    before = _snapshot(model)
    BiEncoderTrainer(model=model, args=args(tmp_path, max_steps=2, learning_rate=1e-3),
                     train_dataset=color_dataset).train()
    changed = [n for n, p in model.named_parameters() if not torch.equal(before[n], p)]
    assert len(changed) > len(before) // 2
    model.save_pretrained(str(tmp_path / "full"))
    assert os.path.isfile(tmp_path / "full" / "model.safetensors")
    again = BiEncoder.from_pretrained(str(tmp_path / "full"))
    assert_rel_close(model.encode(PROBE), again.encode(PROBE))


def test_merge_and_unload_keeps_embeddings(tiny_path, tmp_path):
    model = BiEncoder.from_pretrained(tiny_path("qwen2_vl"), lora_config=LoraConfig(r=4, init_lora_weights=False))
    reference = model.encode(PROBE)
    model.merge_and_unload()
    assert not model.is_peft
    model.save_pretrained(str(tmp_path / "merged"))
    merged = BiEncoder.from_pretrained(str(tmp_path / "merged"))
    assert_rel_close(reference, merged.encode(PROBE))
    with pytest.raises(ValueError, match="no adapter to merge"):
        merged.merge_and_unload()


def test_missing_or_mismatched_adapter_weights_raise(tiny_path, tmp_path):
    from safetensors.torch import load_file, save_file

    model = BiEncoder.from_pretrained(tiny_path("clip"), lora_config=LoraConfig(r=4))
    folder = tmp_path / "saved"
    model.save_pretrained(str(folder))
    weights = load_file(folder / "adapter_model.safetensors")
    dropped = dict(list(weights.items())[1:])
    save_file(dropped, folder / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="not the file that was saved"):  # the recorded checksum sees it first
        BiEncoder.from_pretrained(str(folder))
    with pytest.raises(ValueError, match="adapter weights do not match"):  # and, unchecked, the key comparison
        BiEncoder.from_pretrained(str(folder), verify_checksums=False)
    os.remove(folder / "adapter_model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"adapter_model\.safetensors is missing\. Fix: copy the whole folder"):
        BiEncoder.from_pretrained(str(folder))


def test_pooling_and_prompts(tiny_path):
    path = tiny_path("qwen3_vl")
    last = BiEncoder.from_pretrained(path)
    mean = BiEncoder.from_pretrained(path, pooling="mean")
    assert last.pooling == "last" and mean.pooling == "mean"
    # Each switch moves the embeddings by a large share of their scale, not by round-off (REL = 1e-5): measured on
    # the tiny Qwen3-VL (built with seed 0), last vs mean pooling 0.92, query prompt vs none 0.38; the bar is 0.1.
    assert rel_diff(last.encode(PROBE), mean.encode(PROBE)) > 0.1
    prompted = BiEncoder.from_pretrained(path, query_prompt="Find the image that matches.")
    q = prompted.encode(["a red square"], side="query")
    d = prompted.encode(["a red square"], side="document")
    assert rel_diff(q, d) > 0.1
    assert_rel_close(d, last.encode(["a red square"], side="document"))
    with pytest.raises(ValueError, match="pooling='cls' is not valid"):
        BiEncoder.from_pretrained(path, pooling="cls")


def test_last_token_pooling_ignores_padding_side(tiny_path):
    model = BiEncoder.from_pretrained(tiny_path("qwen2_vl"))
    texts = ["short", "a much longer text than the first"]
    right = model.encode(texts)
    model.processor.tokenizer.padding_side = "left"
    assert_rel_close(right, model.encode(texts))


def test_embeddings_are_normalised_and_text_image_inputs_average(tiny_path):
    model = BiEncoder.from_pretrained(tiny_path("clip"))
    text, image, both = model.encode(["green", solid("green"), {"text": "green", "image": solid("green")}])
    assert_rel_close(torch.stack([text, image]).norm(dim=-1), torch.ones(2))
    assert_rel_close(both, torch.nn.functional.normalize((text + image) / 2, dim=-1))


def test_vlm_max_pixels_budget_shrinks_images_before_the_processor(tiny_path):
    model = BiEncoder.from_pretrained(tiny_path("qwen2_vl"), max_pixels=28 * 28 * 4)
    big = Image.new("RGB", (560, 560), (10, 200, 10))
    features = model.featurizer([__import__("hf_mm_rerank").to_input(big, max_pixels=model.featurizer.max_pixels)])
    assert features["image_grid_thw"].prod().item() <= 4 * 4  # at most 4 merged tokens = 16 patches


def test_loading_a_cross_kind_folder_fails(tiny_path, tmp_path):
    from hf_mm_rerank.modeling.spec import ModelSpec

    folder = tmp_path / "x"
    BiEncoder.from_pretrained(tiny_path("clip")).save_pretrained(str(folder))
    spec = json.loads((folder / "hf_mm_rerank_config.json").read_text())
    spec["kind"] = "cross_encoder"
    (folder / "hf_mm_rerank_config.json").write_text(json.dumps(spec))
    assert ModelSpec.find(str(folder)).kind == "cross_encoder"
    with pytest.raises(ValueError, match="holds a cross_encoder"):
        BiEncoder.from_pretrained(str(folder))


def test_modules_to_save_heads_train_and_reload(tiny_path, tmp_path, color_dataset):
    config = LoraConfig(r=4, modules_to_save=["visual_projection", "text_projection"])
    model = BiEncoder.from_pretrained(tiny_path("vtde"), lora_config=config)
    head = model.base_model.visual_projection.weight.detach().clone()
    BiEncoderTrainer(model=model, args=args(tmp_path, max_steps=3), train_dataset=color_dataset).train()
    assert not torch.equal(head, model.base_model.visual_projection.weight.detach())
    model.save_pretrained(str(tmp_path / "heads"))
    again = BiEncoder.from_pretrained(str(tmp_path / "heads"))
    assert_rel_close(model.encode(PROBE), again.encode(PROBE))


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_qwen_patch_embeddings_run_as_a_matrix_product_with_the_convolutions_values(tiny_path, family):
    """Qwen-VL's patch-embedding Conv3d (kernel = stride, one patch per row) runs as the matrix product it is: the same
    weights and state dict, the convolution's outputs and gradients to float rounding, and the convolution itself
    for any other input shape."""
    from hf_mm_rerank.modeling.backbone import PatchConv3d

    model = BiEncoder.from_pretrained(tiny_path(family))
    [(name, conv)] = [(n, m) for n, m in model.backbone.named_modules() if isinstance(m, torch.nn.Conv3d)]
    assert type(conv) is PatchConv3d and f"{name}.weight" in model.backbone.state_dict()
    patches = torch.randn(50, conv.in_channels, *conv.kernel_size, requires_grad=True)
    plain = torch.nn.Conv3d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.kernel_size,
                            bias=conv.bias is not None)
    plain.load_state_dict(conv.state_dict())
    got, want = conv(patches), plain(patches)
    assert got.shape == want.shape == (50, conv.out_channels, 1, 1, 1)
    assert_rel_close(got, want, 1e-5)
    (grad_got,) = torch.autograd.grad(got.square().sum(), conv.weight)
    (grad_want,) = torch.autograd.grad(want.square().sum(), plain.weight)
    assert_rel_close(grad_got, grad_want, 1e-5)
    bigger = torch.randn(2, conv.in_channels, conv.kernel_size[0], 2 * conv.kernel_size[1], 2 * conv.kernel_size[2])
    assert_rel_close(conv(bigger), plain(bigger), 1e-5)
