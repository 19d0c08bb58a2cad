"""The semantic part of the served vector (model.Config.semantic_weight, ConSE) and the shuffle ablation: a model
that reads class semantics changes when the vectors are permuted among the classes; one that ignores them does
not; the part survives the bundle (what training fits is what serving computes)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sempcyc.runtime.model import Config, SeenPosterior, SemPcyc, fit_projection, with_posterior
from sempcyc.stages import train

FEAT, SEM, FIT, VAL = 8, 6, 5, 2


def training_data(seed: int = 0) -> dict:
    """Features of FIT + VAL classes (clusters around per-class centres) and one semantic vector per class."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(FIT + VAL, FEAT))

    def items(classes: range) -> tuple[np.ndarray, np.ndarray]:
        labels = np.repeat(np.arange(len(classes)), 6)
        feats = centres[np.array(classes)[labels]] + 0.3 * rng.normal(size=(len(labels), FEAT))
        return feats.astype(np.float32), labels

    fit_sk, fit_y = items(range(FIT))
    val_sk, val_y = items(range(FIT, FIT + VAL))
    class_sem = rng.normal(size=(FIT + VAL, SEM)).astype(np.float32)
    return {"fit_classes": [f"c{i}" for i in range(FIT)], "val_names": [f"v{i}" for i in range(VAL)],
            "fit_sk": fit_sk, "fit_sk_y": fit_y, "fit_im": fit_sk + 0.01, "fit_im_y": fit_y,
            "val_sk": val_sk, "val_sk_y": val_y, "val_im": val_sk + 0.01, "val_im_y": val_y,
            "class_sem": class_sem, "fit_sem": class_sem[:FIT]}


def served(data: dict, semantic_weight: float, projection_weight: float = 0.0) -> torch.Tensor:
    torch.manual_seed(0)
    cfg = Config(feat_dim=FEAT, sem_dim=SEM, dim_out=4, n_classes=FIT, embed_skip=1.0, posterior_weight=4.0,
                 posterior_temperature=2.0, semantic_weight=semantic_weight, projection_weight=projection_weight)
    model = SemPcyc(cfg).eval()
    train.fit_seen_posterior(model, data)
    queries = torch.from_numpy(np.random.default_rng(7).normal(size=(10, FEAT)).astype(np.float32))
    with torch.no_grad():
        return model.embed_sketch(queries)


def test_shuffle_permutes_the_vectors_among_training_classes_only():
    data = training_data()
    shuffled = train.shuffle_semantics(data, seed=0)
    assert sorted(map(tuple, shuffled["class_sem"])) == sorted(map(tuple, data["class_sem"]))
    assert not np.array_equal(shuffled["class_sem"], data["class_sem"])
    np.testing.assert_array_equal(shuffled["fit_sem"], shuffled["class_sem"][:FIT])
    assert shuffled["fit_sk"] is data["fit_sk"], "features and labels are untouched"
    np.testing.assert_array_equal(train.shuffle_semantics(data, 0)["class_sem"], shuffled["class_sem"])


def test_a_model_reading_semantics_changes_when_they_are_shuffled():
    data = training_data()
    plain, mixed = served(data, 1.0), served(train.shuffle_semantics(data, seed=0), 1.0)
    assert plain.shape == (10, FEAT + FIT + VAL + SEM)  # features, posterior over every training class, semantics
    assert not torch.allclose(plain, mixed, atol=1e-3)
    # only the semantic part moved: the features and the posterior are the same
    torch.testing.assert_close(plain[:, :FEAT + FIT + VAL], mixed[:, :FEAT + FIT + VAL])


def test_the_projection_part_reads_semantics_too():
    data = training_data()
    plain, mixed = served(data, 0.0, 1.0), served(train.shuffle_semantics(data, seed=0), 0.0, 1.0)
    assert plain.shape == (10, FEAT + FIT + VAL + SEM)
    torch.testing.assert_close(plain[:, :FEAT + FIT + VAL], mixed[:, :FEAT + FIT + VAL])
    assert not torch.allclose(plain[:, -SEM:], mixed[:, -SEM:], atol=1e-3)
    torch.testing.assert_close(plain[:, -SEM:].norm(dim=-1), torch.ones(10))


def test_projection_maps_features_onto_their_class_vectors():
    """Each class's items (clustered features) are mapped nearest to their own class vector among all classes,
    validation classes included: the compatibility rows are the class vectors."""
    data = training_data()
    feats = torch.from_numpy(np.concatenate([data["fit_sk"], data["val_sk"]]))
    labels = torch.from_numpy(np.concatenate([data["fit_sk_y"], data["val_sk_y"] + FIT]))
    sem = torch.from_numpy(data["class_sem"])
    projection = fit_projection(feats, sem[labels], ridge=0.001)
    assert projection.shape == (FEAT, SEM)
    mapped = torch.nn.functional.normalize(torch.nn.functional.normalize(feats, dim=-1) @ projection, dim=-1)
    nearest = (mapped @ torch.nn.functional.normalize(sem, dim=-1).T).argmax(-1)
    assert float((nearest == labels).float().mean()) > 0.9
    torch.testing.assert_close(fit_projection(feats, sem[labels], ridge=0.001), projection, rtol=0, atol=0)


def test_without_the_semantic_part_shuffling_changes_nothing():
    data = training_data()
    torch.testing.assert_close(served(data, 0.0), served(train.shuffle_semantics(data, seed=0), 0.0), rtol=0, atol=0)


def test_semantic_part_is_the_posterior_weighted_mean_of_class_vectors():
    head = SeenPosterior(FEAT, 3, SEM)
    head.semantics = torch.eye(3, SEM)
    cfg = Config(feat_dim=FEAT, sem_dim=SEM, dim_out=4, n_classes=3, embed_skip=1.0, posterior_weight=0.0,
                 semantic_weight=4.0)
    x = torch.randn(2, FEAT)
    out = with_posterior(torch.zeros(2, 1), x, head, cfg)
    p = head(x, cfg.posterior_temperature)
    torch.testing.assert_close(out[:, 1:], 2.0 * torch.nn.functional.normalize(p @ torch.eye(3, SEM), dim=-1))


@pytest.mark.parametrize("semantic_weight, projection_weight", [(0.0, 0.0), (2.0, 0.0), (0.0, 2.0), (1.0, 1.0)])
def test_the_posterior_state_serves_what_training_fitted(semantic_weight, projection_weight):
    data = training_data()
    torch.manual_seed(0)
    cfg = Config(feat_dim=FEAT, sem_dim=SEM, dim_out=4, n_classes=FIT, embed_skip=1.0, posterior_weight=4.0,
                 semantic_weight=semantic_weight, projection_weight=projection_weight)
    model = SemPcyc(cfg).eval()
    train.fit_seen_posterior(model, data)
    state = model.posterior.state_dict()
    enc_posterior = SeenPosterior(FEAT, FIT + VAL, state["semantics"].shape[1] if state["semantics"].numel() else 0,
                                  state["projection"].shape[1] if state["projection"].numel() else 0)
    enc_posterior.load_state_dict(state)
    x = torch.from_numpy(data["val_sk"])
    torch.testing.assert_close(with_posterior(x, x, enc_posterior, cfg), with_posterior(x, x, model.posterior, cfg))


# ----------------------------------------------------------------------------------------------- what it trains

def train_run(**config) -> train.TrainRun:
    return train.TrainRun(preset="transfer", config={**train.PRESETS["transfer"], **config}, dim_out=4, device="cpu",
                          epochs=2, iters_per_epoch=2, batch_size=4, lr=0.001, milestones=[], gamma=0.1, patience=5,
                          feature_norm="centre", feature_dim=0, feature_whiten=0.0, feature_noise=0.0, threads=1,
                          seed=0)


def test_a_served_vector_without_the_generators_trains_none():
    """What the default trains, it serves: embed_skip 1 serves the input features (and the posterior and semantic
    parts), so the generators keep their initial weights and no epoch runs; with a share for them, they train."""
    data = training_data()
    skip_all = train.Trainer(data, train_run(embed_skip=1.0))
    before = {k: v.clone() for k, v in skip_all.model.state_dict().items()}
    model = skip_all.fit()
    assert skip_all.state["epoch"] == 0 and skip_all.state["history"] == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert 0 < skip_all.state["best_map"] <= 1
    mixed = train.Trainer(data, train_run(embed_skip=0.5))
    start = mixed.model.gen_sk2se[0].weight.clone()
    mixed.fit()
    assert mixed.state["epoch"] == 2 and not torch.equal(start, mixed.model.gen_sk2se[0].weight)
