"""Shared fixtures: a scratch DVC project that uses this checkout's code, tiny class sets, one torch thread, an
sshd, and what several test modules test, built once a session: the tiny model (the stage tests, test_page.py), the
serving tests' model and archive (`built`; test_page.py has a `built` of its own) and the deploy tests' archives.
Plain helpers live in helpers.py and, for the serving, page and deploy/release tests, serving_helpers.py,
page_helpers.py and hosts.py (test modules import from there, never from each other)."""
from __future__ import annotations

import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import yaml

from helpers import (
    CLASSES,
    PER_CLASS,
    REPO,
    VENV_BIN,
    build_tiny_archive,
    build_tiny_model,
    call,
    class_files,
    dvc_env,
    merged,
    new_unseen_class,
    ok,
    one_thread,
    write_params,
    write_tar,
)
from helpers import PARAMS as TINY_PARAMS
from hosts import renamed_model, start_sshd
from sempcyc.params import read_section
from sempcyc.runtime.search import SketchSearch
from sempcyc.serving import ReleaseSettings, ServeSettings
from sempcyc.stages import archive, serve_check
from serving_helpers import PARAMS as SERVING_PARAMS
from serving_helpers import Built, repack


@pytest.fixture
def tiny_classes() -> dict[str, tuple[int, int]]:
    return {f"class_{i:02d}": (3, 3) for i in range(10)}


@pytest.fixture
def dvc_project(tmp_path: Path):
    """A fresh git + DVC project holding a copy of this repo's pipeline files and source."""
    proj = tmp_path / "proj"
    proj.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(REPO / name, proj / name)
    shutil.copytree(REPO / "src", proj / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    env = dvc_env(tmp_path)
    subprocess.run(["git", "init", "-q"], cwd=proj, check=True, env=env)
    subprocess.run([str(VENV_BIN / "dvc"), "init", "-q"], cwd=proj, check=True, env=env)
    return proj, env


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors on a shared 2-core box: a second OpenMP thread only adds synchronisation (and stalls badly
    when the other core is busy). OpenBLAS too: on a busy box its threads make evaluate's ITQ (100 small SVDs)
    200x slower (10 s vs 0.05 s)."""
    with one_thread():
        yield


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    with start_sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server


# ------------------------------------------------------------------------------------------ the tiny model

@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A project folder holding the tiny pipeline (helpers.PARAMS: 12 classes, tiny CNN, 32-px arrays, a few
    iterations) run in-process up to the gallery on one torch thread, as build_tiny_model makes it: ds.tar,
    params.yaml and every stage's outputs at their default paths (models/sem_pcyc.pt, models/gallery). Built once
    for the stage tests (`prepared`, `trained`) and test_page.py; they only read it."""
    root = tmp_path_factory.mktemp("tiny-model")
    with one_thread():
        build_tiny_model(root, TINY_PARAMS)
    return root


@pytest.fixture(scope="session")
def prepared(tiny_model: Path) -> Path:
    """A project folder with ds.tar, params.yaml and the real extract, semantic and prepare outputs (the tiny
    model's project: the later stages' outputs are there too)."""
    assert len({sum(map(ord, c)) for c in CLASSES}) == len(CLASSES)
    split = json.loads((tiny_model / "data/prepared/splits.json").read_text())
    assert len(split["test"]) >= 2 and len(split["train"]) >= 6, split
    return tiny_model


@pytest.fixture(scope="session")
def trained(prepared: Path) -> Path:
    """`prepared` plus the features (1 fine-tuning epoch) and train (2 epochs) outputs at their default paths."""
    assert (prepared / "models/sem_pcyc.pt").is_file() and (prepared / "models/features").is_dir()
    return prepared


# --------------------------------------------------------------------- the serving tests' model and archive

@pytest.fixture(scope="session")
def built(tmp_path_factory) -> Built:
    """extract -> semantic -> prepare -> features -> train -> gallery -> archive on a tiny dataset, with the serving
    tests' params (serving_helpers.PARAMS: one training epoch, the serving sections), on one torch thread. (The
    model differs from `tiny_model`'s. test_page.py has a `built` of its own.)"""
    root = tmp_path_factory.mktemp("serving")
    with one_thread():
        model, gallery = build_tiny_model(root, SERVING_PARAMS)
    mar = build_tiny_archive(model, gallery, root / "models/sem_pcyc.mar", SERVING_PARAMS)
    extracted = root / "extracted"
    with zipfile.ZipFile(mar) as zf:
        zf.extractall(extracted)
    # an archive whose handler fails in initialize (serving.json top_k is not a number): the model never loads
    settings = json.loads((extracted / "serving.json").read_text())
    (root / "broken").mkdir()
    broken = repack(mar, root / "broken" / mar.name,
                    {"serving.json": json.dumps({**settings, "top_k": "x"}).encode()})
    splits = root / "data/prepared/splits.json"
    assert json.loads(splits.read_text())["test"], "the split must hold unseen classes"
    return Built(root, model, gallery, mar, root / "data/dataset", splits, extracted, broken)


@pytest.fixture(scope="session")
def big_png() -> bytes:
    return serve_check.big_png(50)


@pytest.fixture(scope="session")
def offline(built: Built) -> SketchSearch:
    return SketchSearch.load(built.model, built.gallery, top_k=30, max_pixels=16_000_000)


@pytest.fixture(scope="session")
def ann_built(built: Built, tmp_path_factory) -> Built:
    """The same model's gallery with a faiss index (4 lists: gallery.ann_min_items 1), and its archive."""
    root = tmp_path_factory.mktemp("ann")
    params = merged(SERVING_PARAMS, {"gallery": {"ann_min_items": 1, "ann_nlist": 4}})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    code, out, err = call(root, "gallery", "--model", str(built.model), "--dataset", str(built.root / "data/dataset"),
                          "--index", str(built.root / "data/dataset.json"), "--out", str(root / "gallery"),
                          "--cache", str(root / "cache"))
    assert code == 0 and "IVF index" in out, out + err
    mar = build_tiny_archive(built.model, root / "gallery", root / "sem_pcyc.mar", params)
    return Built(root, built.model, root / "gallery", mar, built.dataset, built.splits, built.extracted,
                 built.broken_mar)


# ------------------------------------------------------------------------------- the deploy tests' archives

@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> dict:
    """A tiny trained model + gallery, archived as versions 0.1.0, 0.2.0 and 0.3.0, a broken 0.3.0, the same model
    under another name ("other"), and 0.4.0: the same model with a gallery of two more classes (a zero-shot
    release). 8 gallery shards, so new classes also land in shards that hold old ones; gallery expansion on, so a
    slim archive carries the neighbours file and the host's blob store the shards it expands."""
    root = tmp_path_factory.mktemp("artifacts")
    new = [new_unseen_class(CLASSES)]
    new.append(new_unseen_class([*CLASSES, *new]))
    write_tar(root / "ds.tar", class_files({c: (PER_CLASS, PER_CLASS) for c in CLASSES}))
    write_tar(root / "ds2.tar", class_files({c: (PER_CLASS, PER_CLASS) for c in [*CLASSES, *new]}))
    write_params(root, {"gallery": {"shards": 8}, "model": {"overrides": {"gallery_expansion": 2}}})
    ok(root, "extract", "--tar", "ds.tar")
    for name in ("semantic", "prepare", "features", "train", "gallery"):
        ok(root, name)
    ok(root, "extract", "--tar", "ds2.tar", "--out", "data/dataset2", "--index", "data/dataset2.json")
    ok(root, "gallery", "--dataset", "data/dataset2", "--index", "data/dataset2.json", "--out", "models/gallery2")
    marts = {}
    for version, gallery in (("0.1.0", "gallery"), ("0.2.0", "gallery"), ("0.3.0", "gallery"),
                             ("0.4.0", "gallery2")):
        params = merged(TINY_PARAMS, {"release": {"version": version, "model_name": "sem_pcyc"},
                                 "serve": {"top_k": 5, "threads": 1}})
        release, serve = read_section(params, ReleaseSettings), read_section(params, ServeSettings)
        marts[version] = archive.build_archive(root / "models/sem_pcyc.pt", root / "models" / gallery,
                                               root / f"mars/sem_pcyc-{version}.mar", release, serve)
    broken = root / "mars/broken-0.3.0.mar"
    with zipfile.ZipFile(marts["0.2.0"]) as src, zipfile.ZipFile(broken, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "serving.json":
                data = json.dumps({**json.loads(data), "top_k": "not a number", "version": "0.3.0"}).encode()
            if item.filename == "MAR-INF/MANIFEST.json":
                manifest = json.loads(data)
                manifest["model"]["modelVersion"] = "0.3.0"
                data = json.dumps(manifest).encode()
            dst.writestr(item, data)
    marts["broken"] = broken
    marts["other"] = renamed_model(marts["0.1.0"], root / "mars/other.mar", "other")
    sketch_file = next((root / "data/dataset/sketches").glob("*/*.png"))
    sketch = sketch_file.read_bytes()
    expected = {g: SketchSearch.load(root / "models/sem_pcyc.pt", root / "models" / g, top_k=5,
                                     max_pixels=16_000_000).search([sketch])[0] for g in ("gallery", "gallery2")}
    return {"root": root, "mars": marts, "sketch": sketch, "expected": expected["gallery"],
            "expected2": expected["gallery2"], "k": 5, "new_classes": new,
            "sketch_name": sketch_file.relative_to(root / "data/dataset/sketches").as_posix()}
