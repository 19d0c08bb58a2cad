"""SEM-PCYC (Dutta & Akata, CVPR 2019) on precomputed features, in one readable file.

Names follow docs/model.md: a = f_sk(x_sk) and b = f_im(x_im) are frozen extractor features (F-dim),
s_raw(y) the class's semantic vector (S-dim), s = A_enc(s_raw) its code in the common space (D-dim).
p = G_sk→se(a) and q = G_im→se(b) are the retrieval embeddings; u = G_se→sk(s), v = G_se→im(s) close the cycles.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Config:
    # sizes, given by the data and model.dim_out
    feat_dim: int                  # F
    sem_dim: int                   # S
    dim_out: int                   # D, the retrieval embedding
    n_classes: int                 # seen (training) classes, for the classifiers
    # the loss configuration: these defaults are the published recipe (preset `original`)
    dropout: float = 0.5
    disc_noise: float = 0.3
    train_classifiers: bool = False  # the original keeps C_se, C_sk, C_im frozen at random init
    lambda_se: float = 10.0
    lambda_im: float = 10.0
    lambda_sk: float = 10.0
    lambda_gen_cyc: float = 1.0
    lambda_gen_adv: float = 1.0
    lambda_gen_cls: float = 1.0
    lambda_gen_reg: float = 0.1
    lambda_disc_se: float = 0.25
    lambda_disc_sk: float = 0.5
    lambda_disc_im: float = 0.5
    lambda_regular: float = 0.001
    # levers beyond the paper (each off here, so `original` stays the published recipe; see docs/model.md)
    ae_linear: bool = False          # autoencoder without its output ReLUs: codes and reconstructions may be negative
    unit_embeddings: bool = False    # embeddings p, q and class codes s on a sphere of radius sqrt(D)
    semantic_classifier: bool = False  # C_se scores an embedding against every class's code (no free weights)
    classifier_temperature: float = 0.1  # cosine logits / temperature, with semantic_classifier
    lambda_code: float = 0.0         # weight of |p - s|^2 + |q - s|^2: each embedding near its class's code
    embed_skip: float = 0.0          # share of the retrieval distance taken from the input features themselves
    posterior_weight: float = 0.0    # with > 0, each embedding ends with sqrt(w) x its seen-class posterior
    posterior_temperature: float = 1.0  # the posterior's softmax temperature
    semantic_weight: float = 0.0     # with > 0 (and a posterior), each embedding also ends with sqrt(w) x the
                                     # unit mean of the training classes' semantic vectors weighted by its posterior
    projection_weight: float = 0.0   # with > 0 (and a posterior head), also sqrt(w) x the features mapped linearly
                                     # into the semantic space (a ridge regression onto the class vectors), unit
    query_expansion: int = 0         # k > 0: a query is averaged with its k nearest gallery items, then ranks again
    gallery_expansion: int = 0       # k > 0: each gallery item averaged with its k nearest (expand_gallery)

    def to_dict(self) -> dict:
        return asdict(self)


def generator(n_in: int, n_out: int, dropout: float, unit: bool = False) -> nn.Sequential:
    hidden = (n_in + n_out) // 2
    layers: list[nn.Module] = []
    for a, b in ((n_in, hidden), (hidden, hidden)):
        layers += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.LeakyReLU(0.2), nn.Dropout(dropout)]
    return nn.Sequential(*layers, nn.Linear(hidden, n_out), *([ToSphere()] if unit else []))


def fuse(x: torch.Tensor, g: torch.Tensor, skip: float) -> torch.Tensor:
    """The retrieval embedding: the generator's output g, or with skip > 0 the input features x and g, each on the
    unit sphere, weighted so a squared distance is skip * |dx|^2 + (1 - skip) * |dg|^2. The input side keeps what
    the (frozen, centred) features know about classes the generators never saw. Unit length overall, so the
    served score exp(-distance) stays between exp(-2) and 1. With skip 1, x alone: no zero-weighted half in every
    gallery vector."""
    if skip <= 0:
        return g
    if skip >= 1:
        return F.normalize(x, dim=-1)
    return torch.cat([skip ** 0.5 * F.normalize(x, dim=-1), (1 - skip) ** 0.5 * F.normalize(g, dim=-1)], -1)


def with_posterior(e: torch.Tensor, x: torch.Tensor, head: SeenPosterior | None, cfg: Config) -> torch.Tensor:
    """The embedding e followed by sqrt(w) x the seen-class posterior of the input features x, when the model has
    a posterior head and posterior_weight w > 0. Its squared distance adds w |P(x) - P(x')|^2: near zero between
    two items of one training class (both peaked on it) or of two novel classes (both diffuse), near w between a
    novel item and a training-class item, so an unseen class's sketch stops finding training-class photos first
    and a training class's sketch finds its own (docs/model.md, the "seen-class posterior" row). With
    semantic_weight w_s > 0, then sqrt(w_s) x the unit vector P(x) S of the training classes' semantic vectors S
    weighted by the posterior (ConSE, Norouzi et al. 2014): an item of a new class lands near the semantics of the
    training classes it resembles, so two items of one new class meet through what their names mean. With
    projection_weight w_p > 0, then sqrt(w_p) x the unit features mapped into the semantic space by the head's
    `projection` (fit_projection): the compatibility classifier whose rows are the class vectors themselves, so a
    new class has a row (its vector) without training."""
    if head is None or max(cfg.posterior_weight, cfg.semantic_weight, cfg.projection_weight) <= 0:
        return e
    p = head(x, cfg.posterior_temperature)
    parts = [e] + ([cfg.posterior_weight ** 0.5 * p] if cfg.posterior_weight > 0 else [])
    if cfg.semantic_weight > 0 and head.semantics.numel():
        parts.append(cfg.semantic_weight ** 0.5 * F.normalize(p @ head.semantics, dim=-1))
    if cfg.projection_weight > 0 and head.projection.numel():
        parts.append(cfg.projection_weight ** 0.5 * F.normalize(F.normalize(x, dim=-1) @ head.projection, dim=-1))
    return torch.cat(parts, -1)


class SeenPosterior(nn.Module):
    """P(class | x) over every training class: softmax of a cosine classifier on the (centred) input features,
    shared by both domains, so a sketch and a photo of one training class get the same peaked posterior."""

    SCALE = 10.0  # unit inputs: logits of a few units from small weights; fit in a few hundred full-batch steps

    def __init__(self, n_in: int, n_classes: int, sem_dim: int = 0, proj_dim: int = 0):
        super().__init__()
        self.linear = nn.Linear(n_in, n_classes)
        self.register_buffer("semantics", torch.zeros(n_classes if sem_dim else 0, sem_dim))  # row = class
        self.register_buffer("projection", torch.zeros(n_in if proj_dim else 0, proj_dim))  # features -> semantics

    def forward(self, x: torch.Tensor, temperature: float) -> torch.Tensor:
        return torch.softmax(self.logits(x) / temperature, -1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.SCALE * self.linear(F.normalize(x, dim=-1))


def fit_posterior(feats: torch.Tensor, labels: torch.Tensor, n_classes: int, steps: int = 300,
                  lr: float = 0.01, weight_decay: float = 1e-4) -> SeenPosterior:
    """A SeenPosterior fitted to (feats, labels) of every training class by full-batch Adam with an L2 penalty,
    from zero weights: no randomness, so the same inputs give the same head."""
    head = SeenPosterior(feats.shape[1], n_classes)
    nn.init.zeros_(head.linear.weight)
    nn.init.zeros_(head.linear.bias)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(head.logits(feats), labels) + weight_decay * head.linear.weight.pow(2).sum()
        loss.backward()
        opt.step()
    return head.eval().requires_grad_(False)


def fit_projection(feats: torch.Tensor, targets: torch.Tensor, ridge: float = 0.1) -> torch.Tensor:
    """(F, S) linear map of unit features onto their classes' semantic vectors `targets` (one row per item): ridge
    regression in closed form, float64, ridge x N on the diagonal; no randomness."""
    x = F.normalize(feats.double(), dim=-1)
    gram = x.T @ x + ridge * len(x) * torch.eye(x.shape[1], dtype=torch.float64)
    return torch.linalg.solve(gram, x.T @ targets.double()).float()


class ToSphere(nn.Module):
    """x / |x| * sqrt(dim): every coordinate of unit scale on average, and lengths no longer carry a class."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) * x.shape[-1] ** 0.5


class GaussianNoise(nn.Module):
    def __init__(self, sigma: float):
        super().__init__()
        self.sigma = sigma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.sigma * torch.randn_like(x) if self.training and self.sigma > 0 else x


def discriminator(n_in: int, noise: float) -> nn.Sequential:
    half = max(n_in // 2, 1)
    return nn.Sequential(GaussianNoise(noise),
                         nn.Linear(n_in, half), nn.BatchNorm1d(half), nn.LeakyReLU(0.2),
                         nn.Linear(half, half), nn.BatchNorm1d(half), nn.LeakyReLU(0.2),
                         nn.Linear(half, 1))


class SemanticAutoencoder(nn.Module):
    def __init__(self, sem_dim: int, dim_out: int, linear: bool = False, unit: bool = False):
        super().__init__()
        out = [] if linear else [nn.ReLU()]
        self.enc = nn.Sequential(nn.Linear(sem_dim, dim_out), *out)
        self.dec = nn.Sequential(nn.Linear(dim_out, sem_dim), *out)
        self.to_sphere = ToSphere() if unit else nn.Identity()

    def code(self, s_raw: torch.Tensor) -> torch.Tensor:
        """s, the class's code in the common space (on the embeddings' sphere when they are)."""
        return self.to_sphere(self.enc(s_raw))

    def forward(self, s_raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        code = self.enc(s_raw)
        return code, self.dec(code)


class SemPcyc(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        F_, D = cfg.feat_dim, cfg.dim_out
        self.gen_sk2se = generator(F_, D, cfg.dropout, cfg.unit_embeddings)
        self.gen_im2se = generator(F_, D, cfg.dropout, cfg.unit_embeddings)
        self.gen_se2sk = generator(D, F_, cfg.dropout)
        self.gen_se2im = generator(D, F_, cfg.dropout)
        self.disc_se = discriminator(D, cfg.disc_noise)
        self.disc_sk = discriminator(F_, cfg.disc_noise)
        self.disc_im = discriminator(F_, cfg.disc_noise)
        self.autoencoder = SemanticAutoencoder(cfg.sem_dim, D, cfg.ae_linear, cfg.unit_embeddings)
        self.cls_se = nn.Linear(D, cfg.n_classes, bias=False)
        self.cls_sk = nn.Linear(F_, cfg.n_classes, bias=False)
        self.cls_im = nn.Linear(F_, cfg.n_classes, bias=False)
        for clf in (self.cls_se, self.cls_sk, self.cls_im):
            clf.requires_grad_(cfg.train_classifiers)
        self.posterior: SeenPosterior | None = None  # fitted after training (train.fit_seen_posterior)

    # --- inference: the only part the service needs
    def embed_sketch(self, a: torch.Tensor) -> torch.Tensor:
        return with_posterior(fuse(a, self.gen_sk2se(a), self.cfg.embed_skip), a, self.posterior, self.cfg)

    def embed_image(self, b: torch.Tensor) -> torch.Tensor:
        return with_posterior(fuse(b, self.gen_im2se(b), self.cfg.embed_skip), b, self.posterior, self.cfg)

    # --- parameter groups, one optimiser each
    def generator_parameters(self) -> list[nn.Parameter]:
        mods = [self.gen_sk2se, self.gen_im2se, self.gen_se2sk, self.gen_se2im]
        if self.cfg.train_classifiers:
            mods += [self.cls_se, self.cls_sk, self.cls_im]
        return [p for m in mods for p in m.parameters()]

    def discriminator_parameters(self) -> list[nn.Parameter]:
        return [p for m in (self.disc_se, self.disc_sk, self.disc_im) for p in m.parameters()]


def gan_loss(pred: torch.Tensor, real: bool) -> torch.Tensor:
    """Least-squares GAN loss against soft, noisy targets: real ~ U[0.7, 1.0], fake ~ U[0, 0.3]."""
    low = 0.7 if real else 0.0
    target = low + 0.3 * torch.rand_like(pred)
    return F.mse_loss(pred, target)


def autoencoder_loss(model: SemPcyc, s_raw: torch.Tensor) -> torch.Tensor:
    _, recon = model.autoencoder(s_raw)
    w_enc = model.autoencoder.enc[0].weight             # (D, S): a column per input dimension
    l21 = w_enc.norm(dim=0).sum()
    return F.mse_loss(recon, s_raw) + model.cfg.lambda_regular * l21 / s_raw.shape[0]


def semantic_logits(model: SemPcyc, x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """C_se: a free linear layer (the paper), or, with semantic_classifier, the cosine of x with every class's
    code over a temperature: the classifier is the class semantics, so it cannot learn around them."""
    if not model.cfg.semantic_classifier:
        return model.cls_se(x)
    return F.normalize(x, dim=-1) @ F.normalize(codes, dim=-1).T / model.cfg.classifier_temperature


def generator_losses(model: SemPcyc, a: torch.Tensor, b: torch.Tensor, s: torch.Tensor,
                     y: torch.Tensor, codes: torch.Tensor) -> dict[str, torch.Tensor]:
    """All generator terms; `s` (the batch's class codes) and `codes` (every training class's code, row = label)
    must already be detached from the autoencoder."""
    c = model.cfg
    p, q = model.gen_sk2se(a), model.gen_im2se(b)
    u, v = model.gen_se2sk(s), model.gen_se2im(s)
    adv = (gan_loss(model.disc_se(q), True) + gan_loss(model.disc_se(p), True)
           + gan_loss(model.disc_im(v), True) + gan_loss(model.disc_sk(u), True))
    cyc = (c.lambda_im * F.l1_loss(model.gen_se2im(q), b) + c.lambda_sk * F.l1_loss(model.gen_se2sk(p), a)
           + c.lambda_se * (F.l1_loss(model.gen_sk2se(u), s) + F.l1_loss(model.gen_im2se(v), s)))
    cls = (c.lambda_se * (F.cross_entropy(semantic_logits(model, q, codes), y)
                          + F.cross_entropy(semantic_logits(model, p, codes), y))
           + c.lambda_sk * F.cross_entropy(model.cls_sk(u), y) + c.lambda_im * F.cross_entropy(model.cls_im(v), y))
    reg = (c.lambda_se * (F.mse_loss(q, p) + F.mse_loss(p, q))
           + c.lambda_im * F.mse_loss(v, b) + c.lambda_sk * F.mse_loss(u, a))
    code = F.mse_loss(p, s) + F.mse_loss(q, s)
    total = (c.lambda_gen_adv * adv + c.lambda_gen_cyc * cyc + c.lambda_gen_cls * cls + c.lambda_gen_reg * reg
             + c.lambda_code * code)
    return {"gen": total, "gen_adv": adv, "gen_cyc": cyc, "gen_cls": cls, "gen_reg": reg, "gen_code": code,
            "_fakes": (p.detach(), q.detach(), u.detach(), v.detach())}


def discriminator_losses(model: SemPcyc, a: torch.Tensor, b: torch.Tensor, s: torch.Tensor,
                         fakes: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    """Discriminator terms on detached generator outputs, so this step never updates a generator."""
    c = model.cfg
    p, q, u, v = (t.detach() for t in fakes)
    s = s.detach()
    d_se = c.lambda_disc_se * (2 * gan_loss(model.disc_se(s), True) + gan_loss(model.disc_se(q), False)
                               + gan_loss(model.disc_se(p), False))
    d_sk = c.lambda_disc_sk * (gan_loss(model.disc_sk(a), True) + gan_loss(model.disc_sk(u), False))
    d_im = c.lambda_disc_im * (gan_loss(model.disc_im(b), True) + gan_loss(model.disc_im(v), False))
    return {"disc": d_se + d_sk + d_im, "disc_se": d_se, "disc_sk": d_sk, "disc_im": d_im}


def make_optimizers(model: SemPcyc, lr: float, momentum: float = 0.9) -> dict[str, torch.optim.Optimizer]:
    return {
        "gen": torch.optim.Adam(model.generator_parameters(), lr=lr),
        "disc": torch.optim.SGD(model.discriminator_parameters(), lr=lr, momentum=momentum),
        "ae": torch.optim.SGD(model.autoencoder.parameters(), lr=100 * lr, momentum=momentum),
    }


class TrainLosses(nn.Module):
    """The three loss phases behind one forward(), so DistributedDataParallel can wrap them and average every
    phase's gradients across processes."""

    def __init__(self, model: SemPcyc):
        super().__init__()
        self.model = model

    def forward(self, phase: str, *args):
        if phase == "ae":
            return autoencoder_loss(self.model, *args)
        if phase == "gen":
            return generator_losses(self.model, *args)
        if phase == "disc":
            return discriminator_losses(self.model, *args)
        raise ValueError(phase)


def train_step(model: SemPcyc, opts: dict, a: torch.Tensor, b: torch.Tensor, sem: torch.Tensor,
               y: torch.Tensor, net: nn.Module | None = None) -> dict[str, float]:
    """One update of autoencoder, generators and discriminators on a batch of same-class (sketch, image) pairs
    of classes `y`; `sem` holds every training class's semantic vector (row = label).
    `net` is TrainLosses(model), possibly wrapped in DistributedDataParallel."""
    net = net if net is not None else TrainLosses(model)
    model.train()
    s_raw = sem[y]
    opts["ae"].zero_grad(set_to_none=True)
    ae = net("ae", s_raw)
    ae.backward()
    opts["ae"].step()

    with torch.no_grad():
        codes = model.autoencoder.code(sem)
    s = codes[y]
    opts["gen"].zero_grad(set_to_none=True)
    g = net("gen", a, b, s, y, codes)
    g["gen"].backward()
    opts["gen"].step()

    opts["disc"].zero_grad(set_to_none=True)
    d = net("disc", a, b, s, g["_fakes"])
    d["disc"].backward()
    opts["disc"].step()
    out = {"ae": ae.item()}
    out.update({k: v.item() for k, v in {**g, **d}.items() if not k.startswith("_")})
    return out
