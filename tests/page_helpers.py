"""Helpers of the sketch page tests (test_page.py): drawing like the page's canvas, HTTP without redirects, a
gallery without some classes, the class the tiny model finds first when drawn, and SketchPage, one browser tab on
the page."""
from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw
from playwright.sync_api import sync_playwright

from helpers import CLASSES, PER_CLASS, sketch_box
from sempcyc.runtime.gallery_shards import MANIFEST, SHARD_DIR, pack_shard, read_manifest, unpack_shard
from sempcyc.runtime.search import SketchSearch

CANVAS = 256                 # the canvas's bitmap (index.html)
SKETCH = 48                  # png_bytes' sketches: a 2-px ellipse outline on 48 x 48
STROKE = round(2 * CANVAS / SKETCH)
CHROMIUM = Path(os.environ.get("SEM_PCYC_CHROMIUM", "/usr/bin/chromium"))
# As root, without a GPU, on a machine whose network is closed (background networking would only be refused).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


# ------------------------------------------------------------------------------------------------- helpers

@contextlib.contextmanager
def headless_chromium():
    """Debian's Chromium (or $SEM_PCYC_CHROMIUM) under Playwright, nothing downloaded; a test fails when it is
    missing, saying what to install."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium (bash scripts/system-deps.sh test) or name "
                    "another Chromium in $SEM_PCYC_CHROMIUM")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def sketch_seed(cls: str, i: int) -> int:
    """The seed class_files() draws sketch i of `cls` with."""
    return sum(map(ord, cls)) * 100 + 50 + i


def canvas_like(box: list[int]) -> bytes:
    """What the page's canvas holds after replay_ellipse(box): the sketch's ellipse at canvas scale (PIL's
    rendering, close to Chromium's)."""
    img = Image.new("L", (CANVAS, CANVAS), 255)
    scale = CANVAS / SKETCH
    ImageDraw.Draw(img).ellipse([round(v * scale) for v in box], outline=0, width=STROKE)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def image_bytes(size: tuple[int, int], fmt: str) -> bytes:
    img = Image.new("RGB", size, (255, 255, 255))
    ImageDraw.Draw(img).ellipse([5, 5, size[0] - 5, size[1] - 5], outline=(0, 0, 0), width=3)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict | list]:
    request = urllib.request.Request(url, data=body, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def get(url: str, headers: dict | None = None) -> tuple[int, bytes, dict]:
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args):
            return None
    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(urllib.request.Request(url, headers=headers or {}), timeout=30) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def ranked(answer: list[dict]) -> list[tuple[str, str]]:
    return [(item["image"], item["class"]) for item in answer]


# ---------------------------------------------------------------------------- what the fixtures build with

@dataclass
class Built:
    root: Path
    mars: dict[str, Path]
    offline: dict[str, SketchSearch]
    drawable: tuple[str, list[int]]   # a class whose sketch, drawn on the canvas, the tiny model finds first


def gallery_without(gallery: Path, out: Path, dropped: list[str]) -> Path:
    """A copy of `gallery` without the images of `dropped` classes (thumbnails included): their shards repacked."""
    manifest = read_manifest(gallery)
    (out / SHARD_DIR).mkdir(parents=True)
    shards = []
    for entry in manifest["shards"]:
        shard = unpack_shard((gallery / entry["file"]).read_bytes(), entry["file"])
        keep = [i for i, c in enumerate(shard["classes"]) if c not in dropped]
        if not keep:
            continue
        ids = [shard["ids"][i] for i in keep]
        data = pack_shard(shard["embeddings"][keep], ids, [shard["classes"][i] for i in keep],
                          [shard["thumbs"].get(i) for i in ids])
        digest = hashlib.sha256(data).hexdigest()
        (out / SHARD_DIR / f"{digest}.npz").write_bytes(data)
        shards.append({**entry, "file": f"{SHARD_DIR}/{digest}.npz", "sha256": digest, "bytes": len(data),
                       "items": len(keep)})
    items = sum(e["items"] for e in shards)
    (out / MANIFEST).write_text(json.dumps({**manifest, "shards": shards, "items": items}))
    return out


def pick_drawable(search: SketchSearch) -> tuple[str, list[int]]:
    """The (class, sketch box) whose canvas-scale drawing has its own class first offline by the widest score
    margin over the best other class: Chromium draws the ellipse a little unlike PIL, and a narrow first place
    may not survive that."""
    margins = {}
    for cls in CLASSES:
        for i in range(PER_CLASS):
            box = sketch_box(sketch_seed(cls, i))
            answer = search.search([canvas_like(box)])[0]
            if answer[0]["class"] == cls:
                other = next((r["score"] for r in answer if r["class"] != cls), 0.0)
                margins[(cls, tuple(box))] = answer[0]["score"] - other
    assert margins, "no class sketch of the tiny model is found first when drawn at canvas scale"
    cls, box = max(margins, key=margins.get)
    return cls, list(box)


class SketchPage:
    """One browser tab on the page, with the searches it sent (Playwright requests to /api/search/)."""

    def __init__(self, browser, url: str, shots: Path):
        self.context = browser.new_context(viewport={"width": 1100, "height": 720}, has_touch=True)
        self.page = self.context.new_page()
        self.shots = shots
        self.searches = []
        self.page.on("request", lambda r: self.searches.append(r) if "/api/search/" in r.url else None)
        self.page.goto(url)
        self.page.wait_for_selector("body[data-ready=true]")

    def close(self) -> None:
        self.context.close()

    def shot(self, name: str) -> None:
        self.page.screenshot(path=str(self.shots / f"{name}.png"))

    def stroke(self, points: list[tuple[float, float]], width: int = STROKE) -> None:
        """One pen-down .. pen-up on the canvas through `points` (canvas bitmap coordinates)."""
        self.page.locator("#width").evaluate("(el, w) => { el.value = w; }", width)
        box = self.page.locator("#canvas").bounding_box()
        scale = box["width"] / CANVAS
        xy = [(box["x"] + x * scale, box["y"] + y * scale) for x, y in points]
        self.page.mouse.move(*xy[0])
        self.page.mouse.down()
        for x, y in xy[1:]:
            self.page.mouse.move(x, y)
        self.page.mouse.up()

    def ellipse(self, box48: list[int]) -> None:
        """A png_bytes sketch's ellipse (its box on 48 px) replayed as one stroke at canvas scale."""
        scale = CANVAS / SKETCH
        x0, y0, x1, y1 = (v * scale for v in box48)
        inset = STROKE / 2  # PIL draws the outline inside the box
        cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2 - inset, (y1 - y0) / 2 - inset
        angles = np.linspace(0, 2 * np.pi, 49)
        self.stroke([(cx + rx * np.cos(a), cy + ry * np.sin(a)) for a in angles])

    def wait_searches(self, n: int) -> None:
        """Until n searches have been answered and painted (stale ones never are)."""
        self.page.wait_for_function("n => window.semPcyc.timings.length >= n", arg=n, timeout=30_000)

    def grid(self, column: str = "a") -> list[tuple[str, str]]:
        return [tuple(row) for row in self.page.eval_on_selector_all(
            f"#col-{column} li", "els => els.map(e => [e.dataset.image, e.dataset.class])")]

    def agreeing(self, column: str) -> set[str]:
        return set(self.page.eval_on_selector_all(f"#col-{column} li.agree", "els => els.map(e => e.dataset.class)"))

    def ink(self) -> int:
        """Dark pixels on the canvas: the drawing, as the page holds it."""
        return self.page.evaluate("""() => { const c = document.getElementById('canvas');
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i] < 128) n++; return n; }""")

    def error(self) -> str:
        el = self.page.locator("#error")
        return el.inner_text() if el.is_visible() else ""

    def drop(self, data: bytes, name: str, mime: str) -> None:
        """A file dropped on the drawing area (a real DataTransfer with a File, dispatched as the drop event)."""
        transfer = self.page.evaluate_handle(
            """([b64, name, mime]) => { const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
                const dt = new DataTransfer(); dt.items.add(new File([bytes], name, {type: mime})); return dt; }""",
            [base64.b64encode(data).decode(), name, mime])
        self.page.dispatch_event("#pad", "drop", {"dataTransfer": transfer})

    def choose(self, data: bytes, name: str, mime: str) -> None:
        self.page.set_input_files("#file", files=[{"name": name, "mimeType": mime, "buffer": data}])
