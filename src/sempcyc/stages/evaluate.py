"""evaluate stage: how well the trained model retrieves images of classes it never saw, and of classes it did
(with sketches it never saw), next to no-training baselines.

Settings:
  zero_shot         unseen-class sketches against the images of unseen classes only;
  generalised       unseen-class sketches against the gallery of every class (what users of the service see);
  seen_generalised  held-out sketches of training classes against the gallery of every class;
  harmonic          H, the harmonic mean of the generalised and seen_generalised mAP@all: high only when both
                    sides are, so a model cannot buy one side with the other.
Methods: sem_pcyc (real-valued), sem_pcyc_itq64 (64-bit ITQ codes, Hamming ranking), and the baselines, which
need no training: pretrained (the backbone's ImageNet features matched directly), pretrained_centred (the same
features with each domain's mean over seen-class items removed, then L2-normalised: this takes away the
sketch/photo offset that dominates raw distances), pretrained_centred_edges (the same, each photo read as the mean
of its features and its edge map's, as model.photo_edges reads it), pretrained_model_input (the same features
normalised exactly as the model normalises its input: train.feature_norm, feature_dim and feature_whiten, fitted
on the training classes' untuned backbone features and stored in the bundle; this is what SEM-PCYC would start
from without any training, the tuned blocks included, so what training adds is the margin over it; for
extractors fine-tuned with a projection (features.epochs) it falls back to pretrained_centred_edges), random
(random ranking, seeded). The baselines read the ImageNet backbone as the model does (the same pooled layer,
sketch inversion and line widening), never its tuned blocks. `best_baseline` names the strongest per setting;
the release gate compares with it.
Metrics: mAP@all, Precision@10/100/200 with their standard definitions (P@k counts the top k of the ranked
gallery; when a class has fewer than k images even a perfect ranking scores below 1, as noted in the output).
Diagnostics: for unseen classes, how often a class's sketch centroid is nearest to its own image centroid.

A content-hash cache (models/evaluate-cache/, kept between runs, not a DVC output) holds each test item's model
embedding (a file per model, keyed by the model's bytes) and baseline backbone features (keyed by the backbone's
weights), both by the item's array bytes and the runtime code, so after classes are added only the new items go
through the networks; the metrics are recomputed every time, and the reports are the same bytes with or without
the cache. It keeps the embeddings of this model and of the models the release pinned (embedcache.prune_models),
so re-scoring the last release embeds only what it never saw. per_query_ap.json holds every query's AP (each
mAP@all is their mean) under the query's id (class/file), so the release gate pairs two models query by query.
The report's `test_set` digest names what the figures were measured on (classes, which are unseen, every item's
class and bytes): the release gate compares two reports only when it is the same. When the model's extractors
are the baselines' backbone (features.epochs 0), the backbone runs once per item and its features serve both.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn
from tqdm import tqdm

from .. import params as params_mod
from ..embedcache import EVALUATE_CACHE, EmbeddingCache, embedding_key, model_prefix, prune_models
from ..errors import UserError
from ..evaluation import BASELINES
from ..fsutil import atomic_dir, dumps_json, sha256_file
from ..params import setting
from ..runtime.backbones import build_backbone, edge_map, padded_pass, to_input
from ..runtime.encoder import Encoder
from ..runtime.retrieval import (
    ITQ,
    average_precisions,
    expand_gallery,
    expanded_distances,
    gallery_neighbours,
    hamming_distances,
    precision_recall_curve,
    retrieval_metrics,
    squared_distances,
)
from ..shards import load_test_shard

KS = (10, 100, 200)
# The test shard's parts: key in the embedding dicts, shard array, domain (which extractor reads it).
PARTS = (("q", "sketches", "sketch"), ("s", "seen_sketches", "sketch"), ("g", "images", "image"))
# Every network pass takes exactly this many items (backbones.padded_pass: a cached vector equals a fresh one). 8 is
# also the fastest here (efficientnet_lite0, 128 px, 1 thread: 9.5 ms an image, 20.7 ms at 64).
EMBED_BATCH = 8


@dataclass(frozen=True)
class EvaluateSettings:
    SECTION: ClassVar[str] = "evaluate"
    seed: int = setting()
    grid_queries: int = setting(min=1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="models/sem_pcyc.pt", help="model bundle (default: %(default)s)")
    parser.add_argument("--test", default="data/prepared/test", help="test shard (default: %(default)s)")
    parser.add_argument("--out", default="reports/eval", help="report folder (default: %(default)s)")
    parser.add_argument("--cache", default=str(EVALUATE_CACHE),
                        help="embedding and backbone-feature cache (default: %(default)s)")


# ----------------------------------------------------------------------------------------------- pure core

def score_method(query: np.ndarray, gallery: np.ndarray, q_labels: np.ndarray, g_labels: np.ndarray,
                 itq_bits: int = 0, seed: int = 0, expand: int = 0) -> dict:
    """Metrics of one method in one setting: ranked by squared distance after `expand` query expansion (the
    model's query_expansion, given to every method alike), or with itq_bits by Hamming distance (unexpanded)."""
    if itq_bits:
        itq = ITQ(bits=itq_bits, seed=seed).fit(gallery)
        dist = hamming_distances(itq.encode(query), itq.encode(gallery))
        # Hamming distances tie a lot; break ties by a fixed random order rather than gallery (class) order,
        # which would flatter or punish depending on how the gallery happens to be sorted.
        dist = dist + np.random.default_rng(seed).random(dist.shape[1])[None, :] * 1e-3
    else:
        dist = expanded_distances(query, gallery, expand)
    return retrieval_metrics(dist, q_labels, g_labels, KS), dist


def random_distances(n_query: int, n_gallery: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n_query, n_gallery))


def centre(raw: dict, seen_image: np.ndarray) -> dict:
    """Raw features with each domain's seen-class mean removed, L2-normalised. The sketch mean comes from the
    held-out seen-class sketches, the image mean from seen-class gallery images. Only when no seen sketch was held
    out (a tiny dataset) does the sketch mean fall back to the unseen queries' own, which can only flatter this
    baseline, never the model it is compared with."""
    sketch_mean = raw["s"].mean(axis=0) if len(raw["s"]) else raw["q"].mean(axis=0)
    image_mean = raw["g"][seen_image].mean(axis=0)

    def unit(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
        x = x - mean
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return {"q": unit(raw["q"], sketch_mean), "s": unit(raw["s"], sketch_mean), "g": unit(raw["g"], image_mean)}


def score_setting(vectors: dict, queries: str, q_labels: np.ndarray, g_labels: np.ndarray, mask: np.ndarray,
                  seed: int, itq: bool, expand: int) -> tuple[dict, dict]:
    """mAP and P@k of every method for one setting: `queries` names the query rows ("q" unseen, "s" seen),
    `mask` the gallery rows; (metrics, distances kept for plots)."""
    m, kept = {}, {}
    g = g_labels[mask]
    for method in ("sem_pcyc", *BASELINES[:-1]):  # random is ranked below, without vectors
        v = vectors[method]
        m[method], kept[method] = score_method(v[queries], v["g"][mask], q_labels, g, expand=expand)
    if itq:
        v = vectors["sem_pcyc"]
        m["sem_pcyc_itq64"], _ = score_method(v[queries], v["g"][mask], q_labels, g, itq_bits=64, seed=seed)
    kept["random"] = random_distances(len(q_labels), int(mask.sum()), seed)
    m["random"] = retrieval_metrics(kept["random"], q_labels, g, KS)
    m["best_baseline"] = max(BASELINES, key=lambda b: m[b]["map_all"])
    m["gain_map_vs_best_baseline"] = m["sem_pcyc"]["map_all"] / max(m[m["best_baseline"]]["map_all"], 1e-12)
    return m, kept


def evaluate_all(emb: dict, raw: dict, labels: dict, unseen_labels: np.ndarray, seed: int = 0,
                 expand: int = 0, model_input: dict | None = None, gallery_expand: int = 0) -> tuple[dict, dict]:
    """Metrics for every setting and method, H, and the diagnostics; (metrics, distances kept for plots).
    `emb`/`raw`/`model_input`: "q" unseen queries, "s" seen queries, "g" gallery; `labels` the same keys; `raw`
    also "ge", the backbone features of the gallery photos' edge maps; `model_input` the backbone features as the
    model would read them untrained (model_inputs; None for extractors fine-tuned with a projection). `expand` and
    `gallery_expand`: the model's query_expansion and gallery_expansion, applied to the baselines too, so the gate
    compares like with like; the gallery is expanded whole, as served, before the zero-shot setting keeps its
    unseen part."""
    zs = np.isin(labels["g"], unseen_labels)
    with_edges = {**raw, "g": (raw["g"] + raw["ge"]) / 2}  # photos read as model.photo_edges reads them
    vectors = {"sem_pcyc": emb, "pretrained": raw, "pretrained_centred": centre(raw, ~zs),
               "pretrained_centred_edges": centre(with_edges, ~zs)}
    if model_input is not None:
        vectors["pretrained_model_input"] = model_input
    if gallery_expand > 0:
        vectors = {m: {**v, "g": expand_gallery(v["g"], gallery_neighbours(v["g"], gallery_expand))}
                   for m, v in vectors.items()}
    vectors.setdefault("pretrained_model_input", vectors["pretrained_centred_edges"])  # expanded once, not twice
    metrics, kept = {}, {}
    for name, queries, mask in (("zero_shot", "q", zs), ("generalised", "q", np.ones_like(zs)),
                                ("seen_generalised", "s", np.ones_like(zs))):
        if not len(labels[queries]):
            continue
        metrics[name], dists = score_setting(vectors, queries, labels[queries], labels["g"], mask, seed,
                                             itq=name != "seen_generalised", expand=expand)
        kept |= {(name, method): d for method, d in dists.items()}
    if "seen_generalised" in metrics:
        metrics["harmonic"] = {m: harmonic(metrics["generalised"][m]["map_all"],
                                           metrics["seen_generalised"][m]["map_all"])
                               for m in ("sem_pcyc", *BASELINES)}
    metrics["diagnostics"] = {"unseen_centroid_hit_rate": {
        m: centroid_hit_rate(v["q"], labels["q"], v["g"][zs], labels["g"][zs]) for m, v in vectors.items()}}
    return metrics, kept


def input_norms(bundle: dict, enc: Encoder) -> dict[str, nn.Module] | None:
    """The sketch and image normalisation that makes the backbone's features what the model would read without
    any training: the bundle's baseline_norms (tuned blocks: fitted on the untuned backbone's features), the
    model's own (frozen backbone), or None (extractors fine-tuned with a projection: no such baseline). `bundle`
    is the model file as load_networks read it, `enc` its Encoder."""
    if "baseline_norms" in bundle:  # shaped like the model's own norms, with other statistics
        norms = {"sketch": copy.deepcopy(enc.sketch_norm), "image": copy.deepcopy(enc.image_norm)}
        for domain, norm in norms.items():
            norm.load_state_dict(bundle["baseline_norms"][domain])
        return norms
    frozen = enc.meta.get("feature_proj_dim") is None and not enc.meta.get("tune_blocks")
    return {"sketch": enc.sketch_norm, "image": enc.image_norm} if frozen else None


def model_inputs(norms: dict[str, nn.Module], photo_edges: bool, raw: dict) -> dict:
    """The backbone features of the test items ("q", "s", "g"; `raw` as embed_shard gives it) through `norms`
    (input_norms), photos read as the model reads them: what SEM-PCYC would start from without training."""
    photos = (raw["g"] + raw["ge"]) / 2 if photo_edges else raw["g"]
    with torch.no_grad():
        def normed(domain: str, x: np.ndarray) -> np.ndarray:
            return norms[domain](torch.from_numpy(x)).numpy() if len(x) else x
        return {"q": normed("sketch", raw["q"]), "s": normed("sketch", raw["s"]), "g": normed("image", photos)}


def harmonic(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


def centroid_hit_rate(q: np.ndarray, q_labels: np.ndarray, g: np.ndarray, g_labels: np.ndarray) -> float:
    """Share of classes whose sketch centroid is nearest (Euclidean) to the image centroid of the same class:
    whether the two domains share coordinates, class by class."""
    classes = np.intersect1d(np.unique(q_labels), np.unique(g_labels))
    sk = np.stack([q[q_labels == c].mean(axis=0) for c in classes])
    im = np.stack([g[g_labels == c].mean(axis=0) for c in classes])
    return float(np.mean(squared_distances(sk, im).argmin(axis=1) == np.arange(len(classes))))


# ------------------------------------------------------------------------------------------------ I/O shell

def item_key(array: np.ndarray, domain: str) -> str:
    """What names a test item in the caches: its domain and its uint8 array (dtype, shape and bytes)."""
    a = np.ascontiguousarray(array)
    h = hashlib.sha256(f"{domain}:{a.dtype.str}:{a.shape}:".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def state_sha(net: nn.Module) -> str:
    """sha256 of a network's weights and buffers (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name, tensor in net.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}:".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def fixed_batches(fn, rows: list, bar=None) -> list[np.ndarray]:
    """`fn` (tensor batch -> vectors) over `rows`, EMBED_BATCH rows a pass (the last pass padded with zeros), without
    gradients: one float32 vector a row."""
    out = []
    for start in range(0, len(rows), EMBED_BATCH):
        chunk = np.stack([np.asarray(r) for r in rows[start:start + EMBED_BATCH]])
        out += list(padded_pass(fn, chunk, EMBED_BATCH))
        if bar is not None:
            bar.update(len(chunk))
    return out


def load_networks(model_path: Path) -> tuple[Encoder, nn.Module, dict]:
    """The model's Encoder, the baselines' backbone (ImageNet weights, as the model bundle names them) and the
    bundle itself (read once; input_norms reads more of it)."""
    try:
        bundle = torch.load(model_path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{model_path}: not found; run `dvc repro train`") from None
    enc = Encoder.from_bundle(bundle)
    torch.manual_seed(0)  # only the test-only `tiny` backbone has random weights: keep its baseline fixed
    net = build_backbone(enc.meta["backbone"], pretrained=True, weights_path=enc.meta.get("backbone_weights"))
    return enc, net.eval(), bundle


def runs_backbone(enc: Encoder, domain: str, net: nn.Module, net_sha: str) -> bool:
    """Whether the model's extractor of `domain` is exactly `net`: the same backbone class and weights and no
    projection (features.epochs 0: the model's extractors are the frozen ImageNet backbone)."""
    extractor = enc.sketch_extractor if domain == "sketch" else enc.image_extractor
    return (isinstance(extractor.proj, nn.Identity) and type(extractor.backbone) is type(net)
            and state_sha(extractor.backbone) == net_sha)


def open_caches(folder: Path, model_sha: str, enc: Encoder, net_sha: str) -> dict[str, EmbeddingCache]:
    """The model's embeddings ("emb": model bytes, a file named after them), the baselines' backbone features
    ("raw": backbone name, weights, sketch inversion and line widening) and those of the photos' edge maps
    ("edge"), all also keyed by the runtime code and the batch size."""
    model = f"evaluate model {model_sha} batch {EMBED_BATCH}"
    backbone = (f"evaluate backbone {enc.meta['backbone']} {net_sha} invert_sketch {enc.invert_sketch} "
                f"thicken_lines {enc.thicken} batch {EMBED_BATCH}")
    return {"emb": EmbeddingCache(folder, embedding_key(model), model_prefix(model_sha)),
            "raw": EmbeddingCache(folder, embedding_key(backbone), "backbone-"),
            "edge": EmbeddingCache(folder, embedding_key(f"{backbone} photo edge maps"), "edges-")}


def fill_domain(enc: Encoder, net: nn.Module, domain: str, rows: dict, caches: dict, shared: bool,
                bar) -> dict[str, int]:
    """Compute what the caches lack for `rows` (item key -> uint8 array): the backbone features, for photos also
    those of their edge maps (the photo-edge baseline), and the model embeddings; with `shared`, the embeddings
    from those features rather than another pass of the same CNN. Counts of embeddings computed, and of passes
    through the baselines' backbone and through the model's extractor."""
    backbone = lambda x: net.forward_features(net.normalize(x))  # noqa: E731 - the baselines' features
    invert = enc.invert_sketch if domain == "sketch" else False
    passes = fill(caches["raw"].table, rows, lambda x: backbone(to_input(x, invert, enc.thicken)), bar)
    if domain == "image":  # edge maps drawn like the model's sketches, as backbones.extract draws them
        draw = lambda x: edge_map(to_input(x, False, enc.thicken), enc.invert_sketch, enc.thicken)  # noqa: E731
        passes += fill(caches["edge"].table, rows, lambda x: backbone(draw(x)), bar)
    emb = caches["emb"].table
    todo = [k for k in rows if k not in emb]
    if not shared:
        embed = enc.embed_sketches if domain == "sketch" else enc.embed_images
        emb.update(zip(todo, fixed_batches(embed, [rows[k] for k in todo], bar)))
        return {"embedded": len(todo), "backbone": passes, "extractor": len(todo)}
    features = [caches["raw"].table[k] for k in todo]
    if domain == "image" and enc.photo_edges:  # the model reads the mean of a photo's and its edge map's features
        features = [(photo + caches["edge"].table[k]) / 2 for photo, k in zip(features, todo)]
    head = enc.embed_sketch_features if domain == "sketch" else enc.embed_image_features
    emb.update(zip(todo, fixed_batches(head, features)))
    return {"embedded": len(todo), "backbone": passes, "extractor": 0}


def fill(table: dict[str, np.ndarray], rows: dict, fn, bar) -> int:
    """Add `fn`'s vectors of the rows `table` lacks; how many."""
    todo = [k for k in rows if k not in table]
    table.update(zip(todo, fixed_batches(fn, [rows[k] for k in todo], bar)))
    return len(todo)


def item_keys(shard: dict) -> dict[str, list[str]]:
    """The item key of every row of each part ("q", "s", "g")."""
    return {k: [item_key(a, domain) for a in shard[name]] for k, name, domain in PARTS}


def test_set_digest(shard: dict, keys: dict[str, list[str]]) -> str:
    """sha256 naming what the figures were measured on: the classes, which are unseen, and every item's class and
    bytes. Two reports are comparable only when it is the same (adding classes changes it)."""
    h = hashlib.sha256(dumps_json({"classes": shard["meta"]["classes"], "unseen": shard["meta"]["unseen"]}).encode())
    for k, name, _ in PARTS:
        h.update(dumps_json({"part": k, "labels": np.asarray(shard[f"{name}_labels"]).tolist(),
                             "items": keys[k]}).encode())
    return h.hexdigest()


def embed_shard(enc: Encoder, net: nn.Module, model_path: Path, shard: dict, keys: dict,
                cache_dir: Path) -> tuple[dict, dict, dict]:
    """(SEM-PCYC embeddings, pretrained-backbone features, counts) of the unseen queries ("q"), the seen queries
    ("s") and the gallery ("g"; its edge maps' backbone features: "ge"), whose item keys are `keys`, through the
    networks load_networks gave for `model_path`. Only items the caches in `cache_dir` lack go through them;
    counts: items (distinct), embedded (model embeddings computed), backbone and extractor (passes through the
    baselines' backbone and the model's extractor CNN), shared (domains whose model extractor is the baselines'
    backbone, so that one pass serves both)."""
    net_sha, model_sha = state_sha(net), sha256_file(model_path)
    caches = open_caches(cache_dir, model_sha, enc, net_sha)
    counts = {"items": 0, "embedded": 0, "backbone": 0, "extractor": 0, "shared": []}
    with tqdm(desc="evaluate embed", unit="img", mininterval=2) as bar:
        for domain in ("sketch", "image"):
            rows = domain_rows(shard, keys, domain)
            shared = runs_backbone(enc, domain, net, net_sha)
            done = fill_domain(enc, net, domain, rows, caches, shared, bar) | {"items": len(rows)}
            counts = {k: counts[k] + done[k] for k in done} | {"shared": counts["shared"] + [domain] * shared}
    for cache in caches.values():
        cache.save()
    prune_models(cache_dir, model_sha)
    emb = {k: stacked(caches["emb"].table, keys[k]) for k in keys}
    raw = {k: stacked(caches["raw"].table, keys[k]) for k in keys} | {"ge": stacked(caches["edge"].table, keys["g"])}
    return emb, raw, counts


def domain_rows(shard: dict, keys: dict, domain: str) -> dict:
    """item key -> uint8 array (memory-mapped), once per distinct item, of the parts of `domain`."""
    rows = {}
    for k, name, d in PARTS:
        if d == domain:
            for key, row in zip(keys[k], shard[name]):
                rows.setdefault(key, row)
    return rows


def stacked(table: dict[str, np.ndarray], keys: list[str]) -> np.ndarray:
    return np.stack([table[k] for k in keys]).astype(np.float32) if keys else np.zeros((0, 0), np.float32)


def run(args: argparse.Namespace) -> None:
    (settings,) = params_mod.read(args.params, EvaluateSettings)
    started = time.time()
    shard = load_test_shard(Path(args.test))
    report, kept, counts = evaluate_model(Path(args.model), shard, settings.seed, args.test, Path(args.cache))
    write_reports(Path(args.out), report, kept, shard, settings)
    print(f"evaluate: {counts['items']} test items ({counts['embedded']} embedded, "
          f"{counts['items'] - counts['embedded']} from cache; CNN passes: {counts['backbone']} baseline backbone, "
          f"{counts['extractor']} model extractor; extractor is the backbone for: "
          f"{', '.join(counts['shared']) or 'none'}) in {time.time() - started:.1f} s")
    print("evaluate: " + "; ".join(
        f"{name} mAP@all {report[name]['sem_pcyc']['map_all']:.3f} (best baseline {report[name]['best_baseline']} "
        f"{report[name][report[name]['best_baseline']]['map_all']:.3f})"
        for name in ("zero_shot", "generalised", "seen_generalised") if name in report)
        + (f"; H {report['harmonic']['sem_pcyc']:.3f}" if "harmonic" in report else "") + f" -> {args.out}")


def unseen_labels(shard: dict) -> np.ndarray:
    classes = shard["meta"]["classes"]
    return np.array([classes.index(c) for c in shard["meta"]["unseen"]])


def evaluate_model(model_path: Path, shard: dict, seed: int, where: str,
                   cache_dir: Path) -> tuple[dict, dict, dict]:
    """The metrics report of the model on the test shard, the distances kept for the plots, and embed_shard's
    counts (which depend on the cache, so they stay out of the report)."""
    unseen = unseen_labels(shard)
    q_labels, g_labels = shard["sketches_labels"], shard["images_labels"]
    if len(q_labels) == 0:
        raise UserError(f"{where}: no query sketches of unseen classes; check the split")
    keys = item_keys(shard)
    enc, net, bundle = load_networks(model_path)
    emb, raw, counts = embed_shard(enc, net, model_path, shard, keys, cache_dir)
    labels = {"q": q_labels, "s": shard["seen_sketches_labels"], "g": g_labels}
    expand, gallery_expand = enc.cfg.query_expansion, enc.cfg.gallery_expansion
    norms = input_norms(bundle, enc)
    model_input = model_inputs(norms, enc.photo_edges, raw) if norms is not None else None
    metrics, kept = evaluate_all(emb, raw, labels, unseen, seed, expand, model_input, gallery_expand)
    per_class_images = np.bincount(g_labels[np.isin(g_labels, unseen)],
                                   minlength=len(shard["meta"]["classes"]))[unseen]
    notes = [f"P@{k}: some unseen classes have fewer than {k} gallery images (min {int(per_class_images.min())}), "
             f"so even a perfect ranking scores below 1" for k in KS if per_class_images.min() < k]
    report = {**metrics, "counts": {"queries": int(len(q_labels)), "unseen_classes": len(unseen),
                                    "seen_queries": int(len(labels["s"])),
                                    "gallery_zero_shot": int(np.isin(g_labels, unseen).sum()),
                                    "gallery_generalised": int(len(g_labels))},
              "test_set": test_set_digest(shard, keys), "query_expansion": expand,
              "gallery_expansion": gallery_expand, "notes": notes}
    return report, kept, counts


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
        (scratch / "per_query_ap.json").write_text(dumps_json(per_query_aps(kept, shard, report["test_set"], aps)))
        curve = []
        for method in ("sem_pcyc", *BASELINES):
            levels, prec = precision_recall_curve(kept[("zero_shot", method)], q_labels, zs_g)
            curve += [{"method": method, "recall": round(float(r), 2), "precision": round(float(p), 4)}
                      for r, p in zip(levels, prec)]
        (scratch / "pr_curve.json").write_text(dumps_json(curve))
        write_grid(scratch / "retrieval_grid.png", shard, kept[("generalised", "sem_pcyc")],
                   settings.grid_queries, settings.seed)


def per_query_aps(kept: dict, shard: dict, test_set: str, zero_shot: np.ndarray) -> dict:
    """SEM-PCYC's AP of every query under its id: unseen queries' zero-shot (`zero_shot`, already computed) and
    generalised, seen queries' generalised; null where the gallery has no image of the query's class."""
    classes, g_labels = shard["meta"]["classes"], shard["images_labels"]

    def rows(ids: list[str], labels: np.ndarray, figures: dict[str, np.ndarray]) -> dict:
        return {i: {"class": classes[c], **{f: None if np.isnan(ap[n]) else float(ap[n]) for f, ap in figures.items()}}
                for n, (i, c) in enumerate(zip(ids, labels))}
    q = shard["sketches_labels"]
    out = {"test_set": test_set, "unseen": rows(shard["sketches_ids"], q, {
        "zero_shot": zero_shot, "generalised": average_precisions(kept[("generalised", "sem_pcyc")], q, g_labels)})}
    s = shard["seen_sketches_labels"]
    seen = average_precisions(kept[("seen_generalised", "sem_pcyc")], s, g_labels) if len(s) else np.zeros(0)
    return out | {"seen": rows(shard["seen_sketches_ids"], s, {"seen_generalised": seen})}


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
