"""MultiVectorEncoder: late-interaction (ColPali / ColQwen / ColBERT-style) bi-encoders.

Every scored token's hidden state is projected to a small dimension (128 by default) and L2-normalised; a query
scores a document by MaxSim (for each query token its best document token, summed). The projection lives in the
backbone as ``custom_text_proj`` (and ``custom_image_proj`` for a dual encoder's image tower), the names colpali-engine
uses, so it trains as a LoRA ``modules_to_save`` (saved with the adapter) or with a full fine-tune, and a
colpali-engine ColQwen2 / ColQwen2.5 adapter loads as it is.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .. import progress
from ..data.multi_vector_featurizer import MultiVectorChatFeaturizer, MultiVectorDualFeaturizer
from ..distributed import world
from ..retrieval.core import MAXSIM, TokenEmbeddings
from .backbone import CHAT, DUAL, detect_family
from .base import AdapterModel, to_device
from .bi_encoder import BiEncoder
from .options import LoadOptions
from .spec import ModelSpec, resolve_file

PROJECTIONS = {CHAT: ("custom_text_proj",), DUAL: ("custom_text_proj", "custom_image_proj")}
DEFAULT_DIM = 128


def _hidden_sizes(backbone: nn.Module, family: str) -> list[int]:
    config = backbone.config
    if family == DUAL:
        return [int(config.text_config.hidden_size), int(config.vision_config.hidden_size)]
    return [int((config.get_text_config() if hasattr(config, "get_text_config") else config).hidden_size)]


def add_projections(backbone: nn.Module, family: str, dim: int, weights: str | None = None, **hub_kwargs: Any) -> None:
    """Give the bare backbone its token projections (seeded, so a fresh model is the same every time); with
    ``weights`` (a fully fine-tuned save), their trained values from its weight files."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for name, hidden in zip(PROJECTIONS[family], _hidden_sizes(backbone, family)):
            if not hasattr(backbone, name):
                setattr(backbone, name, nn.Linear(hidden, dim).to(next(backbone.parameters()).device))
    if weights is None:
        return
    state = _projection_weights(weights, PROJECTIONS[family], **hub_kwargs)
    for name in PROJECTIONS[family]:
        keys = [k for k in state if k.startswith(f"{name}.")]
        if not keys:
            raise ValueError(f"{weights}: its weights hold no {name}; it was not saved by a MultiVectorEncoder.")
        getattr(backbone, name).load_state_dict({k[len(name) + 1:]: state[k] for k in keys})


def _projection_weights(weights: str, names: Sequence[str], **hub_kwargs: Any) -> dict[str, torch.Tensor]:
    """The tensors under ``names`` in a save's ``model.safetensors``, or in the shards its index lists (the merged
    export of a multi-vector model is sharded: :func:`~hf_mm_rerank.publishing.export._write_late_interaction`)."""
    from safetensors import safe_open

    path = resolve_file(weights, "model.safetensors", **hub_kwargs)
    if path is not None:
        files = [path]
    else:
        index = resolve_file(weights, "model.safetensors.index.json", **hub_kwargs)
        if index is None:
            raise FileNotFoundError(f"{weights}: model.safetensors is missing, so the trained token projections "
                                    "cannot be restored. Fix: copy the whole folder written by save_pretrained().")
        weight_map = json.load(open(index))["weight_map"]
        shards = sorted({file for key, file in weight_map.items() if key.split(".")[0] in names})
        files = [resolve_file(weights, shard, **hub_kwargs) for shard in shards]
    state = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            state.update({k: handle.get_tensor(k) for k in handle.keys() if k.split(".")[0] in names})
    return state


class MultiVectorEncoder(BiEncoder):
    """Embeds each input as one small L2-normalised vector per scored token (text tokens, image patches) and scores
    by MaxSim. Trains with the late-interaction losses (:class:`~hf_mm_rerank.losses.MaxSimContrastiveLoss`, ...) in
    :class:`BiEncoderTrainer`; the evaluators, mining and retrieve-then-rerank score it by MaxSim in corpus chunks.

    Example:
        >>> from peft import LoraConfig
        >>> model = MultiVectorEncoder.from_pretrained("Qwen/Qwen2.5-VL-3B-Instruct", lora_config=LoraConfig(r=32))
        >>> pages = model.encode([page_image], side="document")     # TokenEmbeddings: [1, T, 128] + mask
        >>> model.score(model.encode(["revenue in 2023"]), pages)    # [1, 1] MaxSim
    """

    kind = "multi_vector"
    scorer = MAXSIM

    def __init__(self, backbone: nn.Module, processor: Any, spec: ModelSpec) -> None:
        AdapterModel.__init__(self, backbone, processor, spec)
        settings = spec.settings
        self.dim = int(settings.get("dim", DEFAULT_DIM))
        self.normalize, self.pooling = True, "tokens"
        common = dict(max_pixels=settings.get("max_pixels"), max_length=settings.get("max_length"),
                      prompts=settings.get("prompts"), fast_decode=settings.get("fast_decode", False))
        if spec.family == DUAL:
            self.featurizer = MultiVectorDualFeaturizer(processor, **common)
        else:
            self.featurizer = MultiVectorChatFeaturizer(
                processor, scored_tokens=settings.get("scored_tokens", "content"),
                query_augmentation=int(settings.get("query_augmentation", 0)),
                template=settings.get("template", "chat"), **common)
        settings["max_pixels"] = self.featurizer.max_pixels
        vision = getattr(self.config, "vision_config", None)
        if spec.family == DUAL and getattr(vision, "patch_size", None):  # a class token and the patch grid
            self.featurizer.image_tokens = (int(vision.image_size) // int(vision.patch_size)) ** 2 + 1

    @classmethod
    def from_pretrained(cls, name_or_path: str, *, dim: int | None = None, scored_tokens: str | None = None,
                        query_augmentation: int | None = None, template: str | None = None,
                        query_prompt: str | None = None, document_prompt: str | None = None,
                        options: LoadOptions | None = None, **kwargs: Any) -> MultiVectorEncoder:
        """Load a base checkpoint (adding the token projections, and LoRA / QLoRA), a folder / Hub repo saved by this
        class, or a colpali-engine ColQwen2 / ColQwen2.5 adapter (``custom_text_proj`` in its ``modules_to_save``).

        Args:
            dim: the token vectors' dimension (default 128).
            scored_tokens: ``"content"`` (the input's own tokens; chat VLMs' default) or ``"all"`` (every attended
                token, as colpali-engine), see :mod:`hf_mm_rerank.data.multi_vector_featurizer`.
            query_augmentation: augmentation tokens appended to each query (colpali-engine: 10).
            template: ``"chat"`` (the model's chat template, the side's prompt as system turn) or ``"colpali"``
                (colpali-engine's ColQwen2 layout; a colpali checkpoint defaults to it).
            query_prompt, document_prompt: instruction per side, as in :meth:`BiEncoder.from_pretrained`.
            options, **kwargs: the loading options every model shares (:class:`LoadOptions`), as in
                :meth:`BiEncoder.from_pretrained`; ``lora_config`` also trains the projections (added to its
                ``modules_to_save``).
        """
        options = LoadOptions.merged(options, kwargs)
        hub_kwargs = options.hub_kwargs
        spec = cls.find_spec(name_or_path, options)
        colpali = spec is None and _is_colpali_adapter(name_or_path, hub_kwargs)
        if colpali:  # a PEFT folder of colpali-engine's layout: all tokens, 10 augmentation tokens
            spec = cls.find_spec(name_or_path, options, {
                "dim": DEFAULT_DIM, "scored_tokens": "all", "query_augmentation": 10, "template": "colpali",
                "max_pixels": None, "max_length": None})
        elif spec is None and resolve_file(name_or_path, "adapter_config.json", **hub_kwargs) is not None:
            raise ValueError(
                f"{name_or_path} is a plain PEFT adapter: it holds no token projections, so it is no multi-vector "
                "model. Fix: load it with BiEncoder.from_pretrained (or CrossEncoder), or pass its base model here "
                "with lora_config= to train a multi-vector model.")
        settings = dict(spec.settings) if spec is not None else {}
        size = int(dim or settings.get("dim", DEFAULT_DIM))

        def prepare(backbone: nn.Module, weights: str | None) -> None:
            add_projections(backbone, detect_family(backbone), size, weights, **hub_kwargs)

        if options.lora_config is not None and spec is None:
            lora_config = copy.deepcopy(options.lora_config)
            extra = list(PROJECTIONS[DUAL])  # names a chat model does not have are ignored by peft
            lora_config.modules_to_save = sorted(set(lora_config.modules_to_save or []) | set(extra))
            options = dataclasses.replace(options, lora_config=lora_config)
        backbone, processor, spec = cls._load_parts(
            name_or_path, options, spec=spec, prepare=prepare, processor_from=spec.base_model if colpali else None)
        if spec is None:
            spec = cls._new_spec(cls.kind, name_or_path, backbone, {"max_pixels": None, "max_length": None}, options)
        given = {"dim": size, "scored_tokens": scored_tokens, "query_augmentation": query_augmentation,
                 "template": template}
        spec.settings.update({**{k: v for k, v in given.items() if v is not None}, **options.settings()})
        prompts = {k: v for k, v in (("query", query_prompt), ("document", document_prompt)) if v is not None}
        if prompts:
            spec.settings["prompts"] = {**spec.settings.get("prompts", {}), **prompts}
        return cls(backbone, processor, spec)

    # ----- embedding ----------------------------------------------------------------------------------
    def _projection(self, name: str) -> nn.Module:
        return getattr(self.base_model, name)

    def _embed(self, features: dict[str, Any] | list[dict[str, Any]]) -> torch.Tensor:
        """``[N, T, dim]`` float32: each scored token's L2-normalised vector, zeros for every other position."""
        if isinstance(features, list):
            parts = [self._embed(chunk) for chunk in features]
            width = max(p.shape[1] for p in parts)
            return torch.cat([F.pad(p, (0, 0, 0, width - p.shape[1])) for p in parts])
        features = to_device(features, self.device, self.compute_dtype, self.featurizer)
        return self._embed_dual(features) if self.spec.family == DUAL else self._embed_chat(features)

    def _tokens(self, hidden: torch.Tensor, mask: torch.Tensor, projection: str) -> torch.Tensor:
        vectors = self._projection(projection)(hidden.to(self._projection(projection).weight.dtype))
        return F.normalize(vectors.float(), dim=-1) * mask.unsqueeze(-1).to(torch.float32)

    def _embed_chat(self, features: dict[str, Any]) -> torch.Tensor:
        features = dict(features)
        mask = features.pop("token_mask")
        hidden = self.backbone(**features, use_cache=False).last_hidden_state
        return self._tokens(hidden, mask, "custom_text_proj")

    def _embed_dual(self, features: dict[str, Any]) -> torch.Tensor:
        base = self.base_model
        size = int(features["size"])
        rows: list[list[torch.Tensor]] = [[] for _ in range(size)]
        if "text" in features:
            hidden = _call(base.text_model, features["text"]).last_hidden_state
            vectors = self._tokens(hidden, features["text_token_mask"], "custom_text_proj")
            for i, row in zip(features["text_index"].tolist(), vectors):
                rows[i].append(row)
        if "image" in features:
            hidden = base.vision_model(pixel_values=features["image"]["pixel_values"]).last_hidden_state
            vectors = self._tokens(hidden, torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device),
                                   "custom_image_proj")
            for i, row in zip(features["image_index"].tolist(), vectors):
                rows[i].append(row)  # text + image inputs: the text's tokens, then the image's
        joined = [torch.cat(parts) for parts in rows]
        width = max(r.shape[0] for r in joined)
        return torch.stack([F.pad(r, (0, 0, 0, width - r.shape[0])) for r in joined])

    def encode(self, inputs: Sequence[Any], *, side: str = "query", batch_size: int = 32,
               shard_across_ranks: bool = False, show_progress: bool | None = None) -> TokenEmbeddings:
        """Embed raw inputs -> :class:`~hf_mm_rerank.retrieval.core.TokenEmbeddings` (``[N, T, dim]`` + mask, on CPU);
        ``show_progress`` as in :meth:`BiEncoder.encode`."""

        read = self.featurizer.read
        rank, size = world() if shard_across_ranks else (0, 1)
        starts = list(range(0, len(inputs), batch_size))[rank::size]
        was_training = self.training
        self.eval()
        mine = []
        count = sum(min(batch_size, len(inputs) - start) for start in starts)
        try:
            with torch.no_grad(), progress.bar(count, progress.encoding(side), show=show_progress) as shown:
                for start in starts:
                    chunk = inputs[start:start + batch_size]
                    mine.append((start, self._pack(self(self.featurizer(
                        [read(cell, start + i, side) for i, cell in enumerate(chunk)], side)))))
                    shown.update(len(chunk))
        finally:
            self.train(was_training)
        if size > 1:  # every rank gets every output, in the one-process order
            import torch.distributed as dist

            everyone: list[Any] = [None] * size
            dist.all_gather_object(everyone, mine)
            mine = sorted((part for parts in everyone for part in parts), key=lambda part: part[0])
        return TokenEmbeddings.pack([part for _, part in mine]) if mine else TokenEmbeddings(
            torch.zeros(0, 0, self.dim), torch.zeros(0, 0, dtype=torch.bool))

    @staticmethod
    def _pack(vectors: torch.Tensor) -> TokenEmbeddings:
        vectors = vectors.detach().float().cpu()
        return TokenEmbeddings.pack([TokenEmbeddings(vectors, vectors.abs().amax(-1) > 0)])

    def score(self, queries: TokenEmbeddings, documents: TokenEmbeddings) -> torch.Tensor:
        """``[len(queries), len(documents)]`` MaxSim scores."""
        return self.scorer.scores(queries, documents)


def _call(module: nn.Module, features: dict[str, Any]) -> Any:
    """``module(**features)`` with only the inputs its forward takes (a BERT tower takes token_type_ids, CLIP's not)."""
    accepted = inspect.signature(module.forward).parameters
    return module(**{k: v for k, v in features.items() if k in accepted})


def _is_colpali_adapter(name_or_path: str, hub_kwargs: dict[str, Any]) -> bool:
    path = resolve_file(name_or_path, "adapter_config.json", **hub_kwargs)
    if path is None:
        return False
    with open(path) as handle:
        config = json.load(handle)
    return "custom_text_proj" in (config.get("modules_to_save") or [])
