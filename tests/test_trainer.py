import os

import pytest
import torch
from datasets import Dataset
from helpers import args, assert_rel_close, fixed_batch_loss
from images import color_rows
from peft import LoraConfig
from transformers import TrainerCallback

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
