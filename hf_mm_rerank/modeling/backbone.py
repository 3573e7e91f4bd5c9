"""Backbone loading: family detection, dtype/attention pass-through, 4/8-bit quantization and LoRA.

Module selection is by module *type*, never by a name regex:
- the vision tower is every top-most module whose ``config`` is of the checkpoint's vision-config class;
- the language model's linear layers are the ``nn.Linear`` modules that live inside a transformer block
  list (an ``nn.ModuleList``) outside the vision tower;
- everything else (vision tower, projection and pooling heads, merger) stays out of quantization.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig

logger = logging.getLogger(__name__)

DUAL = "dual_encoder"
CHAT = "chat_vlm"
TEXT = "text_encoder"


def detect_family(model: nn.Module) -> str:
    """``dual_encoder`` for models with text and image feature methods, ``text_encoder`` for sequence classifiers
    (BERT-style cross-encoders), else ``chat_vlm``."""
    if hasattr(model, "get_text_features") and hasattr(model, "get_image_features"):
        return DUAL
    if type(model).__name__.endswith("ForSequenceClassification"):
        return TEXT
    return CHAT


def vision_roots(model: nn.Module) -> list[str]:
    """Names of the top-most modules that hold the vision tower (matched by config class)."""
    vision_config = getattr(model.config, "vision_config", None)
    if vision_config is None:
        return []
    roots: list[str] = []
    for name, module in model.named_modules():
        config = getattr(module, "config", None)
        if name and isinstance(config, PretrainedConfig) and type(config) is type(vision_config):
            if not any(name.startswith(root + ".") for root in roots):
                roots.append(name)
    return roots


def _inside(name: str, roots: list[str]) -> bool:
    return any(name == root or name.startswith(root + ".") for root in roots)


def _block_list_prefixes(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.ModuleList) and name]


def language_linear_names(model: nn.Module) -> list[str]:
    """The language/text model's linear layers inside transformer blocks (default LoRA and 4-bit targets)."""
    roots = vision_roots(model)
    blocks = _block_list_prefixes(model)
    return [
        name for name, module in model.named_modules()
        if _is_linear(module) and not _inside(name, roots) and any(name.startswith(b + ".") for b in blocks)
    ]


def _is_linear(module: nn.Module) -> bool:
    # bitsandbytes' Linear4bit / Linear8bitLt subclass nn.Linear.
    return isinstance(module, nn.Linear)


def quantization_skip_modules(model: nn.Module) -> list[str]:
    """Everything that must stay in full precision: the vision tower and every linear outside the blocks."""
    roots = vision_roots(model)
    targets = set(language_linear_names(model))
    heads = [name for name, module in model.named_modules()
             if _is_linear(module) and name not in targets and not _inside(name, roots)]
    return roots + heads


def _skeleton(config: PretrainedConfig, model_kwargs: dict[str, Any], auto_class: Any = AutoModel) -> nn.Module:
    from accelerate import init_empty_weights

    with init_empty_weights():
        return auto_class.from_config(config, trust_remote_code=model_kwargs.get("trust_remote_code", False))


def _quantization_config(quantization_config: Any, config: PretrainedConfig, model_kwargs: dict[str, Any],
                         auto_class: Any = AutoModel) -> Any:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("quantization_config needs bitsandbytes: pip install 'hf_mm_rerank[qlora]'") from exc
    import importlib.util

    import torch

    if not torch.cuda.is_available() and importlib.util.find_spec("kernels") is None:
        logger.info("hf_mm_rerank: 4/8-bit weights on the CPU use bitsandbytes' reference kernels (`pip install "
                    "kernels` may give faster ones).")
    quantization_config = copy.deepcopy(quantization_config)
    skip = quantization_skip_modules(_skeleton(config, model_kwargs, auto_class))
    user_skip = list(getattr(quantization_config, "llm_int8_skip_modules", None) or [])
    quantization_config.llm_int8_skip_modules = sorted(set(user_skip + skip))
    return quantization_config


def hub_kwargs_of(model_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The ``from_pretrained`` kwargs that also apply to configs, processors and our own files on the Hub."""
    return {k: model_kwargs[k] for k in ("revision", "token", "cache_dir") if k in model_kwargs}


def load_backbone(name_or_path: str, *, quantization_config: Any = None, auto_class: Any = None,
                  **model_kwargs: Any) -> nn.Module:
    """Load the backbone with dtype/attention/quantization settings.

    ``auto_class`` defaults to ``AutoModel`` (the bare model: no LM head), what bi-encoders need; rerankers
    pass ``AutoModelForImageTextToText`` (yes/no head) or ``AutoModelForSequenceClassification``.
    """
    auto_class = auto_class or AutoModel
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=model_kwargs.get("trust_remote_code", False),
                                        **hub_kwargs_of(model_kwargs))
    if quantization_config is not None:
        model_kwargs["quantization_config"] = _quantization_config(quantization_config, config, model_kwargs,
                                                                   auto_class)
        if torch.cuda.is_available() and "device_map" not in model_kwargs:
            # bitsandbytes weights are quantized as they land on the GPU; each process takes its own.
            model_kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0))}
    with native_key_layout():
        model = auto_class.from_pretrained(name_or_path, **model_kwargs)
    if quantization_config is not None:
        _keep_cpu_4bit_trainable(model)
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    linear_patch_embeddings(model)
    return model


class PatchConv3d(nn.Conv3d):
    """A ``Conv3d`` whose kernel is its stride (the patch embedding of Qwen2-VL, Qwen2.5-VL and Qwen3-VL, which feed it
    one patch per row) computed, on inputs of exactly one kernel, as the matrix product it is: the same weights and
    state dict, the same values to float rounding, and on a CPU about half the time of the convolution forward and
    backward (3D convolutions have no fast kernels there; vLLM makes the same substitution on GPUs)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or tuple(x.shape[2:]) != tuple(self.kernel_size):
            return super().forward(x)
        out = nn.functional.linear(x.reshape(x.shape[0], -1), self.weight.reshape(self.out_channels, -1), self.bias)
        return out.view(x.shape[0], self.out_channels, 1, 1, 1)


def linear_patch_embeddings(model: nn.Module) -> int:
    """Run every patch-embedding ``Conv3d`` of ``model`` (kernel = stride, no padding, dilation or groups) as
    :class:`PatchConv3d`; the number of modules changed."""
    changed = 0
    for module in model.modules():
        if (type(module) is nn.Conv3d and tuple(module.kernel_size) == tuple(module.stride) and module.groups == 1
                and tuple(module.padding) == (0, 0, 0) and tuple(module.dilation) == (1, 1, 1)):
            module.__class__ = PatchConv3d
            changed += 1
    return changed


def _keep_cpu_4bit_trainable(model: nn.Module) -> None:
    """bitsandbytes 0.50 repacks 4-bit CPU weights for AVX512-BF16 inference on the first no-grad eval forward;
    a later training forward then fails in place on layers with a bias (Qwen2-VL's q/k/v). Evaluating before
    and during training is normal here, so the repacking is switched off (it only speeds up CPU inference)."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def is_quantized(model: nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """peft reads transformers' deprecated ``is_gradient_checkpointing`` whenever it wraps a model: a FutureWarning on
    every run that the user cannot act on (peft's to fix). Wrapping calls go through here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def apply_lora(model: nn.Module, lora_config: Any, *, gradient_checkpointing: bool = False) -> nn.Module:
    """Wrap ``model`` with ``peft.get_peft_model``; default targets are the language model's linear layers."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    lora_config = copy.deepcopy(lora_config)
    if not getattr(lora_config, "target_modules", None):
        targets = language_linear_names(model)
        if not targets:
            raise ValueError(
                f"lora_config: found no linear layers in {type(model).__name__}'s language model to adapt. "
                "Fix: set LoraConfig(target_modules=[...]) explicitly."
            )
        lora_config.target_modules = targets
    with quiet_peft():
        if is_quantized(model):
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        return get_peft_model(model, lora_config)


def dtype_of(model: nn.Module) -> torch.dtype:
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return torch.float32


@contextlib.contextmanager
def native_key_layout() -> Iterator[None]:
    """transformers' own checkpoint key conversions only, for the duration: another library may have registered one
    for a model type process-wide (``transformers.conversion_mapping.register_checkpoint_conversion_mapping``).
    colpali-engine 0.3.18 does so for ``qwen3_vl`` on import (its ColQwen3 layout); a model loaded or built while it
    is registered is saved with it reversed, as ``model.model.*`` keys that plain transformers and vLLM do not load
    (their weights stay random). Every load and save of a backbone runs inside this
    (tests/test_export.py::test_exports_keep_transformers_key_layout_when_another_library_registered_one)."""
    from transformers import conversion_mapping as mapping

    cache = getattr(mapping, "_checkpoint_conversion_mapping_cache", None)
    registered = getattr(mapping, "USER_REGISTERED_MAPPINGS", None)
    foreign = [name for name in (registered or ()) if cache is not None and name in cache]
    if not foreign:
        yield
        return
    native = mapping._build_checkpoint_conversion_mapping()
    hidden = {name: cache.pop(name) for name in foreign}
    cache.update({name: native[name] for name in foreign if name in native})
    try:
        yield
    finally:
        for name, conversions in hidden.items():
            cache[name] = conversions


def save_weights(model: nn.Module, folder: str, **kwargs: Any) -> None:
    """``model.save_pretrained(folder, **kwargs)`` in transformers' own key layout (:func:`native_key_layout`)."""
    with native_key_layout():
        model.save_pretrained(folder, **kwargs)
