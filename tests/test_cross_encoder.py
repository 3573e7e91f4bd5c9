"""CrossEncoder: heads, LoRA training, save/reload, scoring and ranking on tiny Qwen2-VL / Qwen3-VL / BERT."""

import pytest
import torch
from datasets import Dataset
from helpers import args, assert_rel_close, losses
from images import COLORS, solid
from peft import LoraConfig
from safetensors.torch import load_file

from hf_mm_rerank import CrossEncoder, CrossEncoderTrainer, MMInput
from hf_mm_rerank.modeling.base import to_device
from hf_mm_rerank.modeling.cross_encoder import resolve_head

NAMES = list(COLORS)
PLAIN_PROMPT = dict(system_prompt="", instruction="", query_prefix="", document_prefix="")


def red_rows(negatives: int = 3, repeat: int = 4) -> list[dict]:
    """One query whose positive is always the red square: learnable by a random tiny model in a few steps."""
    others = NAMES[1:]
    return [{"query": "a red square", "positive": solid("red"),
             **{f"negative_{j + 1}": solid(others[(i + j) % len(others)]) for j in range(negatives)}}
            for i in range(len(others))] * repeat


def lora_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def base_state(model) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n and "head" not in n
            and "modules_to_save" not in n}


def test_auto_head_follows_the_checkpoint():
    from transformers import BertConfig, Qwen2VLConfig

    vlm = Qwen2VLConfig(architectures=["Qwen3VLForConditionalGeneration"])
    assert resolve_head("auto", vlm, None) == "yes_no"  # Qwen3-VL-Reranker / MonoQwen style
    assert resolve_head("auto", BertConfig(architectures=["BertForSequenceClassification"]), None) == "classification"
    assert resolve_head("auto", BertConfig(architectures=["BertModel"]), None) == "classification"
    assert resolve_head("auto", Qwen2VLConfig(architectures=["Qwen2VLModel"]), None) == "linear"
    with pytest.raises(ValueError, match="head='nope'"):
        resolve_head("nope", vlm, None)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
def test_yes_no_score_is_the_last_position_logit_difference(tiny_path, family):
    rr = CrossEncoder.from_pretrained(tiny_path(family), head="yes_no")
    pairs = [("a red square", solid("red")), ("a much longer query about a blue square", "a text document")]
    items = [rr._pair(p, i) for i, p in enumerate(pairs)]
    features = rr.featurizer(items)
    assert (features["attention_mask"][:, -1] == 1).all(), "pairs must be left-padded"
    with torch.no_grad():  # (8-bit pixels normalised as the processor does, as forward() does)
        full = rr.base_model(**to_device(features, rr.device, rr.compute_dtype, rr.featurizer)).logits[:, -1]
    yes, no = rr.featurizer.tokenizer.convert_tokens_to_ids(["yes", "no"])
    # A difference of two logits cancels: its round-off follows the logits' size, not the difference's.
    assert_rel_close(rr.score(pairs), full[:, yes] - full[:, no], scale=float(full[:, [yes, no]].abs().max()))
    assert rr.heads() is None  # no new parameters


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_vl"])
@pytest.mark.parametrize("head", ["yes_no", "linear", "mlp"])
def test_lora_trains_and_reloads_with_identical_scores(tiny_path, tmp_path, family, head):
    rr = CrossEncoder.from_pretrained(tiny_path(family), head=head, lora_config=LoraConfig(r=8, lora_alpha=16),
                                      **PLAIN_PROMPT)
    lora, base = lora_state(rr), base_state(rr)
    head_before = {k: v.clone() for k, v in rr.head.state_dict().items()} if rr.head is not None else {}
    trainer = CrossEncoderTrainer(model=rr, args=args(tmp_path, max_steps=8, learning_rate=3e-3),
                                  train_dataset=Dataset.from_list(red_rows()))
    trainer.train()
    history = losses(trainer)
    assert sum(history[-2:]) / 2 < history[0] - 0.2, history
    assert all(not torch.equal(lora[n], p) for n, p in lora_state(rr).items() if "lora_B" in n)
    assert all(torch.equal(base[n], p) for n, p in base_state(rr).items())
    for name, tensor in head_before.items():
        assert not torch.equal(tensor, rr.head.state_dict()[name]), f"head {name} did not train"

    probe = [("a red square", solid(c)) for c in NAMES]
    scores = rr.score(probe)
    assert scores.argmax().item() == 0  # the red square ranks first
    rr.save_pretrained(tmp_path / "saved")
    reloaded = CrossEncoder.from_pretrained(str(tmp_path / "saved"), is_trainable=False)
    assert reloaded.head_type == head
    assert_rel_close(reloaded.score(probe), scores)


def test_missing_head_fails_instead_of_reinitialising(tiny_path, tmp_path):
    rr = CrossEncoder.from_pretrained(tiny_path("qwen2_vl"), head="mlp", lora_config=LoraConfig(r=4))
    rr.save_pretrained(tmp_path / "saved")
    assert set(load_file(tmp_path / "saved" / "head.safetensors")) == {f"net.{i}.{w}" for i in (0, 2)
                                                                       for w in ("weight", "bias")}
    (tmp_path / "saved" / "head.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="head"):
        CrossEncoder.from_pretrained(str(tmp_path / "saved"))


def test_head_argument_must_match_the_checkpoint(tiny_path, tmp_path):
    rr = CrossEncoder.from_pretrained(tiny_path("qwen2_vl"), head="linear", lora_config=LoraConfig(r=4))
    rr.save_pretrained(tmp_path / "saved")
    with pytest.raises(ValueError, match="trained with head='linear'"):
        CrossEncoder.from_pretrained(str(tmp_path / "saved"), head="yes_no")


def _bert_classifier(tmp_path, bare: bool = False):
    """A tiny BERT cross-encoder checkpoint (one logit), or a bare BertModel base (``bare``) for a new head."""
    import tiny_models
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    torch.manual_seed(0)
    tok = tiny_models.byte_tokenizer(["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"], None, pad_token="[PAD]",
                                     cls_token="[CLS]", sep_token="[SEP]", unk_token="[UNK]", mask_token="[MASK]")
    from tokenizers import processors

    ids = {t: tok.convert_tokens_to_ids(t) for t in ("[CLS]", "[SEP]")}
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=list(ids.items()))
    config = BertConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=2, max_position_embeddings=128, pad_token_id=tok.pad_token_id, num_labels=1)
    model = BertModel(config) if bare else BertForSequenceClassification(config)
    path = tmp_path / ("bert-base" if bare else "bert")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("bare", [False, True], ids=["cross_encoder_checkpoint", "bare_encoder_base"])
def test_text_cross_encoder_classification_head(tmp_path, bare):
    path = _bert_classifier(tmp_path, bare=bare)
    rr = CrossEncoder.from_pretrained(path, lora_config=LoraConfig(r=8))
    assert rr.head_type == "classification" and rr.config.num_labels == 1
    rows = [{"query": "is it red", "document": f"the square is {c}", "label": float(c == "red")} for c in NAMES] * 4
    classifier = {n: p.detach().clone() for n, p in rr.named_parameters() if "classifier" in n and "modules_to_save" in n}
    assert classifier, "the new classifier must train with the adapter (modules_to_save)"
    trainer = CrossEncoderTrainer(model=rr, args=args(tmp_path, max_steps=10, learning_rate=5e-3),
                                  train_dataset=Dataset.from_list(rows))
    trainer.train()
    history = losses(trainer)
    assert history[-1] < history[0]
    assert all(not torch.equal(p, dict(rr.named_parameters())[n]) for n, p in classifier.items())
    probe = [("is it red", f"the square is {c}") for c in NAMES]
    rr.save_pretrained(tmp_path / "saved")
    reloaded = CrossEncoder.from_pretrained(str(tmp_path / "saved"), is_trainable=False)
    assert_rel_close(reloaded.score(probe), rr.score(probe))
    with pytest.raises(ValueError, match="row 0, column 'document'.*text only"):
        rr.score([("is it red", solid("red"))])


def test_rank_returns_best_first_with_top_k(tiny_path):
    rr = CrossEncoder.from_pretrained(tiny_path("qwen2_vl"), head="yes_no")
    docs = [solid(c) for c in NAMES]
    scores = rr.score([("a red square", d) for d in docs]).tolist()
    ranked = rr.rank("a red square", docs, top_k=3)
    assert [r["index"] for r in ranked] == sorted(range(len(docs)), key=lambda i: -scores[i])[:3]
    assert ranked[0]["score"] == pytest.approx(max(scores), abs=1e-5)
    assert rr.score([("q", "d")], activation="sigmoid").item() == pytest.approx(
        torch.sigmoid(rr.score([("q", "d")])).item(), abs=1e-6)


def test_template_that_drops_the_document_is_reported(tiny_path):
    from transformers import AutoProcessor

    from hf_mm_rerank.data.pair_featurizers import ChatPairFeaturizer

    processor = AutoProcessor.from_pretrained(tiny_path("qwen2_vl"))
    processor.chat_template = "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'][0]['text'] }}" \
                              "{% endif %}{% endfor %}"
    with pytest.raises(ValueError, match="drops the query and document"):
        ChatPairFeaturizer(processor)
    processor.chat_template = ("{% for m in messages %}{% for c in m['content'] %}{% if c['type'] == 'text' %}"
                               "{{ c['text'] }}{% endif %}{% endfor %}{% endfor %}")
    with pytest.raises(ValueError, match="image placeholders"):
        ChatPairFeaturizer(processor)


def test_text_pairs_truncate_the_document_and_keep_the_query(tmp_path):
    rr = CrossEncoder.from_pretrained(_bert_classifier(tmp_path), max_length=40)
    query, document = "find the bright red square now", "the square is blue " * 20  # 30 and 380 tokens
    ids = rr.featurizer([(MMInput(text=query), MMInput(text=document))])["input_ids"][0].tolist()
    tok = rr.featurizer.tokenizer
    query_ids = tok.encode(query, add_special_tokens=False)
    assert len(ids) == 40 and ids[1:1 + len(query_ids)] == query_ids  # [CLS] query [SEP] document... [SEP]
    long_query = "red " * 60
    ids = rr.featurizer([(MMInput(text=long_query), MMInput(text="doc"))])["input_ids"][0].tolist()
    assert len(ids) <= 40 and tok.encode("doc", add_special_tokens=False)[0] in ids  # the document still counts
