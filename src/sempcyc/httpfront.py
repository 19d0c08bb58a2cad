"""A small HTTP/1.1 server for the sketch page: one asyncio event loop reads every connection, a bounded thread pool
does the blocking work (a search forwarded to TorchServe), so a slow or idle client costs a few kilobytes, never a
thread.

Limits (Limits, set by page.py): at most `max_connections` open connections (a new one past that closes the one
that has waited longest for its request to arrive, which is what a slow-loris client holds); a request's line,
headers and body must all arrive within `request_timeout_s` (else 408 and the connection is closed); a kept-alive
connection idle for `idle_timeout_s` is closed; headers are capped at `max_header_bytes`, bodies at `max_body_bytes`
(413), and all bodies being read at once at `body_budget_bytes` (503: the server holds a bounded amount of memory
whatever clients declare); an answer the client does not read within `write_timeout_s` closes the connection.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus


@dataclass(frozen=True)
class Limits:
    max_connections: int
    threads: int                   # the pool that runs Deferred work (and the only threads besides the loop's)
    request_timeout_s: float
    idle_timeout_s: float
    write_timeout_s: float
    max_header_bytes: int
    max_body_bytes: int
    discard_body_bytes: int        # a refused body up to this size is read and dropped, so the client sees the 413
    body_budget_bytes: int


@dataclass
class Request:
    method: str
    target: str
    headers: dict[str, str]        # names in lower case
    version: str = "HTTP/1.1"
    body: bytes = b""

    def keep_alive(self) -> bool:
        wanted = self.headers.get("connection", "").lower()
        return wanted == "keep-alive" if self.version == "HTTP/1.0" else wanted != "close"


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    close: bool = False


@dataclass
class Deferred:
    """Work for the pool: `run()` may block (a call to TorchServe); `done()` runs after it, whatever happened."""
    run: Callable[[], Response]
    done: Callable[[], None]


def error_json(status: int, message: str) -> bytes:
    return json.dumps({"error": message, "status": status}).encode()


class _Closed(Exception):
    """The connection is over: the client went away, timed out, or was told why and closed."""


class HttpFront:
    """Serves `app` on 127.0.0.1:`port` (0: a free one) in a background thread, from construction until stop().
    app.head(request) is called once the headers are in (a Response refuses the request before its body is read,
    e.g. a foreign host); app.handle(request) once the body is in: it returns a Response (cheap work, on the loop)
    or a Deferred (for the pool)."""

    def __init__(self, app, port: int, limits: Limits):
        self.app, self.limits = app, limits
        self.pool = concurrent.futures.ThreadPoolExecutor(limits.threads, thread_name_prefix="sem-pcyc-page")
        self.loop = asyncio.new_event_loop()
        self.reading: dict[asyncio.StreamWriter, float] = {}   # connection -> when its current request began
        self.open: set[asyncio.StreamWriter] = set()
        self.body_bytes = 0                                    # bodies being read now, as declared
        self.evicted = 0
        # the loop runs in its own thread from the start (the caller's thread may run another loop: Playwright's)
        self.thread: threading.Thread | None = threading.Thread(target=self.loop.run_forever,
                                                                name="sem-pcyc-page-loop", daemon=True)
        self.thread.start()
        listening = asyncio.run_coroutine_threadsafe(asyncio.start_server(
            self._connection, "127.0.0.1", port, limit=limits.max_header_bytes, backlog=1024), self.loop)
        try:
            self.server = listening.result(timeout=30)
        except BaseException:
            self.stop()
            raise
        self.server_address = self.server.sockets[0].getsockname()[:2]

    def start(self) -> None:
        """Nothing to do: it serves from construction on (kept for the context-manager callers)."""

    def stop(self) -> None:
        if self.thread is not None:
            if hasattr(self, "server"):
                asyncio.run_coroutine_threadsafe(self._close_all(), self.loop).result(timeout=10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=10)
            self.thread = None
            self.pool.shutdown(wait=False, cancel_futures=True)
            self.loop.close()

    async def _close_all(self) -> None:
        self.server.close()
        for writer in list(self.open):
            writer.close()

    # ------------------------------------------------------------------------------------------ connections
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self.open) >= self.limits.max_connections:
            self._evict_slowest()
        self.open.add(writer)
        try:
            while await self._one_request(reader, writer):
                pass
        except (_Closed, ConnectionError, asyncio.IncompleteReadError, OSError):
            pass
        finally:
            self.open.discard(writer)
            self.reading.pop(writer, None)
            writer.close()

    def _evict_slowest(self) -> None:
        """Make room: close the connection that has waited longest for its request (idle ones count as waiting
        since their last answer)."""
        if self.reading:
            oldest = min(self.reading, key=self.reading.get)
            self.reading.pop(oldest)
            self.evicted += 1
            oldest.close()

    async def _one_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Read, handle and answer one request; False when the connection should close."""
        self.reading[writer] = time.monotonic()
        try:
            first = await asyncio.wait_for(reader.readexactly(1), self.limits.idle_timeout_s)
        except (asyncio.TimeoutError, asyncio.IncompleteReadError):
            return False  # idle, or the client closed: nothing to answer
        self.reading[writer] = time.monotonic()
        deadline = self.reading[writer] + self.limits.request_timeout_s
        request = await self._read_head(reader, first)
        if isinstance(request, Response):
            await self._send(writer, "GET", request)
            return False
        answer = self.app.head(request) or await self._read_body(reader, writer, request, deadline)
        if answer is None:
            self.reading.pop(writer, None)
            answer = self.app.handle(request)
            if isinstance(answer, Deferred):
                answer = await self._in_pool(answer)
        keep = not answer.close and request.keep_alive()
        answer.close = not keep
        await self._send(writer, request.method, answer)
        return keep

    async def _read_head(self, reader: asyncio.StreamReader, first: bytes) -> Request | Response:
        """The request line and headers (within request_timeout_s), or the Response refusing them."""
        try:
            head = first + await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.limits.request_timeout_s)
        except asyncio.TimeoutError:
            return self._too_slow()
        except asyncio.LimitOverrunError:
            size = self.limits.max_header_bytes
            return Response(431, error_json(431, f"the request headers are over {size:,} bytes; send fewer or "
                                                 "shorter headers"), close=True)
        request = parse_head(head)
        if request is None:
            return Response(400, error_json(400, "not an HTTP/1.1 request; the page server speaks HTTP/1.1 only"),
                            close=True)
        return request

    async def _read_body(self, reader, writer, request: Request, deadline: float) -> Response | None:
        """Reads the declared body into request.body; a Response when it cannot (and the connection then closes)."""
        if request.headers.get("transfer-encoding"):
            return Response(411, error_json(411, "send the query with a Content-Length, not chunked"), close=True)
        try:
            length = int(request.headers.get("content-length", "0"))
        except ValueError:
            length = -1
        if length < 0:
            return Response(400, error_json(400, "the Content-Length is not a number; send the body's length "
                                                 "in bytes"), close=True)
        if length > self.limits.max_body_bytes:
            return await self._refuse_body(reader, writer, request, length, deadline)
        if not length:
            return None
        if self.body_bytes + length > self.limits.body_budget_bytes:
            return Response(503, error_json(503, "the page server is reading too many uploads at once; try again "
                                                 "in 1 s"), headers={"Retry-After": "1"}, close=True)
        self.body_bytes += length
        try:
            if request.headers.get("expect", "").lower() == "100-continue":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.body = await asyncio.wait_for(reader.readexactly(length), deadline - time.monotonic())
        except asyncio.TimeoutError:
            return self._too_slow()
        finally:
            self.body_bytes -= length
        return None

    async def _refuse_body(self, reader, writer, request: Request, length: int, deadline: float) -> Response:
        limit = self.limits.max_body_bytes
        answer = Response(413, error_json(413, f"the image is {length:,} bytes, over the {limit:,}-byte limit; "
                                               "send a smaller image"), close=True)
        if length <= self.limits.discard_body_bytes and request.headers.get("expect", "").lower() != "100-continue":
            try:  # read and drop it, so the browser sees the answer rather than a reset connection
                left = length
                while left > 0:
                    chunk = await asyncio.wait_for(reader.read(min(1 << 20, left)), deadline - time.monotonic())
                    if not chunk:
                        raise _Closed()
                    left -= len(chunk)
                answer.close = False
            except asyncio.TimeoutError:
                return self._too_slow()
        return answer

    def _too_slow(self) -> Response:
        seconds = self.limits.request_timeout_s
        return Response(408, error_json(408, f"the request did not arrive within {seconds:g} s; send it again"),
                        close=True)

    async def _in_pool(self, work: Deferred) -> Response:
        def run() -> Response:
            try:
                return work.run()
            finally:
                work.done()
        return await self.loop.run_in_executor(self.pool, run)

    async def _send(self, writer: asyncio.StreamWriter, method: str, answer: Response) -> None:
        reason = HTTPStatus(answer.status).phrase if answer.status in HTTPStatus._value2member_map_ else ""
        lines = [f"HTTP/1.1 {answer.status} {reason}", "Server: sem-pcyc-page",
                 f"Content-Type: {answer.content_type}", f"Content-Length: {len(answer.body)}",
                 "X-Content-Type-Options: nosniff"]
        lines += [f"{k}: {v}" for k, v in answer.headers.items()]
        if answer.close:
            lines.append("Connection: close")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if method == "HEAD" else answer.body))
        try:
            await asyncio.wait_for(writer.drain(), self.limits.write_timeout_s)
        except asyncio.TimeoutError:
            raise _Closed() from None


def parse_head(head: bytes) -> Request | None:
    """The request line and headers, or None when they are not HTTP/1.x."""
    try:
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ")
    except ValueError:
        return None
    if not version.startswith("HTTP/1."):
        return None
    headers = {}
    for line in lines[1:]:
        if line:
            name, sep, value = line.partition(":")
            if not sep:
                return None
            headers[name.strip().lower()] = value.strip()
    return Request(method, target, headers, version)
