"""The features stage on a tiny dataset (tiny CNN, 32-px arrays, a few iterations).

The inputs are the session's tiny model project (conftest.py: the real extract -> semantic (MiniLM) -> prepare ->
features -> train -> gallery, built once), read as `prepared` and `trained`; every test writes its own outputs
under tmp_path. Stages run in-process through `sempcyc.cli.main` (fast: torch is imported once) except where a
real process matters: the CUDA-absent error (exit status, no traceback).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import PARAMS, PER_CLASS, bundle_equal, call, ok, one_line_error, run_cli, train_args, write_params
from sempcyc.runtime.backbones import Extractor, build_backbone, extract, to_input
from sempcyc.shards import load_train_shard

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
    ({"features": {"tune_blocks": 2, "epochs": 0, "tune_semantic": -1}}, ["features.tune_semantic"]),
    ({"features": {"tune_blocks": 2, "epochs": 0, "tune_semantic": 1, "tune_semantic_temperature": 0}},
     ["features.tune_semantic_temperature"]),
], ids=["both-ways", "more-blocks-than-the-backbone", "negative", "lr-zero", "no-epochs", "temperature-zero",
        "semantic-negative", "semantic-temperature-zero"])
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


@pytest.mark.parametrize("width", [2, 0, "3", 3.0])
def test_features_refuses_a_line_width_it_cannot_draw(trained: Path, tmp_path: Path, width):
    write_params(tmp_path, {"model": {"thicken_lines": width}})
    rc, _, err = call(tmp_path, "features", "--train", trained / "data/prepared/train", "--out", "feat")
    assert "model.thicken_lines" in one_line_error(rc, err, "features")
    assert not (tmp_path / "feat").exists()
