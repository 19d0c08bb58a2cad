"""deploy against a real OpenSSH sshd and a real TorchServe "host" on 127.0.0.1 (free ports, stopped by PID).

The host's TorchServe runs from its own config.properties with the documented start command
(`torchserve --start --ncs --ts-config <config> --model-store <store>`), so restarts read what deploy wrote.
"""
from __future__ import annotations

import json
import shutil
import socket
import time
import zipfile
from pathlib import Path

import pytest

from helpers import CLASSES, PARAMS, PER_CLASS, class_files, merged, ok, run_cli, write_params, write_tar
from hosts import Host, target_dict
from sempcyc import archive, deploy
from sempcyc.params import read_section
from sempcyc.runtime.search import SketchSearch
from sempcyc.serving import ReleaseSettings, ServeSettings
from sempcyc.torchserve import free_port

pytestmark = pytest.mark.integration


# ------------------------------------------------------------------------------------------------ artifacts

@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict:
    """A tiny trained model + gallery, archived as versions 0.1.0 and 0.2.0, and a broken 0.3.0."""
    root = tmp_path_factory.mktemp("artifacts")
    write_tar(root / "ds.tar", class_files({c: (PER_CLASS, PER_CLASS) for c in CLASSES}))
    write_params(root)
    ok(root, "extract", "--tar", "ds.tar")
    ok(root, "semantic")
    ok(root, "prepare")
    ok(root, "features")
    ok(root, "train")
    ok(root, "gallery")
    marts = {}
    for version in ("0.1.0", "0.2.0"):
        params = merged(PARAMS, {"release": {"version": version, "model_name": "sem_pcyc"},
                                 "serve": {"top_k": 5, "threads": 1}})
        release, serve = read_section(params, ReleaseSettings), read_section(params, ServeSettings)
        marts[version] = archive.build_archive(root / "models/sem_pcyc.pt", root / "models/gallery",
                                               root / f"mars/sem_pcyc-{version}.mar", release, serve)
    broken = root / "mars/broken-0.3.0.mar"
    with zipfile.ZipFile(marts["0.2.0"]) as src, zipfile.ZipFile(broken, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "serving.json":
                data = json.dumps({**json.loads(data), "top_k": "not a number", "version": "0.3.0"}).encode()
            if item.filename == "MAR-INF/MANIFEST.json":
                manifest = json.loads(data)
                manifest["model"]["modelVersion"] = "0.3.0"
                data = json.dumps(manifest).encode()
            dst.writestr(item, data)
    marts["broken"] = broken
    sketch = next((root / "data/dataset/sketches").glob("*/*.png")).read_bytes()
    search = SketchSearch.load(root / "models/sem_pcyc.pt", root / "models/gallery", top_k=5,
                                max_pixels=16_000_000)
    return {"root": root, "mars": marts, "sketch": sketch, "expected": search.search([sketch])[0], "k": 5}


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    h = Host(tmp_path_factory.mktemp("host")).start()
    yield h
    h.stop()


def do_deploy(artifacts, target, mar) -> dict:
    mar = Path(mar)
    return deploy.deploy_target(target, mar, deploy.mar_version(mar), deploy.sha256_file(mar),
                                artifacts["sketch"], artifacts["expected"], artifacts["k"])


# ------------------------------------------------------------------------------------------- the main story

def test_rollout_story(artifacts, sshd, host):
    """first deploy; a second version becomes default while the first still answers by version; the same
    version again sends nothing; a broken archive rolls back; a restart keeps the new default."""
    mars = artifacts["mars"]
    first = do_deploy(artifacts, host.target(sshd), mars["0.1.0"])
    assert first["status"] == "deployed", first
    assert first["bytes_sent"] == mars["0.1.0"].stat().st_size
    assert host.default() == "0.1.0" and host.predict(artifacts["sketch"]) == 200

    second = do_deploy(artifacts, host.target(sshd), mars["0.2.0"])
    assert second["status"] == "deployed" and second["previous_default"] == "0.1.0", second
    assert host.default() == "0.2.0"
    assert host.predict(artifacts["sketch"], "0.1.0") == 200

    again = do_deploy(artifacts, host.target(sshd), mars["0.2.0"])
    assert again["status"] == "already live" and again["bytes_sent"] == 0, again

    broken = do_deploy(artifacts, host.target(sshd), mars["broken"])
    assert broken["status"] == "failed" and broken.get("rolled_back") is True, broken
    assert "0.3.0" not in host.versions() and host.default() == "0.2.0"
    assert host.predict(artifacts["sketch"]) == 200

    host.restart()  # the documented start command reads the config deploy kept current
    assert host.default() == "0.2.0"
    assert host.versions() == ["0.1.0", "0.2.0"]
    assert host.predict(artifacts["sketch"]) == 200


def test_retention_unregisters_old_versions(artifacts, sshd, tmp_path):
    h = Host(tmp_path / "host").start()
    try:
        for version in ("0.1.0", "0.2.0"):
            assert do_deploy(artifacts, h.target(sshd, keep_versions=1), artifacts["mars"][version])["status"] \
                == "deployed"
        assert h.versions() == ["0.2.0"]
        assert not (h.store / "sem_pcyc-0.1.0.mar").exists()
    finally:
        h.stop()


def test_truncated_upload_is_not_registered(artifacts, sshd, tmp_path, monkeypatch):
    h = Host(tmp_path / "host").start()
    try:
        real_upload = deploy.HostSession.upload

        def truncated(self, local, remote):  # the transfer loses its tail
            cut = tmp_path / "cut.mar"
            cut.write_bytes(Path(local).read_bytes()[:-1000])
            real_upload(self, cut, remote)
        monkeypatch.setattr(deploy.HostSession, "upload", truncated)
        receipt = do_deploy(artifacts, h.target(sshd), artifacts["mars"]["0.1.0"])
        assert receipt["status"] == "failed" and "checksum mismatch" in receipt["error"]
        assert h.versions() == []
        assert not list(h.store.iterdir())  # neither the final name nor the partial upload remains
    finally:
        h.stop()


def test_token_auth(artifacts, sshd, tmp_path, monkeypatch):
    h = Host(tmp_path / "host", token_auth=True).start()
    try:
        keys = h.ts.keys()
        assert keys["management"] and keys["inference"]
        # without tokens: a clear refusal
        monkeypatch.delenv("SEM_PCYC_TS_MANAGEMENT_TOKEN", raising=False)
        monkeypatch.delenv("SEM_PCYC_TS_INFERENCE_TOKEN", raising=False)
        refused = do_deploy(artifacts, h.target(sshd), artifacts["mars"]["0.1.0"])
        assert refused["status"] == "failed" and "token" in refused["error"]
        assert keys["management"] not in json.dumps(refused)
        # tokens from the environment
        monkeypatch.setenv("SEM_PCYC_TS_MANAGEMENT_TOKEN", keys["management"])
        monkeypatch.setenv("SEM_PCYC_TS_INFERENCE_TOKEN", keys["inference"])
        done = do_deploy(artifacts, h.target(sshd), artifacts["mars"]["0.1.0"])
        assert done["status"] == "deployed", done
        assert keys["management"] not in json.dumps(done)
        # or read from the host's key file over SSH
        monkeypatch.delenv("SEM_PCYC_TS_MANAGEMENT_TOKEN")
        monkeypatch.delenv("SEM_PCYC_TS_INFERENCE_TOKEN")
        via_file = do_deploy(artifacts, h.target(sshd, remote_key_file=str(h.ts.workdir / "key_file.json")),
                             artifacts["mars"]["0.2.0"])
        assert via_file["status"] == "deployed", via_file
        assert h.default() == "0.2.0"
    finally:
        h.stop()


# ------------------------------------------------------------------------------------------ SSH refusals

def test_changed_host_key_is_refused(artifacts, sshd, host):
    target = host.target(sshd, known_hosts=str(sshd["dir"] / "known_hosts_changed"))
    receipt = do_deploy(artifacts, target, artifacts["mars"]["0.1.0"])
    assert receipt["status"] == "failed" and "CHANGED" in receipt["error"] and "known_hosts_changed" in receipt["error"]
    assert receipt["bytes_sent"] == 0


def test_unknown_host_is_refused(artifacts, sshd, host):
    target = host.target(sshd, known_hosts=str(sshd["dir"] / "known_hosts_empty"))
    receipt = do_deploy(artifacts, target, artifacts["mars"]["0.1.0"])
    assert receipt["status"] == "failed" and "unknown host key" in receipt["error"]


def test_wrong_key_is_an_auth_error(artifacts, sshd, host):
    receipt = do_deploy(artifacts, host.target(sshd, key_file=str(sshd["dir"] / "other_key")),
                        artifacts["mars"]["0.1.0"])
    assert receipt["status"] == "failed" and "authentication failed" in receipt["error"]


def test_unreachable_port_fails_fast(artifacts, sshd, host):
    closed = free_port()
    start = time.monotonic()
    receipt = do_deploy(artifacts, host.target(sshd, port=closed), artifacts["mars"]["0.1.0"])
    assert receipt["status"] == "failed" and f"127.0.0.1:{closed}" in receipt["error"]
    # a port that accepts but never speaks SSH: bounded by connect_timeout
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)
    try:
        start = time.monotonic()
        receipt = do_deploy(artifacts, host.target(sshd, port=silent.getsockname()[1], connect_timeout=2),
                            artifacts["mars"]["0.1.0"])
        assert receipt["status"] == "failed"
        assert time.monotonic() - start < 15
    finally:
        silent.close()


# ----------------------------------------------------------------------------------- the stage, several hosts

def stage_project(artifacts, tmp_path: Path, targets: list[dict]) -> Path:
    root = artifacts["root"]
    proj = tmp_path / "proj"
    proj.mkdir()
    for name in ("data", "models"):
        (proj / name).symlink_to(root / name)
    (proj / "reports").mkdir()
    (proj / "reports/serve_check.json").write_text(json.dumps({"passed": True}))
    write_params(proj, {"release": {"model_name": "sem_pcyc", "version": "0.2.0"},
                        "serve": {"top_k": 5}, "deploy": {"targets": targets}})
    shutil.copy(artifacts["mars"]["0.2.0"], proj / "release.mar")
    return proj


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


def test_updated_ts_config_keeps_other_settings():
    text = "inference_address=http://127.0.0.1:1\nload_models=other.mar,sem_pcyc-0.0.1.mar\n" \
           'models={"other": {"1.0": {"marName": "other.mar", "defaultVersion": true}}}\n'
    out = deploy.updated_ts_config(text, "sem_pcyc", ["0.1.0", "0.2.0"], "0.2.0", 2)
    props = dict(line.split("=", 1) for line in out.splitlines())
    assert props["inference_address"] == "http://127.0.0.1:1"
    # the default first: TorchServe makes the first version it loads the default, whatever the JSON says
    assert props["load_models"] == "sem_pcyc-0.2.0.mar,sem_pcyc-0.1.0.mar,other.mar"
    models = json.loads(props["models"])
    assert models["other"]["1.0"]["marName"] == "other.mar"
    assert models["sem_pcyc"]["0.2.0"]["defaultVersion"] is True
    assert models["sem_pcyc"]["0.1.0"]["defaultVersion"] is False
