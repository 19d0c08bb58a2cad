"""deploy against a real OpenSSH sshd and a real TorchServe "host" on 127.0.0.1 (free ports, stopped by PID).

The host's TorchServe runs from its own config.properties with the documented start command
(`torchserve --start --ncs --ts-config <config> --model-store <store>`), so restarts read what deploy wrote.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import stat
import subprocess
import time
import zipfile
from pathlib import Path
from urllib.parse import quote

import paramiko
import pytest

from helpers import (
    CLASSES,
    PARAMS,
    PER_CLASS,
    REPO,
    VENV_BIN,
    class_files,
    merged,
    new_unseen_class,
    ok,
    one_line_error,
    repo_params,
    run_cli,
    write_params,
    write_tar,
)
from hosts import Host, start_sshd, target_dict
from sempcyc import blobstore, ssh_host, torchserve_host
from sempcyc.errors import UserError
from sempcyc.fsutil import sha256_file
from sempcyc.params import read_section
from sempcyc.runtime.search import SketchSearch
from sempcyc.serving import ReleaseSettings, ServeSettings, same_ranking
from sempcyc.stages import archive, deploy
from sempcyc.targets import DeploySettings, parse_targets
from sempcyc.torchserve import free_port

pytestmark = pytest.mark.integration


# ------------------------------------------------------------------------------------------------ artifacts

@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> dict:
    """A tiny trained model + gallery, archived as versions 0.1.0, 0.2.0 and 0.3.0, a broken 0.3.0, the same model
    under another name ("other"), and 0.4.0: the same model with a gallery of two more classes (a zero-shot
    release). 8 gallery shards, so new classes also land in shards that hold old ones; gallery expansion on, so a
    slim archive carries the neighbours file and the host's blob store the shards it expands."""
    root = tmp_path_factory.mktemp("artifacts")
    new = [new_unseen_class(CLASSES)]
    new.append(new_unseen_class([*CLASSES, *new]))
    write_tar(root / "ds.tar", class_files({c: (PER_CLASS, PER_CLASS) for c in CLASSES}))
    write_tar(root / "ds2.tar", class_files({c: (PER_CLASS, PER_CLASS) for c in [*CLASSES, *new]}))
    write_params(root, {"gallery": {"shards": 8}, "model": {"overrides": {"gallery_expansion": 2}}})
    ok(root, "extract", "--tar", "ds.tar")
    for name in ("semantic", "prepare", "features", "train", "gallery"):
        ok(root, name)
    ok(root, "extract", "--tar", "ds2.tar", "--out", "data/dataset2", "--index", "data/dataset2.json")
    ok(root, "gallery", "--dataset", "data/dataset2", "--index", "data/dataset2.json", "--out", "models/gallery2")
    marts = {}
    for version, gallery in (("0.1.0", "gallery"), ("0.2.0", "gallery"), ("0.3.0", "gallery"),
                             ("0.4.0", "gallery2")):
        params = merged(PARAMS, {"release": {"version": version, "model_name": "sem_pcyc"},
                                 "serve": {"top_k": 5, "threads": 1}})
        release, serve = read_section(params, ReleaseSettings), read_section(params, ServeSettings)
        marts[version] = archive.build_archive(root / "models/sem_pcyc.pt", root / "models" / gallery,
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
    marts["other"] = renamed_model(marts["0.1.0"], root / "mars/other.mar", "other")
    sketch_file = next((root / "data/dataset/sketches").glob("*/*.png"))
    sketch = sketch_file.read_bytes()
    expected = {g: SketchSearch.load(root / "models/sem_pcyc.pt", root / "models" / g, top_k=5,
                                     max_pixels=16_000_000).search([sketch])[0] for g in ("gallery", "gallery2")}
    return {"root": root, "mars": marts, "sketch": sketch, "expected": expected["gallery"],
            "expected2": expected["gallery2"], "k": 5, "new_classes": new,
            "sketch_name": sketch_file.relative_to(root / "data/dataset/sketches").as_posix()}


def renamed_model(mar: Path, out: Path, name: str) -> Path:
    """A copy of `mar` whose manifest names another model: an unrelated model in a host's store."""
    with zipfile.ZipFile(mar) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename == "MAR-INF/MANIFEST.json":
                manifest = json.loads(data)
                manifest["model"]["modelName"] = name
                data = json.dumps(manifest).encode()
            dst.writestr(item, data)
    return out


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    h = Host(tmp_path_factory.mktemp("host")).start()
    yield h
    h.stop()


def do_deploy(artifacts, target, mar) -> dict:
    mar = Path(mar)
    expected = artifacts["expected2" if mar == artifacts["mars"]["0.4.0"] else "expected"]
    return deploy.deploy_target(target, deploy.checked_archive(mar), artifacts["sketch"], expected, artifacts["k"])


def blob_sizes(mar: Path) -> dict[str, int]:
    """sha256 -> bytes of the archive's large files: the model and every gallery shard."""
    return {b.sha256: b.size for b in blobstore.archive_blobs(mar)}


def blob_store(h: Host) -> Path:
    return h.store / ".sem-pcyc-blobs"


def stored_blobs(h: Host) -> set[str]:
    return {p.name for p in blob_store(h).iterdir() if blobstore.BLOB_NAME.fullmatch(p.name)}


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


# --------------------------------------------------------------------------- the blob store: only what changed

def test_slim_archive_is_deterministic_and_leaves_the_blobs_out(artifacts, tmp_path):
    mar = artifacts["mars"]["0.1.0"]
    a = blobstore.write_slim_archive(mar, "/srv/blobs", tmp_path / "a.mar")
    b = blobstore.write_slim_archive(mar, "/srv/blobs", tmp_path / "b.mar")
    assert a.read_bytes() == b.read_bytes()
    with zipfile.ZipFile(mar) as full, zipfile.ZipFile(a) as slim:
        kept = [n for n in full.namelist() if n != "sem_pcyc.pt" and not n.startswith("gallery/shards/")]
        assert sorted(slim.namelist()) == sorted(kept)
        assert {"gallery/manifest.json", "gallery/neighbours.npy"} <= set(kept)
        assert json.loads(slim.read("serving.json")) == {**json.loads(full.read("serving.json")),
                                                         "blob_store": "/srv/blobs"}
        assert slim.read("MAR-INF/MANIFEST.json") == full.read("MAR-INF/MANIFEST.json")
        assert {i.date_time for i in slim.infolist()} == {(1980, 1, 1, 0, 0, 0)}
    other = blobstore.write_slim_archive(mar, "/elsewhere", tmp_path / "c.mar")
    assert other.read_bytes() != a.read_bytes()


def test_a_release_with_new_classes_sends_only_the_shards_they_changed(artifacts, sshd, tmp_path):
    """0.1.0 first (every blob), then 0.4.0: the same model and two more classes. Only the shards those classes
    hash into travel, with the slim archive (which carries the manifest); retention with keep_versions 1 then
    removes 0.1.0 and exactly the blobs only it used; the new version answers with the new classes' images."""
    h = Host(tmp_path / "host").start()
    mars = artifacts["mars"]
    old, new = blob_sizes(mars["0.1.0"]), blob_sizes(mars["0.4.0"])
    changed = set(new) - set(old)
    assert 0 < len(changed) <= 2 and len(changed) < len(new) - 1, (old, new)  # the model and most shards stay
    try:
        first = do_deploy(artifacts, h.target(sshd, keep_versions=1), mars["0.1.0"])
        assert first["status"] == "deployed" and stored_blobs(h) == set(old), first
        (blob_store(h) / "notes.txt").write_text("not ours")
        # the list of a deploy that failed before its archive got there, and another model's list: the first goes
        # at retention with the blob only it names, the second stays with its blob
        stale, foreign = "a" * 64, "b" * 64
        for blob, refs in ((stale, "sem_pcyc-0.9.0.mar.blobs"), (foreign, "other-1.0.mar.blobs")):
            (blob_store(h) / blob).write_text("x")
            (blob_store(h) / refs).write_text(f"{blob}\n")
        second = do_deploy(artifacts, h.target(sshd, keep_versions=1), mars["0.4.0"])
        assert second["status"] == "deployed", json.dumps(second)
        assert {b["sha256"] for b in second["blobs"]["sent"]} == changed
        assert all(b["file"].startswith("gallery/shards/") and b["why"] == "missing" for b in second["blobs"]["sent"])
        assert second["bytes_sent"] == sum(new[sha] for sha in changed) + second["slim_archive_bytes"], second
        assert second["blobs"]["bytes_sent"] < first["blobs"]["bytes_sent"] / 5
        assert second["blobs"]["reused"] == len(new) - len(changed)
        # retention: 0.1.0 is gone with its blob list, and the shards only it used with it
        assert h.versions() == ["0.4.0"] and sorted(second["blobs_removed"]) == sorted({*old, stale} - set(new))
        assert stored_blobs(h) == {*new, foreign} and (blob_store(h) / "notes.txt").exists()
        assert sorted(p.name for p in blob_store(h).glob("*.blobs")) == ["other-1.0.mar.blobs",
                                                                        "sem_pcyc-0.4.0.mar.blobs"]
        assert set((blob_store(h) / "sem_pcyc-0.4.0.mar.blobs").read_text().split()) == set(new)
        url = f"{h.ts.inference_url}/predictions/sem_pcyc"
        new_sketch = next((artifacts["root"] / "data/dataset2/sketches" / artifacts["new_classes"][0]).glob("*"))
        status, body = h.ts.request("POST", url, new_sketch.read_bytes(), {"Content-Type": "image/png"}, timeout=60)
        assert status == 200 and len(json.loads(body)) == 5
        offline = SketchSearch.load(artifacts["root"] / "models/sem_pcyc.pt", artifacts["root"] / "models/gallery2",
                                    top_k=5, max_pixels=16_000_000)
        assert same_ranking(json.loads(body), offline.search([new_sketch.read_bytes()])[0])
    finally:
        h.stop()


def test_a_damaged_or_deleted_blob_is_sent_again(artifacts, sshd, tmp_path):
    """The host's copies are checked by sha256 at every deploy, also when the version is already live: a damaged
    shard and a deleted model are sent again, the intact ones are not."""
    h = Host(tmp_path / "host").start()
    mar = artifacts["mars"]["0.1.0"]
    blobs = {b.member: b for b in blobstore.archive_blobs(mar)}
    shard = next(b for m, b in blobs.items() if m.startswith("gallery/shards/"))
    try:
        assert do_deploy(artifacts, h.target(sshd), mar)["status"] == "deployed"
        damaged = blob_store(h) / shard.sha256
        data = bytearray(damaged.read_bytes())
        data[len(data) // 2] ^= 0xFF
        damaged.write_bytes(bytes(data))
        (blob_store(h) / blobs["sem_pcyc.pt"].sha256).unlink()
        again = do_deploy(artifacts, h.target(sshd), mar)
        assert again["status"] == "already live", json.dumps(again)
        assert sorted((b["file"], b["why"]) for b in again["blobs"]["sent"]) == \
            sorted([(shard.member, "damaged"), ("sem_pcyc.pt", "missing")])
        assert again["bytes_sent"] == shard.size + blobs["sem_pcyc.pt"].size and "re-sent 2" in again["message"]
        assert hashlib.sha256(damaged.read_bytes()).hexdigest() == shard.sha256
        assert stored_blobs(h) == {b.sha256 for b in blobs.values()}
        assert do_deploy(artifacts, h.target(sshd), mar)["bytes_sent"] == 0
    finally:
        h.stop()


def answer_status(h: Host, sketch: bytes, timeout: float) -> int | None:
    """The default version's status for `sketch`, or None when no answer comes within `timeout` seconds."""
    try:
        return h.ts.request("POST", f"{h.ts.inference_url}/predictions/sem_pcyc", sketch,
                            {"Content-Type": "image/png"}, timeout=timeout)[0]
    except TimeoutError:
        return None


def test_a_host_missing_a_shard_never_serves_a_partial_gallery(artifacts, sshd, tmp_path):
    """A shard gone from the blob store: at the next TorchServe start the version's worker refuses to load (the
    handler names the shard) instead of answering from the other shards, so queries get no answer. The next
    deploy finds the version live but the shard missing, sends it, and checks with its smoke query that the
    version answers again (TorchServe's next worker start finds every file)."""
    h = Host(tmp_path / "host").start()
    mar = artifacts["mars"]["0.1.0"]
    shard = next(b for b in blobstore.archive_blobs(mar) if b.member.startswith("gallery/shards/"))
    try:
        assert do_deploy(artifacts, h.target(sshd), mar)["status"] == "deployed"
        (blob_store(h) / shard.sha256).unlink()
        h.restart()
        assert answer_status(h, artifacts["sketch"], 5) is None
        logs = "".join(p.read_text(errors="replace") for p in (h.root / "run").rglob("*.log"))
        assert "GalleryError" in logs and shard.member.removeprefix("gallery/") in logs
        healed = do_deploy(artifacts, h.target(sshd), mar)
        assert healed["status"] == "already live" and "smoke_ok" in healed["timings"], json.dumps(healed)
        assert [(b["file"], b["why"]) for b in healed["blobs"]["sent"]] == [(shard.member, "missing")]
        assert answer_status(h, artifacts["sketch"], 60) == 200
    finally:
        h.stop()


def test_blob_store_setting(artifacts, sshd, tmp_path):
    """deploy.targets blob_store: any absolute folder (created if missing); a relative one is refused."""
    h = Host(tmp_path / "host").start()
    store = tmp_path / "elsewhere/blobs"
    try:
        receipt = do_deploy(artifacts, h.target(sshd, blob_store=str(store)), artifacts["mars"]["0.1.0"])
        assert receipt["status"] == "deployed" and receipt["blobs"]["store"] == str(store), receipt
        assert {p.name for p in store.iterdir()} >= set(blob_sizes(artifacts["mars"]["0.1.0"]))
        assert not blob_store(h).exists()
    finally:
        h.stop()
    settings = DeploySettings(defaults=repo_params()["deploy"]["defaults"],
                              targets=[{"host": "h", "model_store": "/s", "blob_store": "blobs"}])
    with pytest.raises(UserError, match=r"deploy.targets\[0\]: the blob store 'blobs' must be an absolute path"):
        parse_targets(settings, "sem_pcyc")


def test_truncated_upload_is_not_registered(artifacts, sshd, tmp_path, monkeypatch):
    h = Host(tmp_path / "host").start()
    try:
        real_upload = ssh_host.HostSession.upload

        def truncated(self, source, remote, size):  # the transfer loses its tail
            cut = source.read()[:-1000]
            real_upload(self, io.BytesIO(cut), remote, len(cut))
        monkeypatch.setattr(ssh_host.HostSession, "upload", truncated)
        receipt = do_deploy(artifacts, h.target(sshd), artifacts["mars"]["0.1.0"])
        assert_failed_at(receipt, "verify", "checksum mismatch", "sem_pcyc.pt")
        assert h.versions() == []
        # neither a final name nor a partial upload remains: only the (empty) blob store
        assert [p.relative_to(h.store).as_posix() for p in h.store.rglob("*")] == [".sem-pcyc-blobs"]
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


# ----------------------------------------------------------------------- broken hosts: a failed step, never a traceback

def assert_failed_at(receipt: dict, step: str, *words: str) -> None:
    assert receipt["status"] == "failed" and receipt["failed_step"] == step, json.dumps(receipt)
    line = receipt["error"]
    assert "\n" not in line and "host-a (127.0.0.1:" in line and f"step {step}" in line, line
    for word in words:
        assert word in line, line


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
    """README's host template (which every Host here runs) registers archives by file name, as deploy does (the
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


# ----------------------------------------------------------------------------------- the stage, several hosts

def stage_project(artifacts, tmp_path: Path, targets: list[dict]) -> Path:
    root = artifacts["root"]
    proj = tmp_path / "proj"
    proj.mkdir()
    for name in ("data", "models"):
        (proj / name).symlink_to(root / name)
    (proj / "reports").mkdir()
    (proj / "reports/serve_check.json").write_text(json.dumps(check_report(artifacts, artifacts["mars"]["0.2.0"])))
    write_params(proj, {"release": {"model_name": "sem_pcyc", "version": "0.2.0"},
                        "serve": {"top_k": 5}, "deploy": {"targets": targets}})
    shutil.copy(artifacts["mars"]["0.2.0"], proj / "release.mar")
    return proj


def check_report(artifacts, mar: Path) -> dict:
    """A passed serve-check report of `mar` with its smoke query, as the serve-check stage writes it."""
    return {"passed": True, "smoke": {"archive_sha256": sha256_file(mar), "sketch": artifacts["sketch_name"],
                                      "k": artifacts["k"], "top10": artifacts["expected"][:10]}}


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


# a target's workers and batching, as torchserve_host.worker_settings writes them into the models JSON
WORKERS1 = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 2, "maxBatchDelay": 1}
WORKERS2 = {"minWorkers": 2, "maxWorkers": 2, "batchSize": 8, "maxBatchDelay": 5}


def test_updated_ts_config_keeps_other_settings():
    text = "inference_address=http://127.0.0.1:1\nload_models=other.mar,sem_pcyc-0.0.1.mar\n" \
           'models={"other": {"1.0": {"marName": "other.mar", "defaultVersion": true}}}\n'
    out = torchserve_host.updated_ts_config(text, "sem_pcyc", ["0.1.0", "0.2.0"], "0.2.0", WORKERS2)
    props = dict(line.split("=", 1) for line in out.splitlines())
    assert props["inference_address"] == "http://127.0.0.1:1"
    # the default first: TorchServe makes the first version it loads the default, whatever the JSON says
    assert props["load_models"] == "sem_pcyc-0.2.0.mar,sem_pcyc-0.1.0.mar,other.mar"
    models = json.loads(props["models"])
    assert models["other"]["1.0"]["marName"] == "other.mar"
    assert models["sem_pcyc"]["0.2.0"]["defaultVersion"] is True
    assert models["sem_pcyc"]["0.1.0"]["defaultVersion"] is False
    assert all(models["sem_pcyc"][v].items() >= WORKERS2.items() for v in ("0.1.0", "0.2.0"))


def test_updated_ts_config_all_other_models_and_extras():
    store = ["zeta.mar", "sem_pcyc-0.1.0.mar", "models-dir", "sem_pcyc-extra-1.0.mar"]
    text = ("# host\nload_models=ALL\nmodels={\"sem_pcyc\": {\"0.1.0\": {\"batchSize\": 4}}, "
            "\"zeta\": {\"2\": {}}}\n")
    out = torchserve_host.updated_ts_config(text, "sem_pcyc", ["0.1.0", "0.2.0"], "0.2.0", WORKERS1, store)
    props = config_props_text(out)
    assert props["load_models"] == "sem_pcyc-0.2.0.mar,sem_pcyc-0.1.0.mar,zeta.mar,models-dir,sem_pcyc-extra-1.0.mar"
    assert out.splitlines()[1] == torchserve_host.ALL_MARKER and out.startswith("# host\n")
    models = json.loads(props["models"])
    # the target's batching replaces what the host had for our versions; other models are left as they were
    assert models["zeta"] == {"2": {}} and models["sem_pcyc"]["0.1.0"]["batchSize"] == 2
    # idempotent, and the marker keeps listing the store at the next deploy
    assert torchserve_host.updated_ts_config(out, "sem_pcyc", ["0.1.0", "0.2.0"], "0.2.0", WORKERS1, store) == out
    later = torchserve_host.updated_ts_config(out, "sem_pcyc", ["0.2.0", "0.3.0"], "0.3.0", WORKERS1,
                                              store + ["new.mar"])
    assert config_props_text(later)["load_models"].endswith(",new.mar") and later.count(torchserve_host.ALL_MARKER) == 1
    # a plain list keeps other models' entries where and as they were (their first is their default)
    listed = "load_models=b-2.mar,sem_pcyc-0.1.0.mar,b-1.mar,sem_pcyc=x/sem_pcyc-0.0.9.mar,c=c.mar\n"
    out = torchserve_host.updated_ts_config(listed, "sem_pcyc", ["0.2.0"], "0.2.0", WORKERS1, store)
    assert config_props_text(out)["load_models"] == "sem_pcyc-0.2.0.mar,b-2.mar,b-1.mar,c=c.mar"


def config_props_text(text: str) -> dict:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))


def test_systemd_unit_stops_java_with_the_wrapper(tmp_path):
    """docs/torchserve.service: stopping the foreground wrapper alone leaves Java running (bench/torchserve_stop.py
    measures it), so the unit stops TorchServe itself and keeps killing the whole control group."""
    unit = (REPO / "docs/torchserve.service").read_text(encoding="utf-8")
    settings = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    assert settings["KillMode"] == ["control-group"]
    assert "--foreground" in settings["ExecStart"][0].split() and "--stop" in settings["ExecStop"][0].split()
    assert any(v.startswith("TMPDIR=") for v in settings["Environment"]) and settings["WorkingDirectory"]
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    local = tmp_path / "torchserve.service"  # with an installed torchserve and an existing user
    local.write_text(unit.replace("/opt/torchserve/bin/torchserve", str(VENV_BIN / "torchserve"))
                     .replace("=torchserve\n", "=root\n"))
    proc = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
