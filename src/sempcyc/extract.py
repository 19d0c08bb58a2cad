"""extract stage: a user's data.tar -> data/dataset/ (images/<class>/*, sketches/<class>/*) + data/dataset.json.

The tar is read member by member and each file is written to a path we compute, never with tarfile.extract, so
absolute paths, `..`, links and devices cannot escape. Every image is decoded once here, so a broken file is
reported by name now rather than hours later in training. Output appears only when everything is valid.
"""
from __future__ import annotations

import argparse
import tarfile
import unicodedata
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import ClassVar

from tqdm import tqdm

from . import params as params_mod
from .errors import UserError
from .fsutil import atomic_dir, atomic_write_json
from .params import setting
from .runtime import imaging
from .split import read_class_list

DOMAINS = ("images", "sketches")
CLASS_LIST_FILES = ("test_classes.txt", "train_classes.txt")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tar", help="dataset tar (default: param data.tar)")
    parser.add_argument("--out", default="data/dataset", help="output folder (default: %(default)s)")
    parser.add_argument("--index", default="data/dataset.json", help="output index (default: %(default)s)")


@dataclass(frozen=True)
class DataSettings:
    SECTION: ClassVar[str] = "data"
    tar: str = setting()
    images_dir: str = setting()
    sketches_dir: str = setting()


def run(args: argparse.Namespace) -> None:
    (data,) = params_mod.read(args.params, DataSettings)
    tar_path = Path(args.tar or data.tar)
    folders = {"images": data.images_dir, "sketches": data.sketches_dir}
    index = extract(tar_path, Path(args.out), folders)
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


def _open(tar_path: Path) -> tarfile.TarFile:
    if not tar_path.exists():
        raise UserError(f"{tar_path}: not found; set data.tar in params.yaml or build the demo with "
                        "`dvc repro demo-data`")
    try:
        return tarfile.open(tar_path, "r:*")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise UserError(f"{tar_path}: not a readable tar archive ({exc}); re-download or re-create it") from None


def extract(tar_path: Path, out_dir: Path, folders: dict[str, str]) -> dict:
    with _open(tar_path) as tar:
        try:
            members = tar.getmembers()
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise UserError(f"{tar_path}: corrupt tar archive ({exc}); re-download or re-create it") from None
        if not members:
            raise UserError(f"{tar_path}: the archive is empty")
        _check_end_marker(tar, members, tar_path)
        layout = _plan(members, tar_path, folders)
        with atomic_dir(out_dir) as scratch:
            files: dict[str, dict[str, list[str]]] = {d: {} for d in DOMAINS}
            todo = [(d, c, n, m) for d in DOMAINS for c, entries in layout["classes"][d].items() for n, m in entries]
            for domain, cls, fname, member in tqdm(todo, desc="extract", unit="file", mininterval=1,
                                                   disable=len(todo) < 200):
                try:
                    data = tar.extractfile(member).read()
                except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
                    raise UserError(f"{tar_path}: member {member.name!r} cannot be read ({exc}); "
                                    "the archive is truncated or corrupt") from None
                try:
                    imaging.decode_bytes(data, fname)
                except imaging.ImageDecodeError as exc:
                    raise UserError(f"{tar_path}: {member.name}: {str(exc).split(': ', 1)[-1]}; "
                                    "fix or remove that file") from None
                dest = scratch / domain / cls / fname
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(data)
                files[domain].setdefault(cls, []).append(fname)
            for list_name, member in layout["lists"].items():
                (scratch / list_name).write_bytes(tar.extractfile(member).read())
    classes = sorted(set(files["images"]) | set(files["sketches"]))
    lists = {}
    for list_name in layout["lists"]:
        lists[list_name.removesuffix(".txt")] = read_class_list(out_dir / list_name)
    return {
        "source": tar_path.name,
        "top": layout["top"],
        "classes": classes,
        "counts": {c: {d: len(files[d].get(c, [])) for d in DOMAINS} for c in classes},
        "files": {d: {c: sorted(v) for c, v in sorted(files[d].items())} for d in DOMAINS},
        "class_lists": lists,
    }


def _check_end_marker(tar: tarfile.TarFile, members: list[tarfile.TarInfo], tar_path: Path) -> None:
    """tarfile stops quietly at a cut-off header, so a truncated archive would lose its last classes unnoticed;
    a complete archive ends with two zero blocks after its last member's data."""
    last = members[-1]
    end = last.offset_data + (-(-last.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE if last.isfile() else 0)
    try:
        tar.fileobj.seek(end)
        tail = tar.fileobj.read(2 * tarfile.BLOCKSIZE)
    except (OSError, EOFError, tarfile.TarError, zlib.error):
        tail = b""
    if tail != bytes(2 * tarfile.BLOCKSIZE):
        raise UserError(f"{tar_path}: the archive is truncated (no end-of-archive marker after "
                        f"{len(members)} members); re-download or re-create it")


def _plan(members: list[tarfile.TarInfo], tar_path: Path, folders: dict[str, str]) -> dict:
    """Validate every member's path and the layout before anything is written."""
    parted = [(m, _safe_parts(m, tar_path)) for m in members]
    tops = {parts[0] for _, parts in parted if parts}
    if len(tops) != 1:
        raise UserError(f"{tar_path}: expected one top folder holding '{folders['images']}/' and "
                        f"'{folders['sketches']}/', found {sorted(tops)[:5]}")
    top = tops.pop()
    by_folder = {folders[d]: d for d in DOMAINS}
    classes: dict[str, dict[str, list]] = {d: {} for d in DOMAINS}
    seen_dirs: dict[str, set[str]] = {d: set() for d in DOMAINS}
    lists: dict[str, tarfile.TarInfo] = {}
    skipped: list[str] = []
    for member, parts in parted:
        rel = parts[1:]
        if not rel:
            continue
        if len(rel) == 1 and member.isfile() and rel[0] in CLASS_LIST_FILES:
            lists[rel[0]] = member
            continue
        domain = by_folder.get(rel[0])
        if domain is None:
            continue  # README, LICENSE and other extras beside the two domain folders
        if len(rel) == 2 and member.isdir():
            seen_dirs[domain].add(rel[1])
            continue
        if len(rel) == 1:
            continue
        if len(rel) == 2 and member.isfile():
            raise UserError(f"{tar_path}: {member.name}: files must sit in a class folder "
                            f"({top}/{rel[0]}/<class>/<file>)")
        if len(rel) != 3:
            if member.isfile():
                raise UserError(f"{tar_path}: {member.name}: nested folders inside a class are not supported")
            continue
        cls, fname = rel[1], rel[2]
        seen_dirs[domain].add(cls)
        if member.isdir() or fname.startswith("."):
            continue
        if not fname.lower().endswith(imaging.IMAGE_SUFFIXES):
            skipped.append(member.name)
            continue
        classes[domain].setdefault(cls, []).append((fname, member))
    for domain in DOMAINS:
        if not seen_dirs[domain]:
            raise UserError(f"{tar_path}: no '{top}/{folders[domain]}/' folder with class folders; expected "
                            f"{top}/{folders['images']}/<class>/* and {top}/{folders['sketches']}/<class>/*")
        for cls in sorted(seen_dirs[domain]):
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
    if skipped:
        print(f"extract: warning: skipped {len(skipped)} file(s) that are not "
              f"{'/'.join(imaging.IMAGE_SUFFIXES)}, e.g. {skipped[0]}")
    for domain in DOMAINS:
        for entries in classes[domain].values():
            entries.sort(key=lambda e: e[0])
    return {"top": top, "classes": classes, "lists": lists}
