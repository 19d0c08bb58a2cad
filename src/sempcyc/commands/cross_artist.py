"""cross-artist command: render the cross-artist benchmark (datasets/cross_artist.py) into one tar.

Not a dvc.yaml stage (the default pipeline must not need npm): build it by hand and point `data.tar` at it.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from .. import params as params_mod
from ..datasets import iconify
from ..datasets.cross_artist import PAIRINGS, TOP_FOLDER, CrossArtistParams, CrossClass, build, load_art_sets
from ..errors import UserError
from ..fsutil import atomic_write_bytes

DEFAULT_OUT = "data/cross-artist.tar"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=DEFAULT_OUT, help="tar to write (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=None,
                        help="render processes (default: the number of CPUs); the output does not depend on it")
    parser.add_argument("--packages", default=iconify.PACKAGES_DIR,
                        help="folder of the fetched Iconify sets (default: %(default)s, filled by "
                             f"`{iconify.FETCH_COMMAND}`)")
    parser.add_argument("--pins", default=iconify.PINS_FILE,
                        help="the pinned versions and integrities of the Iconify sets (default: %(default)s)")


def summary(out: Path, params: CrossArtistParams, chosen: list[CrossClass], left_out: list[dict], size_bytes: int,
            seconds: float) -> list[str]:
    by_pairing = {p.name: sum(c.pairing == p.name for c in chosen) for p in PAIRINGS}
    lines = [f"cross-artist: wrote {out} ({len(chosen)} classes: "
             + ", ".join(f"{n} {name}" for name, n in by_pairing.items())
             + f"; {len(chosen) * params.images_per_class} images, {len(chosen) * params.sketches_per_class} "
             f"sketches, {params.size}px, {size_bytes / 1e6:.1f} MB) in {seconds:.1f}s"]
    if left_out:
        first = ", ".join(c["name"] for c in left_out[:5])
        lines.append(f"cross-artist: left out {len(left_out)} catalogue emoji that two artists do not both draw: "
                     f"{first}{', ...' if len(left_out) > 5 else ''} (all in {TOP_FOLDER}/SOURCES.json)")
    return lines


def run(args: argparse.Namespace) -> None:
    started = time.monotonic()
    out = Path(args.out)
    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    params = params_mod.read(args.params, CrossArtistParams)[0]
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give the path of the tar file to write")
    art_sets = load_art_sets(args.packages, args.pins)
    data, chosen, left_out = build(params, art_sets, workers=args.workers)
    atomic_write_bytes(out, data)
    for line in summary(out, params, chosen, left_out, len(data), time.monotonic() - started):
        print(line)
