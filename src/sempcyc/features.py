"""features stage: fine-tune the sketch and image extractors on the seen classes (optional), freeze them, and
compute their features for the training shard once, so SEM-PCYC training never runs the CNN per epoch.

Reads data/prepared/train/ only (plus params), so adding an unseen class never reruns it.
Writes models/features/: extractors.pt (both extractors' state dicts + meta) and the features (.npy).
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from . import params as params_mod
from .errors import UserError
from .fsutil import atomic_dir, dumps_json
from .params import setting
from .recipe import ModelSettings, TrainSettings, pick_device
from .runtime.backbones import Extractor, batched, extract
from .shards import load_train_shard
from .split import SplitSettings, validation_classes


@dataclass(frozen=True)
class FeaturesSettings:
    SECTION: ClassVar[str] = "features"
    epochs: int = setting(min=0)
    lr: float = setting(above=0.0)
    head_lr: float = setting(above=0.0)
    batch_size: int = setting(min=2)
    proj_dim: int = setting(min=1)
    seed: int = setting()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train", default="data/prepared/train", help="training shard (default: %(default)s)")
    parser.add_argument("--out", default="models/features", help="output folder (default: %(default)s)")


def run(args: argparse.Namespace) -> None:
    model, feat, split, train = params_mod.read(args.params, ModelSettings, FeaturesSettings, SplitSettings,
                                                TrainSettings)
    started = time.time()
    shard = load_train_shard(Path(args.train))
    meta = compute_features(shard, Path(args.out), model, feat, split, pick_device(train.device))
    print(f"features: {meta['feat_dim']}-d features for {len(shard['sketches'])} sketches and "
          f"{len(shard['images'])} images in {time.time() - started:.0f} s -> {args.out}")


def compute_features(shard: dict, out: Path, model: ModelSettings, feat: FeaturesSettings, split: SplitSettings,
                     device: str) -> dict:
    """Fine-tune (when features.epochs > 0) and run both extractors over the shard; write `out`; return meta."""
    torch.manual_seed(feat.seed)
    classes = shard["classes"]
    val = set(validation_classes(classes, split.val_fraction, split.salt))
    fit_classes = [c for c in classes if c not in val]
    proj_dim = feat.proj_dim if feat.epochs > 0 else None
    states, report = {}, {}
    for domain, key in (("sketch", "sketches"), ("image", "images")):
        extractor = _load_extractor(model, proj_dim, device)
        if feat.epochs > 0:
            report[f"{domain}_finetune_loss"] = _finetune_on_fit_classes(
                extractor, shard, key, fit_classes, model, feat, device, domain)
        extractor.eval()
        with tqdm(total=len(shard[key]), desc=f"features {key}", unit="img", mininterval=2) as bar:
            read = lambda x, e=extractor: extract(e, x, model.invert_sketch, model.photo_edges,  # noqa: E731
                                                  model.thicken_lines)
            feats = batched(read, shard[key], 64, device, bar)
        states[domain] = ({k: v.cpu() for k, v in extractor.state_dict().items()}, feats)
    meta = {"backbone": model.backbone, "backbone_weights": model.backbone_weights, "feature_proj_dim": proj_dim,
            "feat_dim": int(states["sketch"][1].shape[1]), "invert_sketch": model.invert_sketch,
            "photo_edges": model.photo_edges, "thicken_lines": model.thicken_lines,
            "size": int(shard["sketches"].shape[1]), "finetune_epochs": feat.epochs,
            "validation_classes": sorted(val), "fit_classes": fit_classes}
    with atomic_dir(out) as scratch:
        torch.save({"meta": meta, "sketch_extractor": states["sketch"][0], "image_extractor": states["image"][0]},
                   scratch / "extractors.pt")
        np.save(scratch / "train_sketches.npy", states["sketch"][1])
        np.save(scratch / "train_images.npy", states["image"][1])
        # no timing in the output: equal inputs give equal bytes, so a fresh clone reproduces dvc.lock and
        # skips train (the run's duration is printed by run())
        (scratch / "meta.json").write_text(dumps_json({**meta, **report}))
    return meta


def _load_extractor(model: ModelSettings, proj_dim: int | None, device: str) -> Extractor:
    try:
        extractor = Extractor(model.backbone, proj_dim, pretrained=True, weights_path=model.backbone_weights)
    except (FileNotFoundError, RuntimeError, OSError) as exc:
        raise UserError(f"cannot load {model.backbone} weights ({exc}); set model.backbone_weights to a local "
                        "file, or run online for torchvision's download") from None
    return extractor.to(device)


def _finetune_on_fit_classes(extractor: Extractor, shard: dict, key: str, fit_classes: list[str], model: ModelSettings,
                             feat: FeaturesSettings, device: str, desc: str) -> list[float]:
    """Fine-tune on the shard's items of the fit classes (validation classes stay unseen by the extractor)."""
    classes, labels = shard["classes"], shard[f"{key}_labels"]
    fit_index = {c: i for i, c in enumerate(fit_classes)}
    keep = np.array([classes[lab] in fit_index for lab in labels])
    if feat.batch_size > keep.sum():
        raise UserError(f"features.batch_size {feat.batch_size} is larger than the {int(keep.sum())} training "
                        f"{key}; lower it")
    mapped = np.array([fit_index[classes[lab]] for lab in labels[keep]])
    return finetune(extractor, np.asarray(shard[key])[keep], mapped, len(fit_classes), model, feat, device, desc)


def augment(x: torch.Tensor) -> torch.Tensor:
    """Cheap label-preserving augmentation on uint8 batches: horizontal flip and a small random shift."""
    flip = torch.rand(x.shape[0]) < 0.5
    x = x.clone()
    x[flip] = x[flip].flip(2)
    dy, dx = (int(v) for v in torch.randint(-8, 9, (2,)))
    return torch.roll(x, shifts=(dy, dx), dims=(1, 2))


def finetune(extractor: Extractor, arrays: np.ndarray, labels: np.ndarray, n_classes: int, model: ModelSettings,
             feat: FeaturesSettings, device: str, desc: str) -> list[float]:
    """Train extractor + a linear classifier head on (arrays, labels); BN statistics stay frozen (small batches)."""
    head = nn.Linear(extractor.out_dim, n_classes).to(device)
    opt = torch.optim.Adam([
        {"params": extractor.backbone.parameters(), "lr": feat.lr},
        {"params": list(extractor.proj.parameters()) + list(head.parameters()), "lr": feat.head_lr},
    ])
    gen = torch.Generator().manual_seed(feat.seed)
    labels_t = torch.from_numpy(labels.astype(np.int64))
    losses = []
    steps = -(-len(arrays) // feat.batch_size)
    for epoch in range(feat.epochs):
        extractor.train()
        for m in extractor.modules():  # frozen BN: running stats from ImageNet, not from 32-image batches
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        perm = torch.randperm(len(arrays), generator=gen).numpy()
        total = 0.0
        for i in tqdm(range(steps), desc=f"{desc} epoch {epoch + 1}/{feat.epochs}", unit="batch", leave=False,
                      mininterval=2):
            idx = np.sort(perm[i * feat.batch_size:(i + 1) * feat.batch_size])
            x = augment(torch.from_numpy(np.asarray(arrays[idx]))).to(device)
            feats = extract(extractor, x, model.invert_sketch, model.photo_edges, model.thicken_lines)
            loss = nn.functional.cross_entropy(head(feats), labels_t[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
        losses.append(total / steps)
        print(f"features: {desc} epoch {epoch + 1}: loss {losses[-1]:.3f}")
    extractor.eval()
    return losses
