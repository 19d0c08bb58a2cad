"""features.tune_distill: tuning the backbone's last blocks while keeping the untuned network's ImageNet predictions
as targets (SAKE), class-aware through each training class's WordNet similarity to the ImageNet classes."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from helpers import REPO, tuning_inputs
from sempcyc import params as params_mod
from sempcyc.errors import UserError
from sempcyc.runtime.backbones import build_backbone
from sempcyc.stages import features

BLOCKS = 2


@pytest.fixture(scope="module")
def setup():
    backbone, acts = tuning_inputs(12, BLOCKS)
    labels = np.array([0, 1, 2, 0, 1, 2])
    shard = {"sketches_labels": labels, "images_labels": labels}
    feat = dataclasses.replace(params_mod.read(REPO / "params.yaml", features.FeaturesSettings)[0],
                               tune_blocks=BLOCKS, tune_distill=1.0, tune_distill_temperature=2.0, batch_size=3)
    return backbone, acts, shard, labels, feat


def test_targets_are_the_untuned_predictions_and_class_aware_with_similarity(setup):
    backbone, acts, shard, labels, feat = setup
    plain = features.distillation_targets(backbone, acts, shard, feat, "cpu")
    torch.testing.assert_close(plain["sketches"].sum(-1), torch.ones(6))
    similarity = np.zeros((3, 1000), np.float32)
    similarity[:, :10] = 1.0            # every class related to ImageNet classes 0..9 only
    similarity[1, 5:10] = 0.0           # class 1 to 0..4 only
    aware = features.distillation_targets(backbone, acts, {**shard, "imagenet_similarity": similarity}, feat, "cpu")
    for key in ("sketches", "images"):
        torch.testing.assert_close(aware[key].sum(-1), torch.ones(6))
        assert float(aware[key][:, 10:].abs().max()) == 0.0
        assert float(aware[key][labels == 1][:, 5:].abs().max()) == 0.0
        expected = plain[key][:, :10] / plain[key][:, :10].sum(-1, keepdim=True)
        torch.testing.assert_close(aware[key][labels == 0][:, :10], expected[labels == 0])


def test_distillation_keeps_the_imagenet_predictions_closer(setup):
    """From the same start, the same batches: tuning with the distillation term moves the ImageNet predictions
    of the training items less than tuning without it; at the start the term is zero (student = teacher)."""
    backbone, acts, shard, labels, feat = setup
    targets = features.distillation_targets(backbone, acts, shard, feat, "cpu")
    drift = {}
    for weight in (0.0, 1.0):
        tuned = build_backbone("efficientnet_lite0_headless").eval()
        tuned.load_state_dict(backbone.state_dict())
        run = dataclasses.replace(feat, tune_distill=weight, tune_epochs=3, tune_lr=0.01)
        if weight:
            start = features.tuning_loss(tuned, acts, np.arange(6), np.arange(6), {"sketches": labels,
                                         "images": labels}, torch.zeros(3, 320) + 0.01, run, "cpu", targets)
            plain = features.tuning_loss(tuned, acts, np.arange(6), np.arange(6), {"sketches": labels,
                                         "images": labels}, torch.zeros(3, 320) + 0.01, run, "cpu", None)
            assert start.item() == pytest.approx(plain.item(), abs=1e-4)
        features.train_tuned_blocks(tuned, acts, {"sketches": labels, "images": labels}, 3, run, "cpu",
                                    targets if weight else None)
        now = features.distillation_targets(tuned, acts, shard, dataclasses.replace(run, tune_distill=1.0), "cpu")
        drift[weight] = float(sum((now[k] - targets[k]).abs().sum() for k in now))
    assert drift[1.0] < drift[0.0]


def test_a_backbone_without_an_imagenet_head_is_refused(setup):
    _, acts, shard, _, feat = setup
    with pytest.raises(UserError, match=r"features.tune_distill needs a backbone with its ImageNet classifier"):
        features.distillation_targets(build_backbone("tiny", pretrained=False), acts, shard, feat, "cpu")


def test_no_distillation_no_targets(setup):
    backbone, acts, shard, _, feat = setup
    assert features.distillation_targets(backbone, acts, shard, dataclasses.replace(feat, tune_distill=0.0),
                                         "cpu") is None


def test_shuffled_similarity_changes_the_tuned_blocks(setup):
    """The shuffle ablation of the class-aware distillation: the classes' similarity rows permuted among the
    classes give other targets, and other tuned weights from the same start and batches."""
    backbone, acts, shard, labels, feat = setup
    rng = np.random.default_rng(0)
    similarity = rng.uniform(0.05, 1.0, size=(3, 1000)).astype(np.float32)
    weights = []
    for rows in (similarity, similarity[[1, 2, 0]]):
        targets = features.distillation_targets(backbone, acts, {**shard, "imagenet_similarity": rows}, feat, "cpu")
        tuned = build_backbone("efficientnet_lite0_headless").eval()
        tuned.load_state_dict(backbone.state_dict())
        features.train_tuned_blocks(tuned, acts, {"sketches": labels, "images": labels}, 3,
                                    dataclasses.replace(feat, tune_epochs=1, tune_lr=0.01), "cpu", targets)
        weights.append(torch.cat([p.detach().flatten() for p in tuned._blocks[-1].parameters()]))
    assert not torch.allclose(weights[0], weights[1])
