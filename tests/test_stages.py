"""features, train, evaluate and gallery stages on a tiny dataset (tiny CNN, 32-px arrays, a few iterations).

The inputs come from the real extract -> semantic (MiniLM) -> prepare stages, built once per module; the features
and train stages also run once there (`trained`), and every test writes its own outputs under tmp_path. Stages run
in-process through `sempcyc.cli.main` (fast: torch is imported once) except where a real process matters: the
CUDA-absent error (exit status, no traceback) and DDP under torchrun.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from helpers import (
    CLASSES,
    PARAMS,
    PER_CLASS,
    VENV_BIN,
    call,
    class_files,
    dvc_env,
    new_unseen_class,
    ok,
    one_line_error,
    run_cli,
    write_params,
    write_tar,
)
from sempcyc import embedcache
from sempcyc.evaluation import BASELINES
from sempcyc.fsutil import sha256_file
from sempcyc.runtime import ann, imaging
from sempcyc.runtime.backbones import Extractor, build_backbone, extract, to_input
from sempcyc.runtime.encoder import SAME_EXTRACTOR, Encoder
from sempcyc.runtime.gallery_shards import (
    EMBEDDING_DTYPE,
    GalleryError,
    bucket_of,
    gallery_digest,
    load_gallery,
    unpack_shard,
    vectors_digest,
)
from sempcyc.runtime.retrieval import expand_gallery, gallery_neighbours
from sempcyc.shards import load_train_shard
from sempcyc.stages import evaluate as evaluate_mod
from sempcyc.stages import gallery as gallery_mod
from sempcyc.stages import train as train_mod

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LOSSES = {"ae", "gen", "gen_adv", "gen_cyc", "gen_cls", "gen_reg", "gen_code", "disc", "disc_se", "disc_sk", "disc_im"}

# ------------------------------------------------------------------------------------------------- helpers

def tsv_rows(path: Path) -> list[list[str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0].split("\t")[0] == "step"
    return [line.split("\t") for line in lines[1:]]


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


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def shard_items(test: Path) -> int:
    return sum(len(np.load(test / f"{part}.npy")) for part in ("sketches", "seen_sketches", "images"))


def gallery_counts(out: str) -> tuple[int, int]:
    match = re.search(r"\((\d+) embedded, (\d+) from cache\)", out)
    assert match, out
    return int(match.group(1)), int(match.group(2))


# ------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A project folder with ds.tar, params.yaml and the real extract, semantic and prepare outputs."""
    assert len({sum(map(ord, c)) for c in CLASSES}) == len(CLASSES)
    root = tmp_path_factory.mktemp("stages")
    write_tar(root / "ds.tar", class_files({c: (PER_CLASS, PER_CLASS) for c in CLASSES}))
    write_params(root)
    ok(root, "extract")
    ok(root, "semantic")
    ok(root, "prepare")
    split = json.loads((root / "data/prepared/splits.json").read_text())
    assert len(split["test"]) >= 2 and len(split["train"]) >= 6, split
    return root


@pytest.fixture(scope="module")
def trained(prepared: Path) -> Path:
    """`prepared` plus the features (1 fine-tuning epoch) and train (2 epochs) outputs at their default paths."""
    ok(prepared, "features")
    out = ok(prepared, "train")
    assert "-> models/sem_pcyc.pt" in out
    return prepared


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


def train_args(trained: Path, folder: Path) -> list:
    return ["train", "--features", trained / "models/features", "--train", trained / "data/prepared/train",
            "--out", folder / "model.pt", "--live-dir", folder / "live", "--checkpoint", folder / "ckpt.pt"]


# ------------------------------------------------------------------------------------------------ features

def test_features_outputs_and_fine_tuned_dim(trained: Path):
    out = trained / "models/features"
    assert {p.name for p in out.iterdir()} >= {"extractors.pt", "train_sketches.npy", "train_images.npy",
                                               "meta.json"}
    meta = json.loads((out / "meta.json").read_text())
    train_classes = json.loads((trained / "data/prepared/train/classes.json").read_text())
    n = len(train_classes) * PER_CLASS
    held_out = len(json.loads((trained / "data/prepared/test/seen_sketches_ids.json").read_text()))
    assert 0 < held_out < n  # some training-class sketches are evaluation queries, never trained on
    assert np.load(out / "train_sketches.npy").shape == (n - held_out, PARAMS["features"]["proj_dim"])
    assert np.load(out / "train_images.npy").shape == (n, PARAMS["features"]["proj_dim"])
    assert meta["feat_dim"] == meta["feature_proj_dim"] == PARAMS["features"]["proj_dim"]
    assert meta["backbone"] == "tiny" and meta["size"] == 32 and meta["finetune_epochs"] == 1
    assert meta["thicken_lines"] == PARAMS["model"]["thicken_lines"] == 3  # what the Encoder draws lines with
    # validation classes are held out of fine-tuning, and together with the fit classes make up the training side
    assert meta["validation_classes"], meta
    assert not set(meta["fit_classes"]) & set(meta["validation_classes"])
    assert set(meta["fit_classes"]) | set(meta["validation_classes"]) == set(train_classes)
    assert len(meta["sketch_finetune_loss"]) == len(meta["image_finetune_loss"]) == 1
    saved = torch.load(out / "extractors.pt", map_location="cpu", weights_only=True)
    assert saved["meta"]["fit_classes"] == meta["fit_classes"]
    assert saved["sketch_extractor"]["proj.weight"].shape[0] == PARAMS["features"]["proj_dim"]


def test_features_without_fine_tuning_give_backbone_features(prepared: Path, tmp_path: Path):
    write_params(tmp_path, {"features": {"epochs": 0}})
    ok(tmp_path, "features", "--train", prepared / "data/prepared/train", "--out", "feat")
    meta = json.loads((tmp_path / "feat/meta.json").read_text())
    dim = build_backbone("tiny", pretrained=False).num_features
    assert meta["feature_proj_dim"] is None and meta["feat_dim"] == dim
    assert np.load(tmp_path / "feat/train_sketches.npy").shape[1] == dim
    assert np.load(tmp_path / "feat/train_images.npy").shape[1] == dim
    assert "sketch_finetune_loss" not in meta


def test_features_tune_the_last_blocks_once_for_both_domains(prepared: Path, tmp_path: Path):
    """features.tune_blocks: the last blocks change, the others keep the backbone's weights, sketches and photos
    share the one extractor, and the saved features are that extractor's (within the float16 of the cached
    frozen part); the untuned backbone's features are saved beside them for evaluate's baseline."""
    write_params(tmp_path, {"features": {"epochs": 0, "tune_blocks": 2, "tune_epochs": 2}})
    ok(tmp_path, "features", "--train", prepared / "data/prepared/train", "--out", "feat")
    meta = json.loads((tmp_path / "feat/meta.json").read_text())
    assert meta["tune_blocks"] == 2 and meta["feature_proj_dim"] is None and len(meta["tune_loss"]) == 2
    saved = torch.load(tmp_path / "feat/extractors.pt", weights_only=True)
    assert bundle_equal(saved["sketch_extractor"], saved["image_extractor"])
    torch.manual_seed(0)  # compute_features seeds features.seed (0) before building the tiny backbone
    untuned = Extractor("tiny", None, pretrained=True).eval()
    before = untuned.state_dict()
    changed = {k.split(".")[2] for k in before if not torch.equal(before[k], saved["sketch_extractor"][k])}
    assert changed == {"1", "2"}  # backbone._blocks.<i>: the last two of three
    tuned = Extractor("tiny", None, pretrained=False).eval()
    tuned.load_state_dict(saved["sketch_extractor"])
    shard = load_train_shard(prepared / "data/prepared/train")
    with torch.no_grad():
        for extractor, name in ((tuned, "train"), (untuned, "backbone")):
            sketches = extractor(to_input(torch.from_numpy(np.array(shard["sketches"])), True, 3)).numpy()
            images = extract(extractor, torch.from_numpy(np.array(shard["images"])), True, True, 3).numpy()
            np.testing.assert_allclose(np.load(tmp_path / f"feat/{name}_sketches.npy"), sketches, atol=2e-3)
            np.testing.assert_allclose(np.load(tmp_path / f"feat/{name}_images.npy"), images, atol=2e-3)


@pytest.mark.parametrize("overrides, names", [
    ({"features": {"tune_blocks": 2, "epochs": 1}}, ["features.tune_blocks", "features.epochs"]),
    ({"features": {"tune_blocks": 4, "epochs": 0}}, ["features.tune_blocks 4", "tiny", "3"]),
    ({"features": {"tune_blocks": -1}}, ["features.tune_blocks"]),
    ({"features": {"tune_blocks": 2, "epochs": 0, "tune_lr": 0}}, ["features.tune_lr"]),
    ({"features": {"tune_blocks": 2, "epochs": 0, "tune_epochs": 0}}, ["features.tune_epochs"]),
    ({"features": {"tune_blocks": 2, "epochs": 0, "tune_temperature": 0}}, ["features.tune_temperature"]),
], ids=["both-ways", "more-blocks-than-the-backbone", "negative", "lr-zero", "no-epochs", "temperature-zero"])
def test_features_refuse_bad_tuning_settings(prepared: Path, tmp_path: Path, overrides: dict, names: list[str]):
    write_params(tmp_path, overrides)
    rc, _, err = call(tmp_path, "features", "--train", prepared / "data/prepared/train", "--out", "feat")
    line = one_line_error(rc, err, "features")
    assert all(n in line for n in names), line
    assert not (tmp_path / "feat").exists()


def test_features_batch_size_larger_than_the_data(prepared: Path, tmp_path: Path):
    write_params(tmp_path, {"features": {"batch_size": 1000}})
    rc, _, err = call(tmp_path, "features", "--train", prepared / "data/prepared/train", "--out", "feat")
    assert "features.batch_size" in one_line_error(rc, err, "features")
    assert not (tmp_path / "feat").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda_names_the_param(trained: Path, tmp_path: Path):
    write_params(tmp_path, {"train": {"device": "cuda"}})
    # a real process: exit status 1 and one line on stderr, no traceback
    proc = run_cli("features", "--train", str(trained / "data/prepared/train"), "--out", "feat",
                   cwd=tmp_path, check=False)
    assert "train.device" in one_line_error(proc.returncode, proc.stderr, "features")
    assert not (tmp_path / "feat").exists()
    rc, _, err = call(tmp_path, *train_args(trained, tmp_path))
    assert "train.device" in one_line_error(rc, err, "train")
    assert not (tmp_path / "model.pt").exists()


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


@pytest.mark.parametrize("width", [2, 0, "3", 3.0])
def test_features_refuses_a_line_width_it_cannot_draw(trained: Path, tmp_path: Path, width):
    write_params(tmp_path, {"model": {"thicken_lines": width}})
    rc, _, err = call(tmp_path, "features", "--train", trained / "data/prepared/train", "--out", "feat")
    assert "model.thicken_lines" in one_line_error(rc, err, "features")
    assert not (tmp_path / "feat").exists()


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


# ------------------------------------------------------------------------------------------------ evaluate

def test_evaluate_reports(trained: Path, tmp_path: Path):
    write_params(tmp_path)
    ok(tmp_path, "evaluate", "--model", trained / "models/sem_pcyc.pt", "--test", trained / "data/prepared/test",
       "--out", "eval")
    report = json.loads((tmp_path / "eval/metrics.json").read_text())
    for setting in ("zero_shot", "generalised"):
        for method in ("sem_pcyc", "sem_pcyc_itq64", "pretrained", "random"):
            m = report[setting][method]
            assert set(m) >= {"map_all", "p_at_10", "p_at_100", "p_at_200"}, (setting, method)
            assert all(0.0 <= m[k] <= 1.0 for k in ("map_all", "p_at_10", "p_at_100", "p_at_200"))
    for method in ("sem_pcyc", *BASELINES):
        seen = report["seen_generalised"][method]["map_all"]
        assert 0.0 <= seen <= 1.0 and 0.0 <= report["harmonic"][method] <= 1.0
        assert 0.0 <= report["diagnostics"]["unseen_centroid_hit_rate"][method if method != "random" else
                                                                        "pretrained"] <= 1.0
    for setting in ("zero_shot", "generalised", "seen_generalised"):
        best = report[setting]["best_baseline"]
        assert report[setting][best]["map_all"] == max(report[setting][b]["map_all"] for b in BASELINES)
        # fine-tuned extractors: the model's input is not the backbone's features, so that baseline falls back
        assert report[setting]["pretrained_model_input"] == report[setting]["pretrained_centred_edges"]
    held_out = json.loads((trained / "data/prepared/test/seen_sketches_ids.json").read_text())
    assert report["counts"]["seen_queries"] == len(held_out) > 0
    unseen = json.loads((trained / "data/prepared/splits.json").read_text())["test"]
    assert report["counts"]["unseen_classes"] == len(unseen)
    assert report["counts"]["gallery_generalised"] == len(CLASSES) * PER_CLASS
    assert report["counts"]["gallery_zero_shot"] == len(unseen) * PER_CLASS
    assert any("P@100" in note for note in report["notes"])  # 4 images a class: P@100 cannot reach 1

    per_class = json.loads((tmp_path / "eval/per_class_ap.json").read_text())
    assert sorted(row["class"] for row in per_class) == sorted(unseen)
    curve = json.loads((tmp_path / "eval/pr_curve.json").read_text())
    assert {row["method"] for row in curve} >= {"sem_pcyc", "pretrained", "random"}
    assert all({"recall", "precision"} <= set(row) for row in curve)
    with Image.open(tmp_path / "eval/retrieval_grid.png") as grid:
        assert grid.format == "PNG"
        grid.load()
        assert grid.width > 0 and grid.height > 0


def configured(model: Path, out: Path, **config) -> Path:
    """A copy of the model bundle `model` at `out` with `config` fields (model.Config) changed."""
    bundle = torch.load(model, map_location="cpu", weights_only=True)
    torch.save({**bundle, "config": {**bundle["config"], **config}}, out)
    return out


def plain_and_configured_reports(trained: Path, tmp_path: Path, **config) -> dict[str, dict]:
    """evaluate's metrics.json of the trained model ("plain") and of its copy with `config` changed ("expanding")."""
    write_params(tmp_path)
    changed = configured(trained / "models/sem_pcyc.pt", tmp_path / "expanding.pt", **config)
    reports = {}
    for name, model in (("plain", trained / "models/sem_pcyc.pt"), ("expanding", changed)):
        ok(tmp_path, "evaluate", "--model", model, "--test", trained / "data/prepared/test", "--out", name)
        reports[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    return reports


def test_evaluate_ranks_with_the_models_query_expansion_for_every_method(trained: Path, tmp_path: Path):
    reports = plain_and_configured_reports(trained, tmp_path, query_expansion=2)
    assert reports["plain"]["query_expansion"] == 0 and reports["expanding"]["query_expansion"] == 2
    changed = [m for m in ("sem_pcyc", "pretrained", "pretrained_centred")
               if reports["plain"]["generalised"][m] != reports["expanding"]["generalised"][m]]
    assert "pretrained" in changed or "pretrained_centred" in changed  # the baselines are expanded too
    assert reports["plain"]["generalised"]["random"] == reports["expanding"]["generalised"]["random"]


def test_evaluate_expands_the_gallery_of_every_method_by_the_models_gallery_expansion(trained: Path,
                                                                                       tmp_path: Path):
    reports = plain_and_configured_reports(trained, tmp_path, gallery_expansion=2)
    assert reports["plain"]["gallery_expansion"] == 0 and reports["expanding"]["gallery_expansion"] == 2
    for method in ("sem_pcyc", "pretrained", "pretrained_centred"):  # the baselines are expanded too
        assert reports["plain"]["generalised"][method] != reports["expanding"]["generalised"][method]
    assert reports["plain"]["generalised"]["random"] == reports["expanding"]["generalised"]["random"]


def evaluate_in(folder: Path, model: Path, test: Path, out: str, cache: str) -> dict:
    return evaluate_counts(ok(folder, "evaluate", "--model", model, "--test", test, "--out", out, "--cache", cache))


def test_evaluate_passes_never_depend_on_which_items_share_them():
    """CPU kernels pick their algorithm by batch size (efficientnet_lite0 gives other float bits at 64 than at 8),
    so every network pass takes exactly EMBED_BATCH rows: an item's vector is then the same bytes whichever items
    share its pass, which is what keeps cached and fresh vectors equal."""
    sizes = []

    def by_batch_size(x: torch.Tensor) -> torch.Tensor:  # a stand-in whose result depends on the batch size
        sizes.append(len(x))
        return x.float() * len(x)

    rows = [np.full(3, i, np.uint8) for i in range(2 * evaluate_mod.EMBED_BATCH + 3)]
    alone, among = evaluate_mod.fixed_batches(by_batch_size, rows[5:6]), evaluate_mod.fixed_batches(by_batch_size, rows)
    assert len(among) == len(rows) and np.array_equal(alone[0], among[5])
    assert set(sizes) == {evaluate_mod.EMBED_BATCH}


def test_evaluate_cache_embeds_only_new_items_and_changes_no_byte(trained: Path, tmp_path: Path):
    """A second run embeds nothing; after a class is added (the real extract -> semantic -> prepare), only its
    items; and the reports are the bytes a run without a cache writes."""
    write_params(tmp_path)
    model, test = trained / "models/sem_pcyc.pt", trained / "data/prepared/test"
    n, images = shard_items(test), len(np.load(test / "images.npy"))
    # fine-tuned extractors: nothing shared; the backbone reads every item, and each photo's edge map once more
    everything = {"items": n, "embedded": n, "backbone": n + images, "extractor": n, "shared": "none"}
    assert evaluate_in(tmp_path, model, test, "eval1", "cache") == everything
    nothing = {**everything, "embedded": 0, "backbone": 0, "extractor": 0}
    assert evaluate_in(tmp_path, model, test, "eval2", "cache") == nothing
    assert folder_bytes(tmp_path / "eval2") == folder_bytes(tmp_path / "eval1")

    extra = new_unseen_class(CLASSES)
    write_tar(tmp_path / "ds2.tar", class_files({c: (PER_CLASS, PER_CLASS) for c in [*CLASSES, extra]}))
    ok(tmp_path, "extract", "--tar", "ds2.tar", "--out", "ds2", "--index", "ds2.json")
    ok(tmp_path, "semantic", "--index", "ds2.json", "--out", "sem2")
    ok(tmp_path, "prepare", "--dataset", "ds2", "--index", "ds2.json", "--semantic", "sem2", "--out", "prep2")
    test2 = tmp_path / "prep2/test"
    assert extra in json.loads((test2 / "classes.json").read_text())["unseen"]
    new = 2 * PER_CLASS  # the new class's images (gallery) and sketches (unseen queries)
    assert shard_items(test2) == n + new
    added = {"items": n + new, "embedded": new, "backbone": new + PER_CLASS, "extractor": new, "shared": "none"}
    assert evaluate_in(tmp_path, model, test2, "eval3", "cache") == added
    assert evaluate_in(tmp_path, model, test2, "eval-cold", "cold-cache")["embedded"] == n + new
    assert folder_bytes(tmp_path / "eval3") == folder_bytes(tmp_path / "eval-cold")
    assert folder_bytes(tmp_path / "eval3") != folder_bytes(tmp_path / "eval1")
    # the release gate compares two reports only on the same test set: the class added changed the digest
    digest = {name: json.loads((tmp_path / name / "metrics.json").read_text())["test_set"]
              for name in ("eval1", "eval2", "eval3")}
    assert digest["eval1"] == digest["eval2"] != digest["eval3"] and len(digest["eval3"]) == 64


def test_evaluate_cache_new_model_and_damaged_files(trained: Path, tmp_path: Path):
    """Another model re-embeds every item but reuses the backbone features, and its cache file replaces the old
    model's; damaged cache files are computed again; the reports never depend on what the cache held."""
    write_params(tmp_path)
    model, test = trained / "models/sem_pcyc.pt", trained / "data/prepared/test"
    n = shard_items(test)
    evaluate_in(tmp_path, model, test, "eval1", "cache")
    bundle = torch.load(model, map_location="cpu", weights_only=True)
    first = next(iter(bundle["gen_im2se"]))
    bundle["gen_im2se"][first] = bundle["gen_im2se"][first] + 0.5
    torch.save(bundle, tmp_path / "other.pt")
    counts = evaluate_in(tmp_path, tmp_path / "other.pt", test, "eval2", "cache")
    assert (counts["embedded"], counts["backbone"]) == (n, 0)
    assert len(list((tmp_path / "cache").glob("model-*.npz"))) == 1
    assert len(list((tmp_path / "cache").glob("backbone-*.npz"))) == 1
    evaluate_in(tmp_path, tmp_path / "other.pt", test, "eval-cold", "cold-cache")
    assert folder_bytes(tmp_path / "eval2") == folder_bytes(tmp_path / "eval-cold")
    assert folder_bytes(tmp_path / "eval2") != folder_bytes(tmp_path / "eval1")

    (model_file,) = (tmp_path / "cache").glob("model-*.npz")
    model_file.write_bytes(b"not a zip file")
    (backbone_file,) = (tmp_path / "cache").glob("backbone-*.npz")
    backbone_file.write_bytes(backbone_file.read_bytes()[:1000])
    counts = evaluate_in(tmp_path, tmp_path / "other.pt", test, "eval3", "cache")
    assert (counts["embedded"], counts["backbone"]) == (n, n)
    assert folder_bytes(tmp_path / "eval3") == folder_bytes(tmp_path / "eval-cold")
    counts = evaluate_in(tmp_path, tmp_path / "other.pt", test, "eval4", "cache")  # the files were rewritten
    assert (counts["embedded"], counts["backbone"]) == (0, 0)


def test_evaluate_shares_the_backbone_pass_only_where_the_extractor_is_the_backbone(
        trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """features.epochs 0: the model's extractors are backbones without projection. With the tiny test CNN (random
    weights, seeded) the sketch extractor has the baseline backbone's weights and the image extractor others, so
    only sketches are shared; the reports equal those of a run that shares nothing."""
    write_params(tmp_path, {"features": {"epochs": 0}})
    ok(tmp_path, "features", "--train", trained / "data/prepared/train", "--out", "feat")
    ok(tmp_path, "train", "--features", "feat", "--train", trained / "data/prepared/train", "--out", "m0.pt",
       "--live-dir", "live", "--checkpoint", "ckpt.pt")
    test = trained / "data/prepared/test"
    n, images = shard_items(test), len(np.load(test / "images.npy"))
    # the backbone reads every item, and each photo's edge map (the photo-edge baseline)
    assert evaluate_in(tmp_path, tmp_path / "m0.pt", test, "shared", "cache1") == {
        "items": n, "embedded": n, "backbone": n + images, "extractor": images, "shared": "sketch"}
    # the same model with the sketch backbone read for photos too: the model's photo features (model.photo_edges:
    # photo and edge map) are the baselines' passes, the model's extractor runs on nothing
    bundle = torch.load(tmp_path / "m0.pt", weights_only=True)
    torch.save({**bundle, "image_extractor": SAME_EXTRACTOR}, tmp_path / "m1.pt")
    assert evaluate_in(tmp_path, tmp_path / "m1.pt", test, "shared1", "cache3") == {
        "items": n, "embedded": n, "backbone": n + images, "extractor": 0, "shared": "sketch, image"}
    monkeypatch.setattr(evaluate_mod, "runs_backbone", lambda *args: False)
    assert evaluate_in(tmp_path, tmp_path / "m0.pt", test, "separate", "cache2") == {
        "items": n, "embedded": n, "backbone": n + images, "extractor": n, "shared": "none"}
    assert folder_bytes(tmp_path / "shared") == folder_bytes(tmp_path / "separate")
    # frozen extractors: the model-input baseline is the backbone's features as the model normalises them (its
    # own training-class statistics), no longer the photo-edge baseline (test-shard seen-class means)
    report = json.loads((tmp_path / "shared/metrics.json").read_text())
    assert report["zero_shot"]["pretrained_model_input"] != report["zero_shot"]["pretrained_centred_edges"]
    evaluate_in(tmp_path, tmp_path / "m1.pt", test, "separate1", "cache4")
    assert folder_bytes(tmp_path / "shared1") == folder_bytes(tmp_path / "separate1")


# ------------------------------------------------------------------------------------------------- gallery

def read_gallery(folder: Path) -> tuple[dict, np.ndarray, list[dict], dict[str, bytes]]:
    """(manifest, embeddings, index entries, thumbnails by id) of a gallery folder, as the handler loads it."""
    manifest, embeddings, index = load_gallery(folder)
    thumbs = {}
    for entry in manifest["shards"]:
        thumbs.update(unpack_shard((folder / entry["file"]).read_bytes(), entry["file"])["thumbs"])
    return manifest, embeddings, index, thumbs


def gallery_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_gallery_embeddings_match_the_encoder(trained: Path, tmp_path: Path):
    write_params(tmp_path)
    dataset = trained / "data/dataset"
    ok(tmp_path, "gallery", "--model", trained / "models/sem_pcyc.pt", "--dataset", dataset,
       "--index", trained / "data/dataset.json", "--out", "gallery", "--cache", "cache")
    manifest, emb, entries, _ = read_gallery(tmp_path / "gallery")
    index = json.loads((trained / "data/dataset.json").read_text())
    expected = [f"{c}/{f}" for c in index["classes"] for f in index["files"]["images"].get(c, [])]
    assert len(expected) == len(CLASSES) * PER_CLASS
    assert emb.shape == (len(expected), PARAMS["model"]["dim_out"]) and emb.dtype == EMBEDDING_DTYPE
    assert sorted(e["id"] for e in entries) == sorted(expected)  # shard by shard, index order within each
    assert all(e["class"] == e["id"].split("/")[0] for e in entries)
    assert manifest["items"] == len(expected) and manifest["classes"] == len(CLASSES)
    assert manifest["model_sha256"] == sha256_file(trained / "models/sem_pcyc.pt")

    enc = Encoder.load(trained / "models/sem_pcyc.pt")
    for row in (0, 5, len(expected) - 1):
        path = dataset / "images" / entries[row]["id"]
        arr = imaging.image_to_array(imaging.load_file(path), enc.size)
        with torch.inference_mode():
            want = enc.embed_images(torch.from_numpy(arr)[None]).numpy()[0]
        np.testing.assert_allclose(emb[row], want, rtol=1e-4, atol=1e-5)


def test_gallery_shards_by_class_hash_with_deterministic_bytes(trained: Path, tmp_path: Path):
    """Each shard holds the classes of one bucket (gallery.shards), is named by its sha256, and equal inputs give
    equal bytes: a rerun (from the cache) rewrites every file identically."""
    argv = ["gallery", "--model", trained / "models/sem_pcyc.pt", "--dataset", trained / "data/dataset",
            "--index", trained / "data/dataset.json", "--cache", "cache"]
    for buckets in (1, 5, 256):
        write_params(tmp_path, {"gallery": {"shards": buckets}})
        ok(tmp_path, *argv, "--out", f"a{buckets}")
        ok(tmp_path, *argv, "--out", f"b{buckets}")
        first = gallery_files(tmp_path / f"a{buckets}")
        assert first == gallery_files(tmp_path / f"b{buckets}")
        manifest = json.loads(first["manifest.json"])
        shards = manifest["shards"]
        assert set(first) == {"manifest.json", *(e["file"] for e in shards)}
        assert [e["bucket"] for e in shards] == sorted({bucket_of(c, buckets) for c in CLASSES})
        for entry in shards:
            data = first[entry["file"]]
            assert entry["file"] == f"shards/{entry['sha256']}.npz" and hashlib.sha256(data).hexdigest() == \
                entry["sha256"] and entry["bytes"] == len(data)
            shard = unpack_shard(data, entry["file"])
            assert {bucket_of(c, buckets) for c in shard["classes"]} == {entry["bucket"]}
            assert len(shard["ids"]) == entry["items"] == PER_CLASS * len(set(shard["classes"]))
    assert len(json.loads((tmp_path / "a1/manifest.json").read_text())["shards"]) == 1


def test_gallery_cache_embeds_only_new_images(trained: Path, tmp_path: Path):
    write_params(tmp_path, {"gallery": {"shards": 64}})
    model = trained / "models/sem_pcyc.pt"
    n = len(CLASSES) * PER_CLASS

    def gallery(model_path: Path, dataset: Path, index: Path) -> tuple[int, int]:
        out = ok(tmp_path, "gallery", "--model", model_path, "--dataset", dataset, "--index", index,
                 "--out", "gallery", "--cache", "cache")
        return gallery_counts(out)

    assert gallery(model, trained / "data/dataset", trained / "data/dataset.json") == (n, 0)
    assert gallery(model, trained / "data/dataset", trained / "data/dataset.json") == (0, n)
    before = {e["bucket"]: e["sha256"] for e in json.loads((tmp_path / "gallery/manifest.json").read_text())["shards"]}

    extra = new_unseen_class(CLASSES)
    write_tar(tmp_path / "ds2.tar", class_files({c: (PER_CLASS, PER_CLASS) for c in [*CLASSES, extra]}))
    ok(tmp_path, "extract", "--tar", "ds2.tar", "--out", "ds2", "--index", "ds2.json")
    assert gallery(model, tmp_path / "ds2", tmp_path / "ds2.json") == (PER_CLASS, n)
    manifest, emb, entries, _ = read_gallery(tmp_path / "gallery")
    assert len(emb) == n + PER_CLASS
    assert sum(e["id"].startswith(f"{extra}/") for e in entries) == PER_CLASS
    # only the new class's shard changed: every other bucket's shard is the same file
    after = {e["bucket"]: e["sha256"] for e in manifest["shards"]}
    changed = {b for b in after if before.get(b) != after[b]}
    assert changed == {bucket_of(extra, 64)} and set(before) <= set(after)

    # another model: nothing from the cache, and the old model's cache file is gone
    bundle = torch.load(model, map_location="cpu", weights_only=True)
    first = next(iter(bundle["gen_im2se"]))
    bundle["gen_im2se"][first] = bundle["gen_im2se"][first] + 0.5
    torch.save(bundle, tmp_path / "other.pt")
    assert gallery(tmp_path / "other.pt", tmp_path / "ds2", tmp_path / "ds2.json") == (n + PER_CLASS, 0)
    assert not np.allclose(read_gallery(tmp_path / "gallery")[1], emb)
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1


def test_gallery_expansion_ships_each_items_neighbours_beside_unchanged_shards(trained: Path, tmp_path: Path):
    """With the model's gallery_expansion k, the shards still hold each image's own embedding (the same bytes as
    without it), neighbours.npy each item's k nearest, and the loader serves expand_gallery of the two; a new
    class changes its own shard and the neighbours file, no other shard."""
    write_params(tmp_path, {"gallery": {"shards": 64}})
    configured(trained / "models/sem_pcyc.pt", tmp_path / "expanding.pt", gallery_expansion=2)

    def gallery(model: Path, out: str, dataset: Path = trained / "data/dataset",
                index: Path = trained / "data/dataset.json") -> dict[str, bytes]:
        ok(tmp_path, "gallery", "--model", model, "--dataset", dataset, "--index", index, "--out", out,
           "--cache", f"cache-{model.stem}")
        return gallery_files(tmp_path / out)

    plain, expanded = gallery(trained / "models/sem_pcyc.pt", "plain"), gallery(tmp_path / "expanding.pt", "exp")
    manifest = json.loads(expanded["manifest.json"])
    assert manifest["neighbours"] == {"file": "neighbours.npy", "k": 2,
                                      "sha256": hashlib.sha256(expanded["neighbours.npy"]).hexdigest()}
    assert "neighbours" not in json.loads(plain["manifest.json"])
    assert {f: b for f, b in expanded.items() if f.startswith("shards/")} == \
        {f: b for f, b in plain.items() if f.startswith("shards/")}
    raw = load_gallery(tmp_path / "plain")[1]
    neighbours = np.load(tmp_path / "exp/neighbours.npy")
    np.testing.assert_array_equal(neighbours, gallery_neighbours(raw, 2))
    np.testing.assert_allclose(load_gallery(tmp_path / "exp")[1], expand_gallery(raw, neighbours), rtol=1e-6)

    extra = new_unseen_class(CLASSES)
    write_tar(tmp_path / "ds2.tar", class_files({c: (PER_CLASS, PER_CLASS) for c in [*CLASSES, extra]}))
    ok(tmp_path, "extract", "--tar", "ds2.tar", "--out", "ds2", "--index", "ds2.json")
    grown = gallery(tmp_path / "expanding.pt", "exp2", tmp_path / "ds2", tmp_path / "ds2.json")
    assert set(expanded) - set(grown) == {f for f in expanded if f.startswith("shards/")} - set(grown)
    assert len({f for f in grown if f.startswith("shards/")} - set(expanded)) == 1  # the new class's bucket
    assert grown["neighbours.npy"] != expanded["neighbours.npy"]


@pytest.mark.parametrize("damage", ["bytes", "k", "missing"])
def test_a_damaged_neighbours_file_refuses_the_gallery(trained: Path, tmp_path: Path, damage: str):
    write_params(tmp_path)
    configured(trained / "models/sem_pcyc.pt", tmp_path / "expanding.pt", gallery_expansion=2)
    ok(tmp_path, "gallery", "--model", tmp_path / "expanding.pt", "--dataset", trained / "data/dataset",
       "--index", trained / "data/dataset.json", "--out", "gallery", "--cache", "cache")
    path, manifest_path = tmp_path / "gallery/neighbours.npy", tmp_path / "gallery/manifest.json"
    if damage == "bytes":
        path.write_bytes(path.read_bytes()[:-4] + b"\0\0\0\0")
    elif damage == "k":  # a manifest that names the file's sha256 but another k
        manifest = json.loads(manifest_path.read_text())
        manifest["neighbours"]["k"] = 3
        manifest_path.write_text(json.dumps(manifest))
    else:
        path.unlink()
    with pytest.raises(GalleryError, match="gallery neighbours neighbours.npy"):
        load_gallery(tmp_path / "gallery")


def test_gallery_cache_is_not_reused_when_the_embedding_code_changes(trained: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch):
    """Same model bytes, other runtime code (e.g. a new embedding layout): every image is embedded again."""
    write_params(tmp_path)
    argv = ["gallery", "--model", trained / "models/sem_pcyc.pt", "--dataset", trained / "data/dataset",
            "--index", trained / "data/dataset.json", "--out", "gallery", "--cache", "cache"]
    n = len(CLASSES) * PER_CLASS
    assert gallery_counts(ok(tmp_path, *argv)) == (n, 0)
    runtime = tmp_path / "runtime"
    shutil.copytree(embedcache.RUNTIME_DIR, runtime)
    (runtime / "model.py").write_text((runtime / "model.py").read_text() + "\n# changed\n")
    monkeypatch.setattr(embedcache, "RUNTIME_DIR", runtime)
    assert gallery_counts(ok(tmp_path, *argv)) == (n, 0)


def test_gallery_cache_is_not_reused_with_another_torch_thread_count(trained: Path, tmp_path: Path):
    """The last bits of a vector follow torch's thread count, so a cache filled with one count is not mixed into
    a gallery embedded with another; the same count reuses it."""
    write_params(tmp_path)
    argv = ["gallery", "--model", trained / "models/sem_pcyc.pt", "--dataset", trained / "data/dataset",
            "--index", trained / "data/dataset.json", "--out", "gallery", "--cache", "cache"]
    n, threads = len(CLASSES) * PER_CLASS, torch.get_num_threads()
    try:
        for count, embedded in ((1, n), (2, n), (2, 0)):
            torch.set_num_threads(count)
            assert gallery_counts(ok(tmp_path, *argv))[1] == n - embedded
    finally:
        torch.set_num_threads(threads)


def test_gallery_thumbnails(trained: Path, tmp_path: Path):
    """The page's thumbnails: one square WebP for each of the first gallery.thumbnail_max_items images in index
    order, kept in the shard of the image's class."""
    index = json.loads((trained / "data/dataset.json").read_text())
    in_order = [f"{c}/{f}" for c in index["classes"] for f in index["files"]["images"].get(c, [])]
    for cap, want in ((10_000, len(in_order)), (5, 5), (0, 0)):
        write_params(tmp_path, {"gallery": {"thumbnail_size": 40, "thumbnail_max_items": cap}})
        out = ok(tmp_path, "gallery", "--model", trained / "models/sem_pcyc.pt", "--dataset",
                 trained / "data/dataset", "--index", trained / "data/dataset.json", "--out", "gallery",
                 "--cache", "cache")
        assert f"and {want} thumbnails" in out, out
        manifest, _, _, thumbs = read_gallery(tmp_path / "gallery")
        assert manifest["thumbnails"] == {"format": "webp", "size": 40, "items": want}
        assert sorted(thumbs) == sorted(in_order[:want])
        for image_id, data in thumbs.items():
            thumb = Image.open(io.BytesIO(data))
            assert thumb.format == "WEBP" and thumb.size == (40, 40)
            # the model's own fit-and-pad view of the photo, made small
            photo = imaging.image_to_array(imaging.load_file(trained / "data/dataset/images" / image_id), 40)
            assert np.abs(np.asarray(thumb.convert("RGB"), dtype=float) - photo).mean() < 12


def gallery_args(trained: Path, out: str = "gallery", cache: str = "cache") -> list:
    return ["gallery", "--model", trained / "models/sem_pcyc.pt", "--dataset", trained / "data/dataset",
            "--index", trained / "data/dataset.json", "--out", out, "--cache", cache]


def test_gallery_passes_never_depend_on_which_images_share_them(trained: Path):
    """Every network pass takes exactly gallery.batch_size images (the last one padded), so an image's vector is the
    same bytes alone, among others, or in another process's share."""
    sizes = []

    class BatchSizeDependent:  # a stand-in encoder whose result depends on the batch size
        size = 32

        def embed_images(self, x: torch.Tensor) -> torch.Tensor:
            sizes.append(len(x))
            return x.float().mean(dim=(1, 2)) * len(x)

    index = json.loads((trained / "data/dataset.json").read_text())
    todo = [(f"{c}/{f}", trained / "data/dataset/images" / c / f) for c, f in gallery_mod.gallery_items(index)][:11]
    among = gallery_mod.embed(BatchSizeDependent(), todo, 4, "cpu", gallery_mod.Ranks())
    alone = gallery_mod.embed(BatchSizeDependent(), todo[5:6], 4, "cpu", gallery_mod.Ranks())
    assert among.shape == (11, 3) and among.dtype == np.float32
    assert np.array_equal(alone[0], among[5]) and set(sizes) == {4}


def test_gallery_torchrun_two_processes_write_the_one_process_bytes(trained: Path, tmp_path: Path):
    """2 processes under real torchrun (gloo on CPU): each embeds half of the images the cache lacks, rank 0 writes
    the gallery, byte for byte the one a single process writes; both exit 0; the counts are the whole job's."""
    params = write_params(tmp_path, {"gallery": {"batch_size": 5, "ann_min_items": 10, "ann_nlist": 4}})
    n = len(CLASSES) * PER_CLASS
    assert gallery_counts(ok(tmp_path, *gallery_args(trained, "one", "cache1"))) == (n, 0)
    env = dict(os.environ, PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", OMP_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1")
    cmd = [str(VENV_BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "sempcyc.cli",
           "--params", str(params), *map(str, gallery_args(trained, "two", "cache2"))]
    for embedded in (n, 0):  # the second run: everything from rank 0's cache
        shutil.rmtree(tmp_path / "two", ignore_errors=True)
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert gallery_counts(proc.stdout) == (embedded, n - embedded)
        assert proc.stdout.count("gallery: ") == 2 + bool(embedded), proc.stdout  # rank 0 alone reports
        assert (f"embedded {n} images" in proc.stdout and "on 2 process(es)" in proc.stdout) == bool(embedded)
        assert gallery_files(tmp_path / "two") == gallery_files(tmp_path / "one")
    assert "ivf.npz" in gallery_files(tmp_path / "one")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no scratch folder left


def test_gallery_ann_index_from_gallery_ann_min_items(trained: Path, tmp_path: Path):
    """A gallery of at least gallery.ann_min_items items gets ivf.npz, a faiss index over its embeddings in manifest
    order, named in the manifest with its sha256, the gallery digest the loader recomputes, the faiss version and
    the build parameters."""
    n = len(CLASSES) * PER_CLASS
    for min_items, nlist, want in ((n, 4, 4), (1, 0, ann.default_nlist(n))):
        write_params(tmp_path, {"gallery": {"ann_min_items": min_items, "ann_nlist": nlist, "shards": 5}})
        out = ok(tmp_path, *gallery_args(trained))
        assert f"IVF index of {n} items in {want} lists" in out
        manifest, emb, _, _ = read_gallery(tmp_path / "gallery")
        entry = manifest["index"]
        digest = gallery_digest(manifest["model_sha256"], [s["sha256"] for s in manifest["shards"]])
        assert entry == {"file": "ivf.npz", "sha256": sha256_file(tmp_path / "gallery/ivf.npz"),
                         "gallery_digest": digest, "faiss_version": ann.faiss_version(), "nlist": want,
                         "code_dims": 3, "seed": 0, "iterations": 10, "sample_per_list": 64}
        index = ann.AnnIndex.load(tmp_path / "gallery/ivf.npz", digest, emb.shape)
        assert index.nlist == want and index.items == n
        ids, _ = index.search(emb[:3], k=1, nprobe=want, shortlist=4, vectors=emb)
        assert ids[:, 0].tolist() == [0, 1, 2]  # manifest order: each item finds itself
    with pytest.raises(ann.IndexMismatch):
        ann.AnnIndex.load(tmp_path / "gallery/ivf.npz", gallery_digest("other model", []), emb.shape)


def test_a_gallery_with_an_index_finds_the_expansions_neighbours_through_one(trained: Path, tmp_path: Path):
    """From gallery.ann_min_items items on, the gallery expansion's neighbours come from a faiss index scanning
    gallery.ann_neighbour_nprobe lists and ranking the best candidates exactly (all 4 lists and a long short
    list here: the exact neighbours; 1 list and 1 candidate a neighbour: fewer found), and the served index is
    built for the expanded vectors: its digest covers the neighbours file."""
    configured(trained / "models/sem_pcyc.pt", tmp_path / "expanding.pt", gallery_expansion=2)
    argv = ["gallery", "--model", tmp_path / "expanding.pt", "--dataset", trained / "data/dataset",
            "--index", trained / "data/dataset.json", "--cache", "cache"]
    write_params(tmp_path, {"gallery": {"ann_min_items": 0}})
    ok(tmp_path, *argv, "--out", "exact")
    manifest = json.loads((tmp_path / "exact/manifest.json").read_text())
    raw = np.concatenate([unpack_shard((tmp_path / "exact" / e["file"]).read_bytes(), e["file"])["embeddings"]
                          for e in manifest["shards"]])  # each image's own embedding, in manifest order
    exact = np.load(tmp_path / "exact/neighbours.npy")
    np.testing.assert_array_equal(exact, gallery_neighbours(raw, 2))
    for nprobe, rerank, least in ((4, 16, 1.0), (1, 1, 0.3)):
        write_params(tmp_path, {"gallery": {"ann_min_items": 1, "ann_nlist": 4, "ann_neighbour_nprobe": nprobe,
                                            "ann_neighbour_rerank": rerank}})
        ok(tmp_path, *argv, "--out", f"ivf{nprobe}")
        manifest, served, _ = load_gallery(tmp_path / f"ivf{nprobe}")
        found = np.load(tmp_path / f"ivf{nprobe}/neighbours.npy")
        assert found.shape == exact.shape and (found != np.arange(len(found))[:, None]).all()
        shared = np.mean([len(set(a) & set(b)) / 2 for a, b in zip(found.tolist(), exact.tolist())])
        assert shared >= least, shared
        np.testing.assert_allclose(served, expand_gallery(raw, found), rtol=1e-6)
        assert manifest["index"]["gallery_digest"] == vectors_digest(manifest) != gallery_digest(
            manifest["model_sha256"], [e["sha256"] for e in manifest["shards"]])
        ann.AnnIndex.load(tmp_path / f"ivf{nprobe}/ivf.npz", vectors_digest(manifest), served.shape)
    np.testing.assert_array_equal(np.load(tmp_path / "ivf4/neighbours.npy"), exact)


@pytest.mark.parametrize("overrides", [{}, {"ann_min_items": 0}, {"ann_min_items": len(CLASSES) * PER_CLASS + 1}])
def test_gallery_below_gallery_ann_min_items_has_no_index(trained: Path, tmp_path: Path, overrides: dict):
    """The default threshold (200000) gives the demo-size gallery no index; 0 means never."""
    write_params(tmp_path, {"gallery": overrides} if overrides else None)
    out = ok(tmp_path, *gallery_args(trained))
    assert "IVF" not in out
    assert "index" not in json.loads((tmp_path / "gallery/manifest.json").read_text())
    assert not (tmp_path / "gallery/ivf.npz").exists()


def test_a_gallery_smaller_than_its_list_count_is_searched_exactly(trained: Path, tmp_path: Path):
    """More lists (gallery.ann_nlist) than items: no index and a line saying so, not an error."""
    n = len(CLASSES) * PER_CLASS
    write_params(tmp_path, {"gallery": {"ann_min_items": 1, "ann_nlist": 1000}})
    out = ok(tmp_path, *gallery_args(trained))
    assert f"{n} items cannot fill 1000 lists (gallery.ann_nlist 1000" in out and "searched exactly" in out
    assert "index" not in json.loads((tmp_path / "gallery/manifest.json").read_text())
    assert not (tmp_path / "gallery/ivf.npz").exists()


@pytest.mark.parametrize("overrides, names", [
    ({"gallery": {"ann_code_dims": 0}}, "gallery.ann_code_dims"),
    ({"gallery": {"ann_min_items": -1}}, "gallery.ann_min_items"),
    ({"train": {"device": "gpu"}}, "train.device"),
])
def test_gallery_bad_params_give_one_line_errors(trained: Path, tmp_path: Path, overrides: dict, names: str):
    write_params(tmp_path, overrides)
    rc, _, err = call(tmp_path, *gallery_args(trained))
    assert names in one_line_error(rc, err, "gallery")
    assert not (tmp_path / "gallery").exists() and not (tmp_path / "cache").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_gallery_on_cuda_without_cuda_names_the_param(trained: Path, tmp_path: Path):
    write_params(tmp_path, {"train": {"device": "cuda"}})
    rc, _, err = call(tmp_path, *gallery_args(trained))
    assert "train.device" in one_line_error(rc, err, "gallery")
