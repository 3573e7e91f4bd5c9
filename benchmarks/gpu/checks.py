"""The GPU plan's checks, one per call: ``python benchmarks/gpu/checks.py CHECK [--cpu]``.

CHECK is one of clip, gradcache, qlora, multivector, distributed (run.sh runs them in that order, each under its own
``timeout``). Within a check, the runs of hf_mm_rerank and sentence-transformers alternate in one process (the
order rotates each repeat; a fresh model and trainer per run, GPU peak memory reset before each), and repeats stop
once the check's budget would be overrun, so a slow device gives fewer repeats instead of a timeout. ``--cpu``: the
same runs in miniature (tiny models, 2-3 steps, float32) for the rehearsal and the test.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from common import Results, median, peak_memory_mb, release, reset_peak, training_args  # noqa: E402

WORKERS = max(1, min(15, (os.cpu_count() or 2) - 1))
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # the LM's linears

# Per check and mode: sizes and the soft budget (seconds) within which repeats are started (clip: alternated runs by
# `budget`, the ceilings by `ceiling_by`). run.sh's PLAN_gpu gives each check this budget as planned time and a hard
# timeout above it; with the install, the GPU budgets sum to 6 minutes.
PLANS = {
    "gpu": {
        "clip": dict(batch=1024, steps=3, warmup=1, images=4096, repeats=3, budget=60, ceiling_by=115),
        "gradcache": dict(batch=256, steps=2, warmup=1, images=1024, repeats=3, tokens=8192, st_mini=32,
                          max_pixels=256 * 32 * 32, big_batch=4096, budget=90),
        "qlora": dict(batch=64, steps=3, tokens=8192, max_pixels=256 * 32 * 32, budget=45),
        "multivector": dict(batch=32, steps=3, warmup=1, tokens=8192, page=(768, 1024), budget=35),
        "distributed": dict(batch=64, steps=3, configs=("fsdp", "deepspeed_zero2", "deepspeed_zero3"), budget=55),
    },
    "cpu": {
        "clip": dict(batch=8, steps=3, warmup=1, images=32, repeats=1, budget=25, ceiling_by=60),
        "gradcache": dict(batch=4, steps=2, warmup=1, images=8, repeats=1, tokens=256, st_mini=4, max_pixels=None,
                          big_batch=None, image=(64, 48), budget=25),
        "qlora": dict(batch=4, steps=2, tokens=256, max_pixels=None, image=(64, 48), budget=20),
        "multivector": dict(batch=4, steps=2, warmup=1, tokens=256, page=(96, 128), budget=15),
        "distributed": dict(batch=8, steps=2, configs=("fsdp", "deepspeed_zero2"), budget=60),
    },
}


# ----- runs --------------------------------------------------------------------------------------------------
def run_ours(model: str, data, plan: dict, *, loss, workers: int | None = None, cls=None, warmup: int | None = None,
             **load) -> dict:
    from transformers import TrainingArguments

    from hf_mm_rerank import BiEncoder, BiEncoderTrainer

    reset_peak()
    timer = common.StepTimer(plan.get("warmup", 1) if warmup is None else warmup)
    encoder = (cls or BiEncoder).from_pretrained(model, **load)
    extra = {} if workers is None else {"dataloader_num_workers": workers}
    trainer = BiEncoderTrainer(model=encoder, args=training_args(TrainingArguments, plan["batch"], plan["steps"], **extra),
                               train_dataset=data, loss=loss, callbacks=[timer.callback])
    trainer.train()
    result = {"samples_per_second": timer.rate(plan["batch"]) if timer.warmup < plan["steps"] else None,
              "peak_memory_mb": peak_memory_mb(), "losses": timer.losses,
              "param_dtype": str(next(encoder.parameters()).dtype)}
    del trainer, encoder
    release()
    return result


def run_st(folder: str, data, plan: dict, *, cached: bool, workers: int | None = None, lora: bool = False) -> dict:
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer
    from sentence_transformers import SentenceTransformerTrainingArguments as Arguments
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MultipleNegativesRankingLoss,
    )

    reset_peak()
    timer = common.StepTimer(plan.get("warmup", 1))
    st = SentenceTransformer(folder, device=common.device())
    if lora:
        from peft import LoraConfig, get_peft_model

        st[0].model = get_peft_model(st[0].model, LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS))
    loss = (CachedMultipleNegativesRankingLoss(st, scale=20.0, mini_batch_size=plan["st_mini"]) if cached
            else MultipleNegativesRankingLoss(st, scale=20.0))
    extra = {} if workers is None else {"dataloader_num_workers": workers}
    trainer = SentenceTransformerTrainer(model=st, args=training_args(Arguments, plan["batch"], plan["steps"], **extra),
                                         train_dataset=data.rename_columns({"query": "anchor"}), loss=loss,
                                         callbacks=[timer.callback])
    trainer.train()
    result = {"samples_per_second": timer.rate(plan["batch"]), "peak_memory_mb": peak_memory_mb(),
              "losses": timer.losses, "param_dtype": str(next(st.parameters()).dtype)}
    del trainer, st, loss
    release()
    return result


def alternate(results: Results, runs: dict, repeats: int, budget: float) -> dict[str, list[dict]]:
    """Runs each callable of ``runs`` ``repeats`` times, order rotated each repeat. A repeat starts only when the
    check's elapsed time plus the last repeat's duration stays within ``budget`` (the first always starts), so every
    run gets the same number of repeats and a slow device gives fewer of them instead of a timeout."""
    names, done, last = list(runs), {name: [] for name in runs}, 0.0
    for repeat in range(repeats):
        if repeat and results.elapsed() + last > budget:
            results.note(f"{repeat} repeat(s) of {', '.join(names)}: a repeat takes {last:.0f} s, "
                         f"{budget - results.elapsed():.0f} s of the {budget} s budget were left")
            break
        began = time.perf_counter()
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            start = time.perf_counter()
            try:
                row = runs[name]()
            except Exception as error:  # one failing run is a finding; the others still run
                row = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
            row = {"name": name, "repeat": repeat + 1, **row, "seconds": round(time.perf_counter() - start, 1)}
            done[name].append(row)
            results.add(row)
        last = time.perf_counter() - began
    return done


def summarise(done: dict[str, list[dict]], base: str) -> dict:
    speed = {name: median([r["samples_per_second"] for r in rows if r.get("samples_per_second")])
             for name, rows in done.items() if any(r.get("samples_per_second") for r in rows)}
    memory = {name: max(r["peak_memory_mb"] for r in rows if "peak_memory_mb" in r)
              for name, rows in done.items() if any("peak_memory_mb" in r for r in rows)}
    summary = {"median_samples_per_second": speed, "peak_memory_mb": memory,
               "repeats": {name: len(rows) for name, rows in done.items()}}
    if base in speed:
        summary["speed_vs_" + base] = {name: round(value / speed[base], 3) for name, value in speed.items()}
    return summary


def status_of(done: dict[str, list[dict]]) -> str:
    failed = [name for name, rows in done.items() if rows and all("error" in r for r in rows)]
    return "ok" if not failed else "failed: " + ", ".join(failed)


# ----- (a) CLIP ViT-B/32 on JPEGs ------------------------------------------------------------------------------
def ceiling(model: str, data, plan: dict, compiled: bool) -> dict:
    """Plain PyTorch on tensors processed once and already on the device: forward, InfoNCE, backward, AdamW; the
    median of 3 timed windows of ``steps`` steps after 2 warm-up steps (compiling happens there)."""
    import torch
    import torch.nn.functional as F
    from transformers import CLIPModel, CLIPProcessor

    dev, batch = common.device(), plan["batch"]
    reset_peak()
    net = CLIPModel.from_pretrained(model).to(dev).train()
    processor = CLIPProcessor.from_pretrained(model)
    rows = data[:batch]  # one batch (616 MB of float32 pixels at 1024 x 224 px: far beyond any cache)
    text = processor.tokenizer(rows["query"], padding=True, return_tensors="pt").to(dev)
    pixels = processor.image_processor(images=rows["positive"], return_tensors="pt")["pixel_values"].to(dev)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=dev == "cuda")

    def step(text, pixels):
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            q = F.normalize(net.get_text_features(**text).pooler_output.float(), dim=-1)
            d = F.normalize(net.get_image_features(pixel_values=pixels).pooler_output.float(), dim=-1)
        loss = F.cross_entropy(20.0 * q @ d.T, torch.arange(q.shape[0], device=dev))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    run = torch.compile(step) if compiled else step
    for _ in range(2):
        run(text, pixels)
    rates = []
    for _ in range(3):
        common.sync()
        start = time.perf_counter()
        for _ in range(plan["steps"]):
            run(text, pixels)
        common.sync()
        rates.append(plan["steps"] * batch / (time.perf_counter() - start))
    return {"samples_per_second": median(rates), "windows": rates, "peak_memory_mb": peak_memory_mb()}


def check_clip(mode: str, plan: dict) -> None:
    from hf_mm_rerank import BiEncoder, ContrastiveLoss

    results = Results("clip", mode, plan)
    model = common.clip_model(mode == "cpu")
    data = common.jpeg_dataset(plan["images"])
    folder = str(common.scratch() / f"st-clip-{mode}")  # the folder we save, as sentence-transformers reads it
    if not Path(folder, "modules.json").is_file():
        BiEncoder.from_pretrained(model).save_pretrained(folder)
    workers = 1 if mode == "cpu" else WORKERS
    runs = {"ours": lambda: run_ours(model, data, plan, loss=ContrastiveLoss(temperature=0.05)),
            "st": lambda: run_st(folder, data, plan, cached=False),
            f"st_w{workers}": lambda: run_st(folder, data, plan, cached=False, workers=workers)}
    done = alternate(results, runs, plan["repeats"], plan["budget"])
    for name, compiled, estimate in (("ceiling_eager", False, 15), ("ceiling_compiled", True, 60)):
        if mode == "cpu" and compiled:
            results.note("ceiling_compiled: not run on the CPU (compiling takes longer than the whole rehearsal)")
            continue
        if results.elapsed() + estimate > plan["ceiling_by"]:  # GUIDE 6 holds H200 ceiling figures already
            results.note(f"{name}: not run ({results.elapsed():.0f} s in, about {estimate} s more, limit "
                         f"{plan['ceiling_by']} s)")
            continue
        done.update(alternate(results, {name: lambda c=compiled: ceiling(model, data, plan, c)}, 1, plan["budget"]))
        release()
    results.finish(status_of(done), **summarise(done, "st"))


# ----- (b) Qwen3-VL-2B-sized embedder, LoRA + GradCache ----------------------------------------------------------
def check_gradcache(mode: str, plan: dict) -> None:
    from peft import LoraConfig

    from hf_mm_rerank import BiEncoder, CachedContrastiveLoss, Tokens

    results = Results("gradcache", mode, plan)
    model = common.qwen3_vl_model(mode == "cpu")
    data = common.jpeg_dataset(plan["images"], *plan.get("image", (640, 480)))
    folder = str(common.scratch() / f"st-qwen3-vl-{mode}")
    if not Path(folder, "modules.json").is_file():
        BiEncoder.from_pretrained(model, max_pixels=plan["max_pixels"]).save_pretrained(folder)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS)

    def ours(batch_plan=plan):
        return run_ours(model, data, batch_plan, loss=CachedContrastiveLoss(Tokens(plan["tokens"]), temperature=0.05),
                        lora_config=lora, max_pixels=plan["max_pixels"])

    runs = {"ours": ours, "st": lambda: run_st(folder, data, plan, cached=True, lora=True)}
    done = alternate(results, runs, plan["repeats"], plan["budget"])
    big = plan.get("big_batch")
    speed = summarise(done, "st")["median_samples_per_second"].get("ours")
    if big and speed:
        estimate = plan["steps"] * big / speed + 30  # two steps at the measured rate, plus loading and data
        if results.elapsed() + estimate <= plan["budget"]:
            data = common.jpeg_dataset(big * plan["steps"], *plan.get("image", (640, 480)))
            done.update(alternate(results, {f"ours_batch{big}": lambda: ours({**plan, "batch": big})}, 1, 1e9))
        else:
            results.note(f"batch {big} not run: about {estimate:.0f} s at the measured {speed:.0f} samples/s, "
                         f"{plan['budget'] - results.elapsed():.0f} s of the budget left")
    results.finish(status_of(done), **summarise(done, "st"))


# ----- (c) QLoRA 4-bit vs LoRA bf16 ----------------------------------------------------------------------------
def check_qlora(mode: str, plan: dict) -> None:
    import torch
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    from hf_mm_rerank import CachedContrastiveLoss, Tokens

    results = Results("qlora", mode, plan)
    model = common.qwen3_vl_model(mode == "cpu")
    data = common.jpeg_dataset(plan["batch"] * plan["steps"], *plan.get("image", (640, 480)))
    compute = torch.bfloat16 if mode == "gpu" else torch.float32
    four_bit = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS)

    def run(quantization):
        loss = CachedContrastiveLoss(Tokens(plan["tokens"]), temperature=0.05)
        return run_ours(model, data, plan, loss=loss, warmup=plan["steps"], lora_config=lora,
                        quantization_config=quantization, max_pixels=plan["max_pixels"])

    done = alternate(results, {"lora_bf16" if mode == "gpu" else "lora_fp32": lambda: run(None),
                               "qlora_4bit": lambda: run(four_bit)}, 1, plan["budget"])
    rows = {name: rows[0] for name, rows in done.items() if rows and "losses" in rows[0]}
    summary = {}
    if len(rows) == 2:
        full, quant = rows.values()
        first = [full["losses"][0], quant["losses"][0]]
        summary = {"peak_memory_mb": {n: r["peak_memory_mb"] for n, r in rows.items()},
                   "peak_memory_ratio_4bit": round(quant["peak_memory_mb"] / full["peak_memory_mb"], 3),
                   "first_losses": first, "first_loss_rel_diff": round(abs(first[1] - first[0]) / abs(first[0]), 4),
                   "losses_close": abs(first[1] - first[0]) / abs(first[0]) < 0.05}
    results.finish(status_of(done) if len(rows) == 2 else "failed", **summary)


# ----- (d) multi-vector encoder at 768 visual tokens -------------------------------------------------------------
def check_multivector(mode: str, plan: dict) -> None:
    from peft import LoraConfig

    from hf_mm_rerank import MaxSimContrastiveLoss, MultiVectorEncoder, Tokens

    results = Results("multivector", mode, plan)
    model = common.qwen3_vl_model(mode == "cpu")
    width, height = plan["page"]
    data = common.jpeg_dataset(plan["batch"] * plan["steps"], width, height)
    max_pixels = width * height
    from transformers import AutoProcessor

    grid = AutoProcessor.from_pretrained(model).image_processor(images=[data[0]["positive"]], max_pixels=max_pixels,
                                                                return_tensors="pt")["image_grid_thw"][0]
    tokens = int(grid.prod()) // 4  # merge 2 x 2
    lora = LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS)
    done = alternate(results, {"ours": lambda: run_ours(
        model, data, plan, cls=MultiVectorEncoder, loss=MaxSimContrastiveLoss(mini_batch_size=Tokens(plan["tokens"])),
        lora_config=lora, max_pixels=max_pixels)}, 1, plan["budget"])
    import sentence_transformers

    has = hasattr(sentence_transformers, "MultiVectorEncoder")
    results.note(f"sentence-transformers {sentence_transformers.__version__}: no side-by-side run in this plan (its "
                 f"MultiVectorEncoder {'exists' if has else 'does not exist'} there; loading our Qwen3-VL folder into it "
                 "is not wired yet)")
    results.finish(status_of(done), visual_tokens_per_page=tokens, **summarise(done, "ours"))


# ----- (e) FSDP2 and DeepSpeed ZeRO through accelerate launch, 1 process -----------------------------------------
def check_distributed(mode: str, plan: dict) -> None:
    results = Results("distributed", mode, plan)
    model = common.clip_model(mode == "cpu")
    common.jpeg_dataset(plan["batch"] * plan["steps"])
    worker = Path(__file__).resolve().parent / "dist_worker.py"
    for name in plan["configs"]:
        if name.startswith("deepspeed"):
            try:
                import deepspeed  # noqa: F401
            except Exception as error:
                results.add({"name": name, "error": f"deepspeed not importable: {type(error).__name__}: {error}"})
                continue
        config = common.ROOT / "recipes" / "accelerate" / f"{name}.yaml"
        report = common.scratch() / f"dist-{name}.json"
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                   "--num_processes", "1", "--main_process_port", str(29500 + len(results.data["runs"]))]
        if mode == "cpu":
            command += ["--mixed_precision", "no"]
        command += [str(worker), "--model", model, "--images", str(plan["batch"] * plan["steps"]), "--batch",
                    str(plan["batch"]), "--steps", str(plan["steps"]), "--report", str(report)]
        start, left = time.perf_counter(), plan["budget"] * 1.3 - results.elapsed()
        if left < 20:
            results.add({"name": name, "error": f"not run: {left:.0f} s left of the check's budget"})
            continue
        results.add({"name": name, **launch(command, left), "seconds": round(time.perf_counter() - start, 1)})
        row = results.data["runs"][-1]
        if mode == "cpu" and name == "fsdp" and not row.get("wrapped_ok"):
            results.note(f"fsdp on the CPU: accelerate gave {row.get('distributed_type')} and "
                         f"{row.get('wrapped_type')} (GUIDE 5: no FSDP without CUDA there); the GPU run is the check")
    results.note("one GPU cannot show: sharding (world size 1 holds every shard), the collectives' cost, "
                 "cross-rank negatives, or the saved state dict gathered from several ranks")
    rows = results.data["runs"]
    ok = [r["name"] for r in rows if r.get("wrapped_ok") and r.get("steps_done", 0) >= plan["steps"]]
    results.finish("ok" if len(ok) == len(rows) else "partial" if ok else "failed", wrapped_and_stepped=ok)


def launch(command: list[str], limit: float) -> dict:
    """Runs ``accelerate launch`` in a session of its own: torchrun's worker runs in yet another one, so a timeout
    kills the launcher's group and the worker by the pid it wrote (never left holding the GPU for the next check)."""
    import json
    import signal

    report = Path(command[command.index("--report") + 1])
    pid_file = report.with_suffix(".pid")
    report.unlink(missing_ok=True)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        for pid in ([int(pid_file.read_text())] if pid_file.is_file() else []):
            try:
                os.kill(pid, signal.SIGKILL)
            except (OSError, ValueError):
                pass
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        sys.stdout.write(output[-4000:])
        return {"error": f"timed out after {limit:.0f} s"}
    sys.stdout.write(output[-4000:] if process.returncode else "")
    if report.is_file():
        return json.loads(report.read_text())
    return {"error": f"exit {process.returncode}: {output[-600:]}"}


CHECKS = {"clip": check_clip, "gradcache": check_gradcache, "qlora": check_qlora, "multivector": check_multivector,
          "distributed": check_distributed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checks", nargs="+", choices=list(CHECKS), metavar="CHECK",
                        help=f"one or more of {', '.join(CHECKS)} (run.sh: one per process on the GPU, all in one "
                        "process for the CPU miniature, which saves four start-ups)")
    parser.add_argument("--cpu", action="store_true", help="the miniature: tiny models on the CPU")
    options = parser.parse_args()
    mode = "cpu" if options.cpu else "gpu"
    if mode == "gpu" and not common.gpu():
        sys.exit("no CUDA device: run with --cpu for the miniature")
    for check in options.checks:
        try:
            CHECKS[check](mode, PLANS[mode][check])
        except Exception as error:  # the check's JSON says 'running'; say why, and go on to the next check
            Results.line(f"- **{check}: crashed**: {type(error).__name__}: {str(error)[:300]}")
            import traceback

            traceback.print_exc()
            if len(options.checks) == 1:
                raise


if __name__ == "__main__":
    main()
