import io

import numpy as np
import pytest
from PIL import Image

from hf_mm_rerank.inputs import InputError, fit_pixels, load_image, to_input


def _png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_text_cell_is_text():
    item = to_input("a red bicycle")
    assert item.text == "a red bicycle" and item.image is None


def test_every_image_kind_gives_the_same_rgb_pixels(tmp_path):
    image = Image.new("RGB", (7, 5), (10, 20, 30))
    path = tmp_path / "x.png"
    image.save(path)
    cells = [image, str(path), path, _png_bytes(image), {"bytes": _png_bytes(image), "path": None},
             {"bytes": None, "path": str(path)}]
    for cell in cells:
        got = to_input(cell).image
        assert got.mode == "RGB" and got.size == (7, 5)
        assert got.getpixel((3, 3)) == (10, 20, 30)


def test_text_and_image_dict():
    item = to_input({"text": "caption", "image": Image.new("RGB", (4, 4))})
    assert item.text == "caption" and item.image.size == (4, 4)


@pytest.mark.parametrize("mode", ["RGBA", "P", "CMYK", "L", "I;16", "LA", "I", "F"])
def test_unusual_modes_become_rgb(mode):
    image = Image.new("RGB", (6, 6), (200, 100, 50)).convert(mode)
    assert load_image(image).mode == "RGB"


def test_transparency_becomes_white():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert load_image(image).getpixel((0, 0)) == (255, 255, 255)


def test_16_bit_greyscale_keeps_its_range():
    array = np.array([[0, 65535], [30000, 1000]], dtype=np.uint16)
    image = Image.fromarray(array)
    assert image.mode.startswith("I;16")
    rgb = load_image(image)
    assert rgb.getpixel((0, 0)) == (0, 0, 0) and rgb.getpixel((1, 0)) == (255, 255, 255)


def test_max_pixels_shrinks_and_keeps_aspect():
    out = fit_pixels(Image.new("RGB", (400, 200)), 20_000)
    assert out.size[0] * out.size[1] <= 20_000 and abs(out.size[0] / out.size[1] - 2) < 0.05
    assert fit_pixels(Image.new("RGB", (10, 10)), 20_000).size == (10, 10)


def test_large_jpeg_is_drafted_then_resized(tmp_path):
    path = tmp_path / "big.jpg"
    Image.new("RGB", (640, 480), (0, 128, 255)).save(path, quality=90)
    out = load_image(str(path), max_pixels=80 * 60)
    assert out.size == (80, 60)
    r, g, b = out.getpixel((40, 30))
    assert abs(g - 128) < 8 and b > 240


@pytest.mark.parametrize("cell, message", [
    (12, "row 3, column 'positive': received int 12"),
    ("", "row 3, column 'positive': received an empty string"),
    ("missing/file.png", "image path 'missing/file.png', which does not exist"),
    (b"not an image", "could not decode the image"),
    ({"text": None}, "neither 'text' nor 'image'"),
    ({"bytes": None, "path": None}, "neither bytes nor path"),
])
def test_bad_cells_name_row_and_column(cell, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        to_input(cell, row=3, column="positive")
    assert "row 3, column 'positive'" in str(info.value)
