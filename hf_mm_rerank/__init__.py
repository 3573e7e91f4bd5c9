"""hf_mm_rerank: LoRA/QLoRA fine-tuning of multimodal bi-encoders and rerankers with a plain Trainer.

Public names are imported lazily, so ``import hf_mm_rerank`` is cheap. Importing it first also quiets
bitsandbytes' notice about an optional CPU 4-bit kernel package, which transformers and peft import on every run
(even without quantization); the notice matters only for 4-bit on a CPU, where loading says so once.

The map: ``data/`` (cells, row schema, featurizers, collators, streams, image pipeline, validation) is the ground
floor and imports nothing of the package; ``retrieval/`` (the retrieval core, evaluators and ranking metrics, mining,
retrieve-then-rerank) stands on data; ``modeling/`` and ``losses/`` on data and the retrieval core; ``publishing/``
(cards, serving notes, exports) on modeling; ``training/`` (trainers, arguments, checkpoints, throughput, the Hub
push) on all of these; ``recipes_kit/`` (the recipes' helpers) on top. ``distributed.py`` and ``progress.py`` (the
progress bars) are low-level utilities every wing may use. No module imports a wing above its own.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

__version__ = "0.1.0"


class _OptionalKernelNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels-community" not in record.getMessage()


# A logger obtained before bitsandbytes (or kernels) creates it is the one it will use. A logger's filter sees only
# what is logged on that very logger, so each one that speaks of the kernel is named: bitsandbytes' own, and the
# kernels package's Hub check ("Skipping publisher trust check for 'kernels-community/...' because Hugging Face Hub
# is in offline mode", kernels 0.19 under HF_HUB_OFFLINE=1, as the demo scripts run).
for _name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
    logging.getLogger(_name).addFilter(_OptionalKernelNotice())
del _name

_EXPORTS = {
    "BiEncoder": "modeling",
    "BiEncoderCollator": "data.collators",
    "BiEncoderTrainer": "training.trainers",
    "BinaryCrossEntropyLoss": "losses",
    "CachedContrastiveLoss": "losses",
    "ContrastiveLoss": "losses",
    "HubPushCallback": "training.hub_push",
    "CrossEncoder": "modeling",
    "CrossEncoderCollator": "data.collators",
    "CrossEncoderTrainer": "training.trainers",
    "DistillKLLoss": "losses",
    "EmbeddingDistillKLLoss": "losses",
    "EmbeddingMarginMSELoss": "losses",
    "RetrieveRerankEvaluator": "retrieval.two_stage",
    "retrieve_and_rerank": "retrieval.two_stage",
    "score_with_teacher": "retrieval.two_stage",
    "InputError": "data.inputs",
    "LambdaLoss": "losses",
    "LoadOptions": "modeling",
    "ListwiseSoftmaxLoss": "losses",
    "MMInput": "data.inputs",
    "MarginMSELoss": "losses",
    "MatryoshkaLoss": "losses",
    "Mixing": "training.mixing",
    "MaxSimContrastiveLoss": "losses",
    "MaxSimPairwiseLoss": "losses",
    "MultiVectorEncoder": "modeling",
    "TokenEmbeddings": "retrieval.core",
    "pool_tokens": "retrieval.core",
    "RETRIEVAL_METRIC_PATH": "retrieval.evaluation",
    "RerankingEvaluator": "retrieval.evaluation",
    "RetrievalEvaluator": "retrieval.evaluation",
    "ThroughputCallback": "training.throughput",
    "TrainerLoss": "losses",
    "RunFacts": "training.trainers",
    "Tokens": "data.minibatch",
    "CheckpointWriteError": "training.checkpoints",
    "ValidationReport": "data.validation",
    "validate_dataset": "data.validation",
    "mine_hard_negatives": "retrieval.mining",
    "add_guide_embeddings": "retrieval.mining",
    "ranking_metrics": "retrieval.evaluation",
    "to_input": "data.inputs",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hf_mm_rerank' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
