"""Featurizing for multi-vector (late-interaction) models: which tokens are scored, query augmentation, and the
colpali-engine prompt layout.

Every featurized chunk carries ``token_mask`` (``[B, T]`` bool), the tokens whose vectors the model keeps:

- ``scored_tokens="content"`` (chat VLMs' default): the input's own tokens (its text and image patches, and query
  augmentation tokens), not the template around them (system prompt, role markers, generation prompt) nor padding;
- ``"all"``: every attended token, as colpali-engine's ColQwen2 scores them (template and augmentation included).

``query_augmentation=n`` appends ``n`` augmentation tokens (the pad token, as colpali-engine does) to each query: they
attend to the query and give MaxSim extra "soft" query terms. ``template="colpali"`` renders inputs as colpali-engine's
ColQwen2 processor does (queries as raw text, image documents after its fixed visual prompt), so its checkpoints load
with equal embeddings.
"""

from __future__ import annotations

from typing import Any

import torch

from .featurizers import ChatFeaturizer, DualEncoderFeaturizer, vision_tokens
from .inputs import MMInput

SCORED_TOKENS = ("content", "all")
TEMPLATES = ("chat", "colpali")
COLPALI_VISUAL_PROMPT = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe the image.<|im_end|>"
                         "<|endoftext|>")
_SENTINEL = "\u2063\u2063QWERTY\u2063\u2063"


class MultiVectorChatFeaturizer(ChatFeaturizer):
    """A chat VLM's featurizer that also says which tokens a multi-vector model scores."""

    def __init__(self, processor: Any, *, scored_tokens: str = "content", query_augmentation: int = 0,
                 template: str = "chat", **kwargs: Any) -> None:
        super().__init__(processor, **kwargs)
        if scored_tokens not in SCORED_TOKENS:
            raise ValueError(f"scored_tokens={scored_tokens!r}: use one of {SCORED_TOKENS}.")
        if template not in TEMPLATES:
            raise ValueError(f"template={template!r}: use one of {TEMPLATES}.")
        if query_augmentation < 0:
            raise ValueError(f"query_augmentation={query_augmentation}: give a number of tokens >= 0.")
        self.scored_tokens, self.query_augmentation, self.template = scored_tokens, query_augmentation, template
        tokenizer = self.tokenizer
        self.augmentation_token = tokenizer.pad_token or tokenizer.eos_token
        image_token = getattr(processor, "image_token", None)
        keep = {tokenizer.convert_tokens_to_ids(t) for t in (image_token, self.augmentation_token) if t}
        # The template's markers are never content, whether or not the tokenizer lists them as special (the tiny
        # Qwen tokenizers of the tests do not list <|vision_start|> / <|vision_end|>: tests/test_references.py).
        markers = {tokenizer.convert_tokens_to_ids(t) for t in vision_tokens(processor)} - {None, tokenizer.unk_token_id}
        self._special = sorted((set(tokenizer.all_special_ids) | markers) - keep)
        self._edges: dict[str, tuple[int, int]] = {}
        if template == "colpali":
            tokenizer.padding_side = "left"  # as colpali-engine's processors

    def __call__(self, items: list[MMInput], side: str = "query") -> dict[str, Any]:
        if self.template == "colpali":
            texts = [self._colpali_text(item, side) for item in items]
            features = self.encode_texts(texts, [self.fit(item) for item in items if item.image is not None])
        else:
            features = super().__call__([self._augmented(item, side) for item in items], side)
        features["token_mask"] = self.token_mask(features, side)
        return features

    def cost(self, item: Any, side: str = "query") -> int:
        """As :meth:`ChatFeaturizer.cost`, of the sequence this featurizer makes (augmented query, ColPali prompt)."""
        if self.template == "colpali":
            return self.sequence_tokens(self._colpali_text(item, side), [item])
        return super().cost(self._augmented(item, side), side)

    def _augmented(self, item: MMInput, side: str) -> MMInput:
        if side != "query" or not self.query_augmentation:
            return item
        text = (item.text or "") + self.augmentation_token * self.query_augmentation
        return MMInput(text=text, image=item.image, source_size=item.source_size)

    def _colpali_text(self, item: MMInput, side: str) -> str:
        text = self._truncate(item.text) if item.text is not None else ""
        if item.image is not None:
            return COLPALI_VISUAL_PROMPT + text
        suffix = self.augmentation_token * (self.query_augmentation if side == "query" else 0)
        return self.prompts.get(side, "") + text + suffix

    def template_edges(self, side: str) -> tuple[int, int]:
        """(tokens before, tokens after) an input's own content in the rendered chat template of ``side``."""
        if side not in self._edges:
            rendered = self.render(self.messages(MMInput(text=_SENTINEL), side))
            before, after = rendered.split(_SENTINEL)
            tokens = [len(self.tokenizer(part, add_special_tokens=False)["input_ids"]) for part in (before, after)]
            self._edges[side] = (tokens[0], tokens[1])
        return self._edges[side]

    def token_mask(self, features: dict[str, Any], side: str) -> torch.Tensor:
        attended = features["attention_mask"].bool()
        if self.scored_tokens == "all" or self.template == "colpali":
            return attended
        before, after = self.template_edges(side)
        rank = attended.long().cumsum(1)  # 1 .. n over each row's real tokens, whatever the padding side
        length = attended.sum(1, keepdim=True)
        content = attended & (rank > before) & (rank <= length - after)
        if self._special:
            content &= ~torch.isin(features["input_ids"], torch.tensor(self._special))
        return content


class MultiVectorDualFeaturizer(DualEncoderFeaturizer):
    """Dual encoders: every text token but padding, every image position (class token and patches)."""

    def __call__(self, items: list[MMInput], side: str = "query") -> dict[str, Any]:
        features = super().__call__(items, side)
        if "text" in features:
            text = features["text"]
            mask = text.get("attention_mask")
            if mask is None:  # SigLIP's tokenizer pads to max_length without a mask
                mask = text["input_ids"] != self.tokenizer.pad_token_id
            features["text_token_mask"] = mask.bool()
        return features
