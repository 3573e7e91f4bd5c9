"""Pair featurizers of rerankers: one sequence per (query, document) pair, through a chat VLM's template
(:class:`ChatPairFeaturizer`, as Qwen3-VL-Reranker) or a text cross-encoder's tokenizer (:class:`TextPairFeaturizer`)."""

from __future__ import annotations

from typing import Any

from PIL import Image

from .featurizers import ChatFeaturizer, Featurizer
from .inputs import MMInput

DEFAULT_RERANK_SYSTEM = ('Judge whether the Document meets the requirements based on the Query and the Instruct '
                         'provided. Note that the answer can only be "yes" or "no".')
DEFAULT_RERANK_INSTRUCTION = "Given a search query, retrieve relevant candidates that answer the query."
RERANK_PROMPT_DEFAULTS = {"system_prompt": DEFAULT_RERANK_SYSTEM, "instruction": DEFAULT_RERANK_INSTRUCTION,
                          "query_prefix": "<Query>: ", "document_prefix": "\n<Document>: ",
                          "assistant_prefix": ""}
Pair = tuple[MMInput, MMInput]


class ChatPairFeaturizer(ChatFeaturizer):
    """Renders (query, document) pairs through a chat VLM's template, as Qwen3-VL-Reranker does.

    The user turn is ``<Instruct>: {instruction}`` + ``query_prefix`` + query (image, then text) +
    ``document_prefix`` + document (image, then text); ``system_prompt`` is the system turn and
    ``assistant_prefix`` (e.g. ``"<think>\\n\\n</think>\\n\\n"`` for Qwen3) follows the generation prompt.
    Sequences are left-padded so every pair ends at the last position. At construction a probe pair is
    rendered: a template that drops the query or the document (text or image) raises a ValueError.
    """

    def __init__(self, processor: Any, *, prompt: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(processor, **kwargs)
        self.prompt = {**RERANK_PROMPT_DEFAULTS, **(prompt or {})}
        unknown = set(self.prompt) - set(RERANK_PROMPT_DEFAULTS)
        if unknown:
            raise ValueError(f"prompt: unknown key(s) {sorted(unknown)}; use {sorted(RERANK_PROMPT_DEFAULTS)}.")
        self.tokenizer.padding_side = "left"
        self._check_template()

    def pair_messages(self, query: MMInput, document: MMInput) -> list[dict[str, Any]]:
        p = self.prompt
        content: list[dict[str, Any]] = []
        head = f"<Instruct>: {p['instruction']}\n" if p["instruction"] else ""
        for prefix, item in ((head + p["query_prefix"], query), (p["document_prefix"], document)):
            if prefix:
                content.append({"type": "text", "text": prefix})
            if item.image is not None:
                content.append({"type": "image"})
            if item.text is not None:
                content.append({"type": "text", "text": self._truncate(item.text)})
        messages = [{"role": "user", "content": content}]
        if p["system_prompt"]:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": p["system_prompt"]}]})
        return messages

    def render_pair(self, query: MMInput, document: MMInput) -> str:
        return self.render(self.pair_messages(query, document)) + self.prompt["assistant_prefix"]

    def cost(self, item: Pair, side: str = "pair") -> int:
        """The pair's sequence length: template, instruction, both texts (truncated) and both images' tokens."""
        return self.sequence_tokens(self.render_pair(*item), list(item))

    def __call__(self, items: list[Pair], side: str = "pair") -> dict[str, Any]:
        texts = [self.render_pair(q, d) for q, d in items]
        images = [self.fit(item) for pair in items for item in pair if item.image is not None]
        return self.encode_texts(texts, images)

    def _check_template(self) -> None:
        q_mark, d_mark = "QUERY_7f3a", "DOCUMENT_9c1e"
        text = self.render_pair(MMInput(text=q_mark), MMInput(text=d_mark))
        dropped = [side for side, mark in (("query", q_mark), ("document", d_mark)) if mark not in text]
        image_token = getattr(self.processor, "image_token", None)
        if image_token and not dropped:
            pixel = _probe_image()
            text = self.render_pair(MMInput(image=pixel), MMInput(image=pixel))
            if text.count(image_token) != 2:
                dropped.append(f"an image (found {text.count(image_token)} of 2 image placeholders)")
        if dropped:
            raise ValueError(
                f"the chat template of {type(self.processor).__name__} drops the {' and '.join(dropped)} of a "
                "(query, document) pair: the reranker would not see it. Fix: use a template that renders every "
                "text and image part of the user turn (processor.chat_template = ...).")


def _probe_image() -> Any:
    return Image.new("RGB", (8, 8))


class TextPairFeaturizer(Featurizer):
    """Text cross-encoders (BERT-style ``AutoModelForSequenceClassification``): ``[CLS] query [SEP] doc [SEP]``.

    ``max_length`` bounds the whole pair; the document is truncated first, so the query survives whole (a query
    longer than three quarters of the limit is cut to that, leaving the document a quarter).
    """

    supports_images = False

    def __call__(self, items: list[Pair], side: str = "pair") -> dict[str, Any]:
        return dict(self._encode(items, return_tensors="pt"))

    def cost(self, item: Pair, side: str = "pair") -> int:
        """The pair's tokens as :meth:`__call__` makes them (special tokens, truncation)."""
        return len(self._encode([item])["input_ids"][0])

    def _encode(self, items: list[Pair], **kwargs: Any) -> Any:
        limit = self.max_length or getattr(self.tokenizer, "model_max_length", None)
        limit = limit if limit and limit < 100_000 else 512
        queries = [self.head_tokens(q.text or "", 3 * limit // 4) for q, _ in items]
        return self.tokenizer(queries, [d.text or "" for _, d in items], padding=True, truncation="only_second",
                              max_length=limit, **kwargs)

