"""CrossEncoder: a multimodal reranker that reads a (query, document) pair and outputs one relevance score."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForSequenceClassification,
)

from ..data.featurizers import Featurizer
from ..data.pair_featurizers import RERANK_PROMPT_DEFAULTS, ChatPairFeaturizer, TextPairFeaturizer
from .base import AdapterModel, to_device
from .bi_encoder import last_token_pool
from .options import LoadOptions
from .spec import ModelSpec

HEADS = ("auto", "yes_no", "linear", "mlp", "classification")


def resolve_head(head: str, config: Any, spec: ModelSpec | None) -> str:
    """The head for ``head="auto"``: saved setting, then the checkpoint's architecture.

    ``*ForSequenceClassification`` -> classification; a causal LM / VLM with an LM head (Qwen3-VL-Reranker,
    MonoQwen, any ``*ForConditionalGeneration``) -> yes_no; a text encoder without vision -> classification;
    a bare VLM -> linear.
    """
    if head not in HEADS:
        raise ValueError(f"head={head!r} is not one of {HEADS}.")
    saved = spec.settings.get("head") if spec is not None else None
    if head == "auto" and saved:
        return saved
    if head != "auto":
        if saved and saved != head:
            raise ValueError(f"head={head!r}, but the checkpoint was trained with head={saved!r}. Fix: pass "
                             f"head={saved!r} or head='auto'.")
        return head
    architectures = getattr(config, "architectures", None) or []
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return "classification"
    if any(a.endswith(("ForConditionalGeneration", "ForCausalLM")) for a in architectures):
        return "yes_no"
    return "linear" if getattr(config, "vision_config", None) is not None else "classification"


def _auto_class(head: str, config: Any) -> Any:
    if head == "classification":
        return AutoModelForSequenceClassification
    if head == "yes_no":
        return AutoModelForImageTextToText if getattr(config, "vision_config", None) is not None else AutoModelForCausalLM
    return AutoModel


class ScoreHead(nn.Module):
    """``linear`` or ``mlp`` head on the last token's hidden state -> one score (kept in float32)."""

    def __init__(self, hidden_size: int, kind: str) -> None:
        super().__init__()
        if kind == "linear":
            self.net = nn.Sequential(nn.Linear(hidden_size, 1))
        else:
            self.net = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, 1))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.net(hidden.float()).squeeze(-1)


class CrossEncoder(AdapterModel):
    """Scores (query, document) pairs; each side is text, an image, or both.

    Heads: ``yes_no`` (logit(yes) - logit(no) at the last position of a causal VLM; no new parameters),
    ``linear`` / ``mlp`` (trained on the last-token hidden state, saved in ``head.safetensors``),
    ``classification`` (``AutoModelForSequenceClassification``, e.g. text cross-encoders).

    Example:
        >>> from peft import LoraConfig
        >>> rr = CrossEncoder.from_pretrained("Qwen/Qwen2-VL-2B-Instruct", head="yes_no", lora_config=LoraConfig(r=16))
        >>> rr.score([("a red bicycle", "bike.jpg"), ("a red bicycle", "boat.jpg")])   # tensor([2.1, -3.4])
        >>> rr.rank("a red bicycle", ["bike.jpg", "boat.jpg"], top_k=1)              # [{"index": 0, "score": 2.1}]
    """

    kind = "cross_encoder"

    def __init__(self, backbone: nn.Module, processor: Any, spec: ModelSpec) -> None:
        super().__init__(backbone, processor, spec)
        settings = spec.settings
        self.head_type = settings["head"]
        self.featurizer: Featurizer = self._featurizer(processor, settings)
        settings["max_pixels"] = self.featurizer.max_pixels
        self.head: ScoreHead | None = None
        if self.head_type in ("linear", "mlp"):
            with torch.random.fork_rng(devices=[]):  # the same fresh head every time, without touching the RNG
                torch.manual_seed(0)
                self.head = ScoreHead(self.config_hidden_size(), self.head_type).to(self.device)
        if self.head_type == "yes_no":
            self.yes_no_ids = [self._token_id(settings["yes_token"]), self._token_id(settings["no_token"])]
        if self.head_type == "classification":
            labels = self.config.num_labels
            if labels not in (1, 2):
                raise ValueError(f"head='classification' needs num_labels 1 or 2 (score = logit, or logit[1] - "
                                 f"logit[0]); the checkpoint has {labels}. Fix: pass num_labels=1.")

    @staticmethod
    def _featurizer(processor: Any, settings: dict[str, Any]) -> Featurizer:
        common = dict(max_pixels=settings.get("max_pixels"), max_length=settings.get("max_length"),
                      fast_decode=settings.get("fast_decode", False))
        template = getattr(processor, "chat_template", None) or getattr(
            getattr(processor, "tokenizer", processor), "chat_template", None)
        if template is None:
            if settings["head"] != "classification":
                raise ValueError(f"head={settings['head']!r} renders pairs through a chat template, and "
                                 f"{type(processor).__name__} has none. Fix: use head='classification' for text "
                                 "cross-encoders, or set processor.chat_template.")
            return TextPairFeaturizer(processor, **common)
        return ChatPairFeaturizer(processor, prompt=settings.get("prompt"), **common)

    def config_hidden_size(self) -> int:
        config = self.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        return int(text.hidden_size)

    def _token_id(self, token: str) -> int:
        tokenizer = self.featurizer.tokenizer
        ids = tokenizer.encode(token, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"yes/no token {token!r} is {len(ids)} tokens for this tokenizer; the yes_no head "
                             "needs single tokens. Fix: pass yes_token=/no_token= strings that are one token.")
        return int(ids[0])

    def heads(self) -> nn.Module | None:
        return self.head

    # ----- loading ------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        head: str = "auto",
        instruction: str | None = None,
        system_prompt: str | None = None,
        query_prefix: str | None = None,
        document_prefix: str | None = None,
        assistant_prefix: str | None = None,
        yes_token: str | None = None,
        no_token: str | None = None,
        options: LoadOptions | None = None,
        **kwargs: Any,
    ) -> CrossEncoder:
        """Load a reranker, a base checkpoint (optionally adding LoRA / QLoRA and a head), or a plain PEFT adapter
        folder on its base.

        Args:
            name_or_path: a transformers checkpoint, a folder / Hub repo written by :meth:`save_pretrained`, or a
                PEFT adapter folder naming its base.
            head: ``"auto"``, ``"yes_no"``, ``"linear"``, ``"mlp"`` or ``"classification"`` (see the class doc). A new
                classification head is added to the ``lora_config``'s ``modules_to_save`` so it trains and is saved
                with the adapter.
            instruction, system_prompt, query_prefix, document_prefix, assistant_prefix: how a pair is
                framed in the chat template (defaults follow Qwen3-VL-Reranker).
            yes_token, no_token: the tokens of the yes_no head (default ``"yes"`` / ``"no"``).
            options: the loading options every model shares (:class:`LoadOptions`: ``lora_config``,
                ``quantization_config``, ``max_pixels``, ``max_length`` (the pair's, for text cross-encoders),
                ``fast_decode``, ``base_model``, ...).
            **kwargs: any :class:`LoadOptions` field by name (over ``options``); the rest go to the transformers
                ``from_pretrained`` (``dtype``, ``attn_implementation``, ``token``, ``revision``, ...).
        """
        options = LoadOptions.merged(options, kwargs)
        model_kwargs = options.model_kwargs
        defaults = {"yes_token": "yes", "no_token": "no", "max_pixels": None, "max_length": None,
                    "prompt": dict(RERANK_PROMPT_DEFAULTS)}
        spec = cls.find_spec(name_or_path, options, defaults)
        saved = spec is not None and bool(spec.family)  # ours; a plain PEFT folder has no head file of ours
        on_base = spec is not None and spec.adapter
        base = spec.base_model if on_base else name_or_path
        config_kwargs = {k: v for k, v in options.hub_kwargs.items() if not (on_base and k == "revision")}
        config = AutoConfig.from_pretrained(base, trust_remote_code=model_kwargs.get("trust_remote_code", False),
                                            **config_kwargs)
        head = resolve_head(head, config, spec)
        if head == "classification":  # a new head gets one logit; trained ones keep their label count
            if spec is not None and "num_labels" in spec.settings:
                model_kwargs.setdefault("num_labels", spec.settings["num_labels"])
            elif not any(a.endswith("ForSequenceClassification") for a in getattr(config, "architectures", None) or []):
                model_kwargs.setdefault("num_labels", 1)
        lora_config = options.lora_config
        if lora_config is not None and head == "classification" and not getattr(lora_config, "modules_to_save", None):
            lora_config = copy.deepcopy(lora_config)
            lora_config.modules_to_save = _classifier_modules(config)
        options = dataclasses.replace(options, lora_config=lora_config)
        backbone, processor, spec = cls._load_parts(name_or_path, options, auto_class=_auto_class(head, config),
                                                    spec=spec)
        if spec is None:
            spec = cls._new_spec(cls.kind, name_or_path, backbone, defaults, options)
        spec.settings.setdefault("head", head)
        if head == "classification":
            spec.settings.setdefault("num_labels", int(backbone.config.num_labels))
        tokens = {"yes_token": yes_token, "no_token": no_token}
        spec.settings.update({**{k: v for k, v in tokens.items() if v is not None}, **options.settings()})
        prompt = {"instruction": instruction, "system_prompt": system_prompt, "query_prefix": query_prefix,
                  "document_prefix": document_prefix, "assistant_prefix": assistant_prefix}
        spec.settings["prompt"] = {**spec.settings.get("prompt", {}), **{k: v for k, v in prompt.items() if v is not None}}
        model = cls(backbone, processor, spec)
        if saved:  # a folder written by save_pretrained must carry its head; a base checkpoint starts a fresh one
            model._load_head(name_or_path, **options.hub_kwargs)
        return model

    # ----- scoring ------------------------------------------------------------------------------------
    def forward(self, features: dict[str, Any] | list[dict[str, Any]]) -> torch.Tensor:
        """Score featurized pairs (one chunk or a list of chunks) -> ``[N]`` float32 logits."""
        if isinstance(features, list):
            return torch.cat([self.forward(chunk) for chunk in features])
        features = to_device(features, self.device, self.compute_dtype, self.featurizer)
        if self.head_type == "classification":
            logits = self.backbone(**features).logits.float()
            return logits[:, 0] if logits.shape[-1] == 1 else logits[:, 1] - logits[:, 0]
        if self.head_type == "yes_no":
            # Only the last position's yes/no logits: the inner model's hidden state times two LM-head rows.
            inner = self.base_model.base_model
            hidden = inner(**features, use_cache=False).last_hidden_state
            last = last_token_pool(hidden, features["attention_mask"])
            lm_head = self.base_model.get_output_embeddings()
            rows = lm_head.weight[self.yes_no_ids].to(last.dtype)
            logits = (last @ rows.T).float()
            if getattr(lm_head, "bias", None) is not None:
                logits = logits + lm_head.bias[self.yes_no_ids].float()
            return logits[:, 0] - logits[:, 1]
        hidden = self.backbone(**features, use_cache=False).last_hidden_state
        return self.head(last_token_pool(hidden, features["attention_mask"]))

    def score(self, pairs: Sequence[tuple[Any, Any]], *, batch_size: int = 16, activation: str | None = None,
              shard_across_ranks: bool = False, show_progress: bool | None = None) -> torch.Tensor:
        """Relevance scores ``[N]`` (on CPU) for raw (query, document) pairs; ``activation="sigmoid"`` maps
        them to [0, 1]. Inputs are text, PIL images, paths, bytes or ``{"text", "image"}`` dicts, processed
        exactly as in training. With ``shard_across_ranks`` in a multi-process run, every rank scores a share
        and gets all scores (every rank must call it). ``show_progress``: a progress bar (default: for 1,000 pairs
        or more on a terminal; see :mod:`hf_mm_rerank.progress`)."""
        if activation not in (None, "sigmoid"):
            raise ValueError(f"activation={activation!r}: use None (raw logits) or 'sigmoid'.")
        scores = self._run_batched(pairs, batch_size, lambda chunk, start: self.featurizer(
            [self._pair(pair, start + i) for i, pair in enumerate(chunk)]), shard_across_ranks, desc="Scoring pairs",
            unit="pairs", show_progress=show_progress)
        return scores.sigmoid() if activation == "sigmoid" else scores

    def rank(self, query: Any, documents: Sequence[Any], *, top_k: int | None = None, batch_size: int = 16,
             return_documents: bool = False) -> list[dict[str, Any]]:
        """Rank ``documents`` for ``query``: ``[{"index": i, "score": s}, ...]`` best first (``top_k`` of them)."""
        scores = self.score([(query, doc) for doc in documents], batch_size=batch_size).tolist()
        order = sorted(range(len(scores)), key=lambda i: -scores[i])[:top_k]
        return [{"index": i, "score": scores[i], **({"document": documents[i]} if return_documents else {})}
                for i in order]

    def _pair(self, pair: Any, row: int) -> tuple[Any, Any]:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"pair {row}: expected a (query, document) tuple, received {type(pair).__name__}.")
        return self.featurizer.read(pair[0], row, "query"), self.featurizer.read(pair[1], row, "document")


def _classifier_modules(config: Any) -> list[str]:
    """Top-level modules of a sequence-classification model outside its base model (the new score head)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = AutoModelForSequenceClassification.from_config(config)
    return [name for name, module in model.named_children()
            if name != model.base_model_prefix and any(True for _ in module.parameters())]
