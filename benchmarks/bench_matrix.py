"""The side-by-side matrix against sentence-transformers 6.2: the same random tiny models, data, batches, learning
rate and loss, each library at its own defaults, runs alternated, medians, ratios, and the peak PSS of each run's
process tree (the trainer and its DataLoader workers).

    python benchmarks/bench_matrix.py [--repeats 3] [--cases clip-jpeg,gradcache-128,...] [--output FILE.md]
                                      [--baseline DIR]

``--baseline DIR`` adds the run ``ours_base``: hf_mm_rerank imported from DIR (a checkout of an earlier commit, e.g.
``git worktree add /tmp/base HEAD``), alternated with the others, so before and after are measured side by side.

(The GPU cases, ViT-B/32 at batch 1024 compiled and Qwen3-VL-2B shapes, are bench_clip.py's ``--model vit-b32
--batch 1024 --compile`` and ``--model qwen3vl-2b``; no device was lent to run them.)

Cases (CPU): ``clip-jpeg`` tiny CLIP (32 px) on 640x480 JPEGs, batch 32 (decoding-bound; ours also with fast_decode);
``gradcache-128`` / ``gradcache-1024`` tiny CLIP at 224 px, GradCache mini-batch 32 (sentence-transformers:
CachedMultipleNegativesRankingLoss); ``qwen-50k-full`` / ``qwen-50k-lora`` tiny Qwen2-VL last-token embedder on
640x480 JPEGs at a 50,176-pixel budget, batch 16; ``qwen-12k-full`` / ``qwen-12k-lora`` the same at the processor's
12,544-pixel default. sentence-transformers loads the very folder hf_mm_rerank saved (its configuration gives it the
same last-token pooling and pixel budget).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
CACHE = ROOT / "benchmarks" / ".cache"

# name: (model, batch, mini_batch, pixel budget, lora, steps, runs); steps x batch stays within the data (512 rows,
# or 2 x batch) so no run crosses an epoch, and the fast cases time 13-21 steps (a few timed steps swing by 20%)
CASES = {
    "clip-jpeg": ("clip-32", 32, None, None, False, 16, ("ours", "ours_fast", "st")),
    "gradcache-128": ("clip-224", 128, 32, None, False, 4, ("ours", "st")),
    "gradcache-1024": ("clip-224", 1024, 32, None, False, 2, ("ours", "st")),
    "qwen-50k-full": ("qwen2vl", 16, None, 50_176, False, 24, ("ours", "st")),
    "qwen-50k-lora": ("qwen2vl", 16, None, 50_176, True, 24, ("ours", "st")),
    "qwen-12k-full": ("qwen2vl", 16, None, 12_544, False, 24, ("ours", "st")),
    "qwen-12k-lora": ("qwen2vl", 16, None, 12_544, True, 24, ("ours", "st")),
}


def make_model(kind: str) -> str:
    import tiny_models

    path = CACHE / f"matrix-{kind}"
    if (path / "config.json").is_file():
        return str(path)
    if kind == "qwen2vl":
        from transformers import AutoProcessor

        tiny_models.make_qwen2_vl(path)
        processor = AutoProcessor.from_pretrained(path)  # the real Qwen2-VL default cap
        processor.image_processor.size = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}
        processor.save_pretrained(path)
        return str(path)
    clip = tiny_models.make_clip(path)
    if kind == "clip-224":
        import torch
        from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

        config = CLIPConfig.from_pretrained(clip)
        config.vision_config.image_size = 224
        torch.manual_seed(0)
        processor = CLIPProcessor.from_pretrained(clip)
        processor.image_processor = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
        tiny_models._save(CLIPModel(config), processor, path)
    return str(path)


def worker(case: str, run: str, out: str) -> dict:
    """One run in this process: train, time the steps after the warm-up (see below), return samples/s."""
    import torch
    from bench_clip import StepTimer, make_data
    from transformers import TrainingArguments

    from hf_mm_rerank import BiEncoder, BiEncoderTrainer, CachedContrastiveLoss, ContrastiveLoss

    kind, batch, mini, budget, lora, steps, _ = CASES[case]
    data = make_data(max(512, 2 * batch))
    # Timed from the end of step 3 (GradCache, whose steps are long: 2 and 1): on 2 cores (one worker, which
    # prefetches 2 batches) the head start the worker got while step 0 ran is spent by then; gradcache-1024's one
    # timed step may use a prefetched batch (0.35 core-s of input beside a ~25 s step). sentence-transformers (no
    # workers) is timed over the same steps. On more cores the auto workers prefetch more: run more steps there.
    timer = StepTimer(min(3, steps // 2))
    common = dict(output_dir=out, per_device_train_batch_size=batch, max_steps=steps, learning_rate=1e-4, report_to=[],
                  save_strategy="no", logging_steps=10_000, disable_tqdm=True, seed=0, use_cpu=True,
                  dataloader_drop_last=True)
    model = make_model(kind)
    if run.startswith("ours"):
        from peft import LoraConfig

        encoder = BiEncoder.from_pretrained(model, lora_config=LoraConfig(r=8) if lora else None, max_pixels=budget,
                                            fast_decode=run == "ours_fast")
        loss = CachedContrastiveLoss(mini, temperature=0.05) if mini else ContrastiveLoss(temperature=0.05)
        BiEncoderTrainer(model=encoder, args=TrainingArguments(**common), train_dataset=data, loss=loss,
                         callbacks=[timer.callback]).train()
    else:
        from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
        from sentence_transformers import SentenceTransformerTrainingArguments as Arguments
        from sentence_transformers.sentence_transformer.losses import (
            CachedMultipleNegativesRankingLoss,
            MultipleNegativesRankingLoss,
        )

        folder = CACHE / f"matrix-st-{case}"  # the folder hf_mm_rerank saves, as sentence-transformers reads it
        if not (folder / "modules.json").is_file():
            BiEncoder.from_pretrained(model, max_pixels=budget).save_pretrained(str(folder))
        st = SentenceTransformer(str(folder), device="cpu")
        if lora:
            from peft import LoraConfig, get_peft_model

            st[0].model = get_peft_model(st[0].model, LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                      "o_proj", "gate_proj", "up_proj",
                                                                                      "down_proj"]))
        loss = (CachedMultipleNegativesRankingLoss(st, scale=20.0, mini_batch_size=mini) if mini else
                MultipleNegativesRankingLoss(st, scale=20.0))
        SentenceTransformerTrainer(model=st, args=Arguments(**common), train_dataset=data.rename_columns(
            {"query": "anchor"}), loss=loss, callbacks=[timer.callback]).train()
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    return {"samples_per_second": timer.steps * batch / (timer.end - timer.start)}


def _tree_pss(pid: int) -> int:
    """PSS (bytes) of ``pid`` and its descendants."""
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        try:
            with open(f"/proc/{current}/smaps_rollup") as handle:
                total += next(int(line.split()[1]) * 1024 for line in handle if line.startswith("Pss:"))
            with open(f"/proc/{current}/task/{current}/children") as handle:
                stack += [int(child) for child in handle.read().split()]
        except (OSError, StopIteration):
            continue
    return total


def run_one(case: str, run: str, timeout: int, baseline: str | None = None) -> dict:
    command = [sys.executable, __file__, "--worker", f"{case}:{run}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if run == "ours_base":  # the earlier hf_mm_rerank first on the path, ahead of this checkout's (editable) install
        env["PYTHONPATH"] = os.pathsep.join([baseline, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = [0]

    def watch() -> None:
        while process.poll() is None:
            peak[0] = max(peak[0], _tree_pss(process.pid))
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    stdout, stderr = process.communicate(timeout=timeout)
    watcher.join()
    line = next((x for x in stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{case} {run} failed:\n{stderr[-3000:]}")
    return {**json.loads(line[7:]), "peak_pss_mb": peak[0] / 2**20}


def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, received {text!r}")
    return int(text)


def spread(values: list[float]) -> float:
    """(largest - smallest) / median of one cell's runs: a ratio between two cells means little within it."""
    return (max(values) - min(values)) / statistics.median(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--repeats", type=positive, default=3, help="runs of each library per case (>= 1; 3 or more "
                        "for a median)")
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--output", default=None)
    parser.add_argument("--baseline", default=None, help="a checkout of an earlier commit, run as ours_base")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        case, run = options.worker.split(":")
        print("RESULT " + json.dumps(worker(case, run, str(CACHE / "out"))), flush=True)
        return
    from bench_clip import make_data

    unknown = [case for case in options.cases.split(",") if case not in CASES]
    if unknown:
        parser.error(f"--cases: unknown {unknown}; the cases are {', '.join(CASES)}")
    if options.repeats < 3:
        print(f"warning: --repeats {options.repeats}: a cell's median is of fewer than 3 runs", file=sys.stderr)
    make_data(512)
    lines = []
    for case in options.cases.split(","):
        runs = CASES[case][-1] + (("ours_base",) if options.baseline else ())
        results: dict[str, list[dict]] = {run: [] for run in runs}
        make_model(CASES[case][0])
        make_data(max(512, 2 * CASES[case][1]))
        for repeat in range(options.repeats):
            for run in (runs if repeat % 2 == 0 else runs[::-1]):  # alternated
                results[run].append(run_one(case, run, options.timeout, options.baseline))
                print(case, run, results[run][-1], flush=True)
        speed = {run: statistics.median(r["samples_per_second"] for r in rows) for run, rows in results.items()}
        pss = {run: max(r["peak_pss_mb"] for r in rows) for run, rows in results.items()}
        for run in runs:
            values = [r["samples_per_second"] for r in results[run]]
            every = ", ".join(f"{v:.1f}" for v in values)
            lines.append(f"| {case} | {run} | {speed[run]:.1f} | {every} | {spread(values):.0%} | {pss[run]:,.0f} | "
                         f"{speed[run] / speed['st']:.2f}x | {pss[run] / pss['st']:.2f}x |")
    import torch

    header = [f"# Side-by-side matrix vs sentence-transformers, CPU ({date.today()})", "",
              f"Command: `python benchmarks/bench_matrix.py {' '.join(sys.argv[1:])}`; {len(os.sched_getaffinity(0))} "
              f"cores; torch {torch.__version__}; each library at its own defaults (ours: auto workers and threads, "
              "exact pixels; sentence-transformers: no workers); samples/s timed after step 3 (gradcache: 2, 1), "
              "median of the alternated runs; peak PSS of the run's process tree.", "",
              "| case | run | samples/s (median) | all runs | spread | peak PSS (MB) | speed vs st | PSS vs st |",
              "|---|---|---|---|---|---|---|---|"]
    if options.baseline:
        commit = subprocess.run(["git", "-C", options.baseline, "log", "-1", "--format=%h %s"], capture_output=True,
                                text=True).stdout.strip()
        header[2] += f" ours_base: hf_mm_rerank from `{options.baseline}` ({commit or 'not a git checkout'})."
    if options.repeats < 3:
        header.insert(2, f"**Only {options.repeats} run(s) per cell: a slow or fast run weighs on the figure "
                         "(runs of one setting have differed by up to 38% on 2 cores). Use --repeats 3 or more.**\n")
    text = "\n".join(header + lines) + "\n"
    print(text)
    if options.output:
        Path(options.output).write_text(text)


if __name__ == "__main__":
    main()
