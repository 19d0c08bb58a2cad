"""One epoch of the training shard: reading the prepared uint8 arrays vs. decoding the image files.

Usage: python bench/data_loading.py [--prepared data/prepared/train] [--dataset data/dataset] [--batch 128]
Needs `dvc repro prepare` first. Prints seconds per epoch for each way and the ratio.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from sempcyc.runtime import imaging


def epoch_from_arrays(folder: Path, batch: int) -> float:
    start = time.perf_counter()
    total = 0
    for domain in ("sketches", "images"):
        arr = np.load(folder / f"{domain}.npy", mmap_mode="r")
        order = np.random.default_rng(0).permutation(len(arr))
        for i in range(0, len(arr), batch):
            total += int(np.asarray(arr[np.sort(order[i:i + batch])]).sum() > 0)
    return time.perf_counter() - start


def epoch_from_files(folder: Path, dataset: Path, batch: int) -> float:
    size = np.load(folder / "sketches.npy", mmap_mode="r").shape[1]
    start = time.perf_counter()
    for domain, kind in (("sketches", "sketch"), ("images", "image")):
        ids = json.loads((folder / f"{domain}_ids.json").read_text())
        order = np.random.default_rng(0).permutation(len(ids))
        for i in range(0, len(ids), batch):
            np.stack([imaging.to_array(imaging.load_file(dataset / domain / ids[j]), size, kind)
                      for j in order[i:i + batch]])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prepared", default="data/prepared/train")
    parser.add_argument("--dataset", default="data/dataset")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    folder, dataset = Path(args.prepared), Path(args.dataset)
    n = sum(len(json.loads((folder / f"{d}_ids.json").read_text())) for d in ("sketches", "images"))
    arrays = min(epoch_from_arrays(folder, args.batch) for _ in range(args.repeats))
    files = min(epoch_from_files(folder, dataset, args.batch) for _ in range(args.repeats))
    print(f"epoch of {n} items (best of {args.repeats}):")
    print(f"  prepared uint8 arrays : {arrays:8.3f} s  ({n / arrays:,.0f} items/s)")
    print(f"  decoding image files  : {files:8.3f} s  ({n / files:,.0f} items/s)")
    print(f"  ratio                 : {files / arrays:8.1f}x faster from arrays")


if __name__ == "__main__":
    main()
