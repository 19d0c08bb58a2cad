"""The sketch page for keyboard users, on a phone, and when the user acts faster than the search (issue 27), in a
real headless Chromium (Debian's, or $SEM_PCYC_CHROMIUM) against the page server and a stand-in TorchServe
(fake_torchserve.py: its answer names the sha256 of the query, so a test knows which query the page shows).

Specification: every control is reachable by Tab and works with Enter/Space/arrows (the drawing itself needs a
pointer; a keyboard user searches with an image file); the latest user action wins (a file chosen 50 ms after the
pen lifts is what the results are for); errors appear where the results would be and the status line says which
version answered; class names wrap rather than being cut; on a phone the first result is in view after a search;
versions are chosen from TorchServe's registered list, or typed (with a note) where the page server cannot ask.
"""
from __future__ import annotations

import io
import os
import re
from pathlib import Path

import pytest
from fake_torchserve import LONG_NAME, FakeTorchServe, answer_for, fake_archive
from PIL import Image, ImageDraw

from page_helpers import headless_chromium
from sempcyc.page import PageConfig, PageServer, PageSettings

V1, V2 = "1.0.0", "2.0.0"
DEBOUNCE_MS = 50

pytestmark = pytest.mark.integration


def png(seed: int, side: int = 96) -> bytes:
    img = Image.new("L", (side, side), 255)
    ImageDraw.Draw(img).ellipse([5 + seed % 20, 8, side - 6, side - 8 - seed % 30], outline=0, width=4)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def shown(answer: list[dict]) -> list[tuple[str, str]]:
    return [(item["image"], item["class"]) for item in answer]


@pytest.fixture(scope="module")
def fake():
    with FakeTorchServe(versions=[V1, V2]) as server:
        yield server


@pytest.fixture(scope="module")
def servers(fake):
    """Two page servers on the one TorchServe: one that can list its versions, one that cannot (sempcyc ui
    without --management-url)."""
    archives = (fake_archive(V1), fake_archive(V2))
    with PageServer(PageConfig(fake.url, archives, PageSettings(None, DEBOUNCE_MS), None, None, fake.url)) as listed, \
            PageServer(PageConfig(fake.url, archives, PageSettings(None, DEBOUNCE_MS), None, None)) as typed:
        yield {"listed": listed, "typed": typed}


@pytest.fixture(scope="module")
def browser():
    with headless_chromium() as chromium:
        yield chromium


@pytest.fixture(autouse=True)
def healthy(fake):
    fake.busy = False
    yield


class Tab:
    def __init__(self, browser, url: str, **context):
        self.context = browser.new_context(**({"viewport": {"width": 1100, "height": 720}} | context))
        self.page = self.context.new_page()
        self.choosers = []  # file choosers the page opened (listening from the start: none is missed)
        self.page.on("filechooser", lambda chooser: self.choosers.append(chooser))
        self.sent = []  # (version, body) of every search the page sent
        self.page.on("request", lambda r: self.sent.append((r.url.rsplit("/", 1)[-1], r.post_data_buffer))
                     if "/api/search/" in r.url else None)
        self.page.goto(url)
        self.page.wait_for_selector("body[data-ready=true]")

    def close(self) -> None:
        self.context.close()

    def focused(self) -> str:
        return self.page.evaluate("document.activeElement.id || document.activeElement.tagName")

    def tab_to(self, target: str, limit: int = 40) -> list[str]:
        """Press Tab until the element `target` (an id, or LI) has the focus; the ids passed on the way."""
        passed = []
        for _ in range(limit):
            self.page.keyboard.press("Tab")
            passed.append(self.focused())
            if passed[-1] == target:
                return passed
        raise AssertionError(f"{target} is not reachable by Tab; the focus went {passed}")

    def stroke(self, points: list[tuple[float, float]]) -> None:
        box = self.page.locator("#canvas").bounding_box()
        xy = [(box["x"] + box["width"] * x, box["y"] + box["height"] * y) for x, y in points]
        self.page.mouse.move(*xy[0])
        self.page.mouse.down()
        for x, y in xy[1:]:
            self.page.mouse.move(x, y, steps=2)
        self.page.mouse.up()

    def wait_painted(self, n: int) -> None:
        self.page.wait_for_function("n => window.semPcyc.timings.length >= n", arg=n, timeout=30_000)

    def grid(self, column: str = "a") -> list[tuple[str, str]]:
        return [tuple(row) for row in self.page.eval_on_selector_all(
            f"#col-{column} li", "els => els.map(e => [e.dataset.image, e.dataset.class])")]

    def status(self) -> str:
        return self.page.inner_text("#status")

    def error(self) -> str:
        el = self.page.locator("#error")
        return el.inner_text() if el.is_visible() else ""


@pytest.fixture
def tab(browser, servers):
    opened = Tab(browser, servers["listed"].url)
    yield opened
    opened.close()


def test_every_control_works_by_keyboard_alone(tab: Tab):
    order = tab.tab_to("file")
    assert order[-4:] == ["width", "undo", "clear", "file"], order
    sketch = png(1)
    tab.page.keyboard.press("Space")  # the focused Image… button opens the file chooser
    tab.page.wait_for_timeout(100)
    for _ in range(100):
        if tab.choosers:
            break
        tab.page.wait_for_timeout(100)
    assert tab.choosers, "Space on the focused Image… button opened no file chooser"
    tab.choosers[0].set_files(files=[{"name": "cat.png", "mimeType": "image/png", "buffer": sketch}])
    tab.wait_painted(1)
    assert tab.sent == [(V1, sketch)] and tab.grid() == shown(answer_for(sketch, V1))
    assert tab.tab_to("ver-a") and tab.page.evaluate("document.activeElement.tagName") == "SELECT"
    options = tab.page.eval_on_selector_all("#ver-a option", "els => els.map(e => e.value)")
    assert options == [V2, V1] and tab.page.input_value("#ver-a") == V1  # registered, newest first; the default
    tab.page.keyboard.press("ArrowDown")  # already the last: nothing changes, nothing is sent
    tab.page.keyboard.press("ArrowUp")
    tab.wait_painted(2)
    assert tab.sent[-1] == (V2, sketch) and tab.grid() == shown(answer_for(sketch, V2))
    tab.page.keyboard.press("ArrowDown")
    tab.wait_painted(3)
    assert tab.sent[-1] == (V1, sketch) and tab.page.input_value("#ver-a") == V1
    tab.page.keyboard.press("ArrowUp")
    tab.wait_painted(4)
    tab.tab_to("compare")
    tab.page.keyboard.press("Space")
    tab.wait_painted(5)
    assert tab.page.is_checked("#compare") and tab.page.locator("#col-b").is_visible()
    tab.tab_to("ver-b")
    assert tab.page.input_value("#ver-b") == V2
    tab.page.keyboard.press("ArrowDown")
    tab.wait_painted(6)
    assert sorted(tab.sent[-2:]) == [(V1, sketch), (V2, sketch)]
    assert tab.grid("a") == shown(answer_for(sketch, V2)) and tab.grid("b") == shown(answer_for(sketch, V1))
    first = tab.tab_to("LI")  # into the results: each tile takes the focus and names its class in full
    assert first
    label = tab.page.evaluate("document.activeElement.getAttribute('aria-label')")
    assert label.startswith(f"{answer_for(sketch, V2)[0]['class']}, score 0.900")
    tab.tab_to("undo")  # Tab goes on around the page (no trap); Enter on Undo works on an empty canvas too
    tab.page.keyboard.press("Enter")
    tab.page.wait_for_timeout(200)
    assert len(tab.sent) == 8  # the file stays the query: undoing no stroke sends nothing


def test_long_class_names_wrap_in_full(tab: Tab):
    sketch = png(2)
    tab.page.set_input_files("#file", files=[{"name": "x.png", "mimeType": "image/png", "buffer": sketch}])
    tab.wait_painted(1)
    long = tab.page.locator(f"#col-a li[data-class='{LONG_NAME}'] .cls")
    assert long.inner_text() == LONG_NAME
    fits = long.evaluate("el => el.scrollWidth <= el.clientWidth && el.getBoundingClientRect().height > 20")
    assert fits, "the long class name is cut instead of wrapping onto more lines"


@pytest.mark.parametrize("delay_ms", [0, 30, 50, 50, 50, 80, 200])
def test_a_file_chosen_after_the_pen_lifts_wins(tab: Tab, delay_ms: int):
    sketch = png(3 + delay_ms)
    tab.stroke([(0.2, 0.2), (0.5, 0.6), (0.8, 0.3)])
    tab.page.wait_for_timeout(delay_ms)
    tab.page.set_input_files("#file", files=[{"name": "f.png", "mimeType": "image/png", "buffer": sketch}])
    tab.page.wait_for_function("b => window.semPcyc.timings.length >= 1 && !document.getElementById('dropped')"
                               ".hidden", arg=None)
    tab.page.wait_for_timeout(600)  # anything still on its way has arrived
    assert tab.grid() == shown(answer_for(sketch, V1)), f"after {delay_ms} ms the results are not the file's"
    assert tab.sent[-1] == (V1, sketch) and tab.page.locator("#dropped").is_visible()
    assert re.fullmatch(r"Results in \d+ ms\.", tab.status())


def test_a_missing_version_in_compare_is_said_where_the_results_are(browser, servers):
    tab = Tab(browser, servers["typed"].url)
    try:
        assert "Versions: TorchServe's management API was not given to the page server" in \
            tab.page.inner_text("#version-note")
        assert tab.page.evaluate("document.getElementById('ver-a').tagName") == "INPUT"
        tab.page.check("#compare")
        tab.page.fill("#ver-b", "9.9.9")
        tab.page.dispatch_event("#ver-b", "change")
        tab.stroke([(0.3, 0.3), (0.7, 0.7)])
        tab.wait_painted(1)
        assert "Version 9.9.9: version 9.9.9 of sem_pcyc is not registered" in tab.error(), tab.error()
        assert tab.page.evaluate("document.getElementById('error').closest('#results') !== null")
        assert re.fullmatch(r"Results of v1\.0\.0 in \d+ ms; v9\.9\.9 gave none \(see its message\)\.", tab.status())
        assert tab.grid("a") and tab.grid("b") == []
    finally:
        tab.close()


def test_busy_says_when_to_try_again(tab: Tab, fake):
    fake.busy = True
    tab.stroke([(0.2, 0.5), (0.8, 0.5)])
    tab.wait_painted(1)
    assert re.fullmatch(r"Busy: TorchServe's queue is full; try again in \d+ s\.", tab.error()), tab.error()
    assert tab.status().startswith("No results")


def test_on_a_phone_the_first_result_is_in_view_after_a_search(browser, servers, tmp_path: Path):
    tab = Tab(browser, servers["listed"].url, viewport={"width": 390, "height": 844}, device_scale_factor=3,
              is_mobile=True, has_touch=True)
    try:
        first_row = "document.querySelector('#col-a li')"
        tab.stroke([(0.2, 0.2), (0.8, 0.8)])
        tab.wait_painted(1)
        rect = tab.page.evaluate(f"(() => {{ const r = {first_row}.getBoundingClientRect(); "
                                 "return [r.top, r.bottom, window.innerHeight]; })()")
        assert 0 <= rect[0] and rect[1] <= rect[2], f"first result at {rect[:2]}, viewport height {rect[2]}"
        tab.page.screenshot(path=str(Path(os.environ.get("SEM_PCYC_PAGE_SCREENSHOTS") or tmp_path) / "phone.png"))
    finally:
        tab.close()
