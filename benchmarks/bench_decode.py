"""What ``fast_decode`` buys and costs: input-pipeline time (decode + resize + processor, the collator's work) and the
embedding deviation from the processor-exact default, on generated photo-like JPEGs.

    python benchmarks/bench_decode.py [--images 64] [--repeats 3] [--output benchmarks/results/<file>.md]

Per model and JPEG size: the collator's time over the same rows with ``fast_decode`` off (default) and on, runs
alternated, medians of the repeats; the deviation is max |fast - exact| / max |exact| over the embeddings of a tiny
random model (it measures the pixels, not a trained model's sensitivity to them).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def jpegs(count: int, size: tuple[int, int], seed: int = 0) -> list[bytes]:
    from test_pixels import jpeg, photo

    return [jpeg(photo(size, seed + i)) for i in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=None)
    options = parser.parse_args()
    import tiny_models

    from hf_mm_rerank import BiEncoder, BiEncoderCollator

    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp())
    rows_out = []
    for family in ("clip", "qwen2_vl"):
        path = str(tiny_models.FACTORIES[family](folder / family))
        for size in ((640, 480), (1600, 1200)):
            cells = jpegs(options.images, size)
            rows = [{"query": f"photo {i}", "positive": cell} for i, cell in enumerate(cells)]
            models = {mode: BiEncoder.from_pretrained(path, fast_decode=mode == "fast") for mode in ("exact", "fast")}
            times: dict[str, list[float]] = {"exact": [], "fast": []}
            for repeat in range(options.repeats):
                for mode in (("exact", "fast") if repeat % 2 == 0 else ("fast", "exact")):
                    collator = BiEncoderCollator(models[mode])
                    start = time.perf_counter()
                    for i in range(0, len(rows), 16):
                        collator(rows[i:i + 16])
                    times[mode].append(len(rows) / (time.perf_counter() - start))
            exact = models["exact"].encode(cells[:16], side="document")
            fast = models["fast"].encode(cells[:16], side="document")
            deviation = float((fast - exact).abs().max() / exact.abs().max())
            medians = {mode: statistics.median(values) for mode, values in times.items()}
            rows_out.append((family, f"{size[0]}x{size[1]}", medians["exact"], medians["fast"],
                             medians["fast"] / medians["exact"], deviation))
            print(rows_out[-1], flush=True)
    lines = [f"# fast_decode: input-pipeline speed and embedding deviation ({date.today()})", "",
             f"Command: `python benchmarks/bench_decode.py --images {options.images} --repeats {options.repeats}` "
             f"(1 torch thread, collator in-process; {platform.processor() or platform.machine()}, torch "
             f"{torch.__version__}). Images/s through the collator (decode, resize, processor), medians of "
             f"{options.repeats} alternated runs; deviation = max-abs embedding difference over max-abs value, tiny "
             "random models.", "",
             "| model | JPEG | exact (default) images/s | fast_decode images/s | speed-up | deviation |",
             "|---|---|---|---|---|---|"]
    lines += [f"| tiny {f} | {s} | {e:.1f} | {fa:.1f} | {r:.2f}x | {d:.1e} |" for f, s, e, fa, r, d in rows_out]
    text = "\n".join(lines) + "\n"
    print(text)
    if options.output:
        Path(options.output).write_text(text)


if __name__ == "__main__":
    main()
