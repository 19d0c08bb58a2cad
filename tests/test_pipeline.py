"""The real `dvc repro` on a scratch git + DVC project holding this checkout's dvc.yaml, params.yaml and src/.

Small everywhere: 12 classes x 4 images x 4 sketches, tiny CNN, 32-px arrays, a few training iterations. The
project is built once per module (the same setup as conftest's `dvc_project`, at module scope) and every test that
changes it works on its own copy.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from helpers import (
    CLASSES,
    PER_CLASS,
    PIPELINE_OVERRIDES,
    REPO,
    VENV_BIN,
    class_files,
    dvc_env,
    new_unseen_class,
    write_tar,
)
from sempcyc.runtime.gallery_shards import load_gallery

pytestmark = pytest.mark.integration

TARGETS = ("gallery", "evaluate")
# one thread per process: tiny tensors, 2 shared cores (multi-threaded OpenBLAS is 200x slower on a busy box)
THREADS = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
STAGES_UP_TO_GALLERY = ("extract", "semantic", "prepare", "features", "train", "evaluate", "gallery")


def dvc(proj: Path, env: dict, *args: str, stdout_only: bool = False) -> str:
    proc = subprocess.run([str(VENV_BIN / "dvc"), *args], cwd=proj, env=env, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return proc.stdout if stdout_only else proc.stdout + proc.stderr


def dvc_json(proj: Path, env: dict, *args: str):
    """A `dvc ... --json` answer (stdout only: warnings about other stages' missing files go to stderr)."""
    return json.loads(dvc(proj, env, *args, "--json", stdout_only=True))


def git(proj: Path, env: dict, *args: str) -> None:
    subprocess.run(["git", *args], cwd=proj, env=env, check=True, capture_output=True)


def ran(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", output))


def skipped(output: str) -> set[str]:
    return set(re.findall(r"Stage '([^']+)' didn't change, skipping", output))


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def find_key(obj, key: str) -> list:
    """Every value stored under `key` anywhere in a JSON document."""
    found = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k == key:
                found.append(v)
            found += find_key(v, key)
    elif isinstance(obj, list):
        for v in obj:
            found += find_key(v, key)
    return found


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict, str]:
    """A scratch project (as conftest's dvc_project makes it) after `dvc repro gallery evaluate`."""
    base = tmp_path_factory.mktemp("pipeline")
    proj = base / "proj"
    proj.mkdir()
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(REPO / name, proj / name)
    shutil.copytree(REPO / "src", proj / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    env = dict(dvc_env(base), **THREADS)
    subprocess.run(["git", "init", "-q"], cwd=proj, check=True, env=env)
    subprocess.run([str(VENV_BIN / "dvc"), "init", "-q"], cwd=proj, check=True, env=env)

    params = yaml.safe_load((proj / "params.yaml").read_text())
    for section, values in PIPELINE_OVERRIDES.items():
        params.setdefault(section, {}).update(values)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (proj / "data").mkdir(exist_ok=True)
    write_tar(proj / "data/ds.tar", class_files({c: (PER_CLASS, PER_CLASS) for c in CLASSES}))
    # a first commit, as any clone has (DVCLive 3.49 cannot start in a repo without one: see test_stages)
    git(proj, env, "add", "-A")
    git(proj, env, "commit", "-qm", "pipeline and tiny dataset")
    output = dvc(proj, env, "repro", *TARGETS)
    return proj, env, output


@pytest.fixture
def project(built, tmp_path: Path) -> tuple[Path, dict]:
    """A private copy of the built project (git, DVC cache and outputs included)."""
    proj = tmp_path / "proj"
    shutil.copytree(built[0], proj, symlinks=True)
    return proj, dict(dvc_env(tmp_path), **THREADS)


def test_repro_builds_through_gallery_and_evaluate_then_skips(built):
    proj, env, first = built
    assert ran(first) == set(STAGES_UP_TO_GALLERY), first
    assert "demo-data" not in first  # data.tar points at our tar, so the demo dataset is never built
    for path in ("models/sem_pcyc.pt", "models/gallery/manifest.json",
                 "reports/eval/metrics.json", "reports/eval/retrieval_grid.png", "dvclive/metrics.json",
                 "data/prepared/train/sketches.npy", "dvc.lock"):
        assert (proj / path).is_file(), path
    metrics = json.loads((proj / "reports/eval/metrics.json").read_text())
    assert {"zero_shot", "generalised"} <= set(metrics)
    assert json.loads((proj / "models/gallery/manifest.json").read_text())["items"] == len(CLASSES) * PER_CLASS

    again = dvc(proj, env, "repro", *TARGETS)
    assert "Running stage" not in again, again
    assert skipped(again) == set(STAGES_UP_TO_GALLERY), again


def test_adding_an_unseen_class_keeps_features_and_train(project):
    proj, env = project
    extra = new_unseen_class(CLASSES)
    train_before = tree_digest(proj / "data/prepared/train")
    model_before = (proj / "models/sem_pcyc.pt").read_bytes()
    shards_before = shard_files(proj)
    write_tar(proj / "data/ds.tar", class_files({c: (PER_CLASS, PER_CLASS) for c in [*CLASSES, extra]}))

    output = dvc(proj, env, "repro", *TARGETS)
    assert {"extract", "semantic", "prepare", "evaluate", "gallery"} <= ran(output), output
    assert {"features", "train"} <= skipped(output), output
    assert not {"features", "train"} & ran(output), output
    assert tree_digest(proj / "data/prepared/train") == train_before
    assert (proj / "models/sem_pcyc.pt").read_bytes() == model_before

    assert extra in json.loads((proj / "data/prepared/splits.json").read_text())["test"]
    metrics = json.loads((proj / "reports/eval/metrics.json").read_text())
    assert metrics["counts"]["gallery_generalised"] == (len(CLASSES) + 1) * PER_CLASS
    # the gallery cache (persist: true) kept the old embeddings: only the new class's images were embedded
    assert f"({PER_CLASS} embedded, {len(CLASSES) * PER_CLASS} from cache)" in output, output
    # so did the evaluate cache: only the new class's images and (unseen query) sketches went through the networks
    # (the baselines' backbone also reads the new images' edge maps, for the photo-edge baseline)
    assert re.search(rf"test items \({2 * PER_CLASS} embedded, \d+ from cache; CNN passes: {3 * PER_CLASS} baseline "
                     rf"backbone, {2 * PER_CLASS} model extractor", output), output
    # and only the shard the new class hashes into is a new file
    _, _, index = load_gallery(proj / "models/gallery")
    assert sum(e["id"].startswith(f"{extra}/") for e in index) == PER_CLASS
    shards_after = shard_files(proj)
    assert len(set(shards_after) - set(shards_before)) == 1, (shards_before, shards_after)


def shard_files(proj: Path) -> list[str]:
    return [e["file"] for e in json.loads((proj / "models/gallery/manifest.json").read_text())["shards"]]


def test_exp_run_with_a_changed_train_param(project):
    """train.feature_whiten changes the served vector (the default trains no generators, so train.lr would not)."""
    proj, env = project
    git(proj, env, "add", "-A")
    git(proj, env, "commit", "-qm", "tiny pipeline")
    output = dvc(proj, env, "exp", "run", "-S", "train.feature_whiten=0.5", *TARGETS)
    assert {"train", "evaluate", "gallery"} <= ran(output), output
    assert {"extract", "semantic", "prepare", "features"} <= skipped(output), output

    shown = dvc_json(proj, env, "exp", "show")
    whiten = [p["data"]["train"]["feature_whiten"] for p in find_key(shown, "params.yaml")
              if "train" in p.get("data", {})]
    assert 0.5 in whiten and 0.25 in whiten, whiten
    evals = [m["data"] for m in find_key(shown, "reports/eval/metrics.json") if isinstance(m, dict) and "data" in m]
    assert evals and all({"zero_shot", "generalised"} <= set(m) for m in evals), evals
    assert all("map_all" in m["zero_shot"]["sem_pcyc"] for m in evals)

    metrics = dvc_json(proj, env, "metrics", "show")
    workspace = find_key(metrics, "reports/eval/metrics.json")
    assert any("zero_shot" in m.get("data", {}) for m in workspace), metrics


def test_plots_show_includes_dvclive_and_evaluate_plots(built):
    proj, env, _ = built
    plots = dvc_json(proj, env, "plots", "show")
    text = json.dumps(plots)
    # the default (embed_skip 1) trains no generators, so DVCLive has the served vector's val mAP, no losses
    for name in ("dvclive/plots/metrics/val/map_all.tsv",
                 "reports/eval/pr_curve.json", "reports/eval/per_class_ap.json"):
        assert name in text, name
