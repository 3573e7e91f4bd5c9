import subprocess
import sys

import pytest
import torch
from helpers import args, assert_rel_close, fixed_batch_loss, losses
from peft import LoraConfig
from transformers import BitsAndBytesConfig

from hf_mm_rerank import BiEncoder, BiEncoderTrainer


def _4bit():
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


def _linear_types(model):
    import bitsandbytes as bnb

    quantized = {n for n, m in model.base_model.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}
    return quantized


@pytest.mark.parametrize("family", ["qwen2_vl", "clip"])
def test_qlora_4bit_trains_on_cpu_with_loss_falling(tiny_path, tmp_path, color_dataset, family):
    model = BiEncoder.from_pretrained(tiny_path(family), lora_config=LoraConfig(r=8, lora_alpha=16),
                                      quantization_config=_4bit())
    quantized = _linear_types(model)
    assert quantized, "the language model's linears must be 4-bit"
    # Vision tower and projection heads stay out of 4-bit (selected by module type).
    assert not [n for n in quantized if "visual" in n or "vision" in n or "projection" in n]
    assert all(".layers." in n for n in quantized)
    trainer = BiEncoderTrainer(model=model, args=args(tmp_path, max_steps=8, gradient_checkpointing=True),
                               train_dataset=color_dataset)
    initial_loss = fixed_batch_loss(trainer)
    trainer.train()
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.base_model.modules())
    assert fixed_batch_loss(trainer) < 0.9 * initial_loss, (initial_loss, fixed_batch_loss(trainer))


def test_qlora_adapter_reloads_on_a_quantized_base(tiny_path, tmp_path):
    model = BiEncoder.from_pretrained(tiny_path("qwen2_vl"), lora_config=LoraConfig(r=4, init_lora_weights=False),
                                      quantization_config=_4bit())
    model.save_pretrained(str(tmp_path / "q"))
    again = BiEncoder.from_pretrained(str(tmp_path / "q"), quantization_config=_4bit())
    probe = ["a red square", "blue"]
    assert_rel_close(model.encode(probe), again.encode(probe))
    with pytest.raises(ValueError, match="cannot merge into a 4/8-bit backbone"):
        again.merge_and_unload()


def test_8bit_lora_loads_with_the_same_skip_rules(tiny_path):
    config = BitsAndBytesConfig(load_in_8bit=True)
    model = BiEncoder.from_pretrained(tiny_path("qwen2_vl"), lora_config=LoraConfig(r=4), quantization_config=config)
    quantized = _linear_types(model)
    assert quantized and not [n for n in quantized if "visual" in n]
    assert model.encode(["hello"]).shape == (1, 64)


def test_quantization_without_lora_is_refused(tiny_path):
    with pytest.raises(ValueError, match="cannot be fully fine-tuned"):
        BiEncoder.from_pretrained(tiny_path("qwen2_vl"), quantization_config=_4bit())


def test_package_works_without_bitsandbytes(tiny_path):
    code = f"""
import sys
sys.modules['bitsandbytes'] = None  # as if it were not installed
import hf_mm_rerank
from hf_mm_rerank import BiEncoder, BiEncoderTrainer
from peft import LoraConfig
from transformers import BitsAndBytesConfig
m = BiEncoder.from_pretrained({tiny_path('clip')!r}, lora_config=LoraConfig(r=4))
assert m.encode(['x']).shape[0] == 1
try:
    BiEncoder.from_pretrained({tiny_path('clip')!r}, lora_config=LoraConfig(r=4),
                              quantization_config=BitsAndBytesConfig(load_in_4bit=True))
except ImportError as e:
    assert "pip install 'hf_mm_rerank[qlora]'" in str(e), e
    print("OK")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-2000:]


@pytest.mark.parametrize("family, head", [("qwen2_vl", "yes_no"), ("qwen3_vl", "mlp")])
def test_qlora_reranker_trains_on_cpu_and_reloads(tiny_path, tmp_path, family, head):
    from datasets import Dataset
    from images import solid
    from test_cross_encoder import PLAIN_PROMPT, red_rows

    from hf_mm_rerank import CrossEncoder, CrossEncoderTrainer

    rr = CrossEncoder.from_pretrained(tiny_path(family), head=head, lora_config=LoraConfig(r=8, lora_alpha=16),
                                      quantization_config=_4bit(), **PLAIN_PROMPT)
    quantized = _linear_types(rr)
    assert quantized and all(".layers." in n for n in quantized)
    assert not [n for n in quantized if "visual" in n or "lm_head" in n], "vision tower and LM head stay unquantized"
    trainer = CrossEncoderTrainer(model=rr, args=args(tmp_path, max_steps=8, learning_rate=3e-3,
                                                      gradient_checkpointing=True),
                                  train_dataset=Dataset.from_list(red_rows()))
    trainer.train()
    history = losses(trainer)
    assert sum(history[-2:]) / 2 < history[0] - 0.2, history
    probe = [("a red square", solid(c)) for c in ("red", "blue", "green")]
    rr.save_pretrained(str(tmp_path / "q"))
    again = CrossEncoder.from_pretrained(str(tmp_path / "q"), quantization_config=_4bit(), is_trainable=False)
    assert_rel_close(again.score(probe), rr.score(probe))


def test_a_qlora_adapter_reloads_on_its_recorded_quantization(tiny_path, tmp_path, caplog):
    import logging

    from hf_mm_rerank.modeling.backbone import is_quantized

    model = BiEncoder.from_pretrained(tiny_path("qwen2_vl"), quantization_config=_4bit(),
                                      lora_config=LoraConfig(r=8, init_lora_weights=False))
    probe = ["a red square", "a blue circle"]
    expected = model.encode(probe)
    model.save_pretrained(str(tmp_path / "qlora"))
    with caplog.at_level(logging.INFO):
        again = BiEncoder.from_pretrained(str(tmp_path / "qlora"))  # no quantization_config: the recorded one
    assert is_quantized(again.base_model) and "quantization_config=False" in caplog.text
    assert_rel_close(again.encode(probe), expected)
    full = BiEncoder.from_pretrained(str(tmp_path / "qlora"), quantization_config=False)
    assert not is_quantized(full.base_model)
    assert (full.encode(probe) - expected).abs().max() > 1e-3  # 4-bit and full-precision bases differ
