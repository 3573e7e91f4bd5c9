"""How a model is loaded, whatever its kind: the options the three ``from_pretrained`` share.

``BiEncoder.from_pretrained(path, lora_config=..., max_pixels=...)`` and
``BiEncoder.from_pretrained(path, options=LoadOptions(lora_config=..., max_pixels=...))`` are the same call; each
class's own signature holds only what is particular to its model (pooling, head, prompts, token vectors).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .backbone import hub_kwargs_of


@dataclass
class LoadOptions:
    """Loading options shared by :class:`BiEncoder`, :class:`CrossEncoder` and :class:`MultiVectorEncoder`.

    Example::

        from peft import LoraConfig
        from transformers import BitsAndBytesConfig
        from hf_mm_rerank import BiEncoder, CrossEncoder, LoadOptions

        qlora = LoadOptions(lora_config=LoraConfig(r=16), max_pixels=448 * 448,
                            quantization_config=BitsAndBytesConfig(load_in_4bit=True))
        embedder = BiEncoder.from_pretrained("Qwen/Qwen2-VL-2B-Instruct", options=qlora)
        reranker = CrossEncoder.from_pretrained("Qwen/Qwen2-VL-2B-Instruct", head="yes_no", options=qlora)

    Attributes:
        lora_config: a ``peft.LoraConfig``; ``target_modules=None`` adapts the language model's linears.
        quantization_config: a ``transformers.BitsAndBytesConfig`` (4- or 8-bit, needs lora_config). A saved adapter
            reloads on its base quantized as it was trained, unless this is given; ``False`` loads the base in full
            precision.
        max_pixels: chat VLMs: the processor's pixel budget per image (visual tokens x patch area; default 768 visual
            tokens, or the processor's own cap when lower), applied by the processor's own resize. Dual encoders: with
            ``fast_decode``, the size images are pre-shrunk to before their processor resizes them.
        max_length: token limit for the text part of an input (the pair, for text cross-encoders).
        fast_decode: decode JPEGs at reduced scale and pre-shrink images in the DataLoader workers (faster on large
            photos; pixels then differ slightly from what the model's processor makes of the original, see the
            README's "Speed"). Default False: every image reaches the model exactly as its processor makes it.
        gradient_checkpointing: prepare k-bit models for checkpointing (Trainer enables it itself).
        is_trainable: load a saved adapter trainable (default) or frozen for inference.
        base_model: the base a saved adapter goes on, instead of the recorded one (a Hub id, or a local folder when
            the recorded local base is not on this machine).
        verify_checksums: check each weight file against the sha256 recorded when it was saved (default).
        model_kwargs: passed to the transformers ``from_pretrained`` (``dtype``, ``attn_implementation``, ...);
            ``token``, ``revision`` and ``cache_dir`` also reach every config, processor and file lookup. Keyword
            arguments of ``from_pretrained`` that are not options land here.
    """

    lora_config: Any = None
    quantization_config: Any = None
    max_pixels: int | None = None
    max_length: int | None = None
    fast_decode: bool | None = None
    gradient_checkpointing: bool = False
    is_trainable: bool = True
    base_model: str | None = None
    verify_checksums: bool = True
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def merged(cls, options: LoadOptions | None, kwargs: dict[str, Any]) -> LoadOptions:
        """A copy of ``options`` (or the defaults) with the keyword arguments applied: those named like an option
        set it, the others are model kwargs. The caller's ``options`` is not changed."""
        names = {f.name for f in dataclasses.fields(cls)} - {"model_kwargs"}
        given = {k: v for k, v in kwargs.items() if k in names}
        base = options if options is not None else cls()
        return dataclasses.replace(base, **given, model_kwargs={
            **base.model_kwargs, **{k: v for k, v in kwargs.items() if k not in names}})

    @property
    def hub_kwargs(self) -> dict[str, Any]:
        """The model kwargs that also apply to configs, processors and our own files on the Hub."""
        return hub_kwargs_of(self.model_kwargs)

    def settings(self) -> dict[str, Any]:
        """The options a saved model records in its settings, where given (a saved value stays otherwise)."""
        given = {"max_pixels": self.max_pixels, "max_length": self.max_length, "fast_decode": self.fast_decode}
        return {k: v for k, v in given.items() if v is not None}
