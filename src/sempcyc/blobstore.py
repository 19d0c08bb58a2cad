"""A host's blob store, as deploy fills it: the archive's large files stored once by sha256, and the slim archive
that refers to them.

The archive stage's .mar is self-contained (model, gallery manifest and shards). Deploy sends each host a slim copy
instead: the same code, serving.json and gallery manifest, without the large files (sem_pcyc.pt and the gallery
shards), and with `blob_store` (that host's folder) added to serving.json; the handler finds what the archive
lacks there, by the sha256 the manifest names. The large files go into the blob store once: a release that keeps
the model and most shards sends only the new shards and the slim archive. Each deployed archive has a list of the
blobs it uses beside them (`<archive name>.blobs`), so retention can remove the blobs no kept version uses.

Everything here is local and pure (what to send, what to keep, the slim archive's bytes); deploy.py talks to the
host.
"""
from __future__ import annotations

import hashlib
import json
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .fsutil import dumps_json
from .runtime.gallery_shards import MANIFEST, SHARD_DIR, ZIP_TIME

MODEL_MEMBER = "sem_pcyc.pt"
MANIFEST_MEMBER = f"gallery/{MANIFEST}"
SHARD_PREFIX = f"gallery/{SHARD_DIR}/"
REFS_SUFFIX = ".blobs"
PARTIAL = ".partial-"
BLOB_NAME = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Blob:
    member: str    # its name in the full archive (sem_pcyc.pt, gallery/shards/<sha256>.npz)
    sha256: str    # its name in the blob store
    size: int


def archive_blobs(mar: Path) -> list[Blob]:
    """The large files of a full archive: the model and every shard its gallery manifest lists, each checked
    against the manifest's sha256 here (a damaged archive is refused before anything is sent)."""
    try:
        with zipfile.ZipFile(mar) as zf:
            manifest = json.loads(zf.read(MANIFEST_MEMBER))
            wanted = [(MODEL_MEMBER, manifest["model_sha256"])]
            wanted += [(f"gallery/{entry['file']}", entry["sha256"]) for entry in manifest["shards"]]
            blobs = [Blob(member, sha, zf.getinfo(member).file_size) for member, sha in wanted]
            for blob in blobs:
                if member_sha256(zf, blob.member) != blob.sha256:
                    raise UserError(f"{mar}: {blob.member} is damaged (not the sha256 in {MANIFEST_MEMBER}); run "
                                    "`dvc repro archive`")
    except (zipfile.BadZipFile, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise UserError(f"{mar}: not an archive with a sharded gallery ({exc}); run `dvc repro archive`") from None
    return list({b.sha256: b for b in blobs}.values())


def member_sha256(zf: zipfile.ZipFile, member: str) -> str:
    h = hashlib.sha256()
    with zf.open(member) as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def left_out(name: str) -> bool:
    """Whether the slim archive leaves this member of the full one out (it is a blob)."""
    return name == MODEL_MEMBER or name.startswith(SHARD_PREFIX)


def write_slim_archive(mar: Path, blob_store: str, out: Path) -> Path:
    """The slim archive of `mar` for a host whose blob store is `blob_store`: every member but the blobs, in name
    order, stored uncompressed with fixed timestamps (the same inputs give the same bytes on any machine, so a
    redeploy finds the host's copy identical), serving.json gaining `blob_store`."""
    with zipfile.ZipFile(mar) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for item in sorted(src.infolist(), key=lambda i: i.filename):
            if left_out(item.filename) or item.is_dir():
                continue
            data = src.read(item.filename)
            if item.filename == "serving.json":
                data = dumps_json({**json.loads(data), "blob_store": blob_store}).encode("utf-8")
            info = zipfile.ZipInfo(item.filename, date_time=ZIP_TIME)
            info.create_system, info.external_attr = 3, item.external_attr
            dst.writestr(info, data)
    return out


def plan_uploads(blobs: list[Blob], on_host: dict[str, str]) -> tuple[list[tuple[Blob, str]], list[Blob]]:
    """(blobs to send, each with why: missing or damaged; blobs the host already has intact). `on_host`: blob
    name -> the sha256 of the host's file, for the files that are there."""
    send, reused = [], []
    for blob in blobs:
        got = on_host.get(blob.sha256)
        if got == blob.sha256:
            reused.append(blob)
        else:
            send.append((blob, "missing" if got is None else "damaged"))
    return send, reused


def refs_name(archive_name: str) -> str:
    """The file beside the blobs that lists the ones an archive (e.g. sem_pcyc-1.2.0.mar) uses."""
    return archive_name + REFS_SUFFIX


def refs_text(blobs: list[Blob]) -> str:
    return "".join(f"{sha}\n" for sha in sorted({b.sha256 for b in blobs}))


def unused(entries: list[str], refs: list[str]) -> list[str]:
    """What retention removes from a blob store holding `entries`, given the texts of its `.blobs` lists: blobs no
    list names, and leftovers of interrupted uploads. Anything else in the folder is left alone."""
    used = {line.strip() for text in refs for line in text.splitlines()}
    return sorted(name for name in entries
                  if (BLOB_NAME.fullmatch(name) and name not in used) or (name.startswith(".") and PARTIAL in name))
