"""Runs vLLM on given folders and inputs, in the vLLM venv (scripts/vllm_env.sh), and writes what it returned.

    VLLM_PYTHON tests/vllm_worker.py TASK.json

Neither hf_mm_rerank nor peft is imported here (that venv has neither): what vLLM returns is vLLM's own. The task:

    {"result_file": PATH, "engines": [{"name": ..., "llm": {LLM(...) keyword arguments}, "serve": "vllm serve ...",
      "serve_kwargs": {the LLM(...) arguments the serve line must give},
      "calls": [{"name": ..., "method": "embed" | "classify" | "token_embed", "inputs": [{"prompt": TEXT (or
                 "prompt_token_ids": [...]), "images": [PNG, ...]}], "lora": {"name": ..., "path": ...}}]}]}

Each engine is started in turn, in this one process (one vLLM process per test); an engine that fails to start, or
a call that fails, is recorded with vLLM's error (its type and first lines) instead of stopping the others. ``serve``
is parsed by vLLM's own ``vllm serve`` argument parser and the engine arguments it gives are compared with the ones
``LLM(...)`` was given (recorded as ``serve_mismatch``): the serve line printed in the card is the engine that ran.
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: faster, one process
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default takes far more than tiny models need
os.environ["HF_HUB_OFFLINE"] = "1"  # everything is a local folder: nothing may reach the Hub

import gc  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

sys.modules["hf_mm_rerank"] = None  # never importable here, whatever the path holds
sys.modules["peft"] = None


def _error(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {' | '.join(lines[:6])[:1500]}"


def _inputs(call: dict) -> list:
    from PIL import Image

    prompts = []
    for item in call["inputs"]:
        images = [Image.open(path).convert("RGB") for path in item.get("images", [])]
        prompt = {"prompt_token_ids": item["prompt_token_ids"]} if "prompt_token_ids" in item else \
            {"prompt": item["prompt"]}
        if images:
            prompt["multi_modal_data"] = {"image": images[0] if len(images) == 1 else images}
        prompts.append(prompt)
    return prompts


def _run(llm, call: dict) -> list:
    from vllm import PoolingParams

    prompts = _inputs(call)
    lora = None
    if call.get("lora"):
        from vllm.lora.request import LoRARequest

        # vLLM keys adapters by their integer id: one id per adapter folder (a reused id would serve the first one)
        ids = _run.__dict__.setdefault("lora_ids", {})
        lora = LoRARequest(call["lora"]["name"], ids.setdefault(call["lora"]["path"], len(ids) + 1),
                           call["lora"]["path"])
    if call["method"] == "embed":
        outputs = llm.embed(prompts, lora_request=lora, use_tqdm=False)
        return [list(map(float, o.outputs.embedding)) for o in outputs]
    if call["method"] == "classify":  # raw logits: the sigmoid vLLM applies by default is turned off
        outputs = llm.classify(prompts, pooling_params=PoolingParams(use_activation=False), lora_request=lora,
                               use_tqdm=False)
        return [list(map(float, o.outputs.probs)) for o in outputs]
    if call["method"] == "token_embed":
        outputs = llm.encode(prompts, pooling_task="token_embed", lora_request=lora, use_tqdm=False)
        return [o.outputs.data.float().tolist() for o in outputs]
    raise ValueError(f"unknown method {call['method']!r}")


def _serve_mismatch(serve: str, kwargs: dict) -> list[str]:
    """The `vllm serve` line parsed by vLLM's own parser: every argument LLM(...) was given must come out equal."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    words = shlex.split(serve)
    if words[:2] != ["vllm", "serve"]:
        return [f"not a `vllm serve` line: {serve!r}"]
    parser = FlexibleArgumentParser(prog="vllm")
    ServeSubcommand().subparser_init(parser.add_subparsers(dest="subparser"))
    args = parser.parse_args(words[1:])
    args.model = args.model_tag  # as `vllm serve` does with its positional model
    parsed = EngineArgs.from_cli_args(args)
    found = []
    for key, value in kwargs.items():
        got = getattr(parsed, key, "<absent>")
        if hasattr(got, "__dict__") and isinstance(value, dict):  # a config object (pooler_config): its fields
            got = {k: getattr(got, k, "<absent>") for k in value}
        if got != value:
            found.append(f"{key}: serve line gives {got!r}, LLM(...) was given {value!r}")
    return found


def main() -> None:
    task = json.load(open(sys.argv[1]))
    results: dict = {}
    started = time.time()
    from vllm import LLM

    results["_import_s"] = time.time() - started
    for engine in task["engines"]:
        entry: dict = {"calls": {}, "errors": {}}
        results[engine["name"]] = entry
        if engine.get("serve"):
            try:
                entry["serve_mismatch"] = _serve_mismatch(engine["serve"], engine["serve_kwargs"])
            except Exception as error:  # noqa: BLE001 (recorded: the test shows it)
                entry["serve_mismatch"] = [f"the serve line could not be parsed: {_error(error)}"]
        start = time.time()
        try:
            llm = LLM(**engine["llm"])
        except Exception as error:  # noqa: BLE001
            entry["start_error"] = _error(error)
            entry["traceback"] = traceback.format_exc()[-3000:]
            gc.collect()
            continue
        entry["start_s"] = time.time() - start
        for call in engine["calls"]:
            begin = time.time()
            try:
                entry["calls"][call["name"]] = _run(llm, call)
            except Exception as error:  # noqa: BLE001
                entry["errors"][call["name"]] = _error(error)
            entry.setdefault("call_s", {})[call["name"]] = time.time() - begin
        del llm
        gc.collect()
    results["_total_s"] = time.time() - started
    with open(task["result_file"], "w") as handle:
        json.dump(results, handle)


if __name__ == "__main__":
    main()
