"""extract stage: a user's data.tar -> data/dataset/ (images/<class>/*, sketches/<class>/*) + data/dataset.json.

The tar is read member by member and each file is written to a path we compute, never with tarfile.extract, so
absolute paths, `..`, links and devices cannot escape. Every image is decoded once here, so a broken file is
reported by name now rather than hours later in training. Output appears only when everything is valid.

Headers are read and checked first (sizes against the data.max_* caps, names, layout), then the data in one pass
in archive order: in a .tar.gz every backward seek restarts decompression from byte 0.
"""
from __future__ import annotations

import argparse
import lzma
import tarfile
import unicodedata
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import ClassVar

from tqdm import tqdm

from .. import params as params_mod
from ..errors import UserError
from ..fsutil import atomic_dir, atomic_write_json
from ..params import setting
from ..runtime import imaging
from ..split import read_class_list

DOMAINS = ("images", "sketches")
CLASS_LIST_FILES = ("test_classes.txt", "train_classes.txt")
# A PAX or GNU long-name header holds a path and a few attributes; tarfile reads it whole into memory.
MAX_HEADER_BYTES = 1 << 20
NAME_MAX = 255  # bytes in one file or folder name on ext4, XFS, btrfs and APFS
READ_CHUNK = 1 << 20
READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError)
EXTENDED_HEADERS = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                    tarfile.GNUTYPE_LONGLINK)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tar", help="dataset tar (default: param data.tar)")
    parser.add_argument("--out", default="data/dataset", help="output folder (default: %(default)s)")
    parser.add_argument("--index", default="data/dataset.json", help="output index (default: %(default)s)")


@dataclass(frozen=True)
class DataSettings:
    """The `data` section. Without the max_* caps a 10 KB tar can declare a 64 GiB member and a 17 MB .tar.gz
    hold one; an image or sketch is well under 1 MB, and the extended Sketchy and TU-Berlin sets have under
    300 000 files."""
    SECTION: ClassVar[str] = "data"
    tar: str = setting()
    images_dir: str = setting()
    sketches_dir: str = setting()
    max_member_bytes: int = setting(min=1)
    max_members: int = setting(min=1)
    max_total_bytes: int = setting(min=1)

    @property
    def folders(self) -> dict[str, str]:
        return {"images": self.images_dir, "sketches": self.sketches_dir}


def run(args: argparse.Namespace) -> None:
    (data,) = params_mod.read(args.params, DataSettings)
    tar_path = Path(args.tar or data.tar)
    index = extract(tar_path, Path(args.out), data)
    atomic_write_json(args.index, index)
    totals = {d: sum(c[d] for c in index["counts"].values()) for d in DOMAINS}
    print(f"extract: {len(index['classes'])} classes, {totals['images']} images, {totals['sketches']} sketches "
          f"-> {args.out}")


def check_class_name(name: str, where: str) -> None:
    """Class names are folder names and service answers: any printable Unicode (spaces, parentheses, accents
    allowed), but in NFC form so the same name typed on another OS is the same class."""
    if not name or name.startswith("."):
        raise UserError(f"{where}: class folder name {name!r} is empty or hidden")
    if any(unicodedata.category(ch).startswith("C") for ch in name):
        raise UserError(f"{where}: class name {name!r} contains control characters; rename the folder")
    if unicodedata.normalize("NFC", name) != name:
        raise UserError(f"{where}: class name {name!r} is not in Unicode NFC form; rename the folder "
                        f"(e.g. with `python -c \"import unicodedata; print(unicodedata.normalize('NFC', NAME))\"`)")


def _safe_parts(member: tarfile.TarInfo, tar_path: Path) -> tuple[str, ...]:
    name = member.name
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:  # tarfile keeps undecodable bytes as surrogates; no file or JSON could hold them
        shown = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        raise UserError(f"{tar_path}: member '{shown}' has a name that is not UTF-8 (e.g. Latin-1 bytes, shown as "
                        "\\xNN); rename it in UTF-8 and re-create the tar") from None
    if member.issym() or member.islnk():
        raise UserError(f"{tar_path}: member {name!r} is a link; links are refused (tar-slip protection). "
                        "Re-create the tar with real files (tar --dereference)")
    if not (member.isfile() or member.isdir()):
        raise UserError(f"{tar_path}: member {name!r} is a device, fifo or other special file; refused")
    path = PurePosixPath(name)
    if path.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise UserError(f"{tar_path}: member {name!r} has an absolute path; refused (tar-slip protection)")
    parts = tuple(p for p in path.parts if p not in ("", "."))
    if ".." in parts or any("\\" in p for p in parts):
        raise UserError(f"{tar_path}: member {name!r} points outside the archive ('..'); refused")
    return parts


class _Refused(Exception):
    """A hostile header met inside tarfile's own parsing; extract reports it with the tar's path."""


def _sparse(name: str) -> str:
    return (f"member {name!r} is a sparse file; refused (a few KB of tar can claim terabytes of holes). "
            "Re-create the tar without tar's --sparse (-S) option")


class _GuardedTarInfo(tarfile.TarInfo):
    """tarfile reads a PAX or GNU long-name header whole and follows a GNU sparse map of any length while it
    parses headers, before extract sees the member: refuse those right there, through the hook tarfile documents
    for subclasses (_proc_member) and the one sparse format whose map sits in the data (1.0)."""

    def _proc_member(self, tar):
        if self.type == tarfile.GNUTYPE_SPARSE:
            raise _Refused(_sparse(self.name))
        if self.size < 0:  # a base-256 size can be negative: tarfile would step back and read the header again
            raise _Refused(f"member {self.name!r} declares a negative size; the archive is corrupt, re-create it")
        if self.type in EXTENDED_HEADERS and self.size > MAX_HEADER_BYTES:
            raise _Refused(f"the extended (PAX or long-name) header at byte {self.offset:,} declares "
                           f"{self.size:,} bytes; refused (real ones hold a path and a few attributes). "
                           "Re-create the tar")
        return super()._proc_member(tar)

    def _proc_gnusparse_10(self, member, pax_headers, tar):
        raise _Refused(_sparse(pax_headers.get("GNU.sparse.name", member.name)))


def _open(tar_path: Path) -> tarfile.TarFile:
    if not tar_path.exists():
        raise UserError(f"{tar_path}: not found; set data.tar in params.yaml or build the demo with "
                        "`dvc repro demo-data`")
    try:
        return tarfile.open(tar_path, "r:*", tarinfo=_GuardedTarInfo)
    except _Refused as exc:
        raise UserError(f"{tar_path}: {exc}") from None
    except READ_ERRORS as exc:  # for a damaged compressed tar, tarfile lists every method it tried, a line each
        raise UserError(f"{tar_path}: not a readable tar archive ({' '.join(str(exc).split())}); "
                        "re-download or re-create it") from None


def extract(tar_path: Path, out_dir: Path, data: DataSettings) -> dict:
    """Check the tar's headers against data's caps, plan and validate the layout, then write every file to
    `out_dir` (replaced only when all of it is valid); the dataset index."""
    with _open(tar_path) as tar:
        members = _read_headers(tar, tar_path, data)
        if not members:
            raise UserError(f"{tar_path}: the archive is empty")
        _check_end_marker(tar, members, tar_path)
        layout = _plan(members, tar_path, data.folders)
        with atomic_dir(out_dir) as scratch:
            files, lists = _write_members(tar, layout["jobs"], scratch, tar_path)
    classes = sorted(set(files["images"]) | set(files["sketches"]))
    return {
        "source": tar_path.name,
        "top": layout["top"],
        "classes": classes,
        "counts": {c: {d: len(files[d].get(c, [])) for d in DOMAINS} for c in classes},
        "files": {d: {c: sorted(v) for c, v in sorted(files[d].items())} for d in DOMAINS},
        "class_lists": lists,
    }


def _read_headers(tar: tarfile.TarFile, tar_path: Path, data: DataSettings) -> list[tarfile.TarInfo]:
    """Every member's header, each checked against the caps as it comes: the scan stops at the first member over
    one, before tarfile skips through its data (in a .tar.gz that means decompressing it)."""
    members: list[tarfile.TarInfo] = []
    total = 0
    try:
        for member in tar:
            if member.issparse():
                raise UserError(f"{tar_path}: {_sparse(member.name)}")
            count, total = len(members) + 1, total + member.size
            for key, value, what in (("max_members", count, f"is number {count:,}"),
                                     ("max_member_bytes", member.size, f"declares {member.size:,} bytes"),
                                     ("max_total_bytes", total, f"brings the total to {total:,} bytes")):
                limit = getattr(data, key)
                if value > limit:
                    raise UserError(f"{tar_path}: member {member.name!r} {what}, over data.{key} ({limit:,}); "
                                    f"raise data.{key} in params.yaml if the dataset really is that large")
            members.append(member)
    except _Refused as exc:
        raise UserError(f"{tar_path}: {exc}") from None
    except READ_ERRORS as exc:
        raise UserError(f"{tar_path}: corrupt tar archive ({exc}); re-download or re-create it") from None
    return members


def _check_end_marker(tar: tarfile.TarFile, members: list[tarfile.TarInfo], tar_path: Path) -> None:
    """tarfile stops quietly at a cut-off header, so a truncated archive would lose its last classes unnoticed;
    a complete archive ends with two zero blocks after its last member's data.

    tarfile has just read one block where the marker belongs and stopped: at a zero block, or at an unreadable
    header, which in a real archive is followed by that member's data, not zeros. So only the second block is read,
    forward: seeking back to the first would restart a compressed stream's decompression from byte 0."""
    last = members[-1]
    end = last.offset_data + (-(-last.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE if last.isfile() else 0)
    try:
        complete = (tar.fileobj.tell() == end + tarfile.BLOCKSIZE
                    and tar.fileobj.read(tarfile.BLOCKSIZE) == bytes(tarfile.BLOCKSIZE))
    except READ_ERRORS:
        complete = False
    if not complete:
        raise UserError(f"{tar_path}: the archive is truncated (no end-of-archive marker after "
                        f"{len(members)} members); re-download or re-create it")


def _write_members(tar: tarfile.TarFile, jobs: list, scratch: Path, tar_path: Path) -> tuple[dict, dict]:
    """Read, check and write the planned files in archive order, so a compressed tar is decompressed once more
    (after the header scan), not once per backward seek. Class lists are decoded here too: all of it happens
    before atomic_dir replaces the previous output."""
    files: dict[str, dict[str, list[str]]] = {d: {} for d in DOMAINS}
    lists: dict[str, list[str]] = {}
    for member, domain, cls, fname in tqdm(jobs, desc="extract", unit="file", mininterval=1,
                                           disable=len(jobs) < 200):
        data = _read_member(tar, member, tar_path)
        if domain is None:
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{tar_path}: {member.name}: class list is not UTF-8 text; save it as UTF-8 "
                                "and re-create the tar") from None
            (scratch / fname).write_bytes(data)
            lists[fname.removesuffix(".txt")] = read_class_list(scratch / fname)
            continue
        try:
            imaging.decode_bytes(data, fname)
        except imaging.ImageDecodeError as exc:
            raise UserError(f"{tar_path}: {member.name}: {str(exc).split(': ', 1)[-1]}; "
                            "fix or remove that file") from None
        dest = scratch / domain / cls / fname
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(data)
        files[domain].setdefault(cls, []).append(fname)
    return files, lists


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo, tar_path: Path) -> bytearray:
    """Exactly the size its header declared (checked against the caps), in bounded chunks into one buffer: a
    member can neither make us read more than that nor sit in memory twice."""
    data = bytearray(member.size)
    try:
        with tar.extractfile(member) as stream, memoryview(data) as view:
            done = 0
            while done < member.size:
                got = stream.readinto(view[done:done + READ_CHUNK])
                if not got:
                    raise EOFError("unexpected end of data")
                done += got
    except READ_ERRORS as exc:
        raise UserError(f"{tar_path}: member {member.name!r} cannot be read ({exc}); "
                        "the archive is truncated or corrupt") from None
    return data


def _plan(members: list[tarfile.TarInfo], tar_path: Path, folders: dict[str, str]) -> dict:
    """Validate every member's path and the layout before anything is written; `jobs` lists the files to extract
    as (member, domain, class, file name), or (member, None, None, list name) for a class list, in archive order."""
    parted = [(m, _safe_parts(m, tar_path)) for m in members]
    tops = {parts[0] for _, parts in parted if parts}
    if len(tops) != 1:
        raise UserError(f"{tar_path}: expected one top folder holding '{folders['images']}/' and "
                        f"'{folders['sketches']}/', found {sorted(tops)[:5]}")
    layout = {"top": tops.pop(), "classes": {d: {} for d in DOMAINS}, "seen_dirs": {d: set() for d in DOMAINS},
              "jobs": [], "skipped": []}
    _refuse_duplicates(parted, tar_path)
    by_folder = {folders[d]: d for d in DOMAINS}
    for member, parts in parted:
        _place(member, parts[1:], by_folder, layout, tar_path)
    _check_layout(layout, folders, tar_path)
    if layout["skipped"]:
        print(f"extract: warning: skipped {len(layout['skipped'])} file(s) that are not "
              f"{'/'.join(imaging.IMAGE_SUFFIXES)}, e.g. {layout['skipped'][0]}")
    return layout


def _refuse_duplicates(parted: list[tuple[tarfile.TarInfo, tuple[str, ...]]], tar_path: Path) -> None:
    seen: set[tuple[str, ...]] = set()
    for member, parts in parted:
        if member.isfile():
            if parts in seen:
                raise UserError(f"{tar_path}: member {member.name!r} appears more than once in the archive; "
                                "re-create the tar without the duplicate")
            seen.add(parts)


def _place(member: tarfile.TarInfo, rel: tuple[str, ...], by_folder: dict[str, str], layout: dict,
           tar_path: Path) -> None:
    """Put one member (its path below the top folder) in the layout: a class list, a domain's class folder or
    image, an extra beside the domains (ignored) or a misplaced file (refused)."""
    if not rel:
        return
    if len(rel) == 1 and member.isfile() and rel[0] in CLASS_LIST_FILES:
        layout["jobs"].append((member, None, None, rel[0]))
        return
    domain = by_folder.get(rel[0])
    if domain is None:
        return  # README, LICENSE and other extras beside the two domain folders
    longest = max(len(part.encode("utf-8")) for part in rel)
    if longest > NAME_MAX:
        raise UserError(f"{tar_path}: {member.name}: a file or folder name of {longest} bytes; file systems "
                        f"allow {NAME_MAX}. Shorten it")
    if len(rel) == 2 and member.isfile():
        raise UserError(f"{tar_path}: {member.name}: files must sit in a class folder "
                        f"({layout['top']}/{rel[0]}/<class>/<file>)")
    if len(rel) > 3 and member.isfile():
        raise UserError(f"{tar_path}: {member.name}: nested folders inside a class are not supported")
    if len(rel) in (2, 3):
        layout["seen_dirs"][domain].add(rel[1])
    if len(rel) != 3 or member.isdir() or rel[2].startswith("."):
        return
    cls, fname = rel[1], rel[2]
    if not fname.lower().endswith(imaging.IMAGE_SUFFIXES):
        layout["skipped"].append(member.name)
        return
    layout["classes"][domain].setdefault(cls, []).append((fname, member))
    layout["jobs"].append((member, domain, cls, fname))


def _check_layout(layout: dict, folders: dict[str, str], tar_path: Path) -> None:
    """Both domains have class folders, each holding images; class names are valid and distinct beyond case;
    every class with sketches has images."""
    top, classes = layout["top"], layout["classes"]
    for domain in DOMAINS:
        if not layout["seen_dirs"][domain]:
            raise UserError(f"{tar_path}: no '{top}/{folders[domain]}/' folder with class folders; expected "
                            f"{top}/{folders['images']}/<class>/* and {top}/{folders['sketches']}/<class>/*")
        for cls in sorted(layout["seen_dirs"][domain]):
            check_class_name(cls, f"{tar_path}: {top}/{folders[domain]}/{cls}")
            if cls not in classes[domain]:
                raise UserError(f"{tar_path}: class folder '{top}/{folders[domain]}/{cls}' holds no image files "
                                f"({', '.join(imaging.IMAGE_SUFFIXES)}); add files or remove the folder")
    folded: dict[str, str] = {}
    for cls in sorted(set(classes["images"]) | set(classes["sketches"])):
        other = folded.setdefault(cls.casefold(), cls)
        if other != cls:
            raise UserError(f"{tar_path}: classes '{other}' and '{cls}' differ only by case; merge or rename one "
                            "(they would collide on case-insensitive file systems)")
    for cls in classes["sketches"]:
        if cls not in classes["images"]:
            raise UserError(f"{tar_path}: class '{cls}' has sketches but no images; nothing could be retrieved "
                            "for it. Add images or remove its sketches")
