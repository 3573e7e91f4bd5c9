"""`evaluate` metric module: ranking metrics (ndcg@k, mrr@k, recall@k, map@100) for retrieval runs.

Load it offline with ``evaluate.load(hf_mm_rerank.retrieval.evaluation.RETRIEVAL_METRIC_PATH)``.
"""

import datasets
import evaluate

from hf_mm_rerank.retrieval.evaluation import ranking_metrics

_DESCRIPTION = """Ranking metrics with binary relevance. predictions: per query, the retrieved document ids best
first; references: per query, the ids of its relevant documents. Queries without relevant documents are skipped."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of lists of document ids (strings), best first.
    references: list of lists of relevant document ids (strings).
    k_values: cut-offs for ndcg, mrr and recall (default [1, 5, 10]).
    map_at: cut-off of mean average precision (default 100).
Returns:
    a dict with ndcg@k, mrr@k, recall@k for each k and map@map_at.
Example:
    >>> metric = evaluate.load(RETRIEVAL_METRIC_PATH)
    >>> metric.compute(predictions=[["d2", "d1"]], references=[["d1"]], k_values=[1, 2])["mrr@2"]
    0.5
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RetrievalMetrics(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "predictions": datasets.Sequence(datasets.Value("string")),
                "references": datasets.Sequence(datasets.Value("string")),
            }),
        )

    def _compute(self, predictions, references, k_values=(1, 5, 10), map_at=100):
        return ranking_metrics(predictions, references, tuple(k_values), map_at)
