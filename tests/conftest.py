"""Shared fixtures: tiny models of every family (built once per session) and small image datasets."""

from __future__ import annotations

import os
import sys
import tempfile

# Before anything imports huggingface_hub: no network, a throwaway cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="hf_home_"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402
import tiny_models  # noqa: E402
import torch  # noqa: E402
from images import COLORS, color_rows, solid  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    """tiny_path(family) -> folder of a tiny checkpoint of that family (built once)."""
    built: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in built:
            built[family] = str(tiny_models.FACTORIES[family](tmp_path_factory.mktemp(family)))
        return built[family]

    return get


@pytest.fixture()
def color_dataset():
    from datasets import Dataset

    return Dataset.from_list(color_rows(repeat=4))


@pytest.fixture()
def color_evaluator():
    from hf_mm_rerank import RetrievalEvaluator

    return RetrievalEvaluator({c: f"a {c} square" for c in COLORS}, {c: solid(c) for c in COLORS},
                              {c: {c} for c in COLORS})
