"""The evaluate stage on a prepared project (default: this checkout's demo outputs), 1 thread, each run a fresh
`sempcyc evaluate` process in a scratch folder:

1. cold cache (every item through the networks), the backbone pass shared with the model where it can be;
2. cold cache, sharing turned off (the model's extractor and the baselines' backbone each run on every item);
3. warm cache, nothing changed;
4. three unseen classes added: the cache filled from the test shard without them, then the whole shard;
and whether every report of 3 and 4 is byte-identical to the cold run's.

Usage: python bench/evaluate.py [--project DIR] [--keep DIR]     (about 2 minutes on the demo)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
NO_SHARING = ("import sys; from sempcyc import cli; from sempcyc.stages import evaluate; "
              "evaluate.runs_backbone = lambda *a: False; "
              "sys.exit(cli.main(sys.argv[1:]))")


def evaluate(work: Path, model: Path, test: Path, out: str, cache: str, share: bool = True) -> tuple[float, str]:
    """(wall seconds, evaluate's count line) of one `sempcyc evaluate` process."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1")
    argv = ["--params", str(REPO / "params.yaml"), "evaluate", "--model", str(model), "--test", str(test),
            "--out", str(work / out), "--cache", str(work / cache)]
    cmd = [sys.executable, "-m", "sempcyc.cli", *argv] if share else [sys.executable, "-c", NO_SHARING, *argv]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"evaluate failed:\n{proc.stdout}\n{proc.stderr}")
    counts = re.search(r"evaluate: (\d+ test items .*) in [\d.]+ s", proc.stdout)
    return seconds, counts.group(1) if counts else proc.stdout


def without_classes(test: Path, out: Path, drop: list[str]) -> None:
    """A copy of the test shard `test` without the unseen classes `drop` (their queries and gallery images), class
    indices renumbered, as prepare would write it for the dataset without them."""
    meta = json.loads((test / "classes.json").read_text(encoding="utf-8"))
    keep = [c for c in meta["classes"] if c not in drop]
    renumber = np.array([keep.index(c) if c in keep else -1 for c in meta["classes"]])
    out.mkdir(parents=True)
    (out / "classes.json").write_text(json.dumps({**meta, "classes": keep,
                                                  "unseen": [c for c in meta["unseen"] if c not in drop]}))
    for part in ("sketches", "seen_sketches", "images"):
        labels = renumber[np.load(test / f"{part}_labels.npy")]
        rows = labels >= 0
        np.save(out / f"{part}.npy", np.load(test / f"{part}.npy", mmap_mode="r")[rows])
        np.save(out / f"{part}_labels.npy", labels[rows])
        ids = json.loads((test / f"{part}_ids.json").read_text(encoding="utf-8"))
        (out / f"{part}_ids.json").write_text(json.dumps([i for i, r in zip(ids, rows) if r]))


def same_reports(a: Path, b: Path) -> bool:
    return sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir()) and all(
        p.read_bytes() == (b / p.name).read_bytes() for p in a.iterdir())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", default=str(REPO), help="folder with data/prepared/test and models/sem_pcyc.pt")
    parser.add_argument("--keep", help="work in this folder and keep it (default: a temporary folder)")
    args = parser.parse_args()
    project = Path(args.project)
    model, test = project / "models/sem_pcyc.pt", project / "data/prepared/test"
    top = Path(args.keep or tempfile.mkdtemp(prefix="sem-pcyc-eval-bench-"))
    work = top / "evaluate"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    drop = sorted(json.loads((test / "classes.json").read_text(encoding="utf-8"))["unseen"])[-3:]
    without_classes(test, work / "test-base", drop)
    runs = {
        "cold cache, backbone shared with the model": evaluate(work, model, test, "cold", "cache"),
        "cold cache, no sharing": evaluate(work, model, test, "cold-separate", "cache-separate", share=False),
        "warm cache, nothing changed": evaluate(work, model, test, "warm", "cache"),
        "(fill a cache without the 3 classes)": evaluate(work, model, work / "test-base", "base", "cache-added"),
        f"3 unseen classes added ({', '.join(drop)})": evaluate(work, model, test, "added", "cache-added"),
    }
    print(f"evaluate, {model} on {test}, 1 thread:")
    width = max(map(len, runs))
    for name, (seconds, counts) in runs.items():
        print(f"  {name:{width}s} {seconds:6.1f} s   {counts}")
    for name in ("cold-separate", "warm", "added"):
        print(f"  reports of '{name}' byte-identical to the cold run's: {same_reports(work / 'cold', work / name)}")
    if not args.keep:
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
