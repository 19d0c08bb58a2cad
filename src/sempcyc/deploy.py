"""deploy stage: ship the .mar to TorchServe hosts over SSH, register it, smoke-test it, make it the default.

A host gets a slim copy of the checked archive (blobstore.py: the same code, serving.json and gallery manifest,
without the model and gallery shards, and naming the host's blob store) and the large files separately, stored by
sha256 in its blob store, where every version's archive finds them: a release that keeps the model and most
shards sends only the new shards and the slim archive.

Per target, one at a time (rolling; the first failure stops the rollout):
  1. SSH with host-key checking against the target's known_hosts (unknown or changed key: refused);
  2. already live? (same version is the default and the remote slim archive has the same sha256);
  3. blobs: the host's copies are checked (sha256 on the host); missing or damaged ones are uploaded under a
     temporary name, verified and renamed into place; the list of the blobs this archive uses is written;
  4. unless live: the slim archive the same way into the model store; register (management API, synchronous,
     initial workers), query that version directly with the smoke sketch and compare with the offline top-10
     that serve-check recorded for this very archive (its report's "smoke"), set it as default;
  5. retention: unregister versions beyond `keep_versions` and delete their archives and blob lists, then the
     blobs no list names; rewrite the host's TorchServe config (load_models / models) so a restart serves the same
     default;
  6. on a failure in 4: unregister the new version and remove its archive; the previous default keeps serving;
     exit non-zero.
An already-live host still gets 3 (a blob may have gone missing since) and 5: an earlier run may have stopped
between set-default and the config rewrite. Any SSH, SFTP, socket or HTTP error is a failure of that host's step,
with the rollback of 6 and a receipt, never a traceback.
Management and inference calls go through the SSH connection (a direct-tcpip channel) to the URLs as seen from
the host, so TorchServe's APIs can stay bound to the host's 127.0.0.1. Secrets (key passphrase, API tokens) come
from the environment or the ssh-agent only, and are never printed. The receipt is reports/deploy.json.
"""
from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import posixpath
import re
import shlex
import stat
import tempfile
import time
import uuid
import zipfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import BinaryIO
from urllib.parse import quote, urlsplit

import paramiko

from . import params as params_mod
from .blobstore import (
    PARTIAL,
    REFS_SUFFIX,
    Blob,
    archive_blobs,
    plan_uploads,
    refs_name,
    refs_text,
    unused,
    write_slim_archive,
)
from .errors import UserError
from .fsutil import atomic_write_json, sha256_file
from .serving import (
    SEMVER,
    ReleaseSettings,
    check_response,
    parse_properties,
    same_ranking,
)
from .targets import DeploySettings, Target, blob_store_of, parse_targets


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mar", default="models/sem_pcyc.mar", help="archive (default: %(default)s)")
    parser.add_argument("--serve-check", default="reports/serve_check.json", help="serve-check report; deploy "
                        "refuses an archive that did not pass (default: %(default)s)")
    parser.add_argument("--dataset", default="data/dataset", help="dataset (the smoke query's sketch file)")
    parser.add_argument("--out", default="reports/deploy.json", help="receipt (default: %(default)s)")


class DeployError(Exception):
    """A failure on one host; the message names the host and what to do."""


# What talking to a host can raise besides DeployError: paramiko's SSH errors (ChannelException when the host
# cannot reach a URL), OSError (SFTP refusals such as PermissionError, socket timeouts, dropped connections),
# http.client's protocol errors, and EOFError (a connection closed mid-answer).
TRANSPORT_ERRORS = (paramiko.SSHException, OSError, http.client.HTTPException, EOFError)

# Written above load_models when the host's config had load_models=ALL (see updated_ts_config).
ALL_MARKER = ("# load_models was ALL: deploy lists every archive of model_store here at each deploy, the default "
              "version first (delete this line to stop)")
LOADABLE = (".mar", ".model", ".tar.gz")  # what TorchServe's load_models=ALL loads from the store, with folders


def mar_version(mar: Path) -> str:
    try:
        with zipfile.ZipFile(mar) as z:
            return json.loads(z.read("MAR-INF/MANIFEST.json"))["model"]["modelVersion"]
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError) as exc:
        raise UserError(f"{mar}: not a TorchServe archive ({exc}); run `dvc repro archive`") from None


def version_key(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"[.\-]", version))


# ------------------------------------------------------------------------------------------- one SSH host

class HostSession:
    """SSH, SFTP and HTTP-through-SSH to one target."""

    def __init__(self, target: Target):
        self.t = target
        self.client = None
        self.sftp = None
        self.bytes_sent = 0

    def connect(self) -> HostSession:
        t = self.t
        known_hosts = Path(os.path.expanduser(t.known_hosts))
        client = paramiko.SSHClient()
        if not known_hosts.exists():
            raise DeployError(f"{t.name}: known_hosts file {known_hosts} not found; add the host's key with "
                              f"`ssh-keyscan -p {t.port} {t.host} >> {known_hosts}` after checking its fingerprint")
        try:
            client.load_host_keys(str(known_hosts))
        except (OSError, paramiko.SSHException) as exc:
            raise DeployError(f"{t.name}: cannot read known_hosts {known_hosts}: {exc}") from None
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
        key_file = os.path.expanduser(t.key_file) if t.key_file else None
        if key_file and not Path(key_file).exists():
            raise DeployError(f"{t.name}: SSH key file {key_file} not found (deploy.targets key_file)")
        try:
            client.connect(t.host, port=t.port, username=t.user, key_filename=key_file,
                           passphrase=os.environ.get(t.passphrase_env) or None,
                           allow_agent=key_file is None, look_for_keys=False, timeout=t.connect_timeout,
                           banner_timeout=t.connect_timeout, auth_timeout=t.connect_timeout)
        except paramiko.BadHostKeyException:
            raise DeployError(f"{t.name}: the host key CHANGED since it was recorded in {known_hosts}; refusing "
                              "to connect (possible man-in-the-middle). If the host was really reinstalled, "
                              f"verify the new fingerprint and update {known_hosts}") from None
        except paramiko.AuthenticationException:
            raise DeployError(f"{t.name}: SSH authentication failed for user {t.user!r} "
                              f"({'key ' + key_file if key_file else 'ssh-agent'}); check the key is in the "
                              "host's authorized_keys") from None
        except paramiko.PasswordRequiredException:
            raise DeployError(f"{t.name}: the key {key_file} is encrypted; set its passphrase in "
                              f"${t.passphrase_env} or load it into ssh-agent") from None
        except paramiko.SSHException as exc:
            if "not found in known_hosts" in str(exc):
                raise DeployError(f"{t.name}: unknown host key (not in {known_hosts}); refusing to connect. Add "
                                  f"it after checking its fingerprint: ssh-keyscan -p {t.port} {t.host}") from None
            raise DeployError(f"{t.name}: SSH error: {exc}") from None
        except TimeoutError:
            raise DeployError(f"{t.name}: no SSH answer within {t.connect_timeout:.0f} s; check host, port "
                              "and firewall") from None
        except OSError as exc:
            raise DeployError(f"{t.name}: cannot connect to {t.host}:{t.port} ({exc.strerror or exc}); is sshd "
                              "running and the port right?") from None
        self.client = client
        self.sftp = client.open_sftp()
        return self

    def close(self) -> None:
        for thing in (self.sftp, self.client):
            try:
                if thing is not None:
                    thing.close()
            except Exception:
                pass

    def run(self, command: str, check: bool = True) -> str:
        _, stdout, stderr = self.client.exec_command(command, timeout=self.t.request_timeout)
        out = stdout.read().decode(errors="replace")
        rc = stdout.channel.recv_exit_status()
        if check and rc != 0:
            detail = stderr.read().decode(errors="replace")[:300]
            raise DeployError(f"{self.t.name}: `{command}` failed ({rc}): {detail}")
        return out

    def exists(self, path: str) -> bool:
        try:
            self.sftp.stat(path)
            return True
        except FileNotFoundError:
            return False

    def sha256(self, path: str) -> str | None:
        if not self.exists(path):
            return None
        return self.run(f"sha256sum {shlex.quote(path)}").split()[0]

    def upload(self, source: BinaryIO, remote: str, size: int) -> None:
        """Send `size` bytes read from `source` to `remote`; bytes_sent counts every byte sent to this host."""
        before = self.bytes_sent

        def count(done: int, _total: int) -> None:
            self.bytes_sent = before + done
        self.sftp.putfo(source, remote, file_size=size, callback=count, confirm=True)

    def sha256_many(self, paths: list[str]) -> dict[str, str]:
        """path -> sha256 of those of `paths` that exist on the host (one remote command per 200)."""
        found = {}
        for start in range(0, len(paths), 200):
            quoted = " ".join(shlex.quote(p) for p in paths[start:start + 200])
            for line in self.run(f"sha256sum -- {quoted} 2>/dev/null", check=False).splitlines():
                digest, _, path = line.partition("  ")
                found[path] = digest
        return found

    def listdir(self, folder: str) -> list[str]:
        try:
            return self.sftp.listdir(folder)
        except FileNotFoundError:
            return []

    def makedirs(self, folder: str) -> None:
        """Create `folder` and its missing parents over SFTP (a read-only SFTP server refuses it)."""
        path = "/" if folder.startswith("/") else ""
        for part in [p for p in folder.split("/") if p]:
            path = posixpath.join(path, part) if path else part
            if not self.exists(path):
                self.sftp.mkdir(path)

    def read_text(self, path: str) -> str:
        with self.sftp.open(path, "r") as handle:
            return handle.read().decode("utf-8")

    def remove_quietly(self, path: str) -> None:
        """Remove a leftover if it is there; cleanup never hides the error that made it necessary."""
        try:
            if self.exists(path):
                self.sftp.remove(path)
        except TRANSPORT_ERRORS:
            pass

    def store_entries(self, store: str) -> list[str]:
        """What TorchServe's load_models=ALL would load from `store`, in the directory's own order (both read
        it with readdir): archives and folders, hidden names skipped."""
        entries = []
        for attr in self.sftp.listdir_attr(store):
            name = attr.filename
            if not name.startswith(".") and (stat.S_ISDIR(attr.st_mode or 0) or name.endswith(LOADABLE)):
                entries.append(name)
        return entries

    def write_new(self, path: str, data: bytes) -> None:
        """Replace `path` atomically by a new file of `data` (a file of deploy's own: mode and owner are the
        SSH user's defaults)."""
        tmp = f"{posixpath.dirname(path)}/.{posixpath.basename(path)}{PARTIAL}{uuid.uuid4().hex[:8]}"
        try:
            with self.sftp.open(tmp, "w") as handle:
                handle.write(data)
            self.sftp.posix_rename(tmp, path)
        finally:
            self.remove_quietly(tmp)

    def write_text_atomic(self, path: str, text: str) -> None:
        """Replace `path` by a new file with the old one's mode and owner. When the SSH user may not create a
        file there or give it that owner (not root), the old file is rewritten in place instead: same inode, so
        mode and owner stay, at the cost of atomicity (one small write; TorchServe reads it only at start)."""
        data = text.encode("utf-8")
        try:
            old = self.sftp.stat(path)
        except FileNotFoundError:
            old = None
        tmp = f"{path}.partial-{uuid.uuid4().hex[:8]}"
        try:
            with self.sftp.open(tmp, "w") as handle:
                handle.write(data)
            if old is not None:
                self.sftp.chmod(tmp, stat.S_IMODE(old.st_mode))
                new = self.sftp.stat(tmp)
                if (new.st_uid, new.st_gid) != (old.st_uid, old.st_gid):
                    self.sftp.chown(tmp, old.st_uid, old.st_gid)
            self.sftp.posix_rename(tmp, path)
        except PermissionError:
            if old is None:
                raise
            with self.sftp.open(path, "w") as handle:
                handle.write(data)
        finally:
            self.remove_quietly(tmp)

    def http(self, method: str, url: str, body: bytes | None = None, token: str | None = None,
             content_type: str | None = None) -> tuple[int, bytes]:
        parts = urlsplit(url)
        port = parts.port or 80
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        conn = http.client.HTTPConnection(parts.hostname, port, timeout=self.t.request_timeout)
        if self.t.tunnel:
            try:
                channel = self.client.get_transport().open_channel(
                    "direct-tcpip", (parts.hostname, port), ("127.0.0.1", 0), timeout=self.t.connect_timeout)
            except paramiko.SSHException as exc:
                raise DeployError(f"{self.t.name}: the host cannot connect to {parts.netloc} for {method} "
                                  f"{parts.path} ({exc}); is TorchServe running there and the URL right "
                                  "(management_url / inference_url, as seen from the host)?") from None
            channel.settimeout(self.t.request_timeout)
            conn.sock = channel
        headers = {}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if content_type:
            headers["Content-Type"] = content_type
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise DeployError(f"{self.t.name}: {method} {parts.scheme}://{parts.netloc}{parts.path} failed: "
                              f"{exc}; is TorchServe running on the host?") from None
        finally:
            conn.close()


# ----------------------------------------------------------------------------------------- per-host steps

class TorchServeHost:
    """TorchServe's management and inference APIs of one host, reached through its HostSession."""

    def __init__(self, session: HostSession):
        self.s, self.t = session, session.t
        self.tokens = self._tokens()

    def _tokens(self) -> dict:
        tokens = {"management": os.environ.get(self.t.management_token_env),
                  "inference": os.environ.get(self.t.inference_token_env)}
        if self.t.remote_key_file and not all(tokens.values()):
            try:
                keys = json.loads(self.s.read_text(self.t.remote_key_file))
            except (OSError, json.JSONDecodeError) as exc:
                raise DeployError(f"{self.t.name}: cannot read TorchServe key file {self.t.remote_key_file}: "
                                  f"{exc}") from None
            tokens["management"] = tokens["management"] or keys.get("management", {}).get("key")
            tokens["inference"] = tokens["inference"] or keys.get("inference", {}).get("key")
        return tokens

    def mgmt(self, method: str, path: str) -> tuple[int, object]:
        status, body = self.s.http(method, self.t.management_url.rstrip("/") + path, token=self.tokens["management"])
        self._check_token(status, body, "management", self.t.management_token_env)
        try:
            return status, json.loads(body) if body else None
        except json.JSONDecodeError:
            return status, body.decode(errors="replace")

    def _check_token(self, status: int, body: bytes, api: str, env: str) -> None:
        # TorchServe answers a missing or stale token with 400 InvalidKeyException (401 in some versions)
        if status in (400, 401) and (b"InvalidKeyException" in body or b"Token Authorization" in body):
            why = "wrong or expired" if self.tokens[api] else "none given"
            raise DeployError(f"{self.t.name}: the {api} API refused the token ({why}); set ${env} or "
                              "deploy.targets remote_key_file (TorchServe's key_file.json)")

    def versions(self) -> list[str]:
        status, body = self.mgmt("GET", f"/models/{self.t.model_name}/all")
        if status == 404:
            return []
        if status != 200:
            raise DeployError(f"{self.t.name}: listing versions failed ({status}): {body}")
        return [m["modelVersion"] for m in body]

    def default_version(self) -> str | None:
        status, body = self.mgmt("GET", f"/models/{self.t.model_name}")
        if status == 404:
            return None
        if status != 200:
            raise DeployError(f"{self.t.name}: describing {self.t.model_name} failed ({status}): {body}")
        return body[0]["modelVersion"] if body else None

    def register(self, mar_name: str) -> None:
        query = (f"url={quote(mar_name)}&model_name={quote(self.t.model_name)}&initial_workers={self.t.workers}"
                 f"&batch_size={self.t.batch_size}&max_batch_delay={self.t.max_batch_delay_ms}&synchronous=true")
        status, body = self.mgmt("POST", f"/models?{query}")
        if status == 405 or (status == 400 and "model api" in str(body).lower()):
            raise DeployError(f"{self.t.name}: TorchServe refuses registration (start it with "
                              f"enable_model_api=true): {body}")
        if status != 200:
            raise DeployError(f"{self.t.name}: registering {mar_name} failed ({status}): {body}")

    def unregister(self, version: str) -> None:
        status, body = self.mgmt("DELETE", f"/models/{self.t.model_name}/{version}")
        if status not in (200, 404):
            raise DeployError(f"{self.t.name}: unregistering version {version} failed ({status}): {body}")

    def set_default(self, version: str) -> None:
        status, body = self.mgmt("PUT", f"/models/{self.t.model_name}/{version}/set-default")
        if status != 200:
            raise DeployError(f"{self.t.name}: set-default {version} failed ({status}): {body}")

    def predict(self, version: str, sketch: bytes) -> tuple[int, bytes]:
        url = f"{self.t.inference_url.rstrip('/')}/predictions/{self.t.model_name}/{version}"
        status, body = self.s.http("POST", url, sketch, token=self.tokens["inference"], content_type="image/png")
        self._check_token(status, body, "inference", self.t.inference_token_env)
        return status, body


def mar_file_name(model_name: str, version: str) -> str:
    return f"{model_name}-{version}.mar"


def is_ours(entry: str, model_name: str) -> bool:
    """Whether a load_models entry (`url` or `name=url`, as TorchServe splits it) is one of this model's
    archives as deploy names them: `other=x.mar` or `sem_pcyc-extra-1.0.mar` (another model) are not."""
    name, sep, _ = entry.partition("=")
    if sep:
        return name.strip() == model_name
    base = posixpath.basename(entry.strip())
    prefix = f"{model_name}-"
    return base.startswith(prefix) and base.endswith(".mar") and SEMVER.match(base[len(prefix):-4]) is not None


def updated_ts_config(text: str, model_name: str, versions: list[str], default: str, workers: dict,
                      store_entries: list[str] = ()) -> str:
    """The host's config.properties with this model's load_models/models entries set to `versions`, the
    default's archive first; everything else kept: other settings and comments, other models' entries in their
    order (the first version TorchServe loads of a model is its default, theirs too), extra JSON keys.

    TorchServe 0.12 ignores "defaultVersion" at start-up (the JSON only gives workers) and makes the first
    version it loads the default (measured). load_models=ALL loads the model store in directory order, so the
    default cannot be put first there: ALL becomes the list of what ALL loads now (`store_entries`, in directory
    order), marked with ALL_MARKER so that every later deploy lists the store again."""
    props = parse_properties(text)
    listed = [m.strip() for m in props.get("load_models", "").split(",") if m.strip()]
    expand_all = props.get("load_models", "").upper() == "ALL" or ALL_MARKER in (ln.strip() for ln in text.splitlines())
    others = [e for e in (store_entries if expand_all else listed) if not is_ours(e, model_name)]
    newest_first = sorted(set(versions) - {default}, key=version_key, reverse=True)
    loaded = [mar_file_name(model_name, v) for v in [default, *newest_first]] + others
    new = {"load_models": ",".join(dict.fromkeys(loaded)),
           "models": json.dumps(models_json(props, model_name, versions, default, workers), sort_keys=True)}
    return set_properties(text, new, ALL_MARKER if expand_all else None)


def models_json(props: dict, model_name: str, versions: list[str], default: str, workers: dict) -> dict:
    """The `models` JSON with this model's entry set to `versions`; other models and keys of ours kept. `workers`:
    minWorkers, maxWorkers, batchSize and maxBatchDelay of every version (worker_settings)."""
    try:
        models = json.loads(props.get("models", "{}") or "{}")
    except json.JSONDecodeError:
        models = None
    if not isinstance(models, dict):
        raise DeployError("the host's TorchServe config has an unreadable models= line; fix it by hand")
    before = models.get(model_name) if isinstance(models.get(model_name), dict) else {}
    models[model_name] = {v: {"responseTimeout": 120, **(before.get(v) or {}), "defaultVersion": v == default,
                              "marName": mar_file_name(model_name, v), **workers}
                          for v in versions}
    return models


def worker_settings(t: Target) -> dict:
    """A target's workers and batching as TorchServe's models JSON names them."""
    return {"minWorkers": t.workers, "maxWorkers": t.workers, "batchSize": t.batch_size,
            "maxBatchDelay": t.max_batch_delay_ms}


def set_properties(text: str, new: dict, marker: str | None) -> str:
    """`text` with the lines of `new`'s keys replaced in place (appended if absent); `marker` above load_models."""
    out, done = [], set()
    for line in text.splitlines():
        if line.strip() == ALL_MARKER:
            continue  # written again right above load_models when still wanted
        key = line.split("=", 1)[0].strip() if "=" in line and not line.lstrip().startswith("#") else None
        if key in new:
            out += ([marker] if key == "load_models" and marker else []) + [f"{key}={new[key]}"]
            done.add(key)
        else:
            out.append(line)
    for key, value in new.items():
        if key not in done:
            out += ([marker] if key == "load_models" and marker else []) + [f"{key}={value}"]
    return "\n".join(out) + "\n"


@dataclass(frozen=True)
class Release:
    """The checked full archive deploy ships: its version, sha256 and large files (blobs)."""
    mar: Path
    version: str
    digest: str
    blobs: list[Blob]


def release_of(mar: Path) -> Release:
    return Release(mar, mar_version(mar), sha256_file(mar), archive_blobs(mar))


@dataclass(frozen=True)
class Shipment:
    """What one host gets: the release's blobs for its blob store `store`, and the slim archive made for it."""
    release: Release
    store: str
    slim: Path
    digest: str      # the slim archive's sha256: what the host's model store holds


@dataclass
class HostState:
    """What a host serves before the deploy, as deploy_target found it."""
    final: str                    # the archive's path in the model store
    refs: str                     # the list of the blobs it uses, in the blob store
    previous: str | None          # default version
    registered: list[str]
    remote_digest: str | None     # sha256 of `final` on the host, None when absent


class Progress:
    """The step deploy_target is in (a failure names it) and when each step ended (the receipt's timings)."""

    def __init__(self, receipt: dict):
        self.receipt, self.step, self.t0 = receipt, "connect", time.perf_counter()

    def begin(self, step: str) -> None:
        self.step = step

    def done(self, step: str) -> None:
        self.receipt["timings"][step] = round(time.perf_counter() - self.t0, 3)


def deploy_target(target: Target, release: Release, smoke_sketch: bytes, smoke_expected: list[dict],
                  k: int) -> dict:
    """Deploy `release` to one host as a slim archive + blobs (steps in the module docstring); the receipt says
    what happened, also on failure."""
    store = blob_store_of(target)
    with tempfile.TemporaryDirectory(prefix="sem-pcyc-slim-") as tmp:
        slim = write_slim_archive(release.mar, store, Path(tmp) / mar_file_name(target.model_name, release.version))
        shipment = Shipment(release, store, slim, sha256_file(slim))
        return ship(target, shipment, smoke_sketch, smoke_expected, k)


def ship(target: Target, shipment: Shipment, smoke_sketch: bytes, smoke_expected: list[dict], k: int) -> dict:
    version = shipment.release.version
    receipt = {"target": target.name, "host": target.host, "version": version, "sha256": shipment.digest,
               "archive_sha256": shipment.release.digest, "slim_archive_bytes": shipment.slim.stat().st_size,
               "bytes_sent": 0, "status": "failed", "previous_default": None, "timings": {}}
    progress = Progress(receipt)
    session = HostSession(target)
    try:
        session.connect()
        progress.done("connected")
        progress.begin("inspect")
        ts = TorchServeHost(session)
        state = inspect_host(session, ts, version, shipment.digest)
        receipt["previous_default"] = state.previous
        live = state.previous == version and state.remote_digest == shipment.digest
        receipt["blobs"] = sync_blobs(session, shipment, state.refs, progress)
        if live and receipt["blobs"]["sent"]:
            # its workers may have failed to load without them (a restart since): the query waits for TorchServe's
            # next worker start, which now finds every file
            progress.begin("smoke")
            smoke_query(session, ts, version, smoke_sketch, smoke_expected, k)
            progress.done("smoke_ok")
        if not live:
            if state.remote_digest != shipment.digest:
                upload_verified(session, shipment.slim, state.final, shipment.digest, progress)
            promote(session, ts, version, state, smoke_sketch, smoke_expected, k, receipt, progress)
        finish_host(session, ts, version, receipt, progress)
        receipt["status"] = "already live" if live else "deployed"
        if live:
            receipt["message"] = (f"version {version} with this checksum is already the default; " + (
                f"re-sent {len(receipt['blobs']['sent'])} missing or damaged blob(s)" if receipt["blobs"]["sent"]
                else "nothing sent"))
        progress.done("done")
    except (DeployError, *TRANSPORT_ERRORS) as exc:
        receipt.update(error=failure_line(target, progress.step, exc), failed_step=progress.step)
        progress.done("failed")
    finally:
        receipt["bytes_sent"] = session.bytes_sent
        session.close()
    return receipt


def failure_line(target: Target, step: str, exc: BaseException) -> str:
    """One line naming the host and the step: a DeployError's own advice, or a transport error's type and text."""
    if isinstance(exc, DeployError):
        detail = str(exc).removeprefix(f"{target.name}: ")
    elif isinstance(exc, PermissionError):
        detail = (f"{exc}: the SSH user {target.user!r} may not do this on the host; check the permissions of "
                  f"{target.model_store}, {blob_store_of(target)} and {target.ts_config or 'the TorchServe config'}")
    else:
        detail = (f"{type(exc).__name__}: {exc or 'connection closed'}; check the host and the network, then "
                  "rerun the deploy (it resumes: an already-live host only gets retention and the config check)")
    return " ".join(f"{target.name} ({target.host}:{target.port}), step {step}: {detail}".split())


def inspect_host(session: HostSession, ts: TorchServeHost, version: str, digest: str) -> HostState:
    t = session.t
    store = t.model_store.rstrip("/")
    try:
        is_dir = stat.S_ISDIR(session.sftp.stat(store).st_mode or 0)
    except FileNotFoundError:
        raise DeployError(f"{t.name}: model store {store} does not exist on the host") from None
    if not is_dir:
        raise DeployError(f"{t.name}: model store {store} is not a folder on the host; fix deploy.targets "
                          "model_store (TorchServe's model_store)")
    name = mar_file_name(t.model_name, version)
    final = posixpath.join(store, name)
    state = HostState(final=final, refs=posixpath.join(blob_store_of(t), refs_name(name)),
                      previous=ts.default_version(), registered=ts.versions(), remote_digest=session.sha256(final))
    if version in state.registered and state.remote_digest != digest:
        raise DeployError(f"{t.name}: version {version} is registered there with a different archive "
                          f"(sha256 {str(state.remote_digest)[:12]}…); bump release.version instead of reusing it")
    return state


def sync_blobs(session: HostSession, shipment: Shipment, refs: str, progress: Progress) -> dict:
    """Check the host's copies of the release's blobs (sha256 on the host), send the missing and damaged ones,
    and record which blobs this archive uses (before the archive is there, so retention never takes them)."""
    progress.begin("blobs")
    blobs, before, store = shipment.release.blobs, session.bytes_sent, shipment.store
    on_host = session.sha256_many([posixpath.join(store, b.sha256) for b in blobs])
    send, reused = plan_uploads(blobs, {posixpath.basename(p): d for p, d in on_host.items()})
    progress.done("blobs_checked")
    progress.begin("upload")
    if send:
        session.makedirs(store)
        upload_blobs(session, shipment, [b for b, _ in send], progress)
        progress.done("blobs_sent")
    text = refs_text(blobs)
    if not session.exists(refs) or session.read_text(refs) != text:
        session.write_new(refs, text.encode("utf-8"))
    return {"store": store, "bytes_sent": session.bytes_sent - before, "reused": len(reused),
            "reused_bytes": sum(b.size for b in reused),
            "sent": [{"file": b.member, "sha256": b.sha256, "bytes": b.size, "why": why} for b, why in send]}


def upload_blobs(session: HostSession, shipment: Shipment, blobs: list[Blob], progress: Progress) -> None:
    """The blobs, read from the full archive, into the host's blob store under their sha256 names."""
    with zipfile.ZipFile(shipment.release.mar) as zf:
        upload_checked(session, [(partial(zf.open, blob.member), blob.size, posixpath.join(shipment.store, blob.sha256),
                                  blob.sha256, blob.member) for blob in blobs], progress)


def upload_verified(session: HostSession, mar: Path, final: str, digest: str, progress: Progress) -> None:
    """The slim archive into the model store."""
    upload_checked(session, [(partial(open, mar, "rb"), mar.stat().st_size, final, digest, "the archive")], progress)
    progress.done("verified")


def upload_checked(session: HostSession, files: list[tuple], progress: Progress) -> None:
    """Upload each (opener, size, final path, sha256, what) under a temporary hidden name beside its final path,
    check them all with one sha256 pass on the host (one command per 200 files, not one per file), then rename
    each into place: a final path is absent, the old file or the whole new one, never part of one."""
    tmps: dict[str, tuple[str, str, str]] = {}
    try:
        progress.begin("upload")
        for opener, size, final, digest, what in files:
            tmp = posixpath.join(posixpath.dirname(final),
                                 f".{posixpath.basename(final)}{PARTIAL}{uuid.uuid4().hex[:8]}")
            tmps[tmp] = (final, digest, what)
            with opener() as source:
                session.upload(source, tmp, size)
        progress.begin("verify")
        got = session.sha256_many(list(tmps))
        for tmp, (_, digest, what) in tmps.items():
            if got.get(tmp) != digest:
                raise DeployError(f"{session.t.name}: checksum mismatch after uploading {what} (sent {digest[:12]}…, "
                                  f"host has {str(got.get(tmp))[:12]}…); the transfer was damaged, nothing was "
                                  "registered")
        for tmp in list(tmps):
            session.sftp.posix_rename(tmp, tmps.pop(tmp)[0])
    finally:
        for tmp in tmps:
            session.remove_quietly(tmp)


def promote(session: HostSession, ts: TorchServeHost, version: str, state: HostState, smoke_sketch: bytes,
            smoke_expected: list[dict], k: int, receipt: dict, progress: Progress) -> None:
    """Register (if needed), smoke-query that version, set it default; on any failure unregister what was
    registered here, so the previous default keeps serving."""
    registered_here = False
    try:
        if version not in state.registered:
            progress.begin("register")
            registered_here = True  # also when register fails: TorchServe may keep a half-loaded version
            ts.register(posixpath.basename(state.final))
            progress.done("registered")
        progress.begin("smoke")
        smoke_query(session, ts, version, smoke_sketch, smoke_expected, k)
        progress.done("smoke_ok")
        progress.begin("set-default")
        ts.set_default(version)
        progress.done("default_set")
    except (DeployError, *TRANSPORT_ERRORS):
        if registered_here:
            rollback(session, ts, version, state, receipt)
        raise


def smoke_query(session: HostSession, ts: TorchServeHost, version: str, smoke_sketch: bytes,
                smoke_expected: list[dict], k: int) -> None:
    """Query that version with the known sketch: a valid answer whose top-10 is the offline one, or DeployError."""
    status, answer = ts.predict(version, smoke_sketch)
    problem = check_response(status, answer, k)
    if problem is None and not same_ranking(json.loads(answer)[:10], smoke_expected[:10]):
        problem = "the top-10 differs from the offline answer of the same model"
    if problem:
        raise DeployError(f"{session.t.name}: smoke query of version {version} failed: {problem}")


def rollback(session: HostSession, ts: TorchServeHost, version: str, state: HostState, receipt: dict) -> None:
    """Unregister the new version and remove its archive and blob list (its blobs go at the next retention,
    unless the retry needs them)."""
    try:
        ts.unregister(version)
        for path in (state.final, state.refs):
            if session.exists(path):
                session.sftp.remove(path)
        receipt["rolled_back"] = True
    except (DeployError, *TRANSPORT_ERRORS) as exc:
        receipt["rollback_error"] = " ".join(f"{type(exc).__name__}: {exc}".split())


def finish_host(session: HostSession, ts: TorchServeHost, version: str, receipt: dict, progress: Progress) -> None:
    """Retention and the config, also on an already-live host: an earlier run may have stopped after set-default
    and before them, and a stale config would bring the old default back at the next TorchServe start."""
    progress.begin("retention")
    receipt["versions_kept"] = apply_retention(session, ts, version)
    receipt["blobs_removed"] = remove_unused_blobs(session, blob_store_of(session.t))
    progress.done("retention")
    if session.t.ts_config:
        progress.begin("config")
        receipt["config_rewritten"] = write_host_config(session, version, receipt["versions_kept"])
        progress.done("config_written")


def apply_retention(session: HostSession, ts: TorchServeHost, version: str) -> list[str]:
    """Unregister versions beyond keep_versions, newest kept, and delete their archives and blob lists; the kept
    versions."""
    t = session.t
    kept = sorted(set(ts.versions()) | {version}, key=version_key, reverse=True)
    keep = [version] + [v for v in kept if v != version][:max(t.keep_versions - 1, 0)]
    for old in kept:
        if old not in keep:
            ts.unregister(old)
            name = mar_file_name(t.model_name, old)
            for path in (posixpath.join(t.model_store.rstrip("/"), name),
                         posixpath.join(blob_store_of(t), refs_name(name))):
                if session.exists(path):
                    session.sftp.remove(path)
    return sorted(keep, key=version_key)


def remove_unused_blobs(session: HostSession, store: str) -> list[str]:
    """Delete the blobs no archive's list names (and leftovers of interrupted uploads); their names. Lists of
    this model's archives that are not in the model store (a deploy that failed before its archive got there)
    are deleted first."""
    t, refs = session.t, []
    for name in session.listdir(store):
        mar = name.removesuffix(REFS_SUFFIX)
        if name == mar:
            continue
        if is_ours(mar, t.model_name) and not session.exists(posixpath.join(t.model_store.rstrip("/"), mar)):
            session.sftp.remove(posixpath.join(store, name))
        else:
            refs.append(session.read_text(posixpath.join(store, name)))
    doomed = unused(session.listdir(store), refs)
    for name in doomed:
        session.sftp.remove(posixpath.join(store, name))
    return doomed


def write_host_config(session: HostSession, default: str, versions: list[str]) -> bool:
    """Bring the host's config up to date; True when it had to be rewritten."""
    t = session.t
    text = session.read_text(t.ts_config) if session.exists(t.ts_config) else ""
    new = updated_ts_config(text, t.model_name, versions, default, worker_settings(t),
                            session.store_entries(t.model_store.rstrip("/")))
    if new == text:
        return False
    session.write_text_atomic(t.ts_config, new)
    return True


def run(args: argparse.Namespace) -> None:
    # paramiko logs the failures reported here (from its transport thread, with tracebacks) and, with no handler
    # configured, logging's last resort prints them to stderr: the receipt and the one-line error say it instead
    logging.getLogger("paramiko").addHandler(logging.NullHandler())
    release, deploy = params_mod.read(args.params, ReleaseSettings, DeploySettings)
    targets = parse_targets(deploy, release.model_name)
    out, mar = Path(args.out), Path(args.mar)
    if not targets:
        atomic_write_json(out, {"status": "no targets", "message": "deploy.targets is empty; nothing deployed",
                                "targets": []})
        print("deploy: no targets configured (deploy.targets in params.yaml); nothing to do")
        return
    if not mar.exists():
        raise UserError(f"{mar}: not found; run `dvc repro archive`")
    try:
        check = json.loads(Path(args.serve_check).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{args.serve_check}: not found; run `dvc repro serve-check` first") from None
    if not check.get("passed"):
        raise UserError(f"{args.serve_check}: the archive did not pass serve-check; not deploying")
    release_to_ship = release_of(mar)
    smoke = smoke_from_check(check, Path(args.serve_check), release_to_ship, Path(args.dataset))
    summary = roll_out(targets, release_to_ship, smoke)
    atomic_write_json(out, summary)
    if summary["status"] == "failed":
        failed = next(r for r in summary["targets"] if r["status"] == "failed")
        raise UserError(f"deploy failed on {failed['target']}: {failed.get('error')} (receipt: {out}; hosts "
                        f"done: {', '.join(summary['hosts_with_new_version']) or 'none'})")


def smoke_from_check(check: dict, report: Path, release: Release, dataset: Path) -> dict:
    """The smoke query serve-check recorded for this very archive: its sketch (read from the dataset), the offline
    top-10 the served answer matched there, and k."""
    smoke = check.get("smoke") or {}
    if smoke.get("archive_sha256") != release.digest:
        raise UserError(f"{report}: made for another archive than {release.mar} (or by an older serve-check); run "
                        "`dvc repro serve-check` first")
    path = dataset / "sketches" / smoke["sketch"]
    try:
        sketch = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"{path}: not found (the smoke query's sketch); run `dvc repro extract`") from None
    return {"name": smoke["sketch"], "sketch": sketch, "expected": smoke["top10"], "k": smoke["k"]}


def roll_out(targets: list[Target], release: Release, smoke: dict) -> dict:
    """Deploy to each target in turn, stopping at the first failure; the receipt of the whole rollout."""
    receipts, failed = [], None
    for target in targets:
        if failed is not None:
            receipts.append({"target": target.name, "host": target.host, "status": "not attempted",
                             "reason": f"stopped after the failure on {failed}"})
            continue
        print(f"deploy: {target.name}: v{release.version} ...", flush=True)
        receipt = deploy_target(target, release, smoke["sketch"], smoke["expected"], smoke["k"])
        receipts.append(receipt)
        print(f"deploy: {target.name}: {receipt['status']} ({sent_line(receipt)})"
              + (f": {receipt['error']}" if receipt.get("error") else ""), flush=True)
        if receipt["status"] == "failed":
            failed = target.name
    summary = {"version": release.version, "sha256": release.digest, "archive": str(release.mar),
               "smoke_sketch": smoke["name"], "targets": receipts,
               "hosts_with_new_version": [r["target"] for r in receipts if r["status"] in ("deployed", "already live")],
               "status": "failed" if failed else "ok"}
    return summary


def sent_line(receipt: dict) -> str:
    blobs = receipt.get("blobs") or {}
    line = f"{receipt['bytes_sent']:,} bytes sent"
    if blobs:
        line += f"; blobs: {len(blobs['sent'])} sent, {blobs['reused']} already there"
    return line
