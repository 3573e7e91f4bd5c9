"""Duplicates in contrastive batches and a two-source mixture, on the embedded demo (offline, CPU).

    nice -n 10 .venv/bin/python benchmarks/bench_mixtures.py [--seeds 3] [--steps N] [--out benchmarks/results/<f>.md]
    .venv/bin/python benchmarks/bench_mixtures.py --quick      # smoke test (tiny, under a minute, writes nothing)

Model: the demo's base (``build_demo_base``: pretrained MiniLM text tower + small random ViT), LoRA as
``recipes/configs/demo.yaml`` (r 16, alpha 32, vision tower and both projections trained fully, temperature 0.05,
symmetric loss, weight decay 0.01), global batch 256 with ``CachedContrastiveLoss`` (GradCache, mini-batches of 64),
the same number of optimizer steps in every run. The learning rate is not the demo's (1e-3, cosine): in pilots on seed 0
(run 1), 2e-3 cosine and 5e-3 / 1e-2 constant collapsed within 8 steps to a uniform softmax (loss ln 256 = 5.545,
ndcg@10 at chance); of 1e-3 cosine, 5e-4 cosine and 3e-4 constant, 3e-4 constant had the lowest training loss after
12 steps (chosen on the training loss, not on the held-out metric).

Data (the demo's glyphs; the demo's train/test split, ``emoji_splits``):

- ``captions``: every training glyph three times, with three honest captions: its lower-cased Unicode name; its
  words in another order (the last word first: "face, sneezing"; a one-word name gets "cyclone emoji"); its
  Unicode block with the rarest word of its name ("an emoticons symbol: sneezing"). The same image is the
  positive of three rows, so uniformly shuffled batches of 256 hold copies of a row's positive among its negatives.
- ``keywords`` (second source, text to image): every training glyph once, its query the first word of its name
  ("face", "clock", "smiling", ...). A keyword names several glyphs, so rows share queries (a query whose other
  positives sit in the batch): the other kind of false negative. Text to image rather than text to text: it keeps the
  held-out task and trains both towers; text pairs (name / reordered name) would not reach the vision tower at all,
  and the text tower is already a pretrained sentence embedder.
- held out: the demo's test split; queries its Unicode names, corpus its images (``RetrievalEvaluator.from_dataset``).

Runs (each seed: the LoRA initialisation, the batch order and dropout):

1. captions, plain sampling (Trainer's shuffle), masking off (``mask_duplicates=False``);
1b. captions, plain sampling, masking on (the library's default when batches carry content ids);
2. captions, ``Mixing(no_duplicates=True)``, masking off;
3. captions, ``no_duplicates`` + masking (default) -- also run (4), "one dataset";
5. captions + keywords, ``Mixing(strategy="proportional", no_duplicates=True)`` + masking.

Per run: held-out ndcg@10 after training; from every training batch's ``content_ids`` (recorded in
``compute_loss``): the rows whose positive is another row's positive ("false-negative rows"), the rows whose query is
another row's query, and the (row, candidate) pairs the content rule relates (what masking would take out of the
query-to-document softmax; the symmetric loss masks as many again in the document-to-query one); the loss's
``last_masked`` summed over steps and the logged ``masked_negatives`` / ``deferred_rows``; train time.

Torch runs one thread by default here (``--threads``): on the 2 shared cores this was written on, two intra-op threads
made a forward pass 7-8 times slower than one whenever another job held a core.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import unicodedata
from collections import Counter
from datetime import date
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

# The Unicode blocks the demo's glyphs come from (Unicode's Blocks.txt; ``unicodedata`` does not carry blocks).
BLOCKS = [
    (0x2600, 0x26FF, "Miscellaneous Symbols"), (0x2700, 0x27BF, "Dingbats"),
    (0x1F300, 0x1F5FF, "Miscellaneous Symbols and Pictographs"), (0x1F600, 0x1F64F, "Emoticons"),
    (0x1F650, 0x1F67F, "Ornamental Dingbats"), (0x1F680, 0x1F6FF, "Transport and Map Symbols"),
    (0x1F700, 0x1F77F, "Alchemical Symbols"), (0x1F780, 0x1F7FF, "Geometric Shapes Extended"),
    (0x1F800, 0x1F8FF, "Supplemental Arrows-C"), (0x1F900, 0x1F9FF, "Supplemental Symbols and Pictographs"),
    (0x1FA00, 0x1FA6F, "Chess Symbols"), (0x1FA70, 0x1FAFF, "Symbols and Pictographs Extended-A"),
]
STOPWORDS = {"with", "of", "and", "the", "a", "for", "in", "on", "to", "or", "at", "from", "without"}

# name: (sources, no_duplicates, mask_duplicates)
RUNS = {
    "1 plain": (("captions",), False, False),
    "1b plain + masking": (("captions",), False, True),
    "2 no_duplicates": (("captions",), True, False),
    "3 no_duplicates + masking (= 4 one dataset)": (("captions",), True, True),
    "5 mixture (captions + keywords)": (("captions", "keywords"), True, True),
}
DIFFERENCES = [  # (label, run, minus run)
    ("(2) - (1): no_duplicates vs plain", "2 no_duplicates", "1 plain"),
    ("(3) - (2): + masking, on deduplicated batches", "3 no_duplicates + masking (= 4 one dataset)", "2 no_duplicates"),
    ("(1b) - (1): masking on plain batches", "1b plain + masking", "1 plain"),
    ("(3) - (1): no_duplicates + masking vs plain", "3 no_duplicates + masking (= 4 one dataset)", "1 plain"),
    ("(5) - (4): two-source mixture vs one dataset", "5 mixture (captions + keywords)",
     "3 no_duplicates + masking (= 4 one dataset)"),
]


def block_of(name: str) -> str:
    code = ord(unicodedata.lookup(name.upper()))
    return next((block for start, stop, block in BLOCKS if start <= code <= stop), "Unicode")


def captions_of(name: str, rarity: Counter) -> list[str]:
    """Three different honest captions of a glyph named ``name`` (lower-cased Unicode name)."""
    words = name.split()
    reordered = f"{words[-1]}, {' '.join(words[:-1])}" if len(words) > 1 else f"{name} emoji"
    content = [w for w in words if w not in STOPWORDS] or words
    rarest = min(reversed(content), key=lambda w: rarity[w])  # (ties: the later word, usually the noun)
    block = block_of(name).lower()
    article = "an" if block[0] in "aeiou" else "a"
    captions = [name, reordered, f"{article} {block} symbol: {rarest}"]
    assert len(set(captions)) == 3, captions
    return captions


def build_data(limit: int | None):
    """(captions, keywords, held_out, facts): ``datasets.Dataset``s of (query, positive image) rows."""
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    from hf_mm_rerank.recipes_kit.demo import emoji_splits

    train, test = emoji_splits()
    if limit:
        train, test = train.select(range(min(limit, len(train)))), test.select(range(min(limit // 2, len(test))))
    names = list(train["query"])
    images = list(train.cast_column("positive", ImageFeature(decode=False))["positive"])  # PNG bytes, as stored
    rarity = Counter(w for n in names + list(test["query"]) for w in set(n.split()))
    features = Features({"query": Value("string"), "positive": ImageFeature()})
    rows = [(c, image) for name, image in zip(names, images) for c in captions_of(name, rarity)]
    captions = Dataset.from_dict({"query": [q for q, _ in rows], "positive": [i for _, i in rows]}, features=features)
    keywords = Dataset.from_dict({"query": [n.split()[0] for n in names], "positive": list(images)}, features=features)
    caption_count = Counter(q for q, _ in rows)
    keyword_count = Counter(n.split()[0] for n in names)
    facts = {
        "train_glyphs": len(names), "held_out_glyphs": len(test),
        "captions_rows": len(captions), "keywords_rows": len(keywords),
        "captions_distinct_queries": len(caption_count),
        "captions_queries_shared_by_glyphs": sum(1 for c in caption_count.values() if c > 1),
        "keywords_distinct_queries": len(keyword_count),
        "keywords_most_common": keyword_count.most_common(8),
        "examples": [captions_of(n, rarity) + [n.split()[0]] for n in [n for n in names if len(n.split()) > 1][::97][:6]],
    }
    return captions, keywords, test, facts


def batch_stats(ids: dict) -> dict[str, int]:
    """False negatives of one global batch, from its content ids (rows without hard negatives)."""
    import torch

    query, positive = ids["query"].long(), ids["positive"].long()
    rows = query.shape[0]
    same_positive = positive[:, None] == positive[None]
    same_query = query[:, None] == query[None]
    off_diagonal = ~torch.eye(rows, dtype=torch.bool)
    related = (same_positive | same_query) & off_diagonal  # what the content rule masks, query -> document
    return {"rows": rows,
            "fn_rows": int((same_positive & off_diagonal).any(1).sum()),  # positive = another row's positive
            "shared_query_rows": int((same_query & off_diagonal).any(1).sum()),
            "fn_pairs": int(related.sum())}


def make_trainer_class():
    from hf_mm_rerank import BiEncoderTrainer

    class RecordingTrainer(BiEncoderTrainer):
        """Records every training batch's false negatives (from ``batch["content_ids"]``), its source, the loss's
        ``last_masked`` and the sampler's running ``deferred`` count."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            record = batch_stats(inputs["content_ids"]) if model.training else None
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if record is not None:
                record["source"] = inputs.get("source", "captions")
                record["loss_masked"] = int(self.loss.last_masked or 0)
                sampler = self._source_sampler
                record["deferred_so_far"] = None if sampler is None else int(sampler.deferred)
                self.batch_records.append(record)
            return out

    return RecordingTrainer


def train_once(config: tuple, seed: int, base: str, data: dict, evaluator, options, workdir: str) -> dict:
    import torch
    from peft import LoraConfig
    from transformers import TrainingArguments, set_seed

    from hf_mm_rerank import BiEncoder, CachedContrastiveLoss, Mixing

    sources, no_duplicates, mask = config
    set_seed(seed)  # before the model: LoRA is initialised from the global RNG (as the recipe)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05,
                      modules_to_save=["vision_model", "visual_projection", "text_projection"])
    model = BiEncoder.from_pretrained(base, lora_config=lora)
    loss = CachedContrastiveLoss(options.mini_batch, temperature=0.05, symmetric=True, mask_duplicates=mask)
    args = TrainingArguments(
        output_dir=workdir, per_device_train_batch_size=options.batch, max_steps=options.steps,
        learning_rate=options.lr, warmup_steps=options.warmup, lr_scheduler_type=options.schedule, weight_decay=0.01,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", seed=seed, use_cpu=True,
        disable_tqdm=True, dataloader_num_workers=options.workers)
    train = {name: data[name] for name in sources} if len(sources) > 1 else data[sources[0]]
    mixing = Mixing(strategy="proportional", no_duplicates=True) if no_duplicates else None
    trainer = make_trainer_class()(model=model, args=args, train_dataset=train, loss=loss, evaluator=evaluator,
                                   mixing=mixing)
    trainer.batch_records = []
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    after = {k.removeprefix("eval_"): v for k, v in trainer.evaluate().items() if k.startswith("eval_")}
    eval_s = time.perf_counter() - start
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    records = trainer.batch_records
    deferred_logged = [entry["deferred_rows"] for entry in logs if "deferred_rows" in entry]
    result = {
        "seed": seed, "steps": trainer.state.global_step, "train_s": round(train_s, 1), "eval_s": round(eval_s, 1),
        "ndcg@10": after.get("ndcg@10"), "after": after,
        "batches": len(records),
        "batches_by_source": dict(Counter(r["source"] for r in records)),
        "fn_rows_per_batch": statistics.fmean(r["fn_rows"] for r in records),
        "fn_rows_max": max(r["fn_rows"] for r in records),
        "shared_query_rows_per_batch": statistics.fmean(r["shared_query_rows"] for r in records),
        "fn_pairs_per_batch": statistics.fmean(r["fn_pairs"] for r in records),
        "loss_masked_per_batch": statistics.fmean(r["loss_masked"] for r in records),
        "masked_negatives_logged": sum(entry.get("masked_negatives", 0) for entry in logs),
        "deferred_rows_logged": _deferred_total(deferred_logged),
        "deferred_rows_logged_per_step": deferred_logged,
        "first_loss": logs[0]["loss"] if logs else None, "last_loss": logs[-1]["loss"] if logs else None,
        "per_batch": [{k: r[k] for k in ("source", "fn_rows", "shared_query_rows", "fn_pairs", "loss_masked")}
                      for r in records],
    }
    if no_duplicates:  # the sampler again, for exactly the batches trained (the logged count includes prefetched ones)
        from hf_mm_rerank.data.sampling import SourceBatchSampler

        replay = SourceBatchSampler(trainer.train_dataset, options.batch, 1, mixing="proportional", no_duplicates=True,
                                    seed=seed)
        trainer.train_dataset.set_epoch(0)
        batches = iter(replay)
        for _ in range(min(len(records), replay.steps())):
            next(batches)
        result["deferred_rows_trained"] = replay.deferred if len(records) <= replay.steps() else None
    del trainer, model
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return result


def _deferred_total(values: list[int]) -> int | None:
    """The sampler's count runs per epoch (it restarts at 0 with each epoch): the sum of each epoch's last value."""
    if not values:
        return None
    total, previous = 0, 0
    for value in values:
        if value < previous:
            total += previous
        previous = value
    return total + previous


def spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.4f}"
    return f"{mean:.4f} ± {statistics.stdev(values):.4f}"


def versions() -> str:
    import accelerate
    import datasets
    import peft
    import torch
    import transformers

    return (f"Python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"peft {peft.__version__}, accelerate {accelerate.__version__}, datasets {datasets.__version__}")


def code_version() -> str:
    """The checkout's commit, and whether the package had uncommitted changes."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "hf_mm_rerank"], cwd=root, capture_output=True,
                               text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    return f"commit {head}" + (" with uncommitted changes in hf_mm_rerank/" if dirty else "")


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return f"{os.cpu_count()} CPU cores ({cpu}), no GPU; run under nice -n 10 beside other jobs"


def chance_ndcg(documents: int, k: int = 10) -> float:
    """Expected ndcg@k of a random ranking when each query has one relevant document among ``documents``."""
    return sum(1 / math.log2(i + 2) for i in range(min(k, documents))) / documents


def report(results: dict, facts: dict, before: dict, options, command: str, wall_s: float, started: date) -> str:
    seeds = options.seed_list
    lines = [
        f"# Duplicates in contrastive batches and a two-source mixture, CPU ({started.isoformat()})", "",
        f"Command: `{command}` ({wall_s / 60:.1f} min wall in all).", "",
        f"Machine: {machine()}. {versions()}. Code: {options.code}.", "",
        "Model: the embedded demo's base (pretrained MiniLM text tower + small random ViT, `build_demo_base`), LoRA "
        "r 16 / alpha 32 on the text tower, vision tower and projections trained fully (as `recipes/configs/demo.yaml`"
        f"), temperature 0.05, symmetric loss; global batch {options.batch} with `CachedContrastiveLoss(mini_batch_size="
        f"{options.mini_batch})`, {options.steps} optimizer steps per run (learning rate {options.lr}, "
        f"{options.schedule} schedule, {options.warmup} warm-up steps, torch threads {options.threads}), seeds {', '.join(map(str, seeds))}.", "",
        f"Data: {facts['train_glyphs']} training glyphs of the demo's split. `captions`: {facts['captions_rows']} rows "
        f"(3 per glyph: the Unicode name; its words with the last one first; its Unicode block with the rarest word of "
        f"the name), {facts['captions_distinct_queries']} distinct captions ({facts['captions_queries_shared_by_glyphs']}"
        f" shared by more than one glyph). `keywords` (second source, text to image): {facts['keywords_rows']} rows, the first "
        f"word of each name as the query ({facts['keywords_distinct_queries']} distinct; most common "
        f"{', '.join(f'{w} x{c}' for w, c in facts['keywords_most_common'][:5])}). Held out: "
        f"{facts['held_out_glyphs']} glyphs of the demo's test split, queries = Unicode names, corpus = their images.",
        "", "Examples (name / reordered / block / keyword): " + "; ".join(
            " / ".join(f"\"{c}\"" for c in example) for example in facts["examples"][:4]) + ".", "",
        f"Held-out ndcg@10 before training: {before.get('ndcg@10', float('nan')):.4f} (the base model; LoRA starts at "
        f"zero, so it is the same for every seed); a random ranking scores {chance_ndcg(facts['held_out_glyphs']):.4f} "
        "on average (one relevant image per query).", "",
        "## Runs (mean ± sample standard deviation over seeds)", "",
        "| run | ndcg@10 after | per seed | false-negative rows / batch | shared-query rows / batch "
        "| related pairs / batch | masked by the loss / batch | deferred rows | train s / run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, per_seed in results.items():
        ndcg = [r["ndcg@10"] for r in per_seed]
        deferred = [f"{r['deferred_rows_logged']} ({r.get('deferred_rows_trained')})" for r in per_seed]
        lines.append(
            f"| {name} | {spread(ndcg)} | {', '.join(f'{v:.4f}' for v in ndcg)} "
            f"| {statistics.fmean(r['fn_rows_per_batch'] for r in per_seed):.1f} "
            f"(max {max(r['fn_rows_max'] for r in per_seed)}) "
            f"| {statistics.fmean(r['shared_query_rows_per_batch'] for r in per_seed):.1f} "
            f"| {statistics.fmean(r['fn_pairs_per_batch'] for r in per_seed):.1f} "
            f"| {statistics.fmean(r['loss_masked_per_batch'] for r in per_seed):.1f} "
            f"| {'-' if per_seed[0]['deferred_rows_logged'] is None else ', '.join(deferred)} "
            f"| {statistics.fmean(r['train_s'] for r in per_seed):.0f} |")
    lines += ["", "## Differences in held-out ndcg@10, per seed (same seed: same LoRA initialisation)", "",
              "| difference | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
              "|---|" + "---|" * (len(seeds) + 1)]
    for label, a, b in DIFFERENCES:
        if a in results and b in results:
            diffs = [x["ndcg@10"] - y["ndcg@10"] for x, y in zip(results[a], results[b])]
            lines.append(f"| {label} | " + " | ".join(f"{d:+.4f}" for d in diffs) + f" | {statistics.fmean(diffs):+.4f} |")
    spreads = [statistics.stdev(r["ndcg@10"] for r in per_seed) for per_seed in results.values() if len(per_seed) > 1]
    if spreads:
        lines += ["", f"Seed-to-seed standard deviation of ndcg@10 within one run: {min(spreads):.4f} to {max(spreads):.4f}."]
    logged = sum(r["masked_negatives_logged"] for per_seed in results.values() for r in per_seed)
    counted = sum(r["loss_masked_per_batch"] * r["batches"] for per_seed in results.values() for r in per_seed)
    lines += ["", f"Check: the logged `masked_negatives`, summed over every step of every run, is {logged:,}; the loss's "
              f"`last_masked` recorded at each step sums to {counted:,.0f}."]
    lines += ["", "Columns: *false-negative rows*: rows of a global batch whose positive image is another row's "
              "positive; *shared-query rows*: rows whose query is another row's; *related pairs*: (row, other row) "
              "pairs sharing the positive or the query, i.e. what the content rule takes out of the query-to-document "
              "softmax (the symmetric loss masks as many again document-to-query); *masked by the loss*: its "
              "`last_masked` per step (the logged `masked_negatives` summed equals it times the steps); *deferred "
              "rows*: per seed, the sampler's `deferred_rows` as logged at the last step (in brackets: the same sampler "
              "replayed for exactly the batches trained; the logged count runs ahead by the batches the DataLoader "
              "prefetched; `-`: no no-duplicates sampler). Counted from `batch[\"content_ids\"]` in `compute_loss`, every step of every run.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0, 1, 2, ...)")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per run")
    parser.add_argument("--batch", type=int, default=256, help="global batch (one process)")
    parser.add_argument("--mini-batch", type=int, default=64, help="GradCache mini-batch")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--schedule", default="constant", help="lr_scheduler_type")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: see the module doc)")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers")
    parser.add_argument("--runs", nargs="*", default=None, help="run numbers to run (1 1b 2 3 5), default all")
    parser.add_argument("--out", default=None, help="the markdown report (the JSON goes beside it)")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny data, 1 seed, 2 steps, batch 32")
    options = parser.parse_args()
    limit = None
    if options.quick:
        options.seeds, options.steps, options.batch, options.mini_batch, options.warmup = 1, 2, 32, 16, 0
        limit = 160
    options.seed_list = list(range(options.seeds))
    import torch
    torch.set_num_threads(options.threads)
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("hf_mm_rerank", "transformers", "datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    import datasets
    import transformers
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()

    from hf_mm_rerank import RetrievalEvaluator
    from hf_mm_rerank.recipes_kit.demo import build_demo_base

    wall, started = time.perf_counter(), date.today()
    options.code = code_version()
    captions, keywords, test, facts = build_data(limit)
    print(json.dumps({k: v for k, v in facts.items() if k != "examples"}), flush=True)
    evaluator = RetrievalEvaluator.from_dataset(test, batch_size=128)
    runs = {name: config for name, config in RUNS.items()
            if options.runs is None or name.split()[0] in options.runs}
    results: dict[str, list[dict]] = {name: [] for name in runs}
    with tempfile.TemporaryDirectory(prefix="bench_mixtures_") as workdir:
        base = build_demo_base(f"{workdir}/base")
        from hf_mm_rerank import BiEncoder
        before = {k: float(v) for k, v in evaluator(BiEncoder.from_pretrained(base)).items()}
        print(f"before: ndcg@10 {before['ndcg@10']:.4f}", flush=True)
        data = {"captions": captions, "keywords": keywords}
        for seed in options.seed_list:
            for name, config in runs.items():
                with contextlib.redirect_stdout(sys.stderr):  # Trainer prints its own log dicts
                    result = train_once(config, seed, base, data, evaluator, options, f"{workdir}/run")
                results[name].append(result)
                print(f"{name} | seed {seed}: ndcg@10 {result['ndcg@10']:.4f}, fn rows/batch "
                      f"{result['fn_rows_per_batch']:.1f}, shared-query rows/batch "
                      f"{result['shared_query_rows_per_batch']:.1f}, related pairs/batch "
                      f"{result['fn_pairs_per_batch']:.1f}, masked/batch {result['loss_masked_per_batch']:.1f}, "
                      f"deferred {result['deferred_rows_logged']}, sources {result['batches_by_source']}, loss "
                      f"{result['first_loss']:.3f} -> {result['last_loss']:.3f}, train {result['train_s']} s, "
                      f"eval {result['eval_s']} s", flush=True)
    wall_s = time.perf_counter() - wall
    command = "nice -n 10 .venv/bin/python " + " ".join(["benchmarks/bench_mixtures.py", *sys.argv[1:]])
    text = report(results, facts, before, options, command, wall_s, started)
    print(text)
    if options.out and not options.quick:
        out = Path(options.out)
        out.write_text(text)
        payload = {"command": command, "wall_s": round(wall_s, 1), "machine": machine(), "versions": versions(),
                   "options": {k: v for k, v in vars(options).items()}, "facts": facts, "before": before,
                   "runs": {name: {"sources": RUNS[name][0], "no_duplicates": RUNS[name][1],
                                   "mask_duplicates": RUNS[name][2], "seeds": per_seed}
                            for name, per_seed in results.items()}}
        out.with_suffix(".json").write_text(json.dumps(payload, indent=1))
        print(f"wrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
