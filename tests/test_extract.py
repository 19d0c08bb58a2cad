import base64
import dataclasses
import gzip
import io
import json
import lzma
import tarfile
import time
import tracemalloc
from pathlib import Path

import pytest
from PIL import Image

from helpers import class_files, png_bytes, repo_params, run_cli, write_params, write_tar
from sempcyc.errors import UserError
from sempcyc.params import read_section
from sempcyc.runtime import imaging
from sempcyc.stages import extract

DATA = read_section(repo_params(), extract.DataSettings)  # the repository's data section: its folders and caps


def do_extract(tmp_path: Path, tar: Path) -> dict:
    return extract.extract(tar, tmp_path / "dataset", DATA)


def assert_nothing_written(tmp_path: Path) -> None:
    assert not (tmp_path / "dataset").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_extracts_layout_and_index(tmp_path, tiny_classes):
    tar = write_tar(tmp_path / "d.tar", class_files(tiny_classes))
    index = do_extract(tmp_path, tar)
    assert index["classes"] == sorted(tiny_classes)
    assert index["counts"]["class_00"] == {"images": 3, "sketches": 3}
    assert index["files"]["images"]["class_03"] == ["000.png", "001.png", "002.png"]
    assert (tmp_path / "dataset/sketches/class_09/002.png").read_bytes() == \
        class_files(tiny_classes)["ds/sketches/class_09/002.png"]


def test_cli_writes_index_and_replaces_old_output(tmp_path, tiny_classes):
    write_tar(tmp_path / "d.tar", class_files(tiny_classes))
    write_params(tmp_path, {"data": {"tar": "d.tar"}})
    (tmp_path / "dataset" / "stale").mkdir(parents=True)
    run_cli("extract", "--out", "dataset", "--index", "dataset.json", cwd=tmp_path)
    index = json.loads((tmp_path / "dataset.json").read_text())
    assert len(index["classes"]) == 10
    assert not (tmp_path / "dataset" / "stale").exists()


@pytest.mark.parametrize("content", [b"", b"this is not a tar archive at all" * 40])
def test_corrupt_or_empty_tar(tmp_path, content):
    tar = tmp_path / "bad.tar"
    tar.write_bytes(content)
    with pytest.raises(UserError, match="bad.tar"):
        do_extract(tmp_path, tar)
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("where", [slice(40, 240), slice(-240, -40)], ids=["start", "end"])
def test_damaged_compressed_tar_is_one_line(tmp_path, tiny_classes, where):
    """Damage near the start fails tarfile.open (which lists every method it tried, a line each), damage further
    on fails the header scan with lzma's own error type."""
    packed = bytearray(lzma.compress(write_tar(tmp_path / "d.tar", class_files(tiny_classes)).read_bytes()))
    packed[where] = bytes(200)
    tar = tmp_path / "bad.tar.xz"
    tar.write_bytes(packed)
    with pytest.raises(UserError, match="bad.tar.xz: (not a readable|corrupt) tar archive") as err:
        do_extract(tmp_path, tar)
    assert "\n" not in str(err.value)
    assert_nothing_written(tmp_path)


def test_tar_with_no_members(tmp_path):
    tar = write_tar(tmp_path / "empty.tar", {})
    with pytest.raises(UserError, match="empty"):
        do_extract(tmp_path, tar)


def test_truncated_tar(tmp_path, tiny_classes):
    full = write_tar(tmp_path / "full.tar", class_files(tiny_classes)).read_bytes()
    tar = tmp_path / "cut.tar"
    tar.write_bytes(full[: len(full) // 2 + 100])
    with pytest.raises(UserError, match="cut.tar"):
        do_extract(tmp_path, tar)
    assert_nothing_written(tmp_path)


def test_missing_tar_names_param(tmp_path):
    with pytest.raises(UserError, match="data.tar"):
        do_extract(tmp_path, tmp_path / "nope.tar")


def _member(name, kind, target=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


@pytest.mark.parametrize("member, message", [
    (_member("/etc/evil.png", tarfile.REGTYPE), "absolute"),
    (_member("ds/images/class_00/../../../evil.png", tarfile.REGTYPE), r"\.\."),
    (_member("ds/images/class_00/link.png", tarfile.SYMTYPE, "/etc/passwd"), "link"),
    (_member("ds/images/class_00/hard.png", tarfile.LNKTYPE, "ds/images/class_00/000.png"), "link"),
    (_member("ds/images/class_00/dev.png", tarfile.CHRTYPE), "device"),
    (_member("ds/images/class_00/fifo.png", tarfile.FIFOTYPE), "device"),
])
def test_tar_slip_members_refused(tmp_path, tiny_classes, member, message):
    tar = write_tar(tmp_path / "slip.tar", class_files(tiny_classes), extra=[member])
    with pytest.raises(UserError, match=message):
        do_extract(tmp_path, tar)
    assert_nothing_written(tmp_path)
    assert not (tmp_path.parent / "evil.png").exists()


@pytest.mark.parametrize("drop", ["images", "sketches"])
def test_missing_domain_folder(tmp_path, tiny_classes, drop):
    files = {k: v for k, v in class_files(tiny_classes).items() if f"/{drop}/" not in k}
    with pytest.raises(UserError, match=f"ds/{drop}/"):
        do_extract(tmp_path, write_tar(tmp_path / "d.tar", files))


def test_domain_folders_named_by_params(tmp_path, tiny_classes):
    files = {k.replace("/images/", "/photo/").replace("/sketches/", "/sketch/"): v
             for k, v in class_files(tiny_classes).items()}
    index = extract.extract(write_tar(tmp_path / "d.tar", files), tmp_path / "dataset",
                            dataclasses.replace(DATA, images_dir="photo", sketches_dir="sketch"))
    assert len(index["classes"]) == 10


def test_empty_class_folder(tmp_path, tiny_classes):
    tar = write_tar(tmp_path / "d.tar", class_files(tiny_classes), dirs=["ds/images/hollow"])
    with pytest.raises(UserError, match="hollow.*no image files"):
        do_extract(tmp_path, tar)
    assert_nothing_written(tmp_path)


def test_image_that_does_not_decode_is_named(tmp_path, tiny_classes):
    files = class_files(tiny_classes)
    files["ds/images/class_04/broken.jpg"] = b"\xff\xd8\xff garbage, not a jpeg"
    with pytest.raises(UserError, match="ds/images/class_04/broken.jpg"):
        do_extract(tmp_path, write_tar(tmp_path / "d.tar", files))
    assert_nothing_written(tmp_path)


def test_base64_text_and_raw_bytes_accepted(tmp_path, tiny_classes):
    files = class_files(tiny_classes)
    files["ds/images/class_01/b64text.base64"] = base64.b64encode(png_bytes(7)) + b"\n"
    files["ds/images/class_01/b64raw.base64"] = png_bytes(8)
    index = do_extract(tmp_path, write_tar(tmp_path / "d.tar", files))
    assert "b64text.base64" in index["files"]["images"]["class_01"]
    assert index["counts"]["class_01"]["images"] == 5


def test_invalid_base64_is_named(tmp_path, tiny_classes):
    files = class_files(tiny_classes)
    files["ds/sketches/class_02/bad.base64"] = b"!!! not base64 !!!"
    with pytest.raises(UserError, match="class_02/bad.base64"):
        do_extract(tmp_path, write_tar(tmp_path / "d.tar", files))


def test_base64_of_garbage_is_named(tmp_path, tiny_classes):
    files = class_files(tiny_classes)
    files["ds/sketches/class_02/junk.base64"] = base64.b64encode(b"hello, not an image")
    with pytest.raises(UserError, match="class_02/junk.base64"):
        do_extract(tmp_path, write_tar(tmp_path / "d.tar", files))


def test_names_with_spaces_parentheses_and_non_ascii_are_kept(tmp_path):
    classes = {"hot air balloon": (2, 2), "bear (animal)": (2, 2), "café": (2, 2), "plain": (2, 2)}
    index = do_extract(tmp_path, write_tar(tmp_path / "d.tar", class_files(classes)))
    assert index["classes"] == sorted(classes)
    assert (tmp_path / "dataset/images/café/000.png").exists()


def test_non_nfc_name_refused(tmp_path):
    decomposed = "cafe\u0301"
    with pytest.raises(UserError, match="NFC"):
        do_extract(tmp_path, write_tar(tmp_path / "d.tar", class_files({decomposed: (2, 2), "x": (2, 2)})))


def test_control_character_name_refused(tmp_path):
    with pytest.raises(UserError, match="control"):
        do_extract(tmp_path, write_tar(tmp_path / "d.tar", class_files({"bad\tname": (2, 2), "x": (2, 2)})))


def test_classes_differing_only_by_case(tmp_path):
    with pytest.raises(UserError, match="'Cat' and 'cat' differ only by case"):
        do_extract(tmp_path, write_tar(tmp_path / "d.tar", class_files({"cat": (2, 2), "Cat": (2, 2)})))
    assert_nothing_written(tmp_path)


def test_gallery_only_class_allowed(tmp_path, tiny_classes):
    index = do_extract(tmp_path, write_tar(tmp_path / "d.tar", class_files({**tiny_classes, "lonely": (3, 0)})))
    assert index["counts"]["lonely"] == {"images": 3, "sketches": 0}


def test_sketches_without_images_refused(tmp_path, tiny_classes):
    with pytest.raises(UserError, match="'ghost' has sketches but no images"):
        do_extract(tmp_path, write_tar(tmp_path / "d.tar", class_files({**tiny_classes, "ghost": (0, 3)})))


def test_class_lists_read_from_tar(tmp_path, tiny_classes):
    files = class_files(tiny_classes)
    files["ds/test_classes.txt"] = b"# unseen\nclass_01\n\nclass_02\n"
    index = do_extract(tmp_path, write_tar(tmp_path / "d.tar", files))
    assert index["class_lists"] == {"test_classes": ["class_01", "class_02"]}


def test_failed_extract_keeps_previous_output(tmp_path, tiny_classes):
    good = write_tar(tmp_path / "good.tar", class_files(tiny_classes))
    do_extract(tmp_path, good)
    files = class_files(tiny_classes)
    files["ds/images/class_00/zz.png"] = b"\x89PNG\r\n\x1a\n truncated"
    with pytest.raises(UserError):
        do_extract(tmp_path, write_tar(tmp_path / "bad.tar", files))
    assert sorted(p.name for p in (tmp_path / "dataset/images").iterdir()) == sorted(tiny_classes)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]


def test_wrong_param_type_is_one_line_error(tmp_path, tiny_classes):
    write_tar(tmp_path / "d.tar", class_files(tiny_classes))
    write_params(tmp_path, {"data": {"tar": "d.tar", "images_dir": 5}})
    proc = run_cli("extract", "--out", "dataset", "--index", "dataset.json", cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert "data.images_dir must be a non-empty string, got 5" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_help():
    proc = run_cli("extract", "--help", cwd=Path("."))
    assert "data.tar" in proc.stdout


# --- hostile inputs: sizes, sparse members, extended headers -----------------------------------------------------

GIB = 1 << 30


def _raw(files: dict[str, bytes], fmt: int = tarfile.GNU_FORMAT) -> bytes:
    """Tar member bytes (header + padded data) without the end-of-archive marker, to splice hand-made headers in."""
    out = b""
    for name, data in sorted(files.items()):
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(data), 0o644
        out += info.tobuf(fmt, "utf-8", "surrogateescape") + data + bytes(-len(data) % tarfile.BLOCKSIZE)
    return out


def _header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytearray:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.mode = size, kind, 0o644
    return bytearray(info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape"))


def _gnu_sparse(name: str, claimed: int) -> bytes:
    """An old-GNU sparse member ('S'): one 512-byte data region, the rest of the `claimed` size a hole."""
    buf = _header(name, tarfile.BLOCKSIZE, tarfile.GNUTYPE_SPARSE)
    buf[386:398] = b"%011o\0" % 0
    buf[398:410] = b"%011o\0" % tarfile.BLOCKSIZE
    buf[483:495] = b"\x80" + claimed.to_bytes(11, "big")  # GNU base-256 number: the file's real size
    buf[148:156] = b" " * 8
    buf[148:155] = b"%06o\0" % sum(buf)
    return bytes(buf) + bytes(tarfile.BLOCKSIZE)


def _pax_sparse(version: str, name: str, claimed: int) -> bytes:
    """A GNU sparse member in PAX format 0.1 (map in the header) or 1.0 (map at the start of the data)."""
    info = tarfile.TarInfo(f"{name}.sparse")
    if version == "0.1":
        info.pax_headers = {"GNU.sparse.size": str(claimed), "GNU.sparse.numblocks": "1",
                            "GNU.sparse.map": f"0,{tarfile.BLOCKSIZE}", "GNU.sparse.name": name}
        data = bytes(tarfile.BLOCKSIZE)
    else:
        info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": name,
                            "GNU.sparse.realsize": str(claimed)}
        data = b"1\n0\n512\n".ljust(tarfile.BLOCKSIZE, b"\0") + bytes(tarfile.BLOCKSIZE)
    info.size, info.mode = len(data), 0o644
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape") + data


def _hostile(tmp_path: Path, member: bytes, suffix: str = ".tar") -> Path:
    """A small valid dataset (one class) after one hand-made member."""
    data = member + _raw(class_files({"a": (1, 1)})) + bytes(2 * tarfile.BLOCKSIZE)
    path = tmp_path / f"hostile{suffix}"
    path.write_bytes(gzip.compress(data, mtime=0) if suffix == ".tar.gz" else data)
    return path


def _fails_fast(tmp_path: Path, tar: Path, match: str, **kwargs) -> str:
    """The tar is refused with one line, in under a second and 200 MB, and nothing is written."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(UserError, match=match) as err:
            extract.extract(tar, tmp_path / "dataset", dataclasses.replace(DATA, **kwargs))
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 1.0 and peak < 200e6, (elapsed, peak)
    assert "\n" not in str(err.value) and str(tar) in str(err.value)
    assert_nothing_written(tmp_path)
    return str(err.value)


@pytest.mark.parametrize("kind", ["gnu", "pax0.1", "pax1.0"])
def test_sparse_member_refused_before_reading(tmp_path, kind):
    name = "ds/images/a/huge.png"
    member = _gnu_sparse(name, 64 * GIB) if kind == "gnu" else _pax_sparse(kind[3:], name, 64 * GIB)
    tar = _hostile(tmp_path, member)
    assert tar.stat().st_size < 10_000
    _fails_fast(tmp_path, tar, f"'{name}.*sparse")


@pytest.mark.parametrize("kind", [tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME])
def test_huge_extended_header_refused(tmp_path, kind):
    """tarfile would read a PAX or long-name header whole, so a few KB could ask for 64 GiB of memory."""
    tar = _hostile(tmp_path, bytes(_header("././@LongHeader", 64 * GIB, kind)))
    _fails_fast(tmp_path, tar, "header.*refused")


@pytest.mark.parametrize("kind", [tarfile.REGTYPE, tarfile.XHDTYPE], ids=["file", "pax-header"])
def test_negative_size_refused(tmp_path, kind):
    """A GNU base-256 size can be negative: tarfile would step back onto the same header, or read a PAX header
    to the end of the stream."""
    buf = _header("ds/images/a/neg.png", 0, kind)
    buf[124:136] = b"\xff" * 10 + b"\xf8\x00"  # -2048: four blocks back
    buf[148:156] = b" " * 8
    buf[148:155] = b"%06o\0" % sum(buf)
    _fails_fast(tmp_path, _hostile(tmp_path, bytes(buf)), "negative size")


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
def test_member_over_max_member_bytes_refused_from_its_header(tmp_path, suffix):
    tar = _hostile(tmp_path, bytes(_header("ds/images/a/huge.png", 64 * GIB)), suffix)
    _fails_fast(tmp_path, tar, r"'ds/images/a/huge.png' declares 68,719,476,736 bytes.*data\.max_member_bytes")


@pytest.mark.parametrize("key, value", [("max_member_bytes", 100), ("max_members", 10),
                                        ("max_total_bytes", 5000)])
def test_size_caps_are_params(tmp_path, tiny_classes, key, value):
    write_tar(tmp_path / "d.tar", class_files(tiny_classes))
    write_params(tmp_path, {"data": {"tar": "d.tar", key: value}})
    proc = run_cli("extract", "--out", "dataset", "--index", "dataset.json", cwd=tmp_path, check=False)
    assert proc.returncode == 1
    line = proc.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert "d.tar" in line and "member 'ds/" in line and f"data.{key}" in line
    assert not (tmp_path / "dataset").exists()


# --- compressed tars: one pass in archive order ------------------------------------------------------------------

def test_compressed_tar_is_read_in_one_pass_in_archive_order(tmp_path, tiny_classes, monkeypatch):
    """Every backward seek in a gzip stream restarts decompression from byte 0; one (headers, then data) is fine."""
    files = class_files(tiny_classes)
    plain = tmp_path / "d.tar"
    with tarfile.open(plain, "w") as tar:  # name order reversed, like `tar -c` in directory order
        for name, data in sorted(files.items(), reverse=True):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    packed = tmp_path / "d.tar.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes(), mtime=0))
    backward = []
    original = gzip.GzipFile.seek

    def seek(self, offset, whence=io.SEEK_SET):
        if whence == io.SEEK_SET and offset < self.tell():
            backward.append(offset)
        return original(self, offset, whence)

    monkeypatch.setattr(gzip.GzipFile, "seek", seek)
    index = extract.extract(packed, tmp_path / "from_gz", DATA)
    assert len(backward) <= 1
    assert index == {**extract.extract(plain, tmp_path / "from_tar", DATA), "source": "d.tar.gz"}
    assert index["files"]["images"]["class_03"] == ["000.png", "001.png", "002.png"]
    for path in (tmp_path / "from_tar").rglob("*.png"):
        assert (tmp_path / "from_gz" / path.relative_to(tmp_path / "from_tar")).read_bytes() == path.read_bytes()


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz"])
@pytest.mark.parametrize("tail", [b"", bytes(tarfile.BLOCKSIZE)])
def test_tar_cut_at_a_member_boundary(tmp_path, tiny_classes, suffix, tail):
    """tarfile stops quietly there; the missing end-of-archive marker (two zero blocks) gives it away."""
    files = class_files(tiny_classes)
    data = _raw(dict(sorted(files.items())[: len(files) // 2])) + tail
    tar = tmp_path / f"cut{suffix}"
    tar.write_bytes(gzip.compress(data, mtime=0) if suffix == ".tar.gz" else data)
    with pytest.raises(UserError, match=f"cut{suffix}: the archive is truncated"):
        do_extract(tmp_path, tar)
    assert_nothing_written(tmp_path)


# --- only PNG and JPEG are decoded -------------------------------------------------------------------------------

def _encoded(mode: str, fmt: str, size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format=fmt)
    return buf.getvalue()


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nnewpath 0 0 moveto 8 8 lineto stroke showpage\n"


@pytest.mark.parametrize("data, found", [(_encoded("LAB", "TIFF"), "TIFF"), (_encoded("P", "GIF"), "GIF"),
                                         (_encoded("RGB", "BMP"), "BMP"), (EPS, "EPS"),
                                         (b"just some text, no image", "unknown format")],
                         ids=["tiff-lab", "gif", "bmp", "eps", "text"])
def test_decode_bytes_accepts_only_png_and_jpeg(data, found):
    with pytest.raises(imaging.ImageDecodeError, match=f"x.png: {found}.*only PNG and JPEG"):
        imaging.decode_bytes(data, "x.png")


@pytest.mark.parametrize("mode, fmt", [("1", "PNG"), ("L", "PNG"), ("LA", "PNG"), ("P", "PNG"), ("RGB", "PNG"),
                                       ("RGBA", "PNG"), ("I;16", "PNG"), ("L", "JPEG"), ("RGB", "JPEG"),
                                       ("CMYK", "JPEG")])
def test_decode_bytes_keeps_png_and_jpeg_modes(mode, fmt):
    image = imaging.decode_bytes(_encoded(mode, fmt), f"x.{fmt.lower()}")
    assert image.mode == mode
    assert imaging.sketch_to_array(image, 16).shape == (16, 16)


def test_sixteen_bit_grey_png_is_scaled_not_clipped():
    import numpy as np
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(buf, format="PNG")
    image = imaging.decode_bytes(buf.getvalue(), "x.png")
    assert image.mode == "I;16"
    assert abs(int(imaging.sketch_to_array(image, 8)[4, 4]) - 40000 // 257) <= 1


def test_decode_bytes_refuses_unexpected_modes(monkeypatch):
    monkeypatch.setattr(imaging, "ACCEPTED_MODES", ("RGB",))
    with pytest.raises(imaging.ImageDecodeError, match="x.png: PNG image in mode 'LA'"):
        imaging.decode_bytes(_encoded("LA", "PNG"), "x.png")


def test_disguised_format_in_tar_is_named(tmp_path, tiny_classes):
    files = class_files(tiny_classes)
    files["ds/sketches/class_05/fake.png"] = _encoded("P", "GIF")
    with pytest.raises(UserError) as err:
        do_extract(tmp_path, write_tar(tmp_path / "d.tar", files))
    assert "ds/sketches/class_05/fake.png: GIF" in str(err.value) and "only PNG and JPEG" in str(err.value)
    assert "\n" not in str(err.value)
    assert_nothing_written(tmp_path)


# --- failing early: names, duplicates, class lists ---------------------------------------------------------------

def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_non_utf8_class_list_leaves_previous_output(tmp_path, tiny_classes):
    do_extract(tmp_path, write_tar(tmp_path / "good.tar", class_files(tiny_classes)))
    before = _snapshot(tmp_path / "dataset")
    files = class_files(tiny_classes)
    files["ds/test_classes.txt"] = "class_01\ncafé\n".encode("latin-1")
    with pytest.raises(UserError, match=r"bad.tar: ds/test_classes.txt: class list is not UTF-8"):
        do_extract(tmp_path, write_tar(tmp_path / "bad.tar", files))
    assert _snapshot(tmp_path / "dataset") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tar", "dataset", "good.tar"]


def test_non_utf8_member_name_refused(tmp_path, tiny_classes):
    tar = tmp_path / "d.tar"
    with tarfile.open(tar, "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as out:  # raw 0xe9, as on Latin-1
        for name, data in sorted({**class_files(tiny_classes), "ds/images/class_00/café.png": png_bytes(3)}.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
    with pytest.raises(UserError, match=r"'ds/images/class_00/caf\\xe9.png'.*not UTF-8"):
        do_extract(tmp_path, tar)
    assert_nothing_written(tmp_path)


def test_non_utf8_member_name_is_one_line_in_the_cli(tmp_path, tiny_classes):
    files = class_files(tiny_classes)
    data = _raw(files) + _raw({"ds/sketches/class_01/caf\udce9.png": png_bytes(4, mode="L")})
    (tmp_path / "d.tar").write_bytes(data + bytes(2 * tarfile.BLOCKSIZE))
    write_params(tmp_path, {"data": {"tar": "d.tar"}})
    proc = run_cli("extract", "--out", "dataset", "--index", "dataset.json", cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "caf\\xe9.png" in proc.stderr and "not UTF-8" in proc.stderr
    assert not (tmp_path / "dataset").exists() and not (tmp_path / "dataset.json").exists()


@pytest.mark.parametrize("long_name", ["ds/images/class_00/" + "x" * 296 + ".png",
                                       "ds/images/" + "é" * 150 + "/000.png"])
def test_over_long_file_or_folder_name_refused(tmp_path, tiny_classes, long_name):
    files = {**class_files(tiny_classes), long_name: png_bytes(5)}
    with pytest.raises(UserError, match="300 bytes.*255"):
        do_extract(tmp_path, write_tar(tmp_path / "d.tar", files))
    assert_nothing_written(tmp_path)


def test_duplicate_member_refused(tmp_path, tiny_classes):
    files = class_files(tiny_classes)
    data = _raw(files) + _raw({"ds/images/class_02/001.png": png_bytes(6)})
    (tmp_path / "d.tar").write_bytes(data + bytes(2 * tarfile.BLOCKSIZE))
    with pytest.raises(UserError, match="'ds/images/class_02/001.png' appears more than once"):
        do_extract(tmp_path, tmp_path / "d.tar")
    assert_nothing_written(tmp_path)
