"""The retrieval gallery: a few held-out queries and the documents the model ranks first, before and after training.

One PNG (Pillow only): a panel per evaluation (e.g. "step 0" and "step 120"), each a grid with one row per query (the
query, then its top documents, best first). Images are drawn as thumbnails, texts as wrapped text; a relevant document
has a green frame, any other a grey one (the query's frame is blue). The queries are the same in every panel (the evaluator's
seeded draw), so the panels compare what training changed.

Example:
    >>> evaluator = RetrievalEvaluator(queries, corpus, relevant, gallery=4)
    >>> evaluator(model); before = evaluator.last_gallery
    >>> ...train...; evaluator(model)
    >>> draw_gallery({"before": before, "after": evaluator.last_gallery}).save("retrieval_gallery.png")
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from ..data.inputs import to_input

GALLERY_FILE = "retrieval_gallery.png"
TILE = 96  # pixels per cell (the card stays light: the demo's 4 queries x 6 cells x 2 panels of emoji is 127 KB)
GAP = 6
FRAME = 4
HIT, MISS, QUERY = (30, 160, 60), (190, 190, 190), (70, 110, 200)


def _cell(value: Any) -> Image.Image:
    """A tile for one query or document, read as every cell is (:func:`~hf_mm_rerank.data.inputs.to_input`): an
    image as a thumbnail (over text, when a cell has both), a text as wrapped text."""
    tile = Image.new("RGB", (TILE, TILE), "white")
    item = to_input(value)
    if item.image is not None:
        thumb = item.image.convert("RGB")
        thumb.thumbnail((TILE, TILE))
        tile.paste(thumb, ((TILE - thumb.width) // 2, (TILE - thumb.height) // 2))
        return tile
    lines = textwrap.wrap(str(item.text), width=15)[:7]
    ImageDraw.Draw(tile).multiline_text((4, 4), "\n".join(lines), fill="black", font=ImageFont.load_default(),
                                        spacing=2)
    return tile


def _panel(title: str, rows: Sequence[tuple[Any, Sequence[tuple[Any, bool]]]], columns: int) -> Image.Image:
    side = TILE + 2 * FRAME
    width = GAP + (columns + 1) * (side + GAP)
    height = 20 + GAP + len(rows) * (side + GAP)
    panel = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(panel)
    draw.text((GAP, 4), title, fill="black", font=ImageFont.load_default())
    for r, (query, documents) in enumerate(rows):
        y = 20 + GAP + r * (side + GAP)
        cells = [(query, QUERY)] + [(doc, HIT if hit else MISS) for doc, hit in documents]
        for c, (value, color) in enumerate(cells):
            x = GAP + c * (side + GAP)
            draw.rectangle([x, y, x + side - 1, y + side - 1], fill=color)
            panel.paste(_cell(value), (x + FRAME, y + FRAME))
    return panel


def draw_gallery(panels: Mapping[str, Sequence[tuple[Any, Sequence[tuple[Any, bool]]]]]) -> Image.Image:
    """The panels side by side, titled by their keys (in order); each from an evaluator's ``last_gallery``."""
    columns = max((len(docs) for rows in panels.values() for _, docs in rows), default=0)
    drawn = [_panel(title, rows, columns) for title, rows in panels.items()]
    width = sum(p.width for p in drawn) + GAP * (len(drawn) - 1)
    sheet = Image.new("RGB", (width, max(p.height for p in drawn)), "white")
    x = 0
    for panel in drawn:
        sheet.paste(panel, (x, 0))
        x += panel.width + GAP
    return sheet
