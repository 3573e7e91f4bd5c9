"""Featurizers: lists of :class:`~hf_mm_rerank.data.inputs.MMInput` in, processor tensors out.

A featurizer is the processor-side half of a backbone family. Collators call it in DataLoader workers;
``BiEncoder.encode`` and the evaluators call the very same object, so training and inference see identical
pixels and tokens. Featurizers are plain picklable objects (a processor plus settings).
"""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image

from .inputs import InputError, MMInput, to_input
from .minibatch import Chunker

SIDES = ("query", "document")
# Default visual-token budget for chat VLMs when the user gives no max_pixels.
DEFAULT_VISUAL_TOKENS = 768
# Default bound on each text part of a chat VLM input, in tokens, when the user gives no max_length.
DEFAULT_TEXT_TOKENS = 8192
# Qwen-VL processors refuse images whose long side exceeds this many times the short side.
MAX_ASPECT_RATIO = 200


def planar(image: Any) -> torch.Tensor:
    """An RGB PIL image as a ``[3, H, W]`` uint8 tensor, copied band by band."""
    import numpy as np

    width, height = image.size
    out = torch.empty(3, height, width, dtype=torch.uint8)
    view = out.numpy()
    for i, band in enumerate(image.split()):
        np.copyto(view[i], np.asarray(band))
    return out


class Featurizer:
    """Base class. Subclasses implement :meth:`__call__` for one backbone family."""

    supports_images = True
    image_tokens = 1  # the tokens one image costs (dual encoders: set from the vision tower's patch grid)

    def __init__(self, processor: Any, *, max_pixels: int | None = None, max_length: int | None = None,
                 prompts: dict[str, str] | None = None, fast_decode: bool = False) -> None:
        self.processor = processor
        self.max_pixels = max_pixels
        self.max_length = max_length
        self.fast_decode = bool(fast_decode)
        self.prompts = dict(prompts or {})
        unknown = set(self.prompts) - set(SIDES)
        if unknown:
            raise ValueError(f"prompts: unknown side(s) {sorted(unknown)}; use the keys 'query' and 'document'.")

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    @property
    def decode_pixels(self) -> int | None:
        """The pixel budget images are shrunk to while they are decoded: none by default (the processor resizes the
        original itself, so the model sees what its processor makes); ``max_pixels`` with ``fast_decode``
        (reduced-scale JPEG decoding and pre-shrinking in the workers: faster, pixels slightly different)."""
        return self.max_pixels if self.fast_decode else None

    def read(self, cell: Any, row: Any = None, column: str | None = None, *, decode: bool = True,
             kind: str = "auto") -> MMInput:
        """One cell -> :class:`MMInput` as this featurizer takes it; errors name the row and column."""
        item = to_input(cell, max_pixels=self.decode_pixels, row=row, column=column, decode=decode, kind=kind)
        return self.check(item, row, column)

    def __call__(self, items: list[MMInput], side: str = "query") -> dict[str, Any]:
        raise NotImplementedError

    def check(self, item: MMInput, row: Any, column: str) -> MMInput:
        """Refuse images when this featurizer reads text only, naming the row and column."""
        if item.image is not None and not self.supports_images:
            raise InputError(f"row {row}, column '{column}': received an image, but this text cross-encoder "
                             "(head='classification' without a chat template) reads text only. Fix: use a "
                             "chat VLM backbone (head='yes_no' or 'linear'), or pass text.")
        return item

    def head_tokens(self, text: str, tokens: int) -> str:
        """``text`` cut to its first ``tokens`` tokens (unchanged when shorter)."""
        if 4 * len(text) <= tokens:  # a character is at most 4 byte tokens: no need to tokenize
            return text
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= tokens else self.tokenizer.decode(ids[:tokens])

    def fit(self, item: MMInput) -> Any:
        """The image of ``item`` as this family's processor should receive it (the processor resizes it itself)."""
        return item.image

    def image_kwargs(self) -> dict[str, Any]:
        """What the image processor is called with beyond the images (the pixel budget of chat VLMs)."""
        return {}

    @property
    def compact_pixels(self) -> bool:
        """Whether pixels travel as 8-bit values (``uint8``, a quarter of float32) and are normalised by
        :meth:`normalize_pixels` on the model's device: only for processors whose own arithmetic that replicates
        exactly (transformers' torchvision backend, which rescales and normalises in one fused step)."""
        from transformers.image_processing_backends import TorchvisionBackend

        image_processor = getattr(self.processor, "image_processor", None)
        return (isinstance(image_processor, TorchvisionBackend) and bool(getattr(image_processor, "do_rescale", False))
                and bool(getattr(image_processor, "do_normalize", False)))

    def processor_image_kwargs(self) -> dict[str, Any]:
        """:meth:`image_kwargs` plus, with :attr:`compact_pixels`, 8-bit output (no rescale, no normalisation yet)."""
        return {**self.image_kwargs(), **({"do_rescale": False, "do_normalize": False} if self.compact_pixels else {})}

    def processor_images(self, images: list[Any]) -> tuple[list[Any], dict[str, Any]]:
        """(images, image kwargs) for the image processor. A torchvision-backend processor turns each RGB PIL image into
        a ``[3, H, W]`` uint8 tensor first (its interleaved-to-planar copy costs about as much as resizing a photo);
        the same tensor made band by band is 3x cheaper, and the processor then does exactly what it does with the PIL
        image (told that the channels come first, rather than left to guess it from the shape)."""
        from transformers.image_processing_backends import TorchvisionBackend

        kwargs = self.processor_image_kwargs()
        image_processor = getattr(self.processor, "image_processor", None)
        if (not images or not isinstance(image_processor, TorchvisionBackend)
                or not all(isinstance(image, Image.Image) and image.mode == "RGB" for image in images)):
            return images, kwargs
        return [planar(image) for image in images], {**kwargs, "input_data_format": "channels_first"}

    def normalize_pixels(self, pixels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """8-bit pixels (images ``[B, C, H, W]`` or Qwen-VL patches ``[N, C * T * P * P]``) rescaled and normalised as
        the image processor does (its fused mean / (1 / rescale) and std / (1 / rescale), then ``(x - mean) / std``),
        on their device; other pixels pass through, cast to ``dtype``."""
        if pixels.dtype != torch.uint8:
            return pixels.to(dtype)
        image_processor = self.processor.image_processor
        scale = 1.0 / image_processor.rescale_factor
        mean = torch.tensor(image_processor.image_mean, device=pixels.device) * scale
        std = torch.tensor(image_processor.image_std, device=pixels.device) * scale
        values = pixels.to(torch.float32)
        if values.dim() == 4:
            values = values.sub_(mean[None, :, None, None]).div_(std[None, :, None, None])
        else:  # patches: each row holds C channel blocks of T * P * P values
            shape = values.shape
            values = values.view(shape[0], mean.numel(), -1).sub_(mean[None, :, None]).div_(std[None, :, None]).view(shape)
        return values.to(dtype)

    def cache_form(self, item: MMInput) -> Any:
        """For :func:`~hf_mm_rerank.data.pipeline.cache_images`: a smaller image that this featurizer turns into exactly
        the pixels it makes of ``item`` (the processor's own resized output, checked), or None (keep the cell)."""
        if self.fast_decode:
            return self.fit(item)
        image_processor = getattr(self.processor, "image_processor", None)
        if image_processor is None:
            return None
        raw = image_processor(images=[item.image], do_rescale=False, do_normalize=False, return_tensors="pt",
                              **self.image_kwargs())
        candidate = self._as_image(raw)
        if candidate is None or candidate.size[0] * candidate.size[1] >= item.image.size[0] * item.image.size[1]:
            return None
        def pixels(image: Any) -> Any:
            return image_processor(images=[image], return_tensors="pt", **self.image_kwargs())["pixel_values"]

        return candidate if torch.equal(pixels(candidate), pixels(item.image)) else None

    def _as_image(self, raw: Any) -> Any:
        """The un-normalised processor output ``[1, 3, H, W]`` as a PIL image (None unless it is 8-bit values)."""
        values = raw["pixel_values"]
        if values.dim() != 4 or values.shape[:2] != (1, 3):
            return None
        return _uint8_image(values[0])

    def chunks(self, items: list[Any], side: str, size: int | None) -> list[dict[str, Any]]:
        """Featurize ``items`` as consecutive mini-batches of at most ``size`` inputs (all at once when None), or of at
        most ``size`` tokens when it is :class:`Tokens`."""
        chunker = Chunker(self, side, size)
        for item in items:
            chunker.add(item)
        return chunker.close()

    def cost(self, item: Any, side: str = "query") -> int:
        """The positions an input (or a (query, document) pair) takes as :meth:`__call__` featurizes it for ``side``
        (:class:`~hf_mm_rerank.data.minibatch.Tokens`); each family counts its own way."""
        raise NotImplementedError

    def visual_tokens(self, item: MMInput) -> int:
        return self.image_tokens


def featurizer_of(model_or_featurizer: Any) -> Featurizer:
    featurizer = getattr(model_or_featurizer, "featurizer", model_or_featurizer)
    if not isinstance(featurizer, Featurizer):
        raise TypeError(f"expected a BiEncoder/CrossEncoder or a Featurizer, received "
                        f"{type(model_or_featurizer).__name__}.")
    return featurizer


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
            images, kwargs = self.processor_images([items[i].image for i in image_idx])
            features["image"] = dict(self.processor.image_processor(images=images, return_tensors="pt", **kwargs))
            features["image_index"] = torch.tensor(image_idx)
        return features

    def cost(self, item: Any, side: str = "query") -> int:
        """As :meth:`Featurizer.cost`, with the side's prompt, the truncation and SigLIP's fixed-length padding of
        :meth:`__call__` (an input with text and image runs through both towers: both count)."""
        text = 0
        if item.text is not None:
            text = len(self.tokenizer(self.prompts.get(side, "") + item.text, padding=self._padding(), truncation=True,
                                      max_length=self._max_length())["input_ids"])
        return text + (self.visual_tokens(item) if item.image is not None else 0)

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
        if self.max_length is None:
            self.max_length = DEFAULT_TEXT_TOKENS  # a scraped 100,000-character cell must not become a 100k sequence
        self.vision_tokens = vision_tokens(processor)

    def check(self, item: MMInput, row: Any, column: str) -> MMInput:
        item = super().check(item, row, column)
        found = [token for token in getattr(self, "vision_tokens", ()) if item.text and token in item.text]
        if found:  # the processor would read it as an image placeholder, or refuse it with no row named
            at = item.text.index(found[0])
            raise InputError(
                f"row {row}, column '{column}': the text holds {found[0]!r} (at character {at}, near "
                f"{item.text[max(0, at - 20):at + len(found[0]) + 20]!r}), one of this chat VLM's image/vision special "
                f"tokens {list(self.vision_tokens)}; the processor would take it for an image placeholder. Fix: remove "
                f"it from the text (text.replace({found[0]!r}, '')), or drop the row.")
        if item.image is not None and self._patch_grid() is not None:
            width, height = item.source_size or item.image.size
            if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
                raise InputError(
                    f"row {row}, column '{column}': the image is {width}x{height} pixels, an aspect ratio over "
                    f"{MAX_ASPECT_RATIO}:1, which Qwen-VL processors refuse. Fix: crop or pad it, or drop the row.")
            try:  # the processor's own sizing rule on the original size: whatever it refuses is named here
                self.grid_size(width, height)
            except ValueError as error:
                raise InputError(f"row {row}, column '{column}': the image is {width}x{height} pixels, which the "
                                 f"processor refuses ({error}). Fix: crop or pad it, or drop the row.") from None
        return item

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
        return self.encode_texts(texts, [self.fit(item) for item in items if item.image is not None])

    def cost(self, item: Any, side: str = "query") -> int:
        """The sequence's length as :meth:`__call__` makes it: the rendered chat template (system prompt, turn
        markers), the truncated text and each image's visual tokens."""
        return self.sequence_tokens(self.render(self.messages(item, side)), [item])

    def sequence_tokens(self, text: str, items: list[MMInput]) -> int:
        """Tokens of a rendered sequence once the processor expands each image placeholder of ``items``' images."""
        images = [item for item in items if item.image is not None]
        return len(self.tokenizer(text)["input_ids"]) + sum(self.visual_tokens(item) - 1 for item in images)

    def fit(self, item: MMInput) -> Any:
        """The image as decoded: the processor resizes it under the pixel budget (its own filter, from the original).
        With ``fast_decode`` the image was shrunk while decoding: it is resized to the patch grid the processor picks
        for the *original* size, so ``image_grid_thw`` never changes, and the processor then leaves it as it is."""
        target = self.grid_size(*(item.source_size or item.image.size)) if self.fast_decode else None
        if target is None or item.image.size == target:
            return item.image
        from PIL import Image

        return item.image.resize(target, Image.Resampling.BICUBIC)

    def visual_tokens(self, item: MMInput) -> int:
        """The image's tokens once the processor resizes it (patch grid / merge), from its original size."""
        grid = self._patch_grid()
        size = self.grid_size(*(item.source_size or item.image.size)) if grid else None
        return (size[0] // grid[0]) * (size[1] // grid[0]) if size else self.image_tokens

    def grid_size(self, width: int, height: int) -> tuple[int, int] | None:
        """(width, height) the Qwen-VL processor resizes a ``width`` x ``height`` image to, with the pixel cap
        lowered to ``max_pixels``; None for processors without a patch grid."""
        grid = self._patch_grid()
        if grid is None:
            return None
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        factor, minimum, cap = grid
        h, w = smart_resize(height, width, factor=factor, min_pixels=minimum, max_pixels=cap)
        return w, h

    def _patch_grid(self) -> tuple[int, int, int] | None:
        """(patch x merge factor, min pixels, pixel cap) of a Qwen-VL-style image processor, else None. A ``max_pixels``
        given by the user is the cap, above the processor's own too (as vLLM's ``mm_processor_kwargs`` do)."""
        image_processor = getattr(self.processor, "image_processor", None)
        patch = getattr(image_processor, "patch_size", None)
        size = getattr(image_processor, "size", None) or {}
        if not patch or not size.get("longest_edge"):
            return None
        factor = patch * (getattr(image_processor, "merge_size", 1) or 1)
        cap = int(self.max_pixels or size["longest_edge"])  # the budget given (or the default, never above the own cap)
        return factor, int(size.get("shortest_edge") or 0), cap

    def image_kwargs(self) -> dict[str, Any]:
        grid = self._patch_grid()
        if grid is None:
            return {}
        if self.fast_decode:
            # fit() already put every image on its patch grid: the processor must keep that size (its own resize
            # is not idempotent for extreme aspect ratios, where the grid is allowed over the pixel cap).
            return {"do_resize": False}
        return {"size": {"shortest_edge": grid[1], "longest_edge": grid[2]}}  # the budget, the processor's own way

    def encode_texts(self, texts: list[str], images: list[Any]) -> dict[str, Any]:
        images, kwargs = self.processor_images(images)
        extra = {"images_kwargs": kwargs} if images else {}
        return dict(self.processor(text=texts, images=images or None, padding=True, return_tensors="pt", **extra))

    def _as_image(self, raw: Any) -> Any:
        """Qwen-VL patches ``[grid_h * grid_w, C * T * P * P]`` (merge-ordered) back into the resized image."""
        grid = raw.get("image_grid_thw")
        image_processor = self.processor.image_processor
        if grid is None or len(grid) != 1:
            return super()._as_image(raw)
        _, gh, gw = (int(v) for v in grid[0])
        patch = image_processor.patch_size
        merge = getattr(image_processor, "merge_size", 1) or 1
        temporal = getattr(image_processor, "temporal_patch_size", 1) or 1
        values = raw["pixel_values"].reshape(gh // merge, gw // merge, merge, merge, 3, temporal, patch, patch)
        values = values[:, :, :, :, :, 0].permute(4, 0, 2, 5, 1, 3, 6).reshape(3, gh * patch, gw * patch)
        return _uint8_image(values)

    def _truncate(self, text: str) -> str:
        return self.head_tokens(text, self.max_length) if self.max_length else text


VISION_WORDS = ("image", "vision", "video")


def vision_tokens(processor: Any) -> tuple[str, ...]:
    """A chat VLM's special tokens that stand for images or video (``<|image_pad|>``, ``<|vision_start|>``, ...): the
    processor's own ``image_token`` / ``video_token`` and every special token of the tokenizer named after them."""
    tokenizer = getattr(processor, "tokenizer", processor)
    found = {getattr(processor, name, None) for name in ("image_token", "video_token")}
    for token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(token, "special", False) and any(word in str(token).lower() for word in VISION_WORDS):
            found.add(str(token))
    return tuple(sorted(token for token in found if isinstance(token, str) and token))


def _uint8_image(values: torch.Tensor) -> Any:
    """``[3, H, W]`` 8-bit values as a PIL image, or None when they are not whole numbers in 0..255."""
    from PIL import Image

    values = values.detach().cpu()
    if values.is_floating_point() and not torch.equal(values, values.round()) or values.min() < 0 or values.max() > 255:
        return None
    return Image.fromarray(values.to(torch.uint8).permute(1, 2, 0).contiguous().numpy(), "RGB")


def default_max_pixels(processor: Any) -> int | None:
    """Pixel budget for ``DEFAULT_VISUAL_TOKENS`` visual tokens of a Qwen-style image processor, or the
    processor's own pixel cap when that is smaller (it would shrink the image anyway; shrinking first lets
    the collator decode JPEGs at reduced scale)."""
    image_processor = getattr(processor, "image_processor", None)
    patch = getattr(image_processor, "patch_size", None)
    if not patch:
        return None
    merge = getattr(image_processor, "merge_size", 1) or 1
    budget = DEFAULT_VISUAL_TOKENS * (patch * merge) ** 2
    size = getattr(image_processor, "size", None)
    own_cap = getattr(image_processor, "max_pixels", None) or (getattr(size, "get", lambda k: None)("longest_edge"))
    return min(budget, int(own_cap)) if own_cap else budget


def dual_default_max_pixels(processor: Any) -> int | None:
    """Images are only shrunk to about 4x the tower's input size: the processor does the final resize."""
    size = getattr(getattr(processor, "image_processor", None), "size", None) or {}
    side = size.get("shortest_edge") or size.get("height")
    return int((2 * side) ** 2) if side else None
