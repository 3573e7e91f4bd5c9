"""Distil a reranker into a bi-encoder: mine each query's candidates with the embedder, score them with the
reranker, train the embedder on those teacher scores, and report the two-stage (retrieve, then rerank) metrics
before and after.

    accelerate launch recipes/distill_reranker_to_bi_encoder.py --config recipes/configs/qwen3_vl_distill_2b.yaml \
        --data_files train.json

Rows: (query, positive) pairs, as for train_bi_encoder.py. Every TrainingArguments flag works.
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
    CrossEncoder,
    RetrievalEvaluator,
    RetrieveRerankEvaluator,
    ThroughputCallback,
    mine_hard_negatives,
    score_with_teacher,
)
from hf_mm_rerank.losses import EmbeddingDistillKLLoss, EmbeddingMarginMSELoss
from hf_mm_rerank.publishing.model_card import hub_id
from hf_mm_rerank.recipes_kit.cli import (
    LoraArguments,
    PublishArguments,
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
from hf_mm_rerank.recipes_kit.data import DataArguments, load_data

logger = logging.getLogger(__name__)
LOSSES = {"margin_mse": EmbeddingMarginMSELoss, "kl": EmbeddingDistillKLLoss}


@dataclass
class DistillArguments(LoraArguments):
    model_name_or_path: str = field(default="Qwen/Qwen3-VL-Embedding-2B", metadata={
        "help": "The student: a bi-encoder checkpoint (or a BiEncoder folder) to train."})
    teacher: str = field(default="Qwen/Qwen3-VL-Reranker-2B", metadata={
        "help": "The teacher: a reranker (CrossEncoder folder, Qwen3-VL-Reranker, a yes/no VLM, a text cross-encoder)."})
    teacher_head: str = field(default="auto", metadata={"help": "The teacher's head: auto, yes_no, linear, ..."})
    num_negatives: int = field(default=7, metadata={"help": "Candidates per query besides the positive (mined)."})
    loss: str = field(default="margin_mse", metadata={"help": "margin_mse or kl.", "choices": sorted(LOSSES)})
    contrastive_weight: float = field(default=0.0, metadata={"help": "Weight of an added in-batch InfoNCE term."})
    temperature: float = field(default=0.05, metadata={"help": "The student's similarity temperature."})
    mini_batch_size: int = field(default=0, metadata={"help": "GradCache mini-batch size; 0 = no caching."})
    mini_batch_tokens: int = field(default=0, metadata={
        "help": "GradCache mini-batches of at most this many tokens, padding and chat template included (inputs x the "
                "longest), instead of --mini_batch_size inputs."})
    top_k: int = field(default=20, metadata={"help": "Candidates the retriever hands the reranker in evaluation."})
    query_prompt: str | None = field(default=None, metadata={"help": "The student's instruction for queries."})
    eval_batch_size: int = field(default=32, metadata={"help": "Inputs (retriever) / pairs (reranker) per pass."})

    def __post_init__(self) -> None:  # at parsing: before the data, the student and the teacher are loaded
        mini_batch_flag(self.mini_batch_size, self.mini_batch_tokens)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    # 1. Arguments: dataclasses + plain TrainingArguments, --config YAML defaults overridden by flags.
    m, data_args, publish, args = parse_with_config((DistillArguments, DataArguments, PublishArguments,
                                                     TrainingArguments), argv)
    logging.basicConfig(level=logging.INFO if args.should_log else logging.WARNING)
    set_seed(args.seed)  # before the model: LoRA weights are initialised from the global RNG

    # 2. Data, student and teacher.
    with main_process_first(args, "loading the data"):
        train, held_out = load_data(data_args, seed=args.seed)
    with hub_model(m.model_name_or_path):
        student = BiEncoder.from_pretrained(
            m.model_name_or_path, lora_config=build_lora(m), quantization_config=build_quantization(m, args),
            query_prompt=m.query_prompt, max_pixels=m.max_pixels, max_length=m.max_length, dtype=m.dtype,
            fast_decode=m.fast_decode, gradient_checkpointing=args.gradient_checkpointing)
    with hub_model(m.teacher, "--teacher"):
        teacher = CrossEncoder.from_pretrained(m.teacher, head=m.teacher_head, dtype=m.dtype, is_trainable=False,
                                               fast_decode=m.fast_decode)
    teacher.to(args.device).eval()
    student.to(args.device)

    # 3. Candidates mined by the student, scored by the teacher (every rank encodes and scores a share).
    grouped = mine_hard_negatives(student, train, num_negatives=m.num_negatives, batch_size=m.eval_batch_size)
    if len(grouped) == 0:
        raise ValueError(f"mining found {m.num_negatives} negatives for none of the {len(train)} training rows (each "
                         "needs that many other documents). Fix: lower --num_negatives, or add rows.")
    grouped = score_with_teacher(teacher, grouped, batch_size=m.eval_batch_size)
    evaluation = RetrievalEvaluator.from_dataset(held_out, batch_size=m.eval_batch_size) if held_out else None

    def two_stage() -> dict[str, float]:  # a fresh evaluator: the retriever's candidates change with training
        if evaluation is None:
            return {}
        r = evaluation
        metrics = RetrieveRerankEvaluator(
            student, dict(zip(r.query_ids, r.queries)), dict(zip(r.doc_ids, r.corpus)),
            dict(zip(r.query_ids, r.relevant)), top_k=m.top_k, batch_size=m.eval_batch_size,
            rerank_batch_size=m.eval_batch_size)(teacher)
        return {f"eval_{k}": v for k, v in metrics.items()}

    # 4. Train the student on the teacher's scores, measuring retrieval then reranking before and after.
    loss = LOSSES[m.loss](temperature=m.temperature, contrastive_weight=m.contrastive_weight,
                          mini_batch_size=mini_batch_flag(m.mini_batch_size, m.mini_batch_tokens))
    trainer = BiEncoderTrainer(model=student, args=args, train_dataset=grouped, loss=loss, evaluator=evaluation,
                               callbacks=[ThroughputCallback(), *publish.callbacks(args)],
                               model_card={**publish.card(), "negatives": "mined by the student, scored by "
                                           f"{hub_id(m.teacher) or 'the teacher reranker'}"},
                               **data_args.row_rules())
    before = two_stage()
    trainer.train(resume_from_checkpoint=resume_point(args))
    after = two_stage()

    # 5. Save the student and report.
    trainer.save_model()
    if trainer.is_world_process_zero():
        print_report(before, after, args.output_dir, "hf_mm_rerank.BiEncoder")
    publish.export_model(args)  # --export: the model for serving engines, checked by reloading it
    return {"before": before, "after": after}


if __name__ == "__main__":
    run(main)
