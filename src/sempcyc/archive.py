"""archive stage: models/sem_pcyc.mar, a self-contained TorchServe archive.

Contents (archive root): handler.py; sem_pcyc_runtime/ (copies of imaging, retrieval, backbones, model, encoder,
search: everything the handler imports, under a name that cannot clash with the installed `sempcyc`);
sem_pcyc.pt (model bundle); gallery/ (embeddings + index); serving.json (top-k, version, limits).
torch-model-archiver stages files in $TMPDIR/<model-name>, so it runs with a private TMPDIR: two archivings at
once never collide.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from . import params as params_mod
from .errors import UserError
from .fsutil import dumps_json

HELP = "Package model, gallery and handler into a self-contained TorchServe .mar (version = release.version)."
RUNTIME_PACKAGE = "sem_pcyc_runtime"
RUNTIME_MODULES = ("imaging", "retrieval", "backbones", "model", "encoder", "search")
SEMVER = re.compile(r"^\d+\.\d+\.\d+([.-][0-9A-Za-z.-]+)?$")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="models/sem_pcyc.pt", help="model bundle (default: %(default)s)")
    parser.add_argument("--gallery", default="models/gallery", help="gallery folder (default: %(default)s)")
    parser.add_argument("--metrics", default="reports/eval/metrics.json",
                        help="evaluation metrics recorded in the archive (default: %(default)s)")
    parser.add_argument("--out", default="models/sem_pcyc.mar", help="archive path (default: %(default)s)")


def read_settings(params: dict) -> dict:
    rel = params_mod.Section(params, "release")
    serve = params_mod.Section(params, "serve")
    version = rel.get("version", "0.0.0")
    if isinstance(version, (int, float)) and not isinstance(version, bool):
        version = str(version)
    if not isinstance(version, str) or not SEMVER.match(version):
        raise UserError(f"params.yaml: release.version must look like 1.2.3, got {version!r}")
    name = rel.str("model_name", "sem_pcyc")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", name):
        raise UserError(f"params.yaml: release.model_name must be letters, digits, '_' or '-', got {name!r}")
    return {"version": version, "model_name": name,
            "top_k": serve.int("top_k", 30, min=1, max=10_000),
            "max_pixels": serve.int("max_pixels", 16_000_000, min=10_000),
            "threads": serve.int("threads", 0, min=0)}


def stage_files(stage: Path, model: Path, gallery: Path, settings: dict, metrics: Path | None = None) -> None:
    """Lay out everything the archive holds in `stage` (becomes the archive root)."""
    src = Path(__file__).resolve().parent
    runtime = stage / RUNTIME_PACKAGE
    runtime.mkdir(parents=True)
    (runtime / "__init__.py").write_text('"""Copy of the sempcyc modules the TorchServe handler needs."""\n')
    for name in RUNTIME_MODULES:
        shutil.copy2(src / f"{name}.py", runtime / f"{name}.py")
    shutil.copy2(model, stage / "sem_pcyc.pt")
    (stage / "gallery").mkdir()
    for name in ("embeddings.npy", "index.json", "meta.json"):
        shutil.copy2(gallery / name, stage / "gallery" / name)
    (stage / "serving.json").write_text(dumps_json({
        "model_name": settings["model_name"], "version": settings["version"], "top_k": settings["top_k"],
        "max_pixels": settings["max_pixels"], "threads": settings["threads"],
        "metrics": _headline_metrics(metrics)}))


def _headline_metrics(metrics: Path | None) -> dict:
    """The evaluation figures of this model, carried in the archive so a host can tell what a version is worth."""
    if metrics is None or not metrics.exists():
        return {}
    report = json.loads(metrics.read_text(encoding="utf-8"))
    return {setting: {k: round(v, 4) for k, v in report[setting]["sem_pcyc"].items()}
            for setting in ("zero_shot", "generalised") if setting in report}


def build_archive(model: Path, gallery: Path, out: Path, settings: dict, metrics: Path | None = None) -> Path:
    for path, stage_name in ((model, "train"), (gallery / "embeddings.npy", "gallery")):
        if not path.exists():
            raise UserError(f"{path}: not found; run `dvc repro {stage_name}`")
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
        stage_files(stage, model, gallery, settings, metrics)
        handler = Path(__file__).resolve().parent / "handler.py"
        cmd = [str(archiver), "--model-name", settings["model_name"], "--version", settings["version"],
               "--handler", str(handler), "--extra-files", str(stage), "--export-path", str(export), "--force"]
        proc = subprocess.run(cmd, env=dict(os.environ, TMPDIR=str(private_tmp)), capture_output=True, text=True)
        produced = export / f"{settings['model_name']}.mar"
        if proc.returncode != 0 or not produced.exists():
            raise UserError(f"torch-model-archiver failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(f".{out.name}.partial")
        shutil.move(str(produced), partial)
        os.replace(partial, out)
    return out


def run(args: argparse.Namespace) -> None:
    settings = read_settings(params_mod.load(getattr(args, "params", "params.yaml")))
    out = build_archive(Path(args.model), Path(args.gallery), Path(args.out), settings, Path(args.metrics))
    print(f"archive: {settings['model_name']} v{settings['version']} ({out.stat().st_size / 1e6:.1f} MB) -> {out}")
