"""Bytes a deploy sends: a first (full) deploy of a 100,000-image gallery vs a release that adds 1 % new images.

Two synthetic galleries for the same model: 1,000 classes x 100 images, then the same plus 10 new classes (1,000
more images: the usual zero-shot release, no retraining). Embeddings are random vectors of the model's dimension,
thumbnails random bytes of a WebP's size (345 bytes, the demo's average) for the first gallery.thumbnail_max_items
images in index order, as the gallery stage makes them; class names are random words, so new classes fall
anywhere in the index order (moving the thumbnail boundary, as real ones do). The galleries are written by the
gallery stage's own writer (gallery.write_sharded) and archived by the archive stage (torch-model-archiver).

By default both archives are then deployed for real, one after the other, to a TorchServe "host"
behind a real sshd on 127.0.0.1 (sempcyc.testing.hosts), and the byte counts are the receipts'. With --plan-only, no
host: the byte counts come from deploy's planning functions alone (blobstore.archive_blobs + plan_uploads, given
the blobs the first release left on the host, plus the slim archive's size). Both print the ratio (goal <= 5 %).

Needs a model bundle (--model, default models/sem_pcyc.pt; any trained one works, only its bytes and dimension
matter). Usage: python bench/gallery_deploy.py [--model PATH] [--shards N] [--plan-only]
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from common import REPO, Host
from sempcyc import blobstore
from sempcyc import params as params_mod
from sempcyc.fsutil import sha256_file
from sempcyc.runtime.encoder import Encoder
from sempcyc.runtime.search import SketchSearch
from sempcyc.serving import ReleaseSettings, ServeSettings
from sempcyc.stages import archive, deploy
from sempcyc.stages.gallery import THUMB_FORMAT, GallerySettings, write_sharded
from sempcyc.testing.hosts import start_sshd

CLASSES, PER_CLASS, NEW_CLASSES, THUMB_BYTES, THUMB_ITEMS = 1000, 100, 10, 345, 20_000
SERVE = dataclasses.replace(params_mod.read(REPO / "params.yaml", ServeSettings)[0], batch_size=1, check_requests=8)


def class_names(rng: np.random.Generator, n: int) -> list[str]:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    return ["".join(rng.choice(letters, 8)) for _ in range(n)]


def write_gallery(out: Path, model: Path, enc: Encoder, dim: int, classes: list[str], shards: int) -> None:
    """A synthetic gallery of `classes` (each PER_CLASS images), as the gallery stage writes it (with the model's
    gallery_expansion: the neighbours file). An image's embedding and thumbnail depend on its id only, so both
    releases agree on the images they share."""
    classes = sorted(classes)
    items = [(c, f"{c}_{i:03d}.jpg") for c in classes for i in range(PER_CLASS)]
    embeddings = np.empty((len(items), dim), np.float32)
    thumbs = []
    for row, (cls, fname) in enumerate(items):
        rng = np.random.default_rng(list(f"{cls}/{fname}".encode()))
        embeddings[row] = rng.standard_normal(dim)
        if row < THUMB_ITEMS:
            thumbs.append(rng.bytes(THUMB_BYTES))
    meta = {"model_sha256": sha256_file(model), "items": len(items), "dim": dim, "classes": len(classes),
            "size": enc.size, "buckets": shards, "dtype": "float32",
            "thumbnails": {"format": THUMB_FORMAT, "size": 64, "items": len(thumbs)}}
    settings = dataclasses.replace(params_mod.read(REPO / "params.yaml", GallerySettings)[0], shards=shards)
    write_sharded(out, meta, items, embeddings, thumbs, settings, enc.cfg.gallery_expansion)


def build_releases(tmp: Path, model: Path, shards: int) -> dict[str, Path]:
    """The two archives: 0.1.0 (1,000 classes) and 0.2.0 (the same + 10 new classes)."""
    enc = Encoder.load(model)
    with torch.inference_mode():
        dim = int(enc.embed_images(torch.zeros(1, enc.size, enc.size, 3, dtype=torch.uint8)).shape[1])
    names = class_names(np.random.default_rng(0), CLASSES + NEW_CLASSES)
    mars = {}
    for version, classes in (("0.1.0", names[:CLASSES]), ("0.2.0", names)):
        t0 = time.perf_counter()
        write_gallery(tmp / f"gallery-{version}", model, enc, dim, classes, shards)
        release = ReleaseSettings(model_name="sem_pcyc", version=version, gate_tolerance=0.02, gate_confidence=0.95,
                                  gate_resamples=2000, gate_seed=0)
        mars[version] = archive.build_archive(model, tmp / f"gallery-{version}", tmp / f"sem_pcyc-{version}.mar",
                                              release, SERVE)
        print(f"{version}: {len(classes):,} classes x {PER_CLASS} images, archive {mars[version].stat().st_size:,} "
              f"bytes, built in {time.perf_counter() - t0:.0f} s", flush=True)
    return mars


def a_sketch() -> bytes:
    image = Image.new("L", (128, 128), 255)
    ImageDraw.Draw(image).ellipse([20, 30, 100, 110], outline=0, width=3)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def planned(mars: dict[str, Path], tmp: Path, store: str) -> dict[str, int]:
    """Bytes each deploy would send by deploy's own planning: every blob the host lacks, and the slim archive."""
    sent, on_host = {}, {}
    for version, mar in mars.items():
        blobs = blobstore.archive_blobs(mar)
        send, _ = blobstore.plan_uploads(blobs, on_host)
        slim = blobstore.write_slim_archive(mar, store, tmp / f"slim-{version}.mar")
        sent[version] = sum(b.size for b, _ in send) + slim.stat().st_size
        on_host.update({b.sha256: b.sha256 for b in blobs})
    return sent


def deployed(mars: dict[str, Path], tmp: Path, model: Path) -> dict[str, int]:
    """Bytes each deploy sent to a real host (sshd + TorchServe on 127.0.0.1), from the receipts."""
    sketch, sent = a_sketch(), {}
    (tmp / "sshd").mkdir()
    with start_sshd(tmp / "sshd") as sshd:
        host = Host(tmp / "host").start()
        try:
            for version, mar in mars.items():
                search = SketchSearch.load(model, tmp / f"gallery-{version}", top_k=SERVE.top_k,
                                           max_pixels=SERVE.max_pixels)
                expected = search.search([sketch])[0]
                t0 = time.perf_counter()
                receipt = deploy.deploy_target(host.target(sshd), deploy.checked_archive(mar), sketch, expected,
                                               len(expected))
                blobs = receipt.get("blobs") or {"sent": [], "reused": 0}
                print(f"deploy {version}: {receipt['status']} in {time.perf_counter() - t0:.1f} s, "
                      f"{receipt['bytes_sent']:,} bytes sent ({len(blobs['sent'])} blobs sent, {blobs['reused']} "
                      f"already there; slim archive {receipt['slim_archive_bytes']:,} bytes)"
                      + (f": {receipt['error']}" if receipt.get("error") else ""), flush=True)
                if receipt["status"] != "deployed":
                    raise SystemExit(1)
                sent[version] = receipt["bytes_sent"]
        finally:
            host.stop()
    return sent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "models/sem_pcyc.pt")
    (gallery,) = params_mod.read(REPO / "params.yaml", GallerySettings)
    parser.add_argument("--shards", type=int, default=gallery.shards, help="gallery.shards (default: params.yaml's, "
                        "%(default)s)")
    parser.add_argument("--plan-only", action="store_true", help="no host: deploy's planning functions only")
    args = parser.parse_args()
    if not args.model.exists():
        raise SystemExit(f"{args.model}: not found; run `dvc repro train` or pass --model")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="sem-pcyc-gallery-deploy-") as tmp:
        tmp = Path(tmp)
        mars = build_releases(tmp, args.model, args.shards)
        how = "planned (deploy's planning functions, no host)" if args.plan_only else "sent to a real sshd host"
        sent = planned(mars, tmp, "/srv/blobs") if args.plan_only else deployed(mars, tmp, args.model)
        full, release = sent["0.1.0"], sent["0.2.0"]
        print(f"gallery.shards {args.shards}, bytes {how}: full deploy {full:,}; release adding 1 % new images "
              f"{release:,} = {100 * release / full:.2f} % of the full deploy (goal <= 5 %); the whole new "
              f"archive, as deploy sent it before: {mars['0.2.0'].stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
