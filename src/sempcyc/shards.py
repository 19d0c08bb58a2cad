"""Reading the prepare stage's outputs (the training and test shards, the class vectors) and small JSON inputs,
with an error that names the missing file and the stage that makes it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import UserError

DOMAINS = ("sketches", "images")


def load_json(path: Path, hint: str):
    """Parsed JSON of `path`; `hint` says what to run when it is missing or broken."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: not found; {hint}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc}); {hint}") from None


def load_train_shard(folder: Path) -> dict:
    """classes, semantic vectors, and per domain the uint8 arrays (memory-mapped) and their labels."""
    try:
        shard = {"classes": json.loads((folder / "classes.json").read_text(encoding="utf-8")),
                 "semantic": np.load(folder / "semantic.npy")}
        if (folder / "imagenet_similarity.npy").exists():  # semantic.backend wordnet only
            shard["imagenet_similarity"] = np.load(folder / "imagenet_similarity.npy")
        for domain in DOMAINS:
            shard[domain] = np.load(folder / f"{domain}.npy", mmap_mode="r")
            shard[f"{domain}_labels"] = np.load(folder / f"{domain}_labels.npy")
    except FileNotFoundError as exc:
        raise UserError(f"{folder}: incomplete training shard ({Path(exc.filename).name} missing); "
                        "run `dvc repro prepare`") from None
    return shard


def load_test_shard(folder: Path) -> dict:
    """meta (classes, seen, unseen), and for the unseen-class query sketches, the held-out seen-class query
    sketches and the gallery images: the uint8 arrays (memory-mapped), labels and item ids."""
    try:
        shard = {"meta": json.loads((folder / "classes.json").read_text(encoding="utf-8"))}
        for domain in ("sketches", "seen_sketches", "images"):
            shard[domain] = np.load(folder / f"{domain}.npy", mmap_mode="r")
            shard[f"{domain}_labels"] = np.load(folder / f"{domain}_labels.npy")
            shard[f"{domain}_ids"] = json.loads((folder / f"{domain}_ids.json").read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise UserError(f"{folder}: incomplete test shard ({Path(exc.filename).name} missing); "
                        "run `dvc repro prepare`") from None
    return shard


def load_imagenet_similarity(folder: Path) -> dict[str, np.ndarray] | None:
    """class name -> its similarity to each ImageNet-1k class (the wordnet backend's imagenet.npy); None when the
    semantic stage wrote none."""
    if not (folder / "imagenet.npy").exists():
        return None
    classes = load_json(folder / "classes.json", "run `dvc repro semantic`")
    return dict(zip(classes, np.load(folder / "imagenet.npy")))


def load_semantic(folder: Path) -> dict[str, np.ndarray]:
    """class name -> vector, from the semantic stage's output."""
    classes = load_json(folder / "classes.json", "run `dvc repro semantic`")
    try:
        vectors = np.load(folder / "vectors.npy")
    except FileNotFoundError:
        raise UserError(f"{folder / 'vectors.npy'}: not found; run `dvc repro semantic`") from None
    if len(vectors) != len(classes):
        raise UserError(f"{folder}: {len(classes)} classes but {len(vectors)} vectors; rerun `dvc repro semantic`")
    return dict(zip(classes, vectors))
