"""archive stage: models/sem_pcyc.mar, a self-contained TorchServe archive.

Contents (archive root): handler.py (runtime/handler.py); sem_pcyc_runtime/ (a copy of the runtime/ package,
everything the handler imports, under a name that cannot clash with the installed `sempcyc`); sem_pcyc.pt (model
bundle); gallery/ (manifest.json and the shards it lists: embeddings, ids, and the sketch page's thumbnails, which
the handler never reads); serving.json (top-k, version, limits, the approximate search's settings, the faiss
version a host needs, evaluation metrics). The deploy stage ships a slim
copy of it to each host and the large files (model, shards) separately, by sha256.
torch-model-archiver stages files in $TMPDIR/<model-name>, so it runs with a private TMPDIR: two archivings at
once never collide. It lays the archive out as a folder (`--archive-format no-archive`, its MAR-INF/MANIFEST.json
included) and the zip is written here: members in name order, stored, fixed timestamps and a fixed `createdOn`,
so the same inputs give the same bytes on any machine (DVC and the hosts then see an unchanged archive as such).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .. import params as params_mod
from ..errors import UserError
from ..fsutil import dumps_json, sha256_file
from ..runtime import RUNTIME_DIR
from ..runtime.ann import faiss_version
from ..runtime.gallery_shards import MANIFEST, ZIP_TIME, GalleryError, read_manifest, side_files
from ..serving import ReleaseSettings, ServeSettings

RUNTIME_PACKAGE = "sem_pcyc_runtime"
MAR_MANIFEST = "MAR-INF/MANIFEST.json"
MAR_CREATED_ON = "01/01/1980 00:00:00"  # the manifest's build time, fixed like every member's timestamp


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="models/sem_pcyc.pt", help="model bundle (default: %(default)s)")
    parser.add_argument("--gallery", default="models/gallery", help="gallery folder (default: %(default)s)")
    parser.add_argument("--metrics", default="reports/eval/metrics.json",
                        help="evaluation metrics recorded in the archive (default: %(default)s)")
    parser.add_argument("--out", default="models/sem_pcyc.mar", help="archive path (default: %(default)s)")


def run(args: argparse.Namespace) -> None:
    release, serve = params_mod.read(args.params, ReleaseSettings, ServeSettings)
    out = build_archive(Path(args.model), Path(args.gallery), Path(args.out), release, serve, Path(args.metrics))
    print(f"archive: {release.model_name} v{release.version} ({out.stat().st_size / 1e6:.1f} MB) -> {out}")


def stage_files(stage: Path, model: Path, gallery: Path, release: ReleaseSettings, serve: ServeSettings,
                metrics: Path | None = None) -> None:
    """Lay out everything the archive holds in `stage` (becomes the archive root)."""
    shutil.copytree(RUNTIME_DIR, stage / RUNTIME_PACKAGE, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(model, stage / "sem_pcyc.pt")
    (stage / "gallery").mkdir()
    shutil.copy2(gallery / MANIFEST, stage / "gallery" / MANIFEST)
    manifest = read_manifest(gallery)
    for entry in [*manifest["shards"], *side_files(manifest)]:
        (stage / "gallery" / entry["file"]).parent.mkdir(exist_ok=True)
        shutil.copy2(gallery / entry["file"], stage / "gallery" / entry["file"])
    (stage / "serving.json").write_text(dumps_json({
        "model_name": release.model_name, "version": release.version, "top_k": serve.top_k,
        "max_pixels": serve.max_pixels, "threads": serve.threads, "ann_nprobe": serve.ann_nprobe,
        "ann_rerank": serve.ann_rerank, "faiss_version": faiss_version(), "metrics": _headline_metrics(metrics)}))


def _headline_metrics(metrics: Path | None) -> dict:
    """The evaluation figures of this model, carried in the archive so a host can tell what a version is worth."""
    if metrics is None or not metrics.exists():
        return {}
    report = json.loads(metrics.read_text(encoding="utf-8"))
    return {setting: {k: round(v, 4) for k, v in report[setting]["sem_pcyc"].items()}
            for setting in ("zero_shot", "generalised") if setting in report}


def check_inputs(model: Path, gallery: Path) -> None:
    """The model and a complete gallery built with that very model, or a one-line UserError."""
    if not model.exists():
        raise UserError(f"{model}: not found; run `dvc repro train`")
    try:
        manifest = read_manifest(gallery)
    except GalleryError as exc:
        raise UserError(str(exc)) from None
    if manifest.get("model_sha256") != sha256_file(model):
        raise UserError(f"{gallery / MANIFEST}: the gallery was built with another model than {model}; run "
                        "`dvc repro gallery`")
    for entry in manifest["shards"]:
        path = gallery / entry["file"]
        if not path.is_file() or sha256_file(path) != entry["sha256"]:
            why = "damaged (not the sha256" if path.is_file() else "missing (listed"
            raise UserError(f"{path}: {why} in {MANIFEST}); run `dvc repro gallery`")


def build_archive(model: Path, gallery: Path, out: Path, release: ReleaseSettings, serve: ServeSettings,
                  metrics: Path | None = None) -> Path:
    check_inputs(model, gallery)
    archiver = Path(sys.executable).parent / "torch-model-archiver"
    if not archiver.exists():
        archiver = shutil.which("torch-model-archiver")
    if not archiver:
        raise UserError("torch-model-archiver not found; run the setup (make setup)")
    with tempfile.TemporaryDirectory(prefix="sem-pcyc-archive-") as tmp:
        tmp = Path(tmp)
        stage, export, private_tmp = tmp / "stage", tmp / "export", tmp / "tmp"
        export.mkdir()
        private_tmp.mkdir()
        stage_files(stage, model, gallery, release, serve, metrics)
        cmd = [str(archiver), "--model-name", release.model_name, "--version", release.version,
               "--handler", str(RUNTIME_DIR / "handler.py"), "--extra-files", str(stage),
               "--export-path", str(export), "--archive-format", "no-archive", "--force"]
        proc = subprocess.run(cmd, env=dict(os.environ, TMPDIR=str(private_tmp)), capture_output=True, text=True)
        produced = export / release.model_name
        if proc.returncode != 0 or not (produced / MAR_MANIFEST).exists():
            raise UserError(f"torch-model-archiver failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(f".{out.name}.partial")
        try:
            write_mar(produced, partial)
            os.replace(partial, out)
        finally:
            partial.unlink(missing_ok=True)
    return out


def write_mar(folder: Path, out: Path) -> None:
    """`folder` (an archive laid out by torch-model-archiver) zipped as a .mar with deterministic bytes. Stored,
    not deflated: the large members (model, shards) are binary and barely shrink, and deploy sends them apart."""
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            name = path.relative_to(folder).as_posix()
            info = zipfile.ZipInfo(name, date_time=ZIP_TIME)
            info.create_system, info.external_attr = 3, 0o644 << 16
            info.file_size = path.stat().st_size  # zip64 records only where a member needs them
            if name == MAR_MANIFEST:  # the archiver writes the build time into it
                manifest = json.loads(path.read_text(encoding="utf-8"))
                zf.writestr(info, json.dumps({**manifest, "createdOn": MAR_CREATED_ON}, indent=2))
                continue
            with path.open("rb") as src, zf.open(info, "w") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)

