"""One training run for the SIGKILL resume test, at the library's defaults: automatic persistent DataLoader
workers, LoRA dropout, a learnable temperature, AdamW with warmup and decay, two and a half epochs.

    python resume_worker.py KIND MODEL_PATH OUTPUT_DIR KILL_AT

KIND: ``bi_encoder``, ``grad_cache``, ``reranker`` or ``stream`` (the bi-encoder on a 2-shard ``IterableDataset``). With KILL_AT > 0 the process SIGKILLs itself right after
checkpoint KILL_AT is written (as a kill at any later moment would leave it), and a rerun resumes with
``resume_from_checkpoint=True``. At the end it writes every trainable tensor (model and loss) to
OUTPUT_DIR/final.pt.
"""

from __future__ import annotations

import os
import signal
import sys

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("HF_MM_RERANK_AUTO_WORKERS", "1")  # the default a user gets (the test suite turns it off)

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from images import color_rows  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import TrainerCallback, TrainingArguments  # noqa: E402
from transformers.trainer_utils import get_last_checkpoint  # noqa: E402

from hf_mm_rerank import (  # noqa: E402
    BiEncoder,
    BiEncoderTrainer,
    CachedContrastiveLoss,
    ContrastiveLoss,
    CrossEncoder,
    CrossEncoderTrainer,
)
from hf_mm_rerank.losses import ListwiseSoftmaxLoss  # noqa: E402


class KillAfterSave(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main(kind: str, model_path: str, output_dir: str, kill_at: int) -> None:
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1)
    rows = color_rows(repeat=2, negatives=2 if kind == "reranker" else 1)  # 16 rows: 4 steps per epoch
    if kind == "reranker":
        model = CrossEncoder.from_pretrained(model_path, head="linear", lora_config=lora)
        loss, trainer_class = ListwiseSoftmaxLoss(), CrossEncoderTrainer
    else:
        model = BiEncoder.from_pretrained(model_path, lora_config=lora)
        loss = (CachedContrastiveLoss(mini_batch_size=2, learnable_temperature=True) if kind == "grad_cache"
                else ContrastiveLoss(learnable_temperature=True))
        trainer_class = BiEncoderTrainer
    args = TrainingArguments(output_dir=output_dir, per_device_train_batch_size=4, max_steps=10, save_steps=2,
                             learning_rate=5e-3, warmup_steps=2, logging_steps=1, report_to=[], use_cpu=True,
                             disable_tqdm=True, seed=0)
    data = Dataset.from_list(rows)
    data = data.to_iterable_dataset(num_shards=2) if kind == "stream" else data
    trainer = trainer_class(model=model, args=args, train_dataset=data, loss=loss,
                            callbacks=[KillAfterSave(kill_at)] if kill_at else None)
    assert os.environ["HF_MM_RERANK_AUTO_WORKERS"] == "0" or trainer.args.dataloader_num_workers > 0 and trainer.args.dataloader_persistent_workers
    last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    print(f"resuming from {os.path.basename(last)}" if last else "starting", flush=True)
    trainer.train(resume_from_checkpoint=True if last else None)
    trained = {f"model.{n}": p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trained.update({f"loss.{n}": p.detach().clone() for n, p in loss.named_parameters()})
    torch.save(trained, os.path.join(output_dir, "final.pt"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]))
