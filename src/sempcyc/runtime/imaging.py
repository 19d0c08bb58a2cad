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
# A decompression bomb guard: far above any real sketch or photo, far below what exhausts memory.
MAX_PIXELS = 40_000_000


class ImageDecodeError(ValueError):
    """The bytes are not an image we can read; the message says why."""


class ImageTooLarge(ImageDecodeError):
    """The image header declares more pixels than MAX_PIXELS (checked before decoding)."""


def decode_bytes(data: bytes, name: str = "<bytes>", max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode encoded image bytes; `.base64` files may hold base64 text of an image or raw image bytes."""
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
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > max_pixels:
                raise ImageTooLarge(f"{name}: {image.width}x{image.height} pixels is over the "
                                    f"{max_pixels:,}-pixel limit")
            image.load()
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise ImageTooLarge(f"{name}: too many pixels ({exc})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"{name}: not a readable image ({exc.__class__.__name__}: {exc})") from None
    return image


def load_file(path: str | Path) -> Image.Image:
    path = Path(path)
    return decode_bytes(path.read_bytes(), str(path))


def _looks_like_image(data: bytes) -> bool:
    return data[:8] == b"\x89PNG\r\n\x1a\n" or data[:3] == b"\xff\xd8\xff" or data[:4] in (b"GIF8", b"RIFF")


def _flatten_on_white(image: Image.Image) -> Image.Image:
    """Composite any transparency onto white (emoji and many sketches are transparent PNGs)."""
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
