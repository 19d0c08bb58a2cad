"""prepare stage: the zero-shot class split, and decoded, resized uint8 arrays so no epoch decodes image files.

Outputs
  data/prepared/train/  training classes only: their sketches, images and semantic vectors. It depends on nothing
                        but the training classes, so adding an unseen class leaves it byte-identical and DVC skips
                        features and train.
  data/prepared/test/   queries (sketches of unseen classes) and the gallery (images of every class).
  data/prepared/splits.json  which class went where, and why.

The split is stable under added classes: an explicit class list when one is given, otherwise each class is
assigned by a hash of its name, so one new class never moves another.
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import imaging, params as params_mod
from .errors import UserError
from .extract import read_class_list
from .fsutil import atomic_dir, atomic_write_json, dumps_json

HELP = "Split classes into seen/unseen (stable under additions) and write uint8 train/test arrays."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="data/dataset", help="extracted dataset folder (default: %(default)s)")
    parser.add_argument("--index", default="data/dataset.json", help="dataset index (default: %(default)s)")
    parser.add_argument("--semantic", default="data/semantic", help="class vectors folder (default: %(default)s)")
    parser.add_argument("--out", default="data/prepared", help="output folder (default: %(default)s)")


# ----------------------------------------------------------------------------------------------- pure core

def hash_unit(name: str, salt: str) -> float:
    """A class name's fixed position in [0, 1): the same on every machine and independent of other classes."""
    digest = hashlib.sha256(f"{salt}\0{name}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


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
    if len(test) < 2:
        raise UserError(f"the split has {len(test)} unseen class(es) with sketches ({', '.join(test) or 'none'}); "
                        "zero-shot evaluation needs at least 2. Raise split.test_fraction, change split.salt, or "
                        "list more classes in the test-class file")
    if len(train) < 2:
        raise UserError(f"the split has {len(train)} training class(es); at least 2 are needed. "
                        "Lower split.test_fraction or shorten the test-class list")
    return {"method": method, "train": train, "test": test, "gallery_only": gallery_only,
            "unknown_listed_classes": unknown}


# ------------------------------------------------------------------------------------------------ I/O shell

def run(args: argparse.Namespace) -> None:
    params = params_mod.load(getattr(args, "params", "params.yaml"))
    split_p = params_mod.Section(params, "split")
    prep_p = params_mod.Section(params, "prepare")
    test_fraction = split_p.float("test_fraction", 0.2, min=0.0, max=1.0, min_exclusive=True)
    salt = split_p.str("salt", "sem-pcyc")
    test_file = split_p.optional_str("test_classes_file")
    size = prep_p.int("size", 128, min=32, max=1024)

    index = _load_json(Path(args.index), "run `dvc repro extract` first")
    dataset = Path(args.dataset)
    lists = index.get("class_lists", {})
    test_list = read_class_list(Path(test_file)) if test_file else lists.get("test_classes")
    train_list = None if test_list is not None else lists.get("train_classes")
    split = assign_split(index["counts"], test_fraction=test_fraction, salt=salt,
                         test_list=test_list, train_list=train_list)
    if split["unknown_listed_classes"]:
        print(f"prepare: warning: {len(split['unknown_listed_classes'])} listed class(es) are not in the dataset: "
              + ", ".join(split["unknown_listed_classes"][:10]))

    semantic = _load_semantic(Path(args.semantic))
    missing = [c for c in split["train"] if c not in semantic]
    if missing:
        raise UserError(f"{args.semantic}: no semantic vector for training class(es) {', '.join(missing)}; "
                        "rerun `dvc repro semantic`")

    out = Path(args.out)
    files = index["files"]
    all_classes = index["classes"]
    with atomic_dir(out / "train") as scratch:
        label_of = {c: i for i, c in enumerate(split["train"])}
        _write_domain(scratch, "images", dataset, files["images"], split["train"], label_of, size)
        _write_domain(scratch, "sketches", dataset, files["sketches"], split["train"], label_of, size)
        np.save(scratch / "semantic.npy", np.stack([semantic[c] for c in split["train"]]).astype(np.float32))
        (scratch / "classes.json").write_text(dumps_json(split["train"]), encoding="utf-8")
    with atomic_dir(out / "test") as scratch:
        label_of = {c: i for i, c in enumerate(all_classes)}
        _write_domain(scratch, "sketches", dataset, files["sketches"], split["test"], label_of, size)
        _write_domain(scratch, "images", dataset, files["images"], all_classes, label_of, size)
        meta = {"classes": all_classes, "unseen": split["test"], "seen": split["train"],
                "gallery_only": split["gallery_only"]}
        (scratch / "classes.json").write_text(dumps_json(meta), encoding="utf-8")
    atomic_write_json(out / "splits.json", {k: v for k, v in split.items()})
    print(f"prepare: {len(split['train'])} training classes, {len(split['test'])} unseen, "
          f"{len(split['gallery_only'])} gallery-only; split by {split['method']}")


def _write_domain(folder: Path, domain: str, dataset: Path, files: dict[str, list[str]], classes: list[str],
                  label_of: dict[str, int], size: int) -> None:
    """Decode every file of `classes` into one (N, size, size[, 3]) uint8 .npy, plus labels and ids."""
    kind = "sketch" if domain == "sketches" else "image"
    items = [(c, f) for c in classes for f in files.get(c, [])]
    shape = (len(items), size, size) if kind == "sketch" else (len(items), size, size, 3)
    array = np.lib.format.open_memmap(folder / f"{domain}.npy", mode="w+", dtype=np.uint8, shape=shape)
    for row, (cls, fname) in enumerate(tqdm(items, desc=f"prepare {folder.name.split('.')[1]} {domain}",
                                            unit="file", mininterval=1, disable=len(items) < 500)):
        path = dataset / domain / cls / fname
        try:
            array[row] = imaging.to_array(imaging.load_file(path), size, kind)
        except imaging.ImageDecodeError as exc:
            raise UserError(f"{exc}; rerun `dvc repro extract`") from None
        except FileNotFoundError:
            raise UserError(f"{path}: missing; the extracted dataset is out of date, rerun `dvc repro extract`") \
                from None
    array.flush()
    del array
    np.save(folder / f"{domain}_labels.npy", np.array([label_of[c] for c, _ in items], dtype=np.int32))
    (folder / f"{domain}_ids.json").write_text(dumps_json([f"{c}/{f}" for c, f in items]), encoding="utf-8")


def _load_json(path: Path, hint: str):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: not found; {hint}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc}); {hint}") from None


def _load_semantic(folder: Path) -> dict[str, np.ndarray]:
    classes = _load_json(folder / "classes.json", "run `dvc repro semantic`")
    try:
        vectors = np.load(folder / "vectors.npy")
    except FileNotFoundError:
        raise UserError(f"{folder / 'vectors.npy'}: not found; run `dvc repro semantic`") from None
    if len(vectors) != len(classes):
        raise UserError(f"{folder}: {len(classes)} classes but {len(vectors)} vectors; rerun `dvc repro semantic`")
    return dict(zip(classes, vectors))
