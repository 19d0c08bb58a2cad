"""The page server under a flood, slow clients and foreign pages (issue 27), against a stand-in TorchServe
(fake_torchserve.py: no model, answers on command), so every limit can be reached in seconds.

Specification: a slow client costs no thread and is timed out; past the connection cap the slowest connection goes,
never a normal request; past the search caps (all searches, and large images) a search is answered 503 at once with
Retry-After and a sentence saying when to try again, as is TorchServe's own "no worker" 503; a POST from another
origin is refused; a thumbnail of a version the page has no archive of is 404; the versions TorchServe registered
are listed when its management API is known.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
from fake_torchserve import FakeTorchServe, answer_for, fake_archive
from PIL import Image, ImageDraw

from helpers import PARAMS, call, one_line_error
from sempcyc import page
from sempcyc.page import (
    LARGE_PIXELS,
    LIMITS,
    MAX_PENDING_LARGE,
    MAX_PENDING_SEARCHES,
    PageConfig,
    PageServer,
    PageSettings,
)

V1, V2 = "1.0.0", "2.0.0"


def sketch(side: int = 64, seed: int = 0) -> bytes:
    img = Image.new("L", (side, side), 255)
    ImageDraw.Draw(img).ellipse([4 + seed % 5, 4, side - 4, side - 4 - seed % 7], outline=0, width=3)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def request(url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 30):
    """(status, JSON or bytes, headers) of one call; HTTP errors are returned."""
    req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, data, head = resp.status, resp.read(), resp.headers
    except urllib.error.HTTPError as exc:
        status, data, head = exc.code, exc.read(), exc.headers
    try:
        return status, json.loads(data), head
    except ValueError:
        return status, data, head


def slow_client(port: int, declared: int = 1000, sent: int = 10) -> socket.socket:
    """A connection whose request declares `declared` body bytes and sends `sent` of them, then nothing."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(f"POST /api/search/{V1} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: image/png\r\n"
                 f"Content-Length: {declared}\r\n\r\n".encode() + b"\x89PNG\r\n\x1a\n"[:sent].ljust(sent, b"x"))
    return sock


@pytest.fixture
def fake():
    with FakeTorchServe(versions=[V1, V2]) as server:
        yield server


def page_server(fake: FakeTorchServe, management: bool = True, **config) -> PageServer:
    archives = (fake_archive(V1), fake_archive(V2))
    return PageServer(PageConfig(fake.url, archives, PageSettings(None, 50), None, None,
                                 fake.url if management else None, **config))


@pytest.fixture
def short_timeouts(monkeypatch):
    monkeypatch.setattr(page, "LIMITS", dataclasses.replace(LIMITS, request_timeout_s=1.0, max_connections=64))
    return page.LIMITS


def test_slow_clients_cost_no_thread_and_are_timed_out(fake, short_timeouts):
    threads_before = threading.active_count()
    with page_server(fake) as server:
        port = server.httpd.server_address[1]
        slow = [slow_client(port) for _ in range(40)]
        time.sleep(0.2)
        # the loop's thread and the pool's (created on demand, none yet): none for the 40 connections
        assert threading.active_count() <= threads_before + 1 + short_timeouts.threads
        status, answer, _ = request(f"{server.url}api/search/{V1}", sketch())
        assert status == 200 and answer == answer_for(sketch(), V1)
        slow[0].settimeout(10)
        reply = slow[0].recv(4096).decode()
        assert reply.startswith("HTTP/1.1 408") and "did not arrive within 1 s" in reply
        assert threading.active_count() <= threads_before + 1 + short_timeouts.threads
        for sock in slow:
            sock.close()
    assert not [b for v, b in fake.received if b.startswith(b"\x89PNG") and len(b) == 10]


def test_past_the_connection_cap_the_slowest_connection_goes_not_a_new_one(fake, short_timeouts):
    with page_server(fake) as server:
        port = server.httpd.server_address[1]
        slow = [slow_client(port) for _ in range(short_timeouts.max_connections + 10)]
        started = time.monotonic()
        status, _, _ = request(f"{server.url}api/meta")
        assert status == 200 and time.monotonic() - started < 0.9  # well before any timeout freed a connection
        slow[0].settimeout(5)
        with contextlib.suppress(ConnectionResetError):  # closed with its 10 bytes unread: a reset, or the end
            assert slow[0].recv(4096) == b"", "the oldest connection was not closed to make room"
        assert server.httpd.evicted >= 10
        for sock in slow:
            sock.close()


def test_torchserve_busy_becomes_a_503_with_retry_after_and_a_sentence(fake):
    fake.busy = True
    with page_server(fake) as server:
        status, answer, headers = request(f"{server.url}api/search/{V1}", sketch())
    assert status == 503 and int(headers["Retry-After"]) >= 1
    assert answer["error"] == f"Busy: TorchServe's queue is full; try again in {headers['Retry-After']} s."
    assert "scale workers" not in json.dumps(answer)


def test_past_the_search_caps_a_search_is_refused_at_once_with_retry_after(fake):
    fake.gate.clear()  # TorchServe holds every search
    extra = 5
    with page_server(fake) as server, ThreadPoolExecutor(MAX_PENDING_SEARCHES + extra) as pool:
        held = [pool.submit(request, f"{server.url}api/search/{V1}", sketch(seed=i))
                for i in range(MAX_PENDING_SEARCHES)]
        deadline = time.monotonic() + 20
        while server.admission.pending < MAX_PENDING_SEARCHES and time.monotonic() < deadline:
            time.sleep(0.05)
        started = time.monotonic()
        refused = [request(f"{server.url}api/search/{V1}", sketch(seed=100 + i)) for i in range(extra)]
        assert time.monotonic() - started < 5  # answered at once, not queued behind the held ones
        for status, answer, headers in refused:
            assert status == 503 and int(headers["Retry-After"]) >= 1
            assert answer["error"].startswith(f"Busy: {MAX_PENDING_SEARCHES} searches are waiting for the model; "
                                              "try again in ")
        while fake.waiting < LIMITS.threads and time.monotonic() < deadline:  # the threads reach it on a busy box
            time.sleep(0.05)
        time.sleep(0.2)  # and no more than them, however long they wait
        assert fake.waiting == LIMITS.threads  # what reaches TorchServe at once: the page server's threads
        fake.gate.set()
        assert all(f.result()[0] == 200 for f in held)
    assert server.admission.pending == 0


def test_large_images_have_their_own_small_lane(fake):
    side = int(LARGE_PIXELS ** 0.5) + 1
    fake.gate.clear()
    with page_server(fake) as server, ThreadPoolExecutor(MAX_PENDING_LARGE) as pool:
        held = [pool.submit(request, f"{server.url}api/search/{V1}", sketch(side, seed=i))
                for i in range(MAX_PENDING_LARGE)]
        deadline = time.monotonic() + 20
        while fake.waiting < MAX_PENDING_LARGE and time.monotonic() < deadline:
            time.sleep(0.05)
        status, answer, headers = request(f"{server.url}api/search/{V1}", sketch(side, seed=9))
        assert status == 503 and int(headers["Retry-After"]) >= 1
        assert answer["error"].startswith(f"Busy: {MAX_PENDING_LARGE} large images (over {LARGE_PIXELS:,} pixels) "
                                          "are being searched; try again in ")
        with ThreadPoolExecutor(1) as one:  # a sketch still goes through (TorchServe holds it like the others)
            small = one.submit(request, f"{server.url}api/search/{V1}", sketch())
            deadline = time.monotonic() + 20
            while fake.waiting < MAX_PENDING_LARGE + 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            fake.gate.set()
            assert small.result()[:2] == (200, answer_for(sketch(), V1))
        assert all(f.result()[0] == 200 for f in held)


def test_a_search_from_another_origin_is_refused(fake):
    with page_server(fake) as server:
        host = f"127.0.0.1:{server.httpd.server_address[1]}"
        status, answer, _ = request(f"{server.url}api/search/{V1}", sketch(), {"Origin": "https://evil.example"})
        assert status == 403 and "'https://evil.example' refused" in answer["error"]
        assert fake.received == []
        status, answer, _ = request(f"{server.url}api/search/{V1}", sketch(), {"Origin": f"http://{host}"})
        assert status == 200 and answer == answer_for(sketch(), V1)


def test_a_thumbnail_of_an_unknown_version_is_404(fake):
    thumbs = {"cat/1.png": b"RIFF-webp-bytes"}
    archives = (fake_archive(V1, thumbs=thumbs),)
    with PageServer(PageConfig(fake.url, archives, PageSettings(None, 50), None, None)) as server:
        assert request(f"{server.url}thumbs/{V1}/cat%2F1.png")[:2] == (200, b"RIFF-webp-bytes")
        status, answer, _ = request(f"{server.url}thumbs/9.9.9/cat%2F1.png")
        assert status == 404 and answer["error"] == "no archive of version '9.9.9' was given to the page"


def test_registered_versions_come_from_the_management_api(fake):
    with page_server(fake) as server:
        for _ in range(5):  # every tab asks; TorchServe is asked once (twice: the default, then all)
            assert request(f"{server.url}api/versions")[:2] == (200, {"versions": [V2, V1], "default": V1})
        assert fake.management_calls == 2
    with page_server(fake, management=False) as server:
        status, answer, _ = request(f"{server.url}api/versions")
        assert status == 200 and answer["versions"] is None and "type the version" in answer["note"]
    fake.listed = False  # a TorchServe whose management API is not there
    with page_server(fake) as server:
        answer = request(f"{server.url}api/versions")[1]
        assert answer["versions"] is None and f"management API at {fake.url}" in answer["note"]


@pytest.mark.parametrize("raw, status, words", [
    (b"POST /api/search/1.0.0 HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n", 411,
     "Content-Length"),
    (b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Long: " + b"a" * 20_000 + b"\r\n\r\n", 431,
     "headers are over 16,384 bytes; send fewer"),
    (b"DELETE / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 405, "use GET or POST"),
    (b"POST /api/search/1.0.0 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 99999999999\r\n\r\n", 413,
     "byte limit"),
    (b"hello\r\n\r\n", 400, "not an HTTP/1.1 request; the page server speaks"),
], ids=["chunked", "huge-headers", "method", "huge-body", "garbage"])
def test_malformed_requests_get_one_sentence_and_the_connection_closes(fake, raw, status, words):
    with page_server(fake) as server:
        with socket.create_connection(("127.0.0.1", server.httpd.server_address[1]), timeout=10) as sock:
            sock.sendall(raw)
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()) and b"Connection: close" in head
    assert words in json.loads(body)["error"]
    assert fake.received == []


def test_ui_refuses_a_management_url_it_cannot_use(tmp_path):
    (tmp_path / "params.yaml").write_text(json.dumps(PARAMS))
    rc, _, err = call(tmp_path, "ui", "--inference-url", "http://127.0.0.1:8080", "--management-url", "127.0.0.1:8081",
                      "--mar", "missing.mar")
    line = one_line_error(rc, err, "ui")
    assert "--management-url '127.0.0.1:8081': expected http://host:port (TorchServe's management API" in line
