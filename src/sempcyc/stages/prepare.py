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
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from tqdm import tqdm

from .. import params as params_mod
from ..errors import UserError
from ..fsutil import atomic_dir, atomic_write_json, dumps_json
from ..params import setting
from ..runtime import imaging
from ..shards import load_imagenet_similarity, load_json, load_semantic
from ..split import SplitSettings, assign_split, held_out_sketches, read_class_list


@dataclass(frozen=True)
class PrepareSettings:
    SECTION: ClassVar[str] = "prepare"
    size: int = setting(min=32, max=1024)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", default="data/dataset", help="extracted dataset folder (default: %(default)s)")
    parser.add_argument("--index", default="data/dataset.json", help="dataset index (default: %(default)s)")
    parser.add_argument("--semantic", default="data/semantic", help="class vectors folder (default: %(default)s)")
    parser.add_argument("--out", default="data/prepared", help="output folder (default: %(default)s)")


def run(args: argparse.Namespace) -> None:
    split_settings, prep = params_mod.read(args.params, SplitSettings, PrepareSettings)
    split = prepare(Path(args.dataset), Path(args.index), Path(args.semantic), Path(args.out), split_settings,
                    prep.size)
    print(f"prepare: {len(split['train'])} training classes, {len(split['test'])} unseen, "
          f"{len(split['gallery_only'])} gallery-only; split by {split['method']}")


def prepare(dataset: Path, index_path: Path, semantic_dir: Path, out: Path, settings: SplitSettings,
            size: int) -> dict:
    """Split the classes and write the train and test shards and splits.json; returns the split."""
    index = load_json(index_path, "run `dvc repro extract`")
    split = split_classes(index, settings)
    semantic = load_semantic(semantic_dir)
    missing = [c for c in split["train"] if c not in semantic]
    if missing:
        raise UserError(f"{semantic_dir}: no semantic vector for training class(es) {', '.join(missing)}; "
                        "rerun `dvc repro semantic`")
    files = index["files"]
    held = held_out_sketches(files["sketches"], split["train"], settings.seen_query_fraction, settings.salt)
    sketch_items = {c: [(c, f) for f in files["sketches"].get(c, [])] for c in index["classes"]}
    image_items = {c: [(c, f) for f in files["images"].get(c, [])] for c in index["classes"]}
    train_sketches = [i for c in split["train"] for i in sketch_items[c] if "/".join(i) not in held]
    seen_queries = [i for c in split["train"] for i in sketch_items[c] if "/".join(i) in held]
    with atomic_dir(out / "train") as scratch:
        label_of = {c: i for i, c in enumerate(split["train"])}
        _write_domain(scratch, "images", dataset, [i for c in split["train"] for i in image_items[c]], label_of, size)
        _write_domain(scratch, "sketches", dataset, train_sketches, label_of, size)
        np.save(scratch / "semantic.npy", np.stack([semantic[c] for c in split["train"]]).astype(np.float32))
        imagenet = load_imagenet_similarity(semantic_dir)
        if imagenet is not None:  # semantic.backend wordnet: for the class-aware distillation of features
            np.save(scratch / "imagenet_similarity.npy", np.stack([imagenet[c] for c in split["train"]]))
        (scratch / "classes.json").write_text(dumps_json(split["train"]), encoding="utf-8")
    with atomic_dir(out / "test") as scratch:
        label_of = {c: i for i, c in enumerate(index["classes"])}
        _write_domain(scratch, "sketches", dataset, [i for c in split["test"] for i in sketch_items[c]], label_of,
                      size)
        _write_domain(scratch, "seen_sketches", dataset, seen_queries, label_of, size)
        _write_domain(scratch, "images", dataset, [i for c in index["classes"] for i in image_items[c]], label_of,
                      size)
        meta = {"classes": index["classes"], "unseen": split["test"], "seen": split["train"],
                "gallery_only": split["gallery_only"]}
        (scratch / "classes.json").write_text(dumps_json(meta), encoding="utf-8")
    atomic_write_json(out / "splits.json", split)
    return split


def split_classes(index: dict, settings: SplitSettings) -> dict:
    """The split of the dataset's classes: by a class list (params file, or one shipped in the tar) or by hash."""
    lists = index.get("class_lists", {})
    test_file = settings.test_classes_file
    test_list = read_class_list(Path(test_file)) if test_file else lists.get("test_classes")
    train_list = None if test_list is not None else lists.get("train_classes")
    split = assign_split(index["counts"], test_fraction=settings.test_fraction, salt=settings.salt,
                         test_list=test_list, train_list=train_list)
    if split["unknown_listed_classes"]:
        print(f"prepare: warning: {len(split['unknown_listed_classes'])} listed class(es) are not in the dataset: "
              + ", ".join(split["unknown_listed_classes"][:10]))
    return split


def _write_domain(folder: Path, name: str, dataset: Path, items: list[tuple[str, str]], label_of: dict[str, int],
                  size: int) -> None:
    """Decode the (class, file) items into one (N, size, size[, 3]) uint8 array `name`.npy, plus labels and ids."""
    kind = "image" if name == "images" else "sketch"
    domain = "images" if kind == "image" else "sketches"
    shape = (len(items), size, size) if kind == "sketch" else (len(items), size, size, 3)
    array = np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=np.uint8, shape=shape)
    for row, (cls, fname) in enumerate(tqdm(items, desc=f"prepare {folder.name.split('.')[1]} {name}",
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
    np.save(folder / f"{name}_labels.npy", np.array([label_of[c] for c, _ in items], dtype=np.int32))
    (folder / f"{name}_ids.json").write_text(dumps_json([f"{c}/{f}" for c, f in items]), encoding="utf-8")
