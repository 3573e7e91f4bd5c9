"""Reading what a folder or Hub repo holds: the processor (a damaged file named), a PEFT adapter on its base
(ours, or a plain one that peft, transformers or sentence-transformers wrote), the quantization it was trained
on, and weight files (a damaged or mismatched one named, with the fix)."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoProcessor

from .backbone import is_quantized, native_key_layout, quiet_peft
from .options import LoadOptions
from .spec import ADAPTER_WEIGHTS, ModelSpec, resolve_file

logger = logging.getLogger(__name__)


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


def recorded_quantization(spec: ModelSpec, quantization_config: Any, name_or_path: str) -> Any:
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


def plain_adapter_spec(kind: str, name_or_path: str, options: LoadOptions,
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


def has_processor(name_or_path: str, hub_kwargs: dict[str, Any]) -> bool:
    """Whether a folder/repo holds a whole processor (an image processor's config, not only a tokenizer)."""
    return any(resolve_file(name_or_path, name, **hub_kwargs) is not None
               for name in ("processor_config.json", "preprocessor_config.json"))


def load_adapter(backbone: nn.Module, name_or_path: str, is_trainable: bool, gradient_checkpointing: bool,
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
        with quiet_peft(), native_key_layout():
            model = PeftModel.from_pretrained(backbone, name_or_path, is_trainable=is_trainable, **hub_kwargs)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name_or_path}: adapter_config.json is not valid JSON ({exc}); the file is damaged or was "
                         "cut short. Fix: copy or save the model again.") from None
    for config in model.peft_config.values():  # the file's reference may be relative to the saved folder
        config.base_model_name_or_path = base
    check_adapter_keys(model, state, name_or_path)
    return model


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """``safetensors.load_file`` whose errors name the file and what to do."""
    from safetensors import SafetensorError

    try:
        return load_file(path)
    except (SafetensorError, OSError) as exc:
        raise OSError(f"{path} is damaged or incomplete ({exc}); it was probably cut short by a full disk or an "
                      "interrupted copy. Fix: copy or save it again, or load an earlier checkpoint.") from None


def check_adapter_keys(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
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
