"""Shared test helpers (plain functions and constants; fixtures live in conftest.py): tiny datasets built in the
test, params files, and running the CLI the way dvc.yaml does. The tiny dataset and pipeline settings themselves
are sempcyc.testing.tiny's (the benches use them too); they are re-exported here."""
from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from threadpoolctl import threadpool_limits

from sempcyc import cli
from sempcyc.params import read_section
from sempcyc.runtime.backbones import build_backbone, frozen_activations
from sempcyc.serving import ReleaseSettings, ServeSettings
from sempcyc.split import hash_unit
from sempcyc.stages import archive
from sempcyc.testing.tiny import CLASSES, PER_CLASS, SALT, TEST_FRACTION, class_files, merged, tiny_params, write_tar
from sempcyc.testing.tiny import png_bytes as png_bytes  # re-exported for the test modules
from sempcyc.testing.tiny import sketch_box as sketch_box

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

# The model tests' SEM-PCYC (test_model, test_encoder): small dimensions (features, semantics, embedding, classes,
# batch), so every test runs in milliseconds.
FEAT, SEM, DIM, N_CLS, BATCH = 16, 12, 8, 5, 8

# The tiny pipeline as overrides of the repository's params.yaml, for tests that run the real `dvc repro`.
PIPELINE_OVERRIDES = {
    "data": {"tar": "data/ds.tar"},
    "split": {"test_fraction": TEST_FRACTION, "salt": SALT, "val_fraction": 0.15, "test_classes_file": ""},
    "prepare": {"size": 32},
    "model": {"backbone": "tiny", "dim_out": 16},
    "features": {"tune_blocks": 2, "tune_epochs": 1, "batch_size": 8},  # the default way: shared tuned blocks
    "train": {"device": "cpu", "epochs": 2, "iters_per_epoch": 3, "batch_size": 8, "feature_dim": 8},
    "evaluate": {"grid_queries": 3},
    "gallery": {"batch_size": 16},
}


@contextlib.contextmanager
def one_thread():
    """torch and the BLAS/OpenMP pools on one thread for the block, then as they were."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(before)


def repo_params() -> dict:
    """The repository's params.yaml: every section, every key."""
    return yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))


def run_cli(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run the installed `sempcyc` console command the way dvc.yaml does."""
    env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run([str(VENV_BIN / "sempcyc"), *args], cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"sempcyc {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def dvc_env(tmp_path: Path) -> dict[str, str]:
    return dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", DVC_NO_ANALYTICS="1",
                DVC_SITE_CACHE_DIR=str(tmp_path / "dvc-site-cache"), GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t",
                GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")


PARAMS = tiny_params(REPO / "params.yaml")


def write_params(folder: Path, overrides: dict | None = None, name: str = "params.yaml") -> Path:
    """A complete params file: the tiny pipeline's params with `overrides` merged in."""
    path = folder / name
    path.write_text(yaml.safe_dump(merged(PARAMS, overrides or {}), sort_keys=False), encoding="utf-8")
    return path


def call(cwd: Path, *argv) -> tuple[int, str, str]:
    """`sempcyc <argv>` in this process, in `cwd`: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    before = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli.main([str(a) for a in argv])
    finally:
        os.chdir(before)
    return rc, out.getvalue(), err.getvalue()


def ok(cwd: Path, *argv) -> str:
    rc, out, err = call(cwd, *argv)
    assert rc == 0, f"sempcyc {' '.join(map(str, argv))} -> {rc}\n{out}\n{err}"
    return out


def one_line_error(rc: int, err: str, stage: str) -> str:
    """The stage failed the way a user error should: exit 1 and exactly one line, no traceback."""
    assert rc == 1, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"sempcyc {stage}: error: "), err
    return lines[0]


def new_unseen_class(taken: list[str]) -> str:
    """A new class name the hash split puts on the unseen side, drawn differently from every taken class."""
    sums = {sum(map(ord, c)) for c in taken}
    for name in ("jeep", "nose", "star", "lamp", "tulip", "zebra", "violin", "anchor", "bucket", "candle"):
        if name not in taken and sum(map(ord, name)) not in sums and hash_unit(name, SALT) < TEST_FRACTION:
            return name
    raise AssertionError("no candidate class lands on the unseen side")


def build_tiny_model(root: Path, params: dict) -> tuple[Path, Path]:
    """The tiny pipeline up to the gallery, in this process, in `root` (ds.tar of CLASSES and `params` written
    there): extract -> semantic -> prepare -> features -> train -> gallery. (model bundle, gallery folder)."""
    write_tar(root / "ds.tar", class_files({c: (PER_CLASS, PER_CLASS) for c in CLASSES}))
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    for name in ("extract", "semantic", "prepare", "features", "train", "gallery"):
        ok(root, name)
    return root / "models/sem_pcyc.pt", root / "models/gallery"


def build_tiny_archive(model: Path, gallery: Path, out: Path, params: dict, metrics: Path | None = None) -> Path:
    """The archive stage's .mar of `model` and `gallery`, with the release and serve sections of `params`."""
    return archive.build_archive(model, gallery, out, read_section(params, ReleaseSettings),
                                 read_section(params, ServeSettings), metrics)


# ------------------------------------------------------------- shared by the stage tests (features ... gallery)

def bundle_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(bundle_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(bundle_equal(x, y) for x, y in zip(a, b))
    return a == b


def evaluate_counts(out: str) -> dict:
    """evaluate's printed counts: items, embedded, backbone and extractor passes, and the shared domains."""
    match = re.search(r"(\d+) test items \((\d+) embedded, (\d+) from cache; CNN passes: (\d+) baseline backbone, "
                      r"(\d+) model extractor; extractor is the backbone for: ([a-z, ]+)\)", out)
    assert match, out
    items, embedded, cached, backbone, extractor = (int(g) for g in match.groups()[:5])
    assert embedded + cached == items, out
    return {"items": items, "embedded": embedded, "backbone": backbone, "extractor": extractor,
            "shared": match.group(6)}


def train_args(trained: Path, folder: Path) -> list:
    return ["train", "--features", trained / "models/features", "--train", trained / "data/prepared/train",
            "--out", folder / "model.pt", "--live-dir", folder / "live", "--checkpoint", folder / "ckpt.pt"]


def configured(model: Path, out: Path, **config) -> Path:
    """A copy of the model bundle `model` at `out` with `config` fields (model.Config) changed."""
    bundle = torch.load(model, map_location="cpu", weights_only=True)
    torch.save({**bundle, "config": {**bundle["config"], **config}}, out)
    return out


def evaluate_in(folder: Path, model: Path, test: Path, out: str, cache: str) -> dict:
    return evaluate_counts(ok(folder, "evaluate", "--model", model, "--test", test, "--out", out, "--cache", cache))


def tuning_inputs(items: int, blocks: int):
    """The features stage's tuning inputs at test size: the ImageNet EfficientNet-Lite0 (head-less) and its frozen
    part's activations of `items` random 32-px images, the even ones as sketches, the odd ones as photos."""
    torch.manual_seed(0)
    backbone = build_backbone("efficientnet_lite0_headless").eval()
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, size=(items, 3, 32, 32), dtype=np.uint8)).float()
    with torch.no_grad():
        acts = {key: frozen_activations(backbone, images[i::2], blocks).half() for i, key in
                enumerate(("sketches", "images"))}
    return backbone, acts

