"""`dvc exp run` with a deploy target configured: the experiment runs every stage, deploy included, but deploys
nothing (DVC tells the stage it runs in an experiment through DVC_EXP_NAME), so it succeeds and DVC saves the
experiment; `dvc repro` still deploys. Real DVC, a real sshd and a TorchServe serving host (tests/hosts.py).
"""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from helpers import CLASSES, PER_CLASS, PIPELINE_OVERRIDES, VENV_BIN, class_files, merged, write_tar
from hosts import Host, target_dict

pytestmark = pytest.mark.integration

THREADS = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
SETTINGS = merged(PIPELINE_OVERRIDES, {
    "demo": {"classes": 4, "images_per_class": 2, "sketches_per_class": 2, "size": 32},  # `dvc exp run` runs it too
    "serve": {"top_k": 10, "check_requests": 8, "threads": 1, "batch_size": 4, "ready_timeout_s": 120},
})


def run(proj: Path, env: dict, *cmd: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), cwd=proj, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def store_state(host: Host) -> dict[str, tuple[int, int]]:
    """Every file in the host's model store (its blob store too): size and modification time."""
    return {str(p.relative_to(host.store)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(host.store.rglob("*")) if p.is_file()}


@pytest.fixture
def host(tmp_path: Path):
    h = Host(tmp_path / "host").start()
    yield h
    h.stop()


def test_an_experiment_with_a_target_configured_is_saved_and_deploys_nothing(dvc_project, sshd, host):
    proj, env = dvc_project
    env = dict(env, **THREADS)
    params = yaml.safe_load((proj / "params.yaml").read_text())
    for section, values in SETTINGS.items():
        params.setdefault(section, {}).update(values)
    params["deploy"]["targets"] = [dict(target_dict(host, sshd, name="host-a"), workers=1)]
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (proj / "data").mkdir()
    write_tar(proj / "data/ds.tar", class_files({c: (PER_CLASS, PER_CLASS) for c in CLASSES}))
    run(proj, env, "git", "add", "-A")
    run(proj, env, "git", "commit", "-qm", "tiny pipeline, one serving host")

    # dvc repro deploys
    run(proj, env, str(VENV_BIN / "dvc"), "repro")
    assert json.loads((proj / "reports/deploy.json").read_text())["status"] == "ok"
    assert host.default() == "0.0.0"
    run(proj, env, "git", "add", "-A")
    run(proj, env, "git", "commit", "-qm", "repro")
    before, versions = store_state(host), host.versions()

    # an experiment retrains down to deploy, which skips: exit 0, the experiment saved, no byte sent to the host
    proc = run(proj, env, str(VENV_BIN / "dvc"), "exp", "run", "-S", "train.seed=1")
    log = proc.stdout + proc.stderr
    assert {"train", "evaluate", "gallery", "archive", "serve-check", "deploy"} <= set(
        re.findall(r"Running stage '([^']+)'", log)), log[-3000:]
    receipt = json.loads((proj / "reports/deploy.json").read_text())
    assert receipt["status"] == "skipped: experiment" and receipt["targets"] == []
    assert f"deploy: skipped: experiment {receipt['experiment']}" in log
    listed = run(proj, env, str(VENV_BIN / "dvc"), "exp", "list", "--name-only").stdout.split()
    assert receipt["experiment"] in listed, listed
    shown = json.loads(run(proj, env, str(VENV_BIN / "dvc"), "exp", "show", "--json").stdout)
    assert receipt["experiment"] in json.dumps(shown)
    assert store_state(host) == before and host.versions() == versions and host.default() == "0.0.0"
