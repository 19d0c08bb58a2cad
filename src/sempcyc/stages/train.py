"""train stage: SEM-PCYC on the cached extractor features of the seen classes.

Class-balanced (sketch, image) pairs of the same class; autoencoder, generators and discriminators updated per
batch (runtime.model.train_step); validation mAP@all on held-out training-side classes after every epoch drives
early stopping; the best epoch's weights are kept. A checkpoint after every epoch lets an interrupted run resume.

One process (what `dvc repro train` runs):
    sempcyc train --features models/features --train data/prepared/train --out models/sem_pcyc.pt
Data-parallel with DistributedDataParallel (gloo on CPU, nccl on GPU), e.g. 4 GPUs of one machine:
    torchrun --standalone --nproc_per_node 4 -m sempcyc.cli train --features models/features \
        --train data/prepared/train --out models/sem_pcyc.pt          # with train.device: cuda
Several machines: the same on each, with --nnodes N --node_rank i --rdzv_backend c10d --rdzv_endpoint HOST:PORT.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from dvclive import Live

from .. import params as params_mod
from ..errors import UserError
from ..fsutil import atomic_write_bytes
from ..recipe import PRESETS, ModelSettings, TrainSettings, pick_device, torchrun_ranks
from ..runtime.encoder import FeatureNorm, bundle_state
from ..runtime.model import (
    Config,
    SemPcyc,
    TrainLosses,
    fit_posterior,
    fit_projection,
    make_optimizers,
    train_step,
)
from ..runtime.retrieval import average_precisions, squared_distances
from ..shards import load_train_shard


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--features", default="models/features", help="features stage output (default: %(default)s)")
    parser.add_argument("--train", default="data/prepared/train", help="training shard (default: %(default)s)")
    parser.add_argument("--out", default="models/sem_pcyc.pt", help="model bundle (default: %(default)s)")
    parser.add_argument("--live-dir", default="dvclive", help="DVCLive folder (default: %(default)s)")
    parser.add_argument("--checkpoint", default="models/train-checkpoint.pt",
                        help="per-epoch checkpoint; an interrupted run with the same inputs resumes from it")
    parser.add_argument("--resume", metavar="CHECKPOINT",
                        help="resume from this checkpoint; refused if it was made for another architecture")


@dataclass(frozen=True)
class TrainRun:
    """What one training run reads: the train section, model.dim_out and model.preset, and the loss
    configuration (the preset with model.overrides on top)."""
    preset: str
    config: dict
    dim_out: int
    device: str
    epochs: int
    iters_per_epoch: int
    batch_size: int
    lr: float
    milestones: list
    gamma: float
    patience: int
    feature_norm: str
    feature_dim: int
    feature_whiten: float
    feature_noise: float
    threads: int
    seed: int


def read_settings(params: dict, source: str = params_mod.PARAMS_FILE) -> TrainRun:
    model = params_mod.read_section(params, ModelSettings, source)
    train = params_mod.read_section(params, TrainSettings, source)
    if train.feature_dim and train.feature_norm != "centre":
        raise UserError(f"{source}: train.feature_dim {train.feature_dim} projects centred features; set "
                        "train.feature_norm: centre, or train.feature_dim: 0")
    if train.feature_whiten and train.feature_norm != "centre":
        raise UserError(f"{source}: train.feature_whiten {train.feature_whiten} whitens centred features; set "
                        "train.feature_norm: centre, or train.feature_whiten: 0")
    return TrainRun(preset=model.preset, config=loss_config(model), dim_out=model.dim_out,
                    **dataclasses.asdict(train))


def loss_config(model: ModelSettings) -> dict:
    """The Config fields the preset and model.overrides set, each checked against Config's field types."""
    overrides = model.overrides
    fields = Config.__dataclass_fields__
    free = [f for f in fields if fields[f].default is not dataclasses.MISSING]
    unknown = [k for k in overrides if k not in free]
    if unknown:
        raise UserError(f"params.yaml: model.overrides must map Config fields to values; unknown: {unknown}. "
                        f"Known: {', '.join(free)}")
    cfg = {**PRESETS[model.preset], **overrides}
    for key, value in cfg.items():
        want = type(fields[key].default)
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            cfg[key] = float(value)
        elif not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise UserError(f"params.yaml: model.overrides.{key} must be {want.__name__}, got {value!r}")
        if (key.startswith("lambda") or key in ("posterior_weight", "semantic_weight", "projection_weight",
                                                "query_expansion", "gallery_expansion")) and value < 0:
            raise UserError(f"params.yaml: model.overrides.{key} must be >= 0, got {value!r}")
        if key == "posterior_temperature" and value <= 0:
            raise UserError(f"params.yaml: model.overrides.{key} must be > 0, got {value!r}")
        if key == "embed_skip" and not 0 <= value <= 1:
            raise UserError(f"params.yaml: model.overrides.{key} must be between 0 and 1, got {value!r}")
    return cfg


class PairSampler:
    """Batches of (sketch, image) index pairs of the same class, every class equally likely (class-balanced,
    as the original's weighted sampler over per-class pairs)."""

    def __init__(self, sketch_labels: np.ndarray, image_labels: np.ndarray, seed: int):
        self.classes = np.intersect1d(np.unique(sketch_labels), np.unique(image_labels))
        self.sketches = {c: np.flatnonzero(sketch_labels == c) for c in self.classes}
        self.images = {c: np.flatnonzero(image_labels == c) for c in self.classes}
        self.rng = np.random.default_rng(seed)

    def batch(self, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cls = self.rng.choice(self.classes, size=size)
        sk = np.array([self.rng.choice(self.sketches[c]) for c in cls])
        im = np.array([self.rng.choice(self.images[c]) for c in cls])
        return sk, im, cls


def validation_map(embed_sketch, embed_image, sk_feats, sk_labels, im_feats, im_labels) -> float:
    with torch.inference_mode():
        p = embed_sketch(torch.from_numpy(sk_feats)).numpy()
        q = embed_image(torch.from_numpy(im_feats)).numpy()
    return float(np.nanmean(average_precisions(squared_distances(p, q), sk_labels, im_labels)))


def fingerprint(settings: dict, features_dir: Path, train_dir: Path) -> str:
    """Identity of a training run's inputs: a checkpoint is resumed only when this matches."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for path in [features_dir / "train_sketches.npy", features_dir / "train_images.npy",
                 train_dir / "semantic.npy", train_dir / "classes.json"]:
        h.update(path.read_bytes())
    return h.hexdigest()


def load_training_data(features_dir: Path, train_dir: Path, s: TrainRun) -> dict:
    """Cached features of the training shard, split into fit and validation classes, normalised as
    train.feature_norm says (statistics from the fit classes only)."""
    try:
        extractors = torch.load(features_dir / "extractors.pt", map_location="cpu", weights_only=True)
        sk_all = np.load(features_dir / "train_sketches.npy")
        im_all = np.load(features_dir / "train_images.npy")
    except FileNotFoundError as exc:
        raise UserError(f"{exc.filename}: missing; run `dvc repro features`") from None
    shard = load_train_shard(train_dir)
    classes, meta = shard["classes"], extractors["meta"]
    sk_labels, im_labels = shard["sketches_labels"], shard["images_labels"]
    if len(sk_all) != len(sk_labels) or len(im_all) != len(im_labels):
        raise UserError(f"{features_dir} does not match {train_dir}; rerun `dvc repro features`")
    val_names = sorted(meta["validation_classes"])
    fit_classes = meta["fit_classes"]
    if len(fit_classes) < 2:
        raise UserError(f"only {len(fit_classes)} training class(es) left after holding out validation classes; "
                        "add classes or lower split.val_fraction")
    fit_index = {c: i for i, c in enumerate(fit_classes)}
    val_index = {c: i for i, c in enumerate(val_names)}
    sk_fit = np.array([classes[lab] in fit_index for lab in sk_labels], dtype=bool)
    im_fit = np.array([classes[lab] in fit_index for lab in im_labels], dtype=bool)
    if s.batch_size > int(sk_fit.sum()):
        raise UserError(f"train.batch_size {s.batch_size} is larger than the {int(sk_fit.sum())} training "
                        "sketches; lower it")
    norms = fit_norms(sk_all, im_all, sk_fit, im_fit, s)
    with torch.no_grad():
        sk_feats = norms["sketch"](torch.from_numpy(sk_all)).numpy()
        im_feats = norms["image"](torch.from_numpy(im_all)).numpy()
    sem_by_name = dict(zip(classes, shard["semantic"]))
    return {
        "meta": meta, "extractors": extractors, "norms": norms, "fit_classes": fit_classes, "val_names": val_names,
        "fit_sk": sk_feats[sk_fit], "fit_sk_y": np.array([fit_index[classes[lab]] for lab in sk_labels[sk_fit]]),
        "fit_im": im_feats[im_fit], "fit_im_y": np.array([fit_index[classes[lab]] for lab in im_labels[im_fit]]),
        "val_sk": sk_feats[~sk_fit], "val_sk_y": np.array([val_index[classes[lab]] for lab in sk_labels[~sk_fit]]),
        "val_im": im_feats[~im_fit], "val_im_y": np.array([val_index[classes[lab]] for lab in im_labels[~im_fit]]),
        "fit_sem": np.stack([sem_by_name[c] for c in fit_classes]).astype(np.float32),
        "class_sem": np.stack([sem_by_name[c] for c in [*fit_classes, *val_names]]).astype(np.float32),
        "baseline_norms": baseline_norms(features_dir, sk_fit, im_fit, s),
    }


def fit_norms(sk_all: np.ndarray, im_all: np.ndarray, sk_fit: np.ndarray, im_fit: np.ndarray,
              s: TrainRun) -> dict[str, FeatureNorm]:
    """Each domain's FeatureNorm (train.feature_norm, feature_dim, feature_whiten), fitted on the fit classes."""
    basis = shared_basis(sk_all[sk_fit], im_all[im_fit], s.feature_dim) if s.feature_dim else None
    out_dim = normed_dim(s, sk_all.shape[1])
    return {domain: FeatureNorm(s.feature_norm, feats.shape[1], out_dim).fit(
        feats[fit], partial_whitening(feats[fit], basis, s.feature_whiten) if s.feature_whiten else basis)
        for domain, feats, fit in (("sketch", sk_all, sk_fit), ("image", im_all, im_fit))}


def baseline_norms(features_dir: Path, sk_fit: np.ndarray, im_fit: np.ndarray, s: TrainRun) -> dict | None:
    """With tuned blocks (features.tune_blocks), the same normalisation fitted on the untuned backbone's features
    (backbone_*.npy): evaluate's model-input baseline reads the backbone through it. None otherwise (frozen
    extractors: the model's own norms serve; fine-tuned ones: no such baseline)."""
    files = [features_dir / f"backbone_{part}.npy" for part in ("sketches", "images")]
    if not all(f.exists() for f in files):
        return None
    return fit_norms(np.load(files[0]), np.load(files[1]), sk_fit, im_fit, s)


def normed_dim(s: TrainRun, feat_dim: int) -> int | None:
    """The width FeatureNorm projects to: train.feature_dim, or with whitening alone the features' own width."""
    return s.feature_dim or (feat_dim if s.feature_whiten else None)


def partial_whitening(feats: np.ndarray, basis: np.ndarray | None, alpha: float) -> np.ndarray:
    """basis (or the identity) times C^(-alpha/2), C the covariance of `feats` (one domain's fit-class features)
    centred and projected on basis: 0 keeps the features, 1 whitens them fully. Eigenvalues are floored at 1e-6
    of the largest, so directions the fit classes barely span are not blown up. Why: on the cross-artist
    validation classes, alpha 0.25 per domain raised the centred features' zero-shot mAP@all from 0.472 to 0.490
    (README "Quality"): each domain's few dominant directions (stroke width, colour) stop swamping the rest."""
    proj = np.eye(feats.shape[1]) if basis is None else basis.astype(np.float64)
    x = (feats - feats.mean(0)).astype(np.float64) @ proj
    eigval, eigvec = np.linalg.eigh(x.T @ x / max(len(x) - 1, 1))
    eigval = np.maximum(eigval, 1e-6 * max(eigval.max(), 1e-30))
    return np.ascontiguousarray(proj @ (eigvec * eigval ** (-alpha / 2)) @ eigvec.T, dtype=np.float32)


def shared_basis(sketches: np.ndarray, images: np.ndarray, k: int) -> np.ndarray:
    """(dim, k): the top-k principal directions of both domains' features, each centred on its own mean, so
    sketches and images are projected into the same coordinates."""
    x = np.concatenate([sketches - sketches.mean(0), images - images.mean(0)]).astype(np.float64)
    if k > min(x.shape):
        raise UserError(f"train.feature_dim {k} is more than the {min(x.shape)} the training features allow; "
                        "lower it")
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    vt *= np.sign(vt[:, :1] + (vt[:, :1] == 0))  # a fixed sign per direction: the same basis on every machine
    return np.ascontiguousarray(vt[:k].T, dtype=np.float32)


class Trainer:
    """The SEM-PCYC training loop on cached features: epochs of class-balanced batches, validation mAP after
    each, the best weights kept. Checkpointing and logging are left to the caller (`on_epoch`)."""

    def __init__(self, data: dict, s: TrainRun, device: str = "cpu", rank: int = 0, world: int = 1):
        self.data, self.s, self.device, self.rank, self.world = data, s, device, rank, world
        self.cfg = Config(feat_dim=data["fit_sk"].shape[1], sem_dim=data["fit_sem"].shape[1], dim_out=s.dim_out,
                          n_classes=len(data["fit_classes"]), **s.config)
        torch.manual_seed(s.seed)
        self.model = SemPcyc(self.cfg).to(device)
        self.opts = make_optimizers(self.model, s.lr)
        self.scheds = {k: torch.optim.lr_scheduler.MultiStepLR(o, s.milestones, s.gamma)
                       for k, o in self.opts.items()}
        self.net = TrainLosses(self.model).to(device)
        if world > 1:
            self.net = nn.parallel.DistributedDataParallel(self.net, find_unused_parameters=True)
        self.sampler = PairSampler(data["fit_sk_y"], data["fit_im_y"], s.seed + 1000 * rank)
        self.fit_sem = torch.from_numpy(data["fit_sem"]).to(device)
        self.state = {"epoch": 0, "best_map": -1.0, "best_epoch": 0, "bad_epochs": 0, "history": []}
        self.best = None
        self.pairs = 0

    def checkpoint(self, fingerprint: str) -> dict:
        return {"fingerprint": fingerprint, "config": self.cfg.to_dict(), "model": self.model.state_dict(),
                "opts": {k: o.state_dict() for k, o in self.opts.items()},
                "scheds": {k: sc.state_dict() for k, sc in self.scheds.items()},
                "state": self.state, "best": self.best}

    def restore(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        for k in self.opts:
            self.opts[k].load_state_dict(ckpt["opts"][k])
            self.scheds[k].load_state_dict(ckpt["scheds"][k])
        self.state, self.best = ckpt["state"], ckpt["best"]
        # a resumed run draws fresh batches, seeded by where it resumes, so it is reproducible too
        self.sampler.rng = np.random.default_rng([self.s.seed, self.rank, self.state["epoch"]])
        torch.manual_seed(self.s.seed + self.state["epoch"])

    def run_epoch(self) -> dict[str, float]:
        s, d, dev = self.s, self.data, self.device
        totals: dict[str, float] = {}
        epoch = self.state["epoch"] + 1
        for _ in tqdm(range(s.iters_per_epoch), desc=f"train epoch {epoch}/{s.epochs}", unit="it",
                      leave=False, mininterval=2, disable=self.rank != 0):
            sk_i, im_i, y = self.sampler.batch(s.batch_size)
            a = torch.from_numpy(d["fit_sk"][sk_i]).to(dev)
            b = torch.from_numpy(d["fit_im"][im_i]).to(dev)
            if s.feature_noise > 0:
                a = a + s.feature_noise * torch.randn_like(a)
                b = b + s.feature_noise * torch.randn_like(b)
            yt = torch.from_numpy(y).long()
            losses = train_step(self.model, self.opts, a, b, self.fit_sem, yt.to(dev), net=self.net)
            for k, v in losses.items():
                totals[k] = totals.get(k, 0.0) + v / s.iters_per_epoch
            self.pairs += len(y) * self.world
        for sched in self.scheds.values():
            sched.step()
        return totals

    def validate(self) -> float:
        d, dev, model = self.data, self.device, self.model
        if not len(d["val_sk"]) or not len(d["val_im"]):
            return float("nan")
        model.eval()
        val_map = validation_map(lambda x: model.embed_sketch(x.to(dev)).cpu(),
                                 lambda x: model.embed_image(x.to(dev)).cpu(),
                                 d["val_sk"], d["val_sk_y"], d["val_im"], d["val_im_y"])
        if self.world > 1:  # every rank must take the same early-stopping decision
            t = torch.tensor([val_map], dtype=torch.float64)
            dist.broadcast(t, src=0)
            val_map = float(t)
        return val_map

    def serves_generators(self) -> bool:
        """Whether the served vector reads the generators' output: not with embed_skip 1 (the input features,
        then the posterior and semantic parts), which the transfer preset uses."""
        return self.cfg.embed_skip < 1

    def fit(self, on_epoch=None):
        """Train until train.epochs or early stopping; leaves the best epoch's weights in self.model. What it
        trains, the model serves: when the served vector ignores the generators (serves_generators), it trains
        nothing, only measures the validation mAP of the served vector."""
        s = self.s
        if not self.serves_generators():
            self.state.update(best_map=self.validate(), best_epoch=0)
            if self.rank == 0:
                print("train: embed_skip 1: the served vector does not read the generators, so none are trained "
                      "(the posterior head is fitted next)")
            return self.model.eval()
        while self.state["epoch"] < s.epochs:
            totals = self.run_epoch()
            val_map = self.validate()
            # without validation classes (split.val_fraction 0) every epoch counts as the best: last one is kept
            improved = val_map > self.state["best_map"] or not len(self.data["val_sk"])
            self.state["epoch"] += 1
            if improved:
                self.state.update(best_map=val_map, best_epoch=self.state["epoch"], bad_epochs=0)
                self.best = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
            else:
                self.state["bad_epochs"] += 1
            self.state["history"].append({"epoch": self.state["epoch"], "val_map": val_map, **totals})
            if on_epoch is not None:
                on_epoch(self, totals, val_map, improved)
            if self.state["bad_epochs"] >= s.patience:
                if self.rank == 0:
                    print(f"train: early stop after epoch {self.state['epoch']}: no validation gain for "
                          f"{s.patience} epochs")
                break
        self.model.load_state_dict(self.best)
        return self.model


def shuffle_semantics(data: dict, seed: int) -> dict:
    """The shuffle ablation: `data` with the semantic vectors permuted among the training classes (fit and
    validation classes together, a permutation drawn from `seed`), everything else as it is. A model that reads
    class semantics must change; one that ignores them must not."""
    order = np.random.default_rng(seed).permutation(len(data["class_sem"]))
    class_sem = data["class_sem"][order]
    return {**data, "class_sem": class_sem, "fit_sem": class_sem[:len(data["fit_classes"])]}


def fit_seen_posterior(model: SemPcyc, data: dict) -> list[str]:
    """With posterior_weight > 0, give the trained model its seen-class posterior, fitted on every training class:
    the fit classes and the validation classes (held out until now, for early stopping), sketches and photos
    together. Returns the posterior's classes in row order (none without it)."""
    if max(model.cfg.posterior_weight, model.cfg.semantic_weight, model.cfg.projection_weight) <= 0:
        return []
    n_fit = len(data["fit_classes"])
    feats = np.concatenate([data["fit_sk"], data["fit_im"], data["val_sk"], data["val_im"]])
    labels = np.concatenate([data["fit_sk_y"], data["fit_im_y"], data["val_sk_y"] + n_fit, data["val_im_y"] + n_fit])
    classes = [*data["fit_classes"], *data["val_names"]]
    model.posterior = fit_posterior(torch.from_numpy(feats), torch.from_numpy(labels).long(), len(classes))
    class_sem = torch.from_numpy(np.asarray(data["class_sem"], dtype=np.float32))  # in the posterior's row order
    if model.cfg.semantic_weight > 0:
        model.posterior.semantics = class_sem
    if model.cfg.projection_weight > 0:
        model.posterior.projection = fit_projection(torch.from_numpy(feats), class_sem[torch.from_numpy(labels)])
    return classes


def open_live(live_dir: str, resume: bool):
    """A DVCLive logger. DVCLive looks up the git revision when it starts; in a repository with no commit yet
    that raises, so then it logs without its DVC integration (files only), which is all the stage needs."""
    try:
        return Live(dir=live_dir, resume=resume, report=None, dvcyaml=None, save_dvc_exp=False)
    except Exception as exc:  # scmrepo's SCMError: "Empty git repo"
        if "git" not in str(exc).lower():
            raise
        with mock.patch("dvclive.live.get_dvc_repo", return_value=None):
            return Live(dir=live_dir, resume=resume, report=None, dvcyaml=None, save_dvc_exp=False)


def run(args: argparse.Namespace) -> None:
    s = read_settings(params_mod.load(args.params), args.params)
    if s.threads > 0:
        # the SEM-PCYC step is a few small matrix products: one thread is as fast as two on an idle box and up to
        # 100x faster on a busy one (OpenMP threads spin-waiting for a core; measured by bench/train_throughput.py)
        torch.set_num_threads(s.threads)
    device = pick_device(s.device)
    rank, world = torchrun_ranks("nccl" if device.startswith("cuda") else "gloo")
    if device == "cuda" and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    train_model(s, Path(args.features), Path(args.train), Path(args.out), device, rank, world,
                live_dir=args.live_dir, checkpoint=Path(args.checkpoint),
                resume=Path(args.resume) if args.resume else None)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def train_model(s: TrainRun, features_dir: Path, train_dir: Path, out: Path, device: str, rank: int, world: int,
                live_dir: str, checkpoint: Path, resume: Path | None) -> None:
    """Train on the cached features, checkpointing every epoch, and (rank 0) write the model bundle to `out`."""
    data = load_training_data(features_dir, train_dir, s)
    trainer = Trainer(data, s, device, rank, world)
    fp = fingerprint({**dataclasses.asdict(s), "world": world}, features_dir, train_dir)
    restore_checkpoint(trainer, resume or checkpoint, fp, explicit=resume is not None)
    live = None
    if rank == 0:
        live = open_live(live_dir, resume=trainer.state["epoch"] > 0)
        live.log_params({"preset": s.preset, **s.config, "dim_out": s.dim_out, "lr": s.lr,
                         "batch_size": s.batch_size, "feature_norm": s.feature_norm, "world_size": world})
    started = time.time()
    model = trainer.fit(epoch_logger(live, checkpoint, fp) if rank == 0 else None)
    if rank != 0:
        return
    if not trainer.serves_generators():  # no epochs: the served vector's validation mAP as the one step
        live.log_metric("val/map_all", trainer.state["best_map"])
        live.next_step()
    state = trainer.state
    posterior_classes = fit_seen_posterior(model, data)
    bundle_meta = {**data["meta"], "feature_norm": s.feature_norm,
                   "feature_pca_dim": normed_dim(s, data["meta"]["feat_dim"]),
                   "trained_classes": data["fit_classes"], "posterior_classes": posterior_classes,
                   "validation_classes": data["val_names"], "best_epoch": state["best_epoch"], "preset": s.preset}
    buf = io.BytesIO()
    torch.save(bundle_state(bundle_meta, trainer.cfg, data["extractors"], data["norms"], model.cpu(),
                            data["baseline_norms"]), buf)
    atomic_write_bytes(out, buf.getvalue())
    rate = trainer.pairs / max(time.time() - started, 1e-9)
    live.summary.update({"val_map_all_best": state["best_map"], "best_epoch": state["best_epoch"],
                         "epochs_run": state["epoch"], "pairs_per_second": round(rate, 1)})
    live.end()
    checkpoint.unlink(missing_ok=True)
    print(f"train: best val mAP@all {state['best_map']:.4f} at epoch {state['best_epoch']}; "
          f"{rate:.0f} pairs/s -> {out}")


def restore_checkpoint(trainer: Trainer, path: Path, fp: str, explicit: bool) -> None:
    """Resume from `path` when it was made from the same inputs and params (or, with --resume, whenever its
    architecture matches)."""
    if explicit and not path.exists():
        raise UserError(f"{path}: checkpoint not found")
    if not path.exists():
        return
    ckpt = torch.load(path, map_location=trainer.device, weights_only=True)
    if explicit and ckpt.get("config") != trainer.cfg.to_dict():
        theirs = ckpt.get("config", {})
        diff = sorted(k for k, v in trainer.cfg.to_dict().items() if theirs.get(k) != v)
        raise UserError(f"{path}: checkpoint was made for another architecture or configuration "
                        f"(differs in {', '.join(diff) or 'format'}); not resuming. Use the params it was "
                        "made with, or start fresh without --resume")
    if ckpt.get("fingerprint") == fp or explicit:
        trainer.restore(ckpt)
        if trainer.rank == 0:
            print(f"train: resuming from {path} after epoch {trainer.state['epoch']}")
    elif trainer.rank == 0:
        print(f"train: {path} is from other inputs or params; starting fresh")


def epoch_logger(live: Live, checkpoint: Path, fp: str):
    """The per-epoch callback of rank 0: DVCLive metrics, a progress line, and the checkpoint."""
    def on_epoch(tr: Trainer, totals: dict, val_map: float, improved: bool) -> None:
        for k, v in totals.items():
            live.log_metric(f"train/{k}", v)
        live.log_metric("val/map_all", val_map)
        live.next_step()
        print(f"train: epoch {tr.state['epoch']}: val mAP@all {val_map:.4f}" + (" (best)" if improved else "")
              + f"  gen {totals['gen']:.3f} disc {totals['disc']:.3f} ae {totals['ae']:.4f}")
        buf = io.BytesIO()
        torch.save(tr.checkpoint(fp), buf)
        atomic_write_bytes(checkpoint, buf.getvalue())
    return on_epoch
