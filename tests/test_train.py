"""The train stage on a tiny dataset (tiny CNN, 32-px arrays, a few iterations).

The inputs are the session's tiny model project (conftest.py: the real extract -> semantic (MiniLM) -> prepare ->
features -> train -> gallery, built once), read as `prepared` and `trained`; every test writes its own outputs
under tmp_path. Stages run in-process through `sempcyc.cli.main` (fast: torch is imported once) except where a
real process matters: DDP under torchrun.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from helpers import (
    PARAMS,
    VENV_BIN,
    bundle_equal,
    call,
    dvc_env,
    evaluate_in,
    ok,
    one_line_error,
    train_args,
    write_params,
)
from sempcyc.runtime.encoder import SAME_EXTRACTOR, Encoder
from sempcyc.stages import evaluate as evaluate_mod
from sempcyc.stages import train as train_mod

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LOSSES = {"ae", "gen", "gen_adv", "gen_cyc", "gen_cls", "gen_reg", "gen_code", "disc", "disc_se", "disc_sk", "disc_im"}


# ------------------------------------------------------------------------------------------------- helpers

def tsv_rows(path: Path) -> list[list[str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0].split("\t")[0] == "step"
    return [line.split("\t") for line in lines[1:]]


# ------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def interrupted(trained: Path, tmp_path_factory) -> Path:
    """A checkpoint left by a run of 4 epochs interrupted (Ctrl-C) during epoch 3: it holds epochs 1-2."""
    folder = tmp_path_factory.mktemp("interrupted")
    write_params(folder, {"train": {"epochs": 4}})
    real, calls = train_mod.validation_map, []

    def validation_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_mod, "validation_map", validation_then_interrupt)
        rc, out, err = call(folder, "train", "--features", trained / "models/features",
                            "--train", trained / "data/prepared/train", "--out", "model.pt",
                            "--live-dir", "live", "--checkpoint", "ckpt.pt")
    assert rc == 130, out + err
    assert "interrupted" in err
    assert "train: epoch 2:" in out and "train: epoch 3:" not in out
    assert (folder / "ckpt.pt").is_file()
    assert not (folder / "model.pt").exists()
    return folder / "ckpt.pt"


# --------------------------------------------------------------------------------------------------- train

def test_train_writes_a_loadable_bundle_and_dvclive_logs(trained: Path):
    enc = Encoder.load(trained / "models/sem_pcyc.pt")
    assert enc.size == 32 and enc.meta["backbone"] == "tiny"
    with torch.inference_mode():
        sk = enc.embed_sketches(torch.full((2, 32, 32), 255, dtype=torch.uint8))
        im = enc.embed_images(torch.zeros((3, 32, 32, 3), dtype=torch.uint8))
    assert sk.shape == (2, PARAMS["model"]["dim_out"]) and im.shape == (3, PARAMS["model"]["dim_out"])
    assert torch.isfinite(sk).all() and torch.isfinite(im).all()
    assert not (trained / "models/train-checkpoint.pt").exists()  # removed once the run finished

    live = trained / "dvclive"
    epochs = PARAMS["train"]["epochs"]
    metrics = json.loads((live / "metrics.json").read_text())
    assert metrics["epochs_run"] == epochs
    assert "map_all" in metrics["val"] and "gen" in metrics["train"]  # last value of every logged metric too
    assert 1 <= metrics["best_epoch"] <= epochs and 0.0 <= metrics["val_map_all_best"] <= 1.0
    plots = live / "plots/metrics"
    for loss in LOSSES:
        rows = tsv_rows(plots / "train" / f"{loss}.tsv")
        assert [int(r[0]) for r in rows] == list(range(epochs)), loss
        assert all(np.isfinite(float(r[1])) for r in rows), loss
    val = tsv_rows(plots / "val/map_all.tsv")
    assert [int(r[0]) for r in val] == list(range(epochs))
    assert max(float(r[1]) for r in val) == pytest.approx(metrics["val_map_all_best"])


def test_train_is_seedable(trained: Path, tmp_path: Path):
    write_params(tmp_path)
    ok(tmp_path, *train_args(trained, tmp_path))
    first = torch.load(trained / "models/sem_pcyc.pt", map_location="cpu", weights_only=True)
    second = torch.load(tmp_path / "model.pt", map_location="cpu", weights_only=True)
    assert bundle_equal(first, second)


def test_train_fits_the_seen_class_posterior_on_every_training_class(trained: Path, tmp_path: Path):
    """With posterior_weight > 0 the bundle carries a classifier over the fit and the validation classes, and
    every embedding ends with sqrt(w) x its class probabilities."""
    write_params(tmp_path, {"model": {"overrides": {"posterior_weight": 4.0}}})
    ok(tmp_path, *train_args(trained, tmp_path))
    bundle = torch.load(tmp_path / "model.pt", map_location="cpu", weights_only=True)
    classes = json.loads((trained / "data/prepared/train/classes.json").read_text())
    meta = bundle["meta"]
    assert meta["posterior_classes"] == meta["trained_classes"] + meta["validation_classes"]
    assert sorted(meta["posterior_classes"]) == sorted(classes) and meta["validation_classes"]
    assert bundle["posterior"]["linear.weight"].shape[0] == len(classes)
    enc = Encoder.load(tmp_path / "model.pt")
    with torch.inference_mode():
        sk = enc.embed_sketches(torch.full((2, 32, 32), 255, dtype=torch.uint8))
    assert sk.shape == (2, PARAMS["model"]["dim_out"] + len(classes))
    assert torch.allclose(sk[:, -len(classes):].sum(1), torch.full((2,), 2.0))  # sqrt(4) x probabilities
    without = torch.load(trained / "models/sem_pcyc.pt", map_location="cpu", weights_only=True)
    assert "posterior" not in without and without["meta"]["posterior_classes"] == []  # weight 0: no head


def test_partial_whitening_interpolates_between_the_features_and_their_whitening():
    rng = np.random.default_rng(0)
    feats = (rng.standard_normal((2000, 5)) @ np.diag([10.0, 3.0, 1.0, 0.5, 0.1]) @ np.linalg.qr(
        rng.standard_normal((5, 5)))[0] + 7.0).astype(np.float32)
    centred = feats - feats.mean(0)
    assert np.allclose(train_mod.partial_whitening(feats, None, 0.0), np.eye(5), atol=1e-6)
    full = centred @ train_mod.partial_whitening(feats, None, 1.0)
    assert np.allclose(np.cov(full.T), np.eye(5), atol=1e-3)                 # alpha 1: whitened
    half = np.linalg.eigvalsh(np.cov((centred @ train_mod.partial_whitening(feats, None, 0.5)).T))
    assert np.allclose(half, np.sqrt(np.linalg.eigvalsh(np.cov(centred.T))), rtol=1e-3)  # the spread's square root
    basis = np.linalg.qr(rng.standard_normal((5, 3)))[0].astype(np.float32)
    assert np.allclose(train_mod.partial_whitening(feats, basis, 0.0), basis, atol=1e-6)
    assert np.allclose(np.cov((centred @ train_mod.partial_whitening(feats, basis, 1.0)).T), np.eye(3), atol=1e-3)


def test_whitened_features_are_served_as_they_were_trained(trained: Path, tmp_path: Path):
    """train.feature_whiten: each domain gets its own whitening, stored in the bundle; the Encoder normalises a
    training feature exactly as training did."""
    write_params(tmp_path, {"train": {"feature_norm": "centre", "feature_whiten": 0.5}})
    ok(tmp_path, *train_args(trained, tmp_path))
    enc = Encoder.load(tmp_path / "model.pt")
    assert enc.meta["feature_pca_dim"] == enc.meta["feat_dim"]
    assert not torch.allclose(enc.sketch_norm.basis, enc.image_norm.basis)  # one whitening per domain
    run = train_mod.read_settings(yaml.safe_load((tmp_path / "params.yaml").read_text()))
    data = train_mod.load_training_data(trained / "models/features", trained / "data/prepared/train", run)
    raw = torch.from_numpy(np.load(trained / "models/features/train_sketches.npy")[:4])
    with torch.no_grad():
        np.testing.assert_allclose(enc.sketch_norm(raw).numpy(), data["norms"]["sketch"](raw).numpy(), atol=1e-5)
    assert np.allclose(np.linalg.norm(enc.sketch_norm(raw).numpy(), axis=1), enc.meta["feat_dim"] ** 0.5)
    # evaluate's model-input baseline reads the backbone's features through these very normalisations
    rng = np.random.default_rng(0)
    feats = {k: rng.normal(size=(n, enc.meta["feat_dim"])).astype(np.float32) for k, n in
             (("q", 3), ("s", 0), ("g", 4), ("ge", 4))}
    bundle = torch.load(tmp_path / "model.pt", weights_only=True)
    assert evaluate_mod.input_norms(bundle, enc) is None  # fine-tuned extractors: no such baseline
    model_input = evaluate_mod.model_inputs({"sketch": enc.sketch_norm, "image": enc.image_norm}, enc.photo_edges,
                                            feats)
    with torch.no_grad():
        photos = torch.from_numpy((feats["g"] + feats["ge"]) / 2 if enc.photo_edges else feats["g"])
        np.testing.assert_allclose(model_input["g"], enc.image_norm(photos).numpy(), atol=1e-6)
        np.testing.assert_allclose(model_input["q"], enc.sketch_norm(torch.from_numpy(feats["q"])).numpy(), atol=1e-6)
    assert model_input["s"].shape[0] == 0


def test_tuned_blocks_make_one_served_extractor_and_keep_the_untuned_baseline(trained: Path, tmp_path: Path):
    """The bundle stores the tuned extractor once for both domains; evaluate's model-input baseline reads the
    untuned backbone through the normalisation fitted on its own training features, not the model's."""
    write_params(tmp_path, {"features": {"epochs": 0, "tune_blocks": 2, "tune_epochs": 1},
                            "train": {"feature_norm": "centre", "feature_whiten": 0.25}})
    train_dir = trained / "data/prepared/train"
    ok(tmp_path, "features", "--train", train_dir, "--out", "feat")
    ok(tmp_path, "train", "--features", "feat", "--train", train_dir, "--out", "m.pt", "--live-dir", "live",
       "--checkpoint", "ckpt.pt")
    assert torch.load(tmp_path / "m.pt", weights_only=True)["image_extractor"] == SAME_EXTRACTOR
    enc = Encoder.load(tmp_path / "m.pt")
    norms = evaluate_mod.input_norms(torch.load(tmp_path / "m.pt", weights_only=True), enc)
    data = train_mod.load_training_data(tmp_path / "feat", train_dir, train_mod.read_settings(
        yaml.safe_load((tmp_path / "params.yaml").read_text())))
    raw = torch.from_numpy(np.load(tmp_path / "feat/backbone_sketches.npy")[:4])
    with torch.no_grad():
        np.testing.assert_allclose(norms["sketch"](raw), data["baseline_norms"]["sketch"](raw), atol=1e-5)
        assert not torch.allclose(norms["sketch"](raw), enc.sketch_norm(raw), atol=1e-3)
    counts = evaluate_in(tmp_path, tmp_path / "m.pt", trained / "data/prepared/test", "eval", "cache")
    assert counts["shared"] == "none"  # the tuned extractor is not the baselines' backbone
    report = json.loads((tmp_path / "eval/metrics.json").read_text())
    assert report["zero_shot"]["pretrained_model_input"] != report["zero_shot"]["pretrained_centred_edges"]


@pytest.mark.parametrize("overrides, names", [
    ({"train": {"lr": 0}}, ["train.lr"]),
    ({"train": {"lr": -1}}, ["train.lr"]),
    ({"model": {"dim_out": 0}}, ["model.dim_out"]),
    ({"train": {"batch_size": 1000}}, ["train.batch_size"]),
    ({"model": {"overrides": {"lambda_nope": 1.0}}}, ["model.overrides", "lambda_nope"]),
    ({"model": {"preset": "nope"}}, ["model.preset"]),
    ({"model": {"overrides": {"posterior_temperature": 0.0}}}, ["model.overrides.posterior_temperature"]),
    ({"model": {"overrides": {"embed_skip": 1.5}}}, ["model.overrides.embed_skip", "between 0 and 1"]),
    ({"model": {"overrides": {"posterior_weight": -1.0}}}, ["model.overrides.posterior_weight"]),
    ({"model": {"overrides": {"query_expansion": -2}}}, ["model.overrides.query_expansion"]),
    ({"model": {"overrides": {"gallery_expansion": -1}}}, ["model.overrides.gallery_expansion"]),
    ({"model": {"overrides": {"gallery_expansion": 2.5}}}, ["model.overrides.gallery_expansion", "must be int"]),
    ({"train": {"feature_whiten": 0.25}}, ["train.feature_whiten", "train.feature_norm: centre"]),
    ({"train": {"feature_norm": "centre", "feature_whiten": 1.5}}, ["train.feature_whiten"]),
], ids=["lr-zero", "lr-negative", "dim-out-zero", "batch-too-large", "unknown-override", "unknown-preset",
        "posterior-temperature-zero", "embed-skip-above-one", "posterior-weight-negative", "query-expansion-negative",
        "gallery-expansion-negative", "gallery-expansion-not-int", "whiten-without-centring", "whiten-above-one"])
def test_train_bad_params_give_one_line_errors(trained: Path, tmp_path: Path, overrides, names):
    write_params(tmp_path, overrides)
    rc, _, err = call(tmp_path, *train_args(trained, tmp_path))
    line = one_line_error(rc, err, "train")
    for name in names:
        assert name in line
    assert not (tmp_path / "model.pt").exists()
    assert not (tmp_path / "ckpt.pt").exists()


@pytest.mark.parametrize("stage", ["features", "train"])
def test_unknown_device_names_the_param(trained: Path, tmp_path: Path, stage: str):
    write_params(tmp_path, {"train": {"device": "gpu"}})
    argv = (["features", "--train", trained / "data/prepared/train", "--out", "feat"] if stage == "features"
            else train_args(trained, tmp_path))
    rc, _, err = call(tmp_path, *argv)
    assert "train.device" in one_line_error(rc, err, stage)


def test_no_validation_classes_trains_every_epoch_and_keeps_the_last(prepared: Path, tmp_path: Path):
    """split.val_fraction 0: nothing to stop early on, so every epoch counts as the best and the last is kept."""
    write_params(tmp_path, {"split": {"val_fraction": 0.0}})
    ok(tmp_path, "features", "--train", prepared / "data/prepared/train", "--out", "feat")
    assert json.loads((tmp_path / "feat/meta.json").read_text())["validation_classes"] == []
    argv = train_args(prepared, tmp_path)
    argv[argv.index(prepared / "models/features")] = tmp_path / "feat"
    ok(tmp_path, *argv)
    meta = Encoder.load(tmp_path / "model.pt").meta
    assert meta["validation_classes"] == [] and meta["best_epoch"] == PARAMS["train"]["epochs"]
    assert len(meta["trained_classes"]) == len(json.loads((prepared / "data/prepared/train/classes.json").read_text()))


def test_train_in_a_git_repo_without_commits(trained: Path, tmp_path: Path):
    env = dvc_env(tmp_path)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, env=env, check=True)
    subprocess.run([str(VENV_BIN / "dvc"), "init", "-q"], cwd=tmp_path, env=env, check=True)
    write_params(tmp_path)
    ok(tmp_path, *train_args(trained, tmp_path))
    assert Encoder.load(tmp_path / "model.pt").meta["backbone"] == "tiny"


# -------------------------------------------------------------------------------------------------- resume

def test_interrupted_run_resumes_automatically(trained: Path, interrupted: Path, tmp_path: Path):
    """Same params, same --checkpoint path: the run picks the checkpoint up and continues from epoch 3."""
    shutil.copy(interrupted, tmp_path / "ckpt.pt")
    shutil.copytree(interrupted.parent / "live", tmp_path / "live")
    write_params(tmp_path, {"train": {"epochs": 4}})
    out = ok(tmp_path, *train_args(trained, tmp_path))
    assert "resuming" in out and "after epoch 2" in out
    assert "train: epoch 1:" not in out and "train: epoch 2:" not in out
    assert "train: epoch 3:" in out and "train: epoch 4:" in out
    assert Encoder.load(tmp_path / "model.pt").meta["backbone"] == "tiny"
    assert not (tmp_path / "ckpt.pt").exists()
    # DVCLive continued the interrupted run's steps instead of starting over
    assert [int(r[0]) for r in tsv_rows(tmp_path / "live/plots/metrics/val/map_all.tsv")] == [0, 1, 2, 3]
    assert json.loads((tmp_path / "live/metrics.json").read_text())["epochs_run"] == 4


def test_resume_flag_continues_with_more_epochs(trained: Path, interrupted: Path, tmp_path: Path):
    write_params(tmp_path, {"train": {"epochs": 5}})
    # without --resume, a checkpoint made with other params is not used
    shutil.copy(interrupted, tmp_path / "ckpt.pt")
    out = ok(tmp_path, *train_args(trained, tmp_path / "fresh")[:-2], "--checkpoint", tmp_path / "ckpt.pt")
    assert "starting fresh" in out and "resuming" not in out and "train: epoch 1:" in out

    out = ok(tmp_path, *train_args(trained, tmp_path), "--resume", interrupted)
    assert "resuming" in out and "after epoch 2" in out
    assert "train: epoch 2:" not in out
    assert all(f"train: epoch {e}:" in out for e in (3, 4, 5))
    assert Encoder.load(tmp_path / "model.pt").meta["best_epoch"] in range(1, 6)


def test_resume_from_another_architecture_is_refused(trained: Path, interrupted: Path, tmp_path: Path):
    write_params(tmp_path, {"model": {"dim_out": 8}})
    rc, out, err = call(tmp_path, *train_args(trained, tmp_path), "--resume", interrupted)
    line = one_line_error(rc, err, "train")
    assert str(interrupted) in line and "dim_out" in line
    assert not (tmp_path / "model.pt").exists()
    assert interrupted.is_file()


# ----------------------------------------------------------------------------------------------------- DDP

def test_torchrun_ddp_on_cpu(trained: Path, tmp_path: Path):
    params = write_params(tmp_path)
    env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1")
    cmd = [str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "sempcyc.cli",
           "--params", str(params), *map(str, train_args(trained, tmp_path))]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    enc = Encoder.load(tmp_path / "model.pt")
    with torch.inference_mode():
        assert enc.embed_sketches(torch.zeros((1, 32, 32), dtype=torch.uint8)).shape == (1, 16)
    # rank 0 alone logs: one line per epoch, one DVCLive row per epoch
    epochs = PARAMS["train"]["epochs"]
    assert proc.stdout.count("train: epoch 1:") == 1
    assert [int(r[0]) for r in tsv_rows(tmp_path / "live/plots/metrics/val/map_all.tsv")] == list(range(epochs))
    assert json.loads((tmp_path / "live/metrics.json").read_text())["epochs_run"] == epochs
    assert yaml.safe_load((tmp_path / "live/params.yaml").read_text())["world_size"] == 2
    assert not (tmp_path / "ckpt.pt").exists()
