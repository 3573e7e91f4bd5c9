"""Tiny models of every supported family, built offline from configs.

Every factory writes a checkpoint folder (model + processor) and returns its path, so tests exercise the
same ``from_pretrained(path)`` route a user takes with a Hub checkpoint.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# A Qwen-style chat template, reduced to what embedding and reranking need.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_tokenizer(specials: list[str], template: str | None = None, **kwargs) -> PreTrainedTokenizerFast:
    """A byte-level BPE with the 256 byte symbols as vocabulary and no merges.

    ``template`` (e.g. ``"[CLS] $A [SEP]"``) adds the model's special tokens around each text, as the real
    tokenizers do (CLIP pools at its end token, BERT at [CLS]).
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    if template:
        ids = {t: len(alphabet) + i for i, t in enumerate(specials)}
        tok.post_processor = processors.TemplateProcessing(
            single=template, special_tokens=[(t, ids[t]) for t in specials if t in template.split()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)


def _save(model, processor, path: Path) -> Path:
    torch.manual_seed(0)
    path.mkdir(parents=True, exist_ok=True)
    from hf_mm_rerank.modeling.backbone import save_weights  # transformers' own key layout, whatever is imported

    save_weights(model, str(path))
    processor.save_pretrained(path)
    return path


def make_clip(path: Path, hidden: int = 64) -> Path:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(0)
    tok = byte_tokenizer(["<|startoftext|>", "<|endoftext|>"], "<|startoftext|> $A <|endoftext|>", bos_token="<|startoftext|>",
                         eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=hidden,
    )
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return _save(CLIPModel(cfg), CLIPProcessor(image_processor=ip, tokenizer=tok), path)


def make_siglip(path: Path, hidden: int = 64) -> Path:
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor

    torch.manual_seed(0)
    tok = byte_tokenizer(["</s>", "<pad>", "<unk>"], "$A </s>", eos_token="</s>", pad_token="</s>", unk_token="<unk>")
    cfg = SiglipConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id),
        vision_config=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8),
    )
    ip = SiglipImageProcessor(size={"height": 32, "width": 32})
    return _save(SiglipModel(cfg), SiglipProcessor(image_processor=ip, tokenizer=tok), path)


def make_vtde(path: Path, hidden: int = 64) -> Path:
    """A VisionTextDualEncoder with a tiny BERT text tower and a tiny ViT."""
    from transformers import (
        BertConfig,
        BertModel,
        VisionTextDualEncoderConfig,
        VisionTextDualEncoderModel,
        VisionTextDualEncoderProcessor,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    torch.manual_seed(0)
    tok = byte_tokenizer(["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"], "[CLS] $A [SEP]", pad_token="[PAD]", cls_token="[CLS]",
                         sep_token="[SEP]", unk_token="[UNK]", mask_token="[MASK]")
    text = BertModel(BertConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                                num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
                                pad_token_id=tok.pad_token_id))
    vision = ViTModel(ViTConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                                num_attention_heads=2, image_size=32, patch_size=8))
    cfg = VisionTextDualEncoderConfig.from_vision_text_configs(vision.config, text.config, projection_dim=hidden)
    model = VisionTextDualEncoderModel(cfg, vision_model=vision, text_model=text)
    ip = ViTImageProcessor(size={"height": 32, "width": 32})
    return _save(model, VisionTextDualEncoderProcessor(image_processor=ip, tokenizer=tok), path)


def _qwen_tokenizer() -> PreTrainedTokenizerFast:
    tok = byte_tokenizer(QWEN_SPECIALS, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_tokens(["yes", "no"])  # single tokens, as in Qwen's vocabulary (the yes_no reranker head needs them)
    return tok


def _special_ids(tok) -> dict:
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    return dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def _qwen_text_config(tok, hidden: int, head_dim: int = 16, mrope_section: list[int] | None = None) -> dict:
    """head_dim 32 (with one key/value head) for vLLM's CPU attention, which takes 32, 64, 80, ... only."""
    return dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                num_attention_heads=hidden // head_dim, num_key_value_heads=max(1, hidden // head_dim // 2),
                head_dim=head_dim, bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": mrope_section or [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]})


def make_qwen2_vl(path: Path, hidden: int = 64, head_dim: int = 16) -> Path:
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    torch.manual_seed(0)
    tok = _qwen_tokenizer()
    cfg = Qwen2VLConfig(
        text_config=_qwen_text_config(tok, hidden, head_dim),
        vision_config=dict(depth=2, embed_dim=2 * head_dim, hidden_size=hidden, num_heads=2, mlp_ratio=2,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        **_special_ids(tok),
    )
    ip = Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16, patch_size=14)
    proc = Qwen2VLProcessor(image_processor=ip, tokenizer=tok, video_processor=Qwen2VLVideoProcessor(),
                            chat_template=QWEN_CHAT_TEMPLATE)
    return _save(Qwen2VLForConditionalGeneration(cfg), proc, path)


def make_qwen3_vl(path: Path, hidden: int = 64, head_dim: int = 16, mrope_section: list[int] | None = None) -> Path:
    from transformers import Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    torch.manual_seed(0)
    tok = _qwen_tokenizer()
    text = _qwen_text_config(tok, hidden, head_dim, mrope_section)
    text["rope_parameters"]["mrope_interleaved"] = True
    cfg = Qwen3VLConfig(
        text_config=text,
        vision_config=dict(depth=2, hidden_size=hidden, intermediate_size=2 * hidden, num_heads=2, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=hidden,
                           num_position_embeddings=64, deepstack_visual_indexes=[1]),
        **_special_ids(tok),
    )
    ip = Qwen2VLImageProcessor(min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 16, patch_size=16,
                               image_mean=[0.5] * 3, image_std=[0.5] * 3)
    proc = Qwen3VLProcessor(image_processor=ip, tokenizer=tok, video_processor=Qwen3VLVideoProcessor(),
                            chat_template=QWEN_CHAT_TEMPLATE)
    return _save(Qwen3VLForConditionalGeneration(cfg), proc, path)


FACTORIES = {
    "clip": make_clip,
    "siglip": make_siglip,
    "vtde": make_vtde,
    "qwen2_vl": make_qwen2_vl,
    "qwen3_vl": make_qwen3_vl,
}


# ----- vLLM-sized variants (tests/test_vllm.py) ---------------------------------------------------------------------
# vLLM's CPU attention takes head sizes 32, 64, 80, ... only: these keep the families above but with 32-wide heads in
# the language model and the vision tower. (New factories: the ones above are shared by the whole suite.)


def make_qwen2_5_vl_h32(path: Path, hidden: int = 64) -> Path:
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    torch.manual_seed(0)
    tok = _qwen_tokenizer()
    cfg = Qwen2_5_VLConfig(
        text_config=_qwen_text_config(tok, hidden, 32),
        vision_config=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=hidden,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1]),
        **_special_ids(tok),
    )
    ip = Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 16, patch_size=14)
    proc = Qwen2_5_VLProcessor(image_processor=ip, tokenizer=tok, video_processor=Qwen2VLVideoProcessor(),
                               chat_template=QWEN_CHAT_TEMPLATE)
    return _save(Qwen2_5_VLForConditionalGeneration(cfg), proc, path)


def make_clip_vllm(path: Path, hidden: int = 64) -> Path:
    """make_clip with the towers' own projection_dim equal to the model's (as in released CLIP checkpoints; vLLM sizes
    its input embeddings by the text config's, which CLIPTextConfig otherwise leaves at 512)."""
    from transformers import CLIPModel, CLIPProcessor

    make_clip(path, hidden)
    model = CLIPModel.from_pretrained(path)
    model.config.text_config.projection_dim = model.config.vision_config.projection_dim = hidden
    return _save(model, CLIPProcessor.from_pretrained(path), path)


FACTORIES.update({
    "clip_vllm": make_clip_vllm,
    "qwen2_vl_h32": functools.partial(make_qwen2_vl, head_dim=32),
    "qwen2_5_vl_h32": make_qwen2_5_vl_h32,
    "qwen3_vl_h32": functools.partial(make_qwen3_vl, head_dim=32, mrope_section=[6, 5, 5]),
})
