"""The sketch page on the demo gallery, measured in a real headless Chromium (Debian's, or $SEM_PCYC_CHROMIUM).

  - pen-up -> results painted: the page's own performance marks (debounce, canvas -> PNG, page server, TorchServe,
    rendering, paint), p50/p95 over --strokes strokes, next to the raw HTTP round trip of the very PNG the page
    sent, from a Python client over a kept-alive connection: straight to TorchServe, and through the page server
  - page weight (HTML + JS + CSS, before thumbnails) and first paint / first contentful paint of a cold tab
  - the bytes the gallery thumbnails add to the .mar (the archive built with and without them)

It archives models/sem_pcyc.pt + models/gallery (thumbnails come from the gallery stage: `dvc repro gallery`) into
bench/out/, serves it in a private TorchServe, and runs `sempcyc ui` against it, as a person would. With
--screenshot it also saves a small PNG of the page (quantised to stay under 150 KB) for the README.

Needs a demo run's models/ and data/ (`make repro`, or `dvc repro gallery`).
Usage: python bench/page.py [--strokes 30] [--screenshot docs/page.png]
"""
from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from playwright.sync_api import sync_playwright

from common import REPO
from sempcyc import params as params_mod
from sempcyc.runtime.gallery_shards import (
    MANIFEST,
    SHARD_DIR,
    pack_shard,
    read_manifest,
    sha256_bytes,
    unpack_shard,
)
from sempcyc.serving import ReleaseSettings, ServeSettings, models_config
from sempcyc.stages import archive
from sempcyc.torchserve import TorchServe

OUT = REPO / "bench/out/page"
CHROMIUM = os.environ.get("SEM_PCYC_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
NEEDED = ("models/sem_pcyc.pt", "models/gallery/manifest.json", "data/dataset",
          "data/prepared/splits.json")


def gallery_without_thumbnails(gallery: Path, out: Path) -> Path:
    """A copy of `gallery` whose shards carry no thumbnails (repacked), with its manifest and the files beside the
    shards (the gallery expansion's neighbours, a faiss index), which index items in the same order."""
    shutil.rmtree(out, ignore_errors=True)
    (out / SHARD_DIR).mkdir(parents=True)
    manifest = read_manifest(gallery)
    shards = []
    for entry in manifest["shards"]:
        shard = unpack_shard((gallery / entry["file"]).read_bytes(), entry["file"])
        data = pack_shard(shard["embeddings"], shard["ids"], shard["classes"], [None] * len(shard["ids"]))
        digest = sha256_bytes(data)
        (out / SHARD_DIR / f"{digest}.npz").write_bytes(data)
        shards.append({**entry, "file": f"{SHARD_DIR}/{digest}.npz", "sha256": digest, "bytes": len(data)})
    for part in ("neighbours", "index"):
        if manifest.get(part):
            shutil.copy2(gallery / manifest[part]["file"], out / manifest[part]["file"])
    (out / MANIFEST).write_text(json.dumps({**manifest, "shards": shards,
                                            "thumbnails": {**manifest["thumbnails"], "items": 0}}))
    return out


def build_archives(release: ReleaseSettings, serve: ServeSettings) -> tuple[Path, int]:
    """The demo archive as the archive stage builds it, and the bytes its thumbnails add (built once without)."""
    gallery = REPO / "models/gallery"
    bare = gallery_without_thumbnails(gallery, OUT / "gallery-without-thumbnails")
    metrics = REPO / "reports/eval/metrics.json"
    args = (REPO / "models/sem_pcyc.pt",)
    with_thumbs = archive.build_archive(*args, gallery, OUT / "with" / "sem_pcyc.mar", release, serve, metrics)
    without = archive.build_archive(*args, bare, OUT / "without" / "sem_pcyc.mar", release, serve, metrics)
    added = with_thumbs.stat().st_size - without.stat().st_size
    manifest = read_manifest(gallery)
    thumbs = [t for e in manifest["shards"]
              for t in unpack_shard((gallery / e["file"]).read_bytes(), e["file"])["thumbs"].values()]
    count, size = len(thumbs), sum(map(len, thumbs))
    print(f"thumbnails: {count} x {manifest['thumbnails']['size']} px WebP, "
          f"{size:,} bytes ({size / max(count, 1):.0f} a thumbnail); the .mar grows by {added:,} bytes "
          f"({without.stat().st_size / 1e6:.2f} -> {with_thumbs.stat().st_size / 1e6:.2f} MB, "
          f"+{100 * added / without.stat().st_size:.1f} %)")
    return with_thumbs, added


def start_ui(mar: Path, inference_url: str) -> tuple[subprocess.Popen, str]:
    """`sempcyc ui` against the private TorchServe, in its own process: (process, page URL)."""
    log = OUT / "ui.out"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "sempcyc.cli", "ui", "--inference-url", inference_url,
                                 "--mar", str(mar)], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    deadline = time.monotonic() + 60
    while "Open the sketch page:" not in log.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"sempcyc ui did not start:\n{log.read_text()}")
        time.sleep(0.1)
    return proc, log.read_text().split("Open the sketch page: ")[1].split()[0]


def first_paint(browser, url: str, runs: int = 5) -> dict:
    """Cold tabs (a new context each: no cache): paint timings and the page's own bytes."""
    paints, fcps, weights = [], [], []
    for _ in range(runs):
        context = browser.new_context(viewport={"width": 1100, "height": 720})
        page = context.new_page()
        page.goto(url)
        page.wait_for_selector("body[data-ready=true]")
        timing = page.evaluate("""() => ({
            paint: Object.fromEntries(performance.getEntriesByType('paint').map((e) => [e.name, e.startTime])),
            bytes: [...performance.getEntriesByType('navigation'), ...performance.getEntriesByType('resource')]
              .filter((e) => !/\\/(api|thumbs)\\//.test(e.name)).reduce((n, e) => n + e.decodedBodySize, 0)})""")
        paints.append(timing["paint"].get("first-paint", float("nan")))
        fcps.append(timing["paint"].get("first-contentful-paint", float("nan")))
        weights.append(timing["bytes"])
        context.close()
    return {"first_paint_ms": float(np.median(paints)), "fcp_ms": float(np.median(fcps)), "bytes": weights[-1]}


def sketch_runs(path: Path, side: int = 128) -> list[tuple[int, int, int]]:
    """A demo sketch as horizontal runs of dark pixels (row, first, last) on a side x side grid: strokes to replay."""
    dark = np.asarray(Image.open(path).convert("L").resize((side, side))) < 128
    runs = []
    for y, row in enumerate(dark):
        edges = np.flatnonzero(np.diff(np.concatenate([[0], row.astype(np.int8), [0]])))
        runs += [(y, int(a), int(b) - 1) for a, b in zip(edges[::2], edges[1::2])]
    return runs


class Tab:
    def __init__(self, browser, url: str):
        self.context = browser.new_context(viewport={"width": 1100, "height": 720})
        self.page = self.context.new_page()
        self.requests = []
        self.page.on("request", lambda r: self.requests.append(r) if "/api/search/" in r.url else None)
        self.page.goto(url)
        self.page.wait_for_selector("body[data-ready=true]")
        self.page.locator("#width").evaluate("(el) => { el.value = 4; }")
        self.box = self.page.locator("#canvas").bounding_box()

    def line(self, y: float, x0: float, x1: float, side: int = 128) -> None:
        scale = self.box["width"] / side
        top = self.box["y"] + (y + 0.5) * scale
        self.page.mouse.move(self.box["x"] + (x0 + 0.5) * scale, top)
        self.page.mouse.down()
        self.page.mouse.move(self.box["x"] + (x1 + 0.5) * scale, top, steps=2)
        self.page.mouse.up()

    def searches(self) -> int:
        return self.page.evaluate("window.semPcyc.timings.length")

    def wait_for(self, n: int) -> None:
        self.page.wait_for_function("n => window.semPcyc.timings.length >= n", arg=n, timeout=60_000)


def draw_class(tab: Tab, sketches: list[Path]) -> str:
    """Draw demo sketches until one's own class comes first (for the screenshot); the class drawn last."""
    for path in sketches:
        tab.page.click("#clear")
        for y, x0, x1 in sketch_runs(path):
            tab.line(y, x0, x1)
        tab.page.wait_for_function("() => window.semPcyc.timings.length > 0 && "
                                   "document.querySelectorAll('#col-a li').length > 0")
        tab.page.wait_for_timeout(300)
        top = tab.page.eval_on_selector_all("#col-a li", "els => els.slice(0, 3).map((e) => e.dataset.class)")
        if top and top[0] == path.parent.name:
            break
    return path.parent.name


def pen_up_to_painted(tab: Tab, strokes: int) -> tuple[list[float], list[float]]:
    """One short extra stroke at a time, each waited for: (pen-up -> painted ms, in-page HTTP ms) per stroke."""
    done = tab.searches()
    start = done
    for i in range(strokes):
        y = 4 + (i % 8)
        tab.line(y, 100 + i % 20, 104 + i % 20)
        done += 1
        tab.wait_for(done)
        tab.page.wait_for_timeout(100)  # the browser idle again, as between a person's strokes
    timings = tab.page.evaluate("window.semPcyc.timings")[start:]
    return [t["total"] for t in timings], [t["http"] for t in timings]


def raw_round_trip(url: str, body: bytes, n: int) -> list[float]:
    """POST `body` n times over one kept-alive connection (as the browser does): ms each."""
    parts = url.split("/", 3)
    conn = http.client.HTTPConnection(parts[2], timeout=60)
    times = []
    for _ in range(n + 2):
        t0 = time.perf_counter()
        conn.request("POST", "/" + parts[3], body=body, headers={"Content-Type": "image/png"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200, resp.status
        times.append((time.perf_counter() - t0) * 1000)
    conn.close()
    return times[2:]  # the first two warm the connection and the worker


def screenshot(tab: Tab, path: Path) -> None:
    """A small PNG of the page as it is (colours quantised: the file stays well under 150 KB)."""
    raw = tab.page.screenshot(clip={"x": 0, "y": 0, "width": 1100, "height": 640})
    image = Image.open(io.BytesIO(raw)).convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, optimize=True)
    print(f"screenshot: {path} ({path.stat().st_size / 1000:.0f} KB)")


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def measure(browser, url: str, inference_url: str, model: str, version: str, args) -> None:
    cold = first_paint(browser, url)
    print(f"page weight before thumbnails (HTML + JS + CSS): {cold['bytes']:,} bytes (goal <= 100 KB); first "
          f"paint {cold['first_paint_ms']:.0f} ms, first contentful paint {cold['fcp_ms']:.0f} ms (median of 5 "
          "cold tabs; goal <= 1 s)")
    tab = Tab(browser, url)
    splits = json.loads((REPO / "data/prepared/splits.json").read_text())["test"]
    drawn = draw_class(tab, [sorted((REPO / "data/dataset/sketches" / c).iterdir())[0] for c in splits[:6]])
    top = tab.page.eval_on_selector_all("#col-a li", "els => els.slice(0, 5).map((e) => e.dataset.class)")
    print(f"drawn: a '{drawn}' sketch of the unseen classes; the page's top 5: {top}")
    if args.screenshot:
        screenshot(tab, args.screenshot)
    totals, https = pen_up_to_painted(tab, args.strokes)
    body = tab.requests[-1].post_data_buffer
    direct = raw_round_trip(f"{inference_url}/predictions/{model}/{version}", body, args.strokes)
    proxied = raw_round_trip(f"{url}api/search/{version}", body, args.strokes)
    debounce = tab.page.evaluate("fetch('/api/meta').then((r) => r.json()).then((m) => m.debounce_ms)")
    print(f"pen-up -> results painted in the browser ({len(totals)} strokes, {len(body):,}-byte PNGs): p50 "
          f"{pct(totals, 50):.0f} ms, p95 {pct(totals, 95):.0f} ms (goal p50 <= 150 ms); of it: the debounce "
          f"{debounce} ms, the page's fetch p50 {pct(https, 50):.0f} ms")
    print(f"raw HTTP round trip of the same PNG (Python, kept-alive): TorchServe p50 {pct(direct, 50):.1f} ms, "
          f"p95 {pct(direct, 95):.1f}; through the page server p50 {pct(proxied, 50):.1f} ms, "
          f"p95 {pct(proxied, 95):.1f}")
    tab.context.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strokes", type=int, default=30, help="strokes timed (default: %(default)s)")
    parser.add_argument("--screenshot", type=Path, help="save a small PNG of the page with results here")
    args = parser.parse_args()
    missing = [p for p in NEEDED if not (REPO / p).exists()]
    if missing:
        raise SystemExit(f"bench/page.py: missing {', '.join(missing)}; run `make repro` (or `dvc repro gallery`) "
                         "first, or copy a finished demo run's data/ and models/ here")
    release, serve = params_mod.read(REPO / "params.yaml", ReleaseSettings, ServeSettings)
    OUT.mkdir(parents=True, exist_ok=True)
    mar, _ = build_archives(release, serve)
    store = OUT / "with"
    models = models_config(release.model_name, release.version, mar.name, serve.batch_size,
                           serve.max_batch_delay_ms)
    shutil.rmtree(OUT / "ts", ignore_errors=True)
    with TorchServe(store, models, workdir=OUT / "ts") as ts:
        ts.wait_ready(release.model_name, serve.ready_timeout_s)
        ui, url = start_ui(mar, ts.inference_url)
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
                measure(browser, url, ts.inference_url, release.model_name, release.version, args)
                browser.close()
        finally:
            os.killpg(ui.pid, signal.SIGTERM)
            ui.wait(timeout=20)


if __name__ == "__main__":
    main()
