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
import os
import re
from pathlib import Path

from common import REPO, measure
from sempcyc import params as params_mod
from sempcyc.serving import ReleaseSettings, ServeSettings, pick_queries

DEFAULT_CONFIGS = "w1b4d2t1,w1b1d0t1,w2b1d0t1,w2b4d2t1,w2b8d5t1,w1b8d5t2"
CONFIG = re.compile(r"w(\d+)b(\d+)d(\d+)t(\d+)")


def parse_config(text: str) -> dict:
    match = CONFIG.fullmatch(text)
    if not match:
        raise SystemExit(f"bad config {text!r}: write w<workers>b<batch>d<delay ms>t<threads>, e.g. w2b4d2t1")
    workers, batch, delay, threads = map(int, match.groups())
    return {"name": text, "workers": workers, "batch": batch, "delay": delay, "threads": threads}


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
