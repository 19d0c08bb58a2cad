"""Gallery embedding throughput, one process against N processes under torchrun (data-parallel, gloo), each with
one torch thread, on a project's gallery (default: this checkout's demo model and dataset) or on synthetic photos.

Every run is a fresh `sempcyc gallery` in a scratch folder with an empty cache (every image embedded); the figure
is the stage's own "embedded N images in T s" line: decoding, network passes and the gather to rank 0, not the
start-up, hashing, thumbnails or writing. Runs alternate 1 and N processes, with the 1-minute load average before
each (other jobs on the cores change the figures: report it). It also checks that the galleries the 1- and
N-process runs write are byte-identical.

Usage: python bench/gallery_embed.py [--model M --dataset D --index I] [--synthetic 800] [--procs 2]
                                     [--repeats 3] [--limit 800]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LINE = re.compile(r"gallery: embedded (\d+) images in ([\d.]+) s on (\d+) process")


def synthetic_dataset(folder: Path, n: int, classes: int = 20, size: int = 256) -> tuple[Path, Path]:
    """`n` random-ellipse JPEG photos over `classes` classes: (dataset folder, index file)."""
    rng = np.random.default_rng(0)
    files: dict[str, list[str]] = {}
    for i in range(n):
        cls = f"class_{i % classes:02d}"
        img = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, 3)))
        box = sorted(rng.integers(0, size, 2).tolist()), sorted(rng.integers(0, size, 2).tolist())
        ImageDraw.Draw(img).ellipse([box[0][0], box[1][0], box[0][1] + 1, box[1][1] + 1],
                                    fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        (folder / "images" / cls).mkdir(parents=True, exist_ok=True)
        img.save(folder / "images" / cls / f"{i:05d}.jpg", quality=90)
        files.setdefault(cls, []).append(f"{i:05d}.jpg")
    index = folder / "dataset.json"
    index.write_text(json.dumps({"classes": sorted(files), "files": {"images": files}}), encoding="utf-8")
    return folder, index


def limited_index(index: Path, limit: int, out: Path) -> Path:
    """The dataset index with only its first `limit` gallery images (class by class, index order)."""
    data = json.loads(index.read_text(encoding="utf-8"))
    kept, left = {}, limit
    for cls in data["classes"]:
        files = data["files"]["images"].get(cls, [])[:max(left, 0)]
        kept[cls], left = files, left - len(files)
    data["files"] = {**data["files"], "images": kept}
    out.write_text(json.dumps(data), encoding="utf-8")
    return out


def run_gallery(work: Path, procs: int, params: Path, model: Path, dataset: Path, index: Path, out: str) -> dict:
    """One gallery run with an empty cache: images, seconds (the stage's embed line), wall seconds, load before."""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    argv = ["-m", "sempcyc.cli", "--params", str(params), "gallery", "--model", str(model), "--dataset",
            str(dataset), "--index", str(index), "--out", str(work / out), "--cache", str(work / f"{out}-cache")]
    cmd = ([sys.executable, *argv] if procs == 1 else
           [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={procs}", *argv])
    load = os.getloadavg()[0]
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-3000:]}")
    match = LINE.search(proc.stdout)
    if not match or int(match.group(3)) != procs:
        raise SystemExit(f"no embed line for {procs} process(es) in:\n{proc.stdout}")
    shutil.rmtree(work / f"{out}-cache")
    return {"procs": procs, "images": int(match.group(1)), "seconds": float(match.group(2)), "wall": wall,
            "load": load}


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=REPO / "models/sem_pcyc.pt")
    parser.add_argument("--dataset", type=Path, default=REPO / "data/dataset")
    parser.add_argument("--index", type=Path, default=REPO / "data/dataset.json")
    parser.add_argument("--synthetic", type=int, default=0, help="embed this many synthetic photos instead")
    parser.add_argument("--limit", type=int, default=0, help="only the first LIMIT gallery images (0: all)")
    parser.add_argument("--procs", type=int, default=2, help="processes of the torchrun runs (default: 2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, help="gallery.batch_size (default: params.yaml's)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gallery-embed-") as tmp:
        work = Path(tmp)
        dataset, index = args.dataset, args.index
        if args.synthetic:
            dataset, index = synthetic_dataset(work / "synthetic", args.synthetic)
        if args.limit:
            index = limited_index(index, args.limit, work / "limited.json")
        params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
        params["gallery"]["thumbnail_max_items"] = 0
        params["gallery"]["batch_size"] = args.batch_size or params["gallery"]["batch_size"]
        params["train"]["device"] = "cpu"
        (work / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
        runs = []
        for repeat in range(args.repeats):
            for procs in (1, args.procs):
                runs.append(run_gallery(work, procs, work / "params.yaml", args.model, dataset, index,
                                        f"g{procs}-{repeat}"))
                r = runs[-1]
                print(f"run {repeat + 1}, {procs} process(es): {r['images']} images in {r['seconds']:.2f} s "
                      f"({r['images'] / r['seconds']:.1f} images/s, {r['images'] / r['seconds'] / procs:.1f} per "
                      f"process; whole command {r['wall']:.1f} s), load before {r['load']:.2f}", flush=True)
        same = all(folder_bytes(work / f"g1-{i}") == folder_bytes(work / f"g{args.procs}-{i}")
                   for i in range(args.repeats))
        report(runs, args.procs, args.batch_size or params["gallery"]["batch_size"], same)


def report(runs: list[dict], procs: int, batch: int, same: bool) -> None:
    rate = {p: [r["images"] / r["seconds"] for r in runs if r["procs"] == p] for p in (1, procs)}
    one, many = statistics.median(rate[1]), statistics.median(rate[procs])
    print(f"\ngallery.batch_size {batch}, {runs[0]['images']} images, {len(rate[1])} runs each, "
          f"1-minute load {min(r['load'] for r in runs):.2f}-{max(r['load'] for r in runs):.2f}, "
          f"{os.cpu_count()} CPUs")
    print(f"1 process:  median {one:.1f} images/s (runs: {', '.join(f'{v:.1f}' for v in rate[1])})")
    print(f"{procs} processes: median {many:.1f} images/s, {many / procs:.1f} per process "
          f"(runs: {', '.join(f'{v:.1f}' for v in rate[procs])})")
    print(f"speed-up: {many / one:.2f}x (per run pair: "
          f"{', '.join(f'{b / a:.2f}x' for a, b in zip(rate[1], rate[procs]))})")
    print(f"1-process and {procs}-process galleries byte-identical: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
