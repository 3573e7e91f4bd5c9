"""One process under ``accelerate launch --config_file recipes/accelerate/<fsdp|deepspeed_zero2|deepspeed_zero3>.yaml
--num_processes 1``: trains a BiEncoder (full fine-tune) a few steps with plain TrainingArguments and writes what
wrapped it, whether that is the engine the config asks for, the losses and the peak memory to ``--report``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def wrapped_kind(trainer) -> dict:
    """The wrapper the Trainer trained through, and whether it matches the launch's distributed type."""
    wrapped = trainer.model_wrapped
    kind = os.environ.get("ACCELERATE_USE_FSDP") == "true" and "fsdp" or (
        os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" and "deepspeed") or "none"
    info = {"distributed_type": str(trainer.accelerator.distributed_type), "wrapped_type": type(wrapped).__name__,
            "model_type": type(trainer.model).__name__, "launcher_kind": kind}
    if kind == "fsdp":
        from torch.distributed.fsdp import FSDPModule

        sharded = [name for name, module in trainer.model.named_modules() if isinstance(module, FSDPModule)]
        info.update(fsdp_modules=len(sharded), fsdp_examples=sharded[:3], wrapped_ok=len(sharded) > 1,
                    fsdp2=bool(getattr(trainer.accelerator, "is_fsdp2", False)))
    elif kind == "deepspeed":
        import deepspeed

        engine = isinstance(wrapped, deepspeed.DeepSpeedEngine)
        info.update(wrapped_ok=engine, zero_stage=wrapped.zero_optimization_stage() if engine else None)
    else:
        info["wrapped_ok"] = False
    return info


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--report", required=True)
    options = parser.parse_args()
    Path(options.report).with_suffix(".pid").write_text(str(os.getpid()))  # the launcher's caller kills it on timeout
    from transformers import TrainingArguments

    from hf_mm_rerank import BiEncoder, BiEncoderTrainer, ContrastiveLoss
    from hf_mm_rerank.distributed import close_process_group

    common.reset_peak()
    timer = common.StepTimer(1)
    trainer = BiEncoderTrainer(model=BiEncoder.from_pretrained(options.model),
                               args=common.training_args(TrainingArguments, options.batch, options.steps,
                                                         dataloader_num_workers=2),
                               train_dataset=common.jpeg_dataset(options.images),
                               loss=ContrastiveLoss(temperature=0.05), callbacks=[timer.callback])
    start = time.perf_counter()
    trainer.train()
    report = {**wrapped_kind(trainer), "steps_done": trainer.state.global_step, "losses": timer.losses,
              "peak_memory_mb": common.peak_memory_mb(), "train_seconds": round(time.perf_counter() - start, 1),
              "samples_per_second": timer.rate(options.batch) if options.steps > 1 else None}
    Path(options.report).write_text(json.dumps(report, default=str))
    print("REPORT " + json.dumps(report, default=str), flush=True)
    close_process_group()


if __name__ == "__main__":
    main()
