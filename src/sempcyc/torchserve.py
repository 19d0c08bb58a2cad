"""Start and stop one private TorchServe instance, isolated from any other TorchServe on the machine.

TorchServe keeps a single pid file in the temp dir and refuses a second start, opens five ports and names its
worker sockets /tmp/.ts.sock.<port>. Each instance here gets its own TMPDIR, log dir, model store, config with
free 127.0.0.1 ports, and its own process session; stop() ends exactly that session, never a process found by name.
Used by serve-check, `sempcyc serve`, the tests and the benchmarks.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from .errors import UserError
from .serving import parse_properties

MIN_JAVA = 17


def check_java() -> int:
    """The Java major version, or a one-line UserError saying what to install."""
    java = shutil.which("java") if not os.environ.get("JAVA_HOME") else str(Path(os.environ["JAVA_HOME"]) / "bin/java")
    if not java or not Path(java).exists():
        raise UserError("Java not found; TorchServe needs Java 17: apt-get install -y openjdk-17-jre-headless "
                        "(or set JAVA_HOME)")
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30).stderr
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UserError(f"{java} -version failed ({exc}); reinstall Java 17") from None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if not match:
        raise UserError(f"cannot read the Java version from `{java} -version`; TorchServe needs Java 17")
    major = int(match.group(1))
    if major == 1 and match.group(2):  # "1.8.0" style
        major = int(match.group(2))
    if major < MIN_JAVA:
        raise UserError(f"Java {major} is too old for TorchServe 0.12; install Java 17 "
                        "(apt-get install -y openjdk-17-jre-headless) and put it first on PATH or in JAVA_HOME")
    return major


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def free_worker_port() -> int:
    """A base port for worker sockets whose /tmp/.ts.sock.<port> files do not exist (another instance's)."""
    for _ in range(200):
        port = random.randint(20000, 60000)
        if not any(Path(f"/tmp/.ts.sock.{port + i}").exists() for i in range(16)):
            return port
    raise UserError("no free TorchServe worker port found (too many /tmp/.ts.sock.* files)")


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


class TorchServe:
    """One TorchServe; use as a context manager so it is always stopped (also on error or Ctrl-C)."""

    def __init__(self, model_store: str | Path, models: dict | None = None, workdir: str | Path | None = None,
                 token_auth: bool = False, enable_model_api: bool = False, inference_port: int | None = None,
                 management_port: int | None = None, extra_config: dict | None = None, snapshots: bool = False,
                 config_file: str | Path | None = None):
        self.model_store = Path(model_store).resolve()
        self.models = models or {}
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="sem-pcyc-ts-")).resolve()
        self.token_auth, self.enable_model_api = token_auth, enable_model_api
        self.inference_port = inference_port or free_port()
        self.management_port = management_port or free_port()
        self.extra_config = extra_config or {}
        self.snapshots = snapshots
        # A host's own config.properties, used as it is (deploy keeps its load_models/models current).
        self.config_file = Path(config_file).resolve() if config_file else None
        if self.config_file is not None:
            props = read_properties(self.config_file)
            self.inference_port = int(props["inference_address"].rsplit(":", 1)[1])
            self.management_port = int(props["management_address"].rsplit(":", 1)[1])
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "logs" / "torchserve.out"

    # ---------------------------------------------------------------------------------------------- lifecycle
    @property
    def inference_url(self) -> str:
        return f"http://127.0.0.1:{self.inference_port}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self.management_port}"

    def config_text(self) -> str:
        lines = {
            "inference_address": self.inference_url,
            "management_address": self.management_url,
            "metrics_address": f"http://127.0.0.1:{free_port()}",
            "grpc_inference_port": free_port(),
            "grpc_management_port": free_port(),
            "initial_worker_port": free_worker_port(),
            "initial_distribution_port": free_port(),
            "model_store": str(self.model_store),
            "disable_token_authorization": "false" if self.token_auth else "true",
            "enable_model_api": "true" if self.enable_model_api else "false",
            "allowed_urls": r"^$",  # register only by file name from the model store, never by URL
            "default_startup_timeout": 120,
            **self.extra_config,
        }
        if self.models:
            lines["load_models"] = ",".join(sorted({v["marName"] for ver in self.models.values()
                                                    for v in ver.values()}))
            lines["models"] = json.dumps(self.models)
        return "".join(f"{k}={v}\n" for k, v in lines.items())

    def start(self) -> TorchServe:
        check_java()
        exe = Path(sys.executable).parent / "torchserve"
        if not exe.exists():
            exe = shutil.which("torchserve")
        if not exe:
            raise UserError("torchserve not found; run the setup (make setup) or pip install torchserve==0.12.0")
        for sub in ("tmp", "logs"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        config = self.config_file
        if config is None:
            config = self.workdir / "config.properties"
            config.write_text(self.config_text(), encoding="utf-8")
        env = dict(os.environ, TMPDIR=str(self.workdir / "tmp"), TEMP=str(self.workdir / "tmp"),
                   LOG_LOCATION=str(self.workdir / "logs"), METRICS_LOCATION=str(self.workdir / "logs"))
        cmd = [str(exe), "--start", "--foreground", "--ts-config", str(config), "--model-store",
               str(self.model_store)]
        if not self.snapshots:
            cmd.append("--ncs")
        # Output goes to a file: a pipe would hang us, as the Java child keeps it open.
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=self.workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    def stop(self, timeout: float = 30) -> None:
        """End this instance's process session (launcher, Java frontend, Python workers) and nothing else."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=timeout)
            except (ProcessLookupError, PermissionError):
                pass
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if proc is not None:
            try:  # workers may outlive the launcher briefly; they are in the same session
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> TorchServe:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------------ calls
    def keys(self) -> dict:
        """The token-auth keys TorchServe wrote to its working directory at start."""
        path = self.workdir / "key_file.json"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        return {"management": data.get("management", {}).get("key"),
                "inference": data.get("inference", {}).get("key")}

    def request(self, method: str, url: str, body: bytes | None = None, headers: dict | None = None,
                timeout: float = 30) -> tuple[int, bytes]:
        """(status, body) for one HTTP call; HTTP errors are returned, not raised."""
        headers = dict(headers or {})
        if self.token_auth:
            key = self.keys().get("management" if url.startswith(self.management_url) else "inference")
            if key:
                headers.setdefault("Authorization", f"Bearer {key}")
        req = urllib.request.Request(url, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def log_tail(self, lines: int = 30) -> str:
        texts = []
        for path in [self.log_path, self.workdir / "logs" / "model_log.log", self.workdir / "logs" / "ts_log.log"]:
            if path.exists():
                texts.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(texts)

    def load_error(self) -> str | None:
        """The last exception a model worker logged (e.g. the handler's initialize() raising), if any."""
        path = self.workdir / "logs" / "model_log.log"
        if not path.exists():
            return None
        # a traceback's last line ("ValueError: ...", "pkg.mod.GalleryError: ..."), not a logged repr such as
        # faiss's "ImportError(...)"
        pattern = re.compile(r"MODEL_LOG - ((?:\w+\.)*\w*(?:Error|Exception)(?::.*)?)$")
        found = None
        for line in path.read_text(errors="replace").splitlines():
            match = pattern.search(line)
            if match:
                found = match.group(1).strip()
        return found

    def wait_ready(self, model: str | None, deadline_s: float = 120, version: str | None = None,
                   failed_grace_s: float = 5.0) -> float:
        """Poll /ping, then the model's description until a worker is READY; seconds waited. Never a fixed sleep:
        polls every 100 ms and fails at the deadline, at once if the server process exits, and early (after
        `failed_grace_s` of retries) when every worker failed to load with an exception in the model log."""
        start = time.monotonic()
        delay = 0.1
        stage = "ping"
        failing_since = None
        while True:
            if self.proc is None or self.proc.poll() is not None:
                raise UserError(f"TorchServe exited during start-up; see {self.log_path}: "
                                + (self.log_tail(3).splitlines() or ["no output"])[-1])
            try:
                if stage == "ping":
                    status, _ = self.request("GET", f"{self.inference_url}/ping", timeout=2)
                    if status == 200:
                        stage = "model"
                        if model is None:
                            return time.monotonic() - start
                if stage == "model":
                    path = f"{self.management_url}/models/{model}" + (f"/{version}" if version else "")
                    status, body = self.request("GET", path, timeout=2)
                    if status == 200 and _has_ready_worker(body):
                        return time.monotonic() - start
                    if status == 200 and _all_workers_failed(body) and self.load_error():
                        # TorchServe retries failed workers forever; a few seconds of retries is enough to say why
                        failing_since = failing_since or time.monotonic()
                        if time.monotonic() - failing_since > failed_grace_s:
                            raise UserError(f"model {model!r} failed to load: {self.load_error()} "
                                            f"(log: {self.workdir / 'logs' / 'model_log.log'})")
                    else:
                        failing_since = None
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() - start > deadline_s:
                cause = self.load_error()
                raise UserError(f"TorchServe not ready after {deadline_s:.0f} s (stage: {stage}; model {model!r})"
                                + (f": {cause}" if cause else "") + f"; logs in {self.workdir / 'logs'}")
            time.sleep(delay)


def read_properties(path: Path) -> dict:
    return parse_properties(Path(path).read_text(encoding="utf-8"))


def _has_ready_worker(body: bytes) -> bool:
    try:
        described = json.loads(body)
    except json.JSONDecodeError:
        return False
    return any(w.get("status") == "READY" for m in described for w in m.get("workers", []))


def _all_workers_failed(body: bytes) -> bool:
    try:
        described = json.loads(body)
    except json.JSONDecodeError:
        return False
    workers = [w for m in described for w in m.get("workers", [])]
    return bool(workers) and all(w.get("status") not in ("READY", "WORKER_MODEL_LOADED") for w in workers)
