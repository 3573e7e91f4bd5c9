"""Featurizers: lists of :class:`~hf_mm_rerank.inputs.MMInput` in, processor tensors out.

A featurizer is the processor-side half of a backbone family. Collators call it in DataLoader workers;
``BiEncoder.encode`` and the evaluators call the very same object, so training and inference see identical
pixels and tokens. Featurizers are plain picklable objects (a processor plus settings).
"""

from __future__ import annotations

from typing import Any

import torch

from .inputs import MMInput

SIDES = ("query", "document")
# Default visual-token budget for chat VLMs when the user gives no max_pixels.
DEFAULT_VISUAL_TOKENS = 768


class Featurizer:
    """Base class. Subclasses implement :meth:`__call__` for one backbone family."""

    def __init__(self, processor: Any, *, max_pixels: int | None = None, max_length: int | None = None,
                 prompts: dict[str, str] | None = None) -> None:
        self.processor = processor
        self.max_pixels = max_pixels
        self.max_length = max_length
        self.prompts = dict(prompts or {})
        unknown = set(self.prompts) - set(SIDES)
        if unknown:
            raise ValueError(f"prompts: unknown side(s) {sorted(unknown)}; use the keys 'query' and 'document'.")

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    def __call__(self, items: list[MMInput], side: str = "query") -> dict[str, Any]:
        raise NotImplementedError

    def chunks(self, items: list[MMInput], side: str, size: int | None) -> list[dict[str, Any]]:
        """Featurize ``items`` as consecutive mini-batches of at most ``size`` (all at once when None)."""
        size = size or max(1, len(items))
        return [self(items[i:i + size], side) for i in range(0, len(items), size)]


class DualEncoderFeaturizer(Featurizer):
    """CLIP, SigLIP, VisionTextDualEncoder: text and images go to separate towers.

    An input with both text and image is embedded by both towers and the two embeddings are averaged.
    The optional prompt of a side is prepended to its text.
    """

    def __call__(self, items: list[MMInput], side: str = "query") -> dict[str, Any]:
        prompt = self.prompts.get(side, "")
        text_idx = [i for i, item in enumerate(items) if item.text is not None]
        image_idx = [i for i, item in enumerate(items) if item.image is not None]
        features: dict[str, Any] = {"size": torch.tensor(len(items))}
        if text_idx:
            features["text"] = dict(self.tokenizer(
                [prompt + items[i].text for i in text_idx], padding=self._padding(), truncation=True,
                max_length=self._max_length(), return_tensors="pt"))
            features["text_index"] = torch.tensor(text_idx)
        if image_idx:
            image_processor = self.processor.image_processor
            features["image"] = dict(image_processor(images=[items[i].image for i in image_idx],
                                                     return_tensors="pt"))
            features["image_index"] = torch.tensor(image_idx)
        return features

    def _padding(self) -> str | bool:
        # SigLIP was trained with max_length padding; its text tower pools the last position.
        return "max_length" if self._is_siglip() else True

    def _is_siglip(self) -> bool:
        return "siglip" in type(self.processor).__name__.lower()

    def _max_length(self) -> int | None:
        if self.max_length:
            return self.max_length
        limit = getattr(self.tokenizer, "model_max_length", None)
        return limit if limit and limit < 100_000 else 64 if self._is_siglip() else None


class ChatFeaturizer(Featurizer):
    """Chat VLMs (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, ...): each input becomes one chat-templated sequence.

    The side's prompt becomes the system instruction (as Qwen3-VL-Embedding expects); the user turn holds the
    image (if any) then the text. ``max_length`` truncates the text part only, never image tokens.
    """

    def __init__(self, processor: Any, **kwargs: Any) -> None:
        super().__init__(processor, **kwargs)
        if getattr(processor, "chat_template", None) is None and getattr(self.tokenizer, "chat_template", None) is None:
            raise ValueError(
                f"{type(processor).__name__} has no chat template; chat VLM backbones need one. Fix: set "
                "processor.chat_template (or save one with the checkpoint)."
            )
        if self.max_pixels is None:
            self.max_pixels = default_max_pixels(processor)

    def messages(self, item: MMInput, side: str) -> list[dict[str, Any]]:
        content: list[dict[str, Any]] = []
        if item.image is not None:
            content.append({"type": "image"})
        if item.text is not None:
            content.append({"type": "text", "text": self._truncate(item.text)})
        messages = [{"role": "user", "content": content}]
        if self.prompts.get(side):
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": self.prompts[side]}]})
        return messages

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        return self.processor.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def __call__(self, items: list[MMInput], side: str = "query") -> dict[str, Any]:
        texts = [self.render(self.messages(item, side)) for item in items]
        return self.encode_texts(texts, [item.image for item in items if item.image is not None])

    def encode_texts(self, texts: list[str], images: list[Any]) -> dict[str, Any]:
        return dict(self.processor(text=texts, images=images or None, padding=True, return_tensors="pt"))

    def _truncate(self, text: str) -> str:
        if not self.max_length:
            return text
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= self.max_length else self.tokenizer.decode(ids[: self.max_length])


def default_max_pixels(processor: Any) -> int | None:
    """Pixel budget for ``DEFAULT_VISUAL_TOKENS`` visual tokens of a Qwen-style image processor."""
    image_processor = getattr(processor, "image_processor", None)
    patch = getattr(image_processor, "patch_size", None)
    if not patch:
        return None
    merge = getattr(image_processor, "merge_size", 1) or 1
    return DEFAULT_VISUAL_TOKENS * (patch * merge) ** 2


def dual_default_max_pixels(processor: Any) -> int | None:
    """Images are only shrunk to about 4x the tower's input size: the processor does the final resize."""
    size = getattr(getattr(processor, "image_processor", None), "size", None) or {}
    side = size.get("shortest_edge") or size.get("height")
    return int((2 * side) ** 2) if side else None

