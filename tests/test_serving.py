"""Serving: SketchSearch and the TorchServe handler in-process, the self-contained archive, a real TorchServe,
the serve-check stage (also beside a foreign TorchServe), the readiness deadline, the Java check and `sempcyc serve`.

A tiny trained model, its gallery and its .mar are built once for the module (tiny CNN, 32-px arrays, a few
iterations; the stages run in-process). Tests that start TorchServe are marked `integration`; every instance gets
its own TMPDIR, logs, store and free 127.0.0.1 ports, and is stopped by the process group the test started.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.client import HTTPConnection
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from helpers import (
    CLASSES,
    PER_CLASS,
    VENV_BIN,
    build_tiny_archive,
    build_tiny_model,
    call,
    merged,
    png_bytes,
    run_cli,
)
from helpers import PARAMS as STAGE_PARAMS
from sempcyc import serving, torchserve
from sempcyc.errors import UserError
from sempcyc.runtime.ann import AnnIndex, IndexParams
from sempcyc.runtime.gallery_shards import GalleryError, load_gallery, read_manifest
from sempcyc.runtime.search import RequestError, SketchSearch
from sempcyc.runtime.served_vectors import ShardVectors
from sempcyc.stages import serve_check

# The tiny dataset and params of test_stages (12 classes, 3 on the unseen side -> 6 query sketches, 48 gallery
# images), with one training epoch and the serving sections added.
MODEL_NAME, VERSION, TOP_K = "sem_pcyc", "1.2.3", 10
GALLERY_SIZE = len(CLASSES) * PER_CLASS
READY_S = 120          # deadline for instances that should become ready
BROKEN_DEADLINE_S = 10  # deadline for instances whose model never loads

PARAMS = merged(STAGE_PARAMS, {
    "train": {"epochs": 1, "iters_per_epoch": 2},
    "release": {"model_name": MODEL_NAME, "version": VERSION},
    "serve": {"top_k": TOP_K, "max_pixels": 16_000_000, "threads": 1, "batch_size": 4, "max_batch_delay_ms": 50,
              "check_requests": 16, "ready_timeout_s": READY_S},
})

ARCHIVE_FILES = {"handler.py", "sem_pcyc.pt", "gallery/manifest.json", "serving.json",
                 *(f"sem_pcyc_runtime/{m}.py" for m in ("search", "encoder", "imaging", "retrieval", "backbones",
                                                        "model", "gallery_shards", "ann", "served_vectors"))}


# ------------------------------------------------------------------------------------------------- helpers

def write_params(folder: Path, serve: dict | None = None) -> Path:
    params = json.loads(json.dumps(PARAMS))
    params["serve"].update(serve or {})
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return path


def stage(cwd: Path, *argv) -> str:
    """`sempcyc <argv>` in this process (torch is imported once), in `cwd`; its stdout."""
    rc, out, err = call(cwd, *argv)
    assert rc == 0, f"sempcyc {' '.join(map(str, argv))} -> {rc}\n{out}\n{err}"
    return out


def sketch(seed: int = 1) -> bytes:
    return png_bytes(10_000 + seed, mode="L")


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None,
         timeout: float = 60) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def assert_ranked(items, k: int) -> None:
    assert isinstance(items, list) and len(items) == k, items
    for item in items:
        assert set(item) == {"image", "class", "score"}, item
        assert isinstance(item["score"], float) and 0.0 < item["score"] <= 1.0
        assert item["image"].startswith(item["class"] + "/") and item["class"] in CLASSES
    scores = [i["score"] for i in items]
    assert scores == sorted(scores, reverse=True)
    assert len({i["image"] for i in items}) == k


def same_answer(a: list[dict], b: list[dict]) -> bool:
    """Equal rankings up to the float noise between batched and single inference."""
    return serving.same_ranking(a, b) and all(
        x["score"] == pytest.approx(y["score"], rel=1e-5, abs=1e-6) for x, y in zip(a, b))


def assert_error_json(status: int, body: bytes, statuses=range(400, 500)) -> str:
    assert status in statuses, (status, body[:300])
    answer = json.loads(body)
    assert isinstance(answer, dict) and isinstance(answer.get("error"), str) and answer["error"], answer
    return answer["error"]


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # zombies still count for kill(); only live members matter
    return any(_pgid(p) == pgid and p.status() != psutil.STATUS_ZOMBIE for p in psutil.process_iter())


def _pgid(proc: psutil.Process) -> int | None:
    try:
        return os.getpgid(proc.pid)
    except (ProcessLookupError, PermissionError, psutil.Error):
        return None


def wait_group_gone(pgid: int, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not group_alive(pgid):
            return True
        time.sleep(0.2)
    return not group_alive(pgid)


def processes_under(folder: Path) -> list[psutil.Process]:
    """Live processes whose command line or TMPDIR/LOG_LOCATION mention `folder` (a run's private temp dir)."""
    needle = str(folder)
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "environ", "status"]):
        info = proc.info
        if info["pid"] == os.getpid() or info["status"] == psutil.STATUS_ZOMBIE:
            continue
        env = info.get("environ") or {}
        text = " ".join(info.get("cmdline") or []) + " " + env.get("TMPDIR", "") + " " + env.get("LOG_LOCATION", "")
        if needle in text:
            found.append(proc)
    return found


def wait_none_under(folder: Path, timeout: float = 20) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while True:
        left = processes_under(folder)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def kill_leftovers(procs: list[psutil.Process]) -> None:
    """Clean-up after a failed check: end the process groups of processes this test's run started (found by its
    private temp dir), so a failure does not leave a TorchServe behind."""
    for pgid in {_pgid(p) for p in procs} - {None, os.getpgid(0)}:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


def repack(mar: Path, out: Path, replace: dict[str, bytes]) -> Path:
    """A copy of the .mar zip with some members' contents replaced."""
    with zipfile.ZipFile(mar) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info, replace.get(info.filename, src.read(info.filename)))
    return out


class FakeContext:
    """The parts of ts.context.Context the handler uses. Headers are a plain dict looked up by exact name, like
    TorchServe's RequestProcessor; TorchServe's frontend hands them over canonically spelt ('Content-Type' whatever
    the client sent), so tests use that spelling."""

    def __init__(self, model_dir: Path, headers: list[dict] | None = None):
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": None, "batch_size": 8}
        self.manifest = {"model": {"modelName": MODEL_NAME, "handler": "handler.py"}}
        self.headers = headers or []
        self.statuses: list[tuple[int, int, str]] = []  # (idx, status, phrase)

    def get_request_header(self, idx: int, key: str):
        return self.headers[idx].get(key) if idx < len(self.headers) else None

    def get_all_request_header(self, idx: int) -> dict:
        return dict(self.headers[idx]) if idx < len(self.headers) else {}

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        self.statuses.append((idx, code, phrase))


@dataclass
class Built:
    root: Path
    model: Path
    gallery: Path
    mar: Path
    dataset: Path
    splits: Path
    extracted: Path
    broken_mar: Path

    def cli_args(self, mar: Path | None = None, out: Path | None = None) -> list[str]:
        return ["--mar", str(mar or self.mar), "--model", str(self.model), "--gallery", str(self.gallery),
                "--dataset", str(self.dataset), "--splits", str(self.splits), "--out", str(out or "report.json")]


# ------------------------------------------------------------------------------------------------ fixtures

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    """extract -> semantic -> prepare -> features -> train -> gallery -> archive on a tiny dataset."""
    root = tmp_path_factory.mktemp("serving")
    model, gallery = build_tiny_model(root, PARAMS)
    mar = build_tiny_archive(model, gallery, root / "models/sem_pcyc.mar", PARAMS)
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


@pytest.fixture(scope="module")
def big_png() -> bytes:
    return serve_check.big_png(50)


@pytest.fixture(scope="module")
def offline(built: Built) -> SketchSearch:
    return SketchSearch.load(built.model, built.gallery, top_k=30, max_pixels=16_000_000)


@pytest.fixture(scope="module")
def handler_module(built: Built):
    """The archive's handler.py imported from the extracted archive (its sem_pcyc_runtime first on sys.path)."""
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(built.extracted))
    spec = importlib.util.spec_from_file_location("sem_pcyc_archive_handler", built.extracted / "handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    mp.undo()
    for name in [n for n in sys.modules if n == "sem_pcyc_runtime" or n.startswith("sem_pcyc_runtime.")]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def handler(built: Built, handler_module):
    h = handler_module.SemPcycHandler()
    h.initialize(FakeContext(built.extracted))
    return h


# ---------------------------------------------------------------------------------- 1. SketchSearch (unit)

def test_search_returns_k_ranked_items(offline: SketchSearch, built: Built):
    k = min(30, GALLERY_SIZE)  # the README's serve.top_k
    [answer] = offline.search([sketch(1)])
    assert_ranked(answer, k)
    # the scores are exp(-distance) to the gallery embeddings, nearest first
    _, emb, index = load_gallery(built.gallery)
    arr = offline.preprocess(sketch(1))
    query = offline.embed(arr[None])[0]
    dist = np.sqrt(((emb - query) ** 2).sum(1))
    ids = [e["id"] for e in index]
    assert answer[0]["image"] == ids[int(np.argmin(dist))]
    assert answer[0]["score"] == pytest.approx(float(np.exp(-dist.min())), rel=1e-4)


def test_search_top_k(built: Built, offline: SketchSearch):
    five = SketchSearch.load(built.model, built.gallery, top_k=5, max_pixels=16_000_000)
    [answer] = five.search([sketch(2)])
    assert_ranked(answer, 5)
    assert [r["image"] for r in answer] == [r["image"] for r in offline.search([sketch(2)])[0][:5]]
    assert len(five.search([sketch(2)], k=3)[0]) == 3
    assert len(five.search([sketch(2)], k=10_000)[0]) == GALLERY_SIZE  # never more than the gallery holds


def test_search_answers_each_request_of_a_batch_alone(offline: SketchSearch, big_png: bytes):
    good = sketch(3)
    answers = offline.search([good, b"", b"not an image at all", big_png, "a str", {"json": 1}])
    assert len(answers) == 6
    assert_ranked(answers[0], min(30, GALLERY_SIZE))
    assert answers[0] == offline.search([good])[0]  # the bad neighbours change nothing
    errors = answers[1:]
    assert all(isinstance(e, RequestError) for e in errors), errors
    assert [e.status for e in errors] == [400, 400, 413, 415, 415]
    assert all(e.message and str(e) == e.message for e in errors)
    assert "empty" in errors[0].message
    assert "too large" in errors[2].message
    # bytearray / memoryview bodies are bytes too (batched inference: equal up to float noise)
    for answer in offline.search([bytearray(good), memoryview(good)]):
        assert same_answer(answer, answers[0])
    # a batch of only bad requests never reaches the model
    assert [e.status for e in offline.search([b"", "x"])] == [400, 415]


# ---------------------------------------------------------------------------------- 1. handler (unit)

def test_handler_one_item_per_request_and_4xx_for_bad_items_only(built: Built, handler, big_png: bytes):
    good = sketch(4)
    data = [{"body": good}, {"body": b""}, {"data": good}, {"body": b"not an image"}, {"body": big_png},
            {"body": {"json": 1}}, {"body": "text"}]
    ctx = FakeContext(built.extracted, [{"Content-Type": "image/png"}] * len(data))
    out = handler.handle(data, ctx)
    assert len(out) == len(data)
    assert_ranked(out[0], TOP_K)  # top_k from serving.json
    assert same_answer(out[2], out[0])
    expected = {1: 400, 3: 400, 4: 413, 5: 415, 6: 415}
    for idx, status in expected.items():
        assert out[idx]["status"] == status and out[idx]["error"], out[idx]
    assert sorted((idx, code) for idx, code, _ in ctx.statuses) == sorted(expected.items())
    assert all(phrase for _, _, phrase in ctx.statuses)
    assert handler.version == VERSION


@pytest.mark.parametrize("content_type, status", [
    ("application/json", 415), ("text/plain", 415), ("application/x-www-form-urlencoded", 415),
    ("image/png", 200), ("image/jpeg", 200), ("application/octet-stream", 200), (None, 200),
    ("IMAGE/PNG", 200),
])
def test_handler_content_types(built: Built, handler, content_type, status):
    headers = {} if content_type is None else {"Content-Type": content_type}
    ctx = FakeContext(built.extracted, [headers])
    [answer] = handler.handle([{"body": sketch(5)}], ctx)
    if status == 200:
        assert_ranked(answer, TOP_K)
        assert ctx.statuses == []
    else:
        assert answer["status"] == 415 and content_type in answer["error"]
        assert [(idx, code) for idx, code, _ in ctx.statuses] == [(0, 415)]


def test_handler_without_context_headers(built: Built, handler):
    """handle(data, None) works (benchmarks call it that way) and answers every request."""
    out = handler.handle([{"body": sketch(6)}, {"body": b""}], None)
    assert_ranked(out[0], TOP_K)
    assert out[1]["status"] == 400


# ------------------------------------------------------------------------------ 2. self-contained archive

def test_archive_contents(built: Built):
    with zipfile.ZipFile(built.mar) as zf:
        names = set(zf.namelist())
        missing = ARCHIVE_FILES - names
        assert not missing, sorted(names)
        settings = json.loads(zf.read("serving.json"))
        offenders = [n for n in names if b"import sempcyc" in zf.read(n) or b"from sempcyc" in zf.read(n)]
        manifest = json.loads(zf.read("MAR-INF/MANIFEST.json"))
    assert settings["version"] == VERSION and settings["model_name"] == MODEL_NAME and settings["top_k"] == TOP_K
    assert offenders == []
    assert manifest["model"]["modelVersion"] == VERSION and manifest["model"]["handler"] == "handler.py"
    # the archive's gallery and model are the pipeline's, byte for byte: the manifest and every shard it lists
    gallery_files = {p.relative_to(built.gallery).as_posix() for p in built.gallery.rglob("*") if p.is_file()}
    assert gallery_files == {"manifest.json", *(e["file"] for e in read_manifest(built.gallery)["shards"])}
    assert {n for n in names if n.startswith("gallery/")} == {f"gallery/{f}" for f in gallery_files}
    for name in gallery_files:
        assert (built.extracted / "gallery" / name).read_bytes() == (built.gallery / name).read_bytes()
    assert (built.extracted / "sem_pcyc.pt").read_bytes() == built.model.read_bytes()


def test_archive_bytes_depend_only_on_the_inputs(built: Built, tmp_path: Path):
    """Built again (another second, another folder), the archive is the same bytes: members in name order with
    fixed timestamps and the manifest's build time fixed; another version is other bytes."""
    again = build_tiny_archive(built.model, built.gallery, tmp_path / "again.mar", PARAMS)
    assert again.read_bytes() == built.mar.read_bytes()
    with zipfile.ZipFile(again) as zf:
        infos = zf.infolist()
        assert [i.filename for i in infos] == sorted(i.filename for i in infos)
        assert {i.date_time for i in infos} == {(1980, 1, 1, 0, 0, 0)}
        assert json.loads(zf.read("MAR-INF/MANIFEST.json"))["createdOn"] == "01/01/1980 00:00:00"
    other = build_tiny_archive(built.model, built.gallery, tmp_path / "other.mar",
                               merged(PARAMS, {"release": {"version": "9.9.9"}}))
    assert other.read_bytes() != built.mar.read_bytes()


# ------------------------------------------------------------------ 2. the gallery's files, verified (unit)

def gallery_copy(built: Built, root: Path) -> tuple[Path, dict]:
    """A copy of the built gallery in `root`/gallery and its manifest."""
    shutil.copytree(built.gallery, root / "gallery")
    return root / "gallery", read_manifest(root / "gallery")


@pytest.mark.parametrize("damage", ["missing", "corrupt", "truncated"])
def test_a_missing_or_damaged_shard_refuses_the_whole_gallery(built: Built, tmp_path: Path, damage: str):
    gallery, manifest = gallery_copy(built, tmp_path)
    victim = gallery / manifest["shards"][-1]["file"]
    if damage == "missing":
        victim.unlink()
    elif damage == "corrupt":
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    else:
        victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(GalleryError) as exc:
        SketchSearch.load(built.model, gallery, top_k=5, max_pixels=16_000_000)
    message = str(exc.value)
    assert manifest["shards"][-1]["file"] in message and "\n" not in message, message
    assert ("missing" in message) if damage == "missing" else ("not the manifest's" in message), message


def test_the_handler_refuses_to_load_an_archive_with_a_damaged_shard(built: Built, handler_module,
                                                                     tmp_path: Path):
    """What TorchServe's worker does with it: initialize() raises, naming the shard, so the version never loads
    (registration fails, deploy rolls back) rather than answering from part of the gallery."""
    model_dir = tmp_path / "model_dir"
    shutil.copytree(built.extracted, model_dir)
    entry = read_manifest(model_dir / "gallery")["shards"][0]
    (model_dir / "gallery" / entry["file"]).write_bytes(b"not the shard")
    h = handler_module.SemPcycHandler()
    with pytest.raises(Exception, match=entry["file"].replace(".", r"\.")) as exc:
        h.initialize(FakeContext(model_dir))
    assert type(exc.value).__name__ == "GalleryError" and not h.initialized


def test_the_model_must_be_the_one_the_gallery_was_built_with(built: Built, tmp_path: Path):
    other = tmp_path / "other.pt"
    other.write_bytes(built.model.read_bytes() + b"\0")
    with pytest.raises(GalleryError, match="built with another model"):
        SketchSearch.load(other, built.gallery, top_k=5, max_pixels=16_000_000)


def test_files_missing_from_the_archive_come_from_the_blob_store(built: Built, tmp_path: Path,
                                                                 offline: SketchSearch):
    """A slim archive's model_dir: no model, no shards; the blob store holds them by sha256, each verified."""
    gallery, manifest = gallery_copy(built, tmp_path)
    store = tmp_path / "blobs"
    store.mkdir()
    shutil.copy2(built.model, store / manifest["model_sha256"])
    for entry in manifest["shards"]:
        (gallery / entry["file"]).rename(store / entry["sha256"])
    slim = SketchSearch.load(tmp_path / "no-model.pt", gallery, blob_store=store, top_k=30, max_pixels=16_000_000)
    assert slim.ids == offline.ids and slim.search([sketch(1)])[0] == offline.search([sketch(1)])[0]
    with pytest.raises(GalleryError, match="blob store"):  # neither in the archive nor in the store
        SketchSearch.load(tmp_path / "no-model.pt", gallery, blob_store=tmp_path, top_k=5, max_pixels=16_000_000)
    victim = store / manifest["shards"][0]["sha256"]
    victim.write_bytes(victim.read_bytes()[:-1] + b"x")
    with pytest.raises(GalleryError, match=manifest["shards"][0]["file"].replace(".", r"\.")):
        SketchSearch.load(tmp_path / "no-model.pt", gallery, blob_store=store, top_k=5, max_pixels=16_000_000)


SELF_CONTAINED_SCRIPT = textwrap.dedent("""
    import importlib.abc, json, sys

    class RefuseSempcyc(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "sempcyc" or name.startswith("sempcyc."):
                raise ImportError("refused import of " + name)
            return None

    sys.meta_path.insert(0, RefuseSempcyc())
    sys.path.insert(0, sys.argv[1])
    try:
        import sempcyc
    except ImportError:
        pass
    else:
        raise SystemExit("the finder did not refuse sempcyc")

    import handler

    class Ctx:
        system_properties = {"model_dir": sys.argv[1], "gpu_id": None, "batch_size": 1}
        manifest = {}
        statuses = []
        def get_request_header(self, idx, key):
            return "image/png"
        def set_response_status(self, code=200, phrase="", idx=0):
            self.statuses.append(code)

    ctx = Ctx()
    h = handler.SemPcycHandler()
    h.initialize(ctx)
    body = open(sys.argv[2], "rb").read()
    out = h.handle([{"body": body}, {"body": b""}], ctx)
    print(json.dumps({"out": out, "statuses": ctx.statuses,
                      "sempcyc_loaded": sorted(m for m in sys.modules if m.split(".")[0] == "sempcyc"),
                      "runtime": sys.modules["sem_pcyc_runtime.search"].__file__}))
""")


def test_archive_runs_without_the_sempcyc_package(built: Built, tmp_path: Path):
    folder = tmp_path / "unzipped"
    with zipfile.ZipFile(built.mar) as zf:
        zf.extractall(folder)
    (tmp_path / "sketch.png").write_bytes(sketch(7))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, "-c", SELF_CONTAINED_SCRIPT, str(folder), str(tmp_path / "sketch.png")],
                          cwd=folder, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert_ranked(result["out"][0], TOP_K)
    assert result["out"][1]["status"] == 400 and result["statuses"] == [400]
    assert result["sempcyc_loaded"] == []
    assert Path(result["runtime"]).resolve().is_relative_to(folder.resolve())


# ---------------------------------------------------------------------------------------- 7. Java (unit)

def fake_java(folder: Path, version_line: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    java = folder / "java"
    java.write_text(f"#!/bin/sh\necho '{version_line}' >&2\n")
    java.chmod(0o755)
    return folder


def test_java_missing(tmp_path: Path, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    with pytest.raises(UserError) as exc:
        torchserve.check_java()
    assert "Java 17" in str(exc.value) and "not found" in str(exc.value)
    assert "\n" not in str(exc.value)


def test_java_too_old(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PATH", str(fake_java(tmp_path / "bin", 'openjdk version "1.8.0_292"')))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    with pytest.raises(UserError) as exc:
        torchserve.check_java()
    assert "too old" in str(exc.value) and "Java 8" in str(exc.value) and "Java 17" in str(exc.value)


def test_java_17_accepted(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PATH", str(fake_java(tmp_path / "bin", 'openjdk version "17.0.15" 2025-04-15')))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    assert torchserve.check_java() == 17


def test_java_home_is_used(tmp_path: Path, monkeypatch):
    fake_java(tmp_path / "jdk/bin", 'openjdk version "1.8.0_292"')
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "jdk"))
    with pytest.raises(UserError, match="too old"):
        torchserve.check_java()


# ---------------------------------------------------------------------------------------------- 9. --help

@pytest.mark.parametrize("command", ["serve-check", "archive", "serve"])
def test_help(command: str, tmp_path: Path):
    proc = run_cli(command, "--help", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith(f"usage: sempcyc {command}"), proc.stdout + proc.stderr
    assert ("--out" if command == "archive" else "--mar") in proc.stdout


# ----------------------------------------------------------------------------- 3 + 6. a real TorchServe

@pytest.fixture(scope="class")
def ts(built: Built, tmp_path_factory):
    base = tmp_path_factory.mktemp("ts")
    store = base / "store"
    store.mkdir()
    shutil.copy2(built.mar, store / built.mar.name)
    models = serving.models_config(MODEL_NAME, VERSION, built.mar.name, batch_size=4, max_batch_delay_ms=200)
    with torchserve.TorchServe(store, models, workdir=base / "work") as ts:
        t0 = time.monotonic()
        waited = ts.wait_ready(MODEL_NAME, READY_S)
        ts.ready_wall = time.monotonic() - t0
        ts.ready_seconds = waited
        pgid = ts.proc.pid
        yield ts
    assert wait_group_gone(pgid), f"TorchServe process group {pgid} outlived stop()"
    assert wait_none_under(base / "work") == []


@pytest.mark.integration
class TestTorchServe:
    def url(self, ts, version: str | None = None) -> str:
        return f"{ts.inference_url}/predictions/{MODEL_NAME}" + (f"/{version}" if version else "")

    def test_wait_ready_returns_well_before_the_deadline(self, ts):
        assert 0 < ts.ready_seconds < READY_S / 2 and ts.ready_wall < READY_S / 2
        t0 = time.monotonic()
        ts.wait_ready(MODEL_NAME, READY_S)  # already ready: at once
        assert time.monotonic() - t0 < 5

    def test_its_processes_are_found_by_their_private_dirs(self, ts):
        """The leak checks below find an instance's processes by its private TMPDIR: the launcher, the Java
        frontend and the Python worker all carry it."""
        cmdlines = [" ".join(p.cmdline()) for p in processes_under(ts.workdir)]
        assert any("java" in c and "org.pytorch.serve.ModelServer" in c for c in cmdlines), cmdlines
        assert any("model_service_worker" in c for c in cmdlines), cmdlines
        assert all(os.getpgid(p.pid) == ts.proc.pid for p in processes_under(ts.workdir))

    def test_raw_sketch_bytes(self, ts, offline: SketchSearch):
        status, body = http("POST", self.url(ts), sketch(8), {"Content-Type": "image/png"})
        assert status == 200, body
        answer = json.loads(body)
        assert_ranked(answer, TOP_K)
        assert same_answer(answer, offline.search([sketch(8)], k=TOP_K)[0])

    def test_no_content_type(self, ts):
        # http.client sends no Content-Type unless told (urllib would add form encoding)
        conn = HTTPConnection("127.0.0.1", ts.inference_port, timeout=60)
        try:
            conn.request("POST", f"/predictions/{MODEL_NAME}", body=sketch(9))
            resp = conn.getresponse()
            status, body = resp.status, resp.read()
        finally:
            conn.close()
        assert status == 200, body
        assert_ranked(json.loads(body), TOP_K)

    @pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
    def test_curl_upload(self, ts, tmp_path: Path):
        (tmp_path / "sketch.png").write_bytes(sketch(10))
        proc = subprocess.run(["curl", "-sS", "-o", str(tmp_path / "out.json"), "-w", "%{http_code}",
                               "-T", str(tmp_path / "sketch.png"), self.url(ts)],
                              capture_output=True, text=True, timeout=60)
        assert proc.stdout == "200", proc.stdout + proc.stderr + (tmp_path / "out.json").read_text()
        assert_ranked(json.loads((tmp_path / "out.json").read_text()), TOP_K)

    def test_bad_requests_get_4xx_json_and_the_worker_keeps_serving(self, ts, big_png: bytes):
        cases = {"empty": (b"", {"Content-Type": "image/png"}, 400),
                 "not an image": (b"not an image" * 20, {"Content-Type": "image/png"}, 400),
                 "50 MP": (big_png, {"Content-Type": "image/png"}, 413),
                 "json": (json.dumps({"sketch": "x"}).encode(), {"Content-Type": "application/json"}, 415),
                 "text": (sketch(11), {"Content-Type": "text/plain"}, 415),
                 # urllib sends 'Content-type'; TorchServe hands the handler the canonical 'Content-Type'
                 "text, other spelling": (sketch(11), {"content-type": "text/plain"}, 415)}
        for label, (body, headers, want) in cases.items():
            status, answer = http("POST", self.url(ts), body, headers)
            message = assert_error_json(status, answer)
            assert status == want, (label, status, message)
        status, body = http("POST", self.url(ts), sketch(12), {"Content-Type": "image/png"})
        assert status == 200
        assert_ranked(json.loads(body), TOP_K)

    def test_concurrent_requests_are_batched_and_all_answered(self, ts, offline: SketchSearch):
        bodies = [sketch(20 + i) for i in range(8)]

        def one(body):
            return http("POST", self.url(ts), body, {"Content-Type": "image/png"}, timeout=120)

        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(one, bodies))
        assert [status for status, _ in results] == [200] * 8, results
        status, described = http("GET", f"{ts.management_url}/models/{MODEL_NAME}")
        assert status == 200 and json.loads(described)[0]["batchSize"] == 4
        assert "batchSize: 4" in (ts.workdir / "logs/model_log.log").read_text()  # the worker got it too
        for body, (_, answer) in zip(bodies, results):  # each answer is its own sketch's, whatever the batch
            assert same_answer(json.loads(answer), offline.search([body], k=TOP_K)[0])

    def test_versioned_url(self, ts):
        status, body = http("POST", self.url(ts, VERSION), sketch(14), {"Content-Type": "image/png"})
        assert status == 200, body
        assert_ranked(json.loads(body), TOP_K)
        status, _ = http("POST", self.url(ts, "9.9.9"), sketch(14), {"Content-Type": "image/png"})
        assert status == 404
        status, body = http("GET", f"{ts.management_url}/models/{MODEL_NAME}")
        assert status == 200 and json.loads(body)[0]["modelVersion"] == VERSION


@pytest.mark.integration
def test_wait_ready_deadline_on_a_model_that_never_loads(built: Built, tmp_path: Path):
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy2(built.broken_mar, store / built.broken_mar.name)
    models = serving.models_config(MODEL_NAME, VERSION, built.broken_mar.name, 4, 10)
    with torchserve.TorchServe(store, models, workdir=tmp_path / "work") as ts:
        pgid = ts.proc.pid
        t0 = time.monotonic()
        with pytest.raises(UserError) as exc:  # no early exit: the deadline itself must hold
            ts.wait_ready(MODEL_NAME, BROKEN_DEADLINE_S, failed_grace_s=1e9)
        took = time.monotonic() - t0
        assert BROKEN_DEADLINE_S <= took < BROKEN_DEADLINE_S + 15
        message = str(exc.value)
        assert message.startswith(f"TorchServe not ready after {BROKEN_DEADLINE_S} s")
        assert "ValueError" in message and "\n" not in message  # the worker's exception, on one line
        t0 = time.monotonic()
        with pytest.raises(UserError) as early:  # default: give up after a few seconds of failed retries
            ts.wait_ready(MODEL_NAME, BROKEN_DEADLINE_S * 10)
        assert time.monotonic() - t0 < BROKEN_DEADLINE_S
        assert str(early.value).startswith(f"model '{MODEL_NAME}' failed to load: ValueError")
    assert wait_group_gone(pgid), "the broken instance's processes outlived stop()"


# ---------------------------------------------------------------- 4 + 5. serve-check beside a foreign TorchServe

@dataclass
class Foreign:
    proc: subprocess.Popen
    pid_file: Path
    ping_url: str


@pytest.fixture(scope="class")
def foreign_torchserve(tmp_path_factory):
    """A TorchServe started the ordinary way (`torchserve --start`, daemonised), with no models."""
    base = tmp_path_factory.mktemp("foreign")
    tmp, logs, store = base / "tmp", base / "logs", base / "store"
    for folder in (tmp, logs, store):
        folder.mkdir()
    inference = torchserve.free_port()
    config = base / "config.properties"
    config.write_text("".join(f"{k}={v}\n" for k, v in {
        "inference_address": f"http://127.0.0.1:{inference}",
        "management_address": f"http://127.0.0.1:{torchserve.free_port()}",
        "metrics_address": f"http://127.0.0.1:{torchserve.free_port()}",
        "grpc_inference_port": torchserve.free_port(), "grpc_management_port": torchserve.free_port(),
        "initial_worker_port": torchserve.free_worker_port(), "initial_distribution_port": torchserve.free_port(),
        "model_store": str(store), "disable_token_authorization": "true"}.items()))
    env = dict(os.environ, TMPDIR=str(tmp), LOG_LOCATION=str(logs), METRICS_LOCATION=str(logs))
    with open(base / "torchserve.out", "ab") as out:
        proc = subprocess.Popen([str(VENV_BIN / "torchserve"), "--start", "--ncs", "--model-store", str(store),
                                 "--ts-config", str(config)], cwd=base, env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        ping = f"http://127.0.0.1:{inference}/ping"
        deadline = time.monotonic() + READY_S
        while True:
            try:
                if http("GET", ping, timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, (base / "torchserve.out").read_text()
            time.sleep(0.2)
        assert (tmp / ".model_server.pid").is_file()
        yield Foreign(proc, tmp / ".model_server.pid", ping)
    finally:
        # the daemonised Java frontend stays in the process group of the launcher we started
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        if not wait_group_gone(proc.pid, 30):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        assert wait_none_under(base) == [], "the foreign TorchServe outlived its process group"


def run_serve_check(built: Built, folder: Path, mar: Path | None = None, serve: dict | None = None):
    """`sempcyc serve-check` in a subprocess with a private TMPDIR (so its processes can be told apart)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tmp").mkdir()
    write_params(folder, serve)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TMPDIR", str(folder / "tmp"))
        mp.setenv("OMP_NUM_THREADS", "1")
        t0 = time.monotonic()
        proc = run_cli("serve-check", *built.cli_args(mar, folder / "report.json"), cwd=folder, check=False)
        took = time.monotonic() - t0
    return proc, took


@pytest.fixture(scope="class")
def checked(built: Built, foreign_torchserve: Foreign, tmp_path_factory):
    pid_file = foreign_torchserve.pid_file
    before = (pid_file.read_text(), pid_file.stat().st_mtime_ns)
    java_pid = int(before[0].strip())
    folder = tmp_path_factory.mktemp("serve-check")
    proc, took = run_serve_check(built, folder)
    left = wait_none_under(folder / "tmp")
    kill_leftovers(left)
    return {"proc": proc, "took": took, "folder": folder, "left": left, "before": before, "java_pid": java_pid,
            "foreign": foreign_torchserve}


@pytest.mark.integration
class TestServeCheck:
    def test_serve_check_passes(self, checked):
        proc = checked["proc"]
        assert proc.returncode == 0, proc.stdout + proc.stderr
        report = json.loads((checked["folder"] / "report.json").read_text())
        assert report["parity_top10"] == 1.0
        assert report["errors"] == 0 and report["schema_errors"] == 0 and report["concurrent_errors"] == 0
        assert report["concurrent_requests"] == 16
        assert report["bad_request_status"] and all(400 <= s < 500 for s in report["bad_request_status"].values())
        assert set(report["bad_request_status"]) == {"empty body", "not an image", "50-megapixel image", "JSON body"}
        assert report["latency_ms_p50"] > 0 and report["latency_ms_p95"] >= report["latency_ms_p50"]
        assert report["passed"] is True and report["failures"] == []
        assert report["version"] == VERSION
        assert "serve-check: ready in" in proc.stdout
        assert checked["left"] == [], "serve-check left processes behind"

    def test_report_carries_the_smoke_query_deploy_sends(self, checked, built: Built):
        """Each host's smoke query comes from here (deploy loads no model): this archive's sha256, the first
        unseen-class query and the offline top-10 its served answer matched."""
        smoke = json.loads((checked["folder"] / "report.json").read_text())["smoke"]
        assert smoke["archive_sha256"] == hashlib.sha256(built.mar.read_bytes()).hexdigest()
        name, sketch = serving.pick_queries(built.dataset, built.splits)[0]
        assert smoke["sketch"] == name
        offline = SketchSearch.load(built.model, built.gallery, top_k=smoke["k"], max_pixels=16_000_000)
        assert len(smoke["top10"]) == min(10, smoke["k"])
        assert serving.same_ranking(smoke["top10"], offline.search([sketch])[0][:10])

    def test_foreign_torchserve_is_untouched(self, checked):
        foreign: Foreign = checked["foreign"]
        assert (foreign.pid_file.read_text(), foreign.pid_file.stat().st_mtime_ns) == checked["before"]
        java = psutil.Process(checked["java_pid"])
        assert java.is_running() and java.status() != psutil.STATUS_ZOMBIE
        assert "java" in " ".join(java.cmdline())
        assert http("GET", foreign.ping_url, timeout=10)[0] == 200


@pytest.fixture(scope="module")
def broken_check(built: Built, tmp_path_factory):
    """serve-check of an archive whose handler raises in initialize, with a short readiness deadline."""
    folder = tmp_path_factory.mktemp("broken-check")
    proc, took = run_serve_check(built, folder, mar=built.broken_mar, serve={"ready_timeout_s": BROKEN_DEADLINE_S})
    left = wait_none_under(folder / "tmp")
    kill_leftovers(left)
    return {"proc": proc, "took": took, "folder": folder, "left": left}


@pytest.mark.integration
def test_serve_check_fails_fast_on_a_broken_archive(broken_check):
    proc = broken_check["proc"]
    assert proc.returncode == 1, proc.stdout + proc.stderr
    first = proc.stderr.strip().splitlines()[0]
    # early ("failed to load") or at the deadline ("not ready after"), the cause is named on that one line
    assert first.startswith("sempcyc serve-check: error: ") and f"'{MODEL_NAME}'" in first, proc.stderr
    assert "ValueError" in first, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stdout
    # start-up + the offline reference + the deadline, no more
    assert broken_check["took"] < BROKEN_DEADLINE_S + 30, broken_check["took"]
    assert not (broken_check["folder"] / "report.json").exists()
    assert broken_check["left"] == [], "serve-check left TorchServe processes behind"


@pytest.mark.integration
def test_serve_check_failure_names_the_cause_in_its_first_line(broken_check):
    first = broken_check["proc"].stderr.strip().splitlines()[0]
    assert "ValueError" in first and "invalid literal" in first, first


def test_serve_check_missing_archive(built: Built, tmp_path: Path):
    proc, _ = run_serve_check(built, tmp_path / "run", mar=tmp_path / "nope.mar")
    assert proc.returncode == 1
    missing = tmp_path / "nope.mar"
    assert proc.stderr.strip() == f"sempcyc serve-check: error: {missing}: not found; run `dvc repro archive`"


# --------------------------------------------------------------------- 7b. a gallery with an approximate index

@pytest.fixture(scope="module")
def ann_built(built: Built, tmp_path_factory) -> Built:
    """The same model's gallery with a faiss index (4 lists: gallery.ann_min_items 1), and its archive."""
    root = tmp_path_factory.mktemp("ann")
    params = merged(PARAMS, {"gallery": {"ann_min_items": 1, "ann_nlist": 4}})
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    code, out, err = call(root, "gallery", "--model", str(built.model), "--dataset", str(built.root / "data/dataset"),
                          "--index", str(built.root / "data/dataset.json"), "--out", str(root / "gallery"),
                          "--cache", str(root / "cache"))
    assert code == 0 and "IVF index" in out, out + err
    mar = build_tiny_archive(built.model, root / "gallery", root / "sem_pcyc.mar", params)
    return Built(root, built.model, root / "gallery", mar, built.dataset, built.splits, built.extracted,
                 built.broken_mar)


def test_search_with_the_index_scanning_every_list_finds_the_exact_answers(ann_built: Built, offline: SketchSearch):
    search = SketchSearch.load(ann_built.model, ann_built.gallery, top_k=30, max_pixels=16_000_000, nprobe=4,
                               rerank=GALLERY_SIZE)
    assert search.ann is not None and isinstance(search.vectors, ShardVectors)  # read from the shard files
    sketches = [png_bytes(seed=i) for i in range(4)]
    for got, want in zip(search.search(sketches), offline.search(sketches)):
        assert same_answer(got, want)  # the short list holds everything, ranked exactly: exact search's answer


def test_search_refuses_an_index_built_for_another_gallery(ann_built: Built, tmp_path: Path):
    gallery = tmp_path / "gallery"
    shutil.copytree(ann_built.gallery, gallery)
    _, embeddings, _ = load_gallery(gallery)
    # an intact index file (its sha256 in the manifest) built for other vectors: serving it would answer wrongly
    AnnIndex.build(embeddings[::-1].copy(), "another gallery", IndexParams(4, 3, 0, 2, 8)).save(gallery / "ivf.npz")
    manifest = read_manifest(gallery)
    manifest["index"]["sha256"] = hashlib.sha256((gallery / "ivf.npz").read_bytes()).hexdigest()
    (gallery / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    with pytest.raises(GalleryError, match=r"gallery index ivf\.npz: .*another gallery.*dvc repro gallery"):
        SketchSearch.load(ann_built.model, gallery, top_k=5, max_pixels=16_000_000, nprobe=4, rerank=2)


@pytest.mark.integration
def test_serve_check_reports_recall_and_fails_below_the_floor(ann_built: Built, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("rc")  # a short path: TorchServe's worker sockets live under it
    proc, _ = run_serve_check(ann_built, tmp_path / "g", serve={"ann_nprobe": 4, "ann_rerank": 5,
                                                                 "ann_min_recall": 0.95})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "g/report.json").read_text())
    assert report["ann_recall_at_k"] >= 0.95 and report["ann_nprobe"] == 4 and report["passed"]
    proc, _ = run_serve_check(ann_built, tmp_path / "b", serve={"ann_nprobe": 1, "ann_rerank": 1,
                                                                 "ann_min_recall": 1.0})
    assert proc.returncode == 1
    report = json.loads((tmp_path / "b/report.json").read_text())
    assert report["ann_recall_at_k"] < 1.0 and not report["passed"]
    assert "recall: the approximate index finds" in proc.stderr and "serve.ann_nprobe" in proc.stderr, proc.stderr


# ------------------------------------------------------------------------------------------ 8. sempcyc serve

@pytest.mark.integration
def test_sempcyc_serve(built: Built, tmp_path: Path):
    write_params(tmp_path)
    (tmp_path / "tmp").mkdir()
    out_path = tmp_path / "serve.out"
    env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", TMPDIR=str(tmp_path / "tmp"),
               OMP_NUM_THREADS="1")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with open(out_path, "wb") as out:
            cmd = [str(VENV_BIN / "sempcyc"), "serve", "--mar", str(built.mar), "--port", str(port),
                   "--management-port", str(torchserve.free_port())]
            # Ctrl-C as in a terminal: a suite started in the background by a shell without job control inherits
            # SIGINT ignored, and so would `sempcyc serve`
            proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.monotonic() + READY_S
            while "curl -T" not in out_path.read_text():
                assert proc.poll() is None, out_path.read_text()
                assert time.monotonic() < deadline, out_path.read_text()
                time.sleep(0.2)
            text = out_path.read_text()
            assert f"port {port} is in use" in text, text
            curl_line = next(line for line in text.splitlines() if "curl -T" in line)
            url = curl_line.split()[-1]
            assert url.startswith("http://127.0.0.1:") and f":{port}/" not in url
            assert url.endswith(f"/predictions/{MODEL_NAME}")
            status, body = http("POST", url, sketch(15), {"Content-Type": "image/png"})
            assert status == 200, body
            assert_ranked(json.loads(body), TOP_K)
            # ... and the sketch page, on its own 127.0.0.1 port, searching the same TorchServe
            page = next(line for line in text.splitlines() if "sketch page:" in line).split()[-1]
            assert page.startswith("http://127.0.0.1:") and page.endswith("/"), page
            status, html = http("GET", page)
            assert status == 200 and b"<canvas" in html
            status, body = http("POST", f"{page}api/search/{VERSION}", sketch(15), {"Content-Type": "image/png"})
            assert status == 200, body
            assert_ranked(json.loads(body), TOP_K)
            ts_procs = processes_under(tmp_path / "tmp")
            assert any("java" in " ".join(p.cmdline()) for p in ts_procs), ts_procs

            os.killpg(proc.pid, signal.SIGINT)
            assert proc.wait(timeout=30) == 0, out_path.read_text()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
            left = wait_none_under(tmp_path / "tmp")
            kill_leftovers(left)
    assert "serve: stopped" in out_path.read_text()
    assert left == [], "the TorchServe of `sempcyc serve` outlived it"
    assert http_refused(url) and http_refused(page)


def http_refused(url: str) -> bool:
    try:
        http("POST", url, b"x", timeout=5)
    except (urllib.error.URLError, ConnectionError):
        return True
    return False


def test_archive_stage_cli_records_the_evaluation_metrics(built: Built, tmp_path: Path):
    """`sempcyc archive` as dvc.yaml calls it: the archive's serving.json carries the model's headline metrics."""
    stage(built.root, "evaluate", "--out", tmp_path / "eval")
    stage(built.root, "archive", "--model", built.model, "--gallery", built.gallery,
          "--metrics", tmp_path / "eval/metrics.json", "--out", tmp_path / "cli.mar")
    with zipfile.ZipFile(tmp_path / "cli.mar") as zf:
        serving = json.loads(zf.read("serving.json"))
    report = json.loads((tmp_path / "eval/metrics.json").read_text())
    assert serving["version"] == VERSION
    assert serving["metrics"]["zero_shot"]["map_all"] == round(report["zero_shot"]["sem_pcyc"]["map_all"], 4)
