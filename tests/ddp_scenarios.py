"""Training scenarios run once with 2 processes (ddp_worker.py under torchrun, gloo) and once in one process
(test_ddp.py), with the same global batch: 2 ranks x B/2 rows against 1 process x B rows.

Each scenario returns what the test compares: the trainable weights after training, the temperature, the
number of gradient all-reduces DDP ran, evaluator metrics and mined negatives.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from datasets import Dataset
from images import COLORS, color_rows, solid
from peft import LoraConfig
from transformers import TrainerCallback, TrainingArguments, set_seed

from hf_mm_rerank import (
    BiEncoder,
    BiEncoderTrainer,
    CachedContrastiveLoss,
    ContrastiveLoss,
    CrossEncoder,
    CrossEncoderTrainer,
    MatryoshkaLoss,
    MaxSimContrastiveLoss,
    MaxSimPairwiseLoss,
    Mixing,
    MultiVectorEncoder,
    RerankingEvaluator,
    RetrievalEvaluator,
    RetrieveRerankEvaluator,
    mine_hard_negatives,
)
from hf_mm_rerank.losses import BinaryCrossEntropyLoss, DistillKLLoss, LambdaLoss, ListwiseSoftmaxLoss

GLOBAL_BATCH = 8
PLAIN_PROMPT = dict(system_prompt="", instruction="", query_prefix="", document_prefix="")


class CountAllReduces(TrainerCallback):
    """Counts DDP's gradient synchronisations: calls of its comm hook for the first bucket (one per
    synchronised backward, whatever the bucket count)."""

    def __init__(self, trainer_ref: list) -> None:
        self.trainer_ref = trainer_ref
        self.count = 0

    def on_train_begin(self, args, state, control, **kwargs):
        wrapped = self.trainer_ref[0].model_wrapped
        if isinstance(wrapped, torch.nn.parallel.DistributedDataParallel):
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

            def hook(process_group, bucket):
                self.count += bucket.index() == 0
                return allreduce_hook(process_group, bucket)

            wrapped.register_comm_hook(None, hook)


def training_args(out: str, **overrides: Any) -> TrainingArguments:
    size = int(os.environ.get("WORLD_SIZE", "1"))  # the process group starts with TrainingArguments
    settings = dict(output_dir=out, per_device_train_batch_size=GLOBAL_BATCH // size, max_steps=3,
                    learning_rate=0.05, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
                    logging_steps=1, train_sampling_strategy="sequential", dataloader_num_workers=0,
                    # SGD: Adam turns float noise on zero gradients (key biases, a softmax head's bias) into +-lr steps
                    optim="sgd", ddp_timeout=120)  # a collective mismatch fails in 2 minutes, not 30
    if size > 1:
        settings["ddp_backend"] = "gloo"
    settings.update(overrides)
    return TrainingArguments(**settings)


def trainable(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _clip(paths: dict[str, str], lora: bool = True) -> BiEncoder:
    config = LoraConfig(r=8, lora_alpha=16, modules_to_save=["visual_projection", "text_projection"]) if lora else None
    return BiEncoder.from_pretrained(paths["clip"], lora_config=config)


def _bi_encoder_run(paths, out, loss, rows, model=None, **overrides) -> dict[str, Any]:
    model = model if model is not None else _clip(paths)
    initial = trainable(model)
    ref: list = []
    counter = CountAllReduces(ref)
    data = rows if not isinstance(rows, list) else Dataset.from_list(rows)
    trainer = BiEncoderTrainer(model=model, args=training_args(out, **overrides), train_dataset=data,
                               loss=loss, callbacks=[counter])
    ref.append(trainer)
    trainer.train()
    return {"initial": initial, "weights": trainable(model), "all_reduces": counter.count,
            "steps": trainer.state.global_step, "temperature": getattr(loss, "temperature", None)}


def contrastive_lora(paths, out):
    """LoRA with modules_to_save heads, symmetric InfoNCE with cross-rank negatives, learnable temperature."""
    loss = ContrastiveLoss(symmetric=True, learnable_temperature=True, temperature=0.1)
    result = _bi_encoder_run(paths, out, loss, color_rows(repeat=3))
    result["log_scale"] = loss.log_scale.detach().clone()
    return result


def cached_full(paths, out):
    """Full fine-tune with GradCache: 2 rows per forward, i.e. several chunks per step; Matryoshka on top."""
    loss = MatryoshkaLoss(CachedContrastiveLoss(mini_batch_size=2), dims=[64, 16])
    return _bi_encoder_run(paths, out, loss, color_rows(repeat=3), model=_clip(paths, lora=False))


def accumulation(paths, out):
    """gradient_accumulation_steps=2: 3 optimizer steps of 2 micro-batches each."""
    return _bi_encoder_run(paths, out, ContrastiveLoss(), color_rows(repeat=6), gradient_accumulation_steps=2)


def uneven_last_batch(paths, out):
    """14 rows, GradCache chunks of 3, no even_batches padding: the last step has 4 + 2 rows on 2 ranks."""
    return _bi_encoder_run(paths, out, CachedContrastiveLoss(mini_batch_size=3), color_rows(repeat=2)[:14],
                           max_steps=2, accelerator_config={"even_batches": False})


def chat_vlm_embedder(paths, out):
    """Qwen2-VL embedder (last-token pooling) with LoRA: text queries and image documents in one forward."""
    model = BiEncoder.from_pretrained(paths["qwen2_vl"], lora_config=LoraConfig(r=8))
    return _bi_encoder_run(paths, out, ContrastiveLoss(), color_rows(repeat=3), model=model)


def qlora_gradient_checkpointing(paths, out):
    """Qwen2-VL embedder on a 4-bit base (QLoRA, bitsandbytes on CPU) with gradient checkpointing and GradCache."""
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = BiEncoder.from_pretrained(paths["qwen2_vl"], lora_config=LoraConfig(r=8), quantization_config=quantization,
                                      gradient_checkpointing=True)
    return _bi_encoder_run(paths, out, CachedContrastiveLoss(mini_batch_size=4), color_rows(repeat=3), model=model,
                           gradient_checkpointing=True)


def multi_vector_maxsim(paths, out):
    """Late interaction (Qwen2-VL, LoRA + token projection): MaxSim InfoNCE with cross-rank documents whose token
    counts differ between ranks (texts of different lengths), padded and masked in the gather."""
    model = MultiVectorEncoder.from_pretrained(paths["qwen2_vl"], lora_config=LoraConfig(r=8), query_augmentation=2)
    rows = [{**row, "query": row["query"] + " please" * (i % 3)} for i, row in enumerate(color_rows(repeat=3))]
    return _bi_encoder_run(paths, out, MaxSimContrastiveLoss(temperature=0.1), rows, model=model)


def multi_vector_cached_pairwise(paths, out):
    """Late interaction on a dual encoder with GradCache and the pairwise loss over hard negatives."""
    model = MultiVectorEncoder.from_pretrained(paths["clip"], lora_config=LoraConfig(r=8))
    return _bi_encoder_run(paths, out, MaxSimPairwiseLoss(mini_batch_size=3, temperature=0.1), color_rows(repeat=3),
                           model=model)


def _grouped_rows(teacher: bool = False) -> list[dict]:
    names = list(COLORS)
    rows = [{"query": f"a {c} square", "positive": solid(c), "negative_1": solid(names[(i + 1) % 8]),
             "negative_2": f"a {names[(i + 2) % 8]} thing"} for i, c in enumerate(names)]
    if teacher:
        rows = [{**row, "teacher_scores": [2.0, 0.5 * (i % 3), -1.0]} for i, row in enumerate(rows)]
    return rows * 3


def _reranker_run(model, out, loss, rows) -> dict[str, Any]:
    initial = trainable(model)
    ref: list = []
    counter = CountAllReduces(ref)
    data = rows if not isinstance(rows, list) else Dataset.from_list(rows)
    trainer = CrossEncoderTrainer(model=model, args=training_args(out), train_dataset=data,
                                  loss=loss, callbacks=[counter])
    ref.append(trainer)
    trainer.train()
    return {"initial": initial, "weights": trainable(model), "all_reduces": counter.count,
            "steps": trainer.state.global_step}


def listwise_reranker(paths, out):
    """Qwen2-VL cross-encoder, linear head + LoRA, listwise softmax over groups of 3 with GradCache."""
    model = CrossEncoder.from_pretrained(paths["qwen2_vl"], head="linear", lora_config=LoraConfig(r=8),
                                         **PLAIN_PROMPT)
    return _reranker_run(model, out, ListwiseSoftmaxLoss(mini_batch_size=4), _grouped_rows())


def yes_no_lambda(paths, out):
    """yes_no head (LM-head rows, no new parameters) with LoRA, LambdaLoss, one forward per step."""
    model = CrossEncoder.from_pretrained(paths["qwen2_vl"], head="yes_no", lora_config=LoraConfig(r=8),
                                         **PLAIN_PROMPT)
    return _reranker_run(model, out, LambdaLoss(), _grouped_rows())


def mlp_distill(paths, out):
    """mlp head, full fine-tune, KL distillation of teacher scores."""
    model = CrossEncoder.from_pretrained(paths["qwen2_vl"], head="mlp", **PLAIN_PROMPT)
    return _reranker_run(model, out, DistillKLLoss(), _grouped_rows(teacher=True))


def classification_bce(paths, out):
    """BERT text cross-encoder, new classification head trained as a LoRA modules_to_save, pointwise BCE."""
    model = CrossEncoder.from_pretrained(paths["bert_base"], head="classification", lora_config=LoraConfig(r=8),
                                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    rows = [{"query": f"which square is {c}", "document": f"the square is {d}", "label": float(c == d)}
            for c in COLORS for d in ("red", c)] * 3
    return _reranker_run(model, out, BinaryCrossEntropyLoss(), rows[:48])


def mixture_cached(paths, out):
    """Two datasets as a round-robin mixture (every global batch from one, on both ranks), GradCache, symmetric loss;
    the paints repeat their positives, so copies meet in a batch and on the other rank: the loss masks them."""
    paints = [{"query": f"{c} paint {k}", "positive": f"the colour {c}"} for k in range(2) for c in COLORS]
    loss = CachedContrastiveLoss(mini_batch_size=2, symmetric=True)
    model = _clip(paths)
    initial = trainable(model)
    masked: list[int] = []

    class CountMasked(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            masked.append(int((logs or {}).get("masked_negatives", 0)))

    trainer = BiEncoderTrainer(model=model, args=training_args(out), loss=loss, callbacks=[CountMasked()],
                               train_dataset={"colors": Dataset.from_list(color_rows(repeat=3)),
                                              "paints": Dataset.from_list(paints)},
                               mixing=Mixing(strategy="round_robin"))
    ref = [trainer]
    counter = CountAllReduces(ref)
    trainer.add_callback(counter)
    trainer.train()
    return {"initial": initial, "weights": trainable(model), "all_reduces": counter.count,
            "steps": trainer.state.global_step, "masked": sum(masked)}


def _stream_or_rows(rows: list[dict], shards: int) -> Any:
    """With 2 processes: ``rows`` as a stream of ``shards`` shards, ordered so that the global batches (4 rows per
    process and step) are the map-style ones: with 2 shards each process reads its own shard (datasets splits a
    stream by shard when it has as many as processes); with 1, each process keeps its own batches of the stream.
    In one process: the map-style rows themselves, which the 2-process run must equal."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return rows
    per = GLOBAL_BATCH // size
    if shards > 1:  # shard r holds what rank r trains on, step after step
        rows = [row for rank in range(size) for start in range(0, len(rows), GLOBAL_BATCH)
                for row in rows[start + rank * per:start + (rank + 1) * per]]
    return Dataset.from_list(rows).to_iterable_dataset(num_shards=shards)


def stream_bi_encoder(paths, out):
    """A streamed training set of one shard (accelerate: each process keeps its own batches) equals map-style rows."""
    loss = ContrastiveLoss(symmetric=True, learnable_temperature=True, temperature=0.1)
    return _bi_encoder_run(paths, out, loss, _stream_or_rows(color_rows(repeat=3), shards=1))


def stream_sharded_reranker(paths, out):
    """A yes/no reranker on a streamed pointwise set of 2 shards (one per process) equals map-style rows."""
    model = CrossEncoder.from_pretrained(paths["qwen2_vl"], head="yes_no", lora_config=LoraConfig(r=8),
                                         **PLAIN_PROMPT)
    names = list(COLORS)
    rows = [{"query": f"a {c} square", "document": solid(names[(i + j) % 8]), "label": float(j == 0)}
            for i, c in enumerate(names) for j in range(3)]
    return _reranker_run(model, out, BinaryCrossEntropyLoss(), _stream_or_rows(rows, shards=2))


def sharded_inference(paths, out):
    """Evaluators and mining on an untrained model, with small uneven batches so ranks get different shares."""
    encoder = BiEncoder.from_pretrained(paths["clip"])
    queries = {c: f"a {c} square" for c in COLORS}
    corpus = {c: solid(c) for c in COLORS} | {f"text-{c}": f"{c} paint" for c in COLORS}
    relevant = {c: {c, f"text-{c}"} for c in COLORS}
    retrieval = RetrievalEvaluator(queries, corpus, relevant, batch_size=3)(encoder)
    embeddings = encoder.encode(list(corpus.values()), side="document", batch_size=3, shard_across_ranks=True)
    reranker = CrossEncoder.from_pretrained(paths["qwen2_vl"], head="yes_no", **PLAIN_PROMPT)
    names = list(COLORS)
    samples = [{"query": f"a {c} square", "positive": [solid(c)], "negative": [solid(names[(i + 1) % 8]), "x"]}
               for i, c in enumerate(names)]
    reranking = RerankingEvaluator(samples, batch_size=5)(reranker)
    pairs = Dataset.from_list([{"query": f"a {c} square", "positive": solid(c)} for c in names])
    mined = mine_hard_negatives(encoder, pairs, num_negatives=2, batch_size=3)
    negatives = [[row[f"negative_{j}"].tobytes() for j in (1, 2)] for row in mined]
    two_stage = RetrieveRerankEvaluator(encoder, queries, corpus, relevant, top_k=5, batch_size=3,
                                        rerank_batch_size=5)(reranker)
    late = MultiVectorEncoder.from_pretrained(paths["qwen2_vl"])
    multi_vector = RetrievalEvaluator(queries, corpus, relevant, batch_size=3)(late)
    tokens = late.encode(list(corpus.values()), side="document", batch_size=3, shard_across_ranks=True)
    return {"retrieval": retrieval, "embeddings": embeddings, "reranking": reranking, "negatives": negatives,
            "two_stage": two_stage, "multi_vector": multi_vector, "token_embeddings": tokens.embeddings}


SCENARIOS = {f.__name__: f for f in (
    contrastive_lora, cached_full, accumulation, uneven_last_batch, chat_vlm_embedder, qlora_gradient_checkpointing,
    multi_vector_maxsim, multi_vector_cached_pairwise, stream_bi_encoder, stream_sharded_reranker,
    listwise_reranker, yes_no_lambda, mlp_distill, classification_bce, mixture_cached, sharded_inference)}


def run(name: str, paths: dict[str, str], out_root: str) -> dict[str, Any]:
    set_seed(0)  # LoRA and head initialisation draw from the global RNG
    return SCENARIOS[name](paths, os.path.join(out_root, name))
