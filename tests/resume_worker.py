"""One training run for the SIGKILL resume test and the workers-vs-none test: LoRA dropout, a learnable
temperature, AdamW with warmup and decay, two and a half epochs (10 steps of 4 rows).

    python resume_worker.py KIND MODEL_PATH OUTPUT_DIR KILL_AT LOADING

KIND: ``bi_encoder``, ``grad_cache``, ``reranker`` or ``stream`` (the bi-encoder on a 2-shard ``IterableDataset``).
LOADING: ``workers`` (the library's default: HF_MM_RERANK_AUTO_WORKERS=1, so the trainer picks persistent DataLoader
workers from the CPU count) or ``main`` (HF_MM_RERANK_AUTO_WORKERS=0: batches built in the training process). The
argument sets the variable itself (an inherited value never decides), and the run stops with an error unless the
training DataLoader it got loads that way. With KILL_AT > 0 the process SIGKILLs itself right after checkpoint KILL_AT
is written (as a kill at any later moment would leave it), and a rerun resumes with ``resume_from_checkpoint=True``.
At the end it writes every trainable tensor (model and loss) to OUTPUT_DIR/final.pt, and the trainer's count of rows
read and the model card's "training rows" to OUTPUT_DIR/facts.json.
"""

from __future__ import annotations

import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(__file__))
LOADING = {"workers": "1", "main": "0"}  # argv[5] -> HF_MM_RERANK_AUTO_WORKERS, set before the library reads it
if __name__ == "__main__":
    os.environ["HF_MM_RERANK_AUTO_WORKERS"] = LOADING[sys.argv[5]]

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from images import COLORS, color_rows  # noqa: E402
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
    Mixing,
)
from hf_mm_rerank.losses import ListwiseSoftmaxLoss  # noqa: E402
from hf_mm_rerank.publishing.model_card import card_info  # noqa: E402


class CheckLoading(TrainerCallback):
    """Stops the run unless the training DataLoader loads as asked: persistent workers, or none."""

    def __init__(self, loading: str) -> None:
        self.loading = loading

    def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
        loader = getattr(train_dataloader, "base_dataloader", train_dataloader)
        got = (loader.num_workers, loader.persistent_workers, args.dataloader_num_workers)
        ok = got[0] > 0 and got[1] and got[2] == got[0] if self.loading == "workers" else got[0] == 0 == got[2]
        if not ok:
            raise SystemExit(f"asked for loading={self.loading!r}, but the training DataLoader has num_workers="
                             f"{got[0]}, persistent_workers={got[1]} (args.dataloader_num_workers={got[2]})")
        print(f"loading: {self.loading} (num_workers={got[0]}, persistent_workers={got[1]})", flush=True)


class KillAfterSave(TrainerCallback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main(kind: str, model_path: str, output_dir: str, kill_at: int, loading: str) -> None:
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
    mixing = None
    if kind == "mixture":  # two datasets, drawn by temperature, without duplicates in a batch: 8 steps per epoch
        paints = Dataset.from_list([{"query": f"{c} paint {k}", "positive": f"the colour {c}"}
                                    for k in range(2) for c in COLORS])
        data, mixing = {"colours": data, "paints": paints}, Mixing(strategy="temperature", no_duplicates=True)
    callbacks = [CheckLoading(loading)] + ([KillAfterSave(kill_at)] if kill_at else [])
    trainer = trainer_class(model=model, args=args, train_dataset=data, loss=loss, callbacks=callbacks, mixing=mixing)
    last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
    print(f"resuming from {os.path.basename(last)}" if last else "starting", flush=True)
    trainer.train(resume_from_checkpoint=True if last else None)
    trained = {f"model.{n}": p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trained.update({f"loss.{n}": p.detach().clone() for n, p in loss.named_parameters()})
    torch.save(trained, os.path.join(output_dir, "final.pt"))
    facts = {"rows_read": trainer.rows_read, "training rows": card_info(trainer)["training"]["training rows"]}
    with open(os.path.join(output_dir, "facts.json"), "w") as handle:
        json.dump(facts, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5])
