"""Shared test helpers (plain functions and constants; fixtures live in conftest.py): tiny datasets built in the
test, params files, and running the CLI the way dvc.yaml does."""
from __future__ import annotations

import contextlib
import copy
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw

from sempcyc import cli
from sempcyc.params import read_section
from sempcyc.serving import ReleaseSettings, ServeSettings
from sempcyc.split import hash_unit
from sempcyc.stages import archive

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

# 12 classes whose letter sums differ, so class_files() draws different pictures for each; with the default salt
# and test_fraction 0.2 the hash split puts 3 of them (bear, dog, guitar) on the unseen side.
CLASSES = ["apple", "bear", "car", "dog", "egg", "fish", "guitar", "house", "igloo", "kite", "moon", "owl"]
PER_CLASS = 4
SALT, TEST_FRACTION = "sem-pcyc", 0.2

# The tiny pipeline: the repository's params.yaml (every setting) with small data, a tiny CNN and few iterations.
TINY = {
    "data": {"tar": "ds.tar"},
    "split": {"test_fraction": TEST_FRACTION, "val_fraction": 0.15, "salt": SALT, "test_classes_file": ""},
    "prepare": {"size": 32},
    "model": {"backbone": "tiny", "backbone_weights": "", "invert_sketch": True, "photo_edges": True,
              "thicken_lines": 3, "dim_out": 16,
              "preset": "tuned", "overrides": {}},
    "features": {"tune_blocks": 0, "epochs": 1, "lr": 0.0001, "head_lr": 0.001, "batch_size": 8, "proj_dim": 24,
                 "seed": 0},
    "train": {"device": "cpu", "epochs": 2, "iters_per_epoch": 3, "batch_size": 8, "lr": 0.0001, "milestones": [],
              "gamma": 0.1, "patience": 5, "feature_norm": "standardize", "feature_dim": 0, "feature_whiten": 0.0,
              "feature_noise": 0.0, "threads": 1, "seed": 0},
    "evaluate": {"seed": 0, "grid_queries": 3},
    "gallery": {"batch_size": 16},
}


# The tiny pipeline as overrides of the repository's params.yaml, for tests that run the real `dvc repro`.
PIPELINE_OVERRIDES = {
    "data": {"tar": "data/ds.tar"},
    "split": {"test_fraction": TEST_FRACTION, "salt": SALT, "val_fraction": 0.15, "test_classes_file": ""},
    "prepare": {"size": 32},
    "model": {"backbone": "tiny", "dim_out": 16},
    "features": {"tune_blocks": 2, "tune_epochs": 1, "batch_size": 8},  # the default way: shared tuned blocks
    "train": {"device": "cpu", "epochs": 2, "iters_per_epoch": 3, "batch_size": 8, "feature_dim": 8},
    "evaluate": {"grid_queries": 3},
    "gallery": {"batch_size": 16},
}


def repo_params() -> dict:
    """The repository's params.yaml: every section, every key."""
    return yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))


def png_bytes(seed: int, size: int = 48, mode: str = "RGB") -> bytes:
    """A small image that differs per seed: a coloured ellipse (image) or a black outline (sketch)."""
    rng = np.random.default_rng(seed)
    if mode == "L":
        img = Image.new("L", (size, size), 255)
        ImageDraw.Draw(img).ellipse(sketch_box(seed, size), outline=0, width=2)
    else:
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        img = Image.new("RGB", (size, size), (255, 255, 255))
        ImageDraw.Draw(img).ellipse([4, 4, size - int(rng.integers(5, 20)), size - 4], fill=colour)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def sketch_box(seed: int, size: int = 48) -> list[int]:
    """The bounding box [x0, y0, x1, y1] of the ellipse outline png_bytes(seed, size, mode="L") draws (2 px wide)."""
    rng = np.random.default_rng(seed)
    xs, ys = sorted(rng.integers(2, size - 2, 2)), sorted(rng.integers(2, size - 2, 2))
    return [int(xs[0]), int(ys[0]), int(xs[1]) + 1, int(ys[1]) + 1]


def class_files(classes: dict[str, tuple[int, int]], seed: int = 0) -> dict[str, bytes]:
    """{member path: bytes} for classes -> (n_images, n_sketches), under top folder 'ds'."""
    files = {}
    for cls, (n_img, n_sk) in sorted(classes.items()):
        base = sum(map(ord, cls)) * 100 + seed
        for i in range(n_img):
            files[f"ds/images/{cls}/{i:03d}.png"] = png_bytes(base + i)
        for i in range(n_sk):
            files[f"ds/sketches/{cls}/{i:03d}.png"] = png_bytes(base + 50 + i, mode="L")
    return files


def write_tar(path: Path, files: dict[str, bytes], extra: list[tarfile.TarInfo] | None = None,
              dirs: list[str] = ()) -> Path:
    """A deterministic tar of `files`; `extra` adds hand-made members (links, devices, ...)."""
    with tarfile.open(path, "w") as tar:
        for name in dirs:
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
        for info in extra or []:
            tar.addfile(info)
    return path


def run_cli(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run the installed `sempcyc` console command the way dvc.yaml does."""
    env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run([str(VENV_BIN / "sempcyc"), *args], cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"sempcyc {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def dvc_env(tmp_path: Path) -> dict[str, str]:
    return dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", DVC_NO_ANALYTICS="1",
                DVC_SITE_CACHE_DIR=str(tmp_path / "dvc-site-cache"), GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
                GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")


def merged(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and value:
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


PARAMS = merged(repo_params(), TINY)


def write_params(folder: Path, overrides: dict | None = None, name: str = "params.yaml") -> Path:
    """A complete params file: the tiny pipeline's params with `overrides` merged in."""
    path = folder / name
    path.write_text(yaml.safe_dump(merged(PARAMS, overrides or {}), sort_keys=False), encoding="utf-8")
    return path


def call(cwd: Path, *argv) -> tuple[int, str, str]:
    """`sempcyc <argv>` in this process, in `cwd`: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    before = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli.main([str(a) for a in argv])
    finally:
        os.chdir(before)
    return rc, out.getvalue(), err.getvalue()


def ok(cwd: Path, *argv) -> str:
    rc, out, err = call(cwd, *argv)
    assert rc == 0, f"sempcyc {' '.join(map(str, argv))} -> {rc}\n{out}\n{err}"
    return out


def one_line_error(rc: int, err: str, stage: str) -> str:
    """The stage failed the way a user error should: exit 1 and exactly one line, no traceback."""
    assert rc == 1, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"sempcyc {stage}: error: "), err
    return lines[0]


def new_unseen_class(taken: list[str]) -> str:
    """A new class name the hash split puts on the unseen side, drawn differently from every taken class."""
    sums = {sum(map(ord, c)) for c in taken}
    for name in ("jeep", "nose", "star", "lamp", "tulip", "zebra", "violin", "anchor", "bucket", "candle"):
        if name not in taken and sum(map(ord, name)) not in sums and hash_unit(name, SALT) < TEST_FRACTION:
            return name
    raise AssertionError("no candidate class lands on the unseen side")


def build_tiny_model(root: Path, params: dict) -> tuple[Path, Path]:
    """The tiny pipeline up to the gallery, in this process, in `root` (ds.tar of CLASSES and `params` written
    there): extract -> semantic -> prepare -> features -> train -> gallery. (model bundle, gallery folder)."""
    write_tar(root / "ds.tar", class_files({c: (PER_CLASS, PER_CLASS) for c in CLASSES}))
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    for name in ("extract", "semantic", "prepare", "features", "train", "gallery"):
        ok(root, name)
    return root / "models/sem_pcyc.pt", root / "models/gallery"


def build_tiny_archive(model: Path, gallery: Path, out: Path, params: dict, metrics: Path | None = None) -> Path:
    """The archive stage's .mar of `model` and `gallery`, with the release and serve sections of `params`."""
    return archive.build_archive(model, gallery, out, read_section(params, ReleaseSettings),
                                 read_section(params, ServeSettings), metrics)
