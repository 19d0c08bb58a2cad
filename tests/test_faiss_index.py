"""A large gallery served through its faiss index: the served vectors read in place from the shard files (bit for bit
the loader's), the index's answers against exact search's on a small gallery, the faiss a host must have (version
mismatch, faiss missing: one line, in the handler's initialize), and a real TorchServe, and a real deploy, on a
Python that cannot import faiss.

The Python without faiss is honest: a venv of this interpreter whose site-packages links every package of this one
except faiss, so `import faiss` fails there as on a host where nobody installed it; nothing in the handler knows.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import pytest

from helpers import CLASSES, PARAMS, PER_CLASS, build_tiny_archive, build_tiny_model, merged
from hosts import Host
from sempcyc import serving, torchserve
from sempcyc.errors import UserError
from sempcyc.params import read_section
from sempcyc.runtime import RUNTIME_DIR, ann
from sempcyc.runtime.gallery_shards import GalleryError, load_gallery, load_neighbours, read_manifest, shard_files
from sempcyc.runtime.retrieval import top_k
from sempcyc.runtime.search import SketchSearch, load_ann_index
from sempcyc.runtime.served_vectors import ShardVectors
from sempcyc.stages import deploy
from sempcyc.stages.gallery import GallerySettings, write_sharded

ITEMS, DIM, CLASSES_SYNTHETIC = 3000, 24, 60
FAISS_LINE = "cannot import faiss: a serving host needs the faiss-cpu package in TorchServe's Python"


# ------------------------------------------------------------------------------------------------ helpers

def clustered(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around CLASSES_SYNTHETIC centres and each one's class."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(0).standard_normal((CLASSES_SYNTHETIC, DIM)).astype(np.float32)
    labels = rng.integers(0, CLASSES_SYNTHETIC, n)
    x = centres[labels] / np.sqrt(DIM) * 3 + rng.standard_normal((n, DIM)).astype(np.float32) / np.sqrt(DIM)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def synthetic_gallery(folder: Path, expansion: int, **gallery) -> Path:
    """A gallery folder written by the gallery stage's own code from clustered vectors (no model: searched here
    without one), 16 shards, with an index from 1 item on."""
    settings = read_section(merged(PARAMS, {"gallery": {"ann_min_items": 1, "ann_nlist": 16, "shards": 16,
                                                        **gallery}}), GallerySettings)
    vectors, labels = clustered(ITEMS, seed=1)
    items = [(f"c{label:02d}", f"{i:05d}.png") for i, label in enumerate(labels)]
    meta = {"model_sha256": "0" * 64, "items": ITEMS, "dim": DIM, "classes": CLASSES_SYNTHETIC, "size": 32,
            "buckets": settings.shards, "dtype": "float32", "thumbnails": {"format": "webp", "size": 64, "items": 0}}
    write_sharded(folder, meta, items, vectors, [], settings, expansion)
    return folder


def mapped(folder: Path) -> ShardVectors:
    manifest = read_manifest(folder)
    files, _ = shard_files(folder, manifest)
    neighbours = load_neighbours(folder, manifest, None) if manifest.get("neighbours") else None
    return ShardVectors(files, DIM, neighbours)


def python_without_faiss(folder: Path) -> Path:
    """A venv of this interpreter whose site-packages links each entry of ours but faiss's: its python, beside a
    torchserve launcher that runs on it (TorchServe starts its workers with the launcher's Python)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    ours = Path(sysconfig.get_paths()["purelib"])
    theirs = folder / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    for entry in ours.iterdir():
        if not entry.name.lower().startswith("faiss"):
            (theirs / entry.name).symlink_to(entry)
    launcher = Path(sys.executable).parent / "torchserve"
    body = launcher.read_text(encoding="utf-8").split("\n", 1)[1]
    (folder / "bin" / "torchserve").write_text(f"#!{folder / 'bin' / 'python'}\n{body}", encoding="utf-8")
    (folder / "bin" / "torchserve").chmod(0o755)
    probe = subprocess.run([str(folder / "bin/python"), "-c", "import torch, numpy, ts; import faiss"],
                           capture_output=True, text=True)
    assert probe.returncode == 1 and "No module named 'faiss'" in probe.stderr, probe.stderr
    return folder / "bin" / "python"


# ------------------------------------------------------------------------------ the served vectors, in place

@pytest.mark.parametrize("expansion", [0, 2])
def test_the_shards_vectors_read_in_place_are_the_loaders_bit_for_bit(tmp_path: Path, expansion: int):
    folder = synthetic_gallery(tmp_path / "g", expansion)
    _, loaded, _ = load_gallery(folder)  # float32, expanded with the neighbours when there are some
    vectors = mapped(folder)
    assert vectors.shape == loaded.shape == (ITEMS, DIM) and len(vectors.maps) == 16
    rng = np.random.default_rng(0)
    for idx in (np.arange(ITEMS), rng.integers(0, ITEMS, (7, 40)), np.array([5]), np.array([], dtype=np.int64)):
        got = vectors[idx]
        assert got.dtype == np.float32 and got.shape == (*idx.shape, DIM)
        np.testing.assert_array_equal(got, loaded[idx])
    assert all(not m.flags.owndata and not m.flags.writeable for m in vectors.maps)  # views of the files
    with pytest.raises(IndexError, match="outside"):
        vectors[np.array([ITEMS])]


def test_the_index_finds_exact_searchs_answers_on_a_small_gallery(tmp_path: Path):
    """The served path (index + the shards' vectors) against exact search over the loader's float32 vectors:
    recall@30 at serve's defaults, and every item found carries exact search's score."""
    folder = synthetic_gallery(tmp_path / "g", expansion=2)
    manifest, loaded, _ = load_gallery(folder)
    index = load_ann_index(folder, manifest, loaded.shape, None)
    serve = read_section(PARAMS, serving.ServeSettings)
    queries, _ = clustered(100, seed=2)
    idx, scores = index.search(queries, 30, serve.ann_nprobe, serve.ann_rerank * 30, mapped(folder))
    truth, truth_scores = top_k(queries, loaded, 30)
    found = np.mean([len(set(a) & set(b)) / 30 for a, b in zip(idx.tolist(), truth.tolist())])
    assert found >= 0.95, found
    exact = {(q, int(i)): s for q, row in enumerate(truth) for i, s in zip(row, truth_scores[q])}
    shared = [(s, exact[q, int(i)]) for q, row in enumerate(idx) for i, s in zip(row, scores[q])
              if (q, int(i)) in exact]
    np.testing.assert_allclose(*zip(*shared), rtol=1e-5)


def test_a_gallery_with_an_index_built_by_another_faiss_is_refused_before_any_shard_is_read(tmp_path: Path):
    folder = synthetic_gallery(tmp_path / "g", expansion=0)
    manifest = read_manifest(folder)
    manifest["index"]["faiss_version"] = "1.7.4"
    (folder / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    for shard in (folder / "shards").iterdir():
        shard.unlink()  # never reached
    with pytest.raises(GalleryError) as info:
        SketchSearch.load(tmp_path / "no-model.pt", folder, top_k=5, max_pixels=1, nprobe=1, rerank=1)
    message = str(info.value)
    assert "built with faiss 1.7.4" in message and "faiss-cpu==1.7.4" in message and "\n" not in message


def test_the_neighbours_come_from_the_index_and_match_exact_search_with_every_list(tmp_path: Path):
    exact = np.load(synthetic_gallery(tmp_path / "exact", 2, ann_min_items=0) / "neighbours.npy")
    scanned = np.load(synthetic_gallery(tmp_path / "all", 2, ann_neighbour_nprobe=16, ann_neighbour_rerank=64)
                      / "neighbours.npy")
    np.testing.assert_array_equal(scanned, exact)
    few = np.load(synthetic_gallery(tmp_path / "few", 2, ann_neighbour_nprobe=1, ann_neighbour_rerank=1)
                  / "neighbours.npy")  # one list, 3 candidates an item
    shared = np.mean([len(set(a) & set(b)) / 2 for a, b in zip(few.tolist(), exact.tolist())])
    assert shared < 0.9, shared  # the settings are honoured: approximate (measured 0.21)


# ------------------------------------------------------------------------------ a host without faiss (unit)

class Context:
    def __init__(self, model_dir: Path):
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": None, "batch_size": 4}


def test_the_handler_imports_without_faiss_and_its_initialize_names_the_package(tmp_path: Path, monkeypatch):
    """The archive's handler module, its runtime's faiss gone: importing it works (TorchServe would otherwise
    report a failed import of its own default handlers), and initialize() raises one line naming faiss-cpu and
    the version the archive was built with, before reading any model or gallery file."""
    runtime = tmp_path / "archive" / "sem_pcyc_runtime"
    shutil.copytree(RUNTIME_DIR, runtime, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "archive/serving.json").write_text(json.dumps({"faiss_version": "1.15.1", "top_k": 5}))
    monkeypatch.syspath_prepend(str(tmp_path / "archive"))
    spec = importlib.util.spec_from_file_location("sem_pcyc_handler_without_faiss", RUNTIME_DIR / "handler.py")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        monkeypatch.setattr(sys.modules["sem_pcyc_runtime.ann"], "faiss", None)
        with pytest.raises(ModuleNotFoundError) as info:
            module.SemPcycHandler().initialize(Context(tmp_path / "archive"))
    finally:
        for name in [n for n in sys.modules if n == "sem_pcyc_runtime" or n.startswith("sem_pcyc_runtime.")]:
            del sys.modules[name]
    message = str(info.value)
    assert FAISS_LINE in message and "pip install faiss-cpu==1.15.1" in message and "\n" not in message


def test_faiss_loader_lines_in_a_worker_log_are_not_taken_for_its_load_error(tmp_path: Path):
    """faiss's loader logs "ImportError(...)" reprs for the CPU-specific builds it skips, while a worker loads
    normally: the readiness check must not give up on them; a traceback's last line is still found."""
    ts = torchserve.TorchServe(tmp_path / "store", workdir=tmp_path / "work")
    (tmp_path / "work/logs").mkdir(parents=True)
    log = tmp_path / "work/logs/model_log.log"
    prefix = "2026-01-01T00:00:00,000 [INFO ] W-9000-sem_pcyc_1.0.0-stdout MODEL_LOG - "
    skipped = [f"{prefix}Could not load library with AVX2 support due to:",
               f"{prefix}ModuleNotFoundError(\"No module named 'faiss.swigfaiss_avx2'\")", f"{prefix}Loading faiss."]
    log.write_text("\n".join(skipped) + "\n")
    assert ts.load_error() is None
    failure = "sem_pcyc_runtime.gallery_shards.GalleryError: gallery shard shards/ab.npz is missing"
    log.write_text("\n".join([*skipped, f"{prefix}Traceback (most recent call last):", f"{prefix}{failure}"]) + "\n")
    assert ts.load_error() == failure


# -------------------------------------------------------------------- a host without faiss (real TorchServe)

@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tiny")
    params = merged(PARAMS, {"release": {"model_name": "sem_pcyc", "version": "0.1.0"}, "serve": {"top_k": 5}})
    model, gallery = build_tiny_model(root, params)
    mar = build_tiny_archive(model, gallery, root / "mars/sem_pcyc-0.1.0.mar", params)
    sketch = next((root / "data/dataset/sketches").glob("*/*.png")).read_bytes()
    expected = SketchSearch.load(model, gallery, top_k=5, max_pixels=16_000_000).search([sketch])[0]
    return {"root": root, "mar": mar, "sketch": sketch, "expected": expected,
            "python": python_without_faiss(tmp_path_factory.mktemp("venv") / "no-faiss")}


@pytest.mark.integration
def test_torchserve_without_faiss_fails_the_load_with_the_handlers_line(tiny: dict, tmp_path: Path, monkeypatch):
    store = tmp_path / "store"
    store.mkdir()
    (store / tiny["mar"].name).write_bytes(tiny["mar"].read_bytes())
    models = serving.models_config("sem_pcyc", "0.1.0", tiny["mar"].name, 4, 5)
    monkeypatch.setattr(sys, "executable", str(tiny["python"]))  # TorchServe.start runs <its dir>/torchserve
    with torchserve.TorchServe(store, models, workdir=tmp_path / "work") as ts:
        monkeypatch.undo()
        with pytest.raises(UserError) as info:
            ts.wait_ready("sem_pcyc", 90)
    message = str(info.value)
    assert message.startswith("model 'sem_pcyc' failed to load: ModuleNotFoundError: "), message
    assert FAISS_LINE in message and f"faiss-cpu=={ann.faiss_version()}" in message and "\n" not in message


@pytest.mark.integration
def test_deploy_to_a_host_without_faiss_fails_and_rolls_back(tiny: dict, sshd, tmp_path: Path, monkeypatch):
    """The host's TorchServe runs on a Python without faiss: registration fails (its workers cannot load the
    model), deploy rolls the version back (unregistered: no workers left retrying) and the host serves nothing new;
    the host's model log holds the handler's line naming the package (the receipt has TorchServe's answer to the
    registration, "Failed to start workers")."""
    host = Host(tmp_path / "host")
    monkeypatch.setattr(sys, "executable", str(tiny["python"]))
    try:
        host.start()
        monkeypatch.undo()
        receipt = deploy.deploy_target(host.target(sshd), deploy.checked_archive(tiny["mar"]), tiny["sketch"],
                                       tiny["expected"], 5)
        assert receipt["status"] == "failed" and receipt.get("rolled_back") is True, json.dumps(receipt)
        assert receipt["failed_step"] == "register"
        assert host.versions() == [] and host.default() is None
        logs = "".join(p.read_text(errors="replace") for p in (host.root / "run").rglob("model_log.log"))
        assert FAISS_LINE in logs
    finally:
        host.stop()


def test_the_archive_names_the_faiss_a_host_needs(tiny: dict):
    """serving.json carries the faiss version the archive was built with (the handler's line names it), also for a
    small gallery searched exactly like this one: every serving host needs faiss, whatever the gallery's size."""
    with zipfile.ZipFile(tiny["mar"]) as zf:
        settings = json.loads(zf.read("serving.json"))
        manifest = json.loads(zf.read("gallery/manifest.json"))
    assert settings["faiss_version"] == ann.faiss_version() and settings["ann_rerank"] >= 1
    assert "index" not in manifest and manifest["items"] == len(CLASSES) * PER_CLASS
