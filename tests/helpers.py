"""Small helpers shared by tests."""

from __future__ import annotations

import torch
from transformers import TrainerCallback, TrainingArguments


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


# ----- float comparisons that hold on any CPU ------------------------------------------------------------------
# Matmul blocking (and so round-off) differs between CPU models: a value computed two ways agrees to about 1e-7 of
# the *tensor's scale*, not of each element (an element near zero can differ by far more than 1e-6 of itself).
# So tensors are compared by their largest difference over their largest value. A real error (a wrong scale, a
# missing term, a dropped chunk) moves the tensor by far more than 1e-5 of its scale and still fails.
REL = 1e-5


def rel_diff(actual, expected, scale: float | None = None) -> float:
    """``max |actual - expected| / max |expected|`` (or over ``scale`` when given); shapes must match."""
    import torch

    a = torch.as_tensor(actual).detach().double().cpu()
    e = torch.as_tensor(expected).detach().double().cpu()
    if a.shape != e.shape:
        raise AssertionError(f"shapes differ: {tuple(a.shape)} vs {tuple(e.shape)}")
    if not torch.equal(torch.isnan(a), torch.isnan(e)):
        raise AssertionError("NaNs in different places")
    a, e = torch.nan_to_num(a), torch.nan_to_num(e)
    diff = float((a - e).abs().max()) if a.numel() else 0.0
    scale = float(e.abs().max()) if scale is None and e.numel() else (scale or 0.0)
    return diff / scale if scale > 0 else diff


def assert_rel_close(actual, expected, rel: float = REL, *, scale: float | None = None, msg: str = "") -> None:
    """Fail unless ``rel_diff(actual, expected, scale) <= rel`` (see the note above)."""
    got = rel_diff(actual, expected, scale)
    assert got <= rel, f"{msg + ': ' if msg else ''}max-abs difference is {got:.2e} of the scale (allowed {rel:g})"


def assert_all_rel_close(actual: dict, expected: dict, rel: float = REL, floor: float = 1e-2) -> None:
    """Per tensor of two same-keyed dicts (gradients, state dicts): each compared relative to the larger of its own
    scale and ``floor`` x the largest scale among them. A gradient that is mathematically zero (an attention key
    bias) is pure round-off, whose size follows the other gradients', not its own."""
    assert actual.keys() == expected.keys(), sorted(set(actual) ^ set(expected))
    largest = max((float(v.detach().abs().max()) for v in expected.values() if v.numel()), default=0.0)
    for name in expected:
        own = float(expected[name].detach().abs().max()) if expected[name].numel() else 0.0
        assert_rel_close(actual[name], expected[name], rel, scale=max(own, floor * largest), msg=name)


class RecordThreads(TrainerCallback):
    """The torch thread count at the end of each training step (``.seen``)."""

    def __init__(self):
        self.seen = []

    def on_step_end(self, args, state, control, **kwargs):
        self.seen.append(torch.get_num_threads())
