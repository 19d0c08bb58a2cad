"""The model bundle and its Encoder (sempcyc.runtime.encoder): the feature normalisations, extractors stored once,
the seen-class posterior carried, lines widened as the bundle says, the frozen sketch path.

Small dimensions (helpers.FEAT, SEM, DIM, N_CLS, as the model tests').
"""
from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import DIM, FEAT, N_CLS, SEM
from sempcyc.runtime import backbones
from sempcyc.runtime import model as M
from sempcyc.runtime.encoder import SAME_EXTRACTOR, Encoder, FeatureNorm, bundle_state

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -------------------------------------------------------------------------------------------- feature norm

def test_centre_feature_norm_removes_the_mean_then_projects_to_the_sphere():
    feats = np.random.default_rng(0).normal(3.0, 1.0, (50, FEAT)).astype(np.float32)
    norm = FeatureNorm("centre", FEAT).fit(feats)
    x = torch.from_numpy(feats[:5])
    want = F.normalize(x - torch.from_numpy(feats.mean(0)), dim=1) * FEAT ** 0.5
    assert torch.allclose(norm(x), want, atol=1e-5)
    restored = FeatureNorm("centre", FEAT)
    restored.load_state_dict(norm.state_dict())  # the mean travels in the model bundle
    assert torch.allclose(restored(x), want, atol=1e-5)


def test_feature_norm_standardize_fits_and_inverts():
    rng = np.random.default_rng(0)
    feats = (rng.standard_normal((500, 6)) * [1, 2, 3, 4, 5, 0.5] + [10, -3, 0, 1, 2, 7]).astype(np.float32)
    norm = FeatureNorm("standardize", 6).fit(feats)
    np.testing.assert_allclose(norm.mean.numpy(), feats.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(norm.std.numpy(), feats.std(0), rtol=1e-4)
    x = torch.from_numpy(feats)
    z = norm(x)
    np.testing.assert_allclose(z.mean(0).numpy(), 0, atol=1e-4)
    np.testing.assert_allclose(z.std(0, unbiased=False).numpy(), 1, atol=1e-4)
    np.testing.assert_allclose((z * norm.std + norm.mean).numpy(), feats, rtol=1e-5, atol=1e-4)
    # the fitted statistics travel in the state dict (the model bundle) and reproduce the transform
    again = FeatureNorm("standardize", 6)
    again.load_state_dict(norm.state_dict())
    assert torch.equal(again(x), z)
    # a constant column does not divide by zero
    const = np.ones((10, 6), np.float32)
    assert torch.isfinite(FeatureNorm("standardize", 6).fit(const)(torch.from_numpy(const))).all()


def test_feature_norm_l2_and_none():
    x = torch.randn(7, 16) * 5
    out = FeatureNorm("l2", 16).fit(x.numpy())(x)
    np.testing.assert_allclose(out.norm(dim=1).numpy(), math.sqrt(16), rtol=1e-5)
    cos = F.cosine_similarity(out, x, dim=1)
    np.testing.assert_allclose(cos.numpy(), 1.0, rtol=1e-5)            # direction kept
    none = FeatureNorm("none", 16).fit(x.numpy())
    assert torch.equal(none(x), x)


# -------------------------------------------------------------------------------------------- model bundle

def _bundle(image_differs: bool) -> dict:
    torch.manual_seed(0)
    extractor = backbones.Extractor("tiny", None, pretrained=False)
    sketch_state = extractor.state_dict()
    image_state = {k: v.clone() for k, v in sketch_state.items()}
    if image_differs:
        first = next(iter(image_state))
        image_state[first] = image_state[first] + 1
    cfg = M.Config(feat_dim=64, sem_dim=SEM, dim_out=DIM, n_classes=N_CLS)
    meta = {"backbone": "tiny", "feature_proj_dim": None, "feat_dim": 64, "invert_sketch": True, "photo_edges": True,
            "size": 32}
    norms = {"sketch": FeatureNorm("none", 64), "image": FeatureNorm("none", 64)}
    return bundle_state(meta, cfg, {"sketch_extractor": sketch_state, "image_extractor": image_state}, norms,
                        M.SemPcyc(cfg))


def _save_and_load(bundle: dict, path) -> Encoder:
    buf = io.BytesIO()
    torch.save(bundle, buf)
    path.write_bytes(buf.getvalue())
    return Encoder.load(path)


@pytest.mark.parametrize("image_differs", [False, True])
def test_bundle_stores_equal_extractors_once_and_loads_them_back(tmp_path, image_differs):
    bundle = _bundle(image_differs)
    assert (bundle["image_extractor"] == SAME_EXTRACTOR) is not image_differs
    enc = _save_and_load(bundle, tmp_path / "m.pt")
    assert (enc.image_extractor is enc.sketch_extractor) is not image_differs
    x = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    with torch.inference_mode():
        via_image = enc.image_extractor(backbones.to_input(x, False, 1))
        via_sketch = enc.sketch_extractor(backbones.to_input(x, False, 1))
    assert torch.equal(via_image, via_sketch) is not image_differs


def test_bundle_carries_the_posterior_and_older_bundles_load_without_one(tmp_path):
    bundle = _bundle(False)
    enc_old = _save_and_load(bundle, tmp_path / "old.pt")
    assert enc_old.posterior is None
    cfg = M.Config(feat_dim=64, sem_dim=SEM, dim_out=DIM, n_classes=N_CLS, posterior_weight=1.0)
    model = M.SemPcyc(cfg)
    model.posterior = M.fit_posterior(torch.randn(20, 64), torch.arange(20) % 7, 7)
    bundle = {**bundle, "config": cfg.to_dict(), "posterior": model.posterior.state_dict()}
    enc = _save_and_load(bundle, tmp_path / "new.pt")
    sketches = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    with torch.inference_mode():
        with_head, without = enc.embed_sketches(sketches), enc_old.embed_sketches(sketches)
    assert with_head.shape[1] == without.shape[1] + 7
    assert torch.allclose(with_head[:, -7:].sum(1), torch.ones(3))  # sqrt(1) x a distribution


def test_encoder_widens_lines_as_its_bundle_says(tmp_path):
    assert _save_and_load(_bundle(False), tmp_path / "old.pt").thicken == 1  # bundles from before: as drawn
    bundle = _bundle(False)
    bundle["meta"]["thicken_lines"] = 3
    enc = _save_and_load(bundle, tmp_path / "m.pt")
    sketches = torch.randint(0, 256, (2, 32, 32), dtype=torch.uint8)
    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    with torch.inference_mode():
        want = enc.embed_sketch_features(enc.sketch_extractor(backbones.to_input(sketches, True, 3)))
        assert torch.equal(enc.embed_sketches(sketches), want)
        want = enc.embed_image_features(backbones.extract(enc.image_extractor, images, True, True, 3))
        assert torch.equal(enc.embed_images(images), want)
        frozen = Encoder.load(tmp_path / "m.pt").freeze_sketch_path()
        np.testing.assert_allclose(frozen.embed_sketches(sketches).numpy(), enc.embed_sketches(sketches).numpy(),
                                   atol=1e-5)


def test_frozen_sketch_path_gives_the_eager_embeddings(tmp_path):
    eager = _save_and_load(_bundle(False), tmp_path / "m.pt")
    frozen = Encoder.load(tmp_path / "m.pt").freeze_sketch_path()
    assert isinstance(frozen.sketch_extractor, torch.jit.ScriptModule) and frozen.channels_last
    sketches = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    with torch.inference_mode():
        np.testing.assert_allclose(frozen.embed_sketches(sketches).numpy(), eager.embed_sketches(sketches).numpy(),
                                   atol=1e-5)
        images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
        assert torch.equal(frozen.embed_images(images), eager.embed_images(images))  # images stay eager
