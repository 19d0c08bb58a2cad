"""`pip install .` gives a working package: every runtime dependency is declared in pyproject.toml.

A fresh venv here sees exactly the distributions that pyproject.toml's dependencies need (their transitive
closure, markers and extras applied), linked from this environment's pinned set, and nothing else: pip then
resolves `pip install .` against them (nothing to download, so the test costs seconds, not the 6.7 GB of a second
torch), `pip check` checks the set, and every command's --help imports its module. An import the package makes
from an undeclared distribution fails here as it would for a user."""
from __future__ import annotations

import importlib.metadata as md
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from helpers import REPO
from sempcyc import cli

pytestmark = pytest.mark.integration
# The fresh venv's processes see only what it installed: no PYTHONPATH pointing at a checkout's src/.
CLEAN_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def declared() -> list[str]:
    """pyproject.toml's dependencies, as the setup's install of this checkout recorded them (setup reinstalls
    whenever pyproject.toml changes)."""
    return [r for r in md.requires("sempcyc") or [] if "extra ==" not in r]


def wanted(req: Requirement, extras: set[str]) -> bool:
    return req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras | {""})


def closure(requirements: list[str]) -> dict[str, md.Distribution]:
    """Every installed distribution `requirements` pull in, by canonical name."""
    found: dict[str, tuple[md.Distribution, set[str]]] = {}
    todo = [(Requirement(r), set()) for r in requirements]
    while todo:
        req, parent_extras = todo.pop()
        name = canonicalize_name(req.name)
        if not wanted(req, parent_extras):
            continue
        dist, extras = found.get(name, (None, set()))
        if dist is not None and set(req.extras) <= extras:
            continue
        dist = dist or md.distribution(name)
        extras = extras | set(req.extras)
        found[name] = (dist, extras)
        todo += [(Requirement(r), extras) for r in dist.requires or []]
    return {name: dist for name, (dist, _) in found.items()}


def link_distributions(dists: dict[str, md.Distribution], into: Path) -> None:
    """Symlink each distribution's top-level files and folders (from its RECORD) into `into`."""
    into.mkdir()
    for dist in dists.values():
        root = Path(dist.locate_file(""))
        for top in {f.parts[0] for f in dist.files or [] if f.parts[0] != ".."}:
            if not (into / top).exists() and (root / top).exists():
                (into / top).symlink_to(root / top)


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("install")
    link_distributions(closure(declared()), tmp / "deps")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=CLEAN_ENV)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "declared_deps.pth").write_text(str(tmp / "deps") + "\n")
    proc = subprocess.run([str(venv / "bin/pip"), "install", "--quiet", "--no-input", str(REPO)],
                          capture_output=True, text=True, env=CLEAN_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return venv


def test_pip_install_then_pip_check_passes(fresh_venv: Path):
    proc = subprocess.run([str(fresh_venv / "bin/pip"), "check"], capture_output=True, text=True, env=CLEAN_ENV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    shown = subprocess.run([str(fresh_venv / "bin/pip"), "show", "sempcyc"], capture_output=True, text=True,
                           env=CLEAN_ENV)
    assert "Location: " + str(REPO) not in shown.stdout, "installed from the checkout, not as an editable link"


# One process for every command's --help (each imports its own module; torch once, not 16 times).
EVERY_HELP = """
import contextlib, io, sys
from sempcyc import cli
for command in sorted(cli.COMMANDS):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            cli.main([command, "--help"])
        except SystemExit as exc:
            assert exc.code == 0, (command, exc.code)
    assert out.getvalue().startswith("usage: sempcyc " + command), (command, out.getvalue()[:200])
    print(command, "ok")
"""


def test_every_command_help_works_in_the_installed_package(fresh_venv: Path):
    script = subprocess.run([str(fresh_venv / "bin/sempcyc"), "--help"], capture_output=True, text=True, env=CLEAN_ENV)
    assert script.returncode == 0 and script.stdout.startswith("usage: sempcyc"), script.stderr[-2000:]
    proc = subprocess.run([str(fresh_venv / "bin/python"), "-c", EVERY_HELP], capture_output=True, text=True,
                          cwd=fresh_venv, env=CLEAN_ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == [w for c in sorted(cli.COMMANDS) for w in (c, "ok")]


def test_an_undeclared_dependency_is_missing_there(fresh_venv: Path):
    """The fresh venv really is limited to the declared closure: a test-only package is not importable."""
    proc = subprocess.run([str(fresh_venv / "bin/python"), "-c", "import moto"], capture_output=True, text=True,
                          env=CLEAN_ENV)
    assert proc.returncode != 0 and "No module named 'moto'" in proc.stderr
