"""git and dvc from Python for the release and report commands: running them with one-line errors, and the
release tags (GTO's `sem-pcyc@vX.Y.Z` format)."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

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
