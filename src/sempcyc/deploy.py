"""deploy stage: ship the .mar to TorchServe hosts over SSH, register it, smoke-test it, make it the default.

Per target, one at a time (rolling; the first failure stops the rollout):
  1. SSH with host-key checking against the target's known_hosts (unknown or changed key: refused);
  2. already live? (same version is the default and the remote file has the same sha256) -> nothing is sent;
  3. upload under a temporary name, verify its sha256 on the host, rename atomically into the model store;
  4. register (management API, synchronous, initial workers), query that version directly with a known sketch
     and compare with the offline answer, set it as default, unregister versions beyond `keep_versions`;
  5. rewrite the host's TorchServe config (load_models / models) so a restart serves the same default;
  6. on a failure in 4: unregister the new version; the previous default keeps serving; exit non-zero.
Management and inference calls go through the SSH connection (a direct-tcpip channel) to the URLs as seen from
the host, so TorchServe's APIs can stay bound to the host's 127.0.0.1. Secrets (key passphrase, API tokens) come
from the environment or the ssh-agent only, and are never printed. The receipt is reports/deploy.json.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import posixpath
import re
import shlex
import time
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit

import paramiko

from . import params as params_mod
from .errors import UserError
from .fsutil import atomic_write_json, sha256_file
from .runtime.search import SketchSearch
from .serving import ReleaseSettings, ServeSettings, check_response, parse_properties, pick_queries, same_ranking
from .targets import DeploySettings, Target, parse_targets


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mar", default="models/sem_pcyc.mar", help="archive (default: %(default)s)")
    parser.add_argument("--serve-check", default="reports/serve_check.json", help="serve-check report; deploy "
                        "refuses an archive that did not pass (default: %(default)s)")
    parser.add_argument("--model", default="models/sem_pcyc.pt", help="model bundle for the smoke answer")
    parser.add_argument("--gallery", default="models/gallery", help="gallery for the smoke answer")
    parser.add_argument("--dataset", default="data/dataset", help="dataset (smoke-test sketch)")
    parser.add_argument("--splits", default="data/prepared/splits.json", help="split (smoke-test sketch class)")
    parser.add_argument("--out", default="reports/deploy.json", help="receipt (default: %(default)s)")


class DeployError(Exception):
    """A failure on one host; the message names the host and what to do."""


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
        _, stdout, stderr = self.client.exec_command(command, timeout=120)
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

    def upload(self, local: Path, remote: str) -> None:
        def count(done: int, _total: int) -> None:
            self.bytes_sent = done
        self.sftp.put(str(local), remote, callback=count, confirm=True)

    def read_text(self, path: str) -> str:
        with self.sftp.open(path, "r") as handle:
            return handle.read().decode("utf-8")

    def write_text_atomic(self, path: str, text: str) -> None:
        tmp = f"{path}.partial-{uuid.uuid4().hex[:8]}"
        with self.sftp.open(tmp, "w") as handle:
            handle.write(text.encode("utf-8"))
        self.sftp.posix_rename(tmp, path)

    def http(self, method: str, url: str, body: bytes | None = None, token: str | None = None,
             content_type: str | None = None, timeout: float = 120) -> tuple[int, bytes]:
        parts = urlsplit(url)
        port = parts.port or 80
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        conn = http.client.HTTPConnection(parts.hostname, port, timeout=timeout)
        if self.t.tunnel:
            channel = self.client.get_transport().open_channel("direct-tcpip", (parts.hostname, port),
                                                               ("127.0.0.1", 0), timeout=self.t.connect_timeout)
            channel.settimeout(timeout)
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
                 "&synchronous=true")
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


def updated_ts_config(text: str, model_name: str, versions: list[str], default: str, workers: int) -> str:
    """The host's config.properties with this model's load_models/models entries set to `versions`
    (others' entries kept), so a restart serves exactly what the management API serves now."""
    lines = text.splitlines()
    props = parse_properties(text)
    ours = {mar_file_name(model_name, v) for v in versions}
    try:
        models = json.loads(props.get("models", "{}") or "{}")
    except json.JSONDecodeError:
        raise DeployError("the host's TorchServe config has an unreadable models= line; fix it by hand") from None
    models[model_name] = {v: {"defaultVersion": v == default, "marName": mar_file_name(model_name, v),
                              "minWorkers": workers, "maxWorkers": workers, "responseTimeout": 120}
                          for v in versions}
    prefix = f"{model_name}-"
    others = sorted({m.strip() for m in props.get("load_models", "").split(",")
                     if m.strip() and m.strip() != "ALL" and not m.strip().startswith(prefix)})
    # TorchServe 0.12 ignores "defaultVersion" at start-up: the first version loaded becomes the default
    # (measured). So the default's archive goes first, or a restart would serve an older version.
    default_mar = mar_file_name(model_name, default)
    loaded = [default_mar] + sorted(ours - {default_mar}) + others
    new = {"load_models": ",".join(loaded), "models": json.dumps(models, sort_keys=True)}
    out, done = [], set()
    for line in lines:
        key = line.split("=", 1)[0].strip() if "=" in line and not line.lstrip().startswith("#") else None
        if key in new:
            out.append(f"{key}={new[key]}")
            done.add(key)
        else:
            out.append(line)
    out += [f"{k}={v}" for k, v in new.items() if k not in done]
    return "\n".join(out) + "\n"


@dataclass
class HostState:
    """What a host serves before the deploy, as deploy_target found it."""
    final: str                    # the archive's path in the model store
    previous: str | None          # default version
    registered: list[str]
    remote_digest: str | None     # sha256 of `final` on the host, None when absent


def deploy_target(target: Target, mar: Path, version: str, digest: str, smoke_sketch: bytes,
                  smoke_expected: list[dict], k: int) -> dict:
    """Deploy to one host (steps in the module docstring); the receipt says what happened, also on failure."""
    receipt = {"target": target.name, "host": target.host, "version": version, "sha256": digest,
               "bytes_sent": 0, "status": "failed", "previous_default": None, "timings": {}}
    t0 = time.perf_counter()

    def mark(step: str) -> None:
        receipt["timings"][step] = round(time.perf_counter() - t0, 3)

    session = HostSession(target)
    try:
        session.connect()
        mark("connected")
        ts = TorchServeHost(session)
        state = inspect_host(session, ts, version, digest)
        receipt["previous_default"] = state.previous
        if state.previous == version and state.remote_digest == digest:
            receipt.update(status="already live", message=f"version {version} with this checksum is already "
                                                            "the default; nothing sent")
            mark("done")
            return receipt
        if state.remote_digest != digest:
            receipt["bytes_sent"] = upload_verified(session, mar, state.final, digest, mark)
            mark("verified")
        promote(session, ts, version, state, smoke_sketch, smoke_expected, k, receipt, mark)
        receipt["versions_kept"] = apply_retention(session, ts, version)
        if target.ts_config:
            write_host_config(session, version, receipt["versions_kept"])
            mark("config_written")
        receipt["status"] = "deployed"
        mark("done")
        return receipt
    except DeployError as exc:
        receipt["error"] = str(exc)
        receipt["bytes_sent"] = receipt["bytes_sent"] or session.bytes_sent
        mark("failed")
        return receipt
    finally:
        session.close()


def inspect_host(session: HostSession, ts: TorchServeHost, version: str, digest: str) -> HostState:
    t = session.t
    store = t.model_store.rstrip("/")
    if not session.exists(store):
        raise DeployError(f"{t.name}: model store {store} does not exist on the host")
    final = posixpath.join(store, mar_file_name(t.model_name, version))
    state = HostState(final=final, previous=ts.default_version(), registered=ts.versions(),
                      remote_digest=session.sha256(final))
    if version in state.registered and state.remote_digest != digest:
        raise DeployError(f"{t.name}: version {version} is registered there with a different archive "
                          f"(sha256 {str(state.remote_digest)[:12]}…); bump release.version instead of reusing it")
    return state


def upload_verified(session: HostSession, mar: Path, final: str, digest: str, mark) -> int:
    """Upload under a temporary name, check its sha256 on the host, rename into place; bytes sent."""
    t = session.t
    tmp = posixpath.join(posixpath.dirname(final), f".{posixpath.basename(final)}.partial-{uuid.uuid4().hex[:8]}")
    try:
        session.upload(mar, tmp)
        mark("uploaded")
        got = session.sha256(tmp)
        if got != digest:
            raise DeployError(f"{t.name}: checksum mismatch after upload (sent {digest[:12]}…, host "
                              f"has {str(got)[:12]}…); the transfer was damaged, nothing was registered")
        session.sftp.posix_rename(tmp, final)
    finally:
        if session.exists(tmp):
            session.sftp.remove(tmp)
    return session.bytes_sent


def promote(session: HostSession, ts: TorchServeHost, version: str, state: HostState, smoke_sketch: bytes,
            smoke_expected: list[dict], k: int, receipt: dict, mark) -> None:
    """Register (if needed), smoke-query that version, set it default; on failure unregister what was
    registered here, so the previous default keeps serving."""
    registered_here = False
    try:
        if version not in state.registered:
            registered_here = True  # also when register fails: TorchServe may keep a half-loaded version
            ts.register(posixpath.basename(state.final))
            mark("registered")
        status, answer = ts.predict(version, smoke_sketch)
        problem = check_response(status, answer, k)
        if problem is None and not same_ranking(json.loads(answer)[:10], smoke_expected[:10]):
            problem = "the top-10 differs from the offline answer of the same model"
        if problem:
            raise DeployError(f"{session.t.name}: smoke query of version {version} failed: {problem}")
        mark("smoke_ok")
        ts.set_default(version)
        mark("default_set")
    except DeployError:
        if registered_here:
            rollback(session, ts, version, state.final, receipt)
        raise


def rollback(session: HostSession, ts: TorchServeHost, version: str, final: str, receipt: dict) -> None:
    try:
        ts.unregister(version)
        if session.exists(final):
            session.sftp.remove(final)
        receipt["rolled_back"] = True
    except DeployError as exc:
        receipt["rollback_error"] = str(exc)


def apply_retention(session: HostSession, ts: TorchServeHost, version: str) -> list[str]:
    """Unregister (and delete the archives of) versions beyond keep_versions, newest kept; the kept versions."""
    t = session.t
    kept = sorted(set(ts.versions()) | {version}, key=version_key, reverse=True)
    keep = [version] + [v for v in kept if v != version][:max(t.keep_versions - 1, 0)]
    for old in kept:
        if old not in keep:
            ts.unregister(old)
            old_file = posixpath.join(t.model_store.rstrip("/"), mar_file_name(t.model_name, old))
            if session.exists(old_file):
                session.sftp.remove(old_file)
    return sorted(keep, key=version_key)


def write_host_config(session: HostSession, default: str, versions: list[str]) -> None:
    t = session.t
    text = session.read_text(t.ts_config) if session.exists(t.ts_config) else ""
    session.write_text_atomic(t.ts_config, updated_ts_config(text, t.model_name, versions, default, t.workers))


def run(args: argparse.Namespace) -> None:
    release, serve, deploy = params_mod.read(args.params, ReleaseSettings, ServeSettings, DeploySettings)
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
    smoke = smoke_reference(args, serve)
    summary = roll_out(targets, mar, smoke)
    atomic_write_json(out, summary)
    if summary["status"] == "failed":
        failed = next(r["target"] for r in summary["targets"] if r["status"] == "failed")
        raise UserError(f"deploy failed on {failed} (receipt: {out}); hosts done: "
                        f"{', '.join(summary['hosts_with_new_version']) or 'none'}")


def smoke_reference(args: argparse.Namespace, serve: ServeSettings) -> dict:
    """The smoke query: one unseen-class sketch, the offline answer of the same model and gallery, and k."""
    name, sketch = pick_queries(Path(args.dataset), Path(args.splits), per_class=1)[0]
    offline = SketchSearch.load(args.model, args.gallery, top_k=serve.top_k, max_pixels=serve.max_pixels)
    return {"name": name, "sketch": sketch, "expected": offline.search([sketch])[0],
            "k": min(serve.top_k, len(offline.ids))}


def roll_out(targets: list[Target], mar: Path, smoke: dict) -> dict:
    """Deploy to each target in turn, stopping at the first failure; the receipt of the whole rollout."""
    version, digest = mar_version(mar), sha256_file(mar)
    receipts, failed = [], None
    for target in targets:
        if failed is not None:
            receipts.append({"target": target.name, "host": target.host, "status": "not attempted",
                             "reason": f"stopped after the failure on {failed}"})
            continue
        print(f"deploy: {target.name}: v{version} ...", flush=True)
        receipt = deploy_target(target, mar, version, digest, smoke["sketch"], smoke["expected"], smoke["k"])
        receipts.append(receipt)
        print(f"deploy: {target.name}: {receipt['status']}"
              + (f" ({receipt['bytes_sent']:,} bytes sent)" if receipt["status"] == "deployed" else "")
              + (f": {receipt['error']}" if receipt.get("error") else ""), flush=True)
        if receipt["status"] == "failed":
            failed = target.name
    summary = {"version": version, "sha256": digest, "archive": str(mar), "smoke_sketch": smoke["name"],
               "targets": receipts, "hosts_with_new_version": [r["target"] for r in receipts
                                                               if r["status"] in ("deployed", "already live")],
               "status": "failed" if failed else "ok"}
    return summary
