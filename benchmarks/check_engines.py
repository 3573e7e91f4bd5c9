"""Checks every distributed engine in one go: train, save a checkpoint, resume, reload, compare.

For each engine (recipes/accelerate/*.yaml: DDP, FSDP2, DeepSpeed ZeRO-2/3) the bi-encoder recipe trains a tiny
CLIP with LoRA and GradCache for 4 steps (checkpoint at 2), a second launch resumes from checkpoint-2, and the
saved model is reloaded in this process: its embeddings must match the DDP run's (bf16 tolerance), and the
resumed run must reach the straight run's weights. FSDP and DeepSpeed need CUDA GPUs; ``--cpu`` runs the DDP
check on 2 CPU processes (gloo), which is what a machine without a GPU can verify.

    python benchmarks/check_engines.py [--cpu] [--num_processes N] [--output benchmarks/results/<file>.md]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
ENGINES = {"ddp": "multi_gpu.yaml", "fsdp2": "fsdp.yaml", "zero2": "deepspeed_zero2.yaml", "zero3": "deepspeed_zero3.yaml"}


def _data(folder: Path) -> str:
    from images import COLORS, solid

    (folder / "images").mkdir(parents=True)
    rows = []
    for i, color in enumerate(COLORS):
        solid(color).save(folder / "images" / f"{color}.png")
        rows.append({"query": f"a {color} square", "positive": f"images/{color}.png",
                     "negative": f"images/{list(COLORS)[(i + 1) % len(COLORS)]}.png"})
    path = folder / "train.json"
    path.write_text("\n".join(json.dumps(r) for r in rows * 8))
    return str(path)


def _launch(engine: str, cpu: bool, processes: int, model: str, data: str, out: Path, steps: int,
            resume: str | None = None) -> subprocess.CompletedProcess:
    launcher = ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"] if cpu \
        else ["--config_file", str(ROOT / "recipes" / "accelerate" / ENGINES[engine])]
    flags = ["--use_cpu", "true", "--ddp_backend", "gloo", "--bf16", "false"] if cpu else ["--bf16", "true"]
    argv = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_processes", str(processes),
            "--main_process_port", "29571", str(ROOT / "recipes" / "train_bi_encoder.py"),
            "--model_name_or_path", model, "--dataset_name", "json", "--data_files", data, "--output_dir", str(out), "--max_steps", str(steps),
            "--per_device_train_batch_size", "8", "--lora_r", "8", "--mini_batch_size", "4", "--learning_rate", "1e-3", "--lr_scheduler_type", "constant",
            "--save_strategy", "steps", "--save_steps", "2", "--eval_strategy", "no", "--report_to", "none",
            "--train_sampling_strategy", "sequential", "--dataloader_num_workers", "0", "--seed", "0", *flags]
    if resume:
        argv += ["--resume_from_checkpoint", resume]
    return subprocess.run(argv, capture_output=True, text=True, timeout=1200, env={**os.environ, "OMP_NUM_THREADS": "1"})


def check(engine: str, cpu: bool, processes: int, model: str, data: str, work: Path) -> dict:
    from hf_mm_rerank import BiEncoder

    if engine.startswith("zero") and importlib.util.find_spec("deepspeed") is None:
        return {"engine": engine, "status": "skipped", "detail": "deepspeed is not installed (pip install -e '.[deepspeed]')"}
    straight, resumed = work / f"{engine}-straight", work / f"{engine}-resumed"
    runs = [_launch(engine, cpu, processes, model, data, straight, 4),
            _launch(engine, cpu, processes, model, data, resumed, 2)]
    runs.append(_launch(engine, cpu, processes, model, data, resumed, 4, resume=str(resumed / "checkpoint-2")))
    failed = next((r for r in runs if r.returncode != 0), None)
    if failed is not None:
        return {"engine": engine, "status": "failed", "detail": failed.stderr.strip().splitlines()[-1][:300]}
    texts = ["a red square", "a blue square"]
    a = BiEncoder.from_pretrained(str(straight)).encode(texts)
    b = BiEncoder.from_pretrained(str(resumed)).encode(texts)
    return {"engine": engine, "status": "ok", "embeddings": a, "resume_gap": float((a - b).abs().max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="DDP on CPU processes only (no GPU needed)")
    parser.add_argument("--num_processes", type=int, default=None)
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--output", default=None)
    opts = parser.parse_args()
    import tiny_models

    cpu = opts.cpu or not torch.cuda.is_available()
    engines = ["ddp"] if cpu else opts.engines.split(",")
    processes = opts.num_processes or (2 if cpu else max(1, torch.cuda.device_count()))
    work = Path(tempfile.mkdtemp(prefix="engines_"))
    model = str(tiny_models.make_clip(work / "tiny-clip"))
    data = _data(work / "data")
    results = [check(engine, cpu, processes, model, data, work) for engine in engines]
    reference = next((r["embeddings"] for r in results if r.get("embeddings") is not None), None)
    lines = ["| engine | status | resumed vs straight (max abs) | vs first engine (max abs) | detail |",
             "|---|---|---|---|---|"]
    for r in results:
        gap = f"{r['resume_gap']:.2e}" if "resume_gap" in r else ""
        ref = f"{float((r['embeddings'] - reference).abs().max()):.2e}" if "embeddings" in r else ""
        lines.append(f"| {r['engine']} | {r['status']} | {gap} | {ref} | {r.get('detail', '')} |")
    device = "CPU (gloo)" if cpu else torch.cuda.get_device_name(0)
    header = [f"# Distributed engines check, {processes} x {device}", "",
              f"- date: {datetime.date.today()}",
              f"- command: `python benchmarks/check_engines.py {' '.join(sys.argv[1:])}`",
              "- tiny CLIP, LoRA r=8, GradCache mini-batch 4, 8 rows per process, 4 steps (checkpoint at 2), resumed", ""]
    report = "\n".join(header + lines) + "\n"
    print(report)
    if opts.output:
        Path(opts.output).write_text(report)
    if any(r["status"] == "failed" for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
