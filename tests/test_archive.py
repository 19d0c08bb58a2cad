"""The archive stage: a self-contained, deterministic .mar, the gallery's files verified on load, files left
out of a slim archive taken from the blob store, and `sempcyc archive` as dvc.yaml calls it.

The serving tests' tiny model, its gallery and its .mar (conftest.py's `built`) are built once a session (tiny
CNN, 32-px arrays, a few iterations; the stages run in-process).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from helpers import build_tiny_archive, call, merged
from sempcyc.runtime.gallery_shards import GalleryError, read_manifest
from sempcyc.runtime.search import SketchSearch
from serving_helpers import MODEL_NAME, PARAMS, TOP_K, VERSION, Built, assert_ranked, sketch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


ARCHIVE_FILES = {"handler.py", "sem_pcyc.pt", "gallery/manifest.json", "serving.json",
                 *(f"sem_pcyc_runtime/{m}.py" for m in ("search", "encoder", "imaging", "retrieval", "backbones",
                                                        "model", "gallery_shards", "ann", "served_vectors"))}


def stage(cwd: Path, *argv) -> str:
    """`sempcyc <argv>` in this process (torch is imported once), in `cwd`; its stdout."""
    rc, out, err = call(cwd, *argv)
    assert rc == 0, f"sempcyc {' '.join(map(str, argv))} -> {rc}\n{out}\n{err}"
    return out


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
