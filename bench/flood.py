"""The service under a flood, slow clients and oversized images (issue 27): `sempcyc serve` on an archive, attacked
from this machine over 127.0.0.1 only, every scenario bounded in count and time.

  sketches  200 concurrent sketch searches through the page server (and, for reference, straight to TorchServe):
            status counts, connection resets, whether every 503/429 has Retry-After and no "scale workers" text,
            p50/p99 of the answered ones
  large     100 concurrent PNGs at serve.max_pixels (line drawings, the largest a sketch may be) plus one normal
            sketch sent once the flood is in: the normal sketch's time, the flood's status counts, the workers'
            RSS before (idle) and at its peak; then the same with 4000 x 4000 PNGs (over the cap: refused from the
            header, before any decoding)
  slow      1 000 connections that declare a 1 000-byte body and send 10 bytes, then one normal search and one
            GET /api/meta: their times, the page server's threads (its pool is page.LIMITS.threads), and how the
            slow connections ended
  decode    what a sketch-sized cap buys: a worker's decode + resize time of a line-drawing PNG by size
  draft     whether JPEG draft mode (decoding at 1/2, 1/4, 1/8 size) could serve images within the cap: the
            archive's model ranks the gallery for sketches upscaled to 1024 and 2048 px and saved as JPEG, decoded
            in full and in draft mode; the share of identical top-k lists, and the decode times

Usage: python bench/flood.py [--mar models/sem_pcyc.mar] [--sketch SKETCH.png] [--sketches data/dataset/sketches]
                             [--only decode,draft,sketches,large,slow]
(--mar defaults to the pipeline's archive; any sem-pcyc archive works: the figures depend on its backbone and
input size, not on its gallery). Runs on the installed package. Timings on a shared machine are pessimistic.
"""
from __future__ import annotations

import argparse
import http.client
import io
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sempcyc import params as params_mod
from sempcyc.page import LIMITS
from sempcyc.runtime import imaging
from sempcyc.runtime.search import SketchSearch
from sempcyc.serving import ServeSettings


def line_drawing(side: int, seed: int = 0, strokes: int = 40) -> bytes:
    """A black-on-white line drawing `side` pixels square: what a large sketch looks like (and compresses like)."""
    rng = np.random.default_rng(seed)
    img = Image.new("L", (side, side), 255)
    draw = ImageDraw.Draw(img)
    width = max(2, side // 150)
    for _ in range(strokes):
        draw.line([tuple(rng.integers(0, side, 2)) for _ in range(4)], fill=0, width=width)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def post(host_port: tuple[str, int], path: str, body: bytes, timeout: float = 60) -> dict:
    """One POST on its own connection: status, seconds, Retry-After, body, or the exception's name."""
    started = time.monotonic()
    conn = http.client.HTTPConnection(*host_port, timeout=timeout)
    try:
        conn.request("POST", path, body, {"Content-Type": "image/png"})
        resp = conn.getresponse()
        data = resp.read()
        return {"status": resp.status, "s": time.monotonic() - started, "retry": resp.getheader("Retry-After"),
                "body": data[:300]}
    except (OSError, http.client.HTTPException) as exc:
        return {"status": type(exc).__name__, "s": time.monotonic() - started, "retry": None, "body": b""}
    finally:
        conn.close()


def summary(results: list[dict]) -> str:
    counts: dict = {}
    for r in results:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    ok = sorted(r["s"] for r in results if r["status"] == 200)
    refused = [r for r in results if r["status"] in (429, 503)]
    clean = all(r["retry"] for r in refused) and not any(b"scale workers" in r["body"] for r in refused)
    pct = (lambda q: f"{np.percentile(ok, q) * 1000:.0f} ms") if ok else (lambda q: "-")
    return (f"statuses {dict(sorted(counts.items(), key=str))}; answered p50 {pct(50)}, p99 {pct(99)}; "
            f"503/429 all with Retry-After and no scale-workers text: {'yes' if clean else 'NO'}")


def flood(target: tuple[str, int], path: str, bodies: list[bytes], workers: int | None = None) -> list[dict]:
    """All bodies at once (a barrier releases them together), each on its own connection."""
    barrier = threading.Barrier(len(bodies))

    def one(body: bytes) -> dict:
        barrier.wait(30)
        return post(target, path, body)
    with ThreadPoolExecutor(workers or len(bodies)) as pool:
        return list(pool.map(one, bodies))


# ------------------------------------------------------------------------------------------------- processes

class Served:
    """`sempcyc serve` on the archive, in its own process session; its URLs read from what it prints."""

    def __init__(self, mar: Path, params: Path, workdir: Path):
        self.log = workdir / "serve.out"
        ports = [free_port() for _ in range(3)]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "sempcyc"), "--params", str(params), "serve", "--mar", str(mar),
                 "--port", str(ports[0]), "--management-port", str(ports[1]), "--page-port", str(ports[2])],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        deadline = time.monotonic() + 300
        while "ready. Try" not in self.log.read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"sempcyc serve did not start:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.2)
        text = self.log.read_text()
        self.page = ("127.0.0.1", int(re.search(r"sketch page: http://127\.0\.0\.1:(\d+)/", text).group(1)))
        self.inference = ("127.0.0.1", int(re.search(r"http://127\.0\.0\.1:(\d+)/predictions/", text).group(1)))
        self.model = re.search(r"/predictions/(\S+)", text).group(1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)

    def workers(self) -> list[int]:
        """The TorchServe worker processes under this serve (model_service_worker in their command line)."""
        children = descendants(self.proc.pid)
        return [p for p in children if b"model_service_worker" in read_proc(p, "cmdline")]

    def page_threads(self) -> int:
        return int(re.search(rb"Threads:\s+(\d+)", read_proc(self.proc.pid, "status")).group(1))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def read_proc(pid: int, name: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:
        return b""


def descendants(root: int) -> list[int]:
    parent = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = read_proc(int(entry.name), "stat")
            if stat:
                parent[int(entry.name)] = int(stat.rsplit(b")", 1)[1].split()[1])
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        kids = [p for p, pp in parent.items() if pp == pid]
        found += kids
        todo += kids
    return found


def rss_mb(pids: list[int]) -> list[float]:
    out = []
    for pid in pids:
        match = re.search(rb"VmRSS:\s+(\d+) kB", read_proc(pid, "status"))
        out.append(int(match.group(1)) / 1024 if match else 0.0)
    return out


class RssPeak:
    """Samples the workers' RSS every 50 ms while in a `with` block; .peak per worker."""

    def __init__(self, pids: list[int]):
        self.pids, self.peak, self.stop = pids, [0.0] * len(pids), threading.Event()

    def __enter__(self) -> RssPeak:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stop.wait(0.05):
            self.peak = [max(a, b) for a, b in zip(self.peak, rss_mb(self.pids))]

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


# ------------------------------------------------------------------------------------------------- scenarios

def scenario_sketches(served: Served, sketch: bytes) -> None:
    print("\n200 concurrent sketches (each on its own connection, released together)")
    for label, target, path in (("page server", served.page, "/api/search/" + served.version),
                                ("TorchServe direct", served.inference, f"/predictions/{served.model}")):
        started = time.monotonic()
        results = flood(target, path, [sketch] * 200)
        print(f"  {label:18} {summary(results)}; all answered in {time.monotonic() - started:.1f} s")
        refused = next((r["body"] for r in results if r["status"] == 503), None)
        if refused:
            print(f"  {'':18} a 503 reads: {refused[:200].decode('utf-8', 'replace')}")


def scenario_large(served: Served, sketch: bytes, max_pixels: int) -> None:
    side = int(max_pixels ** 0.5)
    for label, big in ((f"{side} x {side} PNGs (at serve.max_pixels)", [line_drawing(side, i) for i in range(100)]),
                       ("4000 x 4000 PNGs (over the cap)", [line_drawing(4000, 0, 60)] * 100)):
        print(f"\n100 concurrent {label}, {len(big[0]) / 1000:.0f} KB each, plus one normal sketch")
        for where, target, path in (("page server", served.page, "/api/search/" + served.version),
                                    ("TorchServe direct", served.inference, f"/predictions/{served.model}")):
            workers = served.workers()
            time.sleep(1.0)
            idle = rss_mb(workers)
            normal: dict = {}

            def send_normal(target=target, path=path, normal=normal) -> None:
                time.sleep(0.3)  # the flood is in by then
                normal.update(post(target, path, sketch))
            with RssPeak(workers) as rss, ThreadPoolExecutor(1) as one:
                later = one.submit(send_normal)
                results = flood(target, path, big)
                later.result()
            ratio = max(p / i for p, i in zip(rss.peak, idle)) if idle else float("nan")
            print(f"  {where:18} normal sketch: {normal['status']} in {normal['s'] * 1000:.0f} ms; flood "
                  f"{summary(results)}")
            print(f"  {'':18} worker RSS idle {', '.join(f'{v:.0f}' for v in idle)} MB, peak "
                  f"{', '.join(f'{v:.0f}' for v in rss.peak)} MB: {ratio:.2f}x idle")


def slow_connection(target: tuple[str, int], version: str) -> socket.socket | None:
    try:
        sock = socket.create_connection(target, timeout=5)
        sock.sendall(f"POST /api/search/{version} HTTP/1.1\r\nHost: 127.0.0.1:{target[1]}\r\nContent-Type: "
                     "image/png\r\nContent-Length: 1000\r\n\r\n".encode() + b"\x89PNG\r\n\x1a\nxx")
        return sock
    except OSError:
        return None


def scenario_slow(served: Served, sketch: bytes) -> None:
    print(f"\n1 000 slow connections (declare 1 000 bytes, send 10) to the page server, then one normal search "
          f"(pool {LIMITS.threads} threads, {LIMITS.max_connections} connections, requests within "
          f"{LIMITS.request_timeout_s:g} s)")
    before = served.page_threads()
    started = time.monotonic()
    socks = [slow_connection(served.page, served.version) for _ in range(1000)]
    opened = time.monotonic() - started
    time.sleep(0.5)
    during = served.page_threads()
    search = post(served.page, "/api/search/" + served.version, sketch)
    meta_started = time.monotonic()
    conn = http.client.HTTPConnection(*served.page, timeout=30)
    conn.request("GET", "/api/meta")
    meta_status = conn.getresponse().status
    meta_s = time.monotonic() - meta_started
    conn.close()
    after = served.page_threads()
    ends = {"408 (timed out)": 0, "closed (evicted for a newer connection)": 0, "still open": 0}
    deadline = time.monotonic() + LIMITS.request_timeout_s + 5
    for sock in socks:
        if sock is None:
            continue
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(64)
            ends["408 (timed out)" if data.startswith(b"HTTP/1.1 408") else
                 "closed (evicted for a newer connection)"] += 1
        except TimeoutError:
            ends["still open"] += 1
        except OSError:
            ends["closed (evicted for a newer connection)"] += 1
        sock.close()
    print(f"  opened {sum(s is not None for s in socks)} in {opened:.1f} s; page server threads: {before} before, "
          f"{during} with the slow connections, {after} after the normal requests (pool {LIMITS.threads} + loop + "
          f"main + {before - 2 - min(before - 2, LIMITS.threads)} others)")
    print(f"  normal search: {search['status']} in {search['s'] * 1000:.0f} ms; GET /api/meta: {meta_status} in "
          f"{meta_s * 1000:.0f} ms")
    print(f"  the slow connections ended: {ends}")


def scenario_decode() -> None:
    print("\ndecode + resize to 128 px of a line-drawing PNG in one process (what a worker does before the CNN)")
    for side in (128, 256, 1111, 2048, 4000):
        data = line_drawing(side)
        times = []
        for _ in range(5 if side <= 2048 else 3):
            started = time.perf_counter()
            imaging.sketch_to_array(imaging.decode_bytes(data, max_pixels=10 ** 9), 128)
            times.append(time.perf_counter() - started)
        print(f"  {side:5} x {side:<5} {side * side / 1e6:6.2f} MP {len(data) / 1000:6.0f} KB: "
              f"{np.median(times) * 1000:6.1f} ms")


def scenario_draft(mar: Path, sketches: list[Path], top_k: int) -> None:
    print(f"\nJPEG draft mode on {len(sketches)} sketches upscaled and saved as JPEG (quality 90): identical "
          f"top-{top_k} to the full decode, and decode + resize time")
    with tempfile.TemporaryDirectory(prefix="sem-pcyc-draft-") as tmp:
        with zipfile.ZipFile(mar) as zf:
            zf.extractall(tmp, [n for n in zf.namelist() if n == "sem_pcyc.pt" or n.startswith("gallery/")])
        search = SketchSearch.load(Path(tmp) / "sem_pcyc.pt", Path(tmp) / "gallery", top_k=top_k, max_pixels=10 ** 9)
        for side in (1024, 2048):
            same, times = {1: 0, 2: 0, 4: 0, 8: 0}, {1: [], 2: [], 4: [], 8: []}
            for path in sketches:
                buf = io.BytesIO()
                Image.open(path).convert("L").resize((side, side), Image.Resampling.BICUBIC).save(buf, "JPEG",
                                                                                                   quality=90)
                full = None
                for scale in (1, 2, 4, 8):
                    started = time.perf_counter()
                    image = Image.open(io.BytesIO(buf.getvalue()))
                    if scale > 1:
                        image.draft("L", (side // scale, side // scale))
                    array = imaging.sketch_to_array(imaging.decode_bytes(buf.getvalue()) if scale == 1 else image,
                                                    search.encoder.size)
                    times[scale].append(time.perf_counter() - started)
                    ranked = [r["image"] for r in search.rank(search.embed(array[None]))[0]]
                    full = full or ranked
                    same[scale] += ranked == full
            print(f"  {side} px: " + "; ".join(f"{'full' if s == 1 else f'1/{s}'} {same[s]}/{len(sketches)} "
                                                f"identical, {np.median(times[s]) * 1000:.1f} ms" for s in same))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mar", default="models/sem_pcyc.mar")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--sketch", help="the normal sketch (default: a 256-px line drawing, the page's canvas)")
    parser.add_argument("--sketches", default="data/dataset/sketches",
                        help="sketches for the draft scenario (every 6th, at most 20)")
    parser.add_argument("--only", default="decode,draft,sketches,large,slow")
    args = parser.parse_args()
    only = set(args.only.split(","))
    (serve,) = params_mod.read(args.params, ServeSettings)
    sketch = Path(args.sketch).read_bytes() if args.sketch else line_drawing(256, 7, 6)
    print(f"serve.workers {serve.workers}, serve.queue_size {serve.queue_size}, serve.max_pixels "
          f"{serve.max_pixels:,}, batch {serve.batch_size}; {os.cpu_count()} cores, load "
          f"{os.getloadavg()[0]:.1f} (a shared machine: pessimistic timings)")
    if "decode" in only:
        scenario_decode()
    if "draft" in only:
        scenario_draft(Path(args.mar), sorted(Path(args.sketches).glob("*/*"))[::6][:20], serve.top_k)
    if not only & {"sketches", "large", "slow"}:
        return
    with tempfile.TemporaryDirectory(prefix="sem-pcyc-flood-") as tmp:
        served = Served(Path(args.mar), Path(args.params), Path(tmp))
        try:
            served.version = re.search(r"\(v(\S+)\)", served.log.read_text()).group(1)
            for name, run in (("sketches", lambda: scenario_sketches(served, sketch)),
                              ("large", lambda: scenario_large(served, sketch, serve.max_pixels)),
                              ("slow", lambda: scenario_slow(served, sketch))):
                if name in only:
                    run()
        finally:
            served.stop()


if __name__ == "__main__":
    main()
