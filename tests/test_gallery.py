"""The gallery stage on a tiny dataset (tiny CNN, 32-px arrays, a few iterations).

The inputs are the session's tiny model project (conftest.py: the real extract -> semantic (MiniLM) -> prepare ->
features -> train -> gallery, built once), read as `prepared` and `trained`; every test writes its own outputs
under tmp_path. Stages run in-process through `sempcyc.cli.main` (fast: torch is imported once) except where a
real process matters: two processes under torchrun.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import (
    CLASSES,
    PARAMS,
    PER_CLASS,
    VENV_BIN,
    call,
    class_files,
    configured,
    new_unseen_class,
    ok,
    one_line_error,
    write_params,
    write_tar,
)
from sempcyc import embedcache
from sempcyc.fsutil import sha256_file
from sempcyc.runtime import ann, imaging
from sempcyc.runtime.encoder import Encoder
from sempcyc.runtime.gallery_shards import (
    EMBEDDING_DTYPE,
    GalleryError,
    bucket_of,
    gallery_digest,
    load_gallery,
    unpack_shard,
    vectors_digest,
)
from sempcyc.runtime.retrieval import expand_gallery, gallery_neighbours
from sempcyc.stages import gallery as gallery_mod

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------------- helpers

def gallery_counts(out: str) -> tuple[int, int]:
    match = re.search(r"\((\d+) embedded, (\d+) from cache\)", out)
    assert match, out
    return int(match.group(1)), int(match.group(2))


# ------------------------------------------------------------------------------------------------- gallery

def read_gallery(folder: Path) -> tuple[dict, np.ndarray, list[dict], dict[str, bytes]]:
    """(manifest, embeddings, index entries, thumbnails by id) of a gallery folder, as the handler loads it."""
    manifest, embeddings, index = load_gallery(folder)
    thumbs = {}
    for entry in manifest["shards"]:
        thumbs.update(unpack_shard((folder / entry["file"]).read_bytes(), entry["file"])["thumbs"])
    return manifest, embeddings, index, thumbs


def gallery_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_gallery_embeddings_match_the_encoder(trained: Path, tmp_path: Path):
    write_params(tmp_path)
    dataset = trained / "data/dataset"
    ok(tmp_path, "gallery", "--model", trained / "models/sem_pcyc.pt", "--dataset", dataset,
       "--index", trained / "data/dataset.json", "--out", "gallery", "--cache", "cache")
    manifest, emb, entries, _ = read_gallery(tmp_path / "gallery")
    index = json.loads((trained / "data/dataset.json").read_text())
    expected = [f"{c}/{f}" for c in index["classes"] for f in index["files"]["images"].get(c, [])]
    assert len(expected) == len(CLASSES) * PER_CLASS
    assert emb.shape == (len(expected), PARAMS["model"]["dim_out"]) and emb.dtype == EMBEDDING_DTYPE
    assert sorted(e["id"] for e in entries) == sorted(expected)  # shard by shard, index order within each
    assert all(e["class"] == e["id"].split("/")[0] for e in entries)
    assert manifest["items"] == len(expected) and manifest["classes"] == len(CLASSES)
    assert manifest["model_sha256"] == sha256_file(trained / "models/sem_pcyc.pt")

    enc = Encoder.load(trained / "models/sem_pcyc.pt")
    for row in (0, 5, len(expected) - 1):
        path = dataset / "images" / entries[row]["id"]
        arr = imaging.image_to_array(imaging.load_file(path), enc.size)
        with torch.inference_mode():
            want = enc.embed_images(torch.from_numpy(arr.copy())[None]).numpy()[0]
        np.testing.assert_allclose(emb[row], want, rtol=1e-4, atol=1e-5)


def test_gallery_shards_by_class_hash_with_deterministic_bytes(trained: Path, tmp_path: Path):
    """Each shard holds the classes of one bucket (gallery.shards), is named by its sha256, and equal inputs give
    equal bytes: a rerun (from the cache) rewrites every file identically."""
    argv = ["gallery", "--model", trained / "models/sem_pcyc.pt", "--dataset", trained / "data/dataset",
            "--index", trained / "data/dataset.json", "--cache", "cache"]
    for buckets in (1, 5, 256):
        write_params(tmp_path, {"gallery": {"shards": buckets}})
        ok(tmp_path, *argv, "--out", f"a{buckets}")
        ok(tmp_path, *argv, "--out", f"b{buckets}")
        first = gallery_files(tmp_path / f"a{buckets}")
        assert first == gallery_files(tmp_path / f"b{buckets}")
        manifest = json.loads(first["manifest.json"])
        shards = manifest["shards"]
        assert set(first) == {"manifest.json", *(e["file"] for e in shards)}
        assert [e["bucket"] for e in shards] == sorted({bucket_of(c, buckets) for c in CLASSES})
        for entry in shards:
            data = first[entry["file"]]
            assert entry["file"] == f"shards/{entry['sha256']}.npz" and hashlib.sha256(data).hexdigest() == \
                entry["sha256"] and entry["bytes"] == len(data)
            shard = unpack_shard(data, entry["file"])
            assert {bucket_of(c, buckets) for c in shard["classes"]} == {entry["bucket"]}
            assert len(shard["ids"]) == entry["items"] == PER_CLASS * len(set(shard["classes"]))
    assert len(json.loads((tmp_path / "a1/manifest.json").read_text())["shards"]) == 1


def test_gallery_cache_embeds_only_new_images(trained: Path, tmp_path: Path):
    write_params(tmp_path, {"gallery": {"shards": 64}})
    model = trained / "models/sem_pcyc.pt"
    n = len(CLASSES) * PER_CLASS

    def gallery(model_path: Path, dataset: Path, index: Path) -> tuple[int, int]:
        out = ok(tmp_path, "gallery", "--model", model_path, "--dataset", dataset, "--index", index,
                 "--out", "gallery", "--cache", "cache")
        return gallery_counts(out)

    assert gallery(model, trained / "data/dataset", trained / "data/dataset.json") == (n, 0)
    assert gallery(model, trained / "data/dataset", trained / "data/dataset.json") == (0, n)
    before = {e["bucket"]: e["sha256"] for e in json.loads((tmp_path / "gallery/manifest.json").read_text())["shards"]}

    extra = new_unseen_class(CLASSES)
    write_tar(tmp_path / "ds2.tar", class_files({c: (PER_CLASS, PER_CLASS) for c in [*CLASSES, extra]}))
    ok(tmp_path, "extract", "--tar", "ds2.tar", "--out", "ds2", "--index", "ds2.json")
    assert gallery(model, tmp_path / "ds2", tmp_path / "ds2.json") == (PER_CLASS, n)
    manifest, emb, entries, _ = read_gallery(tmp_path / "gallery")
    assert len(emb) == n + PER_CLASS
    assert sum(e["id"].startswith(f"{extra}/") for e in entries) == PER_CLASS
    # only the new class's shard changed: every other bucket's shard is the same file
    after = {e["bucket"]: e["sha256"] for e in manifest["shards"]}
    changed = {b for b in after if before.get(b) != after[b]}
    assert changed == {bucket_of(extra, 64)} and set(before) <= set(after)

    # another model: nothing from the cache, and the old model's cache file is gone
    bundle = torch.load(model, map_location="cpu", weights_only=True)
    first = next(iter(bundle["gen_im2se"]))
    bundle["gen_im2se"][first] = bundle["gen_im2se"][first] + 0.5
    torch.save(bundle, tmp_path / "other.pt")
    assert gallery(tmp_path / "other.pt", tmp_path / "ds2", tmp_path / "ds2.json") == (n + PER_CLASS, 0)
    assert not np.allclose(read_gallery(tmp_path / "gallery")[1], emb)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1


def test_gallery_expansion_ships_each_items_neighbours_beside_unchanged_shards(trained: Path, tmp_path: Path):
    """With the model's gallery_expansion k, the shards still hold each image's own embedding (the same bytes as
    without it), neighbours.npy each item's k nearest, and the loader serves expand_gallery of the two; a new
    class changes its own shard and the neighbours file, no other shard."""
    write_params(tmp_path, {"gallery": {"shards": 64}})
    configured(trained / "models/sem_pcyc.pt", tmp_path / "expanding.pt", gallery_expansion=2)

    def gallery(model: Path, out: str, dataset: Path = trained / "data/dataset",
                index: Path = trained / "data/dataset.json") -> dict[str, bytes]:
        ok(tmp_path, "gallery", "--model", model, "--dataset", dataset, "--index", index, "--out", out,
           "--cache", f"cache-{model.stem}")
        return gallery_files(tmp_path / out)

    plain, expanded = gallery(trained / "models/sem_pcyc.pt", "plain"), gallery(tmp_path / "expanding.pt", "exp")
    manifest = json.loads(expanded["manifest.json"])
    assert manifest["neighbours"] == {"file": "neighbours.npy", "k": 2,
                                      "sha256": hashlib.sha256(expanded["neighbours.npy"]).hexdigest()}
    assert "neighbours" not in json.loads(plain["manifest.json"])
    assert {f: b for f, b in expanded.items() if f.startswith("shards/")} == \
        {f: b for f, b in plain.items() if f.startswith("shards/")}
    raw = load_gallery(tmp_path / "plain")[1]
    neighbours = np.load(tmp_path / "exp/neighbours.npy")
    np.testing.assert_array_equal(neighbours, gallery_neighbours(raw, 2))
    np.testing.assert_allclose(load_gallery(tmp_path / "exp")[1], expand_gallery(raw, neighbours), rtol=1e-6)

    extra = new_unseen_class(CLASSES)
    write_tar(tmp_path / "ds2.tar", class_files({c: (PER_CLASS, PER_CLASS) for c in [*CLASSES, extra]}))
    ok(tmp_path, "extract", "--tar", "ds2.tar", "--out", "ds2", "--index", "ds2.json")
    grown = gallery(tmp_path / "expanding.pt", "exp2", tmp_path / "ds2", tmp_path / "ds2.json")
    assert set(expanded) - set(grown) == {f for f in expanded if f.startswith("shards/")} - set(grown)
    assert len({f for f in grown if f.startswith("shards/")} - set(expanded)) == 1  # the new class's bucket
    assert grown["neighbours.npy"] != expanded["neighbours.npy"]


@pytest.mark.parametrize("damage", ["bytes", "k", "missing"])
def test_a_damaged_neighbours_file_refuses_the_gallery(trained: Path, tmp_path: Path, damage: str):
    write_params(tmp_path)
    configured(trained / "models/sem_pcyc.pt", tmp_path / "expanding.pt", gallery_expansion=2)
    ok(tmp_path, "gallery", "--model", tmp_path / "expanding.pt", "--dataset", trained / "data/dataset",
       "--index", trained / "data/dataset.json", "--out", "gallery", "--cache", "cache")
    path, manifest_path = tmp_path / "gallery/neighbours.npy", tmp_path / "gallery/manifest.json"
    if damage == "bytes":
        path.write_bytes(path.read_bytes()[:-4] + b"\0\0\0\0")
    elif damage == "k":  # a manifest that names the file's sha256 but another k
        manifest = json.loads(manifest_path.read_text())
        manifest["neighbours"]["k"] = 3
        manifest_path.write_text(json.dumps(manifest))
    else:
        path.unlink()
    with pytest.raises(GalleryError, match="gallery neighbours neighbours.npy"):
        load_gallery(tmp_path / "gallery")


def test_gallery_cache_is_not_reused_when_the_embedding_code_changes(trained: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch):
    """Same model bytes, other runtime code (e.g. a new embedding layout): every image is embedded again."""
    write_params(tmp_path)
    argv = ["gallery", "--model", trained / "models/sem_pcyc.pt", "--dataset", trained / "data/dataset",
            "--index", trained / "data/dataset.json", "--out", "gallery", "--cache", "cache"]
    n = len(CLASSES) * PER_CLASS
    assert gallery_counts(ok(tmp_path, *argv)) == (n, 0)
    runtime = tmp_path / "runtime"
    shutil.copytree(embedcache.RUNTIME_DIR, runtime)
    (runtime / "model.py").write_text((runtime / "model.py").read_text() + "\n# changed\n")
    monkeypatch.setattr(embedcache, "RUNTIME_DIR", runtime)
    assert gallery_counts(ok(tmp_path, *argv)) == (n, 0)


def test_gallery_cache_is_not_reused_with_another_torch_thread_count(trained: Path, tmp_path: Path):
    """The last bits of a vector follow torch's thread count, so a cache filled with one count is not mixed into
    a gallery embedded with another; the same count reuses it."""
    write_params(tmp_path)
    argv = ["gallery", "--model", trained / "models/sem_pcyc.pt", "--dataset", trained / "data/dataset",
            "--index", trained / "data/dataset.json", "--out", "gallery", "--cache", "cache"]
    n, threads = len(CLASSES) * PER_CLASS, torch.get_num_threads()
    try:
        for count, embedded in ((1, n), (2, n), (2, 0)):
            torch.set_num_threads(count)
            assert gallery_counts(ok(tmp_path, *argv))[1] == n - embedded
    finally:
        torch.set_num_threads(threads)


def test_gallery_thumbnails(trained: Path, tmp_path: Path):
    """The page's thumbnails: one square WebP for each of the first gallery.thumbnail_max_items images in index
    order, kept in the shard of the image's class."""
    index = json.loads((trained / "data/dataset.json").read_text())
    in_order = [f"{c}/{f}" for c in index["classes"] for f in index["files"]["images"].get(c, [])]
    for cap, want in ((10_000, len(in_order)), (5, 5), (0, 0)):
        write_params(tmp_path, {"gallery": {"thumbnail_size": 40, "thumbnail_max_items": cap}})
        out = ok(tmp_path, "gallery", "--model", trained / "models/sem_pcyc.pt", "--dataset",
                 trained / "data/dataset", "--index", trained / "data/dataset.json", "--out", "gallery",
                 "--cache", "cache")
        assert f"and {want} thumbnails" in out, out
        manifest, _, _, thumbs = read_gallery(tmp_path / "gallery")
        assert manifest["thumbnails"] == {"format": "webp", "size": 40, "items": want}
        assert sorted(thumbs) == sorted(in_order[:want])
        for image_id, data in thumbs.items():
            thumb = Image.open(io.BytesIO(data))
            assert thumb.format == "WEBP" and thumb.size == (40, 40)
            # the model's own fit-and-pad view of the photo, made small
            photo = imaging.image_to_array(imaging.load_file(trained / "data/dataset/images" / image_id), 40)
            assert np.abs(np.asarray(thumb.convert("RGB"), dtype=float) - photo).mean() < 12


def gallery_args(trained: Path, out: str = "gallery", cache: str = "cache") -> list:
    return ["gallery", "--model", trained / "models/sem_pcyc.pt", "--dataset", trained / "data/dataset",
            "--index", trained / "data/dataset.json", "--out", out, "--cache", cache]


def test_gallery_passes_never_depend_on_which_images_share_them(trained: Path):
    """Every network pass takes exactly gallery.batch_size images (the last one padded), so an image's vector is the
    same bytes alone, among others, or in another process's share."""
    sizes = []

    class BatchSizeDependent:  # a stand-in encoder whose result depends on the batch size
        size = 32

        def embed_images(self, x: torch.Tensor) -> torch.Tensor:
            sizes.append(len(x))
            return x.float().mean(dim=(1, 2)) * len(x)

    index = json.loads((trained / "data/dataset.json").read_text())
    todo = [(f"{c}/{f}", trained / "data/dataset/images" / c / f) for c, f in gallery_mod.gallery_items(index)][:11]
    among = gallery_mod.embed(BatchSizeDependent(), todo, 4, "cpu", gallery_mod.Ranks())
    alone = gallery_mod.embed(BatchSizeDependent(), todo[5:6], 4, "cpu", gallery_mod.Ranks())
    assert among.shape == (11, 3) and among.dtype == np.float32
    assert np.array_equal(alone[0], among[5]) and set(sizes) == {4}


def test_gallery_torchrun_two_processes_write_the_one_process_bytes(trained: Path, tmp_path: Path):
    """2 processes under real torchrun (gloo on CPU): each embeds half of the images the cache lacks, rank 0 writes
    the gallery, byte for byte the one a single process writes; both exit 0; the counts are the whole job's."""
    params = write_params(tmp_path, {"gallery": {"batch_size": 5, "ann_min_items": 10, "ann_nlist": 4}})
    n = len(CLASSES) * PER_CLASS
    assert gallery_counts(ok(tmp_path, *gallery_args(trained, "one", "cache1"))) == (n, 0)
    env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1")
    cmd = [str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "sempcyc.cli",
           "--params", str(params), *map(str, gallery_args(trained, "two", "cache2"))]
    for embedded in (n, 0):  # the second run: everything from rank 0's cache
        shutil.rmtree(tmp_path / "two", ignore_errors=True)
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert gallery_counts(proc.stdout) == (embedded, n - embedded)
        assert proc.stdout.count("gallery: ") == 2 + bool(embedded), proc.stdout  # rank 0 alone reports
        assert (f"embedded {n} images" in proc.stdout and "on 2 process(es)" in proc.stdout) == bool(embedded)
        assert gallery_files(tmp_path / "two") == gallery_files(tmp_path / "one")
    assert "ivf.npz" in gallery_files(tmp_path / "one")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no scratch folder left


def test_gallery_ann_index_from_gallery_ann_min_items(trained: Path, tmp_path: Path):
    """A gallery of at least gallery.ann_min_items items gets ivf.npz, a faiss index over its embeddings in manifest
    order, named in the manifest with its sha256, the gallery digest the loader recomputes, the faiss version and
    the build parameters."""
    n = len(CLASSES) * PER_CLASS
    for min_items, nlist, want in ((n, 4, 4), (1, 0, ann.default_nlist(n))):
        write_params(tmp_path, {"gallery": {"ann_min_items": min_items, "ann_nlist": nlist, "shards": 5}})
        out = ok(tmp_path, *gallery_args(trained))
        assert f"IVF index of {n} items in {want} lists" in out
        manifest, emb, _, _ = read_gallery(tmp_path / "gallery")
        entry = manifest["index"]
        digest = gallery_digest(manifest["model_sha256"], [s["sha256"] for s in manifest["shards"]])
        assert entry == {"file": "ivf.npz", "sha256": sha256_file(tmp_path / "gallery/ivf.npz"),
                         "gallery_digest": digest, "faiss_version": ann.faiss_version(), "nlist": want,
                         "code_dims": 3, "seed": 0, "iterations": 10, "sample_per_list": 64}
        index = ann.AnnIndex.load(tmp_path / "gallery/ivf.npz", digest, emb.shape)
        assert index.nlist == want and index.items == n
        ids, _ = index.search(emb[:3], k=1, nprobe=want, shortlist=4, vectors=emb)
        assert ids[:, 0].tolist() == [0, 1, 2]  # manifest order: each item finds itself
    with pytest.raises(ann.IndexMismatch):
        ann.AnnIndex.load(tmp_path / "gallery/ivf.npz", gallery_digest("other model", []), emb.shape)


def test_a_gallery_with_an_index_finds_the_expansions_neighbours_through_one(trained: Path, tmp_path: Path):
    """From gallery.ann_min_items items on, the gallery expansion's neighbours come from a faiss index scanning
    gallery.ann_neighbour_nprobe lists and ranking the best candidates exactly (all 4 lists and a long short
    list here: the exact neighbours; 1 list and 1 candidate a neighbour: fewer found), and the served index is
    built for the expanded vectors: its digest covers the neighbours file."""
    configured(trained / "models/sem_pcyc.pt", tmp_path / "expanding.pt", gallery_expansion=2)
    argv = ["gallery", "--model", tmp_path / "expanding.pt", "--dataset", trained / "data/dataset",
            "--index", trained / "data/dataset.json", "--cache", "cache"]
    write_params(tmp_path, {"gallery": {"ann_min_items": 0}})
    ok(tmp_path, *argv, "--out", "exact")
    manifest = json.loads((tmp_path / "exact/manifest.json").read_text())
    raw = np.concatenate([unpack_shard((tmp_path / "exact" / e["file"]).read_bytes(), e["file"])["embeddings"]
                          for e in manifest["shards"]])  # each image's own embedding, in manifest order
    exact = np.load(tmp_path / "exact/neighbours.npy")
    np.testing.assert_array_equal(exact, gallery_neighbours(raw, 2))
    for nprobe, rerank, least in ((4, 16, 1.0), (1, 1, 0.3)):
        write_params(tmp_path, {"gallery": {"ann_min_items": 1, "ann_nlist": 4, "ann_neighbour_nprobe": nprobe,
                                            "ann_neighbour_rerank": rerank}})
        ok(tmp_path, *argv, "--out", f"ivf{nprobe}")
        manifest, served, _ = load_gallery(tmp_path / f"ivf{nprobe}")
        found = np.load(tmp_path / f"ivf{nprobe}/neighbours.npy")
        assert found.shape == exact.shape and (found != np.arange(len(found))[:, None]).all()
        shared = np.mean([len(set(a) & set(b)) / 2 for a, b in zip(found.tolist(), exact.tolist())])
        assert shared >= least, shared
        np.testing.assert_allclose(served, expand_gallery(raw, found), rtol=1e-6)
        assert manifest["index"]["gallery_digest"] == vectors_digest(manifest) != gallery_digest(
            manifest["model_sha256"], [e["sha256"] for e in manifest["shards"]])
        ann.AnnIndex.load(tmp_path / f"ivf{nprobe}/ivf.npz", vectors_digest(manifest), served.shape)
    np.testing.assert_array_equal(np.load(tmp_path / "ivf4/neighbours.npy"), exact)


@pytest.mark.parametrize("overrides", [{}, {"ann_min_items": 0}, {"ann_min_items": len(CLASSES) * PER_CLASS + 1}])
def test_gallery_below_gallery_ann_min_items_has_no_index(trained: Path, tmp_path: Path, overrides: dict):
    """The default threshold (200000) gives the demo-size gallery no index; 0 means never."""
    write_params(tmp_path, {"gallery": overrides} if overrides else None)
    out = ok(tmp_path, *gallery_args(trained))
    assert "IVF" not in out
    assert "index" not in json.loads((tmp_path / "gallery/manifest.json").read_text())
    assert not (tmp_path / "gallery/ivf.npz").exists()


def test_a_gallery_smaller_than_its_list_count_is_searched_exactly(trained: Path, tmp_path: Path):
    """More lists (gallery.ann_nlist) than items: no index and a line saying so, not an error."""
    n = len(CLASSES) * PER_CLASS
    write_params(tmp_path, {"gallery": {"ann_min_items": 1, "ann_nlist": 1000}})
    out = ok(tmp_path, *gallery_args(trained))
    assert f"{n} items cannot fill 1000 lists (gallery.ann_nlist 1000" in out and "searched exactly" in out
    assert "index" not in json.loads((tmp_path / "gallery/manifest.json").read_text())
    assert not (tmp_path / "gallery/ivf.npz").exists()


@pytest.mark.parametrize("overrides, names", [
    ({"gallery": {"ann_code_dims": 0}}, "gallery.ann_code_dims"),
    ({"gallery": {"ann_min_items": -1}}, "gallery.ann_min_items"),
    ({"train": {"device": "gpu"}}, "train.device"),
])
def test_gallery_bad_params_give_one_line_errors(trained: Path, tmp_path: Path, overrides: dict, names: str):
    write_params(tmp_path, overrides)
    rc, _, err = call(tmp_path, *gallery_args(trained))
    assert names in one_line_error(rc, err, "gallery")
    assert not (tmp_path / "gallery").exists() and not (tmp_path / "cache").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gallery_on_cuda_without_cuda_names_the_param(trained: Path, tmp_path: Path):
    write_params(tmp_path, {"train": {"device": "cuda"}})
    rc, _, err = call(tmp_path, *gallery_args(trained))
    assert "train.device" in one_line_error(rc, err, "gallery")
