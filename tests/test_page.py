"""The sketch page (src/sempcyc/static/ + page.py) in a real headless Chromium, against a real TorchServe.

Playwright drives Debian's /usr/bin/chromium (or $SEM_PCYC_CHROMIUM; nothing is downloaded). TorchServe serves two
versions of the session's tiny model (conftest.py), with token auth on: 1.0.0 over the whole gallery and 2.0.0 over a
gallery without four classes, so the two answer differently. The page server runs in this process (its counter
tells whether a query reached TorchServe). The tests replay pointer events on the canvas (Playwright's mouse sends
pointerdown/move/up) and compare what the page shows with the offline SketchSearch's answer for the very bytes the
page sent. Every state is saved as a screenshot, to $SEM_PCYC_PAGE_SCREENSHOTS if set, else the test's temp folder.

The page server's own checks, archive reading and `sempcyc ui` are tested without a browser first.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import time
import zipfile
from pathlib import Path

import pytest
from PIL import Image
from playwright.sync_api import Error as PlaywrightError

from helpers import (
    CLASSES,
    PER_CLASS,
    VENV_BIN,
    build_tiny_archive,
    call,
    merged,
    one_line_error,
    png_bytes,
    sketch_box,
)
from helpers import PARAMS as STAGE_PARAMS
from page_helpers import (
    CANVAS,
    Built,
    SketchPage,
    gallery_without,
    get,
    headless_chromium,
    image_bytes,
    pick_drawable,
    post,
    ranked,
    sketch_seed,
)
from sempcyc import serving, torchserve
from sempcyc.blobstore import write_slim_archive
from sempcyc.errors import UserError
from sempcyc.page import (
    MAX_BODY_BYTES,
    STATIC_DIR,
    PageConfig,
    PageServer,
    PageSettings,
    Refused,
    check_query,
    read_archive,
)
from sempcyc.runtime.search import SketchSearch

MODEL_NAME, V1, V2 = "sem_pcyc", "1.0.0", "2.0.0"
TOP_K = 8
MAX_PIXELS = 100_000         # above the page's 256 x 256 canvas; a 400 x 400 image is over it
DROPPED = CLASSES[-4:]       # version 2.0.0's gallery lacks these classes
TOKEN_ENV = "SEM_PCYC_TS_INFERENCE_TOKEN"
METRICS = (("zero_shot", 0.5, 0.4), ("generalised", 0.3, 0.2))

PARAMS = merged(STAGE_PARAMS, {
    "release": {"model_name": MODEL_NAME, "version": V1},
    "serve": {"top_k": TOP_K, "max_pixels": MAX_PIXELS, "threads": 1, "batch_size": 1, "max_batch_delay_ms": 0},
})

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def built(tiny_model: Path, tmp_path_factory) -> Built:
    """The session's tiny model (conftest.py: the same model and gallery as build_tiny_model(root, PARAMS) makes,
    whose release and serve sections the stages up to the gallery do not read), archived as two versions."""
    root = tmp_path_factory.mktemp("page")
    model, gallery = tiny_model / "models/sem_pcyc.pt", tiny_model / "models/gallery"
    gallery2 = gallery_without(gallery, root / "models/gallery-2", DROPPED)
    metrics = root / "metrics.json"  # evaluate's report, as the archive stage reads it (1.0.0 carries it)
    metrics.write_text(json.dumps({s: {"sem_pcyc": {"map_all": m, "p_at_10": p}} for s, m, p in METRICS}))
    mars = {V1: build_tiny_archive(model, gallery, root / f"store/{MODEL_NAME}-{V1}.mar", PARAMS, metrics),
            V2: build_tiny_archive(model, gallery2, root / f"store/{MODEL_NAME}-{V2}.mar",
                                   merged(PARAMS, {"release": {"version": V2}}))}
    offline = {V1: SketchSearch.load(model, gallery, top_k=TOP_K, max_pixels=MAX_PIXELS),
               V2: SketchSearch.load(model, gallery2, top_k=TOP_K, max_pixels=MAX_PIXELS)}
    return Built(root, mars, offline, pick_drawable(offline[V1]))


@pytest.fixture(scope="module")
def ts(built: Built, tmp_path_factory):
    """TorchServe with both versions (1.0.0 the default) and token authorisation on."""
    models = serving.models_config(MODEL_NAME, V1, built.mars[V1].name, 1, 0)
    models[MODEL_NAME].update(serving.models_config(MODEL_NAME, V2, built.mars[V2].name, 1, 0)[MODEL_NAME])
    models[MODEL_NAME][V2]["defaultVersion"] = False
    with torchserve.TorchServe(built.root / "store", models, workdir=tmp_path_factory.mktemp("ts"),
                               token_auth=True) as server:
        for version in (V1, V2):
            server.wait_ready(MODEL_NAME, 120, version=version)
        yield server


@pytest.fixture(scope="module")
def page_server(built: Built, ts):
    config = PageConfig(ts.inference_url, (read_archive(built.mars[V1]), read_archive(built.mars[V2])),
                        PageSettings(None, 50), ts.keys()["inference"], TOKEN_ENV)
    with PageServer(config) as server:
        yield server


@pytest.fixture(scope="module")
def browser():
    with headless_chromium() as chromium:
        yield chromium


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("SEM_PCYC_PAGE_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def tab(browser, page_server, shots):
    opened = SketchPage(browser, page_server.url, shots)
    yield opened
    opened.close()


# ------------------------------------------------------------------------------ the page server, no browser

@pytest.mark.parametrize("body, status, words", [
    (b"", 400, "empty"),
    (b"hello, not an image", 415, "not a PNG or JPEG"),
    (image_bytes((40, 40), "GIF"), 415, "not a PNG or JPEG"),
    (b"\x89PNG\r\n\x1a\n" + b"broken" * 20, 400, "not a readable"),
    (image_bytes((400, 400), "PNG"), 413, "400x400 = 160,000 pixels"),
    (image_bytes((500, 300), "JPEG"), 413, "500x300"),
    (b"\x89PNG\r\n\x1a\n" + bytes(MAX_BODY_BYTES), 413, "bytes, over the"),
], ids=["empty", "text", "gif", "broken-png", "too-many-pixels-png", "too-many-pixels-jpeg", "too-many-bytes"])
def test_check_query_refuses(body: bytes, status: int, words: str):
    with pytest.raises(Refused) as refused:
        check_query(body, MAX_PIXELS)
    assert refused.value.status == status and words in refused.value.message, refused.value.message


def test_check_query_accepts_png_and_jpeg():
    assert check_query(image_bytes((256, 256), "PNG"), MAX_PIXELS) == "image/png"
    assert check_query(image_bytes((300, 300), "JPEG"), MAX_PIXELS) == "image/jpeg"


def test_page_weight_is_under_100_kb():
    total = sum(p.stat().st_size for p in STATIC_DIR.iterdir())
    assert {p.name for p in STATIC_DIR.iterdir()} == {"index.html", "page.js", "page.css"}
    assert total <= 100_000, total


def test_read_archive(built: Built, tmp_path: Path):
    archive = read_archive(built.mars[V2])
    assert (archive.model_name, archive.version) == (MODEL_NAME, V2)
    assert archive.serving["top_k"] == TOP_K and archive.serving["max_pixels"] == MAX_PIXELS
    assert len(archive.thumbs) == (len(CLASSES) - len(DROPPED)) * PER_CLASS
    assert Image.open(io.BytesIO(next(iter(archive.thumbs.values())))).format == "WEBP"
    with pytest.raises(UserError, match="not found; build it with `dvc repro archive` or fetch a release"):
        read_archive(tmp_path / "nope.mar")
    (tmp_path / "bad.mar").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="not a sem-pcyc archive"):
        read_archive(tmp_path / "bad.mar")
    # a deployed slim archive (its shards are in a host's blob store): the page works, without thumbnails
    slim = read_archive(write_slim_archive(built.mars[V2], "/srv/blobs", tmp_path / "slim.mar"))
    assert slim.version == V2 and slim.thumbs == {}
    # a damaged shard is refused, naming it
    with zipfile.ZipFile(built.mars[V2]) as src, zipfile.ZipFile(tmp_path / "damaged.mar", "w") as dst:
        shard = next(n for n in src.namelist() if n.startswith("gallery/shards/"))
        for item in src.infolist():
            dst.writestr(item, src.read(item.filename)[:-1] + b"x" if item.filename == shard else
                         src.read(item.filename))
    with pytest.raises(UserError, match=f"{shard}.*damaged"):
        read_archive(tmp_path / "damaged.mar")


def test_thumbnails_metadata_and_host_check(built: Built):
    """Without TorchServe: thumbnails (own version, another version's, the base-URL redirect), metadata, and
    requests for another host name refused."""
    archives = (read_archive(built.mars[V2]), read_archive(built.mars[V1]))
    config = PageConfig("http://127.0.0.1:9", archives, PageSettings("http://images.example/gallery", 50),
                        "secret-token", TOKEN_ENV)
    dropped_id = f"{DROPPED[0]}/000.png"
    with PageServer(config) as server:
        status, body, headers = get(f"{server.url}thumbs/{V2}/{CLASSES[0]}%2F001.png")
        assert status == 200 and headers["Content-Type"] == "image/webp"
        assert body == archives[0].thumbs[f"{CLASSES[0]}/001.png"]
        status, body, _ = get(f"{server.url}thumbs/{V2}/{DROPPED[0]}%2F000.png")  # only 1.0.0's archive has it
        assert status == 200 and body == archives[1].thumbs[dropped_id]
        status, _, headers = get(f"{server.url}thumbs/{V2}/new%20class%2Fa%20b.png")
        assert status == 302 and headers["Location"] == "http://images.example/gallery/new%20class/a%20b.png"
        status, meta, _ = get(f"{server.url}api/meta")
        meta = json.loads(meta)
        assert meta["default_version"] == V2 and [v["version"] for v in meta["versions"]] == [V2, V1]
        assert meta["max_pixels"] == MAX_PIXELS and meta["debounce_ms"] == 50
        assert "secret-token" not in json.dumps(meta)
        status, body, _ = get(f"{server.url}api/meta", {"Host": f"evil.example:{server.httpd.server_address[1]}"})
        assert status == 403 and b"evil.example" in body
    config = PageConfig("http://127.0.0.1:9", archives, PageSettings(None, 50), None, TOKEN_ENV)
    with PageServer(config) as server:
        assert get(f"{server.url}thumbs/{V2}/new%20class%2Fa.png")[0] == 404


def test_ui_refuses_what_it_cannot_use(tmp_path: Path, built: Built):
    (tmp_path / "params.yaml").write_text(json.dumps(PARAMS))
    rc, _, err = call(tmp_path, "ui", "--inference-url", "http://127.0.0.1:8080", "--mar", "missing.mar")
    line = one_line_error(rc, err, "ui")
    assert "missing.mar: not found" in line and "dvc artifacts get" in line
    rc, _, err = call(tmp_path, "ui", "--inference-url", "127.0.0.1:8080", "--mar", built.mars[V1])
    assert "expected http://host:port" in one_line_error(rc, err, "ui")


# ------------------------------------------------------------------------- the page server and TorchServe

@pytest.mark.integration
def test_page_server_checks_before_forwarding(built: Built, page_server, ts):
    """What the page checks, the page server checks again: refused queries never reach TorchServe."""
    before = page_server.forwarded
    for body in (b"", b"text", image_bytes((400, 400), "PNG"), image_bytes((40, 40), "GIF")):
        status, answer = post(f"{page_server.url}api/search/{V1}", body, {"Content-Type": "image/png"})
        assert 400 <= status < 500 and answer["error"], (status, answer)
    status, answer = post(f"{page_server.url}api/search/..%2Fx", png_bytes(1, mode="L"))
    assert status == 400 and "not a version" in answer["error"]
    assert page_server.forwarded == before
    status, answer = post(f"{page_server.url}api/search/9.9.9", png_bytes(1, mode="L"))
    assert status == 404 and "version 9.9.9 of sem_pcyc is not registered" in answer["error"], answer
    body = png_bytes(2, mode="L")
    status, answer = post(f"{page_server.url}api/search/{V2}", body)  # the token travels only from here
    assert status == 200 and ranked(answer) == ranked(built.offline[V2].search([body])[0])
    status, answer = post(f"{ts.inference_url}/predictions/{MODEL_NAME}/{V2}", body)
    assert status in (400, 401), "TorchServe must want the token the page server adds"


# ------------------------------------------------------------------------------------------------ browser

@pytest.mark.integration
def test_draw_a_class_sketch_finds_that_class(tab: SketchPage, built: Built, ts):
    cls, box = built.drawable
    tab.shot("01-empty")
    tab.ellipse(box)
    tab.wait_searches(1)
    assert len(tab.searches) == 1
    sent = tab.searches[0].post_data_buffer
    assert Image.open(io.BytesIO(sent)).size == (CANVAS, CANVAS)
    assert tab.grid() == ranked(built.offline[V1].search([sent])[0])
    assert tab.grid()[0][1] == cls, (cls, tab.grid())
    assert tab.page.locator("#col-a .grid img").count() == TOP_K  # every thumbnail came from the archive
    tab.page.wait_for_function("() => [...document.querySelectorAll('#col-a img')].every(i => i.complete "
                               "&& i.naturalWidth === 64)")
    metrics = tab.page.inner_text("#col-a .metrics")
    assert "zero-shot mAP@all 0.5, P@10 0.4 · generalised mAP@all 0.3, P@10 0.2 · top 8" in metrics, metrics
    assert tab.page.inner_text("#col-a h2") == f"{MODEL_NAME} v{V1}"
    assert f"{MODEL_NAME}, versions {V1}, {V2}, served by TorchServe at {ts.inference_url}" in \
        tab.page.inner_text("#model")
    tab.shot("02-drawn-results")


@pytest.mark.integration
def test_touch_and_pen_strokes(tab: SketchPage, built: Built):
    """A finger and a pen, as the browser reports them (DevTools input events: pointerType touch and pen)."""
    cdp = tab.context.new_cdp_session(tab.page)
    box = tab.page.locator("#canvas").bounding_box()
    at = [(box["x"] + box["width"] * f, box["y"] + box["height"] * f) for f in (0.2, 0.35, 0.5, 0.65, 0.8)]
    cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [{"x": at[0][0], "y": at[0][1]}]})
    for x, y in at[1:]:
        cdp.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [{"x": x, "y": y}]})
    cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})
    tab.wait_searches(1)
    ink = tab.ink()
    assert ink > 0
    for kind, (x, y) in [("mousePressed", at[4])] + [("mouseMoved", (x, at[0][1])) for x, _ in at[3::-1]] \
            + [("mouseReleased", (at[0][0], at[0][1]))]:
        cdp.send("Input.dispatchMouseEvent", {"type": kind, "x": x, "y": y, "button": "left", "pointerType": "pen",
                                              "buttons": 0 if kind == "mouseReleased" else 1, "clickCount": 1})
    tab.wait_searches(2)
    assert tab.ink() > ink
    sent = tab.searches[-1].post_data_buffer
    assert tab.grid() == ranked(built.offline[V1].search([sent])[0])
    assert tab.page.evaluate("window.semPcyc.sent") == 2


@pytest.mark.integration
def test_undo_and_clear(tab: SketchPage, built: Built):
    first, second = sketch_box(sketch_seed(CLASSES[0], 0)), sketch_box(sketch_seed(CLASSES[5], 1))
    tab.ellipse(first)
    tab.wait_searches(1)
    ink_first = tab.ink()
    tab.ellipse(second)
    tab.wait_searches(2)
    assert tab.ink() > ink_first
    tab.page.click("#undo")
    tab.wait_searches(3)
    assert abs(tab.ink() - ink_first) <= 0.03 * ink_first  # the first stroke alone again
    sent = tab.searches[-1].post_data_buffer
    assert tab.grid() == ranked(built.offline[V1].search([sent])[0])
    tab.shot("03-undo")
    tab.page.click("#clear")
    tab.page.wait_for_timeout(300)
    assert tab.ink() == 0 and tab.grid() == [] and len(tab.searches) == 3
    tab.shot("04-cleared")


@pytest.mark.integration
def test_nothing_is_sent_for_an_empty_canvas(tab: SketchPage):
    tab.page.click("#undo")
    tab.page.click("#clear")
    tab.page.keyboard.press("Control+z")
    tab.page.check("#compare")
    tab.page.fill("#ver-a", V2)
    tab.page.dispatch_event("#ver-a", "change")
    tab.stroke([(30, 30), (120, 140)])
    tab.wait_searches(1)
    tab.page.evaluate("document.activeElement.blur()")  # Ctrl+Z in a text field is the field's own undo
    tab.page.keyboard.press("Control+z")  # back to empty: no search, the results go
    tab.page.wait_for_timeout(300)
    assert len(tab.searches) == 2 and tab.grid() == [] and tab.ink() == 0  # the stroke, in both versions
    assert tab.page.evaluate("window.semPcyc.sent") == 1


@pytest.mark.integration
def test_dropped_and_chosen_files(tab: SketchPage, built: Built):
    tab.stroke([(40, 200), (200, 200)])
    tab.wait_searches(1)
    ink = tab.ink()
    cls = CLASSES[3]
    sketch = png_bytes(sketch_seed(cls, 2), mode="L")
    tab.drop(sketch, f"{cls}.png", "image/png")
    tab.wait_searches(2)
    assert tab.searches[-1].post_data_buffer == sketch  # the file itself, as it is
    assert tab.grid() == ranked(built.offline[V1].search([sketch])[0])
    assert tab.page.locator("#dropped").is_visible() and tab.ink() == ink  # the drawing stays
    tab.shot("05-dropped-file")
    jpeg = image_bytes((120, 90), "JPEG")
    tab.choose(jpeg, "photo.jpg", "image/jpeg")
    tab.wait_searches(3)
    assert tab.searches[-1].post_data_buffer == jpeg
    assert tab.grid() == ranked(built.offline[V1].search([jpeg])[0])


@pytest.mark.integration
@pytest.mark.parametrize("data, name, mime, words", [
    (b"just some notes", "notes.txt", "text/plain", "notes.txt is not a PNG or JPEG image"),
    (image_bytes((40, 40), "GIF"), "anim.gif", "image/gif", "anim.gif is not a PNG or JPEG image"),
    (image_bytes((400, 400), "PNG"), "big.png", "image/png", "big.png is 400×400 = 160,000 pixels, over"),
    (image_bytes((500, 300), "JPEG"), "wide.jpg", "image/jpeg", "wide.jpg is 500×300 = 150,000 pixels"),
    (b"", "empty.png", "image/png", "empty.png is empty"),
    (b"\x89PNG\r\n\x1a\n" + bytes(MAX_BODY_BYTES), "huge.png", "image/png",
     "huge.png is 6,553,508 bytes, over the 6,553,500-byte limit"),
], ids=["text", "gif", "pixels-png", "pixels-jpeg", "empty", "bytes"])
def test_bad_files_get_a_message_and_are_never_sent(tab: SketchPage, page_server, data, name, mime, words):
    tab.stroke([(40, 60), (200, 60)])
    tab.wait_searches(1)
    ink, grid, forwarded = tab.ink(), tab.grid(), page_server.forwarded
    (tab.drop if mime != "image/jpeg" else tab.choose)(data, name, mime)
    tab.page.wait_for_function("() => !document.getElementById('error').hidden")
    assert words in tab.error() and "It was not sent." in tab.error(), tab.error()
    tab.page.wait_for_timeout(200)
    assert len(tab.searches) == 1 and page_server.forwarded == forwarded
    assert tab.ink() == ink and tab.grid() == grid  # the drawing and its results stay
    tab.shot(f"06-refused-{name.replace('.', '-')}")


@pytest.mark.integration
def test_compare_two_versions(tab: SketchPage, built: Built):
    tab.ellipse(built.drawable[1])
    tab.wait_searches(1)
    tab.page.check("#compare")
    tab.wait_searches(2)
    [to_v1, to_v2] = sorted(tab.searches[1:], key=lambda r: r.url)
    assert to_v1.url.endswith(f"/api/search/{V1}") and to_v2.url.endswith(f"/api/search/{V2}")
    assert to_v1.post_data_buffer == to_v2.post_data_buffer  # the same sketch to both
    sent = to_v1.post_data_buffer
    want = {V1: built.offline[V1].search([sent])[0], V2: built.offline[V2].search([sent])[0]}
    assert tab.page.locator("#col-b").is_visible()
    assert tab.grid("a") == ranked(want[V1]) and tab.grid("b") == ranked(want[V2])
    assert not {c for _, c in tab.grid("b")} & set(DROPPED)
    common = {i["class"] for i in want[V1]} & {i["class"] for i in want[V2]}
    assert tab.agreeing("a") == tab.agreeing("b") == common
    assert f"agree on {len(common)} class" in tab.page.inner_text("#agree")
    tab.shot("07-compare")


@pytest.mark.integration
def test_unknown_version_is_a_readable_error_and_the_drawing_stays(tab: SketchPage):
    tab.ellipse(sketch_box(sketch_seed(CLASSES[1], 0)))
    tab.wait_searches(1)
    ink = tab.ink()
    tab.page.fill("#ver-a", "9.9.9")
    tab.page.dispatch_event("#ver-a", "change")
    tab.wait_searches(2)
    assert "version 9.9.9 of sem_pcyc is not registered on TorchServe" in tab.error(), tab.error()
    assert tab.ink() == ink and tab.grid() == []
    tab.shot("08-unknown-version")


@pytest.mark.integration
def test_a_4xx_from_the_handler_is_shown_and_the_drawing_stays(tab: SketchPage, page_server):
    """A truncated PNG: its header passes the page's and the page server's checks, the handler refuses it."""
    tab.stroke([(40, 120), (200, 120)])
    tab.wait_searches(1)
    ink, forwarded = tab.ink(), page_server.forwarded
    tab.drop(png_bytes(5, mode="L")[:60], "cut.png", "image/png")
    tab.wait_searches(2)
    assert page_server.forwarded == forwarded + 1  # this one did reach TorchServe
    assert "not a readable PNG or JPEG image" in tab.error(), tab.error()
    assert tab.ink() == ink and tab.grid() == []
    tab.shot("08-handler-400")


@pytest.mark.integration
def test_a_stale_answer_never_replaces_a_newer_one(tab: SketchPage, built: Built):
    held = []

    def hold_the_first(route):
        if not held:
            held.append(route)  # answered only after the second search has painted
        else:
            route.continue_()

    tab.page.route("**/api/search/**", hold_the_first)
    tab.stroke([(30, 30), (220, 220)])
    tab.page.wait_for_function("() => window.semPcyc.sent === 1")
    tab.stroke([(220, 30), (30, 220)])
    tab.wait_searches(1)
    newer = ranked(built.offline[V1].search([tab.searches[-1].post_data_buffer])[0])
    assert tab.grid() == newer
    with contextlib.suppress(PlaywrightError):  # the page aborted it when the newer search started
        held[0].continue_()
    tab.page.wait_for_timeout(500)
    assert tab.grid() == newer and tab.page.evaluate("window.semPcyc.timings.length") == 1


@pytest.mark.integration
def test_token_stays_in_the_page_server(tab: SketchPage, ts, page_server):
    token = ts.keys()["inference"]
    assert token
    responses = []
    tab.page.on("response", lambda r: responses.append(r))
    tab.page.reload()
    tab.page.wait_for_selector("body[data-ready=true]")
    tab.stroke([(60, 60), (190, 190)])
    tab.wait_searches(1)
    tab.page.wait_for_function("() => [...document.querySelectorAll('#col-a img')].every(i => i.complete)")
    urls = [r.url for r in responses]
    assert urls and all(u.startswith(page_server.url) for u in urls), urls  # same origin, nothing else fetched
    assert {"/", "/page.js", "/page.css", "/api/meta"} <= {u[len(page_server.url) - 1:] for u in urls}
    assert not any(token.encode() in r.body() for r in responses)
    assert token not in tab.page.content()


@pytest.mark.integration
def test_sempcyc_ui(browser, built: Built, ts, tmp_path: Path, shots: Path):
    """`sempcyc ui` against the running TorchServe, token from the environment; stopped, the page says so."""
    (tmp_path / "params.yaml").write_text(json.dumps(PARAMS))
    env = dict(os.environ, **{TOKEN_ENV: ts.keys()["inference"]}, OMP_NUM_THREADS="1")
    out = tmp_path / "ui.out"
    with open(out, "wb") as log:
        proc = subprocess.Popen([str(VENV_BIN / "sempcyc"), "ui", "--inference-url", ts.inference_url, "--mar",
                                 str(built.mars[V2]), "--mar", str(built.mars[V1])], cwd=tmp_path, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while "Open the sketch page:" not in out.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, out.read_text()
            time.sleep(0.1)
        text = out.read_text()
        assert f"with the token from ${TOKEN_ENV}" in text and ts.keys()["inference"] not in text
        tab = SketchPage(browser, text.split("Open the sketch page: ")[1].split()[0], shots)
        assert tab.page.input_value("#ver-a") == V2  # the first --mar is the default
        tab.ellipse(built.drawable[1])
        tab.wait_searches(1)
        assert tab.grid() == ranked(built.offline[V2].search([tab.searches[0].post_data_buffer])[0])
        ink = tab.ink()
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=20) == 0 and "ui: stopped" in out.read_text()
        tab.stroke([(20, 240), (240, 240)])
        tab.wait_searches(2)
        assert "page server" in tab.error() and "not answering" in tab.error(), tab.error()
        assert tab.ink() > ink
        tab.shot("09-page-server-stopped")
        tab.close()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.mark.integration
def test_torchserve_stopped_is_a_readable_error_and_the_drawing_stays(tab: SketchPage, ts):
    """Last: it stops the module's TorchServe."""
    tab.ellipse(sketch_box(sketch_seed(CLASSES[2], 0)))
    tab.wait_searches(1)
    ink = tab.ink()
    ts.stop()
    tab.stroke([(20, 240), (240, 240)])
    tab.wait_searches(2)
    assert f"TorchServe at {ts.inference_url} is not answering" in tab.error(), tab.error()
    assert tab.ink() > ink and tab.grid() == []
    tab.shot("10-torchserve-stopped")
