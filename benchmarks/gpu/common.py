"""Shared parts of the GPU plan's checks: the models (real architectures' configs written in code, random weights,
since nothing can be fetched on the device), the generated JPEG data, a step timer, and the result writers.

Every figure a check measures goes to ``$OUT/<check>.json`` (rewritten after each run, so a check stopped by its
timeout keeps what it finished) and one line per run to ``$OUT/results.md``. The device returns at most 8 files
from ``$OUT``: env.json, the five check files, results.md and run.log; scratch (models, JPEGs, trainer output) goes
under ``$SCRATCH``.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))  # tiny_models: the byte-level tokenizers and the tiny configs

QWEN3_VL_2B_VOCAB = 151_936  # Qwen3-VL-2B's embedding rows (the byte tokenizer uses the first few hundred)


def scratch() -> Path:
    path = Path(os.environ.get("SCRATCH", "/tmp/hf-mm-rerank-gpu"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def device() -> str:
    return "cuda" if gpu() else "cpu"


# ----- models ----------------------------------------------------------------------------------------------
def clip_model(cpu: bool) -> str:
    """CLIP ViT-B/32 shapes (151M parameters: text 512 x 12 layers, vocab 49,408; vision 768 x 12 layers, 224 px,
    patch 32; projection 512); ``cpu``: the tests' tiny CLIP (2 layers, 32 px)."""
    import tiny_models

    path = scratch() / ("clip-tiny" if cpu else "clip-vit-b32")
    if (path / "config.json").is_file():
        return str(path)
    if cpu:
        return str(tiny_models.make_clip(path))
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(0)
    tok = tiny_models.byte_tokenizer(["<|startoftext|>", "<|endoftext|>"], "<|startoftext|> $A <|endoftext|>",
                                     bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    config = CLIPConfig(text_config=dict(vocab_size=49_408, hidden_size=512, intermediate_size=2048,
                                         num_hidden_layers=12, num_attention_heads=8, max_position_embeddings=77,
                                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                                         pad_token_id=tok.pad_token_id),
                        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                           num_attention_heads=12, image_size=224, patch_size=32),
                        projection_dim=512)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tok)
    return str(tiny_models._save(CLIPModel(config), processor, path))


# Qwen3-VL-2B's text and vision sizes, and the miniature's (the same construction path, so the rehearsal runs it).
QWEN3_VL_SIZES = {
    "full": dict(text=dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                           num_key_value_heads=8, head_dim=128, rope_theta=5e6, mrope_section=[24, 20, 20]),
                 vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048,
                             num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17])),
    "tiny": dict(text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, rope_theta=1e4, mrope_section=[2, 3, 3]),
                 vision=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=64,
                             num_position_embeddings=64, deepstack_visual_indexes=[1])),
}


def qwen3_vl_model(cpu: bool) -> str:
    """Qwen3-VL-2B shapes (2.13B parameters: text 2048 x 28 layers, GQA 16/8, head 128, vocab 151,936, tied; vision
    1024 x 24 layers, patch 16, merge 2, deepstack 5/11/17), random bf16 weights built on the GPU; ``cpu``: hidden 64,
    2 layers, the byte tokenizer's vocabulary, float32, a 16,384-pixel cap."""
    import tiny_models
    import torch
    from transformers import Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    path = scratch() / ("qwen3-vl-tiny" if cpu else "qwen3-vl-2b")
    if (path / "config.json").is_file():
        return str(path)
    sizes = QWEN3_VL_SIZES["tiny" if cpu else "full"]
    tok = tiny_models._qwen_tokenizer()
    text = {k: v for k, v in sizes["text"].items() if k not in ("rope_theta", "mrope_section")}
    text.update(vocab_size=len(tok) if cpu else QWEN3_VL_2B_VOCAB, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": sizes["text"]["rope_theta"],
                                 "mrope_section": sizes["text"]["mrope_section"], "mrope_interleaved": True})
    vision = dict(sizes["vision"], patch_size=16, spatial_merge_size=2, temporal_patch_size=2)
    config = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True,
                           **tiny_models._special_ids(tok))
    pixels = dict(min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 16) if cpu else {}
    processor = Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(patch_size=16, image_mean=[0.5] * 3,
                                                                       image_std=[0.5] * 3, **pixels),
                                 tokenizer=tok, video_processor=Qwen3VLVideoProcessor(),
                                 chat_template=tiny_models.QWEN_CHAT_TEMPLATE)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32 if cpu else torch.bfloat16)
    try:
        with torch.device("cpu" if cpu else "cuda"):  # 2B parameters initialised on the GPU: seconds, not a minute
            model = Qwen3VLForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    saved = tiny_models._save(model, processor, path)
    del model
    release()
    return str(saved)


# ----- data ------------------------------------------------------------------------------------------------
def _jpeg(args: tuple[int, int, int, str]) -> str:
    import numpy as np
    from PIL import Image

    index, width, height, folder = args
    rng = np.random.default_rng(index)
    small = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    path = os.path.join(folder, f"{index:06d}.jpg")
    Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC).save(path, "JPEG", quality=90)
    return path


def jpeg_dataset(count: int, width: int = 640, height: int = 480):
    """``count`` JPEG files (smooth random colour fields, quality 90) written with PIL into a scratch folder, as a
    ``datasets.Dataset`` of (query caption, positive image path) decoded by the datasets Image feature."""
    from multiprocessing import Pool

    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    folder = scratch() / f"jpeg-{width}x{height}"
    folder.mkdir(exist_ok=True)
    missing = [(i, width, height, str(folder)) for i in range(count) if not (folder / f"{i:06d}.jpg").is_file()]
    if missing:
        with Pool(max(1, min(16, (os.cpu_count() or 2) - 1))) as pool:
            pool.map(_jpeg, missing, chunksize=64)
    paths = [str(folder / f"{i:06d}.jpg") for i in range(count)]
    captions = [f"photo number {i} with colours {i % 97} {i % 89} {i % 83}" for i in range(count)]
    features = Features({"query": Value("string"), "positive": ImageFeature()})
    return Dataset.from_dict({"query": captions, "positive": paths}, features=features)


# ----- timing and memory -----------------------------------------------------------------------------------
def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepTimer:
    """Trainer callback: wall time from the end of step ``warmup`` to the end of the last step, and the losses."""

    def __init__(self, warmup: int) -> None:
        from transformers import TrainerCallback

        timer = self

        class _Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                timer.tick(state.global_step)

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    timer.losses.append(float(logs["loss"]))

        self.callback = _Callback()
        self.warmup, self.start, self.end, self.steps, self.losses = warmup, None, None, 0, []

    def tick(self, step: int) -> None:
        sync()
        if step == self.warmup:
            self.start = time.perf_counter()
        elif step > self.warmup:
            self.end, self.steps = time.perf_counter(), step - self.warmup

    def rate(self, batch: int) -> float:
        if self.start is None or self.end is None:
            raise RuntimeError("the timer saw no step after the warm-up: raise the step count")
        return self.steps * batch / (self.end - self.start)


def reset_peak() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mb() -> float:
    """GPU: torch.cuda.max_memory_allocated since the last reset_peak(). CPU: the process's peak RSS (a high-water
    mark over the whole process, so only the first run of a process is comparable: the CPU rehearsal's figure
    proves the field is written, not a memory comparison)."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def release() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def training_args(cls, batch: int, steps: int, **extra):
    """The same TrainingArguments values for every run (ours: plain TrainingArguments; sentence-transformers: its
    subclass): bf16 on the GPU, float32 on the CPU, no saving, no logging output beyond the losses."""
    settings = dict(output_dir=str(scratch() / "trainer-out"), per_device_train_batch_size=batch, max_steps=steps,
                    learning_rate=1e-4, report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
                    use_cpu=not gpu(), bf16=gpu(), dataloader_drop_last=True)
    settings.update(extra)
    return cls(**settings)


# ----- results ---------------------------------------------------------------------------------------------
def out_dir() -> Path:
    path = Path(os.environ.get("OUT") or "gpu-out")
    path.mkdir(parents=True, exist_ok=True)
    return path


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({len(os.sched_getaffinity(0))} cores)"


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "peft", "accelerate", "sentence-transformers", "datasets", "bitsandbytes",
                 "deepspeed", "hf_mm_rerank", "pyarrow", "huggingface_hub"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    import transformers  # the version actually imported (the carried wheel in /tmp/site on the device)

    found["transformers_imported"] = transformers.__version__
    return found


class Results:
    """``$OUT/<check>.json``: {"check", "device", "mode", "versions", "status", "runs": [...], "summary": {...}};
    written again after every run and line appended to ``$OUT/results.md``."""

    def __init__(self, check: str, mode: str, plan: dict) -> None:
        self.path = out_dir() / f"{check}.json"
        self.data = {"check": check, "device": machine(), "mode": mode, "versions": versions(), "plan": plan,
                     "status": "running", "runs": [], "summary": {}, "notes": []}
        self.started = time.perf_counter()
        self.write()

    def add(self, run: dict) -> None:
        self.data["runs"].append(run)
        self.write()
        fields = ", ".join(f"{k} {_fmt(v)}" for k, v in run.items() if k != "name")
        self.line(f"- {self.data['check']} / {run.get('name', '?')}: {fields}")

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        self.write()
        self.line(f"- {self.data['check']}: note: {text}")

    def finish(self, status: str = "ok", **summary) -> None:
        self.data["status"] = status
        self.data["summary"].update(summary)
        self.data["seconds"] = round(time.perf_counter() - self.started, 1)
        self.write()
        fields = ", ".join(f"{k} {_fmt(v)}" for k, v in summary.items())
        self.line(f"- **{self.data['check']}: {status}** ({self.data['seconds']} s){': ' + fields if fields else ''}")

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def write(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=1, default=str))

    @staticmethod
    def line(text: str) -> None:
        with open(out_dir() / "results.md", "a") as handle:
            handle.write(text + "\n")
        print(text, flush=True)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + "; ".join(f"{k} {_fmt(v)}" for k, v in value.items()) + "}"
    return str(value)


def median(values: list[float]) -> float:
    import statistics

    return statistics.median(values)
