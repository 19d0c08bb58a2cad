"""Which stages write the same bytes on another machine: every stage from demo-data to gallery runs once here, then
again on identical inputs twice — here, and here emulating an older CPU (PyTorch's, MKL's and oneDNN's kernels
without AVX-512/AVX2, numpy's dispatch without AVX-512) — and its outputs are compared byte for byte. A stage whose
outputs differ on the emulated CPU rewrites dvc.lock (and reruns everything downstream) on such a machine.

Small settings (the tests' tiny pipeline, sempcyc.testing.tiny: 12 classes, tiny CNN, 32-px arrays; demo-data with 4
classes), so it runs in a few minutes; the kernels involved (convolution, matmul, Adam, layer norm) are the
production backbone's too.

Usage: python bench/determinism.py [--keep DIR]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from common import REPO
from sempcyc.testing.tiny import CLASSES, PER_CLASS, class_files, merged, tiny_params, write_tar

STAGES = ["demo-data", "extract", "semantic", "prepare", "features", "train", "evaluate", "gallery"]
OLDER_CPU = {"ATEN_CPU_CAPABILITY": "default", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "DNNL_MAX_CPU_ISA": "SSE41",
             "NPY_DISABLE_CPU_FEATURES": "AVX512F AVX512CD AVX512_SKX AVX512_CLX AVX512_CNL AVX512_ICL"}
DEMO = {"classes": 4, "images_per_class": 2, "sketches_per_class": 2, "size": 32, "seed": 0}


def stage_spec(name: str, params: dict) -> tuple[list[str], list[str]]:
    """(command, output paths) of a dvc.yaml stage, ${...} filled from params."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"][name]
    cmd = spec["cmd"].replace("${data.tar}", params["data"]["tar"])
    outs = []
    for key in ("outs", "metrics", "plots"):
        for item in spec.get(key, []):
            path = next(iter(item)) if isinstance(item, dict) else item
            if not (isinstance(item, dict) and item[path].get("persist")):
                outs.append(path)
    return cmd.split(), outs


def digest(root: Path, outs: list[str]) -> dict[str, str]:
    """sha256 of every output file (a folder: each file in it), by path."""
    found = {}
    for out in outs:
        path = root / out
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            if f.exists():
                found[str(f.relative_to(root))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return found


def run_stage(proj: Path, cmd: list[str], env: dict) -> None:
    exe = str(Path(sys.executable).parent / cmd[0])
    proc = subprocess.run([exe, *cmd[1:]], cwd=proj, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed in {proj}:\n{proc.stderr[-2000:]}")


def compare(base: Path, scratch: Path, name: str, params: dict, env: dict) -> list[str]:
    """Rerun stage `name` on a copy of `base` (identical inputs) with `env`; the outputs that differ."""
    if scratch.exists():
        shutil.rmtree(scratch)
    shutil.copytree(base, scratch, symlinks=True)
    cmd, outs = stage_spec(name, params)
    for out in outs:
        target = scratch / out
        shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    run_stage(scratch, cmd, env)
    want, got = digest(base, outs), digest(scratch, outs)
    return sorted(p for p in set(want) | set(got) if want.get(p) != got.get(p))


def verdict(differing: list[str]) -> str:
    """'same bytes', or how many output files differ and which (data files before metrics and plots)."""
    if not differing:
        return "same bytes"
    first = sorted(differing, key=lambda p: (p.endswith((".json", ".tsv")), p))
    return f"{len(differing)} file(s) differ: {', '.join(first[:4])}" + (" ..." if len(first) > 4 else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="sem-pcyc-determinism-"))
    base = root / "base"
    base.mkdir(parents=True, exist_ok=True)
    write_tar(base / "ds.tar", class_files({c: (PER_CLASS, PER_CLASS) for c in CLASSES}))
    params = merged(tiny_params(REPO / "params.yaml"), {"demo": DEMO})
    (base / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    for name in STAGES:
        run_stage(base, stage_spec(name, params)[0], env)
    print("stage      | rerun here | older CPU")
    for name in STAGES:
        here = compare(base, root / "scratch", name, params, env)
        older = compare(base, root / "scratch", name, params, dict(env, **OLDER_CPU))
        print(f"{name:10s} | {verdict(here)} | {verdict(older)}", flush=True)
    if not args.keep:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
