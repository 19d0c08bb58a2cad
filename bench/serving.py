"""serve-check wall time and served latency on the demo artifacts (needs `dvc repro archive` first).

Runs the serve-check stage (a private TorchServe, real HTTP requests) --runs times and prints the wall time,
time to readiness and the per-sketch latency p50/p95 of each run, and the in-process search latency (the same
SketchSearch the handler wraps, without HTTP and TorchServe) for comparison.

Usage: python bench/serving.py [--runs 3]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from sempcyc import params as params_mod  # noqa: E402
from sempcyc.runtime.search import SketchSearch  # noqa: E402
from sempcyc.serving import ServeSettings, pick_queries  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    exe = Path(sys.executable).parent / "sempcyc"
    print("serve-check (start TorchServe, checks, stop):")
    for i in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "report.json"
            t0 = time.perf_counter()
            subprocess.run([str(exe), "serve-check", "--out", str(out)], cwd=REPO, check=True,
                           capture_output=True)
            wall = time.perf_counter() - t0
            r = json.loads(out.read_text())
        print(f"  run {i + 1}: wall {wall:5.1f} s (ready {r['ready_seconds']:.1f} s), latency p50 "
              f"{r['latency_ms_p50']} ms, p95 {r['latency_ms_p95']} ms, {r['concurrent_throughput_rps']} req/s "
              f"with 8 clients, parity {r['parity_top10']}, errors {r['errors']}")

    (serve,) = params_mod.read(REPO / "params.yaml", ServeSettings)
    search = SketchSearch.load(REPO / "models/sem_pcyc.pt", REPO / "models/gallery", top_k=serve.top_k,
                               max_pixels=serve.max_pixels)
    # the first two sketches of every unseen class, as serve-check sends
    bodies = [body for _, body in pick_queries(REPO / "data/dataset", REPO / "data/prepared/splits.json",
                                                  per_class=2)]
    search.search(bodies[:1])
    times = []
    for body in bodies:
        t0 = time.perf_counter()
        search.search([body])
        times.append((time.perf_counter() - t0) * 1000)
    print(f"in-process SketchSearch ({len(bodies)} sketches, gallery {len(search.ids)}): "
          f"p50 {np.percentile(times, 50):.1f} ms, p95 {np.percentile(times, 95):.1f} ms")


if __name__ == "__main__":
    main()
