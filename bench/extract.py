"""The extract stage on the same dataset as a plain .tar and as a .tar.gz: a compressed tar must not cost more
than about twice the plain one (a backward seek in a gzip stream restarts decompression from byte 0).

The tar is deterministic: --classes x (--images + --sketches) small PNGs, in the order `tar -c` of a folder
gives on most file systems (directory order, not name order; --order sorted stores them sorted by name).

Usage: python bench/extract.py [--classes 50] [--images 20] [--sketches 20] [--order readdir] [--repeats 3]
"""
from __future__ import annotations

import argparse
import gzip
import io
import random
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from sempcyc import params  # noqa: E402
from sempcyc.stages import extract

ROOT = Path(__file__).resolve().parents[1]
DATA = params.read(ROOT / "params.yaml", extract.DataSettings)[0]  # the repository's folders and caps


def png(seed: int, size: int = 32) -> bytes:
    rng = random.Random(seed)
    img = Image.new("L", (size, size), 255)
    box = sorted(rng.sample(range(2, size - 2), 2)) + sorted(rng.sample(range(2, size - 2), 2))
    ImageDraw.Draw(img).ellipse([box[0], box[2], box[1], box[3]], outline=0, width=2)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def tree(args) -> dict:
    """{folder: [entries]} for ds/<domain>/<class>/<file>; an entry is a sub-folder name or (file, bytes)."""
    counts = {"images": args.images, "sketches": args.sketches}
    folders = {"ds": list(DATA.folders.values())}
    for domain, n in counts.items():
        folders[f"ds/{domain}"] = [f"class_{c:03d}" for c in range(args.classes)]
        for c in range(args.classes):
            seed = (c * 1000 + n) * (2 if domain == "images" else 3)
            folders[f"ds/{domain}/class_{c:03d}"] = [(f"{i:04d}.png", png(seed + i)) for i in range(n)]
    return folders


def write_tar(path: Path, folders: dict, order: str) -> None:
    """Walk the tree like `tar -c` does; in readdir order each folder's entries come in a fixed shuffled order."""
    rng = random.Random(0)

    def walk(tar: tarfile.TarFile, folder: str) -> None:
        info = tarfile.TarInfo(folder)
        info.type, info.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(info)
        entries = sorted(folders[folder], key=lambda e: e if isinstance(e, str) else e[0])
        if order == "readdir":
            rng.shuffle(entries)
        for entry in entries:
            if isinstance(entry, str):
                walk(tar, f"{folder}/{entry}")
            else:
                info = tarfile.TarInfo(f"{folder}/{entry[0]}")
                info.size, info.mode = len(entry[1]), 0o644
                tar.addfile(info, io.BytesIO(entry[1]))

    with tarfile.open(path, "w") as tar:
        walk(tar, "ds")


def timed(tar: Path, out: Path, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        extract.extract(tar, out, DATA)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=50)
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--sketches", type=int, default=20)
    parser.add_argument("--order", choices=("readdir", "sorted"), default="readdir")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-extract-") as tmp:
        plain, packed = Path(tmp) / "d.tar", Path(tmp) / "d.tar.gz"
        write_tar(plain, tree(args), args.order)
        packed.write_bytes(gzip.compress(plain.read_bytes(), mtime=0))
        files = args.classes * (args.images + args.sketches)
        print(f"{files} PNG members ({args.order} order): .tar {plain.stat().st_size / 1e6:.1f} MB, "
              f".tar.gz {packed.stat().st_size / 1e6:.1f} MB; best of {args.repeats}")
        t_plain = timed(plain, Path(tmp) / "out", args.repeats)
        t_packed = timed(packed, Path(tmp) / "out", args.repeats)
        print(f"  extract .tar    {t_plain:7.2f} s")
        print(f"  extract .tar.gz {t_packed:7.2f} s   ratio {t_packed / t_plain:5.2f}x (goal <= 2x)")


if __name__ == "__main__":
    main()
