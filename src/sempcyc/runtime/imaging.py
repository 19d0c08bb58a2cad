"""Decoding and resizing of sketches and images: the one implementation that prepare, evaluation, the gallery
stage and the TorchServe handler all call, so a served sketch is preprocessed exactly like a training one.
"""
from __future__ import annotations

import base64
import binascii
import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".base64")
# The only formats opened, whatever a file is called: each of Pillow's other parsers (some 40; EPS runs Ghostscript)
# would face user uploads too, and a TIFF or GIF named .png would pass here only to fail or look wrong later.
ACCEPTED_FORMATS = ("PNG", "JPEG")
# The modes Pillow opens PNG and JPEG files in that the *_to_array functions convert faithfully: I;16 is 16-bit grey
# PNG ("I" before Pillow 10), CMYK a print JPEG. A mode outside these (a future Pillow's) is refused, not guessed.
ACCEPTED_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I", "CMYK")
# A decompression bomb guard: far above any real sketch or photo, far below what exhausts memory.
MAX_PIXELS = 40_000_000


class ImageDecodeError(ValueError):
    """The bytes are not an image we can read; the message says why."""


class ImageTooLarge(ImageDecodeError):
    """The image header declares more pixels than MAX_PIXELS (checked before decoding)."""


def decode_bytes(data: bytes, name: str = "<bytes>", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode encoded image bytes; `.base64` files may hold base64 text of an image or raw image bytes.

    Only PNG and JPEG are opened, told by their content, not their name, and only in the modes those give that
    the *_to_array functions convert faithfully: 1, L, LA, P, RGB, RGBA, CMYK (print JPEGs) and I;16 (16-bit grey
    PNG, "I" before Pillow 10; scaled to 8 bits). Anything else raises ImageDecodeError naming the format or mode
    found, so extract, prepare, gallery and the TorchServe handler all refuse the same files."""
    if not data:
        raise ImageDecodeError(f"{name}: empty file")
    if name.endswith(".base64") and not _looks_like_image(data):
        try:
            data = base64.b64decode(b"".join(data.split()), validate=True)
        except (binascii.Error, ValueError):
            raise ImageDecodeError(f"{name}: neither base64 text nor image bytes") from None
        if not data:
            raise ImageDecodeError(f"{name}: base64 text decodes to nothing")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
            if image.width * image.height > max_pixels:
                raise ImageTooLarge(f"{name}: {image.width}x{image.height} pixels is over the "
                                    f"{max_pixels:,}-pixel limit")
            if image.mode not in ACCEPTED_MODES:
                raise ImageDecodeError(f"{name}: {image.format} image in mode {image.mode!r}; only modes "
                                       f"{', '.join(ACCEPTED_MODES)} are accepted (re-save it as 8-bit RGB)")
            image.load()
    except ImageDecodeError:
        raise
    except UnidentifiedImageError:
        found = _format_of(data)
        if found in ACCEPTED_FORMATS:
            raise ImageDecodeError(f"{name}: not a readable image (broken {found} data)") from None
        raise ImageDecodeError(f"{name}: {f'{found} image' if found else 'unknown format'}; only PNG and JPEG "
                               "images are accepted (re-save it as PNG or JPEG)") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ImageTooLarge(f"{name}: too many pixels ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"{name}: not a readable image ({exc.__class__.__name__}: {exc})") from None
    return image


def load_file(path: str | Path) -> Image.Image:
    path = Path(path)
    return decode_bytes(path.read_bytes(), str(path))


def _format_of(data: bytes) -> str | None:
    """The format Pillow takes the bytes for, from its plugins' signature checks only: nothing is parsed."""
    Image.init()
    prefix = bytes(data[:16])
    for fmt in Image.ID:
        accept = Image.OPEN[fmt][1]
        try:
            found = accept is not None and accept(prefix)
        except Exception:  # noqa: BLE001 - a signature check that trips on short input is just no match
            continue
        if found and not isinstance(found, str):  # a str is Pillow's "looks like it, but cannot open it" warning
            return fmt
    return None


def _looks_like_image(data: bytes) -> bool:
    return data[:8] == b"\x89PNG\r\n\x1a\n" or data[:3] == b"\xff\xd8\xff" or data[:4] in (b"GIF8", b"RIFF")


def _flatten_on_white(image: Image.Image) -> Image.Image:
    """Composite any transparency onto white (emoji and many sketches are transparent PNGs)."""
    if image.mode in ("I;16", "I"):  # 16-bit grey: scale 0..65535 to 0..255; convert() would clip at 255 (white)
        image = image.convert("I").point(lambda v: v / 257).convert("L")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _fit_square(image: Image.Image, size: int) -> Image.Image:
    """Resize keeping the aspect ratio and pad with white to size x size (no distortion, no cropping)."""
    width, height = image.size
    scale = size / max(width, height)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = image.resize(new_size, Image.Resampling.BILINEAR, reducing_gap=3.0)
    canvas = Image.new(image.mode, (size, size), 255 if image.mode == "L" else (255, 255, 255))
    canvas.paste(resized, ((size - new_size[0]) // 2, (size - new_size[1]) // 2))
    return canvas


def image_to_array(image: Image.Image, size: int) -> np.ndarray:
    """A gallery photo as uint8 RGB (size, size, 3)."""
    return np.asarray(_fit_square(_flatten_on_white(image), size), dtype=np.uint8)


def sketch_to_array(image: Image.Image, size: int) -> np.ndarray:
    """A sketch as uint8 grey (size, size): dark strokes on white, as users draw them."""
    return np.asarray(_fit_square(_flatten_on_white(image).convert("L"), size), dtype=np.uint8)


def to_array(image: Image.Image, size: int, domain: str) -> np.ndarray:
    if domain == "sketch":
        return sketch_to_array(image, size)
    if domain == "image":
        return image_to_array(image, size)
    raise ValueError(f"unknown domain {domain!r}")
