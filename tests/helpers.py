"""Small helpers shared by tests."""

from __future__ import annotations

from transformers import TrainingArguments


def args(tmp_path, **overrides) -> TrainingArguments:
    """Plain TrainingArguments for a few fast CPU steps."""
    settings = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=6, logging_steps=1,
                    learning_rate=5e-3, report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True,
                    seed=0)
    settings.update(overrides)
    return TrainingArguments(**settings)


def losses(trainer) -> list[float]:
    return [row["loss"] for row in trainer.state.log_history if "loss" in row]


def fixed_batch_loss(trainer, rows: int = 8) -> float:
    """The trainer's loss on its first ``rows`` training rows, in eval mode without gradients: the same batch
    before and after training, so a fall means learning, not an easier batch."""
    import torch

    model = trainer.model
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(rows)])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return float(trainer.loss(model, batch))
    finally:
        model.train(was_training)
