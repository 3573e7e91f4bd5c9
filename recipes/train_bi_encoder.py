"""Fine-tune a multimodal bi-encoder (embedding model) with LoRA, QLoRA or fully.

    accelerate launch recipes/train_bi_encoder.py --config recipes/configs/demo.yaml [--flag value ...]

Every TrainingArguments flag works (bf16, gradient_accumulation_steps, eval_strategy, push_to_hub, ...).
"""

from __future__ import annotations

import hf_mm_rerank  # noqa: F401  (first: it quiets an optional-kernel notice that importing transformers prints)

# isort: split
import logging
from dataclasses import dataclass, field

from transformers import TrainingArguments, set_seed

from hf_mm_rerank import (
    BiEncoder,
    BiEncoderTrainer,
    CachedContrastiveLoss,
    ContrastiveLoss,
    MatryoshkaLoss,
    MaxSimContrastiveLoss,
    MaxSimPairwiseLoss,
    Mixing,
    MultiVectorEncoder,
    RetrievalEvaluator,
    ThroughputCallback,
    Tokens,
)
from hf_mm_rerank.data.pipeline import cache_images
from hf_mm_rerank.recipes_kit.cli import (
    LoraArguments,
    PublishArguments,
    build_lora,
    build_quantization,
    hub_model,
    main_process_first,
    parse_with_config,
    print_report,
    resume_point,
    run,
)
from hf_mm_rerank.recipes_kit.data import DataArguments, each_dataset, load_training_data, validated
from hf_mm_rerank.recipes_kit.demo import DEMO_MODEL, build_demo_base

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments(LoraArguments):
    model_name_or_path: str = field(default=DEMO_MODEL, metadata={
        "help": "Checkpoint (CLIP, SigLIP, VisionTextDualEncoder, a chat VLM) or builtin:minilm-vit (demo)."})
    pooling: str = field(default="auto", metadata={"help": "auto, last or mean (chat VLMs)."})
    query_prompt: str | None = field(default=None, metadata={"help": "Instruction for queries."})
    document_prompt: str | None = field(default=None, metadata={"help": "Instruction for documents."})
    temperature: float = field(default=0.05, metadata={"help": "Contrastive temperature."})
    learnable_temperature: bool = field(default=False, metadata={"help": "Train the temperature."})
    symmetric: bool = field(default=False, metadata={"help": "Add the document->query loss term."})
    mini_batch_size: int = field(default=0, metadata={"help": "GradCache mini-batch size; 0 = no caching."})
    mini_batch_tokens: int = field(default=0, metadata={
        "help": "GradCache mini-batches of at most this many tokens, padding and chat template included (inputs x the "
                "longest), instead of --mini_batch_size inputs."})
    matryoshka_dims: list[int] | None = field(default=None, metadata={"help": "Matryoshka embedding sizes."})
    eval_batch_size: int = field(default=64, metadata={"help": "Batch size of the retrieval evaluator."})
    gallery: int = field(default=4, metadata={"help": "Held-out queries drawn with their top 5 before and after "
                                                      "training into retrieval_gallery.png (shown in the card); 0: none."})
    multi_vector: bool = field(default=False, metadata={
        "help": "Late interaction (ColPali/ColQwen-style): one vector per token, scored by MaxSim."})
    projection_dim: int = field(default=128, metadata={"help": "Multi-vector: the token vectors' dimension."})
    scored_tokens: str | None = field(default=None, metadata={
        "help": "Multi-vector: content (the input's own tokens) or all (every attended token, as colpali-engine).",
        "choices": ["content", "all"]})
    query_augmentation: int | None = field(default=None, metadata={
        "help": "Multi-vector: augmentation tokens appended to each query (colpali-engine: 10)."})
    template: str | None = field(default=None, metadata={
        "help": "Multi-vector chat VLMs: chat (the chat template) or colpali (colpali-engine's ColQwen2 layout).",
        "choices": ["chat", "colpali"]})
    late_loss: str = field(default="contrastive", metadata={
        "help": "Multi-vector loss: contrastive (MaxSim InfoNCE) or pairwise (softplus, colpali-engine's).",
        "choices": ["contrastive", "pairwise"]})
    normalize_by_query_length: bool = field(default=True, metadata={
        "help": "Multi-vector: MaxSim over the number of scored query tokens (colpali-engine's default)."})


def build_model(m: ModelArguments, args: TrainingArguments) -> BiEncoder:
    path = m.model_name_or_path
    if path == DEMO_MODEL:
        with main_process_first(args, "building the demo base model"):
            path = build_demo_base(f"{args.output_dir}/_base_model")  # "_*" is never pushed
    kwargs = {"attn_implementation": m.attn_implementation} if m.attn_implementation else {}
    if m.multi_vector:
        kwargs.update(dim=m.projection_dim, scored_tokens=m.scored_tokens, query_augmentation=m.query_augmentation,
                      template=m.template)
    else:
        kwargs["pooling"] = m.pooling
    with hub_model(path):
        return (MultiVectorEncoder if m.multi_vector else BiEncoder).from_pretrained(
            path, lora_config=build_lora(m), quantization_config=build_quantization(m, args),
            query_prompt=m.query_prompt, document_prompt=m.document_prompt, max_pixels=m.max_pixels,
            max_length=m.max_length, fast_decode=m.fast_decode, dtype=m.dtype,
            gradient_checkpointing=args.gradient_checkpointing, **kwargs)


def build_loss(m: ModelArguments):
    common = dict(temperature=m.temperature, learnable_temperature=m.learnable_temperature, symmetric=m.symmetric)
    mini = Tokens(m.mini_batch_tokens) if m.mini_batch_tokens else m.mini_batch_size or None
    if m.multi_vector:
        late = MaxSimPairwiseLoss if m.late_loss == "pairwise" else MaxSimContrastiveLoss
        return late(mini_batch_size=mini, normalize_by_query_length=m.normalize_by_query_length, **common)
    loss = CachedContrastiveLoss(mini, **common) if mini else ContrastiveLoss(**common)
    return MatryoshkaLoss(loss, m.matryoshka_dims) if m.matryoshka_dims else loss


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    # 1. Arguments: dataclasses + plain TrainingArguments, --config YAML defaults overridden by flags.
    model_args, data_args, publish, args = parse_with_config(
        (ModelArguments, DataArguments, PublishArguments, TrainingArguments), argv)
    logging.basicConfig(level=logging.INFO if args.should_log else logging.WARNING)
    set_seed(args.seed)  # before the model: LoRA and new heads are initialised from the global RNG

    # 2. Data: (query, positive[, negatives]) rows; a held-out split feeds the retrieval evaluator.
    with main_process_first(args, "loading the data"):
        train, held_out, mixing = load_training_data(data_args, seed=args.seed)  # mixing: a mixture's (the YAML's)
    evaluator = RetrievalEvaluator.from_dataset(held_out, batch_size=model_args.eval_batch_size,
                                                gallery=model_args.gallery) if held_out else None

    # 3. Model, loss, trainer.
    model = build_model(model_args, args)
    if data_args.cache_images:
        with main_process_first(args, "cache_images"):
            train = each_dataset(train, lambda d: cache_images(d, model))
    train = each_dataset(train, lambda d: validated(d, model, data_args, args))
    trainer = BiEncoderTrainer(model=model, args=args, train_dataset=train, loss=build_loss(model_args),
                               evaluator=evaluator,
                               callbacks=[ThroughputCallback(), *publish.callbacks(args)], model_card={**publish.card(), "dropped_rows": data_args.dropped_rows},
                               mixing=Mixing(**mixing) if mixing else None, **data_args.row_rules())

    # 4. Train, measuring retrieval before and after.
    before = trainer.evaluate() if evaluator else {}
    trainer.train(resume_from_checkpoint=resume_point(args))
    after = trainer.evaluate() if evaluator else {}

    # 5. Save the adapter (or full model), head, processor, config and card to output_dir (and push it
    #    when --push_to_hub); report; --export writes the serving form beside it.
    trainer.save_model()
    report = {"before": before, "after": after}
    if trainer.is_world_process_zero():
        print_report(before, after, args.output_dir, f"hf_mm_rerank.{type(trainer.model).__name__}")
    publish.export_model(args)  # --export: the model for serving engines, checked by reloading it
    return report


if __name__ == "__main__":
    run(main)
