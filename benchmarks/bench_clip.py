"""Side-by-side training throughput: hf_mm_rerank vs sentence-transformers vs a plain PyTorch step.

Two cases: a CLIP bi-encoder (``--model tiny`` on CPU, ``vit-b32`` on GPU) and a Qwen3-VL bi-encoder with
LoRA and GradCache (``--model qwen3vl-tiny`` on CPU, ``qwen3vl-2b``: Qwen3-VL-2B shapes, random weights, on
GPU), where sentence-transformers runs ``CachedMultipleNegativesRankingLoss`` with last-token pooling and
the same LoRA targets.

The same random-initialised CLIP trains on the same generated 640x480 JPEG + caption pairs for the same
steps, with the same batch, learning rate, optimizer and InfoNCE loss (temperature 0.05 = MNRL scale 20):

- ``ours``: ``BiEncoderTrainer`` at its defaults (workers chosen from the CPU count, draft JPEG decoding);
- ``st``: sentence-transformers' ``SentenceTransformerTrainer`` + ``MultipleNegativesRankingLoss`` at its
  defaults (``dataloader_num_workers=0``);
- ``ours_w{N}`` / ``st_w{N}``: both with N DataLoader workers;
- ``ceiling``: a plain PyTorch loop on tensors processed once beforehand (no decoding in the loop).

Each run is a fresh subprocess; runs alternate (the order rotates every repeat) and the median of the
repeats is reported, with ratios against sentence-transformers' default. Run ``bash benchmarks/run.sh``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "benchmarks" / ".cache"


# ----- data and model --------------------------------------------------------------------------------------
def make_data(count: int, seed: int = 0):
    """``count`` 640x480 JPEGs (smooth random colour fields, quality 90) with short captions, cached on disk."""
    from datasets import Dataset, Features, Value, load_from_disk
    from datasets import Image as ImageFeature

    path = CACHE / f"jpeg-640x480-{count}"
    if path.is_dir():
        return load_from_disk(str(path))
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    images, captions = [], []
    for i in range(count):
        small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((640, 480), Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        images.append({"bytes": buffer.getvalue(), "path": None})
        captions.append(f"photo number {i} with colours {small[0, 0].tolist()}")
    features = Features({"query": Value("string"), "positive": ImageFeature()})
    data = Dataset.from_dict({"query": captions, "positive": images}, features=features)
    data.save_to_disk(str(path))
    return load_from_disk(str(path))


def make_model(kind: str) -> str:
    """Random-initialised checkpoints: CLIP ``tiny`` (2 layers, 32 px) / ``vit-b32`` (ViT-B/32 shapes, 224 px),
    Qwen3-VL ``qwen3vl-tiny`` (the tests' tiny model) / ``qwen3vl-2b`` (Qwen3-VL-2B shapes)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import tiny_models
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    path = CACHE / f"model-{kind}"
    if (path / "config.json").is_file():
        return str(path)
    if kind == "tiny":
        return str(tiny_models.make_clip(path))
    if kind.startswith("qwen3vl"):
        return str(_make_qwen3_vl(path, kind == "qwen3vl-2b"))
    torch.manual_seed(0)
    tok = tiny_models.byte_tokenizer(["<|startoftext|>", "<|endoftext|>"], "<|startoftext|> $A <|endoftext|>",
                                     bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    config = CLIPConfig(text_config={"vocab_size": len(tok), "eos_token_id": tok.eos_token_id,
                                     "bos_token_id": tok.bos_token_id, "pad_token_id": tok.pad_token_id},
                        vision_config={"image_size": 224, "patch_size": 32})
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tok)
    return str(tiny_models._save(CLIPModel(config), processor, path))


def _make_qwen3_vl(path: Path, full_size: bool) -> Path:
    import tiny_models

    if not full_size:
        return tiny_models.make_qwen3_vl(path)
    import torch
    from transformers import Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    torch.manual_seed(0)
    tok = tiny_models._qwen_tokenizer()
    text = dict(vocab_size=len(tok), hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                num_attention_heads=16, num_key_value_heads=8, head_dim=128, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, rope_parameters={"rope_type": "default", "rope_theta": 5e6,
                                                                "mrope_section": [24, 20, 20], "mrope_interleaved": True})
    vision = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=2048, num_position_embeddings=2304,
                  deepstack_visual_indexes=[5, 11, 17])
    config = Qwen3VLConfig(text_config=text, vision_config=vision, **tiny_models._special_ids(tok))
    processor = Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(patch_size=16, image_mean=[0.5] * 3,
                                                                       image_std=[0.5] * 3),
                                 tokenizer=tok, video_processor=Qwen3VLVideoProcessor(),
                                 chat_template=tiny_models.QWEN_CHAT_TEMPLATE)
    return tiny_models._save(Qwen3VLForConditionalGeneration(config).to(torch.bfloat16), processor, path)


def _is_vlm(opts) -> bool:
    return opts.model.startswith("qwen3vl")


# ----- timing ----------------------------------------------------------------------------------------------
sys.path.insert(0, str(Path(__file__).resolve().parent / "gpu"))
from common import StepTimer  # noqa: E402  (the GPU plan's timer: one copy for both benchmarks)


def _peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + workers) / 1024


def _training_args(cls, out: str, opts, workers: int | None, **extra):
    import torch

    gpu = torch.cuda.is_available()
    settings = dict(output_dir=out, per_device_train_batch_size=opts.batch, max_steps=opts.steps, learning_rate=1e-4,
                    report_to=[], save_strategy="no", logging_steps=10_000, disable_tqdm=True, seed=0,
                    use_cpu=not gpu, bf16=gpu, torch_compile=opts.compile, dataloader_drop_last=True)
    if workers is not None:
        settings["dataloader_num_workers"] = workers
    settings.update(extra)
    return cls(**settings)


def run_ours(opts, workers: int | None) -> StepTimer:
    from transformers import TrainingArguments

    from hf_mm_rerank import BiEncoder, BiEncoderTrainer, ContrastiveLoss

    timer = StepTimer(opts.warmup)
    model = BiEncoder.from_pretrained(make_model(opts.model))
    trainer = BiEncoderTrainer(model=model, args=_training_args(TrainingArguments, opts.out, opts, workers),
                               train_dataset=make_data(opts.images), loss=ContrastiveLoss(temperature=0.05),
                               callbacks=[timer.callback])
    trainer.train()
    return timer


def run_st(opts, workers: int | None) -> StepTimer:
    from sentence_transformers import (
        SentenceTransformer,
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    timer = StepTimer(opts.warmup)
    model = SentenceTransformer(make_model(opts.model))
    data = make_data(opts.images).rename_columns({"query": "anchor"})
    args = _training_args(SentenceTransformerTrainingArguments, opts.out, opts, workers)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data,
                                         loss=MultipleNegativesRankingLoss(model, scale=20.0),
                                         callbacks=[timer.callback])
    trainer.train()
    return timer


def run_ceiling(opts, workers: int | None) -> StepTimer:
    """Plain PyTorch: tensors processed once, already on the device; only forward/backward/step is timed."""
    import torch
    import torch.nn.functional as F
    from transformers import CLIPModel, CLIPProcessor

    path = make_model(opts.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = CLIPModel.from_pretrained(path).to(device).train()
    processor = CLIPProcessor.from_pretrained(path)
    data = make_data(opts.images)
    batches = []
    for start in range(0, len(data) - opts.batch + 1, opts.batch):
        rows = data[start:start + opts.batch]
        text = processor.tokenizer(rows["query"], padding=True, return_tensors="pt").to(device)
        pixels = processor.image_processor(images=rows["positive"], return_tensors="pt")["pixel_values"].to(device)
        batches.append((text, pixels))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")

    def step(text, pixels):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            q = F.normalize(model.get_text_features(**text).pooler_output.float(), dim=-1)
            d = F.normalize(model.get_image_features(pixel_values=pixels).pooler_output.float(), dim=-1)
        loss = F.cross_entropy(20.0 * q @ d.T, torch.arange(q.shape[0], device=device))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step = torch.compile(step) if opts.compile else step
    timer = StepTimer(opts.warmup)
    for i in range(opts.steps):
        step(*batches[i % len(batches)])
        timer.tick(i + 1)
    return timer


RUNNERS = {"ours": run_ours, "st": run_st, "ceiling": run_ceiling}


def worker_main(opts) -> None:
    name, _, count = opts.worker.partition("_w")
    timer = RUNNERS[name](opts, int(count) if count else None)
    result = {"run": opts.worker, "samples_per_second": timer.steps * opts.batch / (timer.end - timer.start),
              "peak_memory_mb": _peak_memory_mb()}
    print("RESULT " + json.dumps(result), flush=True)


# ----- driver ----------------------------------------------------------------------------------------------
def _versions() -> dict[str, str]:
    from importlib.metadata import version

    names = ("hf_mm_rerank", "sentence-transformers", "transformers", "torch", "datasets", "pillow")
    return {n: version(n) for n in names}


def _machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"1 x {torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores"
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor())
    return f"CPU only: {len(os.sched_getaffinity(0))} cores ({model})"


def drive(opts, argv: list[str]) -> None:
    make_data(opts.images)
    make_model(opts.model)
    runs = [r for r in opts.runs.split(",") if not (_is_vlm(opts) and r == "ceiling")]  # ceiling: CLIP only
    results: dict[str, list[dict]] = {run: [] for run in runs}
    for repeat in range(opts.repeats):
        order = runs[repeat % len(runs):] + runs[:repeat % len(runs)]  # rotate: no run always goes first
        for run in order:
            command = [sys.executable, __file__, *argv, "--worker", run]
            out = subprocess.run(command, capture_output=True, text=True, timeout=opts.timeout)
            line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                raise RuntimeError(f"{run} failed:\n{out.stderr[-3000:]}")
            results[run].append(json.loads(line[7:]))
            print(f"repeat {repeat + 1} {run}: {results[run][-1]['samples_per_second']:.1f} samples/s", flush=True)
    report(opts, results)


def report(opts, results: dict[str, list[dict]]) -> None:
    median = {run: statistics.median(r["samples_per_second"] for r in rows) for run, rows in results.items()}
    memory = {run: max(r["peak_memory_mb"] for r in rows) for run, rows in results.items()}
    base = median.get("st")
    lines = [f"# Bi-encoder training throughput, {opts.model} model, {opts.device}", "",
             f"- date: {date.today().isoformat()}", f"- machine: {_machine()}",
             f"- command: `bash benchmarks/run.sh {' '.join(opts.cli_args)}`",
             f"- data: {opts.images} generated 640x480 JPEGs (quality 90) with captions; batch {opts.batch}; "
             f"{opts.steps} steps, timed after {opts.warmup}; median of {opts.repeats} alternating runs",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in _versions().items()), "",
             "| run | samples/s (median) | all runs | peak memory (MB) | vs sentence-transformers default |",
             "|---|---|---|---|---|"]
    for run, rows in results.items():
        ratio = f"{median[run] / base:.2f}x" if base else "n/a"
        every = ", ".join(f"{r['samples_per_second']:.0f}" for r in rows)
        lines.append(f"| {run} | {median[run]:.1f} | {every} | {memory[run]:.0f} | {ratio} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if opts.output:
        Path(opts.output).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.output).write_text(text)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("tiny", "vit-b32", "qwen3vl-tiny", "qwen3vl-2b"), default="tiny")
    parser.add_argument("--mini_batch", type=int, default=8, help="GradCache mini-batch (VLM case)")
    parser.add_argument("--max_pixels", type=int, default=None, help="pixel budget per image (VLM case)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runs", default="ours,st,ours_w1,st_w1,ceiling")
    parser.add_argument("--compile", action="store_true", help="torch_compile for ours and the ceiling")
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--output", default=None, help="write the markdown table here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(CACHE / "out"), help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    opts.device = "cuda" if _has_cuda() else "cpu"
    opts.cli_args = [a for a in argv if a != "--worker"]
    if opts.worker:
        worker_main(opts)
    else:
        drive(opts, argv)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
