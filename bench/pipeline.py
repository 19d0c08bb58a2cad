"""Whole-pipeline timings on the demo, in a scratch clone of this repository:

1. `dvc repro` from nothing (every stage: demo-data ... serve-check, deploy with no targets), per-stage seconds;
2. three classes added that the hash split puts on the unseen side, `dvc repro` again: which stages ran, the
   time against the full run (adding zero-shot classes must not retrain), and what the evaluate and gallery
   caches spared (their count lines).

The stages run the clone's own code (PYTHONPATH), whichever checkout the environment's `sempcyc` was installed from.

Usage: python bench/pipeline.py [--keep DIR]     (about 10 minutes on 2 cores)
"""
from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from sempcyc import params as params_mod  # noqa: E402
from sempcyc.datasets.demo import DemoParams, EmojiClass, available_classes, build  # noqa: E402
from sempcyc.split import SplitSettings, hash_unit  # noqa: E402


def repro(proj: Path, env: dict) -> tuple[float, dict[str, float], list[str], list[str]]:
    """Run `dvc repro`, timing each stage from the moment DVC announces it: (seconds, per stage, stages in order,
    the cache count lines of evaluate and gallery)."""
    start = time.perf_counter()
    proc = subprocess.Popen([str(Path(sys.executable).parent / "dvc"), "repro"], cwd=proj, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stage_times, order, current, t_stage, counts = {}, [], None, start, []
    for line in proc.stdout:
        if re.match(r"(evaluate: \d+ test items|gallery: \d+ images) \(", line):
            counts.append(line.strip())
        match = re.match(r"Running stage '([^']+)'", line)
        if match:
            now = time.perf_counter()
            if current:
                stage_times[current] = now - t_stage
            current, t_stage = match.group(1), now
            order.append(current)
    proc.wait()
    end = time.perf_counter()
    if current:
        stage_times[current] = end - t_stage
    if proc.returncode != 0:
        raise SystemExit(f"dvc repro failed in {proj}")
    return end - start, stage_times, order, counts


def split_tar(big: bytes, base_names: set[str], keep: set[str]) -> tuple[bytes, bytes]:
    """Two tars from the demo tar `big`: its files of the classes in `base_names`, and of those in `keep`
    (files outside a class folder, e.g. ATTRIBUTION.md, go into both)."""
    base_tar, ext_tar = io.BytesIO(), io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(big)) as src, tarfile.open(fileobj=base_tar, mode="w") as b, \
            tarfile.open(fileobj=ext_tar, mode="w") as e:
        for member in src.getmembers():
            parts = member.name.split("/")
            cls = parts[2] if len(parts) > 3 else None
            data = src.extractfile(member).read()
            if cls is None or cls in base_names:
                b.addfile(member, io.BytesIO(data))
            if cls is None or cls in keep:
                e.addfile(member, io.BytesIO(data))
    return base_tar.getvalue(), ext_tar.getvalue()


def demo_tars(params_file: Path) -> tuple[bytes, bytes, DemoParams, list[EmojiClass]]:
    """(base tar, extended tar, demo params, added classes): base = the default demo; extended = the same files
    plus the next three catalogue classes that the hash split puts on the unseen side."""
    demo, split = params_mod.read(params_file, DemoParams, SplitSettings)
    catalogue = available_classes()
    base_names = {c.name for c in catalogue[:demo.classes]}
    extra = [c for c in catalogue[demo.classes:] if hash_unit(c.name, split.salt) < split.test_fraction][:3]
    big, _ = build(replace(demo, classes=catalogue.index(extra[-1]) + 1), progress=False)
    base_tar, ext_tar = split_tar(big, base_names, base_names | {c.name for c in extra})
    return base_tar, ext_tar, demo, extra


def print_full_run(full: float, stages: dict[str, float], classes: int) -> None:
    print(f"full dvc repro on the demo ({classes} classes): {full:.0f} s")
    for name, seconds in stages.items():
        print(f"  {name:12s} {seconds:7.1f} s")
    through_gallery = sum(v for k, v in stages.items() if k not in ("archive", "serve-check", "deploy"))
    print(f"  through gallery: {through_gallery:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", help="run in this folder and keep it (default: a temporary folder)")
    args = parser.parse_args()

    work = Path(args.keep or tempfile.mkdtemp(prefix="sem-pcyc-bench-"))
    proj = work / "proj"
    if proj.exists():
        shutil.rmtree(proj)
    subprocess.run(["git", "clone", "-q", str(REPO), str(proj)], check=True)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               DVC_NO_ANALYTICS="1", PYTHONPATH=str(proj / "src"))
    base_tar, ext_tar, demo, extra = demo_tars(proj / "params.yaml")
    (proj / "data").mkdir(exist_ok=True)
    (proj / "data/bench.tar").write_bytes(base_tar)
    text = (proj / "params.yaml").read_text().replace("tar: data/demo.tar", "tar: data/bench.tar")
    (proj / "params.yaml").write_text(text)

    full, stages, _, _ = repro(proj, env)
    print_full_run(full, stages, demo.classes)

    (proj / "data/bench.tar").write_bytes(ext_tar)
    again, again_stages, order, counts = repro(proj, env)
    print(f"after adding {', '.join(c.name for c in extra)} (unseen side): {again:.0f} s "
          f"= {100 * again / full:.0f} % of the full run")
    print(f"  stages that ran: {', '.join(f'{s} {again_stages[s]:.1f} s' for s in order)}")
    for line in counts:
        print(f"  {line}")
    print(f"  train reran: {'train' in order}; features reran: {'features' in order}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
