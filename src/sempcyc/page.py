"""The sketch page's own small HTTP server, shared by `sempcyc serve` and `sempcyc ui`.

Bound to 127.0.0.1, it serves the page (static/: plain HTML, CSS and JS), the model's metadata and the gallery
thumbnails from the archive(s), and forwards each search to TorchServe's inference API. The browser talks only to
this server (same origin: no CORS), so a TorchServe token stays in this process and never reaches the page. Query
images are checked here too (PNG or JPEG, size, pixels) before anything is sent to TorchServe.

Routes: GET / (the page), /page.js, /page.css, /api/meta, /api/versions (the versions TorchServe has registered,
when its management API is known), /thumbs/<version>/<image id>; POST /api/search/<version>.

Under load it stays bounded and says so (httpfront.py reads connections; LIMITS here): slow clients cost no thread;
at most MAX_PENDING_SEARCHES searches are forwarded or waiting, at most MAX_PENDING_LARGE of them large images (over
LARGE_PIXELS: their decoding is what costs TorchServe's workers), and past that a search is answered 503 with
Retry-After and a sentence saying when to try again, as is TorchServe's own "no worker" 503 when its queue is full.
"""
from __future__ import annotations

import io
import json
import math
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from PIL import Image, UnidentifiedImageError

from .errors import UserError
from .httpfront import Deferred, HttpFront, Limits, Request, Response, error_json
from .params import setting
from .runtime.gallery_shards import MANIFEST, GalleryError, sha256_bytes, unpack_shard

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
                "/page.js": ("page.js", "text/javascript; charset=utf-8"),
                "/page.css": ("page.css", "text/css; charset=utf-8")}
# TorchServe's default max_request_size: a bigger body would be refused there anyway.
MAX_BODY_BYTES = 6_553_500
DISCARD_BYTES = 64 << 20  # a larger refused body is not even read: the connection is closed instead
VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
FORWARD_TIMEOUT_S = 60
# TorchServe is called directly, never through an http(s)_proxy from the environment: the token goes along.
DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))
THUMB_TYPES = {"webp": "image/webp", "jpeg": "image/jpeg", "png": "image/png"}
# The page server's limits (docs/serving.md, "Limits"): a browser opens at most 6 connections to a host, so 256
# is many people's worth; past it the connection that has waited longest for its request is closed.
LIMITS = Limits(max_connections=256, threads=8, request_timeout_s=10, idle_timeout_s=30, write_timeout_s=30,
                max_header_bytes=16_384, max_body_bytes=MAX_BODY_BYTES, discard_body_bytes=DISCARD_BYTES,
                body_budget_bytes=64 << 20)
MAX_PENDING_SEARCHES = 32    # forwarded (LIMITS.threads at a time) or waiting for a thread; TorchServe's queue
                             # (serve.queue_size) must hold LIMITS.threads for the page never to meet its 503
LARGE_PIXELS = 512 * 512     # 4x the page's canvas: bigger queries cost a worker milliseconds per megapixel to decode
MAX_PENDING_LARGE = 2        # so few of them are let through at once: a flood of them cannot delay a sketch
VERSIONS_TTL_S = 5.0         # TorchServe's list of registered versions is asked for at most this often


@dataclass(frozen=True)
class PageSettings:
    SECTION: ClassVar[str] = "page"
    thumbnail_base_url: str | None = setting()
    search_debounce_ms: int = setting(min=0, max=2000)


class Refused(Exception):
    """A query the page server answers itself, without asking TorchServe: `status` and a message for the page."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


# ------------------------------------------------------------------------------------------------- archives

@dataclass(frozen=True)
class Archive:
    """What the page needs from one .mar: its serving.json and its gallery thumbnails (image id -> bytes)."""
    path: Path
    serving: dict
    thumbs: dict[str, bytes] = field(repr=False)
    thumb_type: str

    @property
    def model_name(self) -> str:
        return self.serving["model_name"]

    @property
    def version(self) -> str:
        return self.serving["version"]

    def meta(self) -> dict:
        keys = ("version", "top_k", "max_pixels", "metrics")
        return {**{k: self.serving.get(k) for k in keys}, "thumbnails": len(self.thumbs)}


def read_archive(path: Path) -> Archive:
    """serving.json and the thumbnails of a sem-pcyc .mar, or a one-line UserError saying what to do. A deployed
    slim archive (no shard files: they are in its host's blob store) has no thumbnails here."""
    if not path.is_file():
        raise UserError(f"{path}: not found; build it with `dvc repro archive` or fetch a release with "
                        "`dvc artifacts get <repo> sem-pcyc --rev vX.Y.Z`")
    thumbs: dict[str, bytes] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            serving = json.loads(zf.read("serving.json"))
            manifest = json.loads(zf.read(f"gallery/{MANIFEST}"))
            names = set(zf.namelist())
            for entry in manifest["shards"]:
                member = f"gallery/{entry['file']}"
                if member in names:
                    data = zf.read(member)
                    if sha256_bytes(data) != entry["sha256"]:
                        raise UserError(f"{path}: {member} is damaged (not the sha256 in its manifest); fetch or "
                                        "build the archive again")
                    thumbs.update(unpack_shard(data, f"{path}: {member}")["thumbs"])
    except (zipfile.BadZipFile, KeyError, TypeError, json.JSONDecodeError, OSError, GalleryError) as exc:
        raise UserError(f"{path}: not a sem-pcyc archive ({exc}); rebuild it with `dvc repro archive`") from None
    thumb_format = (manifest.get("thumbnails") or {}).get("format")
    return Archive(path, serving, thumbs, THUMB_TYPES.get(thumb_format, "image/webp"))


# ------------------------------------------------------------------------------------------------- queries

def check_query(body: bytes, max_pixels: int) -> str:
    """The content type of an acceptable query image, or Refused saying what is wrong with it."""
    return inspect_query(body, max_pixels)[0]


def inspect_query(body: bytes, max_pixels: int) -> tuple[str, int]:
    """(content type, pixels) of an acceptable query image, or Refused saying what is wrong with it (from the
    header only: the pixels are never decoded here)."""
    if not body:
        raise Refused(400, "nothing to search: the sketch is empty")
    if len(body) > MAX_BODY_BYTES:
        raise Refused(413, f"the image is {len(body):,} bytes, over the {MAX_BODY_BYTES:,}-byte limit")
    if body[:8] == b"\x89PNG\r\n\x1a\n":
        content_type = "image/png"
    elif body[:3] == b"\xff\xd8\xff":
        content_type = "image/jpeg"
    else:
        raise Refused(415, "not a PNG or JPEG image; draw a sketch or choose a .png or .jpg file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(body), formats=("PNG", "JPEG")) as image:
                width, height = image.size
    except Image.DecompressionBombError:
        raise Refused(413, f"the image has far more than the {max_pixels:,}-pixel limit; scale it down") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise Refused(400, "not a readable PNG or JPEG image (broken data)") from None
    if width * height > max_pixels:
        raise Refused(413, f"the image is {width}x{height} = {width * height:,} pixels, over the model's "
                           f"{max_pixels:,}-pixel limit (serve.max_pixels); scale it down")
    return content_type, width * height


@dataclass(frozen=True)
class PageConfig:
    inference_url: str               # TorchServe's inference API, as seen from here (e.g. through an SSH tunnel)
    archives: tuple[Archive, ...]    # the first one's version is the page's default
    settings: PageSettings
    token: str | None = field(repr=False)   # TorchServe's inference token; never sent to the page
    token_env: str | None                   # the variable it comes from, named when TorchServe refuses it
    management_url: str | None = None       # TorchServe's management API, to list the registered versions
    management_token: str | None = field(default=None, repr=False)

    @property
    def model_name(self) -> str:
        return self.archives[0].model_name

    def meta(self) -> dict:
        default = self.archives[0]
        return {"model_name": self.model_name, "default_version": default.version,
                "versions": [a.meta() for a in self.archives], "max_pixels": default.serving["max_pixels"],
                "max_body_bytes": MAX_BODY_BYTES, "debounce_ms": self.settings.search_debounce_ms,
                "inference": _without_userinfo(self.inference_url)}


def _without_userinfo(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")


def forward(config: PageConfig, version: str, body: bytes, content_type: str) -> tuple[int, bytes]:
    """POST the query to TorchServe's /predictions/<model>/<version>: (status, JSON body for the page). TorchServe's
    "no worker" 503 (its queue is full) comes back as 503 with a sentence for a person (the caller adds when)."""
    url = f"{config.inference_url.rstrip('/')}/predictions/{config.model_name}/{version}"
    headers = {"Content-Type": content_type}
    if config.token:
        headers["Authorization"] = f"Bearer {config.token}"
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with DIRECT.open(request, timeout=FORWARD_TIMEOUT_S) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, error_json(exc.code, torchserve_error(config, version, exc.code, exc.read()))
    except TimeoutError:
        return 504, error_json(504, f"TorchServe at {_without_userinfo(url)} did not answer within "
                                    f"{FORWARD_TIMEOUT_S} s")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return 502, error_json(502, f"TorchServe at {_without_userinfo(config.inference_url)} is not answering "
                                    f"({reason}); start it (sempcyc serve) or open the SSH tunnel")


def torchserve_error(config: PageConfig, version: str, status: int, body: bytes) -> str:
    """A readable message for TorchServe's (or the handler's) error answer."""
    try:
        answer = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        answer = None
    if not isinstance(answer, dict):
        return f"TorchServe answered {status}: {body[:200].decode('utf-8', 'replace')}"
    if isinstance(answer.get("error"), str):  # the handler's own 4xx: what to send instead
        return answer["error"]
    kind, message = str(answer.get("type", "")), str(answer.get("message", ""))
    if status == 404 or "NotFound" in kind:
        return (f"version {version} of {config.model_name} is not registered on TorchServe at "
                f"{_without_userinfo(config.inference_url)} ({message or kind})")
    if status == 503 and ("ServiceUnavailable" in kind or "no worker" in message):
        return BUSY
    if "InvalidKey" in kind or status == 401:
        where = f"; set ${config.token_env} to its inference key" if config.token_env else ""
        return f"TorchServe refused the inference token ({message or kind}){where}"
    return f"TorchServe answered {status}: {message or kind or body[:200]!r}"


BUSY = "TorchServe's queue is full"


def registered_versions(config: PageConfig) -> dict:
    """The versions of the model TorchServe has registered ({"versions": [...], "default": ...}), from its
    management API; {"versions": None, "note": why} when there is none to ask or it does not answer (a remote
    TorchServe reached only through its inference port): the page then offers a text box."""
    if not config.management_url:
        return {"versions": None, "note": "TorchServe's management API was not given to the page server "
                                          "(sempcyc ui --management-url): type the version"}
    url = f"{config.management_url.rstrip('/')}/models/{config.model_name}"
    headers = {"Authorization": f"Bearer {config.management_token}"} if config.management_token else {}
    try:  # /models/<name> describes the default version, /models/<name>/all every one
        described = {}
        for which in ("default", "all"):
            request = urllib.request.Request(url + ("/all" if which == "all" else ""), headers=headers)
            with DIRECT.open(request, timeout=10) as resp:
                described[which] = [str(m["modelVersion"]) for m in json.loads(resp.read())]
        versions, default = described["all"], described["default"][0]
    except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "code", None) or exc
        return {"versions": None, "note": f"TorchServe's management API at {_without_userinfo(url)} did not list "
                                          f"the versions ({reason}): type the version"}
    return {"versions": sorted(set(versions), key=_version_key, reverse=True), "default": default}


def _version_key(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else -1 for p in re.split(r"[.+-]", version))




# ------------------------------------------------------------------------------------------------- server

class Admission:
    """The searches in flight (forwarded or waiting for a pool thread), counted per lane; past the caps a search is
    refused at once with the seconds to wait, estimated from how long searches have been taking."""

    def __init__(self, threads: int, max_pending: int, max_large: int):
        self.threads, self.max_pending, self.max_large = threads, max_pending, max_large
        self.pending = self.large = 0
        self.mean_s = 0.1  # a running mean of a forwarded search's time
        self._lock = threading.Lock()

    def retry_after(self) -> int:
        return max(1, min(60, math.ceil((self.pending + 1) * self.mean_s / self.threads)))

    def admit(self, large: bool) -> int | None:
        """None when admitted (then call done()), else the seconds to wait."""
        with self._lock:
            if self.pending >= self.max_pending or (large and self.large >= self.max_large):
                return self.retry_after()
            self.pending += 1
            self.large += large
            return None

    def done(self, large: bool, seconds: float) -> None:
        with self._lock:
            self.pending -= 1
            self.large -= large
            self.mean_s = 0.9 * self.mean_s + 0.1 * seconds


def busy(seconds: int, what: str) -> Response:
    return Response(503, error_json(503, f"Busy: {what}; try again in {seconds} s."),
                    headers={"Retry-After": str(seconds), "Cache-Control": "no-store"})


class PageServer:
    """The page's HTTP server on 127.0.0.1:`port` (0: a free one), in a background thread; a context manager."""

    def __init__(self, config: PageConfig, port: int = 0):
        self.config = config
        self.forwarded = 0  # queries sent to TorchServe (the tests check that refused ones never are)
        self.admission = Admission(LIMITS.threads, MAX_PENDING_SEARCHES, MAX_PENDING_LARGE)
        self._lock = threading.Lock()
        try:
            self.httpd = HttpFront(PageApp(self), port, LIMITS)
        except OSError as exc:
            raise UserError(f"cannot listen on 127.0.0.1:{port} ({exc.strerror}); pass another --port, or 0 for "
                            "a free one") from None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/"

    def count_forward(self) -> None:
        with self._lock:
            self.forwarded += 1

    def start(self) -> PageServer:
        self.httpd.start()
        return self

    def stop(self) -> None:
        self.httpd.stop()

    def __enter__(self) -> PageServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class PageApp:
    """The page server's routes (httpfront calls head() when the headers are in, handle() with the body)."""

    def __init__(self, page: PageServer):
        self.page, self.config = page, page.config
        self._versions, self._versions_lock = (-VERSIONS_TTL_S - 1.0, b""), threading.Lock()

    def head(self, request: Request) -> Response | None:
        """Refuse other Host names (DNS rebinding: a web site must not reach this token-holding proxy) and, on POST,
        another site's pages (a foreign Origin), before the body is read."""
        host = urllib.parse.urlsplit("//" + request.headers.get("host", "")).hostname
        if host not in LOCAL_HOSTS:
            return Response(403, error_json(403, f"host {host!r} refused; open the page at 127.0.0.1"), close=True)
        if request.method not in ("GET", "HEAD", "POST"):
            return Response(405, error_json(405, f"{request.method} is not served here; use GET or POST"),
                            headers={"Allow": "GET, HEAD, POST"}, close=True)
        origin = request.headers.get("origin")
        if request.method == "POST" and origin is not None and origin != f"http://{request.headers['host']}":
            return Response(403, error_json(403, f"a search from {origin!r} refused: only the page itself may "
                                                 "search; open it at 127.0.0.1"), close=True)
        return None

    def handle(self, request: Request) -> Response | Deferred:
        path = urllib.parse.urlsplit(request.target).path
        if request.method == "POST":
            return self.search(path, request)
        if path in STATIC_FILES or path == "/index.html":
            name, content_type = STATIC_FILES.get(path, STATIC_FILES["/"])
            return Response(200, (STATIC_DIR / name).read_bytes(), content_type, {"Cache-Control": "no-cache"})
        if path == "/api/meta":
            return Response(200, json.dumps(self.config.meta()).encode(), headers={"Cache-Control": "no-store"})
        if path == "/api/versions":
            return Deferred(self.versions, lambda: None)
        if path.startswith("/thumbs/"):
            return self.thumbnail(path[len("/thumbs/"):])
        if path == "/favicon.ico":
            return Response(204, b"", "image/x-icon")
        return Response(404, error_json(404, f"no such page: {path}"))

    def versions(self) -> Response:
        """registered_versions, asked of TorchServe at most every VERSIONS_TTL_S (every tab asks once)."""
        with self._versions_lock:
            if time.monotonic() - self._versions[0] > VERSIONS_TTL_S:
                self._versions = (time.monotonic(), json.dumps(registered_versions(self.config)).encode())
            return Response(200, self._versions[1], headers={"Cache-Control": "no-store"})

    def thumbnail(self, rest: str) -> Response:
        """/thumbs/<version>/<quoted image id>: that version's thumbnail, else another archive's (the same image
        id), else a redirect to page.thumbnail_base_url, else 404 (the page then shows the class name). A version
        the page has no archive of is 404."""
        quoted_version, _, quoted = rest.partition("/")
        version, image_id = urllib.parse.unquote(quoted_version), urllib.parse.unquote(quoted)
        if version not in {a.version for a in self.config.archives}:
            return Response(404, error_json(404, f"no archive of version {version!r} was given to the page"))
        for archive in sorted(self.config.archives, key=lambda a: a.version != version):
            if image_id in archive.thumbs:
                return Response(200, archive.thumbs[image_id], archive.thumb_type,
                                {"Cache-Control": "private, max-age=3600"})
        base = self.config.settings.thumbnail_base_url
        if base and image_id and ".." not in image_id.split("/"):
            return Response(302, b"", "text/plain", {"Location": f"{base.rstrip('/')}/{urllib.parse.quote(image_id)}"})
        return Response(404, error_json(404, f"no thumbnail for {image_id!r}"))

    def search(self, path: str, request: Request) -> Response | Deferred:
        if not path.startswith("/api/search/"):
            return Response(404, error_json(404, f"no such API: {path}; searches go to /api/search/<version>"))
        version = urllib.parse.unquote(path[len("/api/search/"):])
        if not VERSION.fullmatch(version):
            return Response(400, error_json(400, f"not a version: {version!r}; versions look like 1.2.3"))
        archive = next((a for a in self.config.archives if a.version == version), self.config.archives[0])
        try:
            content_type, pixels = inspect_query(request.body, int(archive.serving["max_pixels"]))
        except Refused as refused:
            return Response(refused.status, error_json(refused.status, refused.message))
        large = pixels > LARGE_PIXELS
        admission = self.page.admission
        wait = admission.admit(large)
        if wait is not None:
            what = (f"{MAX_PENDING_LARGE} large images (over {LARGE_PIXELS:,} pixels) are being searched"
                    if large and admission.pending < admission.max_pending else
                    f"{admission.pending} searches are waiting for the model")
            return busy(wait, what)
        took = [0.0]

        def run() -> Response:
            self.page.count_forward()
            started = time.monotonic()
            status, answer = forward(self.config, version, request.body, content_type)
            took[0] = time.monotonic() - started
            if status == 503 and json.loads(answer).get("error") == BUSY:
                return busy(admission.retry_after(), BUSY)
            return Response(status, answer, headers={"Cache-Control": "no-store"})
        return Deferred(run, lambda: admission.done(large, took[0]))
