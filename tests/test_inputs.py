import io

import numpy as np
import pytest
from PIL import Image

from hf_mm_rerank.data.inputs import InputError, fit_pixels, load_image, to_input


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


def test_undecodable_bytes_are_described_not_shown_as_an_object():
    """PIL names the stream it could not read as ``<_io.BytesIO object at 0x...>``: the error says what came."""
    with pytest.raises(InputError) as info:
        to_input(b"GIF89a-truncated", row=3, column="positive")
    message = str(info.value)
    assert "16 bytes beginning b'GIF89a-truncated'" in message
    assert "object at 0x" not in message and "row 3, column 'positive'" in message


# ----- the one rule for string cells ------------------------------------------------------------------------
def test_string_cells_follow_one_rule(tmp_path):
    import os

    from PIL import Image

    from hf_mm_rerank import InputError, to_input

    spaced = tmp_path / "my photo.png"
    Image.new("RGB", (8, 8)).save(spaced)
    assert to_input("show me the diagram in fig.png").text == "show me the diagram in fig.png"  # a sentence
    assert to_input(str(spaced)).image is not None  # an existing file, whitespace or not
    with pytest.raises(InputError, match=r"'img/missing\.png', which does not exist.*cell_types=\{'<column>': 'text'\}"):
        to_input("img/missing.png", row=3, column="positive")  # a bare path that is missing: an error, not text
    with pytest.raises(InputError, match="URLs are never fetched"):
        to_input("https://example.com/cat.jpg")
    # A bare URL without an image suffix, and a folder path, in an image column: named, never read as text.
    for url in ("http://host/image?id=7", "https://example.com/cat.jpg"):
        with pytest.raises(InputError, match=r"row 3, column 'positive': received the URL .*URLs are never fetched.*"
                                             r"cell_types=\{'<column>': 'text'\}"):
            to_input(url, row=3, column="positive")
        assert to_input(url, kind="text").text == url
    (tmp_path / "photos").mkdir()
    with pytest.raises(InputError, match=r"row 3, column 'positive': received '.*photos', which is a folder, not an "
                                         r"image file\. Fix: give the path of an image file in it"):
        to_input(str(tmp_path / "photos"), row=3, column="positive")
    no_suffix = tmp_path / "photos" / "0001"
    Image.new("RGB", (8, 6)).save(no_suffix, "PNG")
    assert to_input(str(no_suffix)).image.size == (8, 6)  # an existing file without a suffix is an image
    assert to_input("see https://example.com for details").text  # a sentence with a URL stays text
    assert to_input("fig.png", kind="text").text == "fig.png"
    with pytest.raises(InputError, match="does not exist"):
        to_input("my missing photo.png", kind="image")
    assert os.path.isfile(spaced)


def test_cell_types_override_per_column(tiny_path):
    from images import solid

    from hf_mm_rerank import BiEncoder, BiEncoderCollator, InputError

    model = BiEncoder.from_pretrained(tiny_path("clip"))
    row = {"query": "fig.png", "positive": solid("red"), "negative_1": "chart.png"}
    with pytest.raises(InputError, match="row 0 of the batch, column 'query': received the image path 'fig.png'"):
        BiEncoderCollator(model)([row])
    batch = BiEncoderCollator(model, cell_types={"query": "text", "negative": "text"})([row])
    assert "text" in batch["query"][0] and "text" in batch["negative"][0]  # both read as text
    with pytest.raises(ValueError, match="must be one of"):
        BiEncoderCollator(model, cell_types={"query": "pixels"})
    with pytest.raises(InputError, match=r"does not exist.*\(cell_types reads this column as images\)\.$"):
        BiEncoderCollator(model, cell_types={"query": "image"})([{**row, "query": "a blue square"}])


def test_cell_types_must_name_dataset_columns(tiny_path, tmp_path):
    from datasets import Dataset
    from helpers import args
    from images import color_rows

    from hf_mm_rerank import BiEncoder, BiEncoderTrainer

    model = BiEncoder.from_pretrained(tiny_path("clip"))
    with pytest.raises(ValueError, match=r"cell_types names column\(s\) \['positve'\]"):
        BiEncoderTrainer(model=model, args=args(tmp_path), train_dataset=Dataset.from_list(color_rows()),
                         cell_types={"positve": "text"})
