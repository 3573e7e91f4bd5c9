"""The one place that turns a dataset cell into text and/or an RGB image.

Accepted cells: ``str`` text, ``PIL.Image.Image``, a local image file path (``str`` or ``Path``), raw image
``bytes``, a ``datasets.Image`` value (``{"bytes": ..., "path": ...}``), or ``{"text": ..., "image": ...}``
for an input that has both. Everything that reads pixels (training collators, ``encode``, ``score`` and the
evaluators) goes through :func:`to_input`, so training and inference see the same images.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

ORIENTATION = 0x0112  # the EXIF orientation tag
# The largest image decoded, in pixels (width x height from the header, checked before decoding): PIL's own warning
# threshold (89.5 megapixels, about 270 MB as RGB) unless HF_MM_RERANK_MAX_IMAGE_PIXELS says otherwise. PIL only
# refuses twice its threshold; a 100-megapixel PNG would otherwise be decoded whole in every worker, every epoch.
MAX_IMAGE_PIXELS_ENV = "HF_MM_RERANK_MAX_IMAGE_PIXELS"
if os.environ.get(MAX_IMAGE_PIXELS_ENV) is not None:
    Image.MAX_IMAGE_PIXELS = None  # the setting replaces PIL's own (which refuses at twice its threshold)


def max_image_pixels() -> int | None:
    """The pixel limit in force (None: no limit, ``HF_MM_RERANK_MAX_IMAGE_PIXELS=0``)."""
    value = os.environ.get(MAX_IMAGE_PIXELS_ENV)
    if value is None:
        return Image.MAX_IMAGE_PIXELS
    try:
        limit = int(float(value))
    except ValueError:
        raise ValueError(f"{MAX_IMAGE_PIXELS_ENV}={value!r}: give a number of pixels, e.g. 200000000, or 0 for no "
                         "limit.") from None
    return limit or None
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}


@dataclass
class MMInput:
    """One model input: text, an RGB image, or both. ``source_size`` is the upright image's (width, height) before
    any shrinking, so featurizers can size it as the processor would size the original.

    Example:
        >>> item = to_input({"text": "a red bicycle", "image": "bike.jpg"}, max_pixels=448 * 448)
        >>> item.text, item.image.size, item.source_size   # a 1000x800 file: 'a red bicycle', (500, 400), (1000, 800)
        >>> to_input("a red bicycle")                       # MMInput(text='a red bicycle', image=None, ...)
    """

    text: str | None = None
    image: Image.Image | None = None
    source_size: tuple[int, int] | None = None


class InputError(ValueError):
    """A dataset cell that cannot be turned into text or an image (names the row and column). A ``ValueError``.

    Example:
        >>> try:
        ...     to_input("photos/missing.jpg", row=7, column="positive")
        ... except InputError as error:
        ...     print(error)   # row 7, column 'positive': received the image path 'photos/missing.jpg', which does ...
    """


def _where(row: Any, column: str | None) -> str:
    parts = []
    if row is not None:
        parts.append(f"row {row}")
    if column is not None:
        parts.append(f"column '{column}'")
    return ", ".join(parts) or "input"


def _describe(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:80]}{'...' if len(text) > 80 else ''}"


def to_input(cell: Any, *, max_pixels: int | None = None, row: Any = None, column: str | None = None,
             decode: bool = True, kind: str = "auto") -> MMInput:
    """Turn one cell into an :class:`MMInput`.

    Args:
        cell: the cell (see the module docstring for the accepted kinds).
        max_pixels: images with more pixels are shrunk (aspect kept) before any processor sees them.
        row, column: where the cell came from, for error messages.
        decode: False reads image headers only (format, size, PIL's pixel limit): ``image`` is then an unloaded
            PIL image. For scans (:func:`hf_mm_rerank.validate_dataset`, then :func:`check_decodes`), never for
            featurizing.
        kind: how a ``str`` cell is read: ``"auto"`` (see :func:`looks_like_image_path`), ``"text"`` (always text)
            or ``"image"`` (always a file path).

    Raises:
        InputError: the cell is of an unsupported kind, a path does not exist, or bytes are not an image.
    """
    where = _where(row, column)
    if isinstance(cell, dict) and ("text" in cell or "image" in cell) and not {"bytes", "path"} & cell.keys():
        text = cell.get("text")
        if text is not None and not isinstance(text, str):
            raise InputError(f"{where}: 'text' must be a string, received {_describe(text)}.")
        if text is not None:
            _check_text(text, where)
        image, source = (None, None) if cell.get("image") is None else _load(cell["image"], max_pixels, where, decode)
        if text is None and image is None:
            raise InputError(f"{where}: received a dict with neither 'text' nor 'image'; give at least one.")
        return MMInput(text=text, image=image, source_size=source)
    if kind not in CELL_KINDS:
        raise ValueError(f"kind={kind!r}: use one of {CELL_KINDS}.")
    if isinstance(cell, str) and (kind == "text" or kind == "auto" and not looks_like_image_path(cell)):
        if not cell.strip():
            raise InputError(f"{where}: received an empty string. Fix: drop the row or give text or an image.")
        return MMInput(text=_check_text(cell, where))
    image, source = _load(cell, max_pixels, where, decode, kind)
    return MMInput(image=image, source_size=source)


def _check_text(text: str, where: str) -> str:
    """Refuse text a tokenizer cannot take (lone surrogates from a bad decode), naming where it is."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InputError(
            f"{where}: the text is not valid Unicode ({exc.reason} at character {exc.start}, near "
            f"{text[max(0, exc.start - 20):exc.start + 1]!r}). Fix: repair the column, e.g. "
            "text.encode('utf-8', 'replace').decode('utf-8').") from None
    return text


CELL_KINDS = ("auto", "text", "image")


def looks_like_image_path(value: str) -> bool:
    """The one rule for a plain string cell: it is an image path when it ends in an image suffix and either names
    an existing file or has no whitespace (a bare path: a missing one is then an error, not silently text). A bare
    URL (``http://host/image?id=7``, suffix or not) and a bare path with a folder separator that exists (a folder, or
    a file without a suffix) are read as images too, so they get an error or are decoded, never silently embedded as
    text. Anything else is text: "show me the diagram in fig.png" is a sentence. URLs are never fetched. Per column,
    ``cell_types={"column": "text" | "image"}`` on the collators overrides the rule; ``datasets.Image`` columns are
    always images."""
    if len(value) >= 4096 or "\n" in value:
        return False
    bare = not any(c.isspace() for c in value)
    if bare and (value.startswith(URL_SCHEMES) or ("/" in value or os.sep in value) and os.path.exists(value)):
        return True
    if Path(value).suffix.lower() not in IMAGE_SUFFIXES:
        return False
    return bare or os.path.isfile(value)


URL_SCHEMES = ("http://", "https://")


def load_image(value: Any, *, max_pixels: int | None = None, where: str = "input") -> Image.Image:
    """Open an image cell as RGB, shrunk to at most ``max_pixels`` pixels.

    JPEGs are decoded at reduced scale (``Image.draft``) when the target is much smaller, which roughly
    halves decoding time for large photos; the EXIF orientation is applied. Paths, bytes and undecoded
    ``datasets.Image`` values all come through here, so every path that starts from them (training, the
    evaluators' ``from_dataset``, mining, ``cache_images``) sees the same pixels.
    """
    return _load(value, max_pixels, where)[0]


def _load(value: Any, max_pixels: int | None, where: str, decode: bool = True,
          kind: str = "auto") -> tuple[Image.Image, tuple[int, int]]:
    """(RGB image shrunk to ``max_pixels``, the upright image's size before any shrinking); with ``decode=False``
    (the image as opened from its header, its header size). ``kind`` only words the missing-file error."""
    if isinstance(value, Image.Image):
        image, source = value, value.size
    elif isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if isinstance(value, str) and value.startswith(URL_SCHEMES):
            raise InputError(f"{where}: received the URL '{value[:200]}'; URLs are never fetched. Fix: download the "
                             "images and give local paths, or load the column with datasets.Image() (which can); if "
                             "the cell is text, say so with cell_types={'<column>': 'text'}.")
        if path.is_dir():
            raise InputError(f"{where}: received '{value}', which is a folder, not an image file. Fix: give the path "
                             "of an image file in it; if the cell is text, say so with cell_types={'<column>': 'text'} "
                             "on the collator or trainer.")
        if not path.is_file():
            hint = (" (cell_types reads this column as images)." if kind == "image" else
                    ". If the cell is text, say so with cell_types={'<column>': 'text'} on the collator.")
            raise InputError(
                f"{where}: received the image path '{value}', which does not exist. Fix: check the file; relative "
                "paths are read from the working directory (the recipes: from the data file's folder, or "
                f"--image_root), or load the column with datasets.Image(){hint}")
        image, source = _open(path, where, max_pixels, decode)
    elif isinstance(value, (bytes, bytearray)):
        image, source = _open(io.BytesIO(value), where, max_pixels, decode)
    elif isinstance(value, dict) and {"bytes", "path"} & value.keys():
        if value.get("bytes"):
            image, source = _open(io.BytesIO(value["bytes"]), where, max_pixels, decode)
        elif value.get("path"):
            return _load(value["path"], max_pixels, where, decode)
        else:
            raise InputError(f"{where}: received a datasets Image dict with neither bytes nor path.")
    else:
        raise InputError(
            f"{where}: received {_describe(value)}; expected text (str), a PIL image, an image file path, "
            "image bytes, a datasets Image value or {'text': ..., 'image': ...}."
        )
    if not decode:
        return image, source
    return fit_pixels(to_rgb(image), max_pixels), source


def _open(source: Any, where: str, max_pixels: int | None, decode: bool = True) -> tuple[Image.Image, tuple[int, int]]:
    try:
        with warnings.catch_warnings():  # PIL warns above its threshold; the check below refuses those by name
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(source)
        width, height = image.size  # from the header, before any reduced-scale decoding
        limit = max_image_pixels()
        if limit and width * height > limit:
            raise InputError(
                f"{where}: the image is {width}x{height} ({width * height:,} pixels), over the limit of {limit:,} pixels "
                f"(decoding it would take {width * height * 3 / 2**30:.2f} GiB). Fix: "
                f"drop or downscale it, or raise the limit with {MAX_IMAGE_PIXELS_ENV}=<pixels> (0: none) if the file "
                "is trusted.")
        if not decode:
            return image, (width, height)
        if max_pixels and image.format == "JPEG":
            _draft(image, max_pixels)
        image.load()
        # Camera photos store their rotation in EXIF: show them upright, as viewers (and datasets) do.
        if image.getexif().get(ORIENTATION, 1) == 1:
            return image, (width, height)
        upright = ImageOps.exif_transpose(image)  # a quarter turn swaps the source's width and height too
        return upright, (width, height) if upright.size == image.size else (height, width)
    except Image.DecompressionBombError as exc:  # PIL's own refusal, at twice its threshold
        found = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"{int(found.group(1)):,} pixels" if found else "too many pixels"
        raise InputError(f"{where}: the image has {size}, over the limit of {max_image_pixels() or 0:,} pixels "
                         "(refused from its header, before decoding). Fix: drop or downscale it, or raise the limit "
                         f"with {MAX_IMAGE_PIXELS_ENV}=<pixels> (0: none) if the file is trusted.") from None
    except (OSError, SyntaxError) as exc:  # PIL raises UnidentifiedImageError (an OSError) for non-images
        raise InputError(f"{where}: could not decode the image ({_reason(exc, source)}). Fix: check the file or "
                         "bytes (a JPEG, PNG, WebP, GIF, BMP or TIFF image).") from exc


def check_decodes(image: Image.Image, where: str, *, owned: bool = True) -> None:
    """Decode ``image`` (as :func:`to_input` opens it with ``decode=False``: from its header) and drop the pixels, so a
    file damaged past its header (a truncated download, corrupt data) is refused by name before training meets it.
    ``owned`` (opened here, not the caller's own image): JPEGs decode at 1/8 scale (every byte of the file is still
    read, at a fraction of the cost) and the image is closed afterwards."""
    width, height = image.size
    try:
        if owned and image.format == "JPEG":
            image.draft(image.mode, (max(1, width // 8), max(1, height // 8)))
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(f"{where}: the {image.format or 'image'} file's header reads as {width}x{height} pixels, "
                         f"but its data could not be decoded ({_reason(exc, getattr(image, 'fp', None))}). Fix: "
                         "download or re-encode the file again (a truncated copy is the usual cause), or drop the "
                         "row.") from None
    finally:
        if owned:
            image.close()


def _reason(exc: BaseException, source: Any) -> str:
    """PIL's message with what was received in place of its ``<_io.BytesIO object at 0x...>``."""
    if not isinstance(source, io.BytesIO):
        return str(exc)
    data = source.getvalue()
    received = f"{len(data):,} bytes beginning {data[:16]!r}" if data else "0 bytes"
    return str(exc).replace(repr(source), received)


def _draft(image: Image.Image, max_pixels: int) -> None:
    width, height = image.size
    scale = math.sqrt(max_pixels / (width * height))
    if scale < 0.5:
        # draft() keeps the decoded size >= the requested one, so the later resize stays exact.
        image.draft("RGB", (max(1, int(width * scale)), max(1, int(height * scale))))


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode (RGBA, LA, P, CMYK, L, I;16, I, F, ...) to RGB; transparency becomes white."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit greyscale: scale to 8 bits by the image's own range instead of clipping.
        image = image if image.mode in ("I", "F") else image.convert("I")
        lo, hi = image.getextrema()
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        image = image.point(lambda v: (v - lo) * scale).convert("L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def fit_pixels(image: Image.Image, max_pixels: int | None) -> Image.Image:
    """Shrink ``image`` (aspect kept) so that width * height <= ``max_pixels``."""
    width, height = image.size
    if not max_pixels or width * height <= max_pixels:
        return image
    scale = math.sqrt(max_pixels / (width * height))
    size = (max(1, int(width * scale)), max(1, int(height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


def fingerprint(cell: Any) -> str:
    """Content hash of a cell (text and pixels), so the same document in two places compares equal."""
    item = to_input(cell)
    digest = hashlib.md5()
    if item.text is not None:
        digest.update(b"T" + item.text.encode())
    if item.image is not None:
        digest.update(b"I" + repr(item.image.size).encode() + item.image.tobytes())
    return digest.hexdigest()
