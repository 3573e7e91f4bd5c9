"""Shared fixtures: tiny models of every family (built once per session) and small image datasets."""

from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from hub_server import HubServer  # noqa: E402

# Before anything imports huggingface_hub: no network, a throwaway cache, and the Hub endpoint is a loopback
# server started here (Hub tests switch offline mode off for themselves; nothing can reach the real Hub).
HUB = HubServer()
HUB_TOKEN = "hf_test_SECRET_token_3f9a1c"
os.environ["HF_ENDPOINT"] = HUB.endpoint
os.environ["HF_TOKEN"] = HUB_TOKEN
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="hf_home_"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_MM_RERANK_AUTO_WORKERS", "0")  # tests load in-process; test_throughput checks the default

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


@pytest.fixture()
def hub(monkeypatch):
    """The loopback Hub, emptied, with offline mode off for this test."""
    import time

    import huggingface_hub.constants as constants
    import huggingface_hub.utils._http as http

    class NoSleep:  # huggingface_hub's own HTTP retries (1 s, 2 s, 4 s, ...) without the waiting
        sleep = staticmethod(lambda seconds: None)

        def __getattr__(self, name):
            return getattr(time, name)

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(http, "time", NoSleep())
    HUB.reset()
    yield HUB
    HUB.reset()


@pytest.fixture()
def keep_threads():
    """The process's torch thread count, restored after the test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
