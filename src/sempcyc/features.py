"""features stage: fine-tune the sketch and image extractors on the seen classes (optional), freeze them, and
compute their features for the training shard once, so SEM-PCYC training never runs the CNN per epoch.

Reads data/prepared/train/ only (plus params), so adding an unseen class never reruns it.
Writes models/features/: extractors.pt (both extractors' state dicts + meta) and the features (.npy).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from . import params as params_mod
from .errors import UserError
from .fsutil import atomic_dir, dumps_json

HELP = "Fine-tune sketch/image extractors on seen classes (features.epochs, 0 = ImageNet as is), cache features."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train", default="data/prepared/train", help="training shard (default: %(default)s)")
    parser.add_argument("--out", default="models/features", help="output folder (default: %(default)s)")


def pick_device(name: str) -> str:
    """train.device -> a torch device string; cpu, auto, cuda or cuda:N."""
    import re
    import torch
    if not re.fullmatch(r"cpu|auto|cuda(:\d+)?", name):
        raise UserError(f"params.yaml: train.device must be cpu, cuda, cuda:N or auto, got {name!r}")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device '{name}' requested (param train.device) but CUDA is not available here; "
                        "set train.device: cpu (or auto)")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise UserError(f"train.device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return name


def validation_classes(classes: list[str], fraction: float, salt: str) -> list[str]:
    """Training-side classes held out for early stopping, by name hash: stable as classes are added."""
    from .prepare import hash_unit
    val = [c for c in classes if hash_unit(c, salt + "/val") < fraction]
    if fraction > 0 and len(val) < 2:  # too few to rank anything: take the two lowest hashes instead
        val = sorted(classes, key=lambda c: hash_unit(c, salt + "/val"))[:2]
    return sorted(val)


def load_train_shard(folder: Path) -> dict:
    try:
        shard = {"classes": json.loads((folder / "classes.json").read_text(encoding="utf-8")),
                 "semantic": np.load(folder / "semantic.npy")}
        for domain in ("sketches", "images"):
            shard[domain] = np.load(folder / f"{domain}.npy", mmap_mode="r")
            shard[f"{domain}_labels"] = np.load(folder / f"{domain}_labels.npy")
    except FileNotFoundError as exc:
        raise UserError(f"{folder}: incomplete training shard ({Path(exc.filename).name} missing); "
                        "run `dvc repro prepare`") from None
    return shard


def read_settings(params: dict) -> dict:
    model_p = params_mod.Section(params, "model")
    feat_p = params_mod.Section(params, "features")
    split_p = params_mod.Section(params, "split")
    from .backbones import BACKBONES
    return {
        "backbone": model_p.str("backbone", "efficientnet_lite0", choices=BACKBONES),
        "backbone_weights": model_p.optional_str("backbone_weights"),
        "invert_sketch": model_p.bool("invert_sketch", True),
        "epochs": feat_p.int("epochs", 2, min=0),
        "lr": feat_p.float("lr", 1e-4, min=0.0, min_exclusive=True),
        "head_lr": feat_p.float("head_lr", 1e-3, min=0.0, min_exclusive=True),
        "batch_size": feat_p.int("batch_size", 32, min=2),
        "proj_dim": feat_p.int("proj_dim", 512, min=1),
        "seed": feat_p.int("seed", 0),
        "device": params_mod.Section(params, "train").str("device", "cpu"),
        "val_fraction": split_p.float("val_fraction", 0.15, min=0.0, max=0.9),
        "salt": split_p.str("salt", "sem-pcyc"),
    }


def augment(x):
    """Cheap label-preserving augmentation on uint8 batches: horizontal flip and a small random shift."""
    import torch
    flip = torch.rand(x.shape[0]) < 0.5
    x = x.clone()
    x[flip] = x[flip].flip(2)
    dy, dx = (int(v) for v in torch.randint(-8, 9, (2,)))
    return torch.roll(x, shifts=(dy, dx), dims=(1, 2))


def finetune(extractor, arrays: np.ndarray, labels: np.ndarray, n_classes: int, invert: bool, s: dict,
             device: str, desc: str) -> list[float]:
    """Train extractor + a linear classifier head on (arrays, labels); BN statistics stay frozen (small batches)."""
    import torch
    from torch import nn
    from tqdm import tqdm
    from .backbones import to_input

    head = nn.Linear(extractor.out_dim, n_classes).to(device)
    opt = torch.optim.Adam([
        {"params": extractor.backbone.parameters(), "lr": s["lr"]},
        {"params": list(extractor.proj.parameters()) + list(head.parameters()), "lr": s["head_lr"]},
    ])
    gen = torch.Generator().manual_seed(s["seed"])
    labels_t = torch.from_numpy(labels.astype(np.int64))
    losses = []
    steps = -(-len(arrays) // s["batch_size"])
    for epoch in range(s["epochs"]):
        extractor.train()
        for m in extractor.modules():  # frozen BN: running stats from ImageNet, not from 32-image batches
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        perm = torch.randperm(len(arrays), generator=gen).numpy()
        total = 0.0
        for i in tqdm(range(steps), desc=f"{desc} epoch {epoch + 1}/{s['epochs']}", unit="batch", leave=False,
                      mininterval=2):
            idx = np.sort(perm[i * s["batch_size"]:(i + 1) * s["batch_size"]])
            x = augment(torch.from_numpy(np.asarray(arrays[idx]))).to(device)
            y = labels_t[idx].to(device)
            loss = nn.functional.cross_entropy(head(extractor(to_input(x, invert))), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
        losses.append(total / steps)
        print(f"features: {desc} epoch {epoch + 1}: loss {losses[-1]:.3f}")
    extractor.eval()
    return losses


def run(args: argparse.Namespace) -> None:
    import torch
    from tqdm import tqdm
    from .encoder import Extractor, batched

    s = read_settings(params_mod.load(getattr(args, "params", "params.yaml")))
    device = pick_device(s["device"])
    torch.manual_seed(s["seed"])
    shard = load_train_shard(Path(args.train))
    classes = shard["classes"]
    val = set(validation_classes(classes, s["val_fraction"], s["salt"]))
    fit_classes = [c for c in classes if c not in val]
    fit_index = {c: i for i, c in enumerate(fit_classes)}
    proj_dim = s["proj_dim"] if s["epochs"] > 0 else None

    started = time.time()
    states, report = {}, {}
    for domain, key, invert in (("sketch", "sketches", s["invert_sketch"]), ("image", "images", False)):
        try:
            extractor = Extractor(s["backbone"], proj_dim, pretrained=True, weights_path=s["backbone_weights"])
        except (FileNotFoundError, RuntimeError, OSError) as exc:
            raise UserError(f"cannot load {s['backbone']} weights ({exc}); set model.backbone_weights to a local "
                            "file, or run online for torchvision's download") from None
        extractor.to(device)
        if s["epochs"] > 0:
            labels = shard[f"{key}_labels"]
            keep = np.array([classes[l] not in val for l in labels])
            if s["batch_size"] > keep.sum():
                raise UserError(f"features.batch_size {s['batch_size']} is larger than the {int(keep.sum())} "
                                f"training {key}; lower it")
            mapped = np.array([fit_index[classes[l]] for l in labels[keep]])
            report[f"{domain}_finetune_loss"] = finetune(
                extractor, np.asarray(shard[key])[keep], mapped, len(fit_classes), invert, s, device, domain)
        extractor.eval()
        with tqdm(total=len(shard[key]), desc=f"features {key}", unit="img", mininterval=2) as bar:
            from .backbones import to_input
            feats = batched(lambda x, e=extractor, inv=invert: e(to_input(x, inv)), shard[key], 64, device, bar)
        states[domain] = ({k: v.cpu() for k, v in extractor.state_dict().items()}, feats)

    meta = {"backbone": s["backbone"], "backbone_weights": s["backbone_weights"], "feature_proj_dim": proj_dim, "feat_dim": int(states["sketch"][1].shape[1]),
            "invert_sketch": s["invert_sketch"], "size": int(shard["sketches"].shape[1]),
            "finetune_epochs": s["epochs"], "validation_classes": sorted(val), "fit_classes": fit_classes}
    with atomic_dir(args.out) as scratch:
        torch.save({"meta": meta, "sketch_extractor": states["sketch"][0], "image_extractor": states["image"][0]},
                   scratch / "extractors.pt")
        np.save(scratch / "train_sketches.npy", states["sketch"][1])
        np.save(scratch / "train_images.npy", states["image"][1])
        (scratch / "meta.json").write_text(dumps_json({**meta, **report,
                                                       "seconds": round(time.time() - started, 1)}))
    print(f"features: {meta['feat_dim']}-d features for {len(shard['sketches'])} sketches and "
          f"{len(shard['images'])} images in {time.time() - started:.0f} s -> {args.out}")
