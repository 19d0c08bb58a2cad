"""Retrieval quality of SEM-PCYC variants next to the no-training baselines, mean ± sd over seeds.

Defaults are chosen on validation classes only: every variant trains on the fit classes of the training side
(the features and train stages' split), `val` is its zero-shot mAP@all on the held-out validation classes, and
the test figures (unseen classes; held-out sketches of seen classes) are reported beside it, never used to choose.

The extractor is ImageNet EfficientNet-Lite0, frozen or with its last blocks tuned on the fit classes (the
features stage with features.epochs 0 and FEATURES' settings): its features of the training and test shards are
computed once per dataset and kind (a tuned kind's once per seed: each seed tunes the blocks again) and cached
under bench/out/quality/<dataset>/, so each run trains SEM-PCYC on cached features only; the baselines of a
tuned kind read the untuned backbone, as evaluate's do. A variant is the project's params (model, train sections)
with a few fields changed; `shuffled` variants permute the class vectors among the training classes (is
semantics used at all?).

Usage (a project folder whose data/prepared/ was made by `dvc repro prepare`, e.g. on the cross-artist tar):
  python bench/quality.py --project DIR [--seeds 0,1,2] [--only default,original] [--budget-min 30] [--jobs 2]
                          [--skips 1]   # only the served skip 1: no generators trained, a run in seconds
  python bench/quality.py --project DIR --features-grid      # how to read the data, on validation, no training
  python bench/quality.py --project DIR --posterior-grid     # posterior and expansion settings, on validation
Writes bench/out/quality/<dataset>/results-<code>.json (runs are reused only for the same variants, skips, training
and scoring code; runs with other seeds or variants at once add to it) and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import time
from pathlib import Path

import numpy as np
import torch

from common import REPO
from sempcyc import params
from sempcyc.recipe import ModelSettings
from sempcyc.runtime import model as model_mod
from sempcyc.runtime import retrieval
from sempcyc.runtime.backbones import Extractor, batched, extract
from sempcyc.shards import load_test_shard, load_train_shard
from sempcyc.split import SplitSettings
from sempcyc.stages import evaluate, features, train

OUT = REPO / "bench" / "out" / "quality"
SEMANTIC = {"ae_linear": True, "unit_embeddings": True, "semantic_classifier": True, "lambda_code": 1.0}
# How the extractor reads the data (model settings, and features.tune_blocks: 0 unless given): "plain" photos
# alone, "edges" photos with their edge maps (model.photo_edges), "lines" also the head-less backbone and sketch
# and edge lines widened, "lines, tuned N" also the backbone's last N blocks tuned on the fit classes ("lines,
# tuned" 4 of them; "lines, tuned 5" is the default); the others are steps between them, for --features-grid.
DEFAULT_READ = {"backbone": "efficientnet_lite0_headless", "photo_edges": True, "thicken_lines": 3, "tune_blocks": 5}
FEATURES = {"plain": {"backbone": "efficientnet_lite0", "photo_edges": False, "thicken_lines": 1},
            "edges": {"backbone": "efficientnet_lite0", "photo_edges": True, "thicken_lines": 1},
            "edges, lines widened": {"backbone": "efficientnet_lite0", "photo_edges": True, "thicken_lines": 3},
            "edges, head-less": {"backbone": "efficientnet_lite0_headless", "photo_edges": True, "thicken_lines": 1},
            "lines": {"backbone": "efficientnet_lite0_headless", "photo_edges": True, "thicken_lines": 3},
            "lines, 5 px": {"backbone": "efficientnet_lite0_headless", "photo_edges": True, "thicken_lines": 5},
            **{f"lines, tuned{'' if n == 4 else f' {n}'}": {"backbone": "efficientnet_lite0_headless",
                                                             "photo_edges": True, "thicken_lines": 3, "tune_blocks": n}
               for n in (1, 2, 4, 5, 6, 8)},
            # the default's, with the tuning also distilling the untuned network's ImageNet predictions (SAKE;
            # class-aware when the project's semantic stage ran the wordnet backend)
            "lines, tuned 5, distilled": {**DEFAULT_READ, "tune_distill": 1.0},
            # the shuffle ablation of the class-aware distillation: the classes' ImageNet similarity rows permuted
            "lines, tuned 5, distilled, similarity shuffled": {**DEFAULT_READ, "tune_distill": 1.0,
                                                               "shuffle_similarity": True},
            # the default's, with the tuning's classifier also learning the class vectors' soft labels
            # (features.tune_semantic w), and its shuffle ablation: the class vectors permuted among the classes
            **{f"lines, tuned 5, semantic {w:g}{', shuffled' * shuffled}": {
                **DEFAULT_READ, "tune_semantic": w, **({"shuffle_semantics": True} if shuffled else {})}
               for w in (0.3, 1.0, 3.0) for shuffled in (False, True)}}
DEFAULT_KIND = "lines, tuned 5"  # features.tune_blocks 5
UNTUNED = {kind: "lines" for kind in FEATURES if kind.startswith("lines, tuned")}  # baselines read the backbone
# name -> (TrainRun fields, model.Config overrides on top of the preset, shuffle the class vectors, FEATURES key)
CENTRED = {"preset": "tuned", "feature_norm": "centre", "feature_dim": 512}
LINES = {**CENTRED, "feature_dim": 0}  # 320-wide features: no projection
WHITENED = {**LINES, "feature_whiten": 0.25}
WHITEN_GRID = (0.125, 0.25, 0.5, 1.0)  # --features-grid's train.feature_whiten candidates
# the seen-class posterior and query expansion as posterior_grid chose them for each kind of features
POSTERIOR = {"posterior_weight": 8.0, "posterior_temperature": 2.0}
EXPANDED = {**POSTERIOR, "query_expansion": 1}
LINES_EXPANDED = {"posterior_weight": 256.0, "posterior_temperature": 3.5, "query_expansion": 3}
WHITENED_EXPANDED = {"posterior_weight": 256.0, "posterior_temperature": 3.5, "query_expansion": 1}
TUNED_EXPANDED = {"posterior_weight": 32.0, "posterior_temperature": 3.0, "query_expansion": 1}
GALLERY_EXPANDED = {**TUNED_EXPANDED, "gallery_expansion": 5}
FIVE_BLOCKS_EXPANDED = {"posterior_weight": 16.0, "posterior_temperature": 2.5, "query_expansion": 1,
                        "gallery_expansion": 2}  # the transfer preset's
# posterior_grid's candidates
WEIGHTS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0)
TEMPERATURES = (0.5, 1.0, 2.0, 2.5, 3.0, 3.5, 4.0)
EXPANSIONS = (1, 2, 3, 5, 8)
GALLERY_EXPANSIONS = (1, 2, 3, 5, 8)
VARIANTS = {
    "original": ({"preset": "original", "feature_norm": "standardize", "feature_dim": 0}, {}, False, "plain"),
    "tuned": ({"preset": "tuned", "feature_norm": "standardize", "feature_dim": 0}, {}, False, "plain"),
    "original + centred": ({**CENTRED, "preset": "original"}, {}, False, "plain"),
    "tuned + centred": (CENTRED, {}, False, "plain"),
    "semantic": (CENTRED, SEMANTIC, False, "plain"),
    "semantic, vectors shuffled": (CENTRED, SEMANTIC, True, "plain"),
    "tuned + centred, photo edges": (CENTRED, {}, False, "edges"),
    "tuned + centred, photo edges, vectors shuffled": (CENTRED, {}, True, "edges"),
    "semantic, photo edges": (CENTRED, SEMANTIC, False, "edges"),
    "semantic, photo edges, vectors shuffled": (CENTRED, SEMANTIC, True, "edges"),
    "tuned + centred, photo edges, posterior": (CENTRED, POSTERIOR, False, "edges"),
    "tuned + centred, photo edges, posterior, vectors shuffled": (CENTRED, POSTERIOR, True, "edges"),
    "tuned + centred, photo edges, posterior, expansion": (CENTRED, EXPANDED, False, "edges"),
    "tuned + centred, photo edges, posterior, expansion, vectors shuffled": (CENTRED, EXPANDED, True, "edges"),
    "lines": (LINES, {}, False, "lines"),
    "lines, posterior, expansion": (LINES, LINES_EXPANDED, False, "lines"),
    "lines, posterior, expansion, vectors shuffled": (LINES, LINES_EXPANDED, True, "lines"),
    "lines, whitened": (WHITENED, {}, False, "lines"),
    "lines, whitened, posterior, expansion": (WHITENED, WHITENED_EXPANDED, False, "lines"),
    "lines, whitened, posterior, expansion, vectors shuffled": (WHITENED, WHITENED_EXPANDED, True, "lines"),
    "tuned blocks, whitened": (WHITENED, {}, False, "lines, tuned"),
    "tuned blocks, whitened, posterior, expansion": (WHITENED, TUNED_EXPANDED, False, "lines, tuned"),
    "tuned blocks, whitened, posterior, expansion, vectors shuffled": (WHITENED, TUNED_EXPANDED, True,
                                                                       "lines, tuned"),
    "tuned blocks, whitened, posterior, both expansions": (WHITENED, GALLERY_EXPANDED, False, "lines, tuned"),
    "tuned blocks, whitened, posterior, both expansions, vectors shuffled": (WHITENED, GALLERY_EXPANDED, True,
                                                                             "lines, tuned"),
    "5 tuned blocks, whitened, posterior, both expansions": (WHITENED, FIVE_BLOCKS_EXPANDED, False, "lines, tuned 5"),
    "5 tuned blocks, whitened, posterior, both expansions, vectors shuffled": (WHITENED, FIVE_BLOCKS_EXPANDED, True,
                                                                               "lines, tuned 5"),
    # the default with the ConSE part (model.Config.semantic_weight): run on a project whose class vectors are the
    # wordnet backend's (semantic.backend wordnet); `shuffled` is the shuffle ablation (train.shuffle_semantics)
    **{f"5 tuned blocks, whitened, posterior, both expansions, semantic part w {w:g}{', shuffled' * shuffled}":
       (WHITENED, {**FIVE_BLOCKS_EXPANDED, "semantic_weight": w}, shuffled, "lines, tuned 5")
       for w in (1.0, 4.0) for shuffled in (False, True)},
    **{f"5 tuned blocks, whitened, posterior, both expansions, projection w {w:g}{', shuffled' * shuffled}":
       (WHITENED, {**FIVE_BLOCKS_EXPANDED, "projection_weight": w}, shuffled, "lines, tuned 5")
       for w in (1.0, 4.0) for shuffled in (False, True)},
    "5 tuned blocks distilled, whitened, posterior, both expansions": (WHITENED, FIVE_BLOCKS_EXPANDED, False,
                                                                       "lines, tuned 5, distilled"),
    "5 tuned blocks distilled (similarity shuffled), whitened, posterior, both expansions": (
        WHITENED, FIVE_BLOCKS_EXPANDED, False, "lines, tuned 5, distilled, similarity shuffled"),
    **{f"5 tuned blocks distilled, whitened, posterior, both expansions, semantic part w 1{', shuffled' * s}":
       (WHITENED, {**FIVE_BLOCKS_EXPANDED, "semantic_weight": 1.0}, s, "lines, tuned 5, distilled")
       for s in (False, True)},
    **{f"5 tuned blocks semantic {w:g}{', shuffled' * s}, whitened, posterior, both expansions":
       (WHITENED, FIVE_BLOCKS_EXPANDED, False, f"lines, tuned 5, semantic {w:g}{', shuffled' * s}")
       for w in (0.3, 1.0, 3.0) for s in (False, True)},
}
SKIPS = (0.0, 0.5, 0.75, 0.875, 1.0)
RESULTS_VERSION = 2  # 2: each seed tunes a tuned kind's blocks again (before, seed 0's blocks served every seed)
COLUMNS = ("val", "zs_map", "zs_p10", "gen_map", "gen_p10", "seen_map", "H", "hit")


def dataset_key(project: Path) -> str:
    h = hashlib.sha256()
    for part in ("train/classes.json", "test/classes.json", "train/sketches_ids.json", "test/images_ids.json"):
        path = project / "data/prepared" / part
        h.update(path.read_bytes() if path.exists() else part.encode())
    h.update(str(np.load(project / "data/prepared/train/images.npy", mmap_mode="r").shape).encode())
    return h.hexdigest()[:12]


def features_dir(out: Path, kind: str, seed: int = 0) -> Path:
    """Where a kind's features are cached; a tuned kind's blocks are tuned once per seed (features.seed), so its
    seeds other than 0 have folders of their own."""
    named = {"plain": "features", "edges": "features-photo-edges", "lines": "features-headless-lines"}
    folder = out / named.get(kind, "features-" + kind.replace(", ", "-").replace(" ", "-"))
    return folder.with_name(f"{folder.name}-seed-{seed}") if seed and "tune_blocks" in FEATURES[kind] else folder


def cache_features(project: Path, out: Path, kind: str, test: bool = True, seed: int = 0) -> None:
    """The features stage with features.epochs 0, features.seed `seed` and the FEATURES[kind] model settings into
    features_dir(), and the same extractor's features of the test shard (unseen queries q, seen queries s, gallery
    g; with photo edges, the gallery as the model reads it: ge) into its test_*.npy, unless not `test`. The
    baselines always read g, the photos alone."""
    model, feat, split = params.read(project / "params.yaml", ModelSettings, features.FeaturesSettings,
                                     SplitSettings)
    fields = dict(FEATURES[kind])
    shuffle = fields.pop("shuffle_similarity", False)
    shuffle_semantics = fields.pop("shuffle_semantics", False)
    feat = dataclasses.replace(feat, epochs=0, tune_blocks=fields.pop("tune_blocks", 0), seed=seed,
                               **{k: fields.pop(k) for k in list(fields) if k.startswith("tune_")})
    model = dataclasses.replace(model, **fields)
    folder, edges = features_dir(out, kind, seed), model.photo_edges
    if not (folder / "extractors.pt").exists():
        shard = load_train_shard(project / "data/prepared/train")
        if shuffle:
            order = np.random.default_rng(seed).permutation(len(shard["imagenet_similarity"]))
            shard["imagenet_similarity"] = shard["imagenet_similarity"][order]
        if shuffle_semantics:
            shard["semantic"] = shard["semantic"][np.random.default_rng(seed).permutation(len(shard["semantic"]))]
        features.compute_features(shard, folder, model, feat, split, "cpu")
    wanted = [(key, part, with_edges) for key, part, with_edges in
              (("q", "sketches", False), ("s", "seen_sketches", False), ("g", "images", False), ("ge", "images", True))
              if test and (edges or not with_edges) and not (folder / f"test_{key}.npy").exists()]
    if not wanted:
        return
    shard = load_test_shard(project / "data/prepared/test")
    torch.manual_seed(0)
    net = Extractor(model.backbone, None, pretrained=True, weights_path=model.backbone_weights).eval()
    net.load_state_dict(torch.load(folder / "extractors.pt", weights_only=True)["sketch_extractor"])  # tuned or not
    for key, part, with_edges in wanted:
        print(f"quality: test features {key} ({len(shard[part])})", flush=True)
        read = lambda x, e=with_edges: extract(net, x, model.invert_sketch, e, model.thicken_lines)  # noqa: E731
        np.save(folder / f"test_{key}.npy", batched(read, shard[part], 64))


def cache_all(project: Path, out: Path, kinds: list[str], seeds: list[int], jobs: int) -> None:
    """cache_features for every kind and seed; a tuned kind's seeds (each tunes its blocks again, the bulk of a
    cold run) in `jobs` processes of one torch thread each, after the other kinds (one folder for every seed)."""
    tuned = [(kind, seed) for kind in kinds if "tune_blocks" in FEATURES[kind] for seed in seeds]
    for kind in kinds:
        if "tune_blocks" not in FEATURES[kind]:
            cache_features(project, out, kind)
    if jobs <= 1:
        for kind, seed in tuned:
            cache_features(project, out, kind, seed=seed)
        return
    spawn = multiprocessing.get_context("spawn")  # a forked child of a process that ran OpenMP can hang
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=spawn, initializer=torch.set_num_threads,
                                                initargs=(1,)) as pool:
        for done in [pool.submit(cache_features, project, out, kind, True, seed) for kind, seed in tuned]:
            done.result()


def test_labels(project: Path) -> tuple[dict, np.ndarray]:
    meta = json.loads((project / "data/prepared/test/classes.json").read_text())
    folder = project / "data/prepared/test"
    labels = {k: np.load(folder / f"{part}_labels.npy") for k, part in
              (("q", "sketches"), ("s", "seen_sketches"), ("g", "images"))}
    return labels, np.array([meta["classes"].index(c) for c in meta["unseen"]])


def test_features(folder: Path, edges: bool) -> tuple[dict, dict]:
    """A features folder's test features: (as evaluate's baselines read them: q, s, g and the photos' edge maps'
    own ge; as the model reads them: q, s and g, photos with their edge maps when `edges`)."""
    raw = {k: np.load(folder / f"test_{k}.npy") for k in ("q", "s", "g")}
    read = folder / "test_ge.npy"  # the gallery photos read with their edge maps (the mean of the two features)
    photo_edges = np.load(read) if read.exists() else raw["g"]
    return {**raw, "ge": 2 * photo_edges - raw["g"]}, ({**raw, "g": photo_edges} if edges else dict(raw))


def normalised(norms: dict, inputs: dict) -> dict:
    return {k: norms["image" if k == "g" else "sketch"](torch.from_numpy(v)) for k, v in inputs.items()}


def run_variant(project: Path, out: Path, name: str, seed: int, skips: tuple[float, ...] = SKIPS) -> dict:
    """Train one variant with one seed (on a tuned kind, on blocks tuned with that seed); score it at every
    `skips` value (the embedding's share of input features, model.Config.embed_skip, an inference-time choice) on
    the validation classes and the test shard. With skips (1.0,) alone the generators are not trained, as the
    train stage does not train them for a model that serves skip 1."""
    fields, overrides, shuffle, kind = VARIANTS[name]
    overrides = {**overrides, "embed_skip": 1.0} if skips == (1.0,) else overrides
    folder, edges = features_dir(out, kind, seed), FEATURES[kind]["photo_edges"]
    base = train.read_settings(params.load(project / "params.yaml"))
    run = dataclasses.replace(base, **{"feature_whiten": 0.0, **fields}, seed=seed, threads=1, device="cpu")
    run = dataclasses.replace(run, config={**train.PRESETS[run.preset], **overrides})
    data = train.load_training_data(folder, project / "data/prepared/train", run)
    if shuffle:
        data = train.shuffle_semantics(data, seed)
    started = time.time()
    trainer = train.Trainer(data, run)
    model = trainer.fit().eval()
    train.fit_seen_posterior(model, data)
    seconds = round(time.time() - started, 1)
    untuned = features_dir(out, UNTUNED.get(kind, kind))
    raw, untuned_inputs = test_features(untuned, edges)
    inputs = test_features(folder, edges)[1]
    labels, unseen = test_labels(project)
    normed = normalised(data["norms"], inputs)
    model_input = normalised(train.load_training_data(untuned, project / "data/prepared/train", run)["norms"],
                             untuned_inputs) if untuned != folder else normed
    scores = {}
    for skip in skips:
        model.cfg.embed_skip = skip
        with torch.no_grad():
            emb = {k: (model.embed_image(v) if k == "g" else model.embed_sketch(v)).numpy()
                   for k, v in normed.items()}
        posterior, model.posterior = model.posterior, None  # `val` without it: the posterior knows those classes
        val = train.validation_map(model.embed_sketch, model.embed_image, data["val_sk"], data["val_sk_y"],
                                   data["val_im"], data["val_im_y"])
        model.posterior = posterior
        metrics = evaluate.evaluate_all(emb, raw, labels, unseen, seed, model.cfg.query_expansion,
                                        {k: v.numpy() for k, v in model_input.items()},
                                        model.cfg.gallery_expansion)[0]
        scores[str(skip)] = {"val": val, "val_fit_posterior": fit_posterior_val(model, data), "metrics": metrics}
    input_val = train.validation_map(torch.nn.Identity(), torch.nn.Identity(), data["val_sk"], data["val_sk_y"],
                                     data["val_im"], data["val_im_y"])  # the model's input, untrained
    return {"epochs": trainer.state["epoch"], "seconds": seconds, "input_val": input_val, "skips": scores}


def fit_posterior_val(model, data: dict) -> float | None:
    """Validation zero-shot mAP@all of the served vector with a posterior (and semantic part) fitted on the fit
    classes alone, so the validation classes stay unseen: how posterior and semantic settings can be chosen on
    validation. None without a posterior."""
    if model.posterior is None:
        return None
    n_fit = len(data["fit_classes"])
    feats = torch.from_numpy(np.concatenate([data["fit_sk"], data["fit_im"]]))
    labels = torch.from_numpy(np.concatenate([data["fit_sk_y"], data["fit_im_y"]])).long()
    head = model_mod.fit_posterior(feats, labels, n_fit)
    class_sem = torch.from_numpy(np.asarray(data["class_sem"][:n_fit], dtype=np.float32))
    if model.cfg.semantic_weight > 0:
        head.semantics = class_sem
    if model.cfg.projection_weight > 0:
        head.projection = model_mod.fit_projection(feats, class_sem[labels])
    served, model.posterior = model.posterior, head
    val = train.validation_map(model.embed_sketch, model.embed_image, data["val_sk"], data["val_sk_y"],
                               data["val_im"], data["val_im_y"])
    model.posterior = served
    return val


def validation_baselines(out: Path, project: Path) -> dict:
    """The no-training features' zero-shot mAP@all on the validation classes (what `val` is for a trained
    variant): (FEATURES key, evaluate's baseline name) -> mAP, for each kind of features cached."""
    base = train.read_settings(params.load(project / "params.yaml"))
    found = {}
    for kind in FEATURES:
        if not (features_dir(out, kind) / "extractors.pt").exists():
            continue
        centred = "pretrained_centred_edges" if FEATURES[kind]["photo_edges"] else "pretrained_centred"
        grid = WHITEN_GRID if kind in ("lines", DEFAULT_KIND) else (0.25,) if kind in UNTUNED else ()
        whitened = [(f"{centred}, whitened {a}", "centre", a) for a in grid]
        for name, norm, whiten in [("pretrained", "none", 0.0), (centred, "centre", 0.0)] + whitened:
            run = dataclasses.replace(base, feature_norm=norm, feature_dim=0, feature_whiten=whiten)
            data = train.load_training_data(features_dir(out, kind), project / "data/prepared/train", run)
            found[kind, name] = train.validation_map(torch.nn.Identity(), torch.nn.Identity(), data["val_sk"],
                                                     data["val_sk_y"], data["val_im"], data["val_im_y"])
    return found


def posterior_grid(out: Path, project: Path) -> str:
    """Choose posterior_weight, posterior_temperature, then query_expansion, then gallery_expansion on validation
    classes: the input features of the training side as the default model reads them (DEFAULT_KIND, centred and
    whitened), each followed by sqrt(w) x a seen-class posterior fitted to the fit classes minus every fifth
    fit-class sketch. Those held-out sketches are the seen queries, the validation classes' sketches the unseen ones,
    every training photo the gallery (validation-side zero-shot, generalised, seen mAP@all and H, as evaluate
    defines them). The rule: the (w, T) with the highest H among those that keep zero-shot where it is without the
    posterior, then the query expansion k with the highest H at them, then the gallery expansion k (each training
    photo averaged with its k nearest training photos, retrieval.expand_gallery) with the highest H at those."""
    run = dataclasses.replace(train.read_settings(params.load(project / "params.yaml")), **WHITENED)
    d = train.load_training_data(features_dir(out, DEFAULT_KIND), project / "data/prepared/train", run)
    held = np.arange(len(d["fit_sk"])) % 5 == 0
    n_fit = len(d["fit_classes"])
    head = model_mod.fit_posterior(torch.from_numpy(np.concatenate([d["fit_sk"][~held], d["fit_im"]])),
                                   torch.from_numpy(np.concatenate([d["fit_sk_y"][~held], d["fit_im_y"]])).long(),
                                   n_fit)
    unit = {k: torch.nn.functional.normalize(torch.from_numpy(v), dim=1) for k, v in
            (("q", d["val_sk"]), ("s", d["fit_sk"][held]), ("g", np.concatenate([d["fit_im"], d["val_im"]])))}
    y = {"q": d["val_sk_y"] + n_fit, "s": d["fit_sk_y"][held],
         "g": np.concatenate([d["fit_im_y"], d["val_im_y"] + n_fit])}
    scored = {}
    def score(weight: float, temp: float, expand: int, gallery: int = 0) -> tuple[float, ...]:
        with torch.no_grad():
            e = {k: torch.cat([v, weight ** 0.5 * head(v, temp)], 1).numpy() for k, v in unit.items()}
        if gallery:
            e["g"] = retrieval.expand_gallery(e["g"], retrieval.gallery_neighbours(e["g"], gallery))
        scored[weight, temp, expand, gallery] = validation_figures(e, y, n_fit, expand)
        return scored[weight, temp, expand, gallery]
    floor = score(0.0, 1.0, 0)[0]  # zero-shot without the posterior: the release gate checks zero-shot too
    kept = [(w, t) for t in TEMPERATURES for w in WEIGHTS if score(w, t, 0)[0] >= floor]
    weight, temp = max(kept, key=lambda wt: scored[(*wt, 0, 0)][4], default=(0.0, 1.0))
    for k in EXPANSIONS:
        score(0.0, 1.0, k)  # printed beside, for what expansion alone does
    expand = max(EXPANSIONS, key=lambda k: score(weight, temp, k)[4])
    gallery = max((0, *GALLERY_EXPANSIONS), key=lambda k: score(weight, temp, expand, k)[4])
    rows = ["| weight | temperature | expansion | gallery expansion | val zero-shot | val generalised "
            "| val generalised P@10 | val seen | val H |", "|---|---|---|---|---|---|---|---|---|"]
    rows += [f"| {w} | {t} | {k} | {g} | " + " | ".join(f"{v:.3f}" for v in figs) + " |" for (w, t, k, g), figs in
             scored.items()]
    return "\n".join(rows) + (f"\nchosen: posterior_weight {weight}, posterior_temperature {temp} (the highest H "
                              f"keeping zero-shot >= {floor:.3f}), query_expansion {expand}, gallery_expansion "
                              f"{gallery} (each then the highest H)")


def validation_figures(e: dict, y: dict, n_fit: int, expand: int) -> tuple[float, ...]:
    """Validation-side zero-shot, generalised mAP@all and P@10, seen mAP@all, H (posterior_grid's protocol)."""
    novel = y["g"] >= n_fit
    zs = retrieval.average_precisions(retrieval.expanded_distances(e["q"], e["g"][novel], expand), y["q"],
                                      y["g"][novel])
    gen_d = retrieval.expanded_distances(e["q"], e["g"], expand)
    gen = float(np.mean(retrieval.average_precisions(gen_d, y["q"], y["g"])))
    p10 = float(np.mean(retrieval.precision_at(gen_d, y["q"], y["g"], 10)))
    seen = float(np.mean(retrieval.average_precisions(retrieval.expanded_distances(e["s"], e["g"], expand),
                                                      y["s"], y["g"])))
    return float(np.mean(zs)), gen, p10, seen, evaluate.harmonic(gen, seen)


def figures(metrics: dict, method: str) -> dict:
    zs, gen, seen = metrics["zero_shot"][method], metrics["generalised"][method], metrics["seen_generalised"][method]
    return {"zs_map": zs["map_all"], "zs_p10": zs["p_at_10"], "gen_map": gen["map_all"], "gen_p10": gen["p_at_10"],
            "seen_map": seen["map_all"], "H": metrics["harmonic"][method],
            "hit": metrics["diagnostics"]["unseen_centroid_hit_rate"][method]}


def model_input_val(kind: str, fields: dict, val_baselines: dict, run: dict) -> float:
    """The model-input baseline's validation mAP: the untuned features' (--features-grid's figure) for a tuned
    kind, whose runs measured the tuned ones; otherwise the run's own."""
    if kind not in UNTUNED:
        return run["input_val"]
    centred = "pretrained_centred_edges" if FEATURES[kind]["photo_edges"] else "pretrained_centred"
    whiten = fields.get("feature_whiten", 0.0)
    return val_baselines.get((UNTUNED[kind], f"{centred}, whitened {whiten}" if whiten else centred), float("nan"))


def model_input_row(name: str, per_seed: dict, shown: set, val_baselines: dict) -> list[str]:
    """evaluate's pretrained_model_input baseline of a variant (the untuned features through its own input
    normalisation, no training), once per kind of features, normalisation and expansion."""
    fields, overrides, _, kind = VARIANTS[name]
    key = (kind, expansions(overrides), fields["feature_norm"], fields.get("feature_dim"),
           fields.get("feature_whiten", 0.0))
    run = next(iter(per_seed.values()))
    if key in shown or "input_val" not in run:
        return []
    shown.add(key)
    f = {"val": model_input_val(kind, fields, val_baselines, run),
         **figures(run["skips"][next(iter(run["skips"]))]["metrics"], "pretrained_model_input")}
    return [f"| no training ({name}: its input normalisation, {key[1]}): pretrained_model_input | "
            + " | ".join(f"{f[c]:.3f}" for c in COLUMNS) + " |"]


def expansions(overrides: dict) -> str:
    """How a variant's model (and so evaluate, for its baselines too) expands queries and the gallery."""
    return (f"expansion {overrides.get('query_expansion', 0)}"
            + (f", gallery expansion {overrides['gallery_expansion']}" if overrides.get("gallery_expansion") else ""))


def table(results: dict, val_baselines: dict) -> str:
    """Each kind of features' no-training baselines (from the first run that read them: evaluate scores the
    baselines on the run's own test features, expanded as that run's model expands), then every variant."""
    rows = ["| variant | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    shown = set()
    for name, per_seed in results.items():
        rows += model_input_row(name, per_seed, shown, val_baselines)
        kind, expand = VARIANTS[name][3], expansions(VARIANTS[name][1])
        if (kind, expand) in shown:
            continue
        shown.add((kind, expand))
        scored = next(iter(per_seed.values()))["skips"]
        metrics = scored[next(iter(scored))]["metrics"]  # the baselines' figures are the same at every skip
        for method in ("pretrained", "pretrained_centred", "pretrained_centred_edges"):
            read = UNTUNED.get(kind, kind)  # a tuned kind's baselines read the untuned backbone
            if (read, method) in val_baselines:
                f = {"val": val_baselines[read, method], **figures(metrics, method)}
                rows.append(f"| no training ({read} features, {expand}): {method} | "
                            + " | ".join(f"{f[c]:.3f}" for c in COLUMNS) + " |")
    for name, per_seed in results.items():
        for skip in [float(s) for s in next(iter(per_seed.values()))["skips"]]:
            vals = [{"val": r["skips"][str(skip)]["val"], **figures(r["skips"][str(skip)]["metrics"], "sem_pcyc")}
                    for r in per_seed.values()]
            cells = [f"{np.mean([v[c] for v in vals]):.3f} ± {np.std([v[c] for v in vals]):.3f}" for c in COLUMNS]
            rows.append(f"| {name}, skip {skip} ({len(vals)} seeds) | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def save_results(results_file: Path, results: dict) -> dict:
    """Write `results` merged into what the file holds now (another run with other seeds or variants may have
    written since this one read it; this run's entries win); the merged results."""
    merged = json.loads(results_file.read_text()) if results_file.exists() else {}
    for name, per_seed in results.items():
        merged.setdefault(name, {}).update(per_seed)
    tmp = results_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(merged, indent=1))
    tmp.replace(results_file)
    return merged


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, default=REPO, help="folder with params.yaml and data/prepared/")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--only", default="", help="variant names separated by ; (default: all)")
    parser.add_argument("--skips", default=",".join(map(str, SKIPS)),
                        help="embed_skip values to score (1 alone: the generators are not trained, as for the "
                             "default; default: %(default)s)")
    parser.add_argument("--budget-min", type=float, default=60, help="start no new run after this many minutes")
    parser.add_argument("--jobs", type=int, default=1, help="processes that tune and embed a tuned kind's seeds at "
                        "once, one torch thread each (at most one a free core)")
    parser.add_argument("--features-grid", action="store_true",
                        help="only the validation zero-shot mAP@all of each way of reading the data (FEATURES), "
                             "with no training: how the default's input features were chosen")
    parser.add_argument("--posterior-grid", action="store_true",
                        help="only choose the seen-class posterior's weight and temperature, then the query "
                             "expansion, then the gallery expansion, on validation classes")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    out = OUT / dataset_key(args.project)
    out.mkdir(parents=True, exist_ok=True)
    if args.features_grid:
        for kind in FEATURES:
            cache_features(args.project, out, kind, test=False)
        print("\n".join(f"| {kind} | {name} | {val:.3f} |" for (kind, name), val in
                        validation_baselines(out, args.project).items()))
        return
    if args.posterior_grid:
        cache_features(args.project, out, DEFAULT_KIND, test=False)
        print(posterior_grid(out, args.project))
        return
    names = [n.strip() for n in args.only.split(";") if n.strip()] or list(VARIANTS)
    kinds = {VARIANTS[n][3] for n in names}
    seeds = [int(s) for s in args.seeds.split(",")]
    cache_all(args.project, out, sorted(kinds | {UNTUNED[k] for k in kinds if k in UNTUNED}), seeds, args.jobs)
    # results are reused only for the same variant definitions, skips, training and scoring code
    code = b"".join((REPO / "src/sempcyc" / f).read_bytes() for f in ("runtime/model.py", "stages/train.py",
                                                                      "stages/evaluate.py", "runtime/retrieval.py"))
    skips = tuple(float(s) for s in args.skips.split(","))
    digest = hashlib.sha256(repr((VARIANTS, skips, RESULTS_VERSION)).encode() + code).hexdigest()[:12]
    results_file = out / f"results-{digest}.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    started = time.time()
    for seed in seeds:
        for name in names:
            if str(seed) in results.get(name, {}) or time.time() - started > args.budget_min * 60:
                continue
            print(f"quality: {name}, seed {seed}", flush=True)
            results.setdefault(name, {})[str(seed)] = run_variant(args.project, out, name, seed, skips)
            results = save_results(results_file, results)
    print(table({n: results[n] for n in names if n in results}, validation_baselines(out, args.project)))


if __name__ == "__main__":
    main()
