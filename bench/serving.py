"""Served throughput and latency of the demo archive for several TorchServe settings (needs `dvc repro archive`).

For each configuration (workers x batch size x batch delay x torch threads per worker) it starts a private
TorchServe on models/sem_pcyc.mar, waits for every worker, and measures with real HTTP requests (keep-alive
connections, one per client thread):
  1 client   latency p50/p95 (requests one after another: what a person drawing sees)
  8 clients  requests/s and p50 (serve-check's load)
  32 clients requests/s and p50
The clients run on the same cores as TorchServe, as they do in serve-check. The configuration that serves most
requests/s at 8 clients with a 1-client p50 within the goal is what params.yaml's serve section should say.

Usage: python bench/serving.py [--configs w1b4d2t1,w2b4d2t1,...] [--requests 240]
"""
from __future__ import annotations

import argparse
import http.client
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from sempcyc import params as params_mod  # noqa: E402
from sempcyc.serving import ReleaseSettings, ServeSettings, check_response, models_config, pick_queries  # noqa: E402
from sempcyc.torchserve import TorchServe  # noqa: E402

DEFAULT_CONFIGS = "w1b4d2t1,w1b1d0t1,w2b1d0t1,w2b4d2t1,w2b8d5t1,w1b8d5t2"
CONFIG = re.compile(r"w(\d+)b(\d+)d(\d+)t(\d+)")


def parse_config(text: str) -> dict:
    match = CONFIG.fullmatch(text)
    if not match:
        raise SystemExit(f"bad config {text!r}: write w<workers>b<batch>d<delay ms>t<threads>, e.g. w2b4d2t1")
    workers, batch, delay, threads = map(int, match.groups())
    return {"name": text, "workers": workers, "batch": batch, "delay": delay, "threads": threads}


def client_loop(host: str, port: int, path: str, bodies: list[bytes], counter: list, out: list, k: int) -> None:
    """Send requests on one keep-alive connection until the shared counter runs out."""
    conn = http.client.HTTPConnection(host, port, timeout=120)
    while True:
        with counter[1]:
            if counter[0] <= 0:
                break
            counter[0] -= 1
            i = counter[0]
        t0 = time.perf_counter()
        conn.request("POST", path, body=bodies[i % len(bodies)], headers={"Content-Type": "image/png"})
        resp = conn.getresponse()
        answer = resp.read()
        out.append((time.perf_counter() - t0) * 1000)
        problem = check_response(resp.status, answer, k)
        if problem:
            raise SystemExit(f"bad answer under load: {problem}")
    conn.close()


def load(url: str, path: str, bodies: list[bytes], clients: int, n_requests: int, k: int) -> tuple[float, list]:
    """(requests/s, latencies ms) of n_requests sent by `clients` threads."""
    host, port = url.split("//")[1].split(":")
    counter, latencies = [n_requests, threading.Lock()], []
    threads = [threading.Thread(target=client_loop, args=(host, int(port), path, bodies, counter, latencies, k))
               for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return n_requests / (time.perf_counter() - t0), latencies


def measure(cfg: dict, mar: Path, release: ReleaseSettings, bodies: list[bytes], n_requests: int, k: int,
            inspect=None) -> dict:
    """The three load levels on a private TorchServe of `mar` with `cfg`. `inspect(ts, before)`, when given, runs
    before them (before=None) and after them (before: what the first call returned), the instance up, and the
    second call's dict joins the result (e.g. the workers' memory and CPU time)."""
    with tempfile.TemporaryDirectory(prefix="sem-pcyc-bench-serving-") as tmp:
        store = Path(tmp) / "store"
        store.mkdir()
        shutil.copy2(mar, store / mar.name)
        models = models_config(release.model_name, release.version, mar.name, cfg["batch"], cfg["delay"],
                               workers=cfg["workers"])
        os.environ["SEM_PCYC_THREADS"] = str(cfg["threads"])  # the handler's per-worker torch threads
        with TorchServe(store, models, workdir=Path(tmp) / "ts") as ts:
            ts.wait_ready(release.model_name, 180)
            path = f"/predictions/{release.model_name}"
            load(ts.inference_url, path, bodies, 2 * cfg["workers"], 8 * cfg["workers"], k)  # warm every worker
            before = inspect(ts, None) if inspect else None
            _, one = load(ts.inference_url, path, bodies, 1, n_requests // 3, k)
            rps8, lat8 = load(ts.inference_url, path, bodies, 8, n_requests, k)
            rps32, lat32 = load(ts.inference_url, path, bodies, 32, n_requests, k)
            extra = inspect(ts, before) if inspect else {}
    return {"p50_1": np.percentile(one, 50), "p95_1": np.percentile(one, 95), "rps8": rps8,
            "p50_8": np.percentile(lat8, 50), "rps32": rps32, "p50_32": np.percentile(lat32, 50),
            "requests": len(one) + 2 * n_requests, **extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated (default: %(default)s)")
    parser.add_argument("--requests", type=int, default=240, help="requests per load level (default: %(default)s)")
    parser.add_argument("--mar", default=str(REPO / "models/sem_pcyc.mar"))
    args = parser.parse_args()
    release, serve = params_mod.read(REPO / "params.yaml", ReleaseSettings, ServeSettings)
    bodies = [body for _, body in pick_queries(REPO / "data/dataset", REPO / "data/prepared/splits.json")]
    print(f"{os.cpu_count()} cores; {len(bodies)} unseen-class sketches; top-{serve.top_k}")
    print("config      workers batch delay threads | 1 client p50  p95 | 8 clients req/s  p50 | 32 clients req/s  p50")
    for cfg in map(parse_config, args.configs.split(",")):
        r = measure(cfg, Path(args.mar), release, bodies, args.requests, serve.top_k)
        print(f"{cfg['name']:<11} {cfg['workers']:>7} {cfg['batch']:>5} {cfg['delay']:>5} {cfg['threads']:>7} | "
              f"{r['p50_1']:>12.1f} {r['p95_1']:>4.1f} | {r['rps8']:>15.1f} {r['p50_8']:>4.1f} | "
              f"{r['rps32']:>16.1f} {r['p50_32']:>4.1f}", flush=True)


if __name__ == "__main__":
    main()
