"""demo-data stage: render the built-in demo dataset (datasets/demo.py) into one tar, byte-identical for the same
params, so the whole pipeline runs end to end with nothing to download."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from .. import params as params_mod
from ..datasets.demo import DemoParams, build
from ..errors import UserError
from ..fsutil import atomic_write_bytes

DEFAULT_OUT = "data/demo.tar"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=DEFAULT_OUT, help="tar to write (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=None,
                        help="render processes (default: the number of CPUs); the output does not depend on it")


def read_params(path: str | Path) -> DemoParams:
    return params_mod.read(path, DemoParams)[0]


def run(args: argparse.Namespace) -> None:
    started = time.monotonic()
    params_path = args.params
    out = Path(args.out)
    workers = args.workers
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    params = read_params(params_path)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give the path of the tar file to write")
    data, chosen = build(params, workers=workers)
    atomic_write_bytes(out, data)
    n_images, n_sketches = len(chosen) * params.images_per_class, len(chosen) * params.sketches_per_class
    print(f"demo-data: wrote {out} ({len(chosen)} classes, {n_images} images, {n_sketches} sketches, "
          f"{params.size}px, {len(data) / 1e6:.1f} MB) in {time.monotonic() - started:.1f}s")
