"""Servers on 127.0.0.1 with free ports, stopped by PID, for the deploy and release tests and benches: a real
OpenSSH sshd with its own keys and config, and a TorchServe serving "host" started from its own config.properties
with the documented start command, so restarts read what deploy wrote. Test and bench infrastructure (see
__init__.py).

A host is made from a repository's files: the config.properties template its docs/hosts.md documents and the
deploy defaults of its params.yaml; callers pass the repository root."""
from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import time
from pathlib import Path

import yaml

from sempcyc.params import read_mapping
from sempcyc.serving import parse_properties
from sempcyc.targets import Target
from sempcyc.torchserve import TorchServe, free_port, free_worker_port

SSHD = "/usr/sbin/sshd"
HOST_CONFIG_DOC = "docs/hosts.md"  # in a repository: the serving hosts' page, with the config.properties template
TEMPLATE = re.compile(r"```properties\n# /srv/torchserve/config.properties\n(.*?)```", re.S)


def wait_port(port: int, deadline: float = 15) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


@contextlib.contextmanager
def start_sshd(d: Path, sftp: str = "internal-sftp"):
    """A real OpenSSH sshd on a free 127.0.0.1 port with its own host key, config, pid file and one client key;
    also writes known_hosts files: the right key, a different (\"changed\") key, and none. `sftp` is its SFTP
    subsystem (`internal-sftp -R`: a read-only one, which refuses every write even to root)."""
    assert Path(SSHD).exists(), "openssh-server is not installed; run scripts/system-deps.sh (make test does)"
    for name in ("host_key", "client_key", "other_key", "other_host_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    port = free_port()
    config = d / "sshd_config"
    config.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {d / 'host_key'}", f"PidFile {d / 'sshd.pid'}",
        f"AuthorizedKeysFile {d / 'authorized_keys'}", "UsePAM no", "StrictModes no", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "PubkeyAuthentication yes", "PermitRootLogin prohibit-password",
        "AllowTcpForwarding yes", f"Subsystem sftp {sftp}", "LogLevel ERROR", ""]))
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)
    log = open(d / "sshd.log", "wb")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_port(port)
        host_pub = (d / "host_key.pub").read_text().split()[:2]
        (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {' '.join(host_pub)}\n")
        other_pub = (d / "other_host_key.pub").read_text().split()[:2]
        (d / "known_hosts_changed").write_text(f"[127.0.0.1]:{port} {' '.join(other_pub)}\n")
        (d / "known_hosts_empty").write_text("")
        yield {"port": port, "dir": d, "key": d / "client_key", "known_hosts": d / "known_hosts"}
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def host_config(doc: Path) -> dict[str, str]:
    """The host config.properties template `doc` documents (a fenced ```properties block whose first line is
    "# /srv/torchserve/config.properties"), key -> value."""
    block = TEMPLATE.search(doc.read_text(encoding="utf-8"))
    assert block, f"{doc} lost its host config.properties template"
    return parse_properties(block.group(1))


class Host:
    """A serving host: a model store and the config.properties template of `repo`'s docs/hosts.md (addresses and
    paths made local, plus `extra` settings), TorchServe started with the documented command; its deploy targets
    start from `repo`'s params.yaml deploy.defaults."""

    def __init__(self, root: Path, repo: Path, token_auth: bool = False, extra: dict | None = None):
        self.root = root
        self.store = root / "model-store"
        self.store.mkdir(parents=True)
        self.config = root / "config.properties"
        props = host_config(repo / HOST_CONFIG_DOC)
        assert props["model_store"] == "/srv/torchserve/model-store", props
        props.update({
            "inference_address": f"http://127.0.0.1:{free_port()}",
            "management_address": f"http://127.0.0.1:{free_port()}",
            "metrics_address": f"http://127.0.0.1:{free_port()}",
            "grpc_inference_port": free_port(), "grpc_management_port": free_port(),
            "initial_worker_port": free_worker_port(), "initial_distribution_port": free_port(),
            "model_store": str(self.store), "disable_token_authorization": "false" if token_auth else "true",
            **(extra or {})})
        self.config.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        params = yaml.safe_load((repo / "params.yaml").read_text(encoding="utf-8"))
        self.deploy_defaults = params["deploy"]["defaults"]
        self.token_auth = token_auth
        self.ts: TorchServe | None = None

    def start(self) -> Host:
        self.ts = TorchServe(self.store, workdir=self.root / "run", config_file=self.config,
                             token_auth=self.token_auth)
        self.ts.start()
        self.ts.wait_ready(None, 60)
        wait_port(self.ts.management_port)  # /ping answers on the inference port, which may be bound first
        return self

    def stop(self) -> None:
        if self.ts is not None:
            self.ts.stop()

    def restart(self) -> None:
        self.stop()
        self.start()

    def default(self) -> str | None:
        status, body = self.ts.request("GET", f"{self.ts.management_url}/models/sem_pcyc")
        return json.loads(body)[0]["modelVersion"] if status == 200 else None

    def versions(self) -> list[str]:
        status, body = self.ts.request("GET", f"{self.ts.management_url}/models/sem_pcyc/all")
        return sorted(m["modelVersion"] for m in json.loads(body)) if status == 200 else []

    def predict(self, sketch: bytes, version: str | None = None) -> int:
        url = f"{self.ts.inference_url}/predictions/sem_pcyc" + (f"/{version}" if version else "")
        return self.ts.request("POST", url, sketch, {"Content-Type": "image/png"}, timeout=60)[0]

    def target(self, sshd: dict, **overrides) -> Target:
        """This host as a deploy target over `sshd`: the repository's deploy.defaults plus this host's values."""
        values = dict(self.deploy_defaults, name="host-a", host="127.0.0.1", port=sshd["port"],
                      user=os.environ.get("USER", "root"), key_file=str(sshd["key"]),
                      known_hosts=str(sshd["known_hosts"]), model_store=str(self.store), ts_config=str(self.config),
                      management_url=self.ts.management_url, inference_url=self.ts.inference_url, workers=1,
                      keep_versions=2, connect_timeout=5, model_name="sem_pcyc")
        values.update(overrides)
        return read_mapping(values, Target, "test target")


def target_dict(host: Host, sshd: dict, **overrides) -> dict:
    t = host.target(sshd, **overrides)
    return {k: getattr(t, k) for k in ("name", "host", "port", "user", "key_file", "known_hosts", "model_store",
                                       "ts_config", "management_url", "inference_url", "connect_timeout")}
