"""The serve-check stage: the archive checked in a private TorchServe (also beside a foreign TorchServe), a
broken archive failing fast, and an approximate index's recall against its floor.

The serving tests' tiny model, its gallery and its .mar (conftest.py's `built`) are built once a session (tiny
CNN, 32-px arrays, a few iterations; the stages run in-process).
Tests that start TorchServe are marked `integration`; every instance gets its own TMPDIR, logs, store and free
127.0.0.1 ports, and is stopped by the process group the test started.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from helpers import VENV_BIN, run_cli
from sempcyc import serving, torchserve
from sempcyc.runtime.search import SketchSearch
from serving_helpers import (
    BROKEN_DEADLINE_S,
    MODEL_NAME,
    READY_S,
    VERSION,
    Built,
    http,
    kill_leftovers,
    wait_group_gone,
    wait_none_under,
    write_params,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------- 4 + 5. serve-check beside a foreign TorchServe

@dataclass
class Foreign:
    proc: subprocess.Popen
    pid_file: Path
    ping_url: str


@pytest.fixture(scope="class")
def foreign_torchserve(tmp_path_factory):
    """A TorchServe started the ordinary way (`torchserve --start`, daemonised), with no models."""
    base = tmp_path_factory.mktemp("foreign")
    tmp, logs, store = base / "tmp", base / "logs", base / "store"
    for folder in (tmp, logs, store):
        folder.mkdir()
    inference = torchserve.free_port()
    config = base / "config.properties"
    config.write_text("".join(f"{k}={v}\n" for k, v in {
        "inference_address": f"http://127.0.0.1:{inference}",
        "management_address": f"http://127.0.0.1:{torchserve.free_port()}",
        "metrics_address": f"http://127.0.0.1:{torchserve.free_port()}",
        "grpc_inference_port": torchserve.free_port(), "grpc_management_port": torchserve.free_port(),
        "initial_worker_port": torchserve.free_worker_port(), "initial_distribution_port": torchserve.free_port(),
        "model_store": str(store), "disable_token_authorization": "true"}.items()))
    env = dict(os.environ, TMPDIR=str(tmp), LOG_LOCATION=str(logs), METRICS_LOCATION=str(logs))
    with open(base / "torchserve.out", "ab") as out:
        proc = subprocess.Popen([str(VENV_BIN / "torchserve"), "--start", "--ncs", "--model-store", str(store),
                                 "--ts-config", str(config)], cwd=base, env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        ping = f"http://127.0.0.1:{inference}/ping"
        deadline = time.monotonic() + READY_S
        while True:
            try:
                if http("GET", ping, timeout=2)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, (base / "torchserve.out").read_text()
            time.sleep(0.2)
        assert (tmp / ".model_server.pid").is_file()
        yield Foreign(proc, tmp / ".model_server.pid", ping)
    finally:
        # the daemonised Java frontend stays in the process group of the launcher we started
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        if not wait_group_gone(proc.pid, 30):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        assert wait_none_under(base) == [], "the foreign TorchServe outlived its process group"


def run_serve_check(built: Built, folder: Path, mar: Path | None = None, serve: dict | None = None):
    """`sempcyc serve-check` in a subprocess with a private TMPDIR (so its processes can be told apart)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tmp").mkdir()
    write_params(folder, serve)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TMPDIR", str(folder / "tmp"))
        mp.setenv("OMP_NUM_THREADS", "1")
        t0 = time.monotonic()
        proc = run_cli("serve-check", *built.cli_args(mar, folder / "report.json"), cwd=folder, check=False)
        took = time.monotonic() - t0
    return proc, took


@pytest.fixture(scope="class")
def checked(built: Built, foreign_torchserve: Foreign, tmp_path_factory):
    pid_file = foreign_torchserve.pid_file
    before = (pid_file.read_text(), pid_file.stat().st_mtime_ns)
    java_pid = int(before[0].strip())
    folder = tmp_path_factory.mktemp("serve-check")
    proc, took = run_serve_check(built, folder)
    left = wait_none_under(folder / "tmp")
    kill_leftovers(left)
    return {"proc": proc, "took": took, "folder": folder, "left": left, "before": before, "java_pid": java_pid,
            "foreign": foreign_torchserve}


@pytest.mark.integration
class TestServeCheck:
    def test_serve_check_passes(self, checked):
        proc = checked["proc"]
        assert proc.returncode == 0, proc.stdout + proc.stderr
        report = json.loads((checked["folder"] / "report.json").read_text())
        assert report["parity_top10"] == 1.0
        assert report["errors"] == 0 and report["schema_errors"] == 0 and report["concurrent_errors"] == 0
        assert report["concurrent_requests"] == 16
        assert report["bad_request_status"] and all(400 <= s < 500 for s in report["bad_request_status"].values())
        assert set(report["bad_request_status"]) == {"empty body", "not an image", "50-megapixel image", "JSON body"}
        assert report["latency_ms_p50"] > 0 and report["latency_ms_p95"] >= report["latency_ms_p50"]
        assert report["passed"] is True and report["failures"] == []
        assert report["version"] == VERSION
        assert "serve-check: ready in" in proc.stdout
        assert checked["left"] == [], "serve-check left processes behind"

    def test_report_carries_the_smoke_query_deploy_sends(self, checked, built: Built):
        """Each host's smoke query comes from here (deploy loads no model): this archive's sha256, the first
        unseen-class query and the offline top-10 its served answer matched."""
        smoke = json.loads((checked["folder"] / "report.json").read_text())["smoke"]
        assert smoke["archive_sha256"] == hashlib.sha256(built.mar.read_bytes()).hexdigest()
        name, sketch = serving.pick_queries(built.dataset, built.splits)[0]
        assert smoke["sketch"] == name
        offline = SketchSearch.load(built.model, built.gallery, top_k=smoke["k"], max_pixels=16_000_000)
        assert len(smoke["top10"]) == min(10, smoke["k"])
        assert serving.same_ranking(smoke["top10"], offline.search([sketch])[0][:10])

    def test_foreign_torchserve_is_untouched(self, checked):
        foreign: Foreign = checked["foreign"]
        assert (foreign.pid_file.read_text(), foreign.pid_file.stat().st_mtime_ns) == checked["before"]
        java = psutil.Process(checked["java_pid"])
        assert java.is_running() and java.status() != psutil.STATUS_ZOMBIE
        assert "java" in " ".join(java.cmdline())
        assert http("GET", foreign.ping_url, timeout=10)[0] == 200


@pytest.fixture(scope="module")
def broken_check(built: Built, tmp_path_factory):
    """serve-check of an archive whose handler raises in initialize, with a short readiness deadline."""
    folder = tmp_path_factory.mktemp("broken-check")
    proc, took = run_serve_check(built, folder, mar=built.broken_mar, serve={"ready_timeout_s": BROKEN_DEADLINE_S})
    left = wait_none_under(folder / "tmp")
    kill_leftovers(left)
    return {"proc": proc, "took": took, "folder": folder, "left": left}


@pytest.mark.integration
def test_serve_check_fails_fast_on_a_broken_archive(broken_check):
    proc = broken_check["proc"]
    assert proc.returncode == 1, proc.stdout + proc.stderr
    first = proc.stderr.strip().splitlines()[0]
    # early ("failed to load") or at the deadline ("not ready after"), the cause is named on that one line
    assert first.startswith("sempcyc serve-check: error: ") and f"'{MODEL_NAME}'" in first, proc.stderr
    assert "ValueError" in first, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stdout
    # start-up + the offline reference + the deadline, no more
    assert broken_check["took"] < BROKEN_DEADLINE_S + 30, broken_check["took"]
    assert not (broken_check["folder"] / "report.json").exists()
    assert broken_check["left"] == [], "serve-check left TorchServe processes behind"


@pytest.mark.integration
def test_serve_check_failure_names_the_cause_in_its_first_line(broken_check):
    first = broken_check["proc"].stderr.strip().splitlines()[0]
    assert "ValueError" in first and "invalid literal" in first, first


def test_serve_check_missing_archive(built: Built, tmp_path: Path):
    proc, _ = run_serve_check(built, tmp_path / "run", mar=tmp_path / "nope.mar")
    assert proc.returncode == 1
    missing = tmp_path / "nope.mar"
    assert proc.stderr.strip() == f"sempcyc serve-check: error: {missing}: not found; run `dvc repro archive`"


@pytest.mark.integration
def test_serve_check_reports_recall_and_fails_below_the_floor(ann_built: Built, tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("rc")  # a short path: TorchServe's worker sockets live under it
    proc, _ = run_serve_check(ann_built, tmp_path / "g", serve={"ann_nprobe": 4, "ann_rerank": 5,
                                                                 "ann_min_recall": 0.95})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "g/report.json").read_text())
    assert report["ann_recall_at_k"] >= 0.95 and report["ann_nprobe"] == 4 and report["passed"]
    proc, _ = run_serve_check(ann_built, tmp_path / "b", serve={"ann_nprobe": 1, "ann_rerank": 1,
                                                                 "ann_min_recall": 1.0})
    assert proc.returncode == 1
    report = json.loads((tmp_path / "b/report.json").read_text())
    assert report["ann_recall_at_k"] < 1.0 and not report["passed"]
    assert "recall: the approximate index finds" in proc.stderr and "serve.ann_nprobe" in proc.stderr, proc.stderr
