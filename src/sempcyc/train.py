"""train stage: SEM-PCYC on the cached extractor features of the seen classes.

Class-balanced (sketch, image) pairs of the same class; autoencoder, generators and discriminators updated per
batch (model.train_step); validation mAP@all on held-out training-side classes after every epoch drives early
stopping; the best epoch's weights are kept. A checkpoint after every epoch lets an interrupted run resume.
Under torchrun (several processes) it trains data-parallel with DistributedDataParallel (gloo on CPU, nccl on GPU).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

from . import params as params_mod
from .errors import UserError

HELP = "Train SEM-PCYC on cached features (params model.*, train.*); logs with DVCLive, resumes, early-stops."

# Named starting points for the loss configuration; model.overrides changes single fields on top.
PRESETS = {
    # The original code: every lambda as published, classifiers frozen at their random initialisation.
    "original": {},
    # Found by the ablation in README ("Quality"): lighter semantic/classification weights, trained classifiers.
    "tuned": {"lambda_se": 1.0, "lambda_im": 1.0, "lambda_sk": 1.0, "train_classifiers": True},
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--features", default="models/features", help="features stage output (default: %(default)s)")
    parser.add_argument("--train", default="data/prepared/train", help="training shard (default: %(default)s)")
    parser.add_argument("--out", default="models/sem_pcyc.pt", help="model bundle (default: %(default)s)")
    parser.add_argument("--live-dir", default="dvclive", help="DVCLive folder (default: %(default)s)")
    parser.add_argument("--checkpoint", default="models/train-checkpoint.pt",
                        help="per-epoch checkpoint; an interrupted run with the same inputs resumes from it")
    parser.add_argument("--resume", metavar="CHECKPOINT",
                        help="resume from this checkpoint; refused if it was made for another architecture")


def read_settings(params: dict) -> dict:
    from .model import Config
    model_p = params_mod.Section(params, "model")
    train_p = params_mod.Section(params, "train")
    preset = model_p.str("preset", "tuned", choices=tuple(PRESETS))
    overrides = model_p.get("overrides") or {}
    fields = Config.__dataclass_fields__
    if not isinstance(overrides, dict) or any(k not in fields for k in overrides):
        bad = [k for k in overrides if k not in fields] if isinstance(overrides, dict) else overrides
        raise UserError(f"params.yaml: model.overrides must map Config fields to values; unknown: {bad}. "
                        f"Known: {', '.join(f for f in fields if f not in ('feat_dim', 'sem_dim', 'n_classes'))}")
    cfg = {**PRESETS[preset], **overrides}
    for key, value in cfg.items():
        want = type(fields[key].default)
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            cfg[key] = float(value)
        elif not isinstance(value, want) or (want is int and isinstance(value, bool)):
            raise UserError(f"params.yaml: model.overrides.{key} must be {want.__name__}, got {value!r}")
        if key.startswith("lambda") and value < 0:
            raise UserError(f"params.yaml: model.overrides.{key} must be >= 0, got {value!r}")
    return {
        "preset": preset, "config": cfg,
        "dim_out": model_p.int("dim_out", 64, min=1),
        "epochs": train_p.int("epochs", 20, min=1),
        "iters_per_epoch": train_p.int("iters_per_epoch", 50, min=1),
        "batch_size": train_p.int("batch_size", 128, min=2),
        "lr": train_p.float("lr", 1e-4, min=0.0, min_exclusive=True),
        "milestones": train_p.int_list("milestones", []),
        "gamma": train_p.float("gamma", 0.1, min=0.0, min_exclusive=True),
        "patience": train_p.int("patience", 5, min=1),
        "seed": train_p.int("seed", 0),
        "device": train_p.str("device", "cpu"),
        "feature_norm": train_p.str("feature_norm", "standardize", choices=("none", "standardize", "l2")),
        "feature_noise": train_p.float("feature_noise", 0.0, min=0.0),
    }


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
    import torch
    from .retrieval import average_precisions, squared_distances
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


def _dist_setup(device: str):
    """(rank, world) — initialises torch.distributed when started by torchrun."""
    import torch.distributed as dist
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), world


def run(args: argparse.Namespace) -> None:
    import torch
    from torch import nn
    from tqdm import tqdm
    from .encoder import FeatureNorm, bundle_state
    from .features import load_train_shard, pick_device
    from .fsutil import atomic_write_bytes
    from .model import Config, SemPcyc, TrainLosses, make_optimizers, train_step

    s = read_settings(params_mod.load(getattr(args, "params", "params.yaml")))
    device = pick_device(s["device"])
    rank, world = _dist_setup(device)
    if device == "cuda" and world > 1:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    features_dir, train_dir = Path(args.features), Path(args.train)
    try:
        extractors = torch.load(features_dir / "extractors.pt", map_location="cpu", weights_only=True)
        sk_all = np.load(features_dir / "train_sketches.npy")
        im_all = np.load(features_dir / "train_images.npy")
    except FileNotFoundError as exc:
        raise UserError(f"{exc.filename}: missing; run `dvc repro features`") from None
    shard = load_train_shard(train_dir)
    classes, meta = shard["classes"], extractors["meta"]
    sk_labels_all, im_labels_all = shard["sketches_labels"], shard["images_labels"]
    if len(sk_all) != len(sk_labels_all) or len(im_all) != len(im_labels_all):
        raise UserError(f"{features_dir} does not match {train_dir}; rerun `dvc repro features`")
    val_classes = set(meta["validation_classes"])
    fit_classes = meta["fit_classes"]
    if len(fit_classes) < 2:
        raise UserError(f"only {len(fit_classes)} training class(es) left after holding out validation classes; "
                        "add classes or lower split.val_fraction")
    fit_index = {c: i for i, c in enumerate(fit_classes)}
    semantic = shard["semantic"]
    sem_by_name = dict(zip(classes, semantic))

    def select(labels, fit: bool):
        keep = np.array([(classes[l] in val_classes) != fit for l in labels])
        return keep

    sk_fit, im_fit = select(sk_labels_all, True), select(im_labels_all, True)
    if s["batch_size"] > int(sk_fit.sum()):
        raise UserError(f"train.batch_size {s['batch_size']} is larger than the {int(sk_fit.sum())} training "
                        "sketches; lower it")
    norms = {"sketch": FeatureNorm(s["feature_norm"], sk_all.shape[1]).fit(sk_all[sk_fit]),
             "image": FeatureNorm(s["feature_norm"], im_all.shape[1]).fit(im_all[im_fit])}
    with torch.no_grad():
        sk_feats = norms["sketch"](torch.from_numpy(sk_all)).numpy()
        im_feats = norms["image"](torch.from_numpy(im_all)).numpy()
    sk_y = np.array([fit_index.get(classes[l], -1) for l in sk_labels_all])
    im_y = np.array([fit_index.get(classes[l], -1) for l in im_labels_all])
    fit_sem = torch.from_numpy(np.stack([sem_by_name[c] for c in fit_classes]).astype(np.float32))

    cfg = Config(feat_dim=sk_all.shape[1], sem_dim=semantic.shape[1], dim_out=s["dim_out"],
                 n_classes=len(fit_classes), **s["config"])
    torch.manual_seed(s["seed"])
    model = SemPcyc(cfg).to(device)
    opts = make_optimizers(model, s["lr"])
    scheds = {k: torch.optim.lr_scheduler.MultiStepLR(o, s["milestones"], s["gamma"]) for k, o in opts.items()}
    net = TrainLosses(model).to(device)
    if world > 1:
        net = nn.parallel.DistributedDataParallel(net, find_unused_parameters=True)
    sampler = PairSampler(sk_y[sk_fit], im_y[im_fit], s["seed"] + 1000 * rank)
    sk_fit_idx, im_fit_idx = np.flatnonzero(sk_fit), np.flatnonzero(im_fit)
    sk_val, im_val = ~sk_fit, ~im_fit
    val_names = sorted(val_classes)
    val_sk_labels = np.array([val_names.index(classes[l]) for l in sk_labels_all[sk_val]])
    val_im_labels = np.array([val_names.index(classes[l]) for l in im_labels_all[im_val]])

    fp = fingerprint({**s, "world": world}, features_dir, train_dir)
    state = {"epoch": 0, "best_map": -1.0, "best_epoch": 0, "bad_epochs": 0, "history": []}
    best_state = None
    ckpt_path = Path(args.resume or args.checkpoint)
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        if args.resume and ckpt.get("config") != cfg.to_dict():
            diff = sorted(k for k in cfg.to_dict() if ckpt.get("config", {}).get(k) != cfg.to_dict()[k])
            raise UserError(f"{ckpt_path}: checkpoint was made for another architecture/configuration "
                            f"(differs in {', '.join(diff) or 'format'}); not resuming. Remove it or pass "
                            "the matching params")
        if ckpt.get("fingerprint") == fp or args.resume:
            model.load_state_dict(ckpt["model"])
            for k in opts:
                opts[k].load_state_dict(ckpt["opts"][k])
                scheds[k].load_state_dict(ckpt["scheds"][k])
            state, best_state = ckpt["state"], ckpt["best"]
            sampler.rng = np.random.default_rng([s["seed"], rank, state["epoch"]])
            torch.manual_seed(s["seed"] + state["epoch"])
            if rank == 0:
                print(f"train: resuming from {ckpt_path} after epoch {state['epoch']}")
        elif rank == 0:
            print(f"train: {ckpt_path} is from other inputs or params; starting fresh")

    live = None
    if rank == 0:
        from dvclive import Live
        live = Live(dir=args.live_dir, resume=state["epoch"] > 0, report=None, dvcyaml=None, save_dvc_exp=False)
        live.log_params({"preset": s["preset"], **s["config"], "dim_out": s["dim_out"], "lr": s["lr"],
                         "batch_size": s["batch_size"], "feature_norm": s["feature_norm"], "world_size": world})
    started = time.time()
    pairs = 0
    for epoch in range(state["epoch"] + 1, s["epochs"] + 1):
        totals: dict[str, float] = {}
        bar = tqdm(range(s["iters_per_epoch"]), desc=f"train epoch {epoch}/{s['epochs']}", unit="it",
                   leave=False, mininterval=2, disable=rank != 0)
        for _ in bar:
            sk_i, im_i, y = sampler.batch(s["batch_size"])
            a = torch.from_numpy(sk_feats[sk_fit_idx[sk_i]]).to(device)
            b = torch.from_numpy(im_feats[im_fit_idx[im_i]]).to(device)
            if s["feature_noise"] > 0:
                a = a + s["feature_noise"] * torch.randn_like(a)
                b = b + s["feature_noise"] * torch.randn_like(b)
            yt = torch.from_numpy(y).long().to(device)
            losses = train_step(model, opts, a, b, fit_sem[yt.cpu()].to(device), yt, net=net)
            for k, v in losses.items():
                totals[k] = totals.get(k, 0.0) + v / s["iters_per_epoch"]
            pairs += len(y) * world
        for sched in scheds.values():
            sched.step()
        model.eval()
        val_map = validation_map(lambda x: model.embed_sketch(x.to(device)).cpu(),
                                 lambda x: model.embed_image(x.to(device)).cpu(),
                                 sk_feats[sk_val], val_sk_labels, im_feats[im_val], val_im_labels)
        if world > 1:  # every rank must take the same early-stopping decision
            import torch.distributed as dist
            t = torch.tensor([val_map], dtype=torch.float64)
            dist.broadcast(t, src=0)
            val_map = float(t)
        improved = val_map > state["best_map"]
        if improved:
            state.update(best_map=val_map, best_epoch=epoch, bad_epochs=0)
            best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch
        state["history"].append({"epoch": epoch, "val_map": val_map, **totals})
        if rank == 0:
            for k, v in totals.items():
                live.log_metric(f"train/{k}", v)
            live.log_metric("val/map_all", val_map)
            live.next_step()
            print(f"train: epoch {epoch}: val mAP@all {val_map:.4f}" + (" (best)" if improved else "")
                  + f"  gen {totals['gen']:.3f} disc {totals['disc']:.3f} ae {totals['ae']:.4f}")
            ckpt = {"fingerprint": fp, "config": cfg.to_dict(), "model": model.state_dict(),
                    "opts": {k: o.state_dict() for k, o in opts.items()},
                    "scheds": {k: sc.state_dict() for k, sc in scheds.items()}, "state": state, "best": best_state}
            import io
            buf = io.BytesIO()
            torch.save(ckpt, buf)
            atomic_write_bytes(args.checkpoint, buf.getvalue())
        if state["bad_epochs"] >= s["patience"]:
            if rank == 0:
                print(f"train: early stop after epoch {epoch}: no validation gain for {s['patience']} epochs")
            break
    if rank == 0:
        model.load_state_dict(best_state)
        bundle_meta = {**meta, "feature_norm": s["feature_norm"], "trained_classes": fit_classes,
                       "validation_classes": val_names, "best_epoch": state["best_epoch"], "preset": s["preset"]}
        model.cpu()
        import io
        buf = io.BytesIO()
        torch.save(bundle_state(bundle_meta, cfg, extractors, norms, model), buf)
        atomic_write_bytes(args.out, buf.getvalue())
        seconds = time.time() - started
        live.summary = {"val_map_all_best": state["best_map"], "best_epoch": state["best_epoch"],
                        "epochs_run": state["epoch"], "pairs_per_second": round(pairs / max(seconds, 1e-9), 1)}
        live.end()
        Path(args.checkpoint).unlink(missing_ok=True)
        print(f"train: best val mAP@all {state['best_map']:.4f} at epoch {state['best_epoch']}; "
              f"{pairs / max(seconds, 1e-9):.0f} pairs/s -> {args.out}")
    if world > 1:
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()
