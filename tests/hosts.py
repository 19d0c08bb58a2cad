"""Servers and helpers for the deploy and release tests, all on 127.0.0.1: sempcyc.testing.hosts's sshd and
TorchServe serving host (the host made from this checkout's docs/hosts.md template and params.yaml deploy
defaults), deploying conftest.py's `artifacts` to such hosts, and an S3 proxy that can refuse writes."""
from __future__ import annotations

import http.client
import http.server
import json
import shutil
import threading
import zipfile
from pathlib import Path

from helpers import REPO, write_params
from sempcyc import blobstore
from sempcyc.fsutil import sha256_file
from sempcyc.stages import deploy
from sempcyc.testing import hosts
from sempcyc.testing.hosts import start_sshd as start_sshd  # re-exported for the test modules
from sempcyc.testing.hosts import target_dict as target_dict
from sempcyc.testing.hosts import wait_port as wait_port


class Host(hosts.Host):
    """A serving host made from this checkout's docs/hosts.md and params.yaml (sempcyc.testing.hosts.Host)."""

    def __init__(self, root: Path, token_auth: bool = False, extra: dict | None = None):
        super().__init__(root, REPO, token_auth, extra)


# ------------------------------------------------------------------------ the deploy tests' archives and hosts

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


def assert_failed_at(receipt: dict, step: str, *words: str) -> None:
    assert receipt["status"] == "failed" and receipt["failed_step"] == step, json.dumps(receipt)
    line = receipt["error"]
    assert "\n" not in line and "host-a (127.0.0.1:" in line and f"step {step}" in line, line
    for word in words:
        assert word in line, line


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


# ------------------------------------------------------------------------------- the release tests' S3 proxy

class S3Proxy:
    """An HTTP proxy in front of moto that can refuse writes (403 AccessDenied, as S3 does for a key without
    s3:PutObject) while reads such as the release's bucket check still pass: a `dvc push` that fails mid-release."""

    def __init__(self, upstream_port: int):
        self.fail_writes = True
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy.fail_writes and self.command in ("PUT", "POST", "DELETE"):
                    payload = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
                               b"<Message>Access Denied</Message></Error>")
                    self.send_response(403)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for key, value in resp.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length", "date", "server"):
                        self.send_header(key, value)
                # a HEAD answer has no body but the object's size (s3fs reads it from there)
                self.send_header("Content-Length", resp.getheader("Content-Length", "0") if self.command == "HEAD"
                                 else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
