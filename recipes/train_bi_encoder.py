"""Fine-tune a multimodal bi-encoder (embedding model) with LoRA, QLoRA or fully.

    accelerate launch recipes/train_bi_encoder.py --config recipes/configs/demo.yaml [--flag value ...]

Every TrainingArguments flag works (bf16, gradient_accumulation_steps, eval_strategy, push_to_hub, ...).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

from transformers import BitsAndBytesConfig, TrainingArguments

from hf_mm_rerank import (
    BiEncoder,
    BiEncoderTrainer,
    CachedContrastiveLoss,
    ContrastiveLoss,
    MatryoshkaLoss,
    RetrievalEvaluator,
)
from hf_mm_rerank.cli import DataArguments, load_data, parse_with_config
from hf_mm_rerank.demo import DEMO_MODEL, build_demo_base

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default=DEMO_MODEL, metadata={
        "help": "Checkpoint (CLIP, SigLIP, VisionTextDualEncoder, a chat VLM) or builtin:minilm-vit (demo)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank; 0 = full fine-tuning."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] | None = field(default=None, metadata={
        "help": "Modules to adapt (default: the language model's linear layers)."})
    modules_to_save: list[str] | None = field(default=None, metadata={
        "help": "Modules trained fully and saved with the adapter (e.g. projection heads)."})
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA: NF4 4-bit base weights."})
    load_in_8bit: bool = field(default=False, metadata={"help": "8-bit base weights."})
    dtype: str = field(default="auto", metadata={"help": "Weights dtype: auto, bfloat16, float16, float32."})
    attn_implementation: str | None = field(default=None, metadata={"help": "sdpa, flash_attention_2, eager."})
    pooling: str = field(default="auto", metadata={"help": "auto, last or mean (chat VLMs)."})
    query_prompt: str | None = field(default=None, metadata={"help": "Instruction for queries."})
    document_prompt: str | None = field(default=None, metadata={"help": "Instruction for documents."})
    max_pixels: int | None = field(default=None, metadata={"help": "Pixel budget per image."})
    max_length: int | None = field(default=None, metadata={"help": "Token limit for the text part."})
    temperature: float = field(default=0.05, metadata={"help": "Contrastive temperature."})
    learnable_temperature: bool = field(default=False, metadata={"help": "Train the temperature."})
    symmetric: bool = field(default=False, metadata={"help": "Add the document->query loss term."})
    mini_batch_size: int = field(default=0, metadata={"help": "GradCache mini-batch size; 0 = no caching."})
    matryoshka_dims: list[int] | None = field(default=None, metadata={"help": "Matryoshka embedding sizes."})
    eval_batch_size: int = field(default=64, metadata={"help": "Batch size of the retrieval evaluator."})


def build_model(m: ModelArguments, args: TrainingArguments) -> BiEncoder:
    from peft import LoraConfig

    path = m.model_name_or_path
    if path == DEMO_MODEL:
        path = build_demo_base(f"{args.output_dir}/base_model")
    quant = None
    if m.load_in_4bit or m.load_in_8bit:
        quant = BitsAndBytesConfig(load_in_4bit=m.load_in_4bit, load_in_8bit=m.load_in_8bit,
                                   bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype="bfloat16" if args.bf16 else "float32")
    lora = LoraConfig(r=m.lora_r, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout,
                      target_modules=m.lora_target_modules, modules_to_save=m.modules_to_save) if m.lora_r else None
    kwargs = {"attn_implementation": m.attn_implementation} if m.attn_implementation else {}
    return BiEncoder.from_pretrained(
        path, lora_config=lora, quantization_config=quant, pooling=m.pooling, query_prompt=m.query_prompt,
        document_prompt=m.document_prompt, max_pixels=m.max_pixels, max_length=m.max_length, dtype=m.dtype,
        gradient_checkpointing=args.gradient_checkpointing, **kwargs)


def build_loss(m: ModelArguments):
    common = dict(temperature=m.temperature, learnable_temperature=m.learnable_temperature, symmetric=m.symmetric)
    loss = CachedContrastiveLoss(m.mini_batch_size, **common) if m.mini_batch_size else ContrastiveLoss(**common)
    return MatryoshkaLoss(loss, m.matryoshka_dims) if m.matryoshka_dims else loss


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    # 1. Arguments: dataclasses + plain TrainingArguments, --config YAML defaults overridden by flags.
    model_args, data_args, args = parse_with_config((ModelArguments, DataArguments, TrainingArguments), argv)
    logging.basicConfig(level=logging.INFO if args.should_log else logging.WARNING)

    # 2. Data: (query, positive[, negatives]) rows; a held-out split feeds the retrieval evaluator.
    train, held_out = load_data(data_args, seed=args.seed)
    evaluator = RetrievalEvaluator.from_dataset(held_out, batch_size=model_args.eval_batch_size) if held_out else None

    # 3. Model, loss, trainer.
    model = build_model(model_args, args)
    trainer = BiEncoderTrainer(model=model, args=args, train_dataset=train, loss=build_loss(model_args),
                               evaluator=evaluator)

    # 4. Train, measuring retrieval before and after.
    before = trainer.evaluate() if evaluator else {}
    trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    after = trainer.evaluate() if evaluator else {}

    # 5. Save the adapter (or full model), head, processor and config; report.
    trainer.save_model(f"{args.output_dir}/final")
    report = {"before": before, "after": after}
    if trainer.is_world_process_zero():
        print(json.dumps(_table(before, after), indent=2))
    return report


def _table(before: dict[str, float], after: dict[str, float]) -> dict[str, list[float]]:
    keys = [k for k in after if k.startswith("eval_") and "@" in k]
    return {k: [round(before.get(k, float("nan")), 4), round(after[k], 4)] for k in keys}


if __name__ == "__main__":
    main()
