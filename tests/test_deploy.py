"""deploy against a real OpenSSH sshd and a real TorchServe "host" on 127.0.0.1 (free ports, stopped by PID): the
rollout story, retention, SSH refusals, broken hosts, and the host's config.properties.

The host's TorchServe runs from its own config.properties with the documented start command
(`torchserve --start --ncs --ts-config <config> --model-store <store>`), so restarts read what deploy wrote. The
archives deployed are conftest.py's `artifacts` (a tiny trained model and gallery as several versions), built once
a session.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import time
from pathlib import Path
from urllib.parse import quote

import paramiko
import pytest

from helpers import one_line_error, run_cli
from hosts import Host, assert_failed_at, blob_sizes, do_deploy, stage_project, start_sshd, stored_blobs, target_dict
from sempcyc import ssh_host, torchserve_host
from sempcyc.stages import deploy
from sempcyc.torchserve import free_port

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    h = Host(tmp_path_factory.mktemp("host")).start()
    yield h
    h.stop()


# ------------------------------------------------------------------------------------------- the main story

def test_rollout_story(artifacts, sshd, host):
    """first deploy; a second version becomes default while the first still answers by version; the same
    version again sends nothing; a broken archive rolls back; a restart keeps the new default."""
    mars = artifacts["mars"]
    first = do_deploy(artifacts, host.target(sshd), mars["0.1.0"])
    assert first["status"] == "deployed", json.dumps(first)
    blobs = blob_sizes(mars["0.1.0"])  # the host gets every blob and the slim archive, nothing twice
    assert first["bytes_sent"] == sum(blobs.values()) + first["slim_archive_bytes"], first
    assert {b["sha256"] for b in first["blobs"]["sent"]} == set(blobs) and first["blobs"]["reused"] == 0
    assert stored_blobs(host) == set(blobs)
    assert (host.store / "sem_pcyc-0.1.0.mar").stat().st_size == first["slim_archive_bytes"]
    assert host.default() == "0.1.0" and host.predict(artifacts["sketch"]) == 200

    second = do_deploy(artifacts, host.target(sshd), mars["0.2.0"])  # same model and gallery: the slim .mar only
    assert second["status"] == "deployed" and second["previous_default"] == "0.1.0", second
    assert second["bytes_sent"] == second["slim_archive_bytes"] and second["blobs"]["sent"] == []
    assert second["blobs"]["reused"] == len(blobs)
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


# ----------------------------------------------------------------------- broken hosts: a failed step, never a traceback

def host_state(h: Host) -> tuple:
    return h.default(), h.versions(), sorted(p.name for p in h.store.iterdir())


def silent_port(stack) -> int:
    """A port that accepts connections and never answers (a hung server)."""
    sock = socket.socket()
    stack.append(sock)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    return sock.getsockname()[1]


@pytest.mark.parametrize("inference", ["closed", "hung"])
def test_unreachable_inference_api_after_registration_rolls_back(artifacts, sshd, host, inference):
    """The new version registers, then the smoke query cannot reach TorchServe: through the SSH channel a closed
    port is paramiko's ChannelException, a hung one a socket timeout. Either way the version is unregistered, its
    archive removed, the previous default untouched, and the receipt names the host and the step."""
    before = host_state(host)
    sockets = []
    try:
        port = free_port() if inference == "closed" else silent_port(sockets)
        # the timeout also bounds registration, which waits for a worker to import torch and load the model (5 s
        # on a slow day here): long enough for that, short enough that the hung smoke query fails fast
        target = host.target(sshd, inference_url=f"http://127.0.0.1:{port}", request_timeout=15)
        receipt = do_deploy(artifacts, target, artifacts["mars"]["0.3.0"])
    finally:
        for sock in sockets:
            sock.close()
    assert_failed_at(receipt, "smoke")
    assert receipt.get("rolled_back") is True and "registered" in receipt["timings"], receipt
    assert host_state(host) == before


def test_socket_timeout_in_a_remote_command_is_a_failed_step(artifacts, sshd, host, monkeypatch):
    """A socket timeout outside the HTTP calls (here: the checksum command after the upload)."""
    before = host_state(host)
    real_run = ssh_host.HostSession.run

    def hangs(self, command, check=True):
        if ".partial-" in command:
            raise TimeoutError("timed out")
        return real_run(self, command, check)
    monkeypatch.setattr(ssh_host.HostSession, "run", hangs)
    receipt = do_deploy(artifacts, host.target(sshd), artifacts["mars"]["broken"])
    assert_failed_at(receipt, "verify", "TimeoutError", "timed out")
    assert host_state(host) == before  # the partial upload is removed, nothing registered


def test_read_only_model_store_fails_the_upload_step(artifacts, host, tmp_path):
    """A model store the SSH user may not write to. As root no file mode stops a write, so the refusal comes from
    the SSH server itself: OpenSSH's read-only SFTP (`internal-sftp -R`) answers SSH2_FX_PERMISSION_DENIED, which
    paramiko raises as PermissionError from sftp.put, as it would for a store without write permission."""
    before = host_state(host)
    with start_sshd(tmp_path, sftp="internal-sftp -R") as read_only:
        receipt = do_deploy(artifacts, host.target(read_only), artifacts["mars"]["broken"])
    assert_failed_at(receipt, "upload", "Permission denied", str(host.store))
    assert receipt["bytes_sent"] == 0
    assert host_state(host) == before


def test_model_store_that_is_a_file_is_refused(artifacts, sshd, host, tmp_path):
    not_a_folder = tmp_path / "model-store"
    not_a_folder.write_text("")
    receipt = do_deploy(artifacts, host.target(sshd, model_store=str(not_a_folder)), artifacts["mars"]["0.1.0"])
    assert_failed_at(receipt, "inspect", "not a folder", str(not_a_folder))
    assert not_a_folder.read_text() == ""


def test_closed_management_port_fails_the_stage_on_one_line(artifacts, sshd, host, tmp_path):
    targets = [target_dict(host, sshd, name="host-a", management_url=f"http://127.0.0.1:{free_port()}")]
    proj = stage_project(artifacts, tmp_path, targets)
    proc = run_cli("deploy", "--mar", "release.mar", cwd=proj, check=False)
    line = one_line_error(proc.returncode, proc.stderr, "deploy")
    assert "deploy failed on host-a" in line and "step inspect" in line and "TorchServe" in line, line
    receipt = json.loads((proj / "reports/deploy.json").read_text())
    assert_failed_at(receipt["targets"][0], "inspect", "cannot connect")


def test_allowed_urls_of_the_host_template_refuse_urls(host):
    """docs/hosts.md's host template (which every Host here runs) registers archives by file name, as deploy does (the
    other tests), and refuses any URL: TorchServe matches allowed_urls against the URL before downloading."""
    for url in ("http://example.com/x.mar", "https://example.com/x.mar", "file:///etc/hostname"):
        status, body = host.ts.request("POST", f"{host.ts.management_url}/models?url={quote(url, safe='')}")
        assert status != 200 and b"does not match any allowed URL" in body, (url, status, body)


# ------------------------------------------------------------------------ the host's config.properties

def config_props(path: Path) -> dict:
    return dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line and line[0] != "#")


def test_stale_config_is_fixed_when_the_version_is_already_live(artifacts, sshd, tmp_path, monkeypatch):
    """A deploy that stops after set-default (the connection drops while the config is written) leaves the new
    version serving and the config naming the old one first; the next deploy finds the version already live and
    still fixes the config, keeping its mode and owner, so a restart serves the new default."""
    h = Host(tmp_path / "host").start()
    try:
        assert do_deploy(artifacts, h.target(sshd), artifacts["mars"]["0.1.0"])["status"] == "deployed"

        def dropped(self, path, text):
            raise EOFError()
        with monkeypatch.context() as patch:
            patch.setattr(ssh_host.HostSession, "write_text_atomic", dropped)
            broken = do_deploy(artifacts, h.target(sshd), artifacts["mars"]["0.2.0"])
        assert_failed_at(broken, "config", "EOFError")
        assert "rolled_back" not in broken and h.default() == "0.2.0"
        assert config_props(h.config)["load_models"].startswith("sem_pcyc-0.1.0.mar")  # stale
        os.chmod(h.config, 0o640)
        os.chown(h.config, 1234, 1234)

        again = do_deploy(artifacts, h.target(sshd), artifacts["mars"]["0.2.0"])
        assert again["status"] == "already live" and again["bytes_sent"] == 0, again
        assert again["config_rewritten"] is True and again["versions_kept"] == ["0.1.0", "0.2.0"]
        assert config_props(h.config)["load_models"] == "sem_pcyc-0.2.0.mar,sem_pcyc-0.1.0.mar"
        info = h.config.stat()
        assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o640, 1234, 1234)
        assert do_deploy(artifacts, h.target(sshd), artifacts["mars"]["0.2.0"])["config_rewritten"] is False
        h.restart()
        assert h.default() == "0.2.0" and h.versions() == ["0.1.0", "0.2.0"]
    finally:
        h.stop()


def test_config_rewrite_keeps_mode_and_owner_or_writes_in_place(sshd, host, tmp_path, monkeypatch):
    config = tmp_path / "config.properties"
    config.write_text("a=1\n")
    os.chmod(config, 0o604)
    os.chown(config, 4321, 4322)
    session = ssh_host.HostSession(host.target(sshd, ts_config=str(config))).connect()
    try:
        session.write_text_atomic(str(config), "a=2\n")
        info = config.stat()
        assert (config.read_text(), stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == ("a=2\n", 0o604, 4321,
                                                                                              4322)
        # an SSH user who may not give the file its owner (not root) rewrites it in place: same inode and owner

        def refused(*args):
            raise PermissionError(13, "Permission denied")
        monkeypatch.setattr(paramiko.SFTPClient, "chown", refused)
        session.write_text_atomic(str(config), "a=3\n")
        after = config.stat()
        assert (config.read_text(), after.st_ino, after.st_uid, stat.S_IMODE(after.st_mode)) == \
            ("a=3\n", info.st_ino, 4321, 0o604)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["config.properties"]
    finally:
        session.close()


def test_load_models_all_keeps_every_model_and_the_default_first(artifacts, sshd, tmp_path):
    """load_models=ALL loads the model store in directory order and makes the first version loaded the default
    (measured here): deploy turns ALL into that list with the default first, other models included."""
    h = Host(tmp_path / "host", extra={"load_models": "ALL"})
    shutil.copy(artifacts["mars"]["other"], h.store / "other.mar")
    h.start()
    try:
        for version in ("0.1.0", "0.2.0"):
            assert do_deploy(artifacts, h.target(sshd), artifacts["mars"][version])["status"] == "deployed"
        written = h.config.read_text()
        assert torchserve_host.ALL_MARKER in written.splitlines()
        assert config_props(h.config)["load_models"] == "sem_pcyc-0.2.0.mar,sem_pcyc-0.1.0.mar,other.mar"
        h.restart()
        assert h.default() == "0.2.0" and h.versions() == ["0.1.0", "0.2.0"]
        assert h.ts.request("GET", f"{h.ts.management_url}/models/other")[0] == 200

        # what plain ALL would have done: the first of our archives in directory order (readdir, as os.listdir)
        h.config.write_text(written.replace(config_props(h.config)["load_models"], "ALL"))
        first = next(n for n in os.listdir(h.store) if n.startswith("sem_pcyc-"))
        h.restart()
        print(f"\nload_models=ALL, directory order {os.listdir(h.store)}: default {h.default()}")
        assert h.default() == deploy.mar_version(h.store / first)
    finally:
        h.stop()
