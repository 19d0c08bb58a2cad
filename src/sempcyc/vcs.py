"""git and dvc from Python for the release and report commands: running them with one-line errors, the release
tags (GTO's `sem-pcyc@vX.Y.Z` format), the project's .dvc files and what a git remote holds."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from .errors import UserError

TAG_PREFIX = "sem-pcyc@v"
TAG_RE = re.compile(r"^sem-pcyc@v(\d+)\.(\d+)\.(\d+)$")


def sh(*cmd: str, check: bool = True, capture: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command; with `check`, a failure is a UserError quoting the command and the end of its output."""
    proc = subprocess.run(list(cmd), capture_output=capture, text=True, env=env)
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout or "").strip()[-1500:] if capture else ""
        raise UserError(f"`{' '.join(shlex.quote(c) for c in cmd)}` failed ({proc.returncode})"
                        + (f":\n{detail}" if detail else ""))
    return proc


def dvc(*args: str, capture: bool = True, check: bool = True) -> subprocess.CompletedProcess:
    """The dvc of this Python environment (or of PATH), so a release runs the pipeline with the same install."""
    exe = Path(sys.executable).parent / "dvc"
    return sh(str(exe if exe.exists() else "dvc"), *args, capture=capture, check=check)


def parse_tags(tags: list[str]) -> list[tuple[int, int, int]]:
    """The release versions among `tags`, oldest first."""
    return sorted(tuple(int(g) for g in m.groups()) for t in tags if (m := TAG_RE.match(t.strip())))


def tag_of(version: tuple[int, int, int]) -> str:
    return f"{TAG_PREFIX}{'.'.join(map(str, version))}"


def release_tags() -> list[str]:
    return sh("git", "tag", "--list", f"{TAG_PREFIX}*").stdout.split()


def tags_at(ref: str) -> list[str]:
    return sh("git", "tag", "--points-at", ref).stdout.split()


def dvc_files() -> list[Path]:
    """The project's .dvc files (dvc add / dvc import), as git tracks them. Not a filesystem glob: `*.dvc` also
    matches the `.dvc/` directory itself, and a walk would descend into .venv, .git and extracted datasets."""
    out = sh("git", "ls-files", "-z", "--", "*.dvc").stdout
    return sorted(p for p in (Path(name) for name in out.split("\0") if name)
                  if p.parts[0] != ".dvc" and p.is_file())


def imported_data_files() -> list[Path]:
    """The .dvc files made by `dvc import` (they carry a `deps` entry with a `repo`)."""
    found = []
    for path in dvc_files():
        try:
            meta = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            continue
        if any(isinstance(d, dict) and "repo" in d for d in meta.get("deps", [])):
            found.append(path)
    return sorted(found)


def remote_tags(remote: str) -> dict[str, str]:
    """tag -> the commit it points at (annotated tags peeled) on the git remote."""
    found: dict[str, str] = {}
    for line in sh("git", "ls-remote", "--tags", remote).stdout.splitlines():
        sha, _, ref = line.partition("\t")
        name = ref[len("refs/tags/"):]
        if name.endswith("^{}"):
            found[name[:-3]] = sha
        else:
            found.setdefault(name, sha)
    return found


def remote_commits_missing(remote: str, branch: str) -> int:
    """How many commits of remote/branch this checkout's HEAD lacks (0 when the branch is not there yet)."""
    line = sh("git", "ls-remote", "--heads", remote, f"refs/heads/{branch}").stdout.split()
    if not line:
        return 0
    sha = line[0]
    if sh("git", "cat-file", "-e", f"{sha}^{{commit}}", check=False).returncode != 0:
        sh("git", "fetch", "--quiet", remote, f"refs/heads/{branch}")
    return int(sh("git", "rev-list", "--count", f"HEAD..{sha}").stdout.strip() or 0)
