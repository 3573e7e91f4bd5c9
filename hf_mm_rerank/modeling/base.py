"""What bi- and cross-encoders share: the saved layout, loading, LoRA/QLoRA wiring and device handling
(the saved config, base references and checksums are in :mod:`.spec`).

Saved layout of a model folder (local or a Hub repo):
- ``hf_mm_rerank_config.json``: kind, base model reference, family and the task settings;
- ``adapter_config.json`` + ``adapter_model.safetensors`` (LoRA, with any ``modules_to_save``), or the full
  backbone weights + ``config.json`` when fully fine-tuned or merged;
- ``head.safetensors`` when the model has a trained head outside the backbone;
- the processor files;
- sentence-transformers' configuration (``modules.json``, ``config_sentence_transformers.json``,
  ``sentence_bert_config.json`` and module folders), see :mod:`hf_mm_rerank.modeling.st_format`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .. import progress
from ..distributed import sharded_inference
from .backbone import (
    apply_lora,
    detect_family,
    dtype_of,
    is_quantized,
    load_backbone,
    native_key_layout,
    save_weights,
)
from .loading import (
    check_adapter_keys,
    has_processor,
    load_adapter,
    load_processor,
    plain_adapter_spec,
    read_weights,
    recorded_quantization,
)
from .options import LoadOptions
from .spec import (
    ADAPTER_WEIGHTS,
    HEAD_WEIGHTS,
    ModelSpec,
    base_reference,
    check_base,
    resolve_file,
    set_json_field,
)
from .st_format import write_st_files

logger = logging.getLogger(__name__)

def to_device(obj: Any, device: torch.device, dtype: torch.dtype | None = None, featurizer: Any = None) -> Any:
    """Move nested dicts/lists of tensors; pixel tensors also take the model's dtype (8-bit pixels are normalised on
    the device by ``featurizer.normalize_pixels``, as its image processor would)."""
    if isinstance(obj, torch.Tensor):
        if dtype is not None and obj.dtype == torch.uint8 and featurizer is not None:
            return featurizer.normalize_pixels(obj.to(device, non_blocking=True), dtype)
        if dtype is not None and obj.is_floating_point():
            return obj.to(device=device, dtype=dtype, non_blocking=True)
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device, dtype if k.startswith("pixel") or isinstance(v, dict) else None, featurizer)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device, dtype, featurizer) for v in obj)
    return obj


class AdapterModel(nn.Module):
    """Base of :class:`BiEncoder` and :class:`CrossEncoder`: a backbone (maybe a ``PeftModel``), its processor,
    an optional trained head and a :class:`ModelSpec`."""

    kind = "model"

    def __init__(self, backbone: nn.Module, processor: Any, spec: ModelSpec) -> None:
        super().__init__()
        self.backbone = backbone
        self.processor = processor
        self.spec = spec

    # ----- properties Trainer and users look for -------------------------------------------------------
    @property
    def config(self) -> Any:
        return self.base_model.config

    @property
    def base_model(self) -> nn.Module:
        """The bare transformers model under any PEFT wrapper."""
        model = self.backbone
        return model.get_base_model() if self.is_peft else model

    @property
    def _no_split_modules(self) -> list[str]:
        """The backbone's blocks, which FSDP's transformer auto-wrap policy shards as units (accelerate reads it)."""
        return list(getattr(self.base_model, "_no_split_modules", None) or [])

    @property
    def is_peft(self) -> bool:
        return hasattr(self.backbone, "peft_config")

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def compute_dtype(self) -> torch.dtype:
        return dtype_of(self.base_model)

    def heads(self) -> nn.Module | None:
        """Trained modules outside the backbone, saved to ``head.safetensors`` (none by default)."""
        return None

    def trains(self, features: Any) -> bool:
        """Whether a forward on ``features`` reaches a trainable parameter (GradCache runs only those chunks again)."""
        return any(p.requires_grad for p in self.parameters())

    @torch.no_grad()
    def _run_batched(self, items: Sequence[Any], batch_size: int, featurize: Callable[[Sequence[Any], int], Any],
                     shard_across_ranks: bool = False, *, desc: str = "Encoding", unit: str = "inputs",
                     show_progress: bool | None = None) -> torch.Tensor:
        """Inference over raw ``items`` in batches (eval mode, no grad, mode restored); ``featurize(chunk,
        offset)`` builds a batch's features with the training featurizer. Returns the outputs on CPU.

        With ``shard_across_ranks`` in a multi-process run, each rank runs a share of the batches and every rank
        gets all outputs (see :func:`hf_mm_rerank.distributed.sharded_inference`); every rank must call it. A
        progress bar (``desc``, counted in ``unit``) follows ``show_progress`` (:mod:`hf_mm_rerank.progress`).
        """
        was_training = self.training
        self.eval()
        try:
            return sharded_inference(len(items), batch_size, lambda a, b: self(featurize(items[a:b], a)),
                                     self.device, shard=shard_across_ranks,
                                     progress=lambda count: progress.bar(count, desc, unit, show_progress))
        finally:
            self.train(was_training)

    # ----- loading ------------------------------------------------------------------------------------
    @classmethod
    def find_spec(cls, name_or_path: str, options: LoadOptions,
                  defaults: dict[str, Any] | None = None) -> ModelSpec | None:
        """The saved spec of a folder/repo: one written by this class, with its base resolved (``options.base_model``
        overrides it) and checked and its weight files' checksums verified; or, given ``defaults`` (the settings of a
        new model of this class), a plain PEFT adapter folder (``adapter_config.json`` naming its base, as peft,
        transformers and sentence-transformers save one) read as an adapter with those settings. None for a base
        checkpoint."""
        spec = ModelSpec.find(name_or_path, **options.hub_kwargs)
        if spec is None:
            spec = plain_adapter_spec(cls.kind, name_or_path, options, defaults) if defaults is not None else None
        elif spec.kind != cls.kind:
            raise ValueError(f"{name_or_path} holds a {spec.kind}, not a {cls.kind}; load it with the matching class.")
        elif options.verify_checksums:
            spec.verify(name_or_path, **options.hub_kwargs)
        if spec is None:
            return None
        if options.base_model is not None:
            base = options.base_model
            spec.base_model = os.path.abspath(base) if os.path.isdir(base) else base
        if spec.adapter:
            check_base(spec.base_model, name_or_path)
        return spec

    @classmethod
    def _load_parts(cls, name_or_path: str, options: LoadOptions, *, auto_class: Any = None,
                    spec: ModelSpec | None = None, prepare: Callable[[nn.Module, str | None], None] | None = None,
                    processor_from: str | None = None) -> tuple[nn.Module, Any, ModelSpec | None]:
        """Backbone (with its adapter or a new one), processor and spec. ``prepare(backbone, weights)`` adds modules
        of the model's own to the bare backbone before any adapter (``weights``: the folder whose full weights hold
        their trained values, or None when an adapter restores them)."""
        hub_kwargs, model_kwargs = options.hub_kwargs, options.model_kwargs
        if spec is not None and spec.adapter:
            quantization_config = recorded_quantization(spec, options.quantization_config, name_or_path)
            base_kwargs = {k: v for k, v in model_kwargs.items() if k != "revision"}  # the revision is the adapter's
            backbone = load_backbone(spec.base_model, quantization_config=quantization_config, auto_class=auto_class,
                                     **base_kwargs)
            spec.family = spec.family or detect_family(backbone)  # a plain PEFT folder does not record it
            if prepare is not None:
                prepare(backbone, None)
            backbone = load_adapter(backbone, name_or_path, options.is_trainable, options.gradient_checkpointing,
                                     hub_kwargs, spec.base_model)
            if options.lora_config is not None:
                logger.warning("lora_config ignored: %s already holds an adapter, which is loaded instead.",
                               name_or_path)
            if processor_from is None and not has_processor(name_or_path, hub_kwargs):
                processor_from = spec.base_model  # a plain PEFT folder may hold the adapter alone
        else:
            quantization_config = options.quantization_config or None  # False: full precision, as for a fresh base
            backbone = load_backbone(name_or_path, quantization_config=quantization_config, auto_class=auto_class,
                                     **model_kwargs)
            if prepare is not None:
                prepare(backbone, name_or_path if spec is not None else None)
            if options.lora_config is not None:
                backbone = apply_lora(backbone, options.lora_config,
                                      gradient_checkpointing=options.gradient_checkpointing)
            elif is_quantized(backbone):
                raise ValueError(
                    "quantization_config without lora_config: a 4/8-bit model cannot be fully fine-tuned. "
                    "Fix: pass lora_config=LoraConfig(...) (QLoRA), or drop quantization_config."
                )
        processor = load_processor(processor_from or name_or_path, **hub_kwargs)
        return backbone, processor, spec

    @staticmethod
    def _new_spec(kind: str, name_or_path: str, backbone: nn.Module, settings: dict[str, Any],
                  options: LoadOptions) -> ModelSpec:
        base = backbone.get_base_model() if hasattr(backbone, "peft_config") else backbone
        quant = options.quantization_config.to_dict() if options.quantization_config else None
        local = os.path.isdir(name_or_path)  # kept absolute in memory; saved relative to the folder when inside it
        return ModelSpec(kind=kind, base_model=os.path.abspath(name_or_path) if local else str(name_or_path),
                         family=detect_family(base),
                         adapter=hasattr(backbone, "peft_config"), settings=settings, quantization=quant)

    def _load_head(self, name_or_path: str, **hub_kwargs: Any) -> None:
        heads = self.heads()
        if heads is None:
            return
        path = resolve_file(name_or_path, HEAD_WEIGHTS, **hub_kwargs)
        if path is None:
            raise FileNotFoundError(
                f"{name_or_path} has no {HEAD_WEIGHTS}, but this {self.kind} has a trained head; refusing to "
                "re-initialise it silently. Fix: load a folder written by save_pretrained()."
            )
        heads.load_state_dict(read_weights(path), strict=True)

    # ----- saving -------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str, *, save_processor: bool = True,
                        state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write adapter (or full weights), head, processor and ``hf_mm_rerank_config.json``.

        Args:
            state_dict: this model's full state dict to write instead of the live parameters: Trainer passes the
                gathered weights under FSDP / DeepSpeed ZeRO-3, where each rank holds only shards.
        """
        os.makedirs(directory, exist_ok=True)
        heads = self.heads()
        backbone_state = head_state = None
        if state_dict is not None:
            backbone_state = _prefixed(state_dict, "backbone.")
            if heads is not None:
                name = next(n for n, module in self.named_modules() if module is heads)
                head_state = _prefixed(state_dict, f"{name}.") or None
        save_weights(self.backbone, directory, state_dict=backbone_state)
        if self.is_peft:  # adapter_config.json names the base as hf_mm_rerank_config.json does
            set_json_field(os.path.join(directory, "adapter_config.json"), "base_model_name_or_path",
                            base_reference(self.spec.base_model, directory))
        if heads is not None:
            head_state = head_state if head_state is not None else heads.state_dict()
            save_file({k: v.detach().contiguous().cpu() for k, v in head_state.items()},
                      os.path.join(directory, HEAD_WEIGHTS))
        if save_processor and self.processor is not None:
            self.processor.save_pretrained(directory)

            self.spec.sentence_transformers = write_st_files(self, directory)  # SentenceTransformer(folder) loads it
        self.spec.adapter = self.is_peft
        self.spec.save(directory)

    def load_trained_weights(self, directory: str) -> None:
        """Load the trained part (adapter or full weights, and head) of a checkpoint into this model in place.

        Used for ``load_best_model_at_end`` and ``resume_from_checkpoint``.
        """
        saved = ModelSpec.find(directory)
        if saved is not None:
            saved.verify(directory)
        if self.is_peft:
            from peft.utils import set_peft_model_state_dict

            state = read_weights(os.path.join(directory, ADAPTER_WEIGHTS))
            check_adapter_keys(self.backbone, state, directory)
            set_peft_model_state_dict(self.backbone, state)
        else:
            with native_key_layout():
                fresh = type(self.base_model).from_pretrained(directory, dtype=self.compute_dtype)
            self.backbone.load_state_dict(fresh.state_dict(), strict=True)
        self._load_head(directory)

    def merge_and_unload(self) -> AdapterModel:
        """Fold the LoRA weights into the backbone; ``save_pretrained`` then writes a plain full model."""
        if not self.is_peft:
            raise ValueError("merge_and_unload: this model has no adapter to merge.")
        if is_quantized(self.base_model):
            raise ValueError("merge_and_unload: cannot merge into a 4/8-bit backbone; reload the base without "
                             "quantization_config, then merge.")
        self.backbone = self.backbone.merge_and_unload()
        self.spec.adapter = False
        return self

    # ----- training plumbing --------------------------------------------------------------------------
    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict[str, Any] | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """Called by Trainer for ``gradient_checkpointing=True``; delegates to the transformers backbone."""
        kwargs = {"use_reentrant": False, **(activation_checkpointing_kwargs or {})}
        self.base_model.activation_checkpointing_enable(
            activation_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers, offload=offload)
        if self.is_peft and kwargs["use_reentrant"] and hasattr(self.base_model, "enable_input_require_grads"):
            self.base_model.enable_input_require_grads()  # reentrant checkpoints need inputs that require grad

    def activation_checkpointing_disable(self) -> None:
        self.base_model.activation_checkpointing_disable()


def _prefixed(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix``, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
