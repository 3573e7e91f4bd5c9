"""BiEncoder: a multimodal embedding model (dual encoder or chat VLM) with optional LoRA/QLoRA."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .. import progress
from ..data.featurizers import ChatFeaturizer, DualEncoderFeaturizer, Featurizer, dual_default_max_pixels
from .backbone import CHAT, DUAL
from .base import AdapterModel, to_device
from .options import LoadOptions
from .spec import ModelSpec, resolve_file

POOLINGS = {DUAL: ("auto", "model"), CHAT: ("auto", "last", "mean")}


def last_token_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Hidden state at each row's last attended position (works for left and right padding)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = (positions * mask.long()).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


def _pooled(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class BiEncoder(AdapterModel):
    """Embeds queries and documents (text, images or both) into one vector space.

    Example:
        >>> from peft import LoraConfig
        >>> model = BiEncoder.from_pretrained("openai/clip-vit-base-patch32", lora_config=LoraConfig(r=8))
        >>> emb = model.encode(["a red bicycle", "photo.jpg"])          # [2, D], L2-normalised
    """

    kind = "bi_encoder"

    def __init__(self, backbone: torch.nn.Module, processor: Any, spec: ModelSpec) -> None:
        super().__init__(backbone, processor, spec)
        settings = spec.settings
        pooling = settings.get("pooling", "auto")
        if pooling not in POOLINGS[spec.family]:
            raise ValueError(f"pooling={pooling!r} is not valid for a {spec.family}; use one of "
                             f"{POOLINGS[spec.family]}.")
        self.pooling = "last" if pooling == "auto" and spec.family == CHAT else pooling
        self.normalize = bool(settings.get("normalize", True))
        featurizer_cls = DualEncoderFeaturizer if spec.family == DUAL else ChatFeaturizer
        max_pixels = settings.get("max_pixels")
        if max_pixels is None and spec.family == DUAL:
            max_pixels = dual_default_max_pixels(processor)
        self.featurizer: Featurizer = featurizer_cls(
            processor, max_pixels=max_pixels, max_length=settings.get("max_length"),
            prompts=settings.get("prompts"), fast_decode=settings.get("fast_decode", False))
        settings["max_pixels"] = self.featurizer.max_pixels
        vision = getattr(self.config, "vision_config", None)
        if spec.family == DUAL and getattr(vision, "patch_size", None):  # a class token and the patch grid
            self.featurizer.image_tokens = (int(vision.image_size) // int(vision.patch_size)) ** 2 + 1

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        pooling: str | None = None,
        normalize: bool | None = None,
        query_prompt: str | None = None,
        document_prompt: str | None = None,
        options: LoadOptions | None = None,
        **kwargs: Any,
    ) -> BiEncoder:
        """Load a base checkpoint (optionally adding LoRA / QLoRA), a folder/repo saved by this class, or a plain
        PEFT adapter folder (peft's, transformers', or sentence-transformers' after ``add_adapter``) on its base.

        Args:
            name_or_path: a transformers checkpoint (CLIP, SigLIP, VisionTextDualEncoder, a chat VLM), a folder /
                Hub repo written by :meth:`save_pretrained`, or a PEFT adapter folder naming its base.
            pooling: ``"auto"``, ``"last"`` or ``"mean"`` (chat VLMs); dual encoders use their own heads.
            normalize: L2-normalise embeddings (default True; a sentence-transformers folder: whether its
                ``modules.json`` lists a Normalize module).
            query_prompt, document_prompt: instruction per side (system turn for VLMs, prefix otherwise).
            options: the loading options every model shares (:class:`LoadOptions`: ``lora_config``,
                ``quantization_config``, ``max_pixels``, ``max_length``, ``fast_decode``, ``base_model``, ...).
            **kwargs: any :class:`LoadOptions` field by name (over ``options``); the rest go to the transformers
                ``from_pretrained`` (``dtype``, ``attn_implementation``, ``token``, ``revision``, ...).
        """
        options = LoadOptions.merged(options, kwargs)
        defaults = {"pooling": "auto", "normalize": True, "max_pixels": None, "max_length": None}
        spec = cls.find_spec(name_or_path, options, defaults)
        if spec is not None and not spec.family:  # a plain PEFT folder: sentence-transformers' may say it normalises
            spec.settings.update(_st_normalize(name_or_path, options))
        backbone, processor, spec = cls._load_parts(name_or_path, options, spec=spec)
        if spec is None:
            spec = cls._new_spec(cls.kind, name_or_path, backbone, defaults, options)
        given = {"pooling": pooling, "normalize": normalize}
        spec.settings.update({**{k: v for k, v in given.items() if v is not None}, **options.settings()})
        prompts = {k: v for k, v in (("query", query_prompt), ("document", document_prompt)) if v is not None}
        if prompts:
            spec.settings["prompts"] = {**spec.settings.get("prompts", {}), **prompts}
        return cls(backbone, processor, spec)

    # ----- embedding ----------------------------------------------------------------------------------
    def forward(self, *sides: dict[str, Any] | list[dict[str, Any]]) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Embed featurized inputs (one chunk or a list of chunks) -> ``[N, D]`` float32.

        Several arguments (e.g. queries, positives, negatives) give one tensor each, from one call: under DDP a
        training step must run one forward per backward.
        """
        if len(sides) != 1:
            return tuple(self._embed(side) for side in sides)
        return self._embed(sides[0])

    def _embed(self, features: dict[str, Any] | list[dict[str, Any]]) -> torch.Tensor:
        if isinstance(features, list):
            return torch.cat([self._embed(chunk) for chunk in features])
        features = to_device(features, self.device, self.compute_dtype, self.featurizer)
        embeddings = self._embed_dual(features) if self.spec.family == DUAL else self._embed_chat(features)
        return F.normalize(embeddings, dim=-1) if self.normalize else embeddings

    def _embed_chat(self, features: dict[str, Any]) -> torch.Tensor:
        hidden = self.backbone(**features, use_cache=False).last_hidden_state
        pool = last_token_pool if self.pooling == "last" else mean_pool
        return pool(hidden, features["attention_mask"]).float()

    def _embed_dual(self, features: dict[str, Any]) -> torch.Tensor:
        parts = []
        if "text" in features:
            parts.append((features["text_index"], _pooled(self.backbone.get_text_features(**features["text"]))))
        if "image" in features:
            parts.append((features["image_index"], _pooled(self.backbone.get_image_features(**features["image"]))))
        size = int(features["size"])
        dim = parts[0][1].shape[-1]
        total = torch.zeros(size, dim, device=self.device, dtype=torch.float32)
        count = torch.zeros(size, 1, device=self.device, dtype=torch.float32)
        for index, emb in parts:
            emb = emb.float()
            # Text+image inputs average the two towers' (normalised) embeddings.
            total = total.index_add(0, index, F.normalize(emb, dim=-1) if self.normalize else emb)
            count = count.index_add(0, index, torch.ones_like(emb[:, :1]))
        return total / count.clamp(min=1)

    TOWERS = {"text": ("text_model", "text_projection", "custom_text_proj"),
              "image": ("vision_model", "visual_projection", "custom_image_proj")}

    def trains(self, features: Any) -> bool:
        """A dual encoder's chunk trains something only if the tower it runs through (text or image, with its
        projection) has trainable parameters: a frozen tower's chunks are not run again by GradCache."""
        if self.spec.family != DUAL:
            return super().trains(features)
        parts = [self.TOWERS[side] for side in ("text", "image") if side in features]
        names = [f".{n}." for n, p in self.named_parameters() if p.requires_grad]
        return any(f".{part}." in name for tower in parts for part in tower for name in names)

    def encode(self, inputs: Sequence[Any], *, side: str = "query", batch_size: int = 32,
               shard_across_ranks: bool = False, show_progress: bool | None = None) -> torch.Tensor:
        """Embed raw inputs (text, PIL images, paths, bytes, ``{"text", "image"}`` dicts) -> ``[N, D]`` on CPU.

        Uses the same featurizer as training, so images are resized and processed identically. With
        ``shard_across_ranks`` in a multi-process run, every rank embeds a share and gets all embeddings (every
        rank must call it). ``show_progress``: a progress bar (default: for 1,000 inputs or more on a terminal; see
        :mod:`hf_mm_rerank.progress`).
        """
        def featurize(chunk: Sequence[Any], start: int) -> dict[str, Any]:
            read = self.featurizer.read
            return self.featurizer([read(cell, start + i, side) for i, cell in enumerate(chunk)], side)

        return self._run_batched(inputs, batch_size, featurize, shard_across_ranks, desc=progress.encoding(side),
                                 show_progress=show_progress)


def _st_normalize(name_or_path: str, options: LoadOptions) -> dict[str, Any]:
    """A sentence-transformers folder normalises exactly when its ``modules.json`` lists a Normalize module."""
    path = resolve_file(name_or_path, "modules.json", **options.hub_kwargs)
    if path is None:
        return {}
    with open(path) as handle:
        modules = json.load(handle)
    return {"normalize": any(str(m.get("type", "")).endswith("Normalize") for m in modules)}
