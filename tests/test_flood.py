"""`sempcyc serve` under a flood (issue 27), for real: the tiny model's archive in TorchServe with the params'
serve.queue_size as its job queue, the page server in front. The limits themselves are specified against a
stand-in TorchServe in test_page_server_limits.py; here: that `sempcyc serve` sets them up, and that what a flood
gets back is a result or a clean refusal, never a reset or TorchServe's scale-workers text through the page.
"""
from __future__ import annotations

import http.client
import io
import json
import os
import re
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image, ImageDraw

from helpers import PARAMS, VENV_BIN, build_tiny_archive, build_tiny_model, merged, png_bytes
from sempcyc.torchserve import free_port

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_torch_thread")]
QUEUE = 8
SERVE_PARAMS = merged(PARAMS, {"serve": {"workers": 1, "batch_size": 1, "max_batch_delay_ms": 0, "threads": 1,
                                         "queue_size": QUEUE}})


def big_line_png(side: int) -> bytes:
    img = Image.new("L", (side, side), 255)
    ImageDraw.Draw(img).line([(0, 0), (side - 1, side - 1)], fill=0, width=9)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def post(port: int, path: str, body: bytes) -> tuple[int | str, dict, str | None]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request("POST", path, body, {"Content-Type": "image/png"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read()), resp.getheader("Retry-After")
    except (OSError, http.client.HTTPException) as exc:
        return type(exc).__name__, {}, None
    finally:
        conn.close()


def get(port: int, path: str) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("flood")
    model, gallery = build_tiny_model(root, SERVE_PARAMS)
    mar = build_tiny_archive(model, gallery, root / "sem_pcyc.mar", SERVE_PARAMS)
    ports = {"inference": free_port(), "management": free_port(), "page": free_port()}
    log = root / "serve.out"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(VENV_BIN / "sempcyc"), "serve", "--mar", str(mar), "--port",
                                 str(ports["inference"]), "--management-port", str(ports["management"]),
                                 "--page-port", str(ports["page"])], cwd=root, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.monotonic() + 240
        while "ready. Try" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield ports
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_the_page_lists_the_versions_torchserve_registered(served):
    status, described = get(served["management"], "/models/sem_pcyc")
    assert status == 200 and described[0]["jobQueueStatus"]["remainingCapacity"] == QUEUE  # serve.queue_size
    version = SERVE_PARAMS["release"]["version"]
    assert get(served["page"], "/api/versions") == (200, {"versions": [version], "default": version})


def test_torchserve_queues_at_most_serve_queue_size(served):
    """60 requests at once, each ~25 ms of decoding for the one worker: with TorchServe's default queue of 100 all
    would wait their turn; with serve.queue_size 8 the ones past it are refused at once (TorchServe's own 503, which
    a client calling TorchServe directly gets: docs/serving.md)."""
    big = big_line_png(1500)
    with ThreadPoolExecutor(60) as pool:
        answers = list(pool.map(lambda _: post(served["inference"], "/predictions/sem_pcyc", big), range(60)))
    statuses = [a[0] for a in answers]
    assert set(statuses) == {200, 503}, statuses
    assert "no worker" in next(a[1]["message"] for a in answers if a[0] == 503)


def test_an_image_over_the_sketch_cap_is_refused_from_its_header(served):
    big = big_line_png(2100)  # 4.4 MP: over the default serve.max_pixels of 2048 x 2048
    status, answer, _ = post(served["page"], f"/api/search/{SERVE_PARAMS['release']['version']}", big)
    assert status == 413 and "2100x2100 = 4,410,000 pixels, over the model's 4,194,304-pixel limit" in \
        answer["error"] and "scale it down" in answer["error"]
    status, answer, _ = post(served["inference"], "/predictions/sem_pcyc", big)  # the handler, straight
    assert status == 413 and "over the 4,194,304-pixel limit" in answer["error"]


def test_a_flood_through_the_page_gets_results_or_busy_with_retry_after(served):
    path = f"/api/search/{SERVE_PARAMS['release']['version']}"
    bodies = [png_bytes(i, mode="L") for i in range(80)] + [big_line_png(1500) for _ in range(20)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(lambda b: post(served["page"], path, b), bodies))
    assert {a[0] for a in answers} <= {200, 503}, {a[0] for a in answers}  # no resets, no other errors
    assert any(a[0] == 200 for a in answers)
    for status, answer, retry in answers:
        if status == 503:
            assert retry and int(retry) >= 1
            assert re.fullmatch(r"Busy: .+; try again in \d+ s\.", answer["error"]), answer
            assert "scale workers" not in answer["error"]
