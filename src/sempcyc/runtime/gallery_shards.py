"""The gallery as the archive and a serving host hold it: manifest.json and content-addressed shard files.

The gallery stage puts each class in one of `buckets` by a stable hash of its name; each non-empty bucket is one
shard file, shards/<sha256 of its bytes>.npz, holding that bucket's embeddings, item ids and classes, and the
sketch page's thumbnails of its items. Adding classes therefore changes only the shards they hash into (and the
manifest): a host that already has the others keeps them. manifest.json names the model's sha256 and every shard
with its sha256; each file is verified when loaded, and a missing or damaged one refuses the whole gallery, never
serving part of it.

A file is looked up in the gallery folder first (a full archive carries everything), then by its sha256 in a blob
store (a deployed slim archive's serving.json names its host's).

A large gallery also has an approximate index (runtime/ann.py's IVF file, manifest "index": file, sha256, nlist and
gallery_digest), built for the vectors of exactly these shards in this order (`gallery_digest`).
"""
from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np

# The one place that says how embeddings are stored; the search computes in float32 whatever this is.
EMBEDDING_DTYPE = np.float32
MANIFEST = "manifest.json"
SHARD_DIR = "shards"
SHARD_ARRAYS = ("embeddings", "labels", "names", "thumbs", "thumb_offsets")
ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # every member's timestamp: equal content gives equal bytes


class GalleryError(Exception):
    """A gallery file is missing or damaged; the message names it and says what to do."""


def bucket_of(class_name: str, buckets: int) -> int:
    """The shard bucket of a class: a hash of its name only, so adding a class never moves another one."""
    return int.from_bytes(hashlib.sha256(class_name.encode("utf-8")).digest()[:8], "big") % buckets


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def gallery_digest(model_sha256: str, shard_sha256s: list[str]) -> str:
    """What identifies a gallery's vectors and their order: the model's sha256 and its shards' sha256s in manifest
    order. The gallery stage builds its approximate index (manifest "index") for this digest; a loader recomputes it
    from the manifest, `gallery_digest(manifest["model_sha256"], [s["sha256"] for s in manifest["shards"]])`."""
    return sha256_bytes("\n".join(["sem-pcyc gallery", model_sha256, *shard_sha256s]).encode("utf-8"))


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
    for entry in manifest["shards"]:
        label = f"gallery shard {entry['file']}"
        shard = unpack_shard(read_verified(gallery_dir / entry["file"], entry["sha256"], blob_store, label), label)
        parts.append(shard["embeddings"])
        index += [{"id": i, "class": c} for i, c in zip(shard["ids"], shard["classes"])]
    if len(index) != manifest.get("items"):
        raise GalleryError(f"{gallery_dir / MANIFEST}: lists {manifest.get('items')} items but its shards hold "
                           f"{len(index)}; rebuild the gallery (`dvc repro gallery`)")
    dim = int(manifest.get("dim", 0))
    embeddings = np.concatenate(parts) if parts else np.zeros((0, dim), dtype=EMBEDDING_DTYPE)
    return manifest, embeddings, index
