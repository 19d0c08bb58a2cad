"""The sketch page's own small HTTP server, shared by `sempcyc serve` and `sempcyc ui`.

Bound to 127.0.0.1, it serves the page (static/: plain HTML, CSS and JS), the model's metadata and the gallery
thumbnails from the archive(s), and forwards each search to TorchServe's inference API. The browser talks only to
this server (same origin: no CORS), so a TorchServe token stays in this process and never reaches the page. Query
images are checked here too (PNG or JPEG, size, pixels) before anything is sent to TorchServe.

Routes: GET / (the page), /page.js, /page.css, /api/meta, /thumbs/<version>/<image id>; POST /api/search/<version>.
"""
from __future__ import annotations

import io
import json
import re
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zipfile
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

from PIL import Image, UnidentifiedImageError

from .errors import UserError
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
    """The content type of an acceptable query image, or Refused saying what is wrong with it (header only: the
    pixels are never decoded here)."""
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
        raise Refused(413, f"the image has far more than the {max_pixels:,}-pixel limit") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise Refused(400, "not a readable PNG or JPEG image (broken data)") from None
    if width * height > max_pixels:
        raise Refused(413, f"the image is {width}x{height} = {width * height:,} pixels, over the model's "
                           f"{max_pixels:,}-pixel limit (serve.max_pixels); scale it down")
    return content_type


@dataclass(frozen=True)
class PageConfig:
    inference_url: str               # TorchServe's inference API, as seen from here (e.g. through an SSH tunnel)
    archives: tuple[Archive, ...]    # the first one's version is the page's default
    settings: PageSettings
    token: str | None = field(repr=False)   # TorchServe's inference token; never sent to the page
    token_env: str | None                   # the variable it comes from, named when TorchServe refuses it

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
    """POST the query to TorchServe's /predictions/<model>/<version>: (status, JSON body for the page)."""
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
    if "InvalidKey" in kind or status == 401:
        where = f"; set ${config.token_env} to its inference key" if config.token_env else ""
        return f"TorchServe refused the inference token ({message or kind}){where}"
    return f"TorchServe answered {status}: {message or kind or body[:200]!r}"


def error_json(status: int, message: str) -> bytes:
    return json.dumps({"error": message, "status": status}).encode()


# ------------------------------------------------------------------------------------------------- server

class PageServer:
    """The page's HTTP server on 127.0.0.1:`port` (0: a free one), in a background thread; a context manager."""

    def __init__(self, config: PageConfig, port: int = 0):
        self.config = config
        self.forwarded = 0  # queries sent to TorchServe (the tests check that refused ones never are)
        self._lock = threading.Lock()
        try:
            self.httpd = _Server(("127.0.0.1", port), PageHandler)
        except OSError as exc:
            raise UserError(f"cannot listen on 127.0.0.1:{port} ({exc.strerror}); pass another --port, or 0 for "
                            "a free one") from None
        self.httpd.page = self
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/"

    def count_forward(self) -> None:
        with self._lock:
            self.forwarded += 1

    def start(self) -> PageServer:
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="sem-pcyc-page", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.thread is not None:
            self.httpd.shutdown()
            self.thread.join(timeout=10)
            self.thread = None
        self.httpd.server_close()

    def __enter__(self) -> PageServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    page: PageServer

    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # the browser went away mid-answer (e.g. the thumbnails of a grid it just replaced)
        super().handle_error(request, client_address)


class PageHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the page's searches reuse one connection
    server_version = "sem-pcyc-page"
    # headers and body are two writes: with Nagle's algorithm the body waited for the browser's delayed ACK
    # (measured: +50 ms a search)
    disable_nagle_algorithm = True

    def log_message(self, *args) -> None:  # quiet; errors reach the page as JSON
        pass

    @property
    def page(self) -> PageServer:
        return self.server.page

    def reply(self, status: int, body: bytes, content_type: str = "application/json",
              headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def local_host(self) -> bool:
        """Refuse other Host names (DNS rebinding: a web site must not reach this token-holding proxy)."""
        host = urllib.parse.urlsplit("//" + (self.headers.get("Host") or "")).hostname
        if host in LOCAL_HOSTS:
            return True
        self.close_connection = True  # a request body, if any, is left unread
        self.reply(403, error_json(403, f"host {host!r} refused; open the page at 127.0.0.1"))
        return False

    def do_GET(self) -> None:
        if not self.local_host():
            return
        path = urllib.parse.urlsplit(self.path).path
        if path in STATIC_FILES or path == "/index.html":
            name, content_type = STATIC_FILES.get(path, STATIC_FILES["/"])
            self.reply(200, (STATIC_DIR / name).read_bytes(), content_type, {"Cache-Control": "no-cache"})
        elif path == "/api/meta":
            self.reply(200, json.dumps(self.page.config.meta()).encode(), headers={"Cache-Control": "no-store"})
        elif path.startswith("/thumbs/"):
            self.thumbnail(path[len("/thumbs/"):])
        elif path == "/favicon.ico":
            self.reply(204, b"", "image/x-icon")
        else:
            self.reply(404, error_json(404, f"no such page: {path}"))

    do_HEAD = do_GET

    def thumbnail(self, rest: str) -> None:
        """/thumbs/<version>/<quoted image id>: that version's thumbnail, else another archive's, else a redirect
        to page.thumbnail_base_url, else 404 (the page then shows the class name)."""
        version, _, quoted = rest.partition("/")
        image_id = urllib.parse.unquote(quoted)
        archives = sorted(self.page.config.archives, key=lambda a: a.version != urllib.parse.unquote(version))
        for archive in archives:
            if image_id in archive.thumbs:
                self.reply(200, archive.thumbs[image_id], archive.thumb_type,
                           {"Cache-Control": "private, max-age=3600"})
                return
        base = self.page.config.settings.thumbnail_base_url
        if base and image_id and ".." not in image_id.split("/"):
            self.reply(302, b"", "text/plain", {"Location": f"{base.rstrip('/')}/{urllib.parse.quote(image_id)}"})
        else:
            self.reply(404, error_json(404, f"no thumbnail for {image_id!r}"))

    def do_POST(self) -> None:
        if not self.local_host():
            return
        body = self.read_body()
        if body is None:
            return
        path = urllib.parse.urlsplit(self.path).path
        if not path.startswith("/api/search/"):
            self.reply(404, error_json(404, f"no such API: {path}; searches go to /api/search/<version>"))
            return
        version = urllib.parse.unquote(path[len("/api/search/"):])
        if not VERSION.fullmatch(version):
            self.reply(400, error_json(400, f"not a version: {version!r}; versions look like 1.2.3"))
            return
        config = self.page.config
        archive = next((a for a in config.archives if a.version == version), config.archives[0])
        try:
            content_type = check_query(body, int(archive.serving["max_pixels"]))
        except Refused as refused:
            self.reply(refused.status, error_json(refused.status, refused.message))
            return
        self.page.count_forward()
        status, answer = forward(config, version, body, content_type)
        self.reply(status, answer, headers={"Cache-Control": "no-store"})

    def read_body(self) -> bytes | None:
        """The request body; None (after answering 411/413) when it has no length or is too large. A too-large
        body is still read (up to DISCARD_BYTES) so the browser gets the answer rather than a reset connection."""
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            self.reply(411, error_json(411, "send the query with a Content-Length"))
            return None
        if length > MAX_BODY_BYTES:
            self.reply_too_large(length)
            return None
        return self.rfile.read(length)

    def reply_too_large(self, length: int) -> None:
        if length > DISCARD_BYTES:
            self.close_connection = True
        else:
            left = length
            while left > 0:
                left -= len(self.rfile.read(min(1 << 20, left))) or left  # `or left`: stop at end of input
        self.reply(413, error_json(413, f"the image is {length:,} bytes, over the {MAX_BODY_BYTES:,}-byte limit"))
