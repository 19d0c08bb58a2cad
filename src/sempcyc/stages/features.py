"""features stage: tune the extractors on the seen classes (optional), freeze them, and compute their features
for the training shard once, so SEM-PCYC training never runs the CNN per epoch.

Two ways to tune, both on the fit classes only (validation classes stay unseen):
  features.tune_blocks N  the backbone's last N blocks, one copy for both domains (sketches and photos keep
                          sharing coordinates): a cosine classifier over the fit classes reads each domain's
                          features, centred within the batch, so it must name the class of a sketch and of a photo
                          from the same coordinates. The blocks before are frozen and run once per item.
  features.epochs E       each extractor (backbone and a projection to features.proj_dim) fine-tuned on its own
                          domain, as the paper did; on unseen classes the two domains then stop lining up.

Reads data/prepared/train/ only (plus params), so adding an unseen class never reruns it.
Writes models/features/: extractors.pt (both extractors' state dicts + meta) and the features (.npy); with
tune_blocks, also the untuned backbone's features (backbone_*.npy), from which the train stage fits the
normalisation of evaluate's model-input baseline.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .. import params as params_mod
from ..errors import UserError
from ..fsutil import atomic_dir, dumps_json
from ..params import setting
from ..recipe import ModelSettings, TrainSettings, pick_device
from ..runtime.backbones import (
    Extractor,
    batched,
    edge_map,
    extract,
    frozen_activations,
    run_blocks,
    to_input,
    tunable_blocks,
    tuned_features,
)
from ..shards import load_train_shard
from ..split import SplitSettings, validation_classes


@dataclass(frozen=True)
class FeaturesSettings:
    SECTION: ClassVar[str] = "features"
    epochs: int = setting(min=0)
    tune_blocks: int = setting(min=0)
    tune_epochs: int = setting(min=1)
    tune_lr: float = setting(above=0.0)
    tune_temperature: float = setting(above=0.0)
    tune_distill: float = setting(min=0.0)
    tune_distill_temperature: float = setting(above=0.0)
    tune_semantic: float = setting(min=0.0)
    tune_semantic_temperature: float = setting(above=0.0)
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
    """Tune the extractors (features.tune_blocks or features.epochs) and run them over the shard; write `out`;
    return meta."""
    torch.manual_seed(feat.seed)
    classes = shard["classes"]
    val = set(validation_classes(classes, split.val_fraction, split.salt))
    fit_classes = [c for c in classes if c not in val]
    check_tuning(feat, model)
    proj_dim = feat.proj_dim if feat.epochs > 0 else None
    untuned = None
    if feat.tune_blocks:
        extractor = _load_extractor(model, None, device)
        tuned, untuned, losses = tune_shared_blocks(extractor, shard, fit_classes, model, feat, device)
        state = {k: v.cpu() for k, v in extractor.state_dict().items()}
        states, report = {domain: (state, tuned[domain]) for domain in tuned}, {"tune_loss": losses}
        if feat.tune_semantic > 0:
            report["tune_semantic"] = {"weight": feat.tune_semantic, "temperature": feat.tune_semantic_temperature}
        if feat.tune_distill > 0:
            report["tune_distill"] = {"weight": feat.tune_distill, "temperature": feat.tune_distill_temperature,
                                      "class_aware": "imagenet_similarity" in shard}
    else:
        states, report = per_domain_features(shard, fit_classes, model, feat, proj_dim, device)
    meta = {"backbone": model.backbone, "backbone_weights": model.backbone_weights, "feature_proj_dim": proj_dim,
            "feat_dim": int(states["sketch"][1].shape[1]), "invert_sketch": model.invert_sketch,
            "photo_edges": model.photo_edges, "thicken_lines": model.thicken_lines,
            "size": int(shard["sketches"].shape[1]), "finetune_epochs": feat.epochs, "tune_blocks": feat.tune_blocks,
            "validation_classes": sorted(val), "fit_classes": fit_classes}
    with atomic_dir(out) as scratch:
        torch.save({"meta": meta, "sketch_extractor": states["sketch"][0], "image_extractor": states["image"][0]},
                   scratch / "extractors.pt")
        np.save(scratch / "train_sketches.npy", states["sketch"][1])
        np.save(scratch / "train_images.npy", states["image"][1])
        if untuned is not None:
            np.save(scratch / "backbone_sketches.npy", untuned["sketch"])
            np.save(scratch / "backbone_images.npy", untuned["image"])
        # no timing in the output: equal inputs give equal bytes, so a fresh clone reproduces dvc.lock and
        # skips train (the run's duration is printed by run())
        (scratch / "meta.json").write_text(dumps_json({**meta, **report}))
    return meta


def per_domain_features(shard: dict, fit_classes: list[str], model: ModelSettings, feat: FeaturesSettings,
                        proj_dim: int | None, device: str) -> tuple[dict, dict]:
    """Each domain's extractor (fine-tuned on its own domain when features.epochs > 0) and its features of the
    shard: ({domain: (state dict, features)}, {domain_finetune_loss: per epoch})."""
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
    return states, report


def check_tuning(feat: FeaturesSettings, model: ModelSettings) -> None:
    """One way of tuning at a time, and tune_blocks only on a backbone made of blocks, no more than it has."""
    if feat.tune_blocks and feat.epochs:
        raise UserError("features.tune_blocks and features.epochs are two ways of tuning the extractors; set one "
                        "of them to 0")
    if feat.tune_blocks > tunable_blocks(model.backbone):
        raise UserError(f"features.tune_blocks {feat.tune_blocks}: model.backbone {model.backbone} has "
                        f"{tunable_blocks(model.backbone)} tunable blocks; lower it (0 = frozen)")


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


def tune_shared_blocks(extractor: Extractor, shard: dict, fit_classes: list[str], model: ModelSettings,
                       feat: FeaturesSettings, device: str) -> tuple[dict, dict, list[float]]:
    """Tune the backbone's last feat.tune_blocks blocks in place (module docstring); (tuned features, untuned
    features, loss per epoch), the features per domain as the model reads them (photos with their edge maps)."""
    backbone, n = extractor.backbone.eval(), feat.tune_blocks
    acts = frozen_inputs(backbone, shard, model, n, device)
    untuned = pooled_features(backbone, acts, n, device)
    fit_index = {c: i for i, c in enumerate(fit_classes)}
    labels = {key: np.array([fit_index.get(shard["classes"][lab], -1) for lab in shard[f"{key}_labels"]])
              for key in ("sketches", "images")}
    targets = distillation_targets(backbone, acts, shard, feat, device)
    if feat.tune_semantic > 0:
        targets = {**(targets or {}), "classes": semantic_soft_labels(shard, fit_classes, feat).to(device)}
    losses = train_tuned_blocks(backbone, acts, labels, len(fit_classes), feat, device, targets)
    return pooled_features(backbone, acts, n, device), untuned, losses


def imagenet_logits(backbone: nn.Module, block_out: torch.Tensor) -> torch.Tensor:
    """The backbone's own ImageNet-1k logits from its last block's output (head convolution, pooling, classifier),
    whichever features it pools."""
    return backbone._fc(backbone.head(block_out).mean(dim=(2, 3)))


def distillation_targets(backbone: nn.Module, acts: dict, shard: dict, feat: FeaturesSettings,
                         device: str) -> dict[str, torch.Tensor] | None:
    """With features.tune_distill > 0, per sketch and photo the untuned network's ImageNet prediction at
    temperature features.tune_distill_temperature, which the tuning keeps as a target so the blocks keep their
    ImageNet knowledge (SAKE, Liu et al. 2019). Class-aware when the shard has imagenet_similarity (semantic
    backend wordnet): the prediction times the Wu-Palmer similarity of the item's class to each ImageNet class,
    renormalised, so ImageNet classes related to the item's class keep the most weight."""
    if feat.tune_distill <= 0:
        return None
    if not hasattr(backbone, "_fc"):
        raise UserError("params.yaml: features.tune_distill needs a backbone with its ImageNet classifier "
                        "(efficientnet_lite0 or efficientnet_lite0_headless); set it to 0")
    similarity = shard.get("imagenet_similarity")
    tuned = backbone._blocks[len(backbone._blocks) - feat.tune_blocks:]
    targets = {}
    for key in ("sketches", "images"):
        with torch.inference_mode():
            p = torch.cat([torch.softmax(imagenet_logits(backbone, run_blocks(tuned, acts[key][i:i + 256].float()
                                                                               .to(device)))
                                         / feat.tune_distill_temperature, -1).cpu()
                           for i in range(0, len(acts[key]), 256)])
        if similarity is not None:
            p = p * torch.from_numpy(np.asarray(similarity, np.float32)[shard[f"{key}_labels"]])
            p = p / p.sum(-1, keepdim=True)
        targets[key] = p
    print("features: distilling the ImageNet predictions" + (", class-aware (WordNet similarity)" if similarity
                                                              is not None else " (no imagenet_similarity in the "
                                                              "training shard: semantic.backend is not wordnet)"))
    return targets


def semantic_soft_labels(shard: dict, fit_classes: list[str], feat: FeaturesSettings) -> torch.Tensor:
    """(fit class, fit class) rows of soft labels from the class vectors: softmax of the cosine between a class's
    semantic vector and every other fit class's, over features.tune_semantic_temperature, the class itself left
    out. The tuning's cosine classifier also learns these, so a class's features lean towards its semantic
    neighbours (WordNet's or MiniLM's): meant to place an unseen class's items near the seen classes its name is
    near. Measured, it lowers validation mAP (docs/model.md, "Class semantics"), so it is off by default."""
    index = {c: i for i, c in enumerate(shard["classes"])}
    vectors = np.asarray(shard["semantic"], np.float32)[[index[c] for c in fit_classes]]
    unit = nn.functional.normalize(torch.from_numpy(vectors), dim=1)
    cosine = (unit @ unit.T).fill_diagonal_(-torch.inf)
    return torch.softmax(cosine / feat.tune_semantic_temperature, -1)


def frozen_inputs(backbone: nn.Module, shard: dict, model: ModelSettings, n: int, device: str) -> dict:
    """The tuned blocks' inputs (float16, kept in memory) for sketches, photos and, with model.photo_edges, the
    photos' edge maps: each item through the frozen part once."""
    def read(draw):
        return lambda x: frozen_activations(backbone, draw(x), n)

    def drawn(x: torch.Tensor) -> torch.Tensor:
        return to_input(x, model.invert_sketch, model.thicken_lines)
    draws = {"sketches": drawn, "images": drawn}
    if model.photo_edges:
        draws["edges"] = lambda x: edge_map(drawn(x), model.invert_sketch, model.thicken_lines)
    acts = {}
    for name, draw in draws.items():
        part = shard["sketches" if name == "sketches" else "images"]
        with tqdm(total=len(part), desc=f"features frozen part ({name})", unit="img", mininterval=2) as bar:
            acts[name] = torch.from_numpy(batched(read(draw), part, 64, device, bar)).half()
    return acts


def pooled_features(backbone: nn.Module, acts: dict, n: int, device: str) -> dict[str, np.ndarray]:
    """Per domain, the features through the last n blocks; a photo's is the mean of its own and its edge map's."""
    def run(x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return torch.cat([tuned_features(backbone, x[i:i + 256].float().to(device), n).cpu()
                              for i in range(0, len(x), 256)]).numpy()
    images = run(acts["images"])
    return {"sketch": run(acts["sketches"]), "image": (images + run(acts["edges"])) / 2 if "edges" in acts else images}


def train_tuned_blocks(backbone: nn.Module, acts: dict, labels: dict, n_classes: int, feat: FeaturesSettings,
                       device: str, targets: dict | None = None) -> list[float]:
    """feat.tune_epochs passes over the fit-class photos, each batch with as many fit-class sketches (cycled);
    loss: cross-entropy of the cosine classifier on each domain's batch-centred features. BatchNorm statistics
    stay ImageNet's (eval mode), as in `finetune`."""
    tuned = backbone._blocks[len(backbone._blocks) - feat.tune_blocks:]
    start = torch.randn(n_classes, backbone.num_features, generator=torch.Generator().manual_seed(feat.seed))
    classifier = nn.Parameter((start * 0.01).to(device))
    opt = torch.optim.Adam([{"params": tuned.parameters(), "lr": feat.tune_lr},
                            {"params": [classifier], "lr": feat.head_lr}])
    rng = np.random.default_rng(feat.seed)
    sketches, photos = np.flatnonzero(labels["sketches"] >= 0), np.flatnonzero(labels["images"] >= 0)
    steps = max(len(photos) // feat.batch_size, 1)
    losses = []
    for epoch in range(feat.tune_epochs):
        order_sk, order_im = (np.resize(rng.permutation(rows), steps * feat.batch_size) for rows in (sketches, photos))
        batches = ((np.sort(order_sk[i * feat.batch_size:(i + 1) * feat.batch_size]),
                    np.sort(order_im[i * feat.batch_size:(i + 1) * feat.batch_size])) for i in range(steps))
        batch_losses = (tuning_loss(backbone, acts, sk, im, labels, classifier, feat, device, targets)
                        for sk, im in batches)
        losses.append(optimise_epoch(opt, batch_losses, steps, f"features tuning epoch {epoch + 1}/{feat.tune_epochs}"))
        print(f"features: tuning epoch {epoch + 1}: loss {losses[-1]:.3f}")
    return losses


def optimise_epoch(opt: torch.optim.Optimizer, batch_losses: Iterator[torch.Tensor], steps: int, desc: str) -> float:
    """One optimiser step on each of the `steps` losses (computed lazily, each after the previous step), with a
    progress bar; the mean loss."""
    total = 0.0
    for loss in tqdm(batch_losses, total=steps, desc=desc, unit="batch", leave=False, mininterval=2):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.item()
    return total / steps


def tuning_loss(backbone: nn.Module, acts: dict, sk: np.ndarray, im: np.ndarray, labels: dict,
                classifier: torch.Tensor, feat: FeaturesSettings, device: str,
                targets: dict | None = None) -> torch.Tensor:
    """Cross-entropy of one batch of sketches `sk` and photos `im` (row indices) under the cosine classifier.
    Centring each domain within the batch keeps the sketch/photo offset out of what the classifier can use.
    `targets` may hold the distillation's per-item predictions ("sketches", "images": plus features.tune_distill
    x T^2 x KL(target || the tuned network's ImageNet prediction at temperature T)) and the semantic soft labels
    per fit class ("classes": plus features.tune_semantic x their cross-entropy, per domain)."""
    tuned = backbone._blocks[len(backbone._blocks) - feat.tune_blocks:]

    def block_out(name: str, rows: np.ndarray) -> torch.Tensor:
        return run_blocks(tuned, acts[name][rows].float().to(device))
    sk_out, im_out = block_out("sketches", sk), block_out("images", im)
    photo = backbone.pool(im_out)
    if "edges" in acts:
        photo = (photo + backbone.pool(block_out("edges", im))) / 2
    weights = nn.functional.normalize(classifier, dim=1)
    loss = 0.0
    for f, rows, key in ((backbone.pool(sk_out), sk, "sketches"), (photo, im, "images")):
        logits = nn.functional.normalize(f - f.mean(0), dim=1) @ weights.T / feat.tune_temperature
        y = torch.from_numpy(labels[key][rows]).to(device)
        loss = loss + nn.functional.cross_entropy(logits, y)
        if targets is not None and "classes" in targets:
            loss = loss + feat.tune_semantic * nn.functional.cross_entropy(logits, targets["classes"][y])
    if targets is not None and "sketches" in targets:
        temp = feat.tune_distill_temperature
        for out, rows, key in ((sk_out, sk, "sketches"), (im_out, im, "images")):
            student = torch.log_softmax(imagenet_logits(backbone, out) / temp, -1)
            kl = nn.functional.kl_div(student, targets[key][rows].to(device), reduction="batchmean")
            loss = loss + feat.tune_distill * temp ** 2 * kl
    return loss


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

    def batch_loss(idx: np.ndarray) -> torch.Tensor:
        x = augment(torch.from_numpy(np.asarray(arrays[idx]))).to(device)
        feats = extract(extractor, x, model.invert_sketch, model.photo_edges, model.thicken_lines)
        return nn.functional.cross_entropy(head(feats), labels_t[idx].to(device))
    losses = []
    steps = -(-len(arrays) // feat.batch_size)
    for epoch in range(feat.epochs):
        extractor.train()
        for m in extractor.modules():  # frozen BN: running stats from ImageNet, not from 32-image batches
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        perm = torch.randperm(len(arrays), generator=gen).numpy()
        batches = (np.sort(perm[i * feat.batch_size:(i + 1) * feat.batch_size]) for i in range(steps))
        losses.append(optimise_epoch(opt, (batch_loss(idx) for idx in batches), steps,
                                     f"{desc} epoch {epoch + 1}/{feat.epochs}"))
        print(f"features: {desc} epoch {epoch + 1}: loss {losses[-1]:.3f}")
    extractor.eval()
    return losses
