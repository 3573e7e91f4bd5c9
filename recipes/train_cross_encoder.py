"""Fine-tune a multimodal reranker (cross-encoder) with LoRA, QLoRA or fully.

    accelerate launch recipes/train_cross_encoder.py --config recipes/configs/qwen3_vl_reranker_2b_lora.yaml

Rows: pointwise (query, document, label) or grouped (query, positive, negative_1..k). Pairs (query, positive)
without negatives get k negatives: mined with --mining_model (a BiEncoder folder or repo), else drawn at
random from the other rows' positives. Every TrainingArguments flag works (bf16, eval_strategy, push_to_hub...).
"""

from __future__ import annotations

import hf_mm_rerank  # noqa: F401  (first: it quiets an optional-kernel notice that importing transformers prints)

# isort: split
import logging
from dataclasses import dataclass, field

from transformers import TrainingArguments, set_seed

from hf_mm_rerank import CrossEncoder, CrossEncoderTrainer, Mixing, RerankingEvaluator, ThroughputCallback
from hf_mm_rerank.data.pipeline import cache_images
from hf_mm_rerank.losses import RERANKING_LOSSES
from hf_mm_rerank.publishing.model_card import hub_id
from hf_mm_rerank.recipes_kit.cli import (
    LoraArguments,
    PublishArguments,
    add_negatives,
    build_lora,
    build_quantization,
    hub_model,
    main_process_first,
    mini_batch_flag,
    parse_with_config,
    print_report,
    resume_point,
    run,
)
from hf_mm_rerank.recipes_kit.data import DataArguments, each_dataset, load_training_data, validated
from hf_mm_rerank.recipes_kit.demo import DEMO_RERANKER, build_demo_reranker_base

logger = logging.getLogger(__name__)


@dataclass
class RerankerArguments(LoraArguments):
    model_name_or_path: str = field(default="Qwen/Qwen2-VL-2B-Instruct", metadata={
        "help": "A chat VLM (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3-VL-Reranker), a text cross-encoder, a "
                "folder written by CrossEncoder.save_pretrained, or builtin:qwen2-vl-tiny (offline demo)."})
    head: str = field(default="auto", metadata={"help": "auto, yes_no, linear, mlp or classification."})
    instruction: str | None = field(default=None, metadata={"help": "Task instruction in the pair prompt."})
    system_prompt: str | None = field(default=None, metadata={"help": "System turn of the pair prompt."})
    assistant_prefix: str | None = field(default=None, metadata={
        "help": "Text after the generation prompt (Qwen3: '<think>\\n\\n</think>\\n\\n')."})
    yes_token: str | None = field(default=None, metadata={"help": "Token of the yes_no head (default 'yes')."})
    no_token: str | None = field(default=None, metadata={"help": "Token of the yes_no head (default 'no')."})
    loss: str = field(default="auto", metadata={
        "help": "auto (bce for pointwise rows, listwise for grouped), bce, listwise, lambda, margin_mse, kl."})
    pos_weight: str | None = field(default=None, metadata={"help": "BCE positive weight: a number or 'auto'."})
    mini_batch_size: int = field(default=0, metadata={"help": "Pairs per forward pass (GradCache); 0 = all."})
    mini_batch_tokens: int = field(default=0, metadata={
        "help": "GradCache mini-batches of at most this many tokens, padding, chat template and instruction included "
                "(pairs x the longest pair), instead of --mini_batch_size pairs."})
    num_negatives: int = field(default=3, metadata={"help": "Negatives per query when the rows have none."})
    mining_model: str | None = field(default=None, metadata={
        "help": "BiEncoder used to mine hard negatives (default: random negatives)."})
    eval_batch_size: int = field(default=16, metadata={"help": "Pairs per forward pass in evaluation."})

    def __post_init__(self) -> None:  # at parsing: before minutes of data and model loading
        if self.loss != "auto" and self.loss not in RERANKING_LOSSES:
            raise ValueError(f"--loss {self.loss}: choose auto or one of {sorted(RERANKING_LOSSES)}.")
        mini_batch_flag(self.mini_batch_size, self.mini_batch_tokens, self.loss)


def build_model(m: RerankerArguments, args: TrainingArguments) -> CrossEncoder:
    kwargs = {"attn_implementation": m.attn_implementation} if m.attn_implementation else {}
    path = m.model_name_or_path
    if path == DEMO_RERANKER:
        with main_process_first(args, "building the reranker demo's base model"):
            path = build_demo_reranker_base(f"{args.output_dir}/_base_model")  # "_*" is never pushed
    with hub_model(path):
        return CrossEncoder.from_pretrained(
            path, head=m.head, lora_config=build_lora(m),
            quantization_config=build_quantization(m, args), instruction=m.instruction, system_prompt=m.system_prompt,
            assistant_prefix=m.assistant_prefix, yes_token=m.yes_token, no_token=m.no_token, max_pixels=m.max_pixels,
            max_length=m.max_length, fast_decode=m.fast_decode, dtype=m.dtype,
            gradient_checkpointing=args.gradient_checkpointing, **kwargs)


def build_loss(m: RerankerArguments):
    if m.loss == "auto":
        return None  # the trainer picks bce (pointwise rows) or listwise (grouped rows)
    kwargs = {"mini_batch_size": mini_batch_flag(m.mini_batch_size, m.mini_batch_tokens)}
    if m.loss == "bce" and m.pos_weight:
        kwargs["pos_weight"] = m.pos_weight if m.pos_weight == "auto" else float(m.pos_weight)
    return RERANKING_LOSSES[m.loss](**kwargs)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    # 1. Arguments: dataclasses + plain TrainingArguments, --config YAML defaults overridden by flags.
    model_args, data_args, publish, args = parse_with_config(
        (RerankerArguments, DataArguments, PublishArguments, TrainingArguments), argv)
    logging.basicConfig(level=logging.INFO if args.should_log else logging.WARNING)
    set_seed(args.seed)  # before the model: LoRA and new heads are initialised from the global RNG

    # 2. Data: grouped or pointwise rows; (query, positive) pairs get mined or random negatives.
    with main_process_first(args, "loading the data"):
        train, held_out, mixing = load_training_data(data_args, seed=args.seed)  # mixing: a mixture's (the YAML's)
    columns = each_dataset(train, lambda d: set(d.column_names or []))
    train = each_dataset(train, lambda d: add_negatives(d, model_args.num_negatives, model_args.mining_model,
                                                        seed=args.seed, args=args))
    card = publish.card()
    if each_dataset(train, lambda d: set(d.column_names or [])) != columns:  # the card says how negatives were made
        miner = hub_id(model_args.mining_model)
        card["negatives"] = (f"mined with {miner}" if miner else "mined with a bi-encoder") \
            if model_args.mining_model else "random"
    held_out = add_negatives(held_out, model_args.num_negatives, model_args.mining_model, seed=args.seed, args=args)
    evaluator = RerankingEvaluator.from_dataset(held_out, batch_size=model_args.eval_batch_size) if held_out else None

    # 3. Model, loss, trainer.
    model = build_model(model_args, args)
    if data_args.cache_images:
        with main_process_first(args, "cache_images"):
            train = each_dataset(train, lambda d: cache_images(d, model))
    train = each_dataset(train, lambda d: validated(d, model, data_args, args))
    loss = build_loss(model_args)  # (--mini_batch_size / --mini_batch_tokens with --loss auto: refused at parsing)
    trainer = CrossEncoderTrainer(model=model, args=args, train_dataset=train, loss=loss, evaluator=evaluator,
                                  callbacks=[ThroughputCallback(), *publish.callbacks(args)], model_card={**card, "dropped_rows": data_args.dropped_rows},
                                  mixing=Mixing(**mixing) if mixing else None, **data_args.row_rules())

    # 4. Train, measuring reranking before and after.
    before = trainer.evaluate() if evaluator else {}
    trainer.train(resume_from_checkpoint=resume_point(args))
    after = trainer.evaluate() if evaluator else {}

    # 5. Save the adapter (or full model), head, processor, config and card to output_dir (and push it
    #    when --push_to_hub); report; --export writes the serving form beside it.
    trainer.save_model()
    if trainer.is_world_process_zero():
        print_report(before, after, args.output_dir, "hf_mm_rerank.CrossEncoder")
    publish.export_model(args)  # --export: the model for serving engines, checked by reloading it
    return {"before": before, "after": after}


if __name__ == "__main__":
    run(main)
