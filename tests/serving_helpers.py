"""Helpers of the serving tests (test_search, test_handler, test_archive, test_torchserve, test_serve_check) and of
conftest.py's `built`: the tiny served model's params, sketches, HTTP, ranked answers, and the process groups a
TorchServe leaves."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml

from helpers import CLASSES, PER_CLASS, merged, png_bytes
from helpers import PARAMS as STAGE_PARAMS
from sempcyc import serving

# The tiny dataset and params of the stage tests (12 classes, 3 on the unseen side -> 6 query sketches, 48 gallery
# images), with one training epoch and the serving sections added.
MODEL_NAME, VERSION, TOP_K = "sem_pcyc", "1.2.3", 10
GALLERY_SIZE = len(CLASSES) * PER_CLASS
READY_S = 120          # deadline for instances that should become ready
BROKEN_DEADLINE_S = 10  # deadline for instances whose model never loads

PARAMS = merged(STAGE_PARAMS, {
    "train": {"epochs": 1, "iters_per_epoch": 2},
    "release": {"model_name": MODEL_NAME, "version": VERSION},
    "serve": {"top_k": TOP_K, "max_pixels": 16_000_000, "threads": 1, "batch_size": 4, "max_batch_delay_ms": 50,
              "check_requests": 16, "ready_timeout_s": READY_S},
})


# ------------------------------------------------------------------------------------------------- helpers

def write_params(folder: Path, serve: dict | None = None) -> Path:
    params = json.loads(json.dumps(PARAMS))
    params["serve"].update(serve or {})
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    return path


def sketch(seed: int = 1) -> bytes:
    return png_bytes(10_000 + seed, mode="L")


def http(method: str, url: str, body: bytes | None = None, headers: dict | None = None,
         timeout: float = 60) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def assert_ranked(items, k: int) -> None:
    assert isinstance(items, list) and len(items) == k, items
    for item in items:
        assert set(item) == {"image", "class", "score"}, item
        assert isinstance(item["score"], float) and 0.0 < item["score"] <= 1.0
        assert item["image"].startswith(item["class"] + "/") and item["class"] in CLASSES
    scores = [i["score"] for i in items]
    assert scores == sorted(scores, reverse=True)
    assert len({i["image"] for i in items}) == k


def same_answer(a: list[dict], b: list[dict]) -> bool:
    """Equal rankings up to the float noise between batched and single inference."""
    return serving.same_ranking(a, b) and all(
        x["score"] == pytest.approx(y["score"], rel=1e-5, abs=1e-6) for x, y in zip(a, b))


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # zombies still count for kill(); only live members matter
    return any(_pgid(p) == pgid and p.status() != psutil.STATUS_ZOMBIE for p in psutil.process_iter())


def _pgid(proc: psutil.Process) -> int | None:
    try:
        return os.getpgid(proc.pid)
    except (ProcessLookupError, PermissionError, psutil.Error):
        return None


def wait_group_gone(pgid: int, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not group_alive(pgid):
            return True
        time.sleep(0.2)
    return not group_alive(pgid)


def processes_under(folder: Path) -> list[psutil.Process]:
    """Live processes whose command line or TMPDIR/LOG_LOCATION mention `folder` (a run's private temp dir)."""
    needle = str(folder)
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "environ", "status"]):
        info = proc.info
        if info["pid"] == os.getpid() or info["status"] == psutil.STATUS_ZOMBIE:
            continue
        env = info.get("environ") or {}
        text = " ".join(info.get("cmdline") or []) + " " + env.get("TMPDIR", "") + " " + env.get("LOG_LOCATION", "")
        if needle in text:
            found.append(proc)
    return found


def wait_none_under(folder: Path, timeout: float = 20) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while True:
        left = processes_under(folder)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def kill_leftovers(procs: list[psutil.Process]) -> None:
    """Clean-up after a failed check: end the process groups of processes this test's run started (found by its
    private temp dir), so a failure does not leave a TorchServe behind."""
    for pgid in {_pgid(p) for p in procs} - {None, os.getpgid(0)}:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


def repack(mar: Path, out: Path, replace: dict[str, bytes]) -> Path:
    """A copy of the .mar zip with some members' contents replaced."""
    with zipfile.ZipFile(mar) as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info, replace.get(info.filename, src.read(info.filename)))
    return out


@dataclass
class Built:
    root: Path
    model: Path
    gallery: Path
    mar: Path
    dataset: Path
    splits: Path
    extracted: Path
    broken_mar: Path

    def cli_args(self, mar: Path | None = None, out: Path | None = None) -> list[str]:
        return ["--mar", str(mar or self.mar), "--model", str(self.model), "--gallery", str(self.gallery),
                "--dataset", str(self.dataset), "--splits", str(self.splits), "--out", str(out or "report.json")]
