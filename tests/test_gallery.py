"""The retrieval gallery: held-out queries and their top 5 before and after training, written beside the model and
shown in its card; the same queries in every panel, hits framed green."""

from __future__ import annotations

import torch
from images import COLORS, solid
from PIL import Image
from transformers import TrainingArguments

from hf_mm_rerank import BiEncoder, BiEncoderTrainer, RetrievalEvaluator
from hf_mm_rerank.publishing.gallery import FRAME, GALLERY_FILE, GAP, HIT, TILE, draw_gallery


def test_the_trainer_writes_the_gallery_before_and_after_and_the_card_shows_it(tiny_path, tmp_path):
    model = BiEncoder.from_pretrained(tiny_path("clip"))
    queries, corpus = {c: f"a {c} square" for c in COLORS}, {c: solid(c) for c in COLORS}
    evaluator = RetrievalEvaluator(queries, corpus, {c: {c} for c in COLORS}, gallery=3)
    rows = [{"query": q, "positive": corpus[c]} for c, q in queries.items()]
    args = TrainingArguments(str(tmp_path / "out"), report_to="none", use_cpu=True, disable_tqdm=True)
    trainer = BiEncoderTrainer(model=model, args=args, train_dataset=rows, evaluator=evaluator)
    trainer.evaluate()
    first = evaluator.last_gallery
    assert len(first) == 3 and all(len(docs) == 5 for _, docs in first)
    with torch.no_grad():  # another model: what it retrieves changes
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    trainer.state.global_step = 7
    trainer.evaluate()
    assert [q for q, _ in evaluator.last_gallery] == [q for q, _ in first]  # the same queries in every panel
    trainer.save_model()
    picture = Image.open(tmp_path / "out" / GALLERY_FILE)
    side = TILE + 2 * FRAME
    panel = (GAP + 6 * (side + GAP), 20 + GAP + 3 * (side + GAP))  # a query and its 5 documents per row, 3 rows
    assert picture.size == (2 * panel[0] + GAP, panel[1])
    before, after = picture.crop((0, 20, panel[0], panel[1])), picture.crop((panel[0] + GAP, 20, picture.width,
                                                                               panel[1]))
    assert before.tobytes() != after.tobytes()
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"![retrieval gallery]({GALLERY_FILE})" in card
    trainer.create_model_card()  # Trainer.push_to_hub rewrites the card after saving: the picture stays in it
    assert f"![retrieval gallery]({GALLERY_FILE})" in (tmp_path / "out" / "README.md").read_text()


def test_relevant_documents_are_framed_green_and_undecoded_images_drawn():
    """Corpus cells as datasets leaves them undecoded ({"bytes", "path"}, the evaluators' form) are drawn as images."""
    import io

    buffer = io.BytesIO()
    solid("blue", (60, 40)).save(buffer, format="PNG")
    rows = [("a red square", [(solid("red"), True), ("a blue thing", False),
                              ({"bytes": buffer.getvalue(), "path": None}, False)])]
    sheet = draw_gallery({"step 0": rows})
    side = TILE + 2 * FRAME
    y = 20 + GAP + 1  # inside the top frame of the first row
    first_doc, second_doc = GAP + side + GAP + 1, GAP + 2 * (side + GAP) + 1
    assert sheet.getpixel((first_doc, y)) == HIT and sheet.getpixel((second_doc, y)) != HIT
    third_center = (GAP + 3 * (side + GAP) + side // 2, 20 + GAP + side // 2)
    assert sheet.getpixel(third_center) == COLORS["blue"]
