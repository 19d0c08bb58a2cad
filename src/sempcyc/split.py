"""The zero-shot class split, stable under added classes: which classes train (seen), which are held out for
validation among them, and which are only ever queried (unseen). An explicit class list decides when one is
given; otherwise a hash of each class name does, so one new class never moves another. A few sketches of each
seen class are held out of training too (by a hash of their file name), so evaluation can query seen classes
with sketches the model never saw.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from .errors import UserError
from .params import setting


@dataclass(frozen=True)
class SplitSettings:
    SECTION: ClassVar[str] = "split"
    test_fraction: float = setting(above=0.0, max=1.0)
    val_fraction: float = setting(min=0.0, max=0.9)
    salt: str = setting()
    test_classes_file: str | None = setting()
    seen_query_fraction: float = setting(above=0.0, max=0.5)


def hash_unit(name: str, salt: str) -> float:
    """A class name's fixed position in [0, 1): the same on every machine and independent of other classes."""
    digest = hashlib.sha256(f"{salt}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def read_class_list(path: Path) -> list[str]:
    """One class a line; blank lines and `#` comments ignored."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: class list not found") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: class list is not UTF-8 text") from None
    names = [line.strip() for line in text.splitlines()]
    return [n for n in names if n and not n.startswith("#")]


def assign_split(counts: dict[str, dict[str, int]], *, test_fraction: float, salt: str,
                 test_list: list[str] | None = None, train_list: list[str] | None = None) -> dict:
    """Decide seen (train) / unseen (test) / gallery-only for every class.

    Only classes with sketches can be queries or training classes; a class with images only is gallery-only.
    """
    classes = sorted(counts)
    with_sketches = [c for c in classes if counts[c]["sketches"] > 0]
    gallery_only = [c for c in classes if counts[c]["sketches"] == 0]
    unknown: list[str] = []
    if test_list is not None:
        wanted = set(test_list)
        unknown = sorted(wanted - set(classes))
        test = [c for c in with_sketches if c in wanted]
        method = "test-class list"
    elif train_list is not None:
        wanted = set(train_list)
        unknown = sorted(wanted - set(classes))
        test = [c for c in with_sketches if c not in wanted]
        method = "train-class list"
    else:
        test = [c for c in with_sketches if hash_unit(c, salt) < test_fraction]
        method = f"hash of class name (salt {salt!r}, fraction {test_fraction})"
    train = [c for c in with_sketches if c not in set(test)]
    _check_sizes(test, train)
    return {"method": method, "train": train, "test": test, "gallery_only": gallery_only,
            "unknown_listed_classes": unknown}


def _check_sizes(test: list[str], train: list[str]) -> None:
    if len(test) < 2:
        raise UserError(f"the split has {len(test)} unseen class(es) with sketches ({', '.join(test) or 'none'}); "
                        "zero-shot evaluation needs at least 2. Raise split.test_fraction, change split.salt, or "
                        "list more classes in the test-class file")
    if len(train) < 2:
        raise UserError(f"the split has {len(train)} training class(es); at least 2 are needed. "
                        "Lower split.test_fraction or shorten the test-class list")


def held_out_sketches(files: dict[str, list[str]], seen: list[str], fraction: float, salt: str) -> set[str]:
    """`class/file` ids of the seen classes' sketches kept out of training as evaluation queries: each file by
    a hash of its name (stable as files and classes are added); every class keeps at least one for training."""
    held = set()
    for cls in seen:
        names = files.get(cls, [])
        out = [n for n in names if hash_unit(f"{cls}/{n}", salt + "/seen-query") < fraction]
        if len(out) == len(names) and names:
            out.remove(max(out, key=lambda n: hash_unit(f"{cls}/{n}", salt + "/seen-query")))
        held |= {f"{cls}/{n}" for n in out}
    return held


def validation_classes(classes: list[str], fraction: float, salt: str) -> list[str]:
    """Training-side classes held out for early stopping, by name hash: stable as classes are added."""
    val = [c for c in classes if hash_unit(c, salt + "/val") < fraction]
    if fraction > 0 and len(val) < 2:  # too few to rank anything: take the two lowest hashes instead
        val = sorted(classes, key=lambda c: hash_unit(c, salt + "/val"))[:2]
    return sorted(val)
