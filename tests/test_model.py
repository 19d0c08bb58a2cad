"""SEM-PCYC's modules, losses and update rules (sempcyc.runtime.model): structure, the levers beyond the paper,
the seen-class posterior, the losses by hand, where their gradients go, the optimisers and the training step.

Small dimensions throughout (helpers.FEAT = 16, SEM = 12, DIM = 8, N_CLS = 5 classes, BATCH = 8) so every test
runs in milliseconds.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import BATCH, DIM, FEAT, N_CLS, SEM
from sempcyc.runtime import model as M
from sempcyc.runtime import retrieval

pytestmark = pytest.mark.usefixtures("one_torch_thread")


GENERATORS = ("gen_sk2se", "gen_im2se", "gen_se2sk", "gen_se2im")
DISCRIMINATORS = ("disc_se", "disc_sk", "disc_im")
CLASSIFIERS = ("cls_se", "cls_sk", "cls_im")
LOSS_KEYS = {"ae", "gen", "gen_adv", "gen_cyc", "gen_cls", "gen_reg", "gen_code", "disc", "disc_se", "disc_sk",
             "disc_im"}


def make_model(seed: int = 0, **overrides) -> M.SemPcyc:
    torch.manual_seed(seed)
    cfg = M.Config(feat_dim=FEAT, sem_dim=SEM, dim_out=DIM, n_classes=N_CLS, **overrides)
    return M.SemPcyc(cfg)


def make_batch(seed: int = 0, n: int = BATCH):
    """(sketch features, image features, every class's semantic vector (row = label), labels)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, N_CLS, (n,), generator=g)
    sem = torch.rand(N_CLS, SEM, generator=g)
    return torch.randn(n, FEAT, generator=g), torch.randn(n, FEAT, generator=g), sem, y


def codes_of(m: M.SemPcyc, sem: torch.Tensor) -> torch.Tensor:
    return m.autoencoder.code(sem).detach()


def params_of(model: nn.Module, names) -> list[nn.Parameter]:
    return [p for name in names for p in getattr(model, name).parameters()]


def snapshot(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def same(params, snap) -> bool:
    return all(torch.equal(p.detach(), s) for p, s in zip(params, snap, strict=True))


def zero_all_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


# ------------------------------------------------------------------------------------------ module structure

def linear_shapes(seq: nn.Sequential) -> list[tuple[int, int]]:
    return [(m.in_features, m.out_features) for m in seq if isinstance(m, nn.Linear)]


@pytest.mark.parametrize("n_in, n_out", [(FEAT, DIM), (DIM, FEAT), (512, 64), (7, 4)])
def test_generator_structure(n_in, n_out):
    h = (n_in + n_out) // 2
    g = M.generator(n_in, n_out, 0.5)
    kinds = [type(m) for m in g]
    block = [nn.Linear, nn.BatchNorm1d, nn.LeakyReLU, nn.Dropout]
    assert kinds == block + block + [nn.Linear]
    assert linear_shapes(g) == [(n_in, h), (h, h), (h, n_out)]
    for m in g:
        if isinstance(m, nn.BatchNorm1d):
            assert m.num_features == h
        if isinstance(m, nn.LeakyReLU):
            assert m.negative_slope == pytest.approx(0.2)
        if isinstance(m, nn.Dropout):
            assert m.p == pytest.approx(0.5)


@pytest.mark.parametrize("n_in", [FEAT, DIM, 512])
def test_discriminator_structure(n_in):
    d = M.discriminator(n_in, 0.3)
    assert isinstance(d[0], M.GaussianNoise) and d[0].sigma == pytest.approx(0.3)
    half = n_in // 2
    assert linear_shapes(d) == [(n_in, half), (half, half), (half, 1)]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in d) == 2
    slopes = [m.negative_slope for m in d if isinstance(m, nn.LeakyReLU)]
    assert slopes == [pytest.approx(0.2)] * 2
    assert not any(isinstance(m, nn.Dropout) for m in d)


def test_discriminator_noise_only_in_training():
    torch.manual_seed(0)
    noise = M.GaussianNoise(0.3)
    x = torch.zeros(20000, 4)
    noise.train()
    out = noise(x)
    assert out.std().item() == pytest.approx(0.3, rel=0.03)
    assert out.mean().abs().item() < 0.01
    noise.eval()
    assert torch.equal(noise(x), x)
    assert torch.equal(M.GaussianNoise(0.0).train()(x), x)


def test_module_shapes():
    m = make_model()
    a, b, sem, y = make_batch()
    s_raw = sem[y]
    m.train()
    assert m.gen_sk2se(a).shape == (BATCH, DIM)
    assert m.gen_im2se(b).shape == (BATCH, DIM)
    code, recon = m.autoencoder(s_raw)
    assert code.shape == (BATCH, DIM) and recon.shape == (BATCH, SEM)
    assert (code >= 0).all() and (recon >= 0).all()      # Linear + ReLU on both sides
    assert m.gen_se2sk(code).shape == (BATCH, FEAT)
    assert m.gen_se2im(code).shape == (BATCH, FEAT)
    assert m.disc_se(code).shape == (BATCH, 1)
    assert m.disc_sk(a).shape == m.disc_im(b).shape == (BATCH, 1)
    assert m.cls_se(code).shape == (BATCH, N_CLS)
    assert m.cls_sk(a).shape == m.cls_im(b).shape == (BATCH, N_CLS)
    for name in CLASSIFIERS:
        assert getattr(m, name).bias is None
    # inference embeddings are the sk/im -> se generators
    m.eval()
    assert torch.equal(m.embed_sketch(a), m.gen_sk2se(a))
    assert torch.equal(m.embed_image(b), m.gen_im2se(b))


def test_embeddings_deterministic_in_eval_mode_only():
    m = make_model()
    a = make_batch()[0]
    m.eval()
    assert torch.equal(m.embed_sketch(a), m.embed_sketch(a))
    m.train()
    assert not torch.equal(m.embed_sketch(a), m.embed_sketch(a))   # dropout 0.5


# ------------------------------------------------------------------------------- levers beyond the paper

def test_levers_are_off_in_the_published_recipe():
    c = M.Config(feat_dim=FEAT, sem_dim=SEM, dim_out=DIM, n_classes=N_CLS)
    assert (c.ae_linear, c.unit_embeddings, c.semantic_classifier, c.lambda_code) == (False, False, False, 0.0)


def test_linear_autoencoder_can_reconstruct_negative_values():
    """Unit-length sentence vectors are half negative: a ReLU decoder cannot give those back."""
    sem = torch.randn(N_CLS, SEM)
    for linear in (False, True):
        m = make_model(ae_linear=linear)
        opt = torch.optim.Adam(m.autoencoder.parameters(), lr=1e-2)
        for _ in range(300):
            opt.zero_grad()
            M.autoencoder_loss(m, sem).backward()
            opt.step()
        _, recon = m.autoencoder(sem)
        assert bool(recon.min() < 0) is linear
        if linear:  # and it does better than predicting zeros, which the ReLU one cannot beat by much
            assert F.mse_loss(recon, sem) < 0.5 * (sem ** 2).mean()


def test_unit_embeddings_put_embeddings_and_codes_on_one_sphere():
    m = make_model(unit_embeddings=True).eval()
    a, b, sem, _ = make_batch()
    for x in (m.embed_sketch(a), m.embed_image(b), m.autoencoder.code(sem)):
        assert torch.allclose(x.norm(dim=1), torch.full((len(x),), DIM ** 0.5), atol=1e-4)


def test_semantic_classifier_scores_against_the_class_codes():
    m = make_model(semantic_classifier=True, classifier_temperature=0.5)
    a, b, sem, y = make_batch()
    codes = codes_of(m, sem)
    p = m.embed_sketch(a)
    want = F.normalize(p, dim=1) @ F.normalize(codes, dim=1).T / 0.5
    assert torch.allclose(M.semantic_logits(m, p, codes), want)
    M.generator_losses(m, a, b, codes[y], y, codes)["gen"].backward()
    assert all(w.grad is None for w in m.cls_se.parameters())  # the free C_se is not used


def test_code_loss_pulls_embeddings_to_their_class_code():
    m = make_model(lambda_code=2.0)
    a, b, sem, y = make_batch()
    codes = codes_of(m, sem)
    out = M.generator_losses(m, a, b, codes[y], y, codes)
    p, q = out["_fakes"][:2]
    assert out["gen_code"].item() == pytest.approx((F.mse_loss(p, codes[y]) + F.mse_loss(q, codes[y])).item())
    without = M.generator_losses(make_model(lambda_code=0.0), a, b, codes[y], y, codes)
    assert out["gen"].item() == pytest.approx(without["gen"].item() + 2.0 * out["gen_code"].item(), rel=1e-4)


def test_embed_skip_mixes_input_and_generator_distances():
    """With skip w, squared distances are w |dx|^2 + (1 - w) |dg|^2 over unit-length x and g."""
    m = make_model(embed_skip=0.3).eval()
    a, b, _, _ = make_batch()
    ea, eb = m.embed_sketch(a), m.embed_image(b)
    assert ea.shape == (BATCH, FEAT + DIM)
    ua, ub = F.normalize(a, dim=1), F.normalize(b, dim=1)
    ga, gb = F.normalize(m.gen_sk2se(a), dim=1), F.normalize(m.gen_im2se(b), dim=1)
    want = 0.3 * ((ua - ub) ** 2).sum(1) + 0.7 * ((ga - gb) ** 2).sum(1)
    assert torch.allclose(((ea - eb) ** 2).sum(1), want, rtol=1e-4)
    assert torch.allclose(ea.norm(dim=1), torch.ones(BATCH))  # served scores exp(-d) stay in [exp(-2), 1]
    assert torch.equal(make_model(embed_skip=0.0).eval().embed_sketch(a), make_model().eval().gen_sk2se(a))


def test_embed_skip_one_is_the_unit_input_features_alone():
    """With skip 1 the generators have no share of the distance, so the vector carries no half of zeros."""
    a, b, _, _ = make_batch()
    m = make_model(embed_skip=1.0).eval()
    assert torch.allclose(m.embed_sketch(a), F.normalize(a, dim=1))
    assert torch.allclose(m.embed_image(b), F.normalize(b, dim=1))


CENTRES = F.normalize(torch.randn(N_CLS, FEAT, generator=torch.Generator().manual_seed(99)), dim=1)


def _clustered(n_per: int, n_cls: int, seed: int, spread: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of n_cls well separated classes (random unit centres plus noise) and their labels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n_cls).repeat_interleave(n_per)
    return CENTRES[y] + spread * torch.randn(len(y), FEAT, generator=g), y


def _novel(n: int) -> torch.Tensor:
    """Unit features of novel classes: orthogonal to every training class's centre."""
    x = torch.randn(n, FEAT, generator=torch.Generator().manual_seed(5))
    q, _ = torch.linalg.qr(CENTRES.T)
    return F.normalize(x - (x @ q) @ q.T, dim=1)


def test_seen_posterior_is_peaked_on_training_classes_and_diffuse_on_novel_ones():
    feats, y = _clustered(10, 4, seed=0)
    head = M.fit_posterior(feats, y, 4)
    seen, _ = _clustered(3, 4, seed=1)                 # new items of the training classes
    novel = _novel(12)
    p_seen, p_novel = head(seen, 1.0), head(novel, 1.0)
    assert torch.equal(p_seen.argmax(1), torch.arange(4).repeat_interleave(3))
    assert p_seen.max(1).values.min() > 0.9 and p_novel.max(1).values.mean() < 0.7
    assert head(seen, 2.0).max(1).values.mean() < p_seen.max(1).values.mean()  # a higher temperature flattens
    again = M.fit_posterior(feats, y, 4)                # full batch from zeros: the same weights every time
    assert torch.equal(again.linear.weight, head.linear.weight)


def test_posterior_part_of_the_embedding_separates_novel_items_from_training_class_items():
    """Appended sqrt(w) P(x): squared distances grow by w |P(x) - P(x')|^2, nothing else changes."""
    feats, y = _clustered(10, N_CLS, seed=0)
    m = make_model(embed_skip=0.5, posterior_weight=2.0).eval().requires_grad_(False)
    plain = m.embed_sketch(feats)
    m.posterior = M.fit_posterior(feats, y, N_CLS)
    e = m.embed_sketch(feats)
    assert e.shape == (len(feats), FEAT + DIM + N_CLS) and torch.equal(e[:, :FEAT + DIM], plain)
    p = m.posterior(feats, 1.0)
    assert torch.allclose(e[:, FEAT + DIM:], 2.0 ** 0.5 * p)
    k = FEAT + DIM
    en, ef = m.embed_image(_novel(1)), m.embed_image(feats)
    extra = ((en - ef) ** 2).sum(1) - ((en[:, :k] - ef[:, :k]) ** 2).sum(1)
    assert torch.allclose(extra, 2.0 * ((m.posterior(_novel(1), 1.0) - p) ** 2).sum(1), atol=1e-5)
    assert extra.mean() > 0.5                           # a novel photo is pushed away from the training items
    m.cfg.posterior_weight = 0.0
    assert torch.equal(m.embed_sketch(feats), plain)    # weight 0 (the `original` preset): the embedding alone


def test_config_round_trip():
    cfg = M.Config(feat_dim=FEAT, sem_dim=SEM, dim_out=DIM, n_classes=N_CLS, lambda_se=1.0)
    assert M.Config(**cfg.to_dict()) == cfg
    defaults = M.Config(feat_dim=FEAT, sem_dim=SEM, dim_out=DIM, n_classes=N_CLS)  # the published recipe
    assert (defaults.lambda_se, defaults.lambda_im, defaults.lambda_sk) == (10.0, 10.0, 10.0)
    assert (defaults.lambda_gen_cyc, defaults.lambda_gen_adv, defaults.lambda_gen_cls) == (1.0, 1.0, 1.0)
    assert defaults.lambda_gen_reg == 0.1
    assert (defaults.lambda_disc_se, defaults.lambda_disc_sk, defaults.lambda_disc_im) == (0.25, 0.5, 0.5)
    assert defaults.lambda_regular == 0.001
    assert defaults.train_classifiers is False


# ------------------------------------------------------------------------------------------------- losses

def gan_targets(pred_value: float, real: bool, n: int = 20000) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss and the targets gan_loss drew: for L = mean((pred - t)^2), dL/dpred = 2 (pred - t) / n."""
    pred = torch.full((n, 1), pred_value, requires_grad=True)
    loss = M.gan_loss(pred, real)
    loss.backward()
    return loss.detach(), (pred - pred.grad * n / 2).detach()


def test_gan_loss_targets_real_in_07_10():
    torch.manual_seed(0)
    loss, t = gan_targets(0.85, real=True)
    assert loss.item() <= 0.15 ** 2
    assert t.min().item() >= 0.7 - 1e-5 and t.max().item() <= 1.0 + 1e-5
    assert t.min().item() < 0.71 and t.max().item() > 0.99          # noisy, spread over the whole range
    assert t.mean().item() == pytest.approx(0.85, abs=0.01)


def test_gan_loss_targets_fake_in_00_03():
    torch.manual_seed(1)
    loss, t = gan_targets(0.0, real=False)
    assert loss.item() <= 0.3 ** 2
    assert t.min().item() >= -1e-5 and t.max().item() <= 0.3 + 1e-5
    assert t.min().item() < 0.01 and t.max().item() > 0.29
    assert t.mean().item() == pytest.approx(0.15, abs=0.01)
    # a confident wrong answer costs much more than a right one
    assert M.gan_loss(torch.ones(1000, 1), real=False) > 0.49
    assert M.gan_loss(torch.zeros(1000, 1), real=True) > 0.49


def test_autoencoder_loss_by_hand():
    m = make_model(lambda_regular=0.5)      # large enough that the regulariser matters numerically
    sem, y = make_batch()[2:]
    s_raw = sem[y]
    loss = M.autoencoder_loss(m, s_raw)
    w, bias = m.autoencoder.enc[0].weight.detach(), m.autoencoder.enc[0].bias.detach()
    w2, b2 = m.autoencoder.dec[0].weight.detach(), m.autoencoder.dec[0].bias.detach()
    code = torch.clamp(s_raw @ w.T + bias, min=0)
    recon = torch.clamp(code @ w2.T + b2, min=0)
    mse = ((recon - s_raw) ** 2).sum() / (BATCH * SEM)
    assert w.shape == (DIM, SEM)
    col_norms = [math.sqrt(sum(float(w[i, j]) ** 2 for i in range(DIM))) for j in range(SEM)]  # one per input dim
    expected = float(mse) + 0.5 * sum(col_norms) / BATCH
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # the regulariser is there: lambda 0 gives the plain reconstruction error
    m.cfg.lambda_regular = 0.0
    assert M.autoencoder_loss(m, s_raw).item() == pytest.approx(float(mse), rel=1e-5)


def test_generator_loss_is_weighted_sum_of_terms():
    m = make_model(lambda_gen_adv=2.0, lambda_gen_cyc=3.0, lambda_gen_cls=0.5, lambda_gen_reg=0.25)
    a, b, sem, y = make_batch()
    m.train()
    out = M.generator_losses(m, a, b, codes_of(m, sem)[y], y, codes_of(m, sem))
    expected = 2.0 * out["gen_adv"] + 3.0 * out["gen_cyc"] + 0.5 * out["gen_cls"] + 0.25 * out["gen_reg"]
    assert out["gen"].item() == pytest.approx(expected.item(), rel=1e-6)
    p, q, u, v = out["_fakes"]
    assert p.shape == q.shape == (BATCH, DIM) and u.shape == v.shape == (BATCH, FEAT)
    assert not any(t.requires_grad for t in out["_fakes"])


def test_regression_and_classification_terms_by_hand():
    """In eval mode (no dropout, no noise; only the GAN targets stay random) the cls and reg terms are exact."""
    m = make_model(lambda_se=2.0, lambda_im=3.0, lambda_sk=5.0)
    a, b, sem, y = make_batch()
    s_raw = sem[y]
    m.eval()
    s = m.autoencoder.enc(s_raw).detach()
    out = M.generator_losses(m, a, b, s, y, codes_of(m, sem))
    with torch.no_grad():
        p, q, u, v = m.gen_sk2se(a), m.gen_im2se(b), m.gen_se2sk(s), m.gen_se2im(s)
        reg = 2.0 * 2 * ((p - q) ** 2).mean() + 3.0 * ((v - b) ** 2).mean() + 5.0 * ((u - a) ** 2).mean()
        cls = (2.0 * (F.cross_entropy(m.cls_se(q), y) + F.cross_entropy(m.cls_se(p), y))
               + 5.0 * F.cross_entropy(m.cls_sk(u), y) + 3.0 * F.cross_entropy(m.cls_im(v), y))
        cyc = (3.0 * (m.gen_se2im(q) - b).abs().mean() + 5.0 * (m.gen_se2sk(p) - a).abs().mean()
               + 2.0 * ((m.gen_sk2se(u) - s).abs().mean() + (m.gen_im2se(v) - s).abs().mean()))
    assert out["gen_reg"].item() == pytest.approx(reg.item(), rel=1e-5)
    assert out["gen_cls"].item() == pytest.approx(cls.item(), rel=1e-5)
    assert out["gen_cyc"].item() == pytest.approx(cyc.item(), rel=1e-5)


# ------------------------------------------------------------------------------------------ gradient flow

def test_generator_loss_gradients_frozen_classifiers():
    m = make_model()
    a, b, sem, y = make_batch()
    s_raw = sem[y]
    m.train()
    s = m.autoencoder.enc(s_raw).detach()
    zero_all_grads(m)
    M.generator_losses(m, a, b, s, y, codes_of(m, sem))["gen"].backward()
    for name in GENERATORS:
        grads = [p.grad for p in getattr(m, name).parameters()]
        assert all(g is not None for g in grads), name
        assert any(g.abs().sum() > 0 for g in grads), name
    for name in CLASSIFIERS:
        clf = getattr(m, name)
        assert clf.weight.requires_grad is False
        assert clf.weight.grad is None
    assert all(p.grad is None for p in m.autoencoder.parameters())
    gen_ids = {id(p) for p in m.generator_parameters()}
    assert gen_ids == {id(p) for p in params_of(m, GENERATORS)}
    assert not gen_ids & {id(p) for p in params_of(m, CLASSIFIERS)}


def test_generator_loss_gradients_trained_classifiers():
    m = make_model(train_classifiers=True)
    a, b, sem, y = make_batch()
    m.train()
    zero_all_grads(m)
    M.generator_losses(m, a, b, codes_of(m, sem)[y], y, codes_of(m, sem))["gen"].backward()
    for name in CLASSIFIERS:
        clf = getattr(m, name)
        assert clf.weight.requires_grad
        assert clf.weight.grad is not None and clf.weight.grad.abs().sum() > 0
    gen_ids = {id(p) for p in m.generator_parameters()}
    assert {id(p) for p in params_of(m, CLASSIFIERS)} <= gen_ids
    assert gen_ids == {id(p) for p in params_of(m, GENERATORS + CLASSIFIERS)}
    assert all(p.grad is None for p in m.autoencoder.parameters())


def test_discriminator_loss_gradients_reach_discriminators_only():
    m = make_model()
    a, b, sem, y = make_batch()
    s_raw = sem[y]
    m.train()
    s = m.autoencoder.enc(s_raw)              # NOT detached: discriminator_losses must detach it itself
    # fakes straight from the generators, still attached to their graphs
    fakes = (m.gen_sk2se(a), m.gen_im2se(b), m.gen_se2sk(s), m.gen_se2im(s))
    assert all(t.requires_grad for t in fakes)
    zero_all_grads(m)
    out = M.discriminator_losses(m, a, b, s, fakes)
    assert set(out) == {"disc", "disc_se", "disc_sk", "disc_im"}
    assert out["disc"].item() == pytest.approx((out["disc_se"] + out["disc_sk"] + out["disc_im"]).item(), rel=1e-6)
    out["disc"].backward()
    for name in DISCRIMINATORS:
        grads = [p.grad for p in getattr(m, name).parameters()]
        assert all(g is not None for g in grads), name
        assert any(g.abs().sum() > 0 for g in grads), name
    assert all(p.grad is None for p in params_of(m, GENERATORS)), "a generator got a discriminator gradient"
    assert all(p.grad is None for p in m.autoencoder.parameters())
    assert all(p.grad is None for p in params_of(m, CLASSIFIERS))


def test_discriminator_loss_weights():
    m = make_model(lambda_disc_se=0.0, lambda_disc_sk=0.0, lambda_disc_im=2.0)
    a, b, sem, y = make_batch()
    s_raw = sem[y]
    m.train()
    s = m.autoencoder.enc(s_raw).detach()
    fakes = M.generator_losses(m, a, b, s, y, codes_of(m, sem))["_fakes"]
    out = M.discriminator_losses(m, a, b, s, fakes)
    assert out["disc_se"].item() == 0.0 and out["disc_sk"].item() == 0.0
    assert out["disc_im"].item() > 0.0
    zero_all_grads(m)
    out["disc"].backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in params_of(m, ("disc_se", "disc_sk")))


# ------------------------------------------------------------------------------------------ optimisers, steps

def test_make_optimizers():
    m = make_model()
    lr = 3e-4
    opts = M.make_optimizers(m, lr)
    assert set(opts) == {"gen", "disc", "ae"}
    gen, disc, ae = opts["gen"], opts["disc"], opts["ae"]
    assert isinstance(gen, torch.optim.Adam)
    assert type(disc) is torch.optim.SGD and type(ae) is torch.optim.SGD

    def group_ids(opt):
        return {id(p) for g in opt.param_groups for p in g["params"]}

    assert gen.param_groups[0]["lr"] == pytest.approx(lr)
    assert disc.param_groups[0]["lr"] == pytest.approx(lr)
    assert disc.param_groups[0]["momentum"] == pytest.approx(0.9)
    assert ae.param_groups[0]["lr"] == pytest.approx(100 * lr)
    assert ae.param_groups[0]["momentum"] == pytest.approx(0.9)
    assert group_ids(gen) == {id(p) for p in params_of(m, GENERATORS)}
    assert group_ids(disc) == {id(p) for p in params_of(m, DISCRIMINATORS)}
    assert group_ids(ae) == {id(p) for p in m.autoencoder.parameters()}
    # trained classifiers join the generators' optimiser
    m2 = make_model(train_classifiers=True)
    assert group_ids(M.make_optimizers(m2, lr)["gen"]) == {id(p) for p in params_of(m2, GENERATORS + CLASSIFIERS)}


def test_train_step_updates_and_isolation():
    m = make_model()
    opts = M.make_optimizers(m, 1e-3)
    a, b, sem, y = make_batch()
    gen_p, disc_p = params_of(m, GENERATORS), params_of(m, DISCRIMINATORS)
    ae_p, cls_p = list(m.autoencoder.parameters()), params_of(m, CLASSIFIERS)
    gen0, disc0, ae0, cls0 = snapshot(gen_p), snapshot(disc_p), snapshot(ae_p), snapshot(cls_p)

    seen = {}

    def before_disc_step(opt, args, kwargs):
        # the autoencoder and generator updates are done; the discriminators' own step has not run yet
        seen["disc_unchanged"] = same(disc_p, disc0)
        seen["gen_before_disc"] = snapshot(gen_p)

    def after_ae_step(opt, args, kwargs):
        seen["ae_grads"] = snapshot(p.grad for p in ae_p)

    h1 = opts["disc"].register_step_pre_hook(before_disc_step)
    h2 = opts["ae"].register_step_post_hook(after_ae_step)
    out = M.train_step(m, opts, a, b, sem, y)
    h1.remove(), h2.remove()

    assert set(out) == LOSS_KEYS
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.values()), out
    assert m.training
    # everything trainable moved
    assert not same(gen_p, gen0)
    assert not same(disc_p, disc0)
    assert not same(ae_p, ae0)
    # the frozen classifiers stay bit-identical
    assert same(cls_p, cls0)
    assert all(p.grad is None for p in cls_p)
    # the generator phase left the discriminator weights alone ...
    assert seen["disc_unchanged"]
    # ... and the discriminator step left the generators alone
    assert same(gen_p, seen["gen_before_disc"])
    # the discriminators' change is exactly their own first SGD step: -lr * (their own loss's gradient)
    for p, p0 in zip(disc_p, disc0):
        np.testing.assert_allclose(p.detach().numpy(), (p0 - 1e-3 * p.grad).numpy(), rtol=0, atol=1e-7)
    # the generator and discriminator phases added nothing to the autoencoder's gradients (s is detached)
    assert same([p.grad for p in ae_p], seen["ae_grads"])


def test_train_step_matches_manual_phases():
    """train_step == the three phases run by hand with the same optimisers and random stream."""
    a, b, sem, y = make_batch(3)
    s_raw = sem[y]
    m1, m2 = make_model(5), make_model(5)
    o1, o2 = M.make_optimizers(m1, 1e-3), M.make_optimizers(m2, 1e-3)
    torch.manual_seed(11)
    out = M.train_step(m1, o1, a, b, sem, y)

    torch.manual_seed(11)
    m2.train()
    o2["ae"].zero_grad()
    ae = M.autoencoder_loss(m2, s_raw)
    ae.backward()
    o2["ae"].step()
    s = codes_of(m2, sem)[y]
    o2["gen"].zero_grad()
    g = M.generator_losses(m2, a, b, s, y, codes_of(m2, sem))
    g["gen"].backward()
    disc_before = snapshot(m2.discriminator_parameters())
    o2["gen"].step()
    assert same(m2.discriminator_parameters(), disc_before)
    o2["disc"].zero_grad()
    d = M.discriminator_losses(m2, a, b, s, g["_fakes"])
    d["disc"].backward()
    o2["disc"].step()

    assert out["ae"] == pytest.approx(ae.item()) and out["gen"] == pytest.approx(g["gen"].item())
    assert out["disc"] == pytest.approx(d["disc"].item())
    for (n1, p1), (_, p2) in zip(m1.named_parameters(), m2.named_parameters(), strict=True):
        assert torch.allclose(p1, p2, rtol=0, atol=1e-7), n1


def test_train_step_with_trained_classifiers_updates_them():
    m = make_model(train_classifiers=True)
    opts = M.make_optimizers(m, 1e-3)
    cls0 = snapshot(params_of(m, CLASSIFIERS))
    M.train_step(m, opts, *make_batch())
    for p, p0 in zip(params_of(m, CLASSIFIERS), cls0):
        assert not torch.equal(p.detach(), p0)


def test_train_losses_rejects_unknown_phase():
    with pytest.raises(ValueError):
        M.TrainLosses(make_model())("nope")


def test_training_on_easy_problem_decreases_generator_loss():
    m = make_model(0)
    opts = M.make_optimizers(m, 1e-3)
    g = torch.Generator().manual_seed(0)
    proto_sk, proto_im = torch.randn(N_CLS, FEAT, generator=g) * 2, torch.randn(N_CLS, FEAT, generator=g) * 2
    sem = torch.rand(N_CLS, SEM, generator=g)

    def batch(n):
        y = torch.randint(0, N_CLS, (n,), generator=g)
        return (proto_sk[y] + 0.3 * torch.randn(n, FEAT, generator=g),
                proto_im[y] + 0.3 * torch.randn(n, FEAT, generator=g), sem, y)

    def unseen_map():
        a, b, _, y = batch(100)
        m.eval()
        with torch.no_grad():
            d = retrieval.squared_distances(m.embed_sketch(a).numpy(), m.embed_image(b).numpy())
        m.train()
        return retrieval.retrieval_metrics(d, y.numpy(), y.numpy())["map_all"]

    map_before = unseen_map()                  # measured ~0.35 (chance 0.2)
    hist = [M.train_step(m, opts, *batch(32)) for _ in range(300)]
    first, last = np.mean([h["gen"] for h in hist[:20]]), np.mean([h["gen"] for h in hist[-20:]])
    assert last < 0.85 * first, (first, last)  # measured 121 -> 91
    assert np.mean([h["ae"] for h in hist[-20:]]) < np.mean([h["ae"] for h in hist[:20]])
    map_after = unseen_map()                   # measured ~0.99
    assert map_after > 0.8 and map_after > map_before + 0.2, (map_before, map_after)
