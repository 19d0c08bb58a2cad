"""The archive's TorchServe handler in-process (imported from the extracted archive, given a fake TorchServe
context): one answer per request, 4xx for bad items only, and no model from a damaged gallery.

The serving tests' tiny model, its gallery and its .mar (conftest.py's `built`) are built once a session (tiny
CNN, 32-px arrays, a few iterations; the stages run in-process).
"""
from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

from sempcyc.runtime.gallery_shards import read_manifest
from serving_helpers import MODEL_NAME, TOP_K, VERSION, Built, assert_ranked, same_answer, sketch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class FakeContext:
    """The parts of ts.context.Context the handler uses. Headers are a plain dict looked up by exact name, like
    TorchServe's RequestProcessor; TorchServe's frontend hands them over canonically spelt ('Content-Type' whatever
    the client sent), so tests use that spelling."""

    def __init__(self, model_dir: Path, headers: list[dict] | None = None):
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": None, "batch_size": 8}
        self.manifest = {"model": {"modelName": MODEL_NAME, "handler": "handler.py"}}
        self.headers = headers or []
        self.statuses: list[tuple[int, int, str]] = []  # (idx, status, phrase)

    def get_request_header(self, idx: int, key: str):
        return self.headers[idx].get(key) if idx < len(self.headers) else None

    def get_all_request_header(self, idx: int) -> dict:
        return dict(self.headers[idx]) if idx < len(self.headers) else {}

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        self.statuses.append((idx, code, phrase))


@pytest.fixture(scope="module")
def handler_module(built: Built):
    """The archive's handler.py imported from the extracted archive (its sem_pcyc_runtime first on sys.path)."""
    mp = pytest.MonkeyPatch()
    mp.syspath_prepend(str(built.extracted))
    spec = importlib.util.spec_from_file_location("sem_pcyc_archive_handler", built.extracted / "handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    mp.undo()
    for name in [n for n in sys.modules if n == "sem_pcyc_runtime" or n.startswith("sem_pcyc_runtime.")]:
        del sys.modules[name]


@pytest.fixture(scope="module")
def handler(built: Built, handler_module):
    h = handler_module.SemPcycHandler()
    h.initialize(FakeContext(built.extracted))
    return h


# ---------------------------------------------------------------------------------- 1. handler (unit)

def test_handler_one_item_per_request_and_4xx_for_bad_items_only(built: Built, handler, big_png: bytes):
    good = sketch(4)
    data = [{"body": good}, {"body": b""}, {"data": good}, {"body": b"not an image"}, {"body": big_png},
            {"body": {"json": 1}}, {"body": "text"}]
    ctx = FakeContext(built.extracted, [{"Content-Type": "image/png"}] * len(data))
    out = handler.handle(data, ctx)
    assert len(out) == len(data)
    assert_ranked(out[0], TOP_K)  # top_k from serving.json
    assert same_answer(out[2], out[0])
    expected = {1: 400, 3: 400, 4: 413, 5: 415, 6: 415}
    for idx, status in expected.items():
        assert out[idx]["status"] == status and out[idx]["error"], out[idx]
    assert sorted((idx, code) for idx, code, _ in ctx.statuses) == sorted(expected.items())
    assert all(phrase for _, _, phrase in ctx.statuses)
    assert handler.version == VERSION


@pytest.mark.parametrize("content_type, status", [
    ("application/json", 415), ("text/plain", 415), ("application/x-www-form-urlencoded", 415),
    ("image/png", 200), ("image/jpeg", 200), ("application/octet-stream", 200), (None, 200),
    ("IMAGE/PNG", 200),
])
def test_handler_content_types(built: Built, handler, content_type, status):
    headers = {} if content_type is None else {"Content-Type": content_type}
    ctx = FakeContext(built.extracted, [headers])
    [answer] = handler.handle([{"body": sketch(5)}], ctx)
    if status == 200:
        assert_ranked(answer, TOP_K)
        assert ctx.statuses == []
    else:
        assert answer["status"] == 415 and content_type in answer["error"]
        assert [(idx, code) for idx, code, _ in ctx.statuses] == [(0, 415)]


def test_handler_without_context_headers(built: Built, handler):
    """handle(data, None) works (benchmarks call it that way) and answers every request."""
    out = handler.handle([{"body": sketch(6)}, {"body": b""}], None)
    assert_ranked(out[0], TOP_K)
    assert out[1]["status"] == 400


def test_the_handler_refuses_to_load_an_archive_with_a_damaged_shard(built: Built, handler_module,
                                                                     tmp_path: Path):
    """What TorchServe's worker does with it: initialize() raises, naming the shard, so the version never loads
    (registration fails, deploy rolls back) rather than answering from part of the gallery."""
    model_dir = tmp_path / "model_dir"
    shutil.copytree(built.extracted, model_dir)
    entry = read_manifest(model_dir / "gallery")["shards"][0]
    (model_dir / "gallery" / entry["file"]).write_bytes(b"not the shard")
    h = handler_module.SemPcycHandler()
    with pytest.raises(Exception, match=entry["file"].replace(".", r"\.")) as exc:
        h.initialize(FakeContext(model_dir))
    assert type(exc.value).__name__ == "GalleryError" and not h.initialized
