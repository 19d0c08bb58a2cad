"""Deploy wall time per host on loopback, and bytes sent on a first deploy and on a repeat.

Starts a real sshd and a TorchServe "host" on 127.0.0.1 (sempcyc.testing.hosts, the tests' hosts too), deploys the
demo archive (models/sem_pcyc.mar, needs `dvc repro archive`) twice and prints the receipt figures.

Usage: python bench/deploy.py
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import REPO, Host
from sempcyc import params as params_mod
from sempcyc.runtime.search import SketchSearch
from sempcyc.serving import ServeSettings, pick_queries
from sempcyc.stages import deploy
from sempcyc.testing.hosts import start_sshd


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    mar = REPO / "models/sem_pcyc.mar"
    release = deploy.checked_archive(mar)
    name, sketch = pick_queries(REPO / "data/dataset", REPO / "data/prepared/splits.json", per_class=1)[0]
    (serve,) = params_mod.read(REPO / "params.yaml", ServeSettings)
    offline = SketchSearch.load(REPO / "models/sem_pcyc.pt", REPO / "models/gallery", top_k=serve.top_k,
                                max_pixels=serve.max_pixels, nprobe=serve.ann_nprobe, rerank=serve.ann_rerank)
    expected = offline.search([sketch])[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "sshd").mkdir()
        with start_sshd(tmp / "sshd") as sshd:
            host = Host(tmp / "host").start()
            try:
                for label in ("first deploy", "repeat (same version)"):
                    t0 = time.perf_counter()
                    receipt = deploy.deploy_target(host.target(sshd), release, sketch, expected, len(expected))
                    wall = time.perf_counter() - t0
                    print(f"{label:22s}: {receipt['status']:12s} {wall:5.1f} s, {receipt['bytes_sent']:>11,} bytes "
                          f"sent (archive {mar.stat().st_size:,}); steps {json.dumps(receipt['timings'])}")
            finally:
                host.stop()


if __name__ == "__main__":
    main()
