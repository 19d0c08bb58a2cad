"""deploy's blob store: a host is sent only the blobs (the model, the gallery's shards) it lacks, beside a slim
archive; a damaged, deleted or missing blob is sent again, never served as a partial gallery.

Against a real sshd and TorchServe hosts on 127.0.0.1 (tests/hosts.py), with conftest.py's `artifacts` (a tiny
trained model and gallery as several versions), built once a session.
"""
from __future__ import annotations

import hashlib
import io
import json
import zipfile

import pytest

from helpers import repo_params
from hosts import Host, assert_failed_at, blob_sizes, blob_store, do_deploy, stored_blobs
from sempcyc import blobstore, ssh_host
from sempcyc.errors import UserError
from sempcyc.runtime.search import SketchSearch
from sempcyc.serving import same_ranking
from sempcyc.targets import DeploySettings, parse_targets

pytestmark = pytest.mark.integration


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
