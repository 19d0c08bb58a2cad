import hashlib
import json
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest

from helpers import class_files, repo_params, write_params, write_tar
from sempcyc import split as split_mod
from sempcyc.errors import UserError
from sempcyc.fsutil import dumps_json
from sempcyc.params import read_section
from sempcyc.stages import extract, prepare


def counts(classes):
    return {c: {"images": i, "sketches": s} for c, (i, s) in classes.items()}


def test_hash_split_is_stable_under_added_classes():
    base = {f"animal_{i}": (5, 5) for i in range(60)}
    before = split_mod.assign_split(counts(base), test_fraction=0.25, salt="s")
    grown = {**base, **{f"new_{i}": (5, 5) for i in range(30)}}
    after = split_mod.assign_split(counts(grown), test_fraction=0.25, salt="s")
    assert set(before["train"]) <= set(after["train"])
    assert set(before["test"]) <= set(after["test"])
    assert set(after["train"]) - set(before["train"]) <= {f"new_{i}" for i in range(30)}
    assert 5 <= len(before["test"]) <= 25  # roughly the fraction


def test_salt_changes_the_split():
    base = counts({f"c{i}": (2, 2) for i in range(40)})
    a = split_mod.assign_split(base, test_fraction=0.3, salt="a")
    b = split_mod.assign_split(base, test_fraction=0.3, salt="b")
    assert a["test"] != b["test"]


def test_gallery_only_classes_never_train_or_query():
    classes = {**{f"c{i}": (2, 2) for i in range(30)}, "photos_only": (4, 0)}
    split = split_mod.assign_split(counts(classes), test_fraction=0.3, salt="x")
    assert split["gallery_only"] == ["photos_only"]
    assert "photos_only" not in split["train"] + split["test"]


def test_test_list_and_train_list():
    classes = counts({f"c{i}": (2, 2) for i in range(6)})
    by_test = split_mod.assign_split(classes, test_fraction=0.5, salt="x", test_list=["c1", "c2", "zzz"])
    assert by_test["test"] == ["c1", "c2"] and by_test["unknown_listed_classes"] == ["zzz"]
    by_train = split_mod.assign_split(classes, test_fraction=0.5, salt="x", train_list=["c0", "c3", "c4"])
    assert by_train["test"] == ["c1", "c2", "c5"]


def test_fewer_than_two_unseen_classes_is_an_error():
    classes = counts({f"c{i}": (2, 2) for i in range(6)})
    with pytest.raises(UserError, match="at least 2"):
        split_mod.assign_split(classes, test_fraction=0.5, salt="x", test_list=["c1"])


def test_fewer_than_two_training_classes_is_an_error():
    classes = counts({f"c{i}": (2, 2) for i in range(4)})
    with pytest.raises(UserError, match="training class"):
        split_mod.assign_split(classes, test_fraction=0.5, salt="x", test_list=["c0", "c1", "c2"])


def unseen_name(prefix: str, salt: str = "sem-pcyc", fraction: float = 0.2) -> str:
    """A class name the hash split puts on the unseen side."""
    return next(f"{prefix}_{i}" for i in range(10_000) if split_mod.hash_unit(f"{prefix}_{i}", salt) < fraction)


def build(tmp_path: Path, classes: dict, split: dict | None = None) -> Path:
    """extract + fake semantic vectors + prepare, in tmp_path; returns the prepared folder."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    tar = write_tar(tmp_path / "d.tar", class_files(classes))
    index = extract.extract(tar, tmp_path / "dataset", read_section(repo_params(), extract.DataSettings))
    (tmp_path / "dataset.json").write_text(dumps_json(index))
    sem = tmp_path / "semantic"
    sem.mkdir(exist_ok=True)
    (sem / "classes.json").write_text(json.dumps(index["classes"]))
    vectors = np.stack([np.frombuffer(hashlib.sha256(c.encode()).digest(), np.uint8).astype(np.float32)
                        for c in index["classes"]])
    np.save(sem / "vectors.npy", vectors)
    write_params(tmp_path, {"prepare": {"size": 32}, "split": {"test_fraction": 0.2, **(split or {})}})
    prepare.run(Namespace(params=str(tmp_path / "params.yaml"), dataset=str(tmp_path / "dataset"),
                          index=str(tmp_path / "dataset.json"), semantic=str(sem), out=str(tmp_path / "prepared")))
    return tmp_path / "prepared"


def tree_digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def base_classes():
    names = [f"thing_{i}" for i in range(14)] + [unseen_name("seed_unseen_a"), unseen_name("seed_unseen_b")]
    return {n: (3, 2) for n in names}


def test_arrays_labels_and_ids(tmp_path):
    out = build(tmp_path, base_classes())
    split = json.loads((out / "splits.json").read_text())
    train_classes = json.loads((out / "train/classes.json").read_text())
    assert train_classes == split["train"]
    images = np.load(out / "train/images.npy")
    sketches = np.load(out / "train/sketches.npy")
    assert images.dtype == np.uint8 and images.shape == (3 * len(train_classes), 32, 32, 3)
    seen_queries = json.loads((out / "test/seen_sketches_ids.json").read_text())
    train_sketches = json.loads((out / "train/sketches_ids.json").read_text())
    # every training-class sketch is either trained on or held out as a seen query, never both
    assert sketches.shape == (2 * len(train_classes) - len(seen_queries), 32, 32)
    assert not set(seen_queries) & set(train_sketches) and seen_queries
    assert {i.split("/")[0] for i in seen_queries} <= set(train_classes)
    assert {i.split("/")[0] for i in train_sketches} == set(train_classes)  # each class keeps one at least
    assert np.load(out / "test/seen_sketches.npy").shape == (len(seen_queries), 32, 32)
    labels = np.load(out / "train/images_labels.npy")
    ids = json.loads((out / "train/images_ids.json").read_text())
    assert [train_classes[lab] for lab in labels] == [i.split("/")[0] for i in ids]
    assert np.load(out / "train/semantic.npy").shape == (len(train_classes), 32)
    meta = json.loads((out / "test/classes.json").read_text())
    query_labels = np.load(out / "test/sketches_labels.npy")
    assert {meta["classes"][lab] for lab in query_labels} == set(meta["unseen"])
    assert len(np.load(out / "test/images_labels.npy")) == 3 * 16  # gallery: every class


def test_held_out_sketches_are_stable_per_file(tmp_path):
    """A file's fate depends on its own name only: more files and more classes never move an existing one."""
    small = {"a": ["1.png", "2.png", "3.png"], "b": ["1.png", "2.png"]}
    large = {"a": small["a"] + ["4.png", "5.png"], "b": small["b"], "c": ["1.png", "9.png"]}
    before = split_mod.held_out_sketches(small, ["a", "b"], 0.4, "s")
    after = split_mod.held_out_sketches(large, ["a", "b", "c"], 0.4, "s")
    assert {i for i in after if i.split("/")[1] in ("1.png", "2.png", "3.png") and i[0] in "ab"} == before
    # a class whose every sketch hashes below the fraction still keeps one for training
    assert len(split_mod.held_out_sketches({"a": ["x.png", "y.png"]}, ["a"], 1.0, "s")) == 1


def test_adding_an_unseen_class_leaves_train_shard_byte_identical(tmp_path):
    classes = base_classes()
    before = tree_digest(build(tmp_path / "a", classes) / "train")
    grown = {**classes, unseen_name("brand_new"): (3, 2), "photos_only": (3, 0)}
    out = build(tmp_path / "b", grown)
    assert tree_digest(out / "train") == before
    assert unseen_name("brand_new") in json.loads((out / "splits.json").read_text())["test"]


def test_training_class_without_semantic_vector(tmp_path):
    build(tmp_path / "x", base_classes())
    sem = tmp_path / "x" / "semantic"
    classes = json.loads((sem / "classes.json").read_text())
    split = json.loads((tmp_path / "x/prepared/splits.json").read_text())
    keep = [i for i, c in enumerate(classes) if c != split["train"][0]]
    (sem / "classes.json").write_text(json.dumps([classes[i] for i in keep]))
    np.save(sem / "vectors.npy", np.load(sem / "vectors.npy")[keep])
    with pytest.raises(UserError, match=f"no semantic vector for training class.*{split['train'][0]}"):
        prepare.run(Namespace(params=str(tmp_path / "x/params.yaml"), dataset=str(tmp_path / "x/dataset"),
                              index=str(tmp_path / "x/dataset.json"), semantic=str(sem),
                              out=str(tmp_path / "x/prepared2")))
    assert not (tmp_path / "x/prepared2/train").exists()


@pytest.mark.parametrize("bad, message", [
    ({"test_fraction": "high"}, "split.test_fraction must be a number"),
    ({"test_fraction": 0}, "split.test_fraction"),
])
def test_bad_split_params(tmp_path, bad, message):
    with pytest.raises(UserError, match=message):
        build(tmp_path, base_classes(), split=bad)


def test_test_class_file_param(tmp_path):
    names = sorted(base_classes())
    (tmp_path / "unseen.txt").write_text("\n".join(names[:3]) + "\n")
    out = build(tmp_path, base_classes(), split={"test_classes_file": str(tmp_path / "unseen.txt")})
    assert json.loads((out / "splits.json").read_text())["test"] == names[:3]
