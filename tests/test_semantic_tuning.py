"""features.tune_semantic: the tuning's cosine classifier also learns soft labels from the class vectors, so the
tuned blocks read class semantics; shuffled vectors give other blocks (the shuffle ablation)."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from helpers import REPO, ok, tuning_inputs, write_params
from sempcyc import params as params_mod
from sempcyc.runtime.backbones import build_backbone
from sempcyc.stages import features

BLOCKS = 2


@pytest.fixture(scope="module")
def setup():
    backbone, acts = tuning_inputs(16, BLOCKS)
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    vectors = np.array([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], np.float32)
    shard = {"classes": ["cat", "lion", "car", "cup"], "semantic": vectors}
    feat = dataclasses.replace(params_mod.read(REPO / "params.yaml", features.FeaturesSettings)[0],
                               tune_blocks=BLOCKS, tune_semantic=1.0, tune_semantic_temperature=0.1, batch_size=4,
                               tune_epochs=1, tune_lr=0.01)
    return backbone, acts, {"sketches": labels, "images": labels}, shard, feat


def test_soft_labels_name_each_class_s_semantic_neighbours_and_never_itself(setup):
    *_, shard, feat = setup
    soft = features.semantic_soft_labels(shard, ["lion", "cat", "car", "cup"], feat)  # fit-class order
    torch.testing.assert_close(soft.sum(-1), torch.ones(4))
    assert torch.all(soft.diagonal() == 0)
    assert soft[0, 1] > 0.9 and soft[1, 0] > 0.9, "lion's nearest is cat, and cat's is lion"
    assert soft[2, 0] > soft[2, 1] == soft[2, 3], "car shares a little with lion, nothing with cat or cup"
    torch.testing.assert_close(soft[3, :3], torch.full((3,), 1 / 3)), "cup is as far from every other class"


def test_the_semantic_term_changes_the_loss_and_shuffled_vectors_change_the_tuned_blocks(setup):
    backbone, acts, labels, shard, feat = setup
    fit = shard["classes"]
    weights = []
    for vectors in (shard["semantic"], shard["semantic"][[2, 3, 0, 1]]):
        targets = {"classes": features.semantic_soft_labels({**shard, "semantic": vectors}, fit, feat)}
        tuned = build_backbone("efficientnet_lite0_headless").eval()
        tuned.load_state_dict(backbone.state_dict())
        start = torch.full((4, 320), 0.01) + torch.arange(4.0)[:, None] * torch.linspace(-1e-3, 1e-3, 320)
        args = (tuned, acts, np.arange(8), np.arange(8), labels, start, feat, "cpu")
        assert features.tuning_loss(*args, targets).item() > features.tuning_loss(*args, None).item()
        features.train_tuned_blocks(tuned, acts, labels, 4, feat, "cpu", targets)
        weights.append(torch.cat([p.detach().flatten() for p in tuned._blocks[-1].parameters()]))
    assert not torch.allclose(weights[0], weights[1])


def test_the_features_stage_tunes_with_the_shard_s_class_vectors_and_records_it(prepared, tmp_path):
    """Through the CLI on the tiny pipeline: the same seed with and without the semantic term gives other
    features, and meta.json says how they were tuned."""
    saved = {}
    for weight in (0.0, 1.0):
        folder = tmp_path / f"w{weight:g}"
        folder.mkdir()
        write_params(folder, {"features": {"epochs": 0, "tune_blocks": 2, "tune_epochs": 1, "tune_semantic": weight}})
        ok(folder, "features", "--train", prepared / "data/prepared/train", "--out", "feat")
        meta = json.loads((folder / "feat/meta.json").read_text())
        assert ("tune_semantic" in meta) == bool(weight)
        saved[weight] = np.load(folder / "feat/train_sketches.npy")
    assert meta["tune_semantic"] == {"weight": 1.0, "temperature": 0.1}
    assert not np.allclose(saved[0.0], saved[1.0])
