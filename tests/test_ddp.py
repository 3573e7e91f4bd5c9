"""Multi-process training (2 CPU processes, gloo, launched by torchrun) equals one process.

One launch runs every scenario of ddp_scenarios.py; each test compares its results with the same scenario run
here in one process with the same global batch (2 ranks x 4 rows against 1 process x 8 rows).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import ddp_scenarios
import pytest
import torch
from helpers import assert_rel_close

TRAINING = [name for name in ddp_scenarios.SCENARIOS if name != "sharded_inference"]


@pytest.fixture(scope="module")
def paths(tiny_path, tmp_path_factory):
    from test_cross_encoder import _bert_classifier

    return {"clip": tiny_path("clip"), "qwen2_vl": tiny_path("qwen2_vl"),
            "bert_base": _bert_classifier(tmp_path_factory.mktemp("bert"), bare=True)}


@pytest.fixture(scope="module")
def two_ranks(paths, tmp_path_factory):
    """Every scenario run once by 2 processes; returns results[name][rank]."""
    out = tmp_path_factory.mktemp("ddp")
    worker = os.path.join(os.path.dirname(__file__), "ddp_trainer_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29547", worker, json.dumps(paths), str(out), ",".join(ddp_scenarios.SCENARIOS)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return {name: [torch.load(out / f"{name}-rank{r}.pt", weights_only=False) for r in range(2)]
            for name in ddp_scenarios.SCENARIOS}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("name", TRAINING)
def test_two_ranks_train_the_same_model_as_one_process(two_ranks, paths, tmp_path, name):
    single = ddp_scenarios.run(name, paths, str(tmp_path))
    rank0, rank1 = two_ranks[name]
    assert rank0["steps"] == rank1["steps"] == single["steps"] == (2 if name == "uneven_last_batch" else 3)
    assert _max_diff(single["weights"], single["initial"]) > 1e-3  # training moved the weights
    assert _max_diff(rank0["weights"], rank1["weights"]) == 0.0  # the ranks hold one model
    assert _max_diff(single["weights"], rank0["weights"]) < 1e-5


@pytest.mark.parametrize("name", TRAINING)
def test_one_gradient_all_reduce_per_optimizer_step(two_ranks, name):
    # GradCache scenarios run 3 to 6 forward/backward chunks per step; gradient accumulation 2 micro-batches.
    for rank in two_ranks[name]:
        assert rank["all_reduces"] == rank["steps"]


def test_learnable_temperature_is_averaged_across_ranks(two_ranks, paths, tmp_path):
    single = ddp_scenarios.run("contrastive_lora", paths, str(tmp_path))
    rank0, rank1 = two_ranks["contrastive_lora"]
    assert single["temperature"] != pytest.approx(0.1, abs=1e-4)  # it was trained
    assert rank0["log_scale"].item() == rank1["log_scale"].item()
    assert rank0["temperature"] == pytest.approx(single["temperature"], abs=1e-6)


def test_sharded_evaluation_and_mining_equal_one_process(two_ranks, paths, tmp_path):
    single = ddp_scenarios.run("sharded_inference", paths, str(tmp_path))
    for rank in two_ranks["sharded_inference"]:
        assert_rel_close(rank["embeddings"], single["embeddings"])
        assert rank["retrieval"] == single["retrieval"]
        assert rank["reranking"] == pytest.approx(single["reranking"], abs=1e-9)
        assert rank["negatives"] == single["negatives"]
        assert rank["two_stage"] == pytest.approx(single["two_stage"], abs=1e-9)  # retrieve, then rerank
        assert rank["multi_vector"] == pytest.approx(single["multi_vector"], abs=1e-9)  # MaxSim evaluation
        assert_rel_close(rank["token_embeddings"], single["token_embeddings"])
        assert {"ndcg@10", "retriever_ndcg@10", "recall@5"} <= set(single["two_stage"])


def test_a_mixture_masks_the_same_false_negatives_on_two_ranks_as_in_one(two_ranks, paths, tmp_path):
    """Copies of a positive meet within a rank and across ranks: each rank masks its own rows' share, which adds up
    to what one process masks over the same global batches."""
    single = ddp_scenarios.run("mixture_cached", paths, str(tmp_path))
    rank0, rank1 = two_ranks["mixture_cached"]
    assert single["masked"] > 0
    assert rank0["masked"] + rank1["masked"] == single["masked"]
