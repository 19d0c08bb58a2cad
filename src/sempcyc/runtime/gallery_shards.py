"""The gallery as the archive and a serving host hold it: manifest.json and content-addressed shard files.

The gallery stage puts each class in one of `buckets` by a stable hash of its name; each non-empty bucket is one
shard file, shards/<sha256 of its bytes>.npz, holding that bucket's embeddings, item ids and classes, and the
sketch page's thumbnails of its items. Adding classes therefore changes only the shards they hash into (and the
manifest): a host that already has the others keeps them. manifest.json names the model's sha256 and every shard
with its sha256; each file is verified when loaded, and a missing or damaged one refuses the whole gallery, never
serving part of it.

A file is looked up in the gallery folder first (a full archive carries everything), then by its sha256 in a blob
store (a deployed slim archive's serving.json names its host's).

The shards hold each image's own embedding. With the model's gallery_expansion k > 0 the manifest also names
"neighbours" (file, sha256, k): each item's k nearest items, by position in manifest order, with which the loader
replaces every embedding by retrieval.expand_gallery's weighted mean. Kept apart from the shards, because new
classes change some old items' neighbours: a release sends this one small file again (4 bytes a neighbour), not
every shard such an item is in.

A large gallery also has an approximate index (runtime/ann.py's faiss file, manifest "index": file, sha256,
gallery_digest, the faiss version and the index's parameters), built for the expanded vectors of exactly these
shards and neighbours in this order (`vectors_digest`). Its loader keeps no copy of the vectors: `shard_files`
says where each shard's embeddings lie in its file (shards are stored uncompressed), and runtime/served_vectors.py
reads them from there through memory maps.
"""
from __future__ import annotations

import hashlib
import io
import json
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .retrieval import expand_gallery

# The one place that says how embeddings are stored; the search computes in float32 whatever this is.
EMBEDDING_DTYPE = np.float32
MANIFEST = "manifest.json"
SHARD_DIR = "shards"
SHARD_ARRAYS = ("embeddings", "labels", "names", "thumbs", "thumb_offsets")
ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # every member's timestamp: equal content gives equal bytes


class GalleryError(Exception):
    """A gallery file is missing or damaged; the message names it and says what to do."""


@dataclass(frozen=True)
class ShardFile:
    """Where a verified shard's embeddings lie: in `path` (the gallery folder's copy or the blob store's), `rows`
    vectors of `dtype`, C order, from byte `offset` on."""
    path: Path
    offset: int
    rows: int
    dtype: str


def bucket_of(class_name: str, buckets: int) -> int:
    """The shard bucket of a class: a hash of its name only, so adding a class never moves another one."""
    return int.from_bytes(hashlib.sha256(class_name.encode("utf-8")).digest()[:8], "big") % buckets


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def gallery_digest(model_sha256: str, shard_sha256s: list[str]) -> str:
    """What identifies a gallery's vectors and their order: the model's sha256 and its files' sha256s in manifest
    order (vectors_digest: the shards, then the neighbours)."""
    return sha256_bytes("\n".join(["sem-pcyc gallery", model_sha256, *shard_sha256s]).encode("utf-8"))


def vectors_digest(manifest: dict) -> str:
    """gallery_digest of a manifest's model, shards and (when it has them) neighbours: what its served vectors
    are made of. The gallery stage builds its approximate index (manifest "index") for this digest."""
    parts = [shard["sha256"] for shard in manifest["shards"]]
    return gallery_digest(manifest["model_sha256"], parts + [manifest["neighbours"]["sha256"]]
                          if manifest.get("neighbours") else parts)


def side_files(manifest: dict) -> list[dict]:
    """The manifest's entries for files beside the shards: the neighbours and the approximate index, if any."""
    return [manifest[key] for key in ("neighbours", "index") if manifest.get(key)]


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An .npz (np.load reads it) with fixed member order, timestamps and no compression: deterministic bytes,
    unlike np.savez, which stamps each member with the current time."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=ZIP_TIME)
            info.create_system, info.external_attr = 3, 0o644 << 16
            zf.writestr(info, member.getvalue())
    return buf.getvalue()


def pack_shard(embeddings: np.ndarray, ids: list[str], classes: list[str], thumbs: list[bytes | None]) -> bytes:
    """One shard's bytes: embeddings (EMBEDDING_DTYPE), ids and classes (UTF-8 JSON, classes as labels into its
    own class list), and the thumbnails concatenated with [start, length] per item (length 0: none)."""
    names = list(dict.fromkeys(classes))
    label_of = {name: i for i, name in enumerate(names)}
    offsets, start = [], 0
    for thumb in thumbs:
        offsets.append([start, len(thumb or b"")])
        start += len(thumb or b"")
    text = json.dumps({"classes": names, "ids": list(ids)}, ensure_ascii=False, separators=(",", ":"))
    return npz_bytes({
        "embeddings": np.ascontiguousarray(embeddings, dtype=EMBEDDING_DTYPE),
        "labels": np.array([label_of[c] for c in classes], dtype=np.int32),
        "names": np.frombuffer(text.encode("utf-8"), dtype=np.uint8),
        "thumbs": np.frombuffer(b"".join(t or b"" for t in thumbs), dtype=np.uint8),
        "thumb_offsets": np.array(offsets, dtype=np.int64).reshape(-1, 2),
    })


def unpack_shard(data: bytes, label: str) -> dict:
    """A shard's embeddings, ids, classes and thumbnails (id -> bytes) from its bytes."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in SHARD_ARRAYS}
        names = json.loads(arrays["names"].tobytes().decode("utf-8"))
        classes = [names["classes"][i] for i in arrays["labels"].tolist()]
        ids = names["ids"]
    except (OSError, ValueError, KeyError, IndexError, zipfile.BadZipFile) as exc:
        raise GalleryError(f"{label}: not a gallery shard ({exc}); rebuild the gallery (`dvc repro gallery`)") \
            from None
    if not len(ids) == len(classes) == len(arrays["embeddings"]) == len(arrays["thumb_offsets"]):
        raise GalleryError(f"{label}: its ids, classes and embeddings differ in length; rebuild the gallery")
    blob = arrays["thumbs"].tobytes()
    thumbs = {i: blob[s:s + n] for i, (s, n) in zip(ids, arrays["thumb_offsets"].tolist()) if n}
    return {"embeddings": arrays["embeddings"], "ids": ids, "classes": classes, "thumbs": thumbs}


def read_manifest(gallery_dir: Path) -> dict:
    path = Path(gallery_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GalleryError(f"{path}: not found; a gallery is manifest.json + shards/ (run `dvc repro gallery`, "
                           "then `dvc repro archive`)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GalleryError(f"{path}: not valid JSON ({exc}); run `dvc repro gallery`") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise GalleryError(f"{path}: not a gallery manifest (no shard list); run `dvc repro gallery`")
    return manifest


def locate(local: Path, sha256: str, blob_store: str | Path | None, label: str) -> Path:
    """`local` if it is there (a full archive), else the blob store's copy named by its sha256."""
    if local.is_file():
        return local
    if blob_store:
        stored = Path(blob_store) / sha256
        if stored.is_file():
            return stored
        raise GalleryError(f"{label} (sha256 {sha256[:12]}…) is neither in {local.parent} nor in the blob store "
                           f"{blob_store}; deploy again (it re-sends missing files) or serve the full archive")
    raise GalleryError(f"{label}: {local} is missing; rebuild the archive (`dvc repro archive`)")


def read_verified(local: Path, sha256: str, blob_store: str | Path | None, label: str) -> bytes:
    """The bytes of a gallery file, checked against the manifest's sha256."""
    path = locate(local, sha256, blob_store, label)
    data = path.read_bytes()
    _check(sha256_bytes(data), sha256, path, label)
    return data


def verified_path(local: Path, sha256: str, blob_store: str | Path | None, label: str, advice: str = "") -> Path:
    """Where a large file (the model) is, after checking its sha256 (read in chunks); `advice` replaces the
    mismatch error's default advice."""
    path = locate(local, sha256, blob_store, label)
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            h.update(chunk)
    _check(h.hexdigest(), sha256, path, label, advice)
    return path


def _check(got: str, want: str, path: Path, label: str, advice: str = "") -> None:
    if got != want:
        raise GalleryError(f"{label} ({path}) has sha256 {got[:12]}…, not the manifest's {want[:12]}…; nothing was "
                           "loaded. " + (advice or "The file is damaged: deploy again (it re-sends damaged files) "
                                                   "or rebuild the archive"))


def load_gallery(gallery_dir: str | Path, blob_store: str | Path | None = None) -> tuple[dict, np.ndarray, list]:
    """(manifest, embeddings, index entries {"id", "class"}) of every shard, in manifest order; a missing or
    damaged shard raises GalleryError naming it (never a partial gallery)."""
    gallery_dir = Path(gallery_dir)
    manifest = read_manifest(gallery_dir)
    parts, index = [], []
    for _, _, shard in verified_shards(gallery_dir, manifest, blob_store):
        parts.append(shard["embeddings"])
        index += [{"id": i, "class": c} for i, c in zip(shard["ids"], shard["classes"])]
    check_items(gallery_dir, manifest, len(index))
    dim = int(manifest.get("dim", 0))
    embeddings = np.concatenate(parts) if parts else np.zeros((0, dim), dtype=EMBEDDING_DTYPE)
    if manifest.get("neighbours"):
        embeddings = expand_gallery(embeddings, load_neighbours(gallery_dir, manifest, blob_store))
    return manifest, embeddings, index


def shard_files(gallery_dir: str | Path, manifest: dict, blob_store: str | Path | None = None
                ) -> tuple[list[ShardFile], list[dict]]:
    """load_gallery without the vectors: where every shard's embeddings lie (ShardFile, in manifest order) and the
    index entries; each shard verified against its sha256 as load_gallery verifies it."""
    gallery_dir = Path(gallery_dir)
    files, index = [], []
    for path, data, shard in verified_shards(gallery_dir, manifest, blob_store):
        offset, rows, dtype = embeddings_span(data, path)
        files.append(ShardFile(path, offset, rows, dtype))
        index += [{"id": i, "class": c} for i, c in zip(shard["ids"], shard["classes"])]
    check_items(gallery_dir, manifest, len(index))
    return files, index


def verified_shards(gallery_dir: Path, manifest: dict, blob_store: str | Path | None):
    """(path, bytes, unpacked shard) of every shard in manifest order, each checked against its sha256."""
    for entry in manifest["shards"]:
        label = f"gallery shard {entry['file']}"
        path = locate(gallery_dir / entry["file"], entry["sha256"], blob_store, label)
        data = path.read_bytes()
        _check(sha256_bytes(data), entry["sha256"], path, label)
        yield path, data, unpack_shard(data, label)


def check_items(gallery_dir: Path, manifest: dict, items: int) -> None:
    if items != manifest.get("items"):
        raise GalleryError(f"{gallery_dir / MANIFEST}: lists {manifest.get('items')} items but its shards hold "
                           f"{items}; rebuild the gallery (`dvc repro gallery`)")


def embeddings_span(data: bytes, path: Path) -> tuple[int, int, str]:
    """(byte offset, rows, dtype) of a shard's embeddings array inside the shard file's bytes `data`: the stored
    (uncompressed) zip member's data start plus its .npy header."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            info = zf.getinfo("embeddings.npy")
        name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
        start = info.header_offset + 30 + name_len + extra_len  # the local header's own lengths
        member = io.BytesIO(data[start:start + min(info.file_size, 4096)])
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}[np.lib.format.read_magic(member)]
        shape, fortran, dtype = read_header(member)
    except (KeyError, ValueError, struct.error, zipfile.BadZipFile) as exc:
        raise GalleryError(f"{path}: its embeddings cannot be read in place ({exc}); rebuild the gallery") from None
    if info.compress_type != zipfile.ZIP_STORED or fortran or len(shape) != 2:
        raise GalleryError(f"{path}: its embeddings are not stored as one uncompressed array; rebuild the gallery")
    return start + member.tell(), int(shape[0]), dtype.str


def load_neighbours(gallery_dir: Path, manifest: dict, blob_store: str | Path | None) -> np.ndarray:
    """The manifest's neighbours file, verified: integer positions in [0, items), one row of k per item."""
    entry = manifest["neighbours"]
    label = f"gallery neighbours {entry['file']}"
    data = read_verified(gallery_dir / entry["file"], entry["sha256"], blob_store, label)
    try:
        neighbours = np.load(io.BytesIO(data), allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise GalleryError(f"{label}: not a .npy array ({exc}); rebuild the gallery (`dvc repro gallery`)") \
            from None
    items = manifest["items"]
    if (neighbours.dtype.kind not in "iu" or neighbours.shape != (items, entry.get("k"))
            or (neighbours.size and not 0 <= neighbours.min() <= neighbours.max() < items)):
        raise GalleryError(f"{label}: not {items} rows of {entry.get('k')} item positions; rebuild the gallery "
                           "(`dvc repro gallery`)")
    return neighbours
