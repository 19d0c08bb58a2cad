"""TorchServe: the Java check, a real TorchServe serving the archive, the readiness deadline, `sempcyc serve`
and the serving commands' --help.

The serving tests' tiny model, its gallery and its .mar (conftest.py's `built`) are built once a session (tiny
CNN, 32-px arrays, a few iterations; the stages run in-process).
Tests that start TorchServe are marked `integration`; every instance gets its own TMPDIR, logs, store and free
127.0.0.1 ports, and is stopped by the process group the test started.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPConnection
from pathlib import Path

import pytest

from helpers import VENV_BIN, run_cli
from sempcyc import serving, torchserve
from sempcyc.errors import UserError
from sempcyc.runtime.search import SketchSearch
from serving_helpers import (
    BROKEN_DEADLINE_S,
    MODEL_NAME,
    READY_S,
    TOP_K,
    VERSION,
    Built,
    assert_ranked,
    http,
    kill_leftovers,
    processes_under,
    same_answer,
    sketch,
    wait_group_gone,
    wait_none_under,
    write_params,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def assert_error_json(status: int, body: bytes, statuses=range(400, 500)) -> str:
    assert status in statuses, (status, body[:300])
    answer = json.loads(body)
    assert isinstance(answer, dict) and isinstance(answer.get("error"), str) and answer["error"], answer
    return answer["error"]


# ---------------------------------------------------------------------------------------- 7. Java (unit)

def fake_java(folder: Path, version_line: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    java = folder / "java"
    java.write_text(f"#!/bin/sh\necho '{version_line}' >&2\n")
    java.chmod(0o755)
    return folder


def test_java_missing(tmp_path: Path, monkeypatch):
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    with pytest.raises(UserError) as exc:
        torchserve.check_java()
    assert "Java 17" in str(exc.value) and "not found" in str(exc.value)
    assert "\n" not in str(exc.value)


def test_java_too_old(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PATH", str(fake_java(tmp_path / "bin", 'openjdk version "1.8.0_292"')))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    with pytest.raises(UserError) as exc:
        torchserve.check_java()
    assert "too old" in str(exc.value) and "Java 8" in str(exc.value) and "Java 17" in str(exc.value)


def test_java_17_accepted(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PATH", str(fake_java(tmp_path / "bin", 'openjdk version "17.0.15" 2025-04-15')))
    monkeypatch.delenv("JAVA_HOME", raising=False)
    assert torchserve.check_java() == 17


def test_java_home_is_used(tmp_path: Path, monkeypatch):
    fake_java(tmp_path / "jdk/bin", 'openjdk version "1.8.0_292"')
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "jdk"))
    with pytest.raises(UserError, match="too old"):
        torchserve.check_java()


# ---------------------------------------------------------------------------------------------- 9. --help

@pytest.mark.parametrize("command", ["serve-check", "archive", "serve"])
def test_help(command: str, tmp_path: Path):
    proc = run_cli(command, "--help", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith(f"usage: sempcyc {command}"), proc.stdout + proc.stderr
    assert ("--out" if command == "archive" else "--mar") in proc.stdout


# ----------------------------------------------------------------------------- 3 + 6. a real TorchServe

@pytest.fixture(scope="class")
def ts(built: Built, tmp_path_factory):
    base = tmp_path_factory.mktemp("ts")
    store = base / "store"
    store.mkdir()
    shutil.copy2(built.mar, store / built.mar.name)
    models = serving.models_config(MODEL_NAME, VERSION, built.mar.name, batch_size=4, max_batch_delay_ms=200)
    with torchserve.TorchServe(store, models, workdir=base / "work") as ts:
        t0 = time.monotonic()
        waited = ts.wait_ready(MODEL_NAME, READY_S)
        ts.ready_wall = time.monotonic() - t0
        ts.ready_seconds = waited
        pgid = ts.proc.pid
        yield ts
    assert wait_group_gone(pgid), f"TorchServe process group {pgid} outlived stop()"
    assert wait_none_under(base / "work") == []


@pytest.mark.integration
class TestTorchServe:
    def url(self, ts, version: str | None = None) -> str:
        return f"{ts.inference_url}/predictions/{MODEL_NAME}" + (f"/{version}" if version else "")

    def test_wait_ready_returns_well_before_the_deadline(self, ts):
        assert 0 < ts.ready_seconds < READY_S / 2 and ts.ready_wall < READY_S / 2
        t0 = time.monotonic()
        ts.wait_ready(MODEL_NAME, READY_S)  # already ready: at once
        assert time.monotonic() - t0 < 5

    def test_its_processes_are_found_by_their_private_dirs(self, ts):
        """The leak checks below find an instance's processes by its private TMPDIR: the launcher, the Java
        frontend and the Python worker all carry it."""
        cmdlines = [" ".join(p.cmdline()) for p in processes_under(ts.workdir)]
        assert any("java" in c and "org.pytorch.serve.ModelServer" in c for c in cmdlines), cmdlines
        assert any("model_service_worker" in c for c in cmdlines), cmdlines
        assert all(os.getpgid(p.pid) == ts.proc.pid for p in processes_under(ts.workdir))

    def test_raw_sketch_bytes(self, ts, offline: SketchSearch):
        status, body = http("POST", self.url(ts), sketch(8), {"Content-Type": "image/png"})
        assert status == 200, body
        answer = json.loads(body)
        assert_ranked(answer, TOP_K)
        assert same_answer(answer, offline.search([sketch(8)], k=TOP_K)[0])

    def test_no_content_type(self, ts):
        # http.client sends no Content-Type unless told (urllib would add form encoding)
        conn = HTTPConnection("127.0.0.1", ts.inference_port, timeout=60)
        try:
            conn.request("POST", f"/predictions/{MODEL_NAME}", body=sketch(9))
            resp = conn.getresponse()
            status, body = resp.status, resp.read()
        finally:
            conn.close()
        assert status == 200, body
        assert_ranked(json.loads(body), TOP_K)

    @pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
    def test_curl_upload(self, ts, tmp_path: Path):
        (tmp_path / "sketch.png").write_bytes(sketch(10))
        proc = subprocess.run(["curl", "-sS", "-o", str(tmp_path / "out.json"), "-w", "%{http_code}",
                               "-T", str(tmp_path / "sketch.png"), self.url(ts)],
                              capture_output=True, text=True, timeout=60)
        assert proc.stdout == "200", proc.stdout + proc.stderr + (tmp_path / "out.json").read_text()
        assert_ranked(json.loads((tmp_path / "out.json").read_text()), TOP_K)

    def test_bad_requests_get_4xx_json_and_the_worker_keeps_serving(self, ts, big_png: bytes):
        cases = {"empty": (b"", {"Content-Type": "image/png"}, 400),
                 "not an image": (b"not an image" * 20, {"Content-Type": "image/png"}, 400),
                 "50 MP": (big_png, {"Content-Type": "image/png"}, 413),
                 "json": (json.dumps({"sketch": "x"}).encode(), {"Content-Type": "application/json"}, 415),
                 "text": (sketch(11), {"Content-Type": "text/plain"}, 415),
                 # urllib sends 'Content-type'; TorchServe hands the handler the canonical 'Content-Type'
                 "text, other spelling": (sketch(11), {"content-type": "text/plain"}, 415)}
        for label, (body, headers, want) in cases.items():
            status, answer = http("POST", self.url(ts), body, headers)
            message = assert_error_json(status, answer)
            assert status == want, (label, status, message)
        status, body = http("POST", self.url(ts), sketch(12), {"Content-Type": "image/png"})
        assert status == 200
        assert_ranked(json.loads(body), TOP_K)

    def test_concurrent_requests_are_batched_and_all_answered(self, ts, offline: SketchSearch):
        bodies = [sketch(20 + i) for i in range(8)]

        def one(body):
            return http("POST", self.url(ts), body, {"Content-Type": "image/png"}, timeout=120)

        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(one, bodies))
        assert [status for status, _ in results] == [200] * 8, results
        status, described = http("GET", f"{ts.management_url}/models/{MODEL_NAME}")
        assert status == 200 and json.loads(described)[0]["batchSize"] == 4
        assert "batchSize: 4" in (ts.workdir / "logs/model_log.log").read_text()  # the worker got it too
        for body, (_, answer) in zip(bodies, results):  # each answer is its own sketch's, whatever the batch
            assert same_answer(json.loads(answer), offline.search([body], k=TOP_K)[0])

    def test_versioned_url(self, ts):
        status, body = http("POST", self.url(ts, VERSION), sketch(14), {"Content-Type": "image/png"})
        assert status == 200, body
        assert_ranked(json.loads(body), TOP_K)
        status, _ = http("POST", self.url(ts, "9.9.9"), sketch(14), {"Content-Type": "image/png"})
        assert status == 404
        status, body = http("GET", f"{ts.management_url}/models/{MODEL_NAME}")
        assert status == 200 and json.loads(body)[0]["modelVersion"] == VERSION


@pytest.mark.integration
def test_wait_ready_deadline_on_a_model_that_never_loads(built: Built, tmp_path: Path):
    store = tmp_path / "store"
    store.mkdir()
    shutil.copy2(built.broken_mar, store / built.broken_mar.name)
    models = serving.models_config(MODEL_NAME, VERSION, built.broken_mar.name, 4, 10)
    with torchserve.TorchServe(store, models, workdir=tmp_path / "work") as ts:
        pgid = ts.proc.pid
        t0 = time.monotonic()
        with pytest.raises(UserError) as exc:  # no early exit: the deadline itself must hold
            ts.wait_ready(MODEL_NAME, BROKEN_DEADLINE_S, failed_grace_s=1e9)
        took = time.monotonic() - t0
        assert BROKEN_DEADLINE_S <= took < BROKEN_DEADLINE_S + 15
        message = str(exc.value)
        assert message.startswith(f"TorchServe not ready after {BROKEN_DEADLINE_S} s")
        assert "ValueError" in message and "\n" not in message  # the worker's exception, on one line
        t0 = time.monotonic()
        with pytest.raises(UserError) as early:  # default: give up after a few seconds of failed retries
            ts.wait_ready(MODEL_NAME, BROKEN_DEADLINE_S * 10)
        assert time.monotonic() - t0 < BROKEN_DEADLINE_S
        assert str(early.value).startswith(f"model '{MODEL_NAME}' failed to load: ValueError")
    assert wait_group_gone(pgid), "the broken instance's processes outlived stop()"


# ------------------------------------------------------------------------------------------ 8. sempcyc serve

@pytest.mark.integration
def test_sempcyc_serve(built: Built, tmp_path: Path):
    write_params(tmp_path)
    (tmp_path / "tmp").mkdir()
    out_path = tmp_path / "serve.out"
    env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", TMPDIR=str(tmp_path / "tmp"),
               OMP_NUM_THREADS="1")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with open(out_path, "wb") as out:
            cmd = [str(VENV_BIN / "sempcyc"), "serve", "--mar", str(built.mar), "--port", str(port),
                   "--management-port", str(torchserve.free_port())]
            # Ctrl-C as in a terminal: a suite started in the background by a shell without job control inherits
            # SIGINT ignored, and so would `sempcyc serve`
            proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            deadline = time.monotonic() + READY_S
            while "curl -T" not in out_path.read_text():
                assert proc.poll() is None, out_path.read_text()
                assert time.monotonic() < deadline, out_path.read_text()
                time.sleep(0.2)
            text = out_path.read_text()
            assert f"port {port} is in use" in text, text
            curl_line = next(line for line in text.splitlines() if "curl -T" in line)
            url = curl_line.split()[-1]
            assert url.startswith("http://127.0.0.1:") and f":{port}/" not in url
            assert url.endswith(f"/predictions/{MODEL_NAME}")
            status, body = http("POST", url, sketch(15), {"Content-Type": "image/png"})
            assert status == 200, body
            assert_ranked(json.loads(body), TOP_K)
            # ... and the sketch page, on its own 127.0.0.1 port, searching the same TorchServe
            page = next(line for line in text.splitlines() if "sketch page:" in line).split()[-1]
            assert page.startswith("http://127.0.0.1:") and page.endswith("/"), page
            status, html = http("GET", page)
            assert status == 200 and b"<canvas" in html
            status, body = http("POST", f"{page}api/search/{VERSION}", sketch(15), {"Content-Type": "image/png"})
            assert status == 200, body
            assert_ranked(json.loads(body), TOP_K)
            ts_procs = processes_under(tmp_path / "tmp")
            assert any("java" in " ".join(p.cmdline()) for p in ts_procs), ts_procs

            os.killpg(proc.pid, signal.SIGINT)
            assert proc.wait(timeout=30) == 0, out_path.read_text()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
            left = wait_none_under(tmp_path / "tmp")
            kill_leftovers(left)
    assert "serve: stopped" in out_path.read_text()
    assert left == [], "the TorchServe of `sempcyc serve` outlived it"
    assert http_refused(url) and http_refused(page)


def http_refused(url: str) -> bool:
    try:
        http("POST", url, b"x", timeout=5)
    except (urllib.error.URLError, ConnectionError):
        return True
    return False
