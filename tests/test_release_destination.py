"""The release's first line says where it will publish, before it checks or runs anything: the git remote and
branch, and the DVC remote (a fresh clone's `origin` is pushed to; nobody should learn that afterwards)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import REPO, VENV_BIN, dvc_env

pytestmark = pytest.mark.integration


def release(proj: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "sempcyc"), "release", "--no-deploy", *args], cwd=proj, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def clone(tmp_path: Path) -> tuple[Path, dict]:
    """A clone of a bare origin, with a local DVC remote and an uncommitted change (so preflight stops it)."""
    env = dvc_env(tmp_path)
    origin, proj = tmp_path / "origin.git", tmp_path / "proj"
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", str(origin)], check=True, env=env)
    subprocess.run(["git", "clone", "-q", str(origin), str(proj)], check=True, env=env, capture_output=True)
    subprocess.run(["git", "checkout", "-q", "-b", "main"], cwd=proj, check=True, env=env)
    subprocess.run([str(VENV_BIN / "dvc"), "init", "-q"], cwd=proj, check=True, env=env)
    subprocess.run([str(VENV_BIN / "dvc"), "remote", "add", "-d", "store", str(tmp_path / "dvc-store")], cwd=proj,
                   check=True, env=env)
    shutil.copy(REPO / "params.yaml", proj / "params.yaml")
    subprocess.run(["git", "add", "-A"], cwd=proj, check=True, env=env)
    subprocess.run(["git", "commit", "-qm", "init"], cwd=proj, check=True, env=env)
    (proj / "notes.txt").write_text("a person's change\n")
    subprocess.run(["git", "add", "notes.txt"], cwd=proj, check=True, env=env)
    return proj, env


def test_the_first_line_names_the_git_remote_branch_and_dvc_remote(clone):
    proj, env = clone
    proc = release(proj, env)
    first = proc.stdout.splitlines()[0]
    assert first == (f"release: will push branch main and its release tag to git remote origin "
                     f"({proj.parent / 'origin.git'}), and the data to DVC remote store ({proj.parent / 'dvc-store'})")
    assert proc.returncode == 1 and "uncommitted changes (notes.txt)" in proc.stderr  # nothing ran after it


def test_no_push_says_nothing_will_be_pushed(clone):
    proj, env = clone
    proc = release(proj, env, "--no-push")
    assert proc.stdout.splitlines()[0] == "release: releasing branch main here (--no-push): nothing will be pushed"


def test_credentials_in_the_remote_url_are_not_printed(clone):
    proj, env = clone
    subprocess.run(["git", "remote", "set-url", "origin", "https://ci:s3cret-token@git.example.com/ml/sem.git"],
                   cwd=proj, check=True, env=env)
    first = release(proj, env).stdout.splitlines()[0]
    assert "git remote origin (https://git.example.com/ml/sem.git)" in first and "s3cret" not in first
