"""Images reach the model exactly as its own processor makes them from the original (the reference here is the
processor + the transformers model, never our own earlier output); ``fast_decode`` is the opt-in approximation."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_rel_close, rel_diff
from PIL import Image, ImageOps

from hf_mm_rerank import BiEncoder, CrossEncoder

EXACT = 1e-6  # relative to the embedding's scale: float round-off of batched vs single forwards


def photo(size=(640, 480), seed=0) -> Image.Image:
    """Photo-like content: smooth gradients plus fine noise (so every resize filter leaves its mark)."""
    generator = torch.Generator().manual_seed(seed)
    w, h = size
    ramp = torch.linspace(0, 1, w)[None, :] * torch.linspace(0.3, 1, h)[:, None]
    channels = torch.stack([ramp, ramp.flip(1), 0.5 + 0.5 * torch.sin(12 * ramp)], dim=-1)
    noisy = (channels * 200 + torch.rand(h, w, 3, generator=generator) * 55).clamp(0, 255)
    return Image.fromarray(noisy.to(torch.uint8).numpy(), "RGB")


def jpeg(image: Image.Image, orientation: int | None = None) -> bytes:
    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    image.save(buffer, "JPEG", quality=90, exif=exif)
    return buffer.getvalue()


def upright(cell) -> Image.Image:
    """What a user hands the processor: the decoded image, upright as viewers show it, in RGB."""
    image = Image.open(io.BytesIO(cell)) if isinstance(cell, bytes) else cell
    return ImageOps.exif_transpose(image).convert("RGB")


def reference_embeddings(path: str, cells: list, max_pixels: int | None = None) -> torch.Tensor:
    """The model's own processor and forward, one input at a time: chat template, image, last token, L2 norm."""
    from transformers import AutoModel, AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    kwargs = {}
    if max_pixels is not None:
        kwargs["images_kwargs"] = {"size": {"shortest_edge": processor.image_processor.size["shortest_edge"],
                                            "longest_edge": max_pixels}}
    out = []
    for cell in cells:
        text = cell.get("text") if isinstance(cell, dict) else None
        image = upright(cell["image"] if isinstance(cell, dict) else cell)
        content = [{"type": "image"}] + ([{"type": "text", "text": text}] if text else [])
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                               add_generation_prompt=True)
        inputs = processor(text=[prompt], images=[image], return_tensors="pt", **kwargs)
        with torch.no_grad():
            hidden = model(**inputs, use_cache=False).last_hidden_state[:, -1]
        out.append(F.normalize(hidden.float(), dim=-1)[0])
    return torch.stack(out)


def cases() -> dict[str, list]:
    small, odd, wide = photo((32, 32), 1), photo((90, 70), 2), photo((1000, 60), 3)
    big = photo()
    return {
        "upscaled and odd sizes": [small, odd],
        "text and image": [{"text": "a red square", "image": small}, {"text": "two cats", "image": odd}],
        "downscaled photo": [big],
        "JPEG bytes": [jpeg(big)],
        "extreme ratio": [wide],
        "EXIF-rotated JPEG": [jpeg(photo((120, 80), 4), orientation=6), jpeg(photo((64, 100), 5), orientation=3)],
    }


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_chat_vlm_embeddings_equal_the_processor_and_model(tiny_path, family):
    model = BiEncoder.from_pretrained(tiny_path(family))
    for name, cells in cases().items():
        got = model.encode(cells, side="document")
        assert_rel_close(got, reference_embeddings(tiny_path(family), cells), EXACT, msg=name)


def test_a_pixel_budget_is_applied_the_processors_way(tiny_path):
    """A real budget (768 visual tokens) on a 19950x100 strip (ratio 199.5): the processor resizes it once, from the
    original, to 28 x 10948 (ratio 391): fine for the model, and no second resize refuses it."""
    path = tiny_path("qwen2_vl")
    budget = 768 * 28 * 28
    model = BiEncoder.from_pretrained(path, max_pixels=budget)
    strip, photo_cell = photo((19950, 100), 6), jpeg(photo((1600, 1200), 7))
    for cells in ([strip], [photo_cell]):
        assert_rel_close(model.encode(cells, side="document"), reference_embeddings(path, cells, budget), EXACT)


def test_reranker_scores_equal_the_processor_and_model(tiny_path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = tiny_path("qwen2_vl")
    rr = CrossEncoder.from_pretrained(path, head="yes_no", system_prompt="", instruction="", query_prefix="",
                                      document_prefix="")
    documents = [photo(), jpeg(photo((90, 70), 2), orientation=6)]
    got = rr.score([("a red square", doc) for doc in documents])
    processor = AutoProcessor.from_pretrained(path)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    yes, no = (processor.tokenizer.encode(t, add_special_tokens=False)[0] for t in ("yes", "no"))
    expected = []
    for doc in documents:
        content = [{"type": "text", "text": "a red square"}, {"type": "image"}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
        inputs = processor(text=[text], images=[upright(doc)], return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs, use_cache=False).logits[0, -1].float()
        expected.append(logits[[yes, no]])
    expected = torch.stack(expected)
    # A difference of two logits cancels: its round-off follows the logits' size, not the difference's.
    assert_rel_close(got, expected[:, 0] - expected[:, 1], EXACT, scale=float(expected.abs().max()))


def test_dual_encoder_images_equal_the_processor_and_model(tiny_path):
    from transformers import AutoModel, AutoProcessor

    path = tiny_path("clip")
    model = BiEncoder.from_pretrained(path)
    cells = [photo(), jpeg(photo((1000, 60), 3)), jpeg(photo((120, 80), 4), orientation=6)]
    processor, clip = AutoProcessor.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        pixels = processor.image_processor(images=[upright(c) for c in cells], return_tensors="pt")
        output = clip.get_image_features(**pixels)
    expected = F.normalize((output if isinstance(output, torch.Tensor) else output.pooler_output).float(), dim=-1)
    assert_rel_close(model.encode(cells, side="document"), expected, EXACT)


def test_fast_decode_is_opt_in_and_close(tiny_path):
    """fast_decode (reduced-scale JPEG decoding, pre-shrinking in the workers) changes pixels a little, and only
    when asked for; it is saved with the model."""
    path = tiny_path("qwen2_vl")
    cells = [jpeg(photo((1600, 1200), 7))]
    exact = BiEncoder.from_pretrained(path).encode(cells)
    fast_model = BiEncoder.from_pretrained(path, fast_decode=True)
    fast = fast_model.encode(cells)
    assert 0 < rel_diff(fast, exact) < 0.05
    assert fast_model.spec.settings["fast_decode"] is True
