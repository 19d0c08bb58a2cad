"""evaluate stage: how well the trained model retrieves images of classes it never saw, next to two baselines.

Settings (both reported; the second is what users of the service experience):
  zero_shot    unseen-class sketches against the images of unseen classes only;
  generalised  unseen-class sketches against the gallery of every class.
Methods: sem_pcyc (real-valued), sem_pcyc_itq64 (64-bit ITQ codes, Hamming ranking), pretrained (the backbone's
ImageNet features matched directly, no SEM-PCYC training), random (random ranking, seeded).
Metrics: mAP@all, Precision@10/100/200 with their standard definitions (P@k counts the top k of the ranked
gallery; when a class has fewer than k images even a perfect ranking scores below 1, as noted in the output).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from . import params as params_mod
from .errors import UserError
from .fsutil import atomic_dir, dumps_json
from .params import setting
from .runtime.backbones import batched, build_backbone, to_input
from .runtime.encoder import Encoder
from .runtime.retrieval import (
    ITQ,
    average_precisions,
    hamming_distances,
    precision_recall_curve,
    retrieval_metrics,
    squared_distances,
)
from .shards import load_test_shard

KS = (10, 100, 200)


@dataclass(frozen=True)
class EvaluateSettings:
    SECTION: ClassVar[str] = "evaluate"
    seed: int = setting()
    grid_queries: int = setting(min=1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="models/sem_pcyc.pt", help="model bundle (default: %(default)s)")
    parser.add_argument("--test", default="data/prepared/test", help="test shard (default: %(default)s)")
    parser.add_argument("--out", default="reports/eval", help="report folder (default: %(default)s)")


# ----------------------------------------------------------------------------------------------- pure core

def score_method(query: np.ndarray, gallery: np.ndarray, q_labels: np.ndarray, g_labels: np.ndarray,
                 itq_bits: int = 0, seed: int = 0) -> dict:
    if itq_bits:
        itq = ITQ(bits=itq_bits, seed=seed).fit(gallery)
        dist = hamming_distances(itq.encode(query), itq.encode(gallery))
        # Hamming distances tie a lot; break ties by a fixed random order rather than gallery (class) order,
        # which would flatter or punish depending on how the gallery happens to be sorted.
        dist = dist + np.random.default_rng(seed).random(dist.shape[1])[None, :] * 1e-3
    else:
        dist = squared_distances(query, gallery)
    return retrieval_metrics(dist, q_labels, g_labels, KS), dist


def random_distances(n_query: int, n_gallery: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n_query, n_gallery))


def evaluate_all(emb: dict, raw: dict, q_labels: np.ndarray, g_labels: np.ndarray, unseen_labels: np.ndarray,
                 seed: int = 0) -> tuple[dict, dict]:
    """Metrics for every (name, method); returns (metrics, distances kept for plots)."""
    metrics, kept = {}, {}
    zs = np.isin(g_labels, unseen_labels)
    for name, mask in (("zero_shot", zs), ("generalised", np.ones_like(zs))):
        g = g_labels[mask]
        m = {}
        m["sem_pcyc"], kept[(name, "sem_pcyc")] = score_method(emb["q"], emb["g"][mask], q_labels, g)
        m["sem_pcyc_itq64"], _ = score_method(emb["q"], emb["g"][mask], q_labels, g, itq_bits=64, seed=seed)
        m["pretrained"], kept[(name, "pretrained")] = score_method(raw["q"], raw["g"][mask], q_labels, g)
        rnd = random_distances(len(q_labels), int(mask.sum()), seed)
        m["random"] = retrieval_metrics(rnd, q_labels, g, KS)
        kept[(name, "random")] = rnd
        m["gain_map_vs_pretrained"] = m["sem_pcyc"]["map_all"] / max(m["pretrained"]["map_all"], 1e-12)
        metrics[name] = m
    return metrics, kept


# ------------------------------------------------------------------------------------------------ I/O shell

def embed_shard(model_path: Path, shard: dict, device: str = "cpu") -> tuple[dict, dict]:
    """(SEM-PCYC embeddings, pretrained-backbone features) for queries and gallery."""
    try:
        enc = Encoder.load(model_path, device)
    except FileNotFoundError:
        raise UserError(f"{model_path}: not found; run `dvc repro train`") from None
    total = 2 * (len(shard["sketches"]) + len(shard["images"]))
    with tqdm(total=total, desc="evaluate embed", unit="img", mininterval=2) as bar:
        emb = {"q": batched(enc.embed_sketches, shard["sketches"], 64, device, bar),
               "g": batched(enc.embed_images, shard["images"], 64, device, bar)}
        torch.manual_seed(0)  # only the test-only `tiny` backbone has random weights: keep its baseline fixed
        net = build_backbone(enc.meta["backbone"], pretrained=True,
                             weights_path=enc.meta.get("backbone_weights")).to(device).eval()
        invert = enc.invert_sketch
        raw = {"q": batched(lambda x: net.forward_features(net.normalize(to_input(x, invert))),
                            shard["sketches"], 64, device, bar),
               "g": batched(lambda x: net.forward_features(net.normalize(to_input(x, False))),
                            shard["images"], 64, device, bar)}
    return emb, raw


def run(args: argparse.Namespace) -> None:
    (settings,) = params_mod.read(args.params, EvaluateSettings)
    shard = load_test_shard(Path(args.test))
    report, kept = evaluate_model(Path(args.model), shard, settings.seed, args.test)
    write_reports(Path(args.out), report, kept, shard, settings)
    zs, gen = report["zero_shot"], report["generalised"]
    print(f"evaluate: zero-shot mAP@all {zs['sem_pcyc']['map_all']:.3f} (pretrained {zs['pretrained']['map_all']:.3f}, "
          f"random {zs['random']['map_all']:.3f}); generalised {gen['sem_pcyc']['map_all']:.3f} "
          f"(pretrained {gen['pretrained']['map_all']:.3f}) -> {args.out}")


def unseen_labels(shard: dict) -> np.ndarray:
    classes = shard["meta"]["classes"]
    return np.array([classes.index(c) for c in shard["meta"]["unseen"]])


def evaluate_model(model_path: Path, shard: dict, seed: int, where: str) -> tuple[dict, dict]:
    """The metrics report of the model on the test shard, and the distances kept for the plots."""
    unseen = unseen_labels(shard)
    q_labels, g_labels = shard["sketches_labels"], shard["images_labels"]
    if len(q_labels) == 0:
        raise UserError(f"{where}: no query sketches of unseen classes; check the split")
    emb, raw = embed_shard(model_path, shard)
    metrics, kept = evaluate_all(emb, raw, q_labels, g_labels, unseen, seed)
    per_class_images = np.bincount(g_labels[np.isin(g_labels, unseen)],
                                   minlength=len(shard["meta"]["classes"]))[unseen]
    notes = [f"P@{k}: some unseen classes have fewer than {k} gallery images (min {int(per_class_images.min())}), "
             f"so even a perfect ranking scores below 1" for k in KS if per_class_images.min() < k]
    report = {**metrics, "counts": {"queries": int(len(q_labels)), "unseen_classes": len(unseen),
                                    "gallery_zero_shot": int(np.isin(g_labels, unseen).sum()),
                                    "gallery_generalised": int(len(g_labels))},
              "notes": notes}
    return report, kept


def write_reports(out: Path, report: dict, kept: dict, shard: dict, settings: EvaluateSettings) -> None:
    """metrics.json, per-class AP, the precision-recall curve and the retrieval grid, as one folder."""
    classes, unseen = shard["meta"]["classes"], unseen_labels(shard)
    q_labels, g_labels = shard["sketches_labels"], shard["images_labels"]
    with atomic_dir(out) as scratch:
        (scratch / "metrics.json").write_text(dumps_json(report))
        zs_d = kept[("zero_shot", "sem_pcyc")]
        zs_g = g_labels[np.isin(g_labels, unseen)]
        aps = average_precisions(zs_d, q_labels, zs_g)
        per_class = [{"class": classes[c], "ap": round(float(np.nanmean(aps[q_labels == c])), 4)}
                     for c in unseen]
        (scratch / "per_class_ap.json").write_text(dumps_json(per_class))
        curve = []
        for method in ("sem_pcyc", "pretrained", "random"):
            levels, prec = precision_recall_curve(kept[("zero_shot", method)], q_labels, zs_g)
            curve += [{"method": method, "recall": round(float(r), 2), "precision": round(float(p), 4)}
                      for r, p in zip(levels, prec)]
        (scratch / "pr_curve.json").write_text(dumps_json(curve))
        write_grid(scratch / "retrieval_grid.png", shard, kept[("generalised", "sem_pcyc")],
                   settings.grid_queries, settings.seed)


def write_grid(path: Path, shard: dict, dist: np.ndarray, n_queries: int, seed: int, top: int = 10) -> None:
    """Query sketches (one per unseen class where possible) with their top-10 images; green frame = correct."""
    q_labels, g_labels = shard["sketches_labels"], shard["images_labels"]
    rng = np.random.default_rng(seed)
    picks = []
    for c in rng.permutation(np.unique(q_labels))[:n_queries]:
        picks.append(int(rng.choice(np.flatnonzero(q_labels == c))))
    cell, pad = 72, 4
    grid = Image.new("RGB", ((top + 1) * (cell + pad) + pad, len(picks) * (cell + pad) + pad), (255, 255, 255))
    order = np.argsort(dist, axis=1, kind="stable")
    for row, qi in enumerate(picks):
        y = pad + row * (cell + pad)
        sketch = Image.fromarray(np.asarray(shard["sketches"][qi])).convert("RGB").resize((cell, cell))
        grid.paste(sketch, (pad, y))
        ImageDraw.Draw(grid).rectangle([pad - 2, y - 2, pad + cell + 1, y + cell + 1], outline=(60, 60, 200), width=2)
        for col, gi in enumerate(order[qi, :top], start=1):
            x = pad + col * (cell + pad)
            img = Image.fromarray(np.asarray(shard["images"][gi])).resize((cell, cell))
            grid.paste(img, (x, y))
            ok = g_labels[gi] == q_labels[qi]
            ImageDraw.Draw(grid).rectangle([x - 2, y - 2, x + cell + 1, y + cell + 1],
                                           outline=(30, 170, 30) if ok else (210, 30, 30), width=3)
    grid.save(path, format="PNG")
