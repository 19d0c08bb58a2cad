"""A stand-in for TorchServe's inference and management APIs, for tests of the page server under load: it answers
what a test tells it to (results, TorchServe's own "no worker" 503), and can hold answers until released. No model:
a result's items are named after the sha256 of the query, so a test can tell which query an answer is for."""
from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from sempcyc.page import Archive

MODEL_NAME = "sem_pcyc"
# TorchServe 0.12's answer when a model's job queue is full (its text, verbatim)
NO_WORKER = {"code": 503, "type": "ServiceUnavailableException",
             "message": f'Model "{MODEL_NAME}" has no worker to serve inference request. Please use scale workers '
                        "API to add workers. If this is a sequence inference, please check if it is closed, or "
                        "expired; or exceeds maxSequenceJobQueueSize"}


LONG_NAME = "hot_air_balloon_over_snow_capped_mountain_at_dusk"


def answer_for(body: bytes, version: str, k: int = 3) -> list[dict]:
    """The fake's answer to `body` at `version`: k items named after the body's sha256, one after the version, and
    one with a long class name."""
    digest = hashlib.sha256(body).hexdigest()[:12]
    return [{"image": f"class-{digest}/{i}.png", "class": f"class-{digest}", "score": round(0.9 - i / 10, 3)}
            for i in range(k)] + [{"image": f"v{version}/x.png", "class": f"version {version}", "score": 0.1},
                                  {"image": f"{LONG_NAME}/1.png", "class": LONG_NAME, "score": 0.05}]


def fake_archive(version: str, max_pixels: int = 4_194_304, thumbs: dict | None = None) -> Archive:
    serving = {"model_name": MODEL_NAME, "version": version, "top_k": 4, "max_pixels": max_pixels, "metrics": {}}
    return Archive(Path(f"/nonexistent/{MODEL_NAME}-{version}.mar"), serving, thumbs or {}, "image/webp")


class FakeTorchServe:
    """On 127.0.0.1 (a free port): with `busy` every search is answered the no-worker 503; while `gate` (an Event)
    is cleared, searches wait for it; `versions` are registered, and listed by the management API unless not
    `listed` (then it answers 404, as a TorchServe whose management API is not this address)."""

    def __init__(self, versions: list[str], listed: bool = True):
        self.busy = False
        self.gate = threading.Event()
        self.gate.set()
        self.versions = versions           # registered: a search for another version is answered 404
        self.listed = listed               # whether the management API lists them
        self.received: list[tuple[str, bytes]] = []
        self.management_calls = 0
        self.waiting = 0
        self._lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> FakeTorchServe:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.gate.set()
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def reply(self, status: int, payload) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                version = self.path.rsplit("/", 1)[-1]
                with fake._lock:
                    fake.received.append((version, body))
                    fake.waiting += 1
                fake.gate.wait(30)
                with fake._lock:
                    fake.waiting -= 1
                if version not in fake.versions:
                    self.reply(404, {"code": 404, "type": "ModelNotFoundException",
                                     "message": f"Model version: {version} does not exist for model: {MODEL_NAME}"})
                elif fake.busy:
                    self.reply(503, NO_WORKER)
                else:
                    self.reply(200, answer_for(body, version))

            def do_GET(self):
                fake.management_calls += 1
                # as TorchServe 0.12: /models/<name> describes the default version (the first here), /all each one
                listed = {f"/models/{MODEL_NAME}": fake.versions[:1], f"/models/{MODEL_NAME}/all": fake.versions}
                if not fake.listed or self.path not in listed:
                    self.reply(404, {"code": 404, "type": "ModelNotFoundException", "message": "not found"})
                    return
                self.reply(200, [{"modelName": MODEL_NAME, "modelVersion": v, "modelUrl": f"{MODEL_NAME}-{v}.mar",
                                  "jobQueueStatus": {"remainingCapacity": 32, "pendingRequests": 0}}
                                 for v in listed[self.path]])

        return Handler
