"""Small synthetic images with captions (solid colours) for fast tests."""

from __future__ import annotations

from PIL import Image

COLORS = {
    "red": (230, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 230), "yellow": (240, 230, 20),
    "black": (0, 0, 0), "white": (255, 255, 255), "purple": (128, 0, 128), "orange": (255, 128, 0),
}


def solid(color: str, size: tuple[int, int] = (40, 30)) -> Image.Image:
    return Image.new("RGB", size, COLORS[color])


def color_rows(repeat: int = 1, negatives: int = 1) -> list[dict]:
    names = list(COLORS)
    rows = []
    for i, color in enumerate(names):
        row = {"query": f"a {color} square", "positive": solid(color)}
        if negatives == 1:
            row["negative"] = solid(names[(i + 1) % len(names)])
        for j in range(negatives if negatives > 1 else 0):
            row[f"negative_{j + 1}"] = solid(names[(i + 1 + j) % len(names)])
        rows.append(row)
    return rows * repeat
