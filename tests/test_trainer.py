import os

import pytest
import torch
from datasets import Dataset
from helpers import RecordThreads, args, assert_rel_close, fixed_batch_loss
from images import color_rows
from peft import LoraConfig
from transformers import TrainerCallback, TrainingArguments

from hf_mm_rerank import BiEncoder, BiEncoderTrainer, CachedContrastiveLoss, ContrastiveLoss


@pytest.fixture()
def clip_lora(tiny_path):
    return BiEncoder.from_pretrained(tiny_path("clip"), lora_config=LoraConfig(r=8, lora_alpha=16))


def test_plain_args_fixups_and_evaluator_only_evaluate(clip_lora, tmp_path, color_dataset, color_evaluator):
    training_args = args(tmp_path)
    assert training_args.remove_unused_columns  # the user's default
    trainer = BiEncoderTrainer(model=clip_lora, args=training_args, train_dataset=color_dataset,
                               evaluator=color_evaluator)
    assert trainer.args.remove_unused_columns is False
    metrics = trainer.evaluate()
    assert {"eval_ndcg@10", "eval_mrr@10", "eval_recall@1", "eval_recall@5", "eval_recall@10",
            "eval_map@100"} <= set(metrics)
    assert metrics == pytest.approx({f"eval_{k}": v for k, v in color_evaluator(clip_lora).items()})


class RecordEvaluations(TrainerCallback):
    def __init__(self):
        self.seen = []

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.seen.append((state.global_step, dict(metrics)))


def test_eval_dataset_loss_and_metrics_together(clip_lora, tmp_path, color_dataset, color_evaluator):
    record = RecordEvaluations()
    trainer = BiEncoderTrainer(model=clip_lora, args=args(tmp_path), train_dataset=color_dataset,
                               eval_dataset=color_dataset, evaluator=color_evaluator, callbacks=[record])
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] > 0 and "eval_ndcg@10" in metrics
    # One evaluation, one on_evaluate carrying both the loss and the evaluator's metrics, one log row.
    assert len(record.seen) == 1 and {"eval_loss", "eval_ndcg@10"} <= set(record.seen[0][1])
    assert sum("eval_ndcg@10" in row for row in trainer.state.log_history) == 1


@pytest.mark.parametrize("with_dataset", [True, False])
def test_early_stopping_counts_each_evaluation_once(clip_lora, tmp_path, color_dataset, color_evaluator,
                                                    with_dataset):
    from transformers import EarlyStoppingCallback

    record = RecordEvaluations()
    stopper = EarlyStoppingCallback(early_stopping_patience=2, early_stopping_threshold=10.0)  # never improves
    training_args = args(tmp_path, max_steps=20, eval_strategy="steps", eval_steps=1, save_strategy="steps",
                         save_steps=1, metric_for_best_model="ndcg@10", load_best_model_at_end=True)
    trainer = BiEncoderTrainer(model=clip_lora, args=training_args, train_dataset=color_dataset,
                               eval_dataset=color_dataset if with_dataset else None, evaluator=color_evaluator,
                               callbacks=[record, stopper])
    trainer.train()
    # Step 1 sets the best metric, steps 2 and 3 use up the patience of 2: training stops after 3 evaluations.
    assert [step for step, _ in record.seen] == [1, 2, 3]
    assert trainer.state.global_step == 3


def test_evaluate_without_dataset_or_evaluator_explains(clip_lora, tmp_path, color_dataset):
    trainer = BiEncoderTrainer(model=clip_lora, args=args(tmp_path), train_dataset=color_dataset)
    with pytest.raises(ValueError, match="needs an eval_dataset or an evaluator"):
        trainer.evaluate()


def test_load_best_model_at_end_on_ndcg(clip_lora, tmp_path, color_dataset, color_evaluator):
    training_args = args(tmp_path, max_steps=4, eval_strategy="steps", eval_steps=2, save_strategy="steps",
                         save_steps=2, load_best_model_at_end=True, metric_for_best_model="ndcg@10")
    trainer = BiEncoderTrainer(model=clip_lora, args=training_args, train_dataset=color_dataset,
                               evaluator=color_evaluator)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best and os.path.isfile(os.path.join(best, "adapter_model.safetensors"))
    assert os.path.isfile(os.path.join(best, "hf_mm_rerank_config.json"))
    evals = [r["eval_ndcg@10"] for r in trainer.state.log_history if "eval_ndcg@10" in r]
    assert trainer.state.best_metric == pytest.approx(max(evals))
    # the model in memory is the best checkpoint's
    reloaded = BiEncoder.from_pretrained(best)
    assert_rel_close(clip_lora.encode(["a red square"]), reloaded.encode(["a red square"]))


def test_resume_from_checkpoint_restores_the_adapter(tiny_path, tmp_path, color_dataset):
    def run(max_steps, resume=None):
        model = BiEncoder.from_pretrained(tiny_path("clip"), lora_config=LoraConfig(r=8, lora_alpha=16))
        trainer = BiEncoderTrainer(model=model, args=args(tmp_path, max_steps=max_steps, save_strategy="steps",
                                                          save_steps=2), train_dataset=color_dataset)
        trainer.train(resume_from_checkpoint=resume)
        return model, trainer

    straight, _ = run(4)
    resumed, trainer = run(4, resume=str(tmp_path / "out" / "checkpoint-2"))
    assert trainer.state.global_step == 4
    probe = ["a red square", "blue"]
    assert_rel_close(straight.encode(probe), resumed.encode(probe))


def test_learnable_temperature_is_optimised(clip_lora, tmp_path, color_dataset):
    loss = ContrastiveLoss(learnable_temperature=True)
    start = loss.log_scale.detach().clone()
    trainer = BiEncoderTrainer(model=clip_lora, args=args(tmp_path, max_steps=3), train_dataset=color_dataset,
                               loss=loss)
    trainer.train()
    assert not torch.equal(start, loss.log_scale.detach())


def test_gradcache_training_keeps_batches_on_cpu_and_learns(clip_lora, tmp_path, color_dataset):
    trainer = BiEncoderTrainer(model=clip_lora, args=args(tmp_path, max_steps=8), train_dataset=color_dataset,
                               loss=CachedContrastiveLoss(mini_batch_size=3))
    assert trainer.data_collator.mini_batch_size == 3
    batch = next(iter(trainer.get_train_dataloader()))
    assert trainer._prepare_inputs(batch) is batch  # no eager move to the device: one mini-batch at a time
    assert len(batch["query"]) == 3
    initial_loss = fixed_batch_loss(trainer)
    trainer.train()
    assert fixed_batch_loss(trainer) < 0.9 * initial_loss, (initial_loss, fixed_batch_loss(trainer))


@pytest.mark.parametrize("columns, message", [
    ({"question": ["q"], "positive": ["p"]}, r"missing column\(s\) \['query'\]"),
    ({"query": ["q"], "positive": ["p"], "negative": ["n"], "negative_1": ["n"]}, "both 'negative' and"),
])
def test_bad_dataset_columns_fail_at_construction(clip_lora, tmp_path, columns, message):
    with pytest.raises(ValueError, match=message):
        BiEncoderTrainer(model=clip_lora, args=args(tmp_path), train_dataset=Dataset.from_dict(columns))


def test_bad_cell_error_names_the_dataset_row(clip_lora, tmp_path):
    rows = color_rows()[:4]
    rows[2] = {**rows[2], "positive": "no/such/image.png"}
    data = Dataset.from_list([{"query": r["query"], "positive": r["positive"] if isinstance(r["positive"], str)
                               else "a caption"} for r in rows])
    trainer = BiEncoderTrainer(model=clip_lora, args=args(tmp_path, per_device_train_batch_size=4, max_steps=1),
                               train_dataset=data)
    with pytest.raises(ValueError, match=r"row 2, column 'positive': received the image path 'no/such/image.png'"):
        trainer.train()


def test_the_users_arguments_collator_and_threads_stay_theirs(clip_lora, tmp_path, color_dataset, color_evaluator,
                                                               monkeypatch, keep_threads):
    """Issue 27 item 2. The trainers fix up a copy: the user's TrainingArguments compares equal to a deepcopy taken
    before, keeps its class and gets no private keys; a collator passed in is not changed; the thread count is set
    only while training and is the process's own again after train() (old code: the class was swapped,
    remove_unused_columns / workers written into the user's object, defer_errors set on their collator,
    dispatch_batches set on their accelerator_config, and the threads lowered from the constructor for good)."""
    import copy

    import hf_mm_rerank.training.arguments as arguments
    from hf_mm_rerank import BiEncoderCollator

    monkeypatch.delenv("HF_MM_RERANK_AUTO_WORKERS")  # the library's default: workers and threads picked for the user
    monkeypatch.setattr(arguments, "_cpus_per_rank", lambda: 2)  # 1 worker, 1 thread beside it (of 2)
    torch.set_num_threads(2)
    user_args = args(tmp_path, max_steps=2, eval_strategy="steps", eval_steps=1)
    before = copy.deepcopy(user_args)
    collator = BiEncoderCollator(clip_lora)
    record = RecordThreads()
    trainer = BiEncoderTrainer(model=clip_lora, args=user_args, train_dataset=color_dataset, data_collator=collator,
                               evaluator=color_evaluator, callbacks=[record])
    assert trainer.args is not user_args and trainer.args.remove_unused_columns is False  # fixed up: the copy
    assert trainer.auto_pipeline.workers and trainer.auto_pipeline.threads == (2, 1)
    assert trainer.args.dataloader_num_workers == 1 and trainer.data_collator.defer_errors
    assert torch.get_num_threads() == 2  # the constructor leaves the process's threads alone
    trainer.train()
    assert record.seen == [1, 1]  # the step ran beside the worker
    assert torch.get_num_threads() == 2  # and the process has its own count back
    assert user_args == before and type(user_args) is TrainingArguments
    assert not [k for k in vars(user_args) if k.startswith("_hf_mm_rerank")]
    assert collator.defer_errors is False

    stream_args = args(tmp_path, max_steps=1)
    stream_before = copy.deepcopy(stream_args)
    stream = BiEncoderTrainer(model=clip_lora, args=stream_args, train_dataset=color_dataset.to_iterable_dataset())
    assert stream.args.accelerator_config.dispatch_batches is False  # each process reads its own share
    assert stream_args.accelerator_config.dispatch_batches is None and stream_args == stream_before


def test_threads_are_restored_when_training_stops_on_an_error(clip_lora, tmp_path, monkeypatch, keep_threads):
    import hf_mm_rerank.training.arguments as arguments

    monkeypatch.delenv("HF_MM_RERANK_AUTO_WORKERS")
    monkeypatch.setattr(arguments, "_cpus_per_rank", lambda: 2)
    torch.set_num_threads(2)
    rows = [{"query": r["query"], "positive": "no/such/image.png"} for r in color_rows()[:4]]
    trainer = BiEncoderTrainer(model=clip_lora, args=args(tmp_path, per_device_train_batch_size=4, max_steps=1),
                               train_dataset=Dataset.from_list(rows))
    with pytest.raises(ValueError, match="no/such/image.png"):
        trainer.train()
    assert torch.get_num_threads() == 2


class _PlainLoss(torch.nn.Module):
    """A user's own loss: no TrainerLoss, none of its attributes."""

    def __init__(self, mini_batch_size=None):
        super().__init__()
        self.inner = ContrastiveLoss()
        if mini_batch_size:
            self.mini_batch_size = mini_batch_size  # declared by duck typing: still honoured

    def forward(self, model, batch):
        return self.inner(model, batch)


def test_loss_contract_declared_by_ours_and_defaulted_for_a_users_own(clip_lora, tmp_path, color_dataset):
    """Issue 27 item 3: our losses declare mini_batch_size / needs_groups / needs_teacher (TrainerLoss); a plain
    nn.Module loss reads through loss_contract with defaults (old code: no TrainerLoss / loss_contract)."""
    from hf_mm_rerank import (
        EmbeddingMarginMSELoss,
        ListwiseSoftmaxLoss,
        MarginMSELoss,
        MatryoshkaLoss,
        MaxSimContrastiveLoss,
        TrainerLoss,
    )
    from hf_mm_rerank.losses import LossContract, loss_contract

    for loss in (ContrastiveLoss(), CachedContrastiveLoss(mini_batch_size=4), ListwiseSoftmaxLoss(),
                 MarginMSELoss(), EmbeddingMarginMSELoss(), MaxSimContrastiveLoss(), MatryoshkaLoss(
                     CachedContrastiveLoss(mini_batch_size=4), dims=[16])):
        assert isinstance(loss, TrainerLoss), type(loss)
    assert loss_contract(CachedContrastiveLoss(mini_batch_size=4)) == LossContract(4, False, False)
    assert loss_contract(MatryoshkaLoss(CachedContrastiveLoss(mini_batch_size=4), dims=[16])).mini_batch_size == 4
    assert loss_contract(MarginMSELoss()) == LossContract(None, True, True)
    assert loss_contract(EmbeddingMarginMSELoss()) == LossContract(None, True, True)
    assert loss_contract(_PlainLoss()) == LossContract(None, False, False)
    assert loss_contract(_PlainLoss(mini_batch_size=3)).mini_batch_size == 3

    trainer = BiEncoderTrainer(model=clip_lora, args=args(tmp_path, max_steps=2), train_dataset=color_dataset,
                               loss=_PlainLoss())
    assert trainer.data_collator.mini_batch_size is None
    trainer.train()
    assert trainer.state.global_step == 2
    assert trainer.run_facts().rows_read == 16 and trainer.run_facts().bad_rows == "raise"


def test_the_card_reads_run_facts(clip_lora, tmp_path, color_dataset):
    """card_info reads the trainer's run through run_facts() (old code: getattr on trainer internals, so facts a
    trainer reports through run_facts never reached the card)."""
    from hf_mm_rerank import RunFacts
    from hf_mm_rerank.publishing.model_card import card_info

    trainer = BiEncoderTrainer(model=clip_lora, args=args(tmp_path), train_dataset=color_dataset)
    assert trainer.run_facts() == RunFacts(rows_read=0, skipped_rows=0, bad_rows="raise", metrics_before_training=None)
    trainer.run_facts = lambda: RunFacts(rows_read=7, skipped_rows=3, bad_rows="skip",
                                         metrics_before_training={"ndcg@10": 0.25})
    trainer.state.log_history += [{"eval_ndcg@10": 0.5}, {"eval_ndcg@10": 0.75}]
    info = card_info(trainer)
    assert info["training"]["rows skipped as unreadable (bad_rows='skip')"] == 3
    assert info["eval"] == {"before": {"ndcg@10": 0.25}, "after": {"ndcg@10": 0.75}}


def test_no_duck_typed_reads_of_the_declared_contracts():
    """The loss contract is read in one place (losses/base.py loss_contract), the card reads run_facts()."""
    import re
    from pathlib import Path

    import hf_mm_rerank

    pattern = re.compile(r"getattr\((?:self\.)?loss, \"(?:mini_batch_size|needs_groups|needs_teacher)\"|"
                         r"getattr\(trainer, \"(?:rows_read|skipped_rows|bad_rows|metrics_before_training|loss)\"")
    package = Path(hf_mm_rerank.__file__).parent
    found = [f"{path.relative_to(package)}: {m.group(0)}" for path in sorted(package.rglob("*.py"))
             for m in pattern.finditer(path.read_text())]
    assert not found, found
