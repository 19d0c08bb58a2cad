"""Shared fixtures: a scratch DVC project that uses this checkout's code, tiny class sets, one torch thread.
Plain helper functions live in helpers.py (test modules import from there, never from each other)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from threadpoolctl import threadpool_limits

from helpers import REPO, VENV_BIN, dvc_env
from hosts import start_sshd


@pytest.fixture
def tiny_classes() -> dict[str, tuple[int, int]]:
    return {f"class_{i:02d}": (3, 3) for i in range(10)}


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
    """Tiny tensors on a shared 2-core box: a second OpenMP thread only adds synchronisation (and stalls badly
    when the other core is busy). OpenBLAS too: on a busy box its threads make evaluate's ITQ (100 small SVDs)
    200x slower (10 s vs 0.05 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    with start_sshd(tmp_path_factory.mktemp("sshd")) as server:
        yield server
