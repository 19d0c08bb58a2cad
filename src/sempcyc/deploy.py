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
import socket
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlsplit

from . import params as params_mod
from .errors import UserError
from .fsutil import atomic_write_json, sha256_file

HELP = "Deploy the .mar to the TorchServe hosts in deploy.targets over SSH (rolling; rollback on failure)."
SECRET_KEYS = re.compile(r"pass|secret|token(?!_env)|password|private", re.I)


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


@dataclass
class Target:
    name: str
    host: str
    model_store: str
    port: int = 22
    user: str = "root"
    key_file: str | None = None          # private key file on this machine; empty -> ssh-agent
    known_hosts: str = "~/.ssh/known_hosts"
    ts_config: str | None = None         # the host's config.properties, kept current for restarts
    management_url: str = "http://127.0.0.1:8081"
    inference_url: str = "http://127.0.0.1:8080"
    tunnel: bool = True                  # reach the URLs through the SSH connection (as seen from the host)
    model_name: str = "sem_pcyc"
    workers: int = 1
    keep_versions: int = 2
    management_token_env: str = "SEM_PCYC_TS_MANAGEMENT_TOKEN"
    inference_token_env: str = "SEM_PCYC_TS_INFERENCE_TOKEN"
    remote_key_file: str | None = None   # the host's TorchServe key_file.json, read over SSH if set
    passphrase_env: str = "SEM_PCYC_SSH_KEY_PASSPHRASE"
    connect_timeout: float = 10.0
    extra: dict = field(default_factory=dict)


def parse_targets(params: dict, model_name: str) -> list[Target]:
    section = params_mod.Section(params, "deploy")
    raw = section.get("targets") or []
    if not isinstance(raw, list):
        raise UserError("params.yaml: deploy.targets must be a list of hosts")
    fields = Target.__dataclass_fields__
    targets = []
    for i, item in enumerate(raw):
        where = f"params.yaml: deploy.targets[{i}]"
        if not isinstance(item, dict):
            raise UserError(f"{where} must be a mapping (host, user, model_store, ...)")
        secrets = [k for k in item if SECRET_KEYS.search(k) and not k.endswith("_env")]
        if secrets:
            raise UserError(f"{where}: {', '.join(secrets)} looks like a secret; secrets never go in params.yaml. "
                            "Put them in environment variables (see *_env settings) or the ssh-agent")
        unknown = [k for k in item if k not in fields or k == "extra"]
        if unknown:
            raise UserError(f"{where}: unknown setting(s) {', '.join(unknown)}; known: "
                            + ", ".join(f for f in fields if f != "extra"))
        for key in ("host", "model_store"):
            if not isinstance(item.get(key), str) or not item.get(key):
                raise UserError(f"{where}.{key} is required (a string)")
        values = dict(item)
        values.setdefault("name", f"{item['host']}:{item.get('port', 22)}")
        values.setdefault("model_name", model_name)
        for key, want in (("port", int), ("workers", int), ("keep_versions", int)):
            if key in values and (isinstance(values[key], bool) or not isinstance(values[key], int)
                                  or values[key] < 1):
                raise UserError(f"{where}.{key} must be a positive integer, got {values[key]!r}")
        if "tunnel" in values and not isinstance(values["tunnel"], bool):
            raise UserError(f"{where}.tunnel must be true or false")
        targets.append(Target(**values))
    return targets



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

    def connect(self) -> "HostSession":
        import paramiko
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
        except (socket.timeout, TimeoutError):
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
            raise DeployError(f"{self.t.name}: `{command}` failed ({rc}): {stderr.read().decode(errors='replace')[:300]}")
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
            raise DeployError(f"{self.t.name}: the {api} API refused the token ({'none given' if not self.tokens[api] else 'wrong or expired'}); "
                              f"set ${env} or deploy.targets remote_key_file (TorchServe's key_file.json)")

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
    from .torchserve import parse_properties
    lines = text.splitlines()
    props = parse_properties(text)
    ours = {mar_file_name(model_name, v) for v in versions}
    try:
        models = json.loads(props.get("models", "{}") or "{}")
    except json.JSONDecodeError:
        raise DeployError(f"the host's TorchServe config has an unreadable models= line; fix it by hand") from None
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


def deploy_target(target: Target, mar: Path, version: str, digest: str, smoke_sketch: bytes,
                  smoke_expected: list[dict], k: int) -> dict:
    from .serve_check import check_response, same_ranking
    receipt = {"target": target.name, "host": target.host, "version": version, "sha256": digest,
               "bytes_sent": 0, "status": "failed", "previous_default": None, "timings": {}}
    t0 = time.perf_counter()

    def mark(step: str) -> None:
        receipt["timings"][step] = round(time.perf_counter() - t0, 3)

    session = HostSession(target)
    registered_here = False
    try:
        session.connect()
        mark("connected")
        ts = TorchServeHost(session)
        store = target.model_store.rstrip("/")
        if not session.exists(store):
            raise DeployError(f"{target.name}: model store {store} does not exist on the host")
        final = posixpath.join(store, mar_file_name(target.model_name, version))
        previous = ts.default_version()
        receipt["previous_default"] = previous
        registered = ts.versions()
        remote_digest = session.sha256(final)
        if previous == version and remote_digest == digest:
            receipt.update(status="already live", message=f"version {version} with this checksum is already "
                                                            "the default; nothing sent")
            mark("done")
            return receipt
        if version in registered and remote_digest != digest:
            raise DeployError(f"{target.name}: version {version} is registered there with a different archive "
                              f"(sha256 {str(remote_digest)[:12]}…); bump release.version instead of reusing it")
        if remote_digest != digest:
            tmp = posixpath.join(store, f".{mar_file_name(target.model_name, version)}.partial-{uuid.uuid4().hex[:8]}")
            try:
                session.upload(mar, tmp)
                receipt["bytes_sent"] = session.bytes_sent
                mark("uploaded")
                got = session.sha256(tmp)
                if got != digest:
                    raise DeployError(f"{target.name}: checksum mismatch after upload (sent {digest[:12]}…, host "
                                      f"has {str(got)[:12]}…); the transfer was damaged, nothing was registered")
                session.sftp.posix_rename(tmp, final)
            finally:
                if session.exists(tmp):
                    session.sftp.remove(tmp)
            mark("verified")
        try:
            if version not in registered:
                registered_here = True  # also when register fails: TorchServe may keep a half-loaded version
                ts.register(posixpath.basename(final))
                mark("registered")
            status, answer = ts.predict(version, smoke_sketch)
            problem = check_response(status, answer, k)
            if problem is None and not same_ranking(json.loads(answer)[:10], smoke_expected[:10]):
                problem = "the top-10 differs from the offline answer of the same model"
            if problem:
                raise DeployError(f"{target.name}: smoke query of version {version} failed: {problem}")
            mark("smoke_ok")
            ts.set_default(version)
            mark("default_set")
        except DeployError:
            if registered_here:
                try:
                    ts.unregister(version)
                    if session.exists(final):
                        session.sftp.remove(final)
                    receipt["rolled_back"] = True
                except DeployError as exc:
                    receipt["rollback_error"] = str(exc)
            raise
        kept = sorted(set(ts.versions()) | {version}, key=version_key, reverse=True)
        keep = [version] + [v for v in kept if v != version][:max(target.keep_versions - 1, 0)]
        for old in kept:
            if old not in keep:
                ts.unregister(old)
                old_file = posixpath.join(store, mar_file_name(target.model_name, old))
                if session.exists(old_file):
                    session.sftp.remove(old_file)
        receipt["versions_kept"] = sorted(keep, key=version_key)
        if target.ts_config:
            text = session.read_text(target.ts_config) if session.exists(target.ts_config) else ""
            session.write_text_atomic(target.ts_config, updated_ts_config(
                text, target.model_name, receipt["versions_kept"], version, target.workers))
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


def run(args: argparse.Namespace) -> None:
    from .archive import read_settings as archive_settings
    from .serve_check import pick_queries
    params = params_mod.load(getattr(args, "params", "params.yaml"))
    settings = archive_settings(params)
    targets = parse_targets(params, settings["model_name"])
    out = Path(args.out)
    mar = Path(args.mar)
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
    version, digest = mar_version(mar), sha256_file(mar)

    from .search import SketchSearch
    name, sketch = pick_queries(Path(args.dataset), Path(args.splits), per_class=1)[0]
    offline = SketchSearch.load(args.model, args.gallery, top_k=settings["top_k"], max_pixels=settings["max_pixels"])
    expected = offline.search([sketch])[0]
    k = min(settings["top_k"], len(offline.ids))

    receipts, failed = [], None
    for target in targets:
        if failed is not None:
            receipts.append({"target": target.name, "host": target.host, "status": "not attempted",
                             "reason": f"stopped after the failure on {failed}"})
            continue
        print(f"deploy: {target.name}: v{version} ...", flush=True)
        receipt = deploy_target(target, mar, version, digest, sketch, expected, k)
        receipts.append(receipt)
        print(f"deploy: {target.name}: {receipt['status']}"
              + (f" ({receipt['bytes_sent']:,} bytes sent)" if receipt["status"] == "deployed" else "")
              + (f": {receipt['error']}" if receipt.get("error") else ""), flush=True)
        if receipt["status"] == "failed":
            failed = target.name
    summary = {"version": version, "sha256": digest, "archive": str(mar), "smoke_sketch": name,
               "targets": receipts, "hosts_with_new_version": [r["target"] for r in receipts
                                                               if r["status"] in ("deployed", "already live")],
               "status": "failed" if failed else "ok"}
    atomic_write_json(out, summary)
    if failed:
        raise UserError(f"deploy failed on {failed} (receipt: {out}); hosts done: "
                        f"{', '.join(summary['hosts_with_new_version']) or 'none'}")
