"""Shared fixtures: tiny datasets built in the test, and a scratch DVC project that uses this checkout's code."""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


def png_bytes(seed: int, size: int = 48, mode: str = "RGB") -> bytes:
    """A small image that differs per seed: a coloured ellipse (image) or a black outline (sketch)."""
    rng = np.random.default_rng(seed)
    if mode == "L":
        img = Image.new("L", (size, size), 255)
        box = sorted(rng.integers(2, size - 2, 2)), sorted(rng.integers(2, size - 2, 2))
        ImageDraw.Draw(img).ellipse([box[0][0], box[1][0], box[0][1] + 1, box[1][1] + 1], outline=0, width=2)
    else:
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        img = Image.new("RGB", (size, size), (255, 255, 255))
        ImageDraw.Draw(img).ellipse([4, 4, size - int(rng.integers(5, 20)), size - 4], fill=colour)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def class_files(classes: dict[str, tuple[int, int]], seed: int = 0) -> dict[str, bytes]:
    """{member path: bytes} for classes -> (n_images, n_sketches), under top folder 'ds'."""
    files = {}
    for ci, (cls, (n_img, n_sk)) in enumerate(sorted(classes.items())):
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


@pytest.fixture
def tiny_classes() -> dict[str, tuple[int, int]]:
    return {f"class_{i:02d}": (3, 3) for i in range(10)}


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


@pytest.fixture
def dvc_project(tmp_path: Path):
    """A fresh git + DVC project holding a copy of this repo's pipeline files and source."""
    proj = tmp_path / "proj"
    proj.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(REPO / name, proj / name)
    shutil.copytree(REPO / "src", proj / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    env = dvc_env(tmp_path)
    subprocess.run(["git", "init", "-q"], cwd=proj, check=True, env=env)
    subprocess.run([str(VENV_BIN / "dvc"), "init", "-q"], cwd=proj, check=True, env=env)
    return proj, env


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: a second OpenMP thread only adds synchronisation (and stalls badly on a busy 2-core box)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
