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
