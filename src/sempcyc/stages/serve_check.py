"""serve-check stage: start the built archive in a real, private TorchServe and check it as a client would.

Checks (any failure fails the stage, naming the check): unseen-class sketches answer 200 with the response
schema and k items; parity: the served top-10 equals the offline top-10 of the same model and gallery; 8
concurrent clients send a bounded number of requests with 0 errors; bad requests (empty body, not an image, a
50-megapixel image, a JSON body) get a 4xx JSON error and the worker keeps serving. Reports p50/p95 latency, and
under "smoke" the archive's sha256, the first query and its offline top-10: deploy's smoke query on each host, so
deploy never loads the model itself.
The instance is stopped whatever happens (also on failure or Ctrl-C); any other TorchServe is left alone.
"""
from __future__ import annotations

import argparse
import io
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import params as params_mod
from ..errors import UserError
from ..fsutil import atomic_write_json, sha256_file
from ..runtime.gallery_shards import GalleryError, load_gallery
from ..runtime.retrieval import top_k
from ..runtime.search import SketchSearch
from ..serving import ReleaseSettings, ServeSettings, check_response, models_config, pick_queries, same_ranking
from ..torchserve import TorchServe

PARITY_K = 10


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mar", default="models/sem_pcyc.mar", help="archive (default: %(default)s)")
    parser.add_argument("--model", default="models/sem_pcyc.pt", help="model bundle for the offline reference")
    parser.add_argument("--gallery", default="models/gallery", help="gallery for the offline reference")
    parser.add_argument("--dataset", default="data/dataset", help="extracted dataset (query sketch files)")
    parser.add_argument("--splits", default="data/prepared/splits.json", help="class split (unseen classes)")
    parser.add_argument("--out", default="reports/serve_check.json", help="report (default: %(default)s)")


def run(args: argparse.Namespace) -> None:
    release, serve = params_mod.read(args.params, ReleaseSettings, ServeSettings)
    mar = Path(args.mar)
    if not mar.exists():
        raise UserError(f"{mar}: not found; run `dvc repro archive`")
    queries = pick_queries(Path(args.dataset), Path(args.splits))
    if serve.threads > 0:
        # the offline reference runs beside the loading workers: with torch's default threads it starved them
        # (ready 7.5 s instead of 4.5 s on 2 cores); with a worker's threads it is one more worker
        torch.set_num_threads(serve.threads)
    report = serve_and_check(mar, release, serve, queries, lambda: offline_reference(args, serve, queries))
    atomic_write_json(args.out, report)
    print(f"serve-check: ready in {report['ready_seconds']:.1f} s; parity {report['parity_top10']:.2f}; "
          f"{report['errors']} errors in {report['requests']} requests; p50 {report['latency_ms_p50']} ms, "
          f"p95 {report['latency_ms_p95']} ms; {report['wall_seconds']} s in all -> {args.out}")
    if report["failures"]:
        raise UserError("serve-check failed:\n  " + "\n  ".join(report["failures"]))


def offline_reference(args: argparse.Namespace, serve: ServeSettings, queries: list[tuple[str, bytes]]
                      ) -> tuple[list[list[dict]], int, dict]:
    """The offline answers to `queries` from the model and gallery the archive was built from, k, and the
    approximate index's recall report (check_recall; empty for an exact gallery)."""
    try:
        gallery = load_gallery(args.gallery)
        search = SketchSearch.from_gallery(args.model, args.gallery, gallery, top_k=serve.top_k,
                                           max_pixels=serve.max_pixels, nprobe=serve.ann_nprobe,
                                           rerank=serve.ann_rerank)
    except GalleryError as exc:
        raise UserError(str(exc)) from None
    offline = [search.search([body])[0] for _, body in queries]
    k = min(serve.top_k, len(search.ids))
    return offline, k, check_recall(search, gallery[1], queries, k, serve.ann_min_recall)


def serve_and_check(mar: Path, release: ReleaseSettings, serve: ServeSettings, queries: list[tuple[str, bytes]],
                    reference: Callable[[], tuple[list[list[dict]], int, dict]]) -> dict:
    """Start `mar` in a private TorchServe, run the checks, stop it; the report (failures listed, not raised).
    `reference()` gives (offline answers, k, recall report); it runs while the workers load, which takes seconds
    of mostly waiting."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sem-pcyc-serve-check-") as tmp:
        store = Path(tmp) / "model-store"
        store.mkdir()
        shutil.copy2(mar, store / mar.name)
        models = models_config(release.model_name, release.version, mar.name, serve.batch_size,
                               serve.max_batch_delay_ms, workers=serve.workers)
        with TorchServe(store, models, workdir=Path(tmp) / "ts",
                        extra_config={"job_queue_size": serve.queue_size}) as ts:
            offline, k, recall = reference()
            ts.wait_ready(release.model_name, serve.ready_timeout_s)
            ready_s = time.perf_counter() - started
            report = run_checks(ts, release.model_name, queries, offline, k, serve.check_requests)
    failures = report["failures"] + recall.pop("failures", [])
    # deploy's smoke query on each host: this archive's first query and the offline top-10 the served one matched
    smoke = {"archive_sha256": sha256_file(mar), "sketch": queries[0][0], "k": k, "top10": offline[0][:PARITY_K]}
    report.update({**recall, "failures": failures, "smoke": smoke, "ready_seconds": round(ready_s, 2),
                   "wall_seconds": round(time.perf_counter() - started, 2), "version": release.version,
                   "passed": not failures})
    return report


def check_recall(search: SketchSearch, embeddings: np.ndarray, queries: list[tuple[str, bytes]], k: int,
                 floor: float) -> dict:
    """With an approximate index: the share of each query's exact top-k (over the gallery's float32 `embeddings`)
    that it finds (recall@k, averaged over the query sketches) against serve.ann_min_recall, and "failures" when
    below. An exact gallery reports nothing."""
    if search.ann is None:
        return {}
    vectors = search.embed(np.stack([search.preprocess(body) for _, body in queries]))
    approximate, _ = search.nearest(vectors, k)
    exact, _ = top_k(vectors, embeddings, k)
    recall = float(np.mean([len(set(a) & set(e)) / k for a, e in zip(approximate.tolist(), exact.tolist())]))
    failures = []
    if recall < floor:
        failures.append(f"recall: the approximate index finds {recall:.3f} of the exact top-{k} (serve.ann_min_recall "
                        f"{floor}); raise serve.ann_nprobe or serve.ann_rerank, or lower gallery.ann_code_dims "
                        "(finer codes), or search exactly (gallery.ann_min_items above the gallery's size)")
    return {"ann_recall_at_k": round(recall, 4), "ann_nprobe": search.nprobe, "ann_rerank": search.rerank,
            "failures": failures}


def big_png(megapixels: int = 50) -> bytes:
    """A valid PNG of ~megapixels (a white image compresses to a few hundred kB)."""
    side = int((megapixels * 1_000_000) ** 0.5) + 1
    buf = io.BytesIO()
    Image.new("L", (side, side), 255).save(buf, format="PNG", compress_level=9)
    return buf.getvalue()


def run_checks(ts: TorchServe, model_name: str, queries: list[tuple[str, bytes]], offline: list[list[dict]],
               k: int, n_concurrent_requests: int) -> dict:
    """Every check against the running instance; failures are collected in the report's `failures`."""
    url = f"{ts.inference_url}/predictions/{model_name}"
    failures: list[str] = []
    latencies, parity, schema_errors = check_answers(ts, url, queries, offline, k, failures)
    concurrent = check_load(ts, url, queries, k, n_concurrent_requests, failures)
    bad = check_bad_requests(ts, url, failures)
    status, answer = ts.request("POST", url, queries[0][1], {"Content-Type": "image/png"})
    if check_response(status, answer, k):
        failures.append("worker did not serve a valid sketch after the bad requests")
    all_lat = latencies + concurrent["latencies"]
    return {
        "requests": len(queries) + n_concurrent_requests + len(bad) + 1,
        "queries": len(queries), "parity_top10": parity, "schema_errors": schema_errors,
        "concurrent_requests": n_concurrent_requests, "concurrent_errors": concurrent["errors"],
        "errors": schema_errors + concurrent["errors"],
        "concurrent_throughput_rps": round(n_concurrent_requests / concurrent["seconds"], 1),
        "latency_ms_p50": round(float(np.percentile(latencies, 50)), 1),
        "latency_ms_p95": round(float(np.percentile(latencies, 95)), 1),
        "latency_ms_p95_concurrent": round(float(np.percentile(all_lat, 95)), 1),
        "bad_request_status": bad,
        "failures": failures,
    }


def check_answers(ts: TorchServe, url: str, queries: list[tuple[str, bytes]], offline: list[list[dict]], k: int,
                  failures: list[str]) -> tuple[list[float], float, int]:
    """One request per query, in turn: schema, parity with the offline top-10; (latencies ms, parity, errors)."""
    latencies, parity_ok, schema_errors = [], 0, 0
    for (name, body), reference in zip(queries, offline):
        t0 = time.perf_counter()
        status, answer = ts.request("POST", url, body, {"Content-Type": "image/png"})
        latencies.append((time.perf_counter() - t0) * 1000)
        problem = check_response(status, answer, k)
        if problem:
            schema_errors += 1
            failures.append(f"schema: {name}: {problem}")
            continue
        parity_ok += same_ranking(json.loads(answer)[:PARITY_K], reference[:PARITY_K])
    parity = parity_ok / max(len(queries), 1)
    if parity < 1.0:
        failures.append(f"parity: served top-{PARITY_K} differs from offline for "
                        f"{len(queries) - parity_ok} of {len(queries)} sketches")
    return latencies, parity, schema_errors


def check_load(ts: TorchServe, url: str, queries: list[tuple[str, bytes]], k: int, n_requests: int,
               failures: list[str]) -> dict:
    """`n_requests` requests from 8 concurrent clients: errors, wall seconds and latencies."""
    def one(i: int):
        name, body = queries[i % len(queries)]
        t0 = time.perf_counter()
        status, answer = ts.request("POST", url, body, {"Content-Type": "image/png"}, timeout=120)
        return check_response(status, answer, k), (time.perf_counter() - t0) * 1000
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(one, range(n_requests)))
    seconds = time.perf_counter() - t0
    errors = sum(1 for problem, _ in results if problem)
    if errors:
        failures.append(f"load: {errors} of {n_requests} concurrent requests failed, e.g. "
                        + next(p for p, _ in results if p))
    return {"errors": errors, "seconds": seconds, "latencies": [ms for _, ms in results]}


def check_bad_requests(ts: TorchServe, url: str, failures: list[str]) -> dict[str, int]:
    """Requests the handler must refuse with a 4xx JSON error: label -> status."""
    bad_cases = {"empty body": (b"", {"Content-Type": "image/png"}),
                 "not an image": (b"this is not an image" * 10, {"Content-Type": "image/png"}),
                 "50-megapixel image": (big_png(50), {"Content-Type": "image/png"}),
                 "JSON body": (json.dumps({"sketch": "x"}).encode(), {"Content-Type": "application/json"})}
    bad = {}
    for label, (body, headers) in bad_cases.items():
        status, answer = ts.request("POST", url, body, headers)
        try:
            message = json.loads(answer).get("error")
        except (json.JSONDecodeError, AttributeError):
            message = None
        bad[label] = status
        if not (400 <= status < 500 and message):
            failures.append(f"bad request '{label}': expected a 4xx JSON error, got {status} {answer[:120]!r}")
    return bad
