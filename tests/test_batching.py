"""TorchServe's dynamic batching (serve.batch_size / serve.max_batch_delay_ms in the model's config): the handler
takes a batch of requests, embeds their sketches in one forward pass and searches them at once, and each request
gets the answer it gets alone (the same items in the same order; scores equal up to the float noise a batched
forward pass adds, ~4e-7 in the embedding) or its own 4xx error, whatever else is in the batch. In-process on the
archive's handler (an exact gallery and one with a faiss index), and through a real TorchServe.
"""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from helpers import PARAMS, build_tiny_archive, build_tiny_model, call, merged, png_bytes
from sempcyc import serving, torchserve

MODEL, VERSION, TOP_K = "sem_pcyc", "1.0.0", 8
SETTINGS = merged(PARAMS, {"release": {"model_name": MODEL, "version": VERSION}, "serve": {"top_k": TOP_K}})

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def same_answer(batched: list[dict], alone: list[dict]) -> bool:
    """The same items in the same order, each score within float noise of the one answered alone (two items
    whose scores differ by less than that may swap: serving.same_ranking)."""
    return serving.same_ranking(batched, alone, tol=1e-5) and all(
        abs(a["score"] - b["score"]) <= 1e-5 * max(abs(b["score"]), 1e-6) + 1e-6 for a, b in zip(batched, alone))


class Context:
    """The parts of ts.context.Context the handler uses (headers by request, statuses it sets)."""

    def __init__(self, model_dir: Path, headers: list[dict]):
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": None, "batch_size": len(headers)}
        self.headers, self.statuses = headers, {}

    def get_request_header(self, idx: int, key: str):
        return self.headers[idx].get(key)

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        self.statuses[idx] = code


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> dict[str, Path]:
    """The tiny model's archive with an exact gallery and with a faiss-indexed one (4 lists), each extracted."""
    root = tmp_path_factory.mktemp("batching")
    model, gallery = build_tiny_model(root, SETTINGS)
    indexed = merged(SETTINGS, {"gallery": {"ann_min_items": 1, "ann_nlist": 4}})
    (root / "params.yaml").write_text(json.dumps(indexed), encoding="utf-8")
    code, out, err = call(root, "gallery", "--out", "models/gallery-indexed")
    assert code == 0 and "IVF index" in out, out + err
    found = {}
    for name, folder in (("exact", gallery), ("indexed", root / "models/gallery-indexed")):
        mar = build_tiny_archive(model, folder, root / name / f"{MODEL}.mar", SETTINGS)
        with zipfile.ZipFile(mar) as zf:
            zf.extractall(root / name / "extracted")
        found[name], found[f"{name}_mar"] = root / name / "extracted", mar
    return found


def handler_of(extracted: Path):
    """The archive's own handler.py, imported with its sem_pcyc_runtime, initialized on the extracted archive."""
    sys.path.insert(0, str(extracted))
    try:
        spec = importlib.util.spec_from_file_location(f"handler_{extracted.parent.name}", extracted / "handler.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        handler = module.SemPcycHandler()
        handler.initialize(Context(extracted, []))
        return handler
    finally:
        sys.path.remove(str(extracted))
        for name in [n for n in sys.modules if n == "sem_pcyc_runtime" or n.startswith("sem_pcyc_runtime.")]:
            del sys.modules[name]


@pytest.mark.parametrize("gallery", ["exact", "indexed"])
def test_a_batch_answers_each_sketch_as_it_is_answered_alone(archives: dict, gallery: str):
    handler = handler_of(archives[gallery])
    assert (handler.search.ann is not None) == (gallery == "indexed")
    sketches = [png_bytes(seed=i, mode="L") for i in range(6)]
    alone = [handler.handle([{"body": s}], Context(archives[gallery], [{}]))[0] for s in sketches]
    assert len({tuple(r["image"] for r in answer) for answer in alone}) > 3  # a mix-up would show
    bad = {1: (b"", 400), 3: (b"not an image", 400), 5: (json.dumps({"x": 1}).encode(), 415)}
    batch, headers, where = [], [], {}
    for i, sketch in enumerate(sketches):  # bad requests between the good ones
        if i in bad:
            batch.append({"body": bad[i][0]})
            headers.append({"Content-Type": "application/json" if bad[i][1] == 415 else "image/png"})
        where[len(batch)] = i
        batch.append({"data": sketch})
        headers.append({"Content-Type": "image/png"})
    ctx = Context(archives[gallery], headers)
    out = handler.handle(batch, ctx)
    assert len(out) == len(batch)  # one item per request, or TorchServe answers the whole batch 503
    for pos, i in where.items():
        assert len(out[pos]) == TOP_K and same_answer(out[pos], alone[i]), (pos, out[pos], alone[i])
    errors = {pos: answer["status"] for pos, answer in enumerate(out) if isinstance(answer, dict)}
    assert sorted(errors.values()) == [400, 400, 415] and ctx.statuses == errors
    assert all(out[pos]["error"] for pos in errors)


def test_a_batch_of_only_bad_requests_answers_each_with_its_error(archives: dict):
    handler = handler_of(archives["indexed"])
    out = handler.handle([{"body": b""}, {"body": "text"}], Context(archives["indexed"], [{}, {}]))
    assert [answer["status"] for answer in out] == [400, 415]


# ------------------------------------------------------------------------------------------- real TorchServe

def batch_sizes(workdir: Path) -> list[int]:
    """The batch sizes TorchServe's worker handed the handler, in order: its PredictionTime metric, one line a batch
    in the frontend's log, lists the ids of the batch's requests."""
    text = (workdir / "logs" / "ts_log.log").read_text(errors="replace")
    pattern = r"MODEL_METRICS - PredictionTime\.ms:[\d.]+\|.*?requestID:(\S+?),timestamp:"
    return [len(match.group(1).split(",")) for match in re.finditer(pattern, text)]


def batch_sizes_once_logged(workdir: Path, requests: int, timeout: float = 30.0) -> list[int]:
    """batch_sizes once they account for `requests` requests: the metrics line is written after the answer."""
    deadline = time.monotonic() + timeout
    while sum(sizes := batch_sizes(workdir)) < requests and time.monotonic() < deadline:
        time.sleep(0.1)
    return sizes


@pytest.mark.integration
@pytest.mark.parametrize("gallery", ["exact", "indexed"])
def test_torchserve_batches_concurrent_sketches_and_answers_each_as_alone(archives: dict, gallery: str,
                                                                         tmp_path: Path):
    store = tmp_path / "store"
    store.mkdir()
    mar = archives[f"{gallery}_mar"]
    shutil.copy2(mar, store / mar.name)
    models = serving.models_config(MODEL, VERSION, mar.name, batch_size=4, max_batch_delay_ms=500)
    sketches = [png_bytes(seed=40 + i, mode="L") for i in range(8)]
    with torchserve.TorchServe(store, models, workdir=tmp_path / "work") as ts:
        ts.wait_ready(MODEL, 120)
        url = f"{ts.inference_url}/predictions/{MODEL}"

        def ask(body: bytes) -> tuple[int, bytes]:
            return ts.request("POST", url, body, {"Content-Type": "image/png"}, timeout=120)

        alone = []
        for body in sketches:  # one client: each request alone in its batch (after the 500 ms delay)
            status, answer = ask(body)
            assert status == 200, answer
            alone.append(json.loads(answer))
        before = len(batch_sizes_once_logged(ts.workdir, len(sketches)))
        with ThreadPoolExecutor(max_workers=8) as pool:
            together = list(pool.map(ask, sketches))
        sizes = batch_sizes_once_logged(ts.workdir, 2 * len(sketches))
    assert [status for status, _ in together] == [200] * 8, together
    assert len({tuple(r["image"] for r in answer) for answer in alone}) > 4  # a mix-up would show
    for (_, answer), reference in zip(together, alone):
        assert same_answer(json.loads(answer), reference)
    assert sizes[:before] == [1] * before, sizes  # the lone requests
    assert max(sizes[before:]) > 1 and sum(sizes[before:]) == 8, sizes  # the concurrent ones shared passes
