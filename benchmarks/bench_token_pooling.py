"""Token pooling's index size and metric cost on a trained multi-vector model's held-out evaluation.

    python benchmarks/bench_token_pooling.py outputs/demo-multi-vector [--factors 1 2 3 4]

Runs the recipe's held-out emoji evaluation (the demo data) with documents pooled by each factor
(:func:`hf_mm_rerank.pool_tokens`) and prints the stored vectors and the metrics, relative to no pooling.
"""

from __future__ import annotations

import argparse

from hf_mm_rerank import MultiVectorEncoder, RetrievalEvaluator
from hf_mm_rerank.recipes_kit.data import DataArguments, load_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 2, 3, 4])
    options = parser.parse_args()
    model = MultiVectorEncoder.from_pretrained(options.model, is_trainable=False)
    _, held_out = load_data(DataArguments())
    rows = []
    for factor in options.factors:
        metrics = RetrievalEvaluator.from_dataset(held_out, batch_size=128, token_pooling=factor)(model)
        rows.append((factor, metrics))
    base = rows[0][1]
    print("| pool factor | stored vectors | vectors kept | ndcg@10 | kept of ndcg@10 | recall@10 | mrr@10 |")
    print("|---|---|---|---|---|---|---|")
    for factor, m in rows:
        print(f"| {factor} | {int(m['index_vectors']):,} | {m['index_vectors'] / base['index_vectors']:.1%} | "
              f"{m['ndcg@10']:.4f} | {m['ndcg@10'] / base['ndcg@10']:.1%} | {m['recall@10']:.4f} | {m['mrr@10']:.4f} |")


if __name__ == "__main__":
    main()
