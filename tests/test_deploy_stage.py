"""The deploy stage (`sempcyc deploy` as dvc.yaml runs it): several hosts rolled out one after another, the first
failure stopping the rollout, the smoke query taken from serve-check's report of this very archive, no targets,
and bad target params.

Against a real sshd and TorchServe hosts on 127.0.0.1 (tests/hosts.py), with conftest.py's `artifacts` (a tiny
trained model and gallery as several versions), built once a session.
"""
from __future__ import annotations

import json

import pytest

from helpers import run_cli, write_params
from hosts import Host, check_report, stage_project, target_dict
from sempcyc.torchserve import free_port

pytestmark = pytest.mark.integration


# ----------------------------------------------------------------------------------- the stage, several hosts

def test_two_targets_rolling_second_fails(artifacts, sshd, tmp_path):
    a = Host(tmp_path / "a").start()
    b = Host(tmp_path / "b").start()
    try:
        targets = [target_dict(a, sshd, name="a"),
                   target_dict(b, sshd, name="b", known_hosts=str(sshd["dir"] / "known_hosts_empty"))]
        proj = stage_project(artifacts, tmp_path, targets)
        proc = run_cli("deploy", "--mar", "release.mar", cwd=proj, check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert "deploy failed on b" in proc.stderr
        receipt = json.loads((proj / "reports/deploy.json").read_text())
        assert [t["status"] for t in receipt["targets"]] == ["deployed", "failed"]
        assert receipt["hosts_with_new_version"] == ["a"]
        assert a.default() == "0.2.0" and b.default() is None
    finally:
        a.stop()
        b.stop()


def test_first_failure_stops_the_rollout(artifacts, sshd, tmp_path):
    a = Host(tmp_path / "a").start()
    try:
        targets = [{"name": "down", "host": "127.0.0.1", "port": free_port(), "model_store": "/nowhere",
                    "known_hosts": str(sshd["known_hosts"]), "key_file": str(sshd["key"]), "connect_timeout": 3},
                   target_dict(a, sshd, name="a")]
        proj = stage_project(artifacts, tmp_path, targets)
        proc = run_cli("deploy", "--mar", "release.mar", cwd=proj, check=False)
        assert proc.returncode == 1
        receipt = json.loads((proj / "reports/deploy.json").read_text())
        assert [t["status"] for t in receipt["targets"]] == ["failed", "not attempted"]
        assert a.default() is None
    finally:
        a.stop()


@pytest.mark.parametrize("damage, message", [
    ("other archive", "made for another archive than release.mar"),
    ("sketch gone", "not found (the smoke query's sketch)"),
])
def test_deploy_refuses_without_a_smoke_query_of_this_archive(artifacts, sshd, tmp_path, damage, message):
    """The smoke query comes from serve-check's report of this very archive: a report of another archive, or its
    sketch missing from the dataset, is one line naming the file, and nothing reaches the host."""
    a = Host(tmp_path / "a").start()
    try:
        proj = stage_project(artifacts, tmp_path, [target_dict(a, sshd, name="a")])
        report = proj / "reports/serve_check.json"
        if damage == "other archive":
            report.write_text(json.dumps(check_report(artifacts, artifacts["mars"]["0.1.0"])))
        else:
            (proj / "data").unlink()
            (proj / "data/dataset/sketches").mkdir(parents=True)
        proc = run_cli("deploy", "--mar", "release.mar", cwd=proj, check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert a.default() is None and not [p for p in a.store.iterdir() if p.suffix == ".mar"]
    finally:
        a.stop()


def test_no_targets_writes_a_receipt_and_succeeds(tmp_path):
    write_params(tmp_path, {"deploy": {"targets": []}})
    proc = run_cli("deploy", cwd=tmp_path)
    assert "no targets" in proc.stdout
    assert json.loads((tmp_path / "reports/deploy.json").read_text())["status"] == "no targets"


@pytest.mark.parametrize("target, message", [
    ({"host": "h", "model_store": "/s", "password": "hunter2"}, "secret"),
    ({"host": "h", "model_store": "/s", "management_token": "abc"}, "secret"),
    ({"host": "h"}, "model_store"),
    ({"host": "h", "model_store": "/s", "port": "22"}, "port"),
    ({"host": "h", "model_store": "/s", "colour": "red"}, "unknown"),
])
def test_bad_target_params(tmp_path, target, message):
    write_params(tmp_path, {"deploy": {"targets": [target]}})
    proc = run_cli("deploy", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr
    assert "hunter2" not in proc.stderr and "abc" not in proc.stderr.replace("deploy.targets", "")
