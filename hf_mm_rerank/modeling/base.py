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

import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoProcessor

from ..distributed import sharded_inference
from .backbone import (
    apply_lora,
    detect_family,
    dtype_of,
    is_quantized,
    load_backbone,
    quiet_peft,
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
                     shard_across_ranks: bool = False) -> torch.Tensor:
        """Inference over raw ``items`` in batches (eval mode, no grad, mode restored); ``featurize(chunk,
        offset)`` builds a batch's features with the training featurizer. Returns the outputs on CPU.

        With ``shard_across_ranks`` in a multi-process run, each rank runs a share of the batches and every rank
        gets all outputs (see :func:`hf_mm_rerank.distributed.sharded_inference`); every rank must call it.
        """
        was_training = self.training
        self.eval()
        try:
            return sharded_inference(len(items), batch_size, lambda a, b: self(featurize(items[a:b], a)),
                                     self.device, shard=shard_across_ranks)
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
            spec = _plain_adapter_spec(cls.kind, name_or_path, options, defaults) if defaults is not None else None
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
            quantization_config = _recorded_quantization(spec, options.quantization_config, name_or_path)
            base_kwargs = {k: v for k, v in model_kwargs.items() if k != "revision"}  # the revision is the adapter's
            backbone = load_backbone(spec.base_model, quantization_config=quantization_config, auto_class=auto_class,
                                     **base_kwargs)
            spec.family = spec.family or detect_family(backbone)  # a plain PEFT folder does not record it
            if prepare is not None:
                prepare(backbone, None)
            backbone = _load_adapter(backbone, name_or_path, options.is_trainable, options.gradient_checkpointing,
                                     hub_kwargs, spec.base_model)
            if options.lora_config is not None:
                logger.warning("lora_config ignored: %s already holds an adapter, which is loaded instead.",
                               name_or_path)
            if processor_from is None and not _has_processor(name_or_path, hub_kwargs):
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
        self.backbone.save_pretrained(directory, state_dict=backbone_state)
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
            _check_adapter_keys(self.backbone, state, directory)
            set_peft_model_state_dict(self.backbone, state)
        else:
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


# The processor's own files (tokenizer, image/video processor, chat template): a damaged one is named on load.
PROCESSOR_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json",
                   "chat_template.json")


def load_processor(name_or_path: str, **hub_kwargs: Any) -> Any:
    """``AutoProcessor.from_pretrained`` whose failure on a damaged file names that file and the fix (the tokenizers
    library reports a cut-short ``tokenizer.json`` as a bare JSON error at some line and column)."""
    try:
        return AutoProcessor.from_pretrained(name_or_path, **hub_kwargs)
    except Exception as error:
        for name in PROCESSOR_FILES:
            path = resolve_file(name_or_path, name, **hub_kwargs)
            if path is None:
                continue
            try:
                with open(path, encoding="utf-8") as handle:
                    json.load(handle)
            except (ValueError, UnicodeDecodeError) as damage:
                raise ValueError(f"{path} is damaged or incomplete ({damage}); it was probably cut short by a full "
                                 "disk or an interrupted copy, so the processor cannot load. Fix: copy or save the "
                                 "model again (save_pretrained writes the processor with it).") from None
        raise error


def _recorded_quantization(spec: ModelSpec, quantization_config: Any, name_or_path: str) -> Any:
    """The quantization to load an adapter's base with: the caller's, else the one it was trained with (an
    adapter trained on a 4-bit base gives other outputs on a full-precision one); ``False`` asks for full precision."""
    if quantization_config is False:
        if spec.quantization:
            logger.info("%s was trained on a quantized base; loading it in full precision as asked "
                        "(quantization_config=False).", name_or_path)
        return None
    if quantization_config is not None or not spec.quantization:
        return quantization_config
    from transformers import BitsAndBytesConfig

    recorded = BitsAndBytesConfig.from_dict(dict(spec.quantization))
    logger.info("%s was trained on a %s-bit base: loading it quantized the same way (pass quantization_config=False "
                "for full precision).", name_or_path, 4 if recorded.load_in_4bit else 8)
    return recorded


def _plain_adapter_spec(kind: str, name_or_path: str, options: LoadOptions,
                        defaults: dict[str, Any]) -> ModelSpec | None:
    """A spec for a PEFT adapter folder/repo that this package did not write (its family is read from the base when
    it loads), or None when ``name_or_path`` holds no ``adapter_config.json``."""
    path = resolve_file(name_or_path, "adapter_config.json", **options.hub_kwargs)
    if path is None:
        return None
    with open(path) as handle:
        try:
            base = json.load(handle).get("base_model_name_or_path")
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}); the file is damaged or was cut short. Fix: copy or "
                             "save the adapter again.") from None
    if not base and options.base_model is None:
        raise ValueError(f"{name_or_path} is a PEFT adapter whose adapter_config.json names no base model. Fix: pass "
                         "base_model='<Hub id or local folder of the base it was trained on>'.")
    base = base or options.base_model
    return ModelSpec(kind=kind, base_model=os.path.abspath(base) if os.path.isdir(base) else base, family="",
                     adapter=True, settings=dict(defaults))


def _has_processor(name_or_path: str, hub_kwargs: dict[str, Any]) -> bool:
    """Whether a folder/repo holds a whole processor (an image processor's config, not only a tokenizer)."""
    return any(resolve_file(name_or_path, name, **hub_kwargs) is not None
               for name in ("processor_config.json", "preprocessor_config.json"))


def _prefixed(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix``, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _load_adapter(backbone: nn.Module, name_or_path: str, is_trainable: bool, gradient_checkpointing: bool,
                  hub_kwargs: dict[str, Any], base: str) -> nn.Module:
    from peft import PeftModel, prepare_model_for_kbit_training

    if is_quantized(backbone) and is_trainable:
        with quiet_peft():
            backbone = prepare_model_for_kbit_training(
                backbone, use_gradient_checkpointing=gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False})
    path = resolve_file(name_or_path, ADAPTER_WEIGHTS, **hub_kwargs)
    if path is None:  # checked first: PEFT would take the folder for a Hub repo id and fail on that
        raise FileNotFoundError(f"{name_or_path}: {ADAPTER_WEIGHTS} is missing, so the adapter cannot be loaded. "
                                "Fix: copy the whole folder written by save_pretrained(), or save it again.")
    state = read_weights(path)  # a damaged file is named here, not as a bare safetensors error
    try:
        with quiet_peft():
            model = PeftModel.from_pretrained(backbone, name_or_path, is_trainable=is_trainable, **hub_kwargs)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name_or_path}: adapter_config.json is not valid JSON ({exc}); the file is damaged or was "
                         "cut short. Fix: copy or save the model again.") from None
    for config in model.peft_config.values():  # the file's reference may be relative to the saved folder
        config.base_model_name_or_path = base
    _check_adapter_keys(model, state, name_or_path)
    return model


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """``safetensors.load_file`` whose errors name the file and what to do."""
    from safetensors import SafetensorError

    try:
        return load_file(path)
    except (SafetensorError, OSError) as exc:
        raise OSError(f"{path} is damaged or incomplete ({exc}); it was probably cut short by a full disk or an "
                      "interrupted copy. Fix: copy or save it again, or load an earlier checkpoint.") from None


def _check_adapter_keys(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Refuse checkpoints whose adapter tensors do not match the model one to one (PEFT only warns)."""
    from peft.utils import get_peft_model_state_dict

    expected = get_peft_model_state_dict(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{where}: the adapter weights do not match the model (missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, shape-mismatched {mismatched[:5]}). Fix: load it on the base model it was "
            "trained from, with the same LoRA settings."
        )
