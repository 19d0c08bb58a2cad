"""Quality ablation of SEM-PCYC on the demo data: which knobs make the trained model beat matching features directly.

Every trained row is `train.Trainer` on cached extractor features with the default train settings
(`train.read_settings` on params.yaml) and exactly one knob changed; it is scored on the unseen test classes with
`evaluate.score_method`:
  zero-shot    unseen sketches against the images of unseen classes;
  generalised  unseen sketches against every gallery image (all 100 classes).

Feature sets:
  ft2  the features stage's output in models/features (extractors fine-tuned 2 epochs; 512-d), read only and copied
       once to bench/out/features-ft2/ (the workspace may rerun the features stage meanwhile; --refresh-features);
  e0   ImageNet EfficientNet-Lite0 as it is (features.epochs 0; 1280-d), computed here with the features-stage code
       into bench/out/features-e0/ (never into models/).
Test-set extractor features are computed once per set and cached in bench/out/features-*/test_*.npy.

The default row is trained without early stopping and scored at every epoch, so the early-stopping rows
("patience 5, best val epoch" = the default, "last epoch", "best val epoch of all") come from one run per seed:
the training steps do not depend on patience, only where training stops does.

Each training run is cached in bench/out/runs/ under a fingerprint of its settings and features: rerunning resumes,
`--budget-min` stops starting new runs (seed-major order: every row with the first seed first), `--no-train` only
assembles the table, `--params FILE` pins the default row to another params file. A row whose settings equal the
default's (e.g. "dim_out 64" when params says 64) is not trained twice. Torch runs 1 thread by default: on 2 cores
shared with other jobs, 2 threads made the small SEM-PCYC step 10-100x slower.

Writes bench/out/ablation.json (per-seed and mean figures) and prints a Markdown table.
Run from anywhere:  python bench/ablation.py [--quick] [--seeds 0,1] [--only KEY,...] [--params FILE]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import tqdm as _tqdm  # noqa: E402


class _QuietTqdm(_tqdm.tqdm):
    """The stages' progress bars, always disabled (train.py passes disable= explicitly, so TQDM_DISABLE would not
    reach them); this script prints its own progress. A subclass, not a function: libraries imported with the
    stages (dvc, via dvclive) call tqdm's class methods."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "disable": True})


_tqdm.tqdm = _QuietTqdm

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from sempcyc import evaluate, features, train  # noqa: E402
from sempcyc import params as params_mod  # noqa: E402
from sempcyc.features import FeaturesSettings  # noqa: E402
from sempcyc.recipe import PRESETS, ModelSettings  # noqa: E402
from sempcyc.runtime.backbones import Extractor, batched, to_input  # noqa: E402
from sempcyc.runtime.encoder import FeatureNorm  # noqa: E402
from sempcyc.runtime.model import Config, SemPcyc  # noqa: E402
from sempcyc.runtime.retrieval import retrieval_metrics  # noqa: E402
from sempcyc.shards import load_test_shard, load_train_shard  # noqa: E402
from sempcyc.split import SplitSettings  # noqa: E402

OUT = ROOT / "bench" / "out"
TRAIN_DIR = ROOT / "data" / "prepared" / "train"
TEST_DIR = ROOT / "data" / "prepared" / "test"
PARAMS = ROOT / "params.yaml"
PIPELINE_FEATURES = ROOT / "models" / "features"  # the features stage's output, read only (snapshotted, see below)
FEATURE_SETS = {"ft2": OUT / "features-ft2", "e0": OUT / "features-e0"}
FEATURE_FILES = ("extractors.pt", "meta.json", "train_sketches.npy", "train_images.npy")


# ------------------------------------------------------------------------------------------------ rows

def rows(base: train.TrainRun | None = None) -> list[dict]:
    """One dict per trained configuration: `feats` (feature set), `s` (top-level train settings changed),
    `config` (loss Config fields changed, on top of the preset), `preset`, `half` (half of the fit classes)."""
    tuned_off = {"train_classifiers": False}
    lam = lambda v: {"lambda_se": v, "lambda_im": v, "lambda_sk": v}  # noqa: E731
    return [
        {"name": "default" if base is None else
         f"default (params: preset {base.preset}, {base.feature_norm}, D={base.dim_out}, {base.epochs} "
         f"epochs, ft2, early stop)", "group": "default", "key": "default"},
        {"name": "extractor: ImageNet as is (features.epochs 0)", "group": "extractor", "key": "e0", "feats": "e0"},
        {"name": "preset original (λ=10, classifiers frozen)", "group": "loss", "key": "original",
         "preset": "original"},
        {"name": "λ=10, classifiers trained", "group": "loss", "key": "lam10_trained", "config": lam(10.0)},
        {"name": "λ=1, classifiers frozen", "group": "loss", "key": "lam1_frozen", "config": tuned_off},
        {"name": "λ=3, classifiers trained", "group": "loss", "key": "lam3_trained", "config": lam(3.0)},
        {"name": "feature_norm none", "group": "norm", "key": "norm_none", "s": {"feature_norm": "none"}},
        {"name": "feature_norm l2", "group": "norm", "key": "norm_l2", "s": {"feature_norm": "l2"}},
        {"name": "dim_out 32", "group": "dim", "key": "dim32", "s": {"dim_out": 32}},
        {"name": "dim_out 64", "group": "dim", "key": "dim64", "s": {"dim_out": 64}},
        {"name": "dim_out 128", "group": "dim", "key": "dim128", "s": {"dim_out": 128}},
        {"name": "half of the fit classes", "group": "classes", "key": "half", "half": True},
        {"name": "train.epochs 40", "group": "schedule",
         "key": "epochs40", "s": {"epochs": 40}},
        {"name": "original setup: preset original, ImageNet features, norm none", "group": "original", "key":
         "all_original", "preset": "original", "feats": "e0", "s": {"feature_norm": "none"}},
    ]


DERIVED = [  # rows read off the default run (trained with no early stopping, scored every epoch)
    {"name": "no early stop: last epoch", "group": "early stop", "key": "last", "pick": "last"},
    {"name": "no early stop: best val epoch of all", "group": "early stop", "key": "best_all", "pick": "best_all"},
]


def settings_for(row: dict, base: train.TrainRun, seed: int, quick: bool) -> train.TrainRun:
    """The default settings with the row's changes: a row's preset replaces the loss configuration (params'
    model.overrides included) by that preset's, then the row's `config` and `s` fields go on top."""
    preset = row.get("preset", base.preset)
    config = {**(PRESETS[preset] if "preset" in row else base.config), **row.get("config", {})}
    s = replace(base, preset=preset, config=config, seed=seed, **row.get("s", {}))
    if quick:
        s = replace(s, epochs=3, iters_per_epoch=10, patience=2)
    return s


# ------------------------------------------------------------------------------------------------ features

def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def snapshot_ft2(refresh: bool) -> None:
    """Copy models/features (the fine-tuned set) into bench/out/features-ft2 once: the pipeline's workspace may
    rerun the features stage (which deletes and rewrites models/features) while this script runs."""
    dst = FEATURE_SETS["ft2"]
    if not refresh and all((dst / f).exists() for f in FEATURE_FILES):
        return
    missing = [f for f in FEATURE_FILES if not (PIPELINE_FEATURES / f).exists()]
    if missing:
        raise SystemExit(f"{PIPELINE_FEATURES}: {', '.join(missing)} missing (features stage not run, or running "
                         "now); run `dvc repro features` there first, or wait")
    dst.mkdir(parents=True, exist_ok=True)
    for f in FEATURE_FILES:
        shutil.copy2(PIPELINE_FEATURES / f, dst / f)
    print(f"features ft2: snapshot of {PIPELINE_FEATURES} -> {dst}", flush=True)


def ensure_e0_features(params_path: Path) -> None:
    """The features stage's code with features.epochs 0, on the CPU, into bench/out/features-e0 (skipped when
    already there)."""
    out = FEATURE_SETS["e0"]
    if (out / "extractors.pt").exists() and (out / "train_sketches.npy").exists():
        return
    model, feat, split = params_mod.read(params_path, ModelSettings, FeaturesSettings, SplitSettings)
    print("features e0: ImageNet features of the training shard (features stage, epochs 0) ...", flush=True)
    t = time.time()
    features.compute_features(load_train_shard(TRAIN_DIR), out, model, replace(feat, epochs=0), split, "cpu")
    print(f"features e0: done in {time.time() - t:.0f} s", flush=True)


def test_features(name: str, shard: dict) -> dict:
    """Extractor features of the test sketches and images for feature set `name`, cached as .npy."""
    src = FEATURE_SETS[name]
    cache = OUT / f"features-{name}"
    cache.mkdir(parents=True, exist_ok=True)
    stamp = {"extractors_sha256": file_digest(src / "extractors.pt"),
             "test_labels_sha256": hashlib.sha256(shard["sketches_labels"].tobytes()
                                                  + shard["images_labels"].tobytes()).hexdigest()}
    stamp_file = cache / "test_features.json"
    files = {"q": cache / "test_sketches.npy", "g": cache / "test_images.npy"}
    if stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp and all(f.exists() for f in files.values()):
        return {k: np.load(f) for k, f in files.items()}
    bundle = torch.load(src / "extractors.pt", map_location="cpu", weights_only=True)
    meta = bundle["meta"]
    out = {}
    t = time.time()
    for key, domain, arrays, invert in (("q", "sketch", shard["sketches"], meta["invert_sketch"]),
                                        ("g", "image", shard["images"], False)):
        ex = Extractor(meta["backbone"], meta["feature_proj_dim"], pretrained=False)
        ex.load_state_dict(bundle[f"{domain}_extractor"])
        ex.eval()
        out[key] = batched(lambda x, e=ex, inv=invert: e(to_input(x, inv)), arrays, 64)
        np.save(files[key], out[key])
    stamp_file.write_text(json.dumps(stamp))
    print(f"test features {name}: {out['q'].shape[0]} sketches + {out['g'].shape[0]} images, "
          f"{out['q'].shape[1]}-d, in {time.time() - t:.0f} s", flush=True)
    return out


# ------------------------------------------------------------------------------------------------ scoring

class TestSet:
    def __init__(self, shard: dict):
        meta = shard["meta"]
        classes = meta["classes"]
        self.q_labels = shard["sketches_labels"]
        self.g_labels = shard["images_labels"]
        self.unseen = np.array([classes.index(c) for c in meta["unseen"]])
        self.zs = np.isin(self.g_labels, self.unseen)

    def score(self, q: np.ndarray, g: np.ndarray) -> dict:
        zs, _ = evaluate.score_method(q, g[self.zs], self.q_labels, self.g_labels[self.zs])
        gen, _ = evaluate.score_method(q, g, self.q_labels, self.g_labels)
        return {"zs_map": zs["map_all"], "zs_p10": zs["p_at_10"], "zs_p100": zs["p_at_100"],
                "gen_map": gen["map_all"], "gen_p10": gen["p_at_10"]}

    def score_random(self, seed: int) -> dict:
        zs = retrieval_metrics(evaluate.random_distances(len(self.q_labels), int(self.zs.sum()), seed),
                               self.q_labels, self.g_labels[self.zs], evaluate.KS)
        gen = retrieval_metrics(evaluate.random_distances(len(self.q_labels), len(self.g_labels), seed),
                                self.q_labels, self.g_labels, evaluate.KS)
        return {"zs_map": zs["map_all"], "zs_p10": zs["p_at_10"], "zs_p100": zs["p_at_100"],
                "gen_map": gen["map_all"], "gen_p10": gen["p_at_10"]}


def embed(model, norms: dict, feats: dict) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    with torch.inference_mode():
        q = model.embed_sketch(norms["sketch"](torch.from_numpy(feats["q"]))).numpy()
        g = model.embed_image(norms["image"](torch.from_numpy(feats["g"]))).numpy()
    return q, g


# ------------------------------------------------------------------------------------------------ training data

def half_classes(features_dir: Path, s: train.TrainRun) -> dict:
    """The training data of every other fit class (sorted names), feature norm refitted on those classes only;
    validation classes unchanged."""
    data = train.load_training_data(features_dir, TRAIN_DIR, replace(s, feature_norm="none"))
    keep_old = np.arange(0, len(data["fit_classes"]), 2)
    remap = {int(old): new for new, old in enumerate(keep_old)}
    sk_m, im_m = np.isin(data["fit_sk_y"], keep_old), np.isin(data["fit_im_y"], keep_old)
    dim = data["fit_sk"].shape[1]
    norms = {"sketch": FeatureNorm(s.feature_norm, dim).fit(data["fit_sk"][sk_m]),
             "image": FeatureNorm(s.feature_norm, dim).fit(data["fit_im"][im_m])}

    def apply(kind: str, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return norms[kind](torch.from_numpy(x)).numpy()

    return {**data, "norms": norms, "fit_classes": [data["fit_classes"][i] for i in keep_old],
            "fit_sk": apply("sketch", data["fit_sk"][sk_m]),
            "fit_sk_y": np.array([remap[int(y)] for y in data["fit_sk_y"][sk_m]]),
            "fit_im": apply("image", data["fit_im"][im_m]),
            "fit_im_y": np.array([remap[int(y)] for y in data["fit_im_y"][im_m]]),
            "val_sk": apply("sketch", data["val_sk"]), "val_im": apply("image", data["val_im"]),
            "fit_sem": data["fit_sem"][keep_old]}


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_fingerprint(row: dict, s: train.TrainRun, features_digest: str) -> str:
    """Identity of one training run: its full settings, feature set, class subset and row kind (not its label)."""
    what = {"s": asdict(s), "key": row["key"], "feats": row.get("feats", "ft2"), "half": bool(row.get("half")),
            "features": features_digest}
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:12]


def early_stop_choice(history: list[dict], patience: int) -> tuple[int, int]:
    """(best epoch, stop epoch) that Trainer.fit would reach with `patience`, from a run's val mAP history."""
    best_map, best_epoch, bad = -1.0, 0, 0
    for h in history:
        if h["val_map"] > best_map:
            best_map, best_epoch, bad = h["val_map"], h["epoch"], 0
        else:
            bad += 1
        if bad >= patience:
            return best_epoch, h["epoch"]
    return best_epoch, history[-1]["epoch"]


def train_row(row: dict, s: train.TrainRun, feats: dict, test: TestSet) -> dict[str, dict]:
    """Train one configuration; returns {row key: figures} (several keys for the default row)."""
    features_dir = FEATURE_SETS[row.get("feats", "ft2")]
    data = half_classes(features_dir, s) if row.get("half") else train.load_training_data(features_dir, TRAIN_DIR, s)
    seed_all(s.seed)
    per_epoch = row["key"] == "default"
    patience = s.patience
    run_s = replace(s, patience=s.epochs + 1) if per_epoch else s
    trainer = train.Trainer(data, run_s)
    epoch_scores, epoch_times = {}, {}
    started = time.time()

    def on_epoch(tr, totals, val_map, improved):
        epoch = tr.state["epoch"]
        epoch_times[epoch] = time.time() - started
        msg = f"    epoch {epoch:2d}  val mAP {val_map:.4f}{' *' if improved else '  '}  gen {totals['gen']:.3f}"
        if per_epoch:
            epoch_scores[epoch] = test.score(*embed(tr.model, data["norms"], feats))
            msg += f"  test zs mAP {epoch_scores[epoch]['zs_map']:.4f}"
        print(msg, flush=True)

    model = trainer.fit(on_epoch)
    seconds = time.time() - started
    hist = trainer.state["history"]
    if not per_epoch:
        res = test.score(*embed(model, data["norms"], feats))
        return {row["key"]: {**res, "best_epoch": trainer.state["best_epoch"], "epochs_run": trainer.state["epoch"],
                             "train_s": seconds, "best_val_map": trainer.state["best_map"]}}
    best_p, stop_p = early_stop_choice(hist, patience)
    best_all = trainer.state["best_epoch"]
    last = hist[-1]["epoch"]
    val = {h["epoch"]: h["val_map"] for h in hist}
    return {
        "default": {**epoch_scores[best_p], "best_epoch": best_p, "epochs_run": stop_p,
                    "train_s": epoch_times[stop_p], "best_val_map": val[best_p]},
        "last": {**epoch_scores[last], "best_epoch": last, "epochs_run": last, "train_s": seconds,
                 "best_val_map": val[last]},
        "best_all": {**epoch_scores[best_all], "best_epoch": best_all, "epochs_run": last, "train_s": seconds,
                     "best_val_map": val[best_all]},
        "_curve": [{"epoch": e, "val_map": val[e], **{k: epoch_scores[e][k] for k in ("zs_map", "gen_map")}}
                   for e in sorted(epoch_scores)],
    }


def load_pipeline_model(bundle: dict) -> tuple[SemPcyc, dict]:
    """The SEM-PCYC generators and feature norms held by a models/sem_pcyc.pt bundle."""
    model = SemPcyc(Config(**bundle["config"]))
    model.gen_sk2se.load_state_dict(bundle["gen_sk2se"])
    model.gen_im2se.load_state_dict(bundle["gen_im2se"])
    dim = bundle["config"]["feat_dim"]
    kind = bundle["meta"].get("feature_norm", "none")
    norms = {"sketch": FeatureNorm(kind, dim), "image": FeatureNorm(kind, dim)}
    norms["sketch"].load_state_dict(bundle["sketch_norm"])
    norms["image"].load_state_dict(bundle["image_norm"])
    return model, norms


def pipeline_check(feats: dict, test: TestSet, report: Report) -> None:
    """Score models/sem_pcyc.pt on the cached ft2 test features (only if it was trained on the snapshot's
    extractors) and set it beside reports/eval/metrics.json: checks this script's scoring path."""
    bundle_path = ROOT / "models" / "sem_pcyc.pt"
    if not bundle_path.exists():
        print("check: models/sem_pcyc.pt missing; skipped", flush=True)
        return
    bundle = torch.load(bundle_path, map_location="cpu", weights_only=True)
    ours = torch.load(FEATURE_SETS["ft2"] / "extractors.pt", map_location="cpu", weights_only=True)
    same = all(torch.equal(bundle[k][n], ours[k][n]) for k in ("sketch_extractor", "image_extractor")
               for n in ours[k])
    if not same:
        print("check: models/sem_pcyc.pt was trained on other extractors than the ft2 snapshot; skipped", flush=True)
        return
    res = test.score(*embed(*load_pipeline_model(bundle), feats))
    check = {}
    metrics_path = ROOT / "reports" / "eval" / "metrics.json"
    if metrics_path.exists():
        m = json.loads(metrics_path.read_text())
        check = {"reports_eval_zs_map": m["zero_shot"]["sem_pcyc"]["map_all"],
                 "reports_eval_gen_map": m["generalised"]["sem_pcyc"]["map_all"],
                 "reports_eval_pretrained_zs_map": m["zero_shot"]["pretrained"]["map_all"],
                 "reports_eval_mtime": time.ctime(metrics_path.stat().st_mtime),
                 "model_mtime": time.ctime(bundle_path.stat().st_mtime)}
        pre = report.row("pretrained")["mean"]["zs_map"]
        print(f"check: models/sem_pcyc.pt via this script: zs mAP {res['zs_map']:.4f} gen {res['gen_map']:.4f} "
              f"(reports/eval: {check['reports_eval_zs_map']:.4f} / {check['reports_eval_gen_map']:.4f}); "
              f"pretrained zs {pre:.4f} (reports/eval {check['reports_eval_pretrained_zs_map']:.4f})", flush=True)
    report.add("baseline", "pipeline model models/sem_pcyc.pt (check against reports/eval)", "pipeline_model",
               [{**res, "best_epoch": bundle["meta"].get("best_epoch")}], check=check)


# ------------------------------------------------------------------------------------------------ report

METRICS = ("zs_map", "zs_p10", "zs_p100", "gen_map", "best_epoch", "train_s")


def summarise(per_seed: list[dict]) -> dict:
    out = {}
    for k in METRICS + ("gen_p10", "best_val_map", "epochs_run"):
        vals = [r[k] for r in per_seed if r.get(k) is not None]
        out[k] = float(np.mean(vals)) if vals else None
    out["zs_map_seeds"] = [round(r["zs_map"], 4) for r in per_seed]
    return out


def paired_delta(row: dict, default: dict | None, metric: str = "zs_map") -> float | None:
    """Row minus default, averaged over the training seeds both have (paired: same seed, same batches drawn);
    rows without seeds (deterministic baselines) against the default's mean."""
    if default is None:
        return None
    d_by_seed = dict(zip(default["seeds"], default["per_seed"]))
    if "seeds" not in row:
        return row["mean"][metric] - default["mean"][metric]
    common = [(r[metric], d_by_seed[sd][metric]) for sd, r in zip(row["seeds"], row["per_seed"]) if sd in d_by_seed]
    return float(np.mean([x - y for x, y in common])) if common else None


def markdown(results: list[dict], default: dict | None) -> str:
    head = ("| group | configuration | zero-shot mAP@all | P@10 | P@100 | generalised mAP@all | "
            "best epoch | train s | Δ zs mAP vs default (paired) | zs mAP per seed |")
    lines = [head, "|" + "---|" * 10]
    fmt = lambda v, p=3: "—" if v is None else f"{v:.{p}f}"  # noqa: E731
    for r in results:
        m = r["mean"]
        delta = paired_delta(r, default)
        seeds = ", ".join(f"{v:.3f}" for v in m["zs_map_seeds"])
        if "seeds" in r:
            seeds += f" (seed{'s' if len(r['seeds']) > 1 else ''} {','.join(map(str, r['seeds']))})"
        lines.append(f"| {r['group']} | {r['name']} | {fmt(m['zs_map'])} | {fmt(m['zs_p10'])} | "
                     f"{fmt(m['zs_p100'])} | {fmt(m['gen_map'])} | {fmt(m['best_epoch'], 1)} | "
                     f"{fmt(m['train_s'], 0)} | {'—' if delta is None else f'{delta:+.3f}'} | {seeds} |")
    return "\n".join(lines)


class Report:
    """bench/out/ablation.json as it grows: every added row rewrites the file, so an interrupted run keeps its
    rows."""

    def __init__(self, path: Path, data: dict):
        self.path, self.data = path, data
        self.rows: list[dict] = data["rows"]

    def save(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=1))

    def add(self, group: str, name: str, key: str, per_seed: list[dict], **extra) -> None:
        self.rows.append({"group": group, "name": name, "key": key, "per_seed": per_seed,
                          "mean": summarise(per_seed), **extra})
        self.save()

    def row(self, key: str) -> dict | None:
        return next((r for r in self.rows if r["key"] == key), None)


def headline(results: list[dict]) -> tuple[dict, dict] | None:
    """(summary figures, best trained row): the default against the best other trained row and against the
    no-training baselines; None without a default row or any other trained row."""
    keys = {r["key"]: r for r in results}
    default = keys.get("default")
    trained = [r for r in results if "seeds" in r and r["key"] != "default"]
    if default is None or not trained:
        return None
    complete = [r for r in trained if set(default["seeds"]) <= set(r["seeds"])]
    best = max(complete or trained, key=lambda r: paired_delta(r, default))
    direct = {k: keys[k]["mean"]["zs_map"] for k in ("pretrained", "ft2_direct", "ft2_direct_std") if k in keys}
    best_direct = max(direct.values()) if direct else None
    dmap = default["mean"]["zs_map"]
    summary = {"default_zs_map": dmap, "default_seeds": default["seeds"], "best_row": best["key"],
               "best_zs_map": best["mean"]["zs_map"], "best_minus_default_paired": paired_delta(best, default),
               "rows_missing_seeds": [r["key"] for r in trained if r not in complete],
               "best_direct_matching_zs_map": best_direct,
               "default_over_best_direct": None if not best_direct else dmap / best_direct,
               "default_over_random": dmap / keys["random"]["mean"]["zs_map"]}
    return summary, best


def print_results(report: Report) -> None:
    """The Markdown table, then the headline figures (also saved as the report's `summary`)."""
    print()
    print(markdown(report.rows, report.row("default")))
    print()
    found = headline(report.rows)
    if found is None:
        return
    summary, best = found
    report.data["summary"] = summary
    report.save()
    print(f"default zero-shot mAP@all {summary['default_zs_map']:.4f} (seeds {summary['default_seeds']}); best "
          f"trained row '{best['name']}' {best['mean']['zs_map']:.4f} ({summary['best_minus_default_paired']:+.4f} "
          "paired)" + (f"; rows not run with every seed: {', '.join(summary['rows_missing_seeds'])}"
                       if summary["rows_missing_seeds"] else ""))
    if summary["best_direct_matching_zs_map"]:
        print(f"default / best no-training baseline (direct matching) = {summary['default_over_best_direct']:.2f}x; "
              f"default / random = {summary['default_over_random']:.2f}x")


# ------------------------------------------------------------------------------------------------ main

@dataclass
class Plan:
    """What every training run of this invocation shares."""
    args: argparse.Namespace
    base: train.TrainRun
    seeds: list[int]
    feats: dict
    test: TestSet
    started: float


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Rows: " + ", ".join(r["key"] for r in rows() + DERIVED))
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 epochs x 10 iterations, one seed")
    ap.add_argument("--seeds", default="0,1", help="train.seed values, comma-separated; figures are their mean "
                    "(default: %(default)s)")
    ap.add_argument("--only", default="", help="comma-separated row keys to train (default: all)")
    ap.add_argument("--out", default=str(OUT / "ablation.json"), help="result file (default: %(default)s)")
    ap.add_argument("--params", default=str(PARAMS), help="params file whose train/model settings are the default "
                    "row (default: %(default)s)")
    ap.add_argument("--budget-min", type=float, default=0,
                    help="start no new training run after this many minutes (0 = no limit); rows keep the seeds "
                    "that finished")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default: %(default)s; on 2 shared cores 2 threads measured ~9x slower "
                    "than 1, the OpenMP workers waiting on each other)")
    ap.add_argument("--no-train", action="store_true", help="only assemble the table from cached runs")
    ap.add_argument("--no-cache", action="store_true", help="retrain even when bench/out/runs/ has the run")
    ap.add_argument("--refresh-features", action="store_true",
                    help="re-copy models/features into bench/out/features-ft2 (otherwise the first copy is kept)")
    return ap.parse_args(argv)


def default_settings(params_path: Path, seeds: list[int], quick: bool) -> train.TrainRun:
    """The train stage's settings from the params file, on the CPU; prints them and the ft2 snapshot's origin."""
    base = replace(train.read_settings(params_mod.load(params_path), str(params_path)), device="cpu")
    print(f"ablation: default train settings preset={base.preset} config={base.config} dim_out="
          f"{base.dim_out} norm={base.feature_norm} epochs={base.epochs}x{base.iters_per_epoch} "
          f"batch={base.batch_size} patience={base.patience}; seeds {seeds}" + (" [QUICK]" if quick else ""),
          flush=True)
    ft_meta = json.loads((FEATURE_SETS["ft2"] / "meta.json").read_text())
    print(f"ablation: ft2 = {FEATURE_SETS['ft2']} (copy of models/features; finetune_epochs "
          f"{ft_meta['finetune_epochs']}, {ft_meta['feat_dim']}-d)", flush=True)
    return base


def new_report(plan: Plan) -> Report:
    base, test = plan.base, plan.test
    return Report(Path(plan.args.out), {
        "params": str(Path(plan.args.params)),
        "settings": {k: getattr(base, k) for k in ("preset", "config", "dim_out", "feature_norm", "epochs",
                                                   "iters_per_epoch", "batch_size", "patience", "lr")},
        "seeds": plan.seeds, "quick": plan.args.quick, "rows": [],
        "counts": {"queries": int(len(test.q_labels)), "gallery_zero_shot": int(test.zs.sum()),
                   "gallery_generalised": int(len(test.g_labels)), "unseen_classes": int(len(test.unseen))}})


def add_baselines(report: Report, plan: Plan) -> None:
    """Rows with no SEM-PCYC training: random ranking, the extractor features matched directly, and the
    pipeline's own model scored through this script's path (should match reports/eval/metrics.json)."""
    test, feats = plan.test, plan.feats
    report.add("baseline", "random ranking", "random", [test.score_random(sd) for sd in plan.seeds])
    report.add("baseline", "ImageNet backbone features matched directly (= evaluate's 'pretrained')", "pretrained",
               [test.score(feats["e0"]["q"], feats["e0"]["g"])])
    report.add("baseline", "fine-tuned extractor features matched directly (ft2, raw)", "ft2_direct",
               [test.score(feats["ft2"]["q"], feats["ft2"]["g"])])
    data_ft = train.load_training_data(FEATURE_SETS["ft2"], TRAIN_DIR, plan.base)
    with torch.no_grad():
        q = data_ft["norms"]["sketch"](torch.from_numpy(feats["ft2"]["q"])).numpy()
        g = data_ft["norms"]["image"](torch.from_numpy(feats["ft2"]["g"])).numpy()
    report.add("baseline", "fine-tuned extractor features, standardized per domain, matched directly",
               "ft2_direct_std", [test.score(q, g)])
    pipeline_check(feats["ft2"], test, report)


def same_as_default(row: dict, s: train.TrainRun, plan: Plan, seed: int) -> bool:
    """Whether a row would train exactly the default row's run (e.g. "dim_out 64" when params says 64)."""
    return (s, row.get("feats", "ft2"), bool(row.get("half"))) == (
        settings_for({}, plan.base, seed, plan.args.quick), "ft2", False)


def run_or_load(plan: Plan, row: dict, s: train.TrainRun, label: str, cache: Path) -> tuple[dict | None, str]:
    """(figures, how they were got) of one run: from its cache file, or trained now and cached; (None, "") when
    --no-train or --budget-min leaves it out."""
    args = plan.args
    if cache.exists() and not args.no_cache:
        return json.loads(cache.read_text()), "cached"
    if args.no_train or (args.budget_min and time.time() - plan.started > 60 * args.budget_min):
        return None, ""
    print(f"{label} {row['name']} ... [{time.time() - plan.started:.0f} s elapsed]", flush=True)
    t = time.time()
    out = train_row(row, s, plan.feats[row.get("feats", "ft2")], plan.test)
    cache.write_text(json.dumps(out))
    return out, f"{time.time() - t:.0f} s"


def train_rows(plan: Plan, todo: list[dict]) -> tuple[dict[str, dict[int, dict]], dict, list[str]]:
    """Every (seed, row) run in seed-major order (every row with the first seed, then the next seed), each cached
    in bench/out/runs/ by a fingerprint of its settings and features, so an interrupted or budget-cut run resumes.
    Returns {row key: {seed: figures}}, the default row's per-epoch curves, and the runs left out."""
    digests = {name: file_digest(FEATURE_SETS[name] / "extractors.pt") for name in FEATURE_SETS}
    runs_dir = OUT / "runs"
    runs_dir.mkdir(exist_ok=True)
    per_key: dict[str, dict[int, dict]] = {}
    curves, skipped = {}, []
    for sd in plan.seeds:
        for i, row in enumerate(todo, 1):
            s = settings_for(row, plan.base, sd, plan.args.quick)
            if row["key"] != "default" and same_as_default(row, s, plan, sd):
                if sd == plan.seeds[0]:
                    print(f"    {row['key']}: same settings as the default row; not trained again", flush=True)
                continue
            fp = run_fingerprint(row, s, digests[row.get("feats", "ft2")])
            out, how = run_or_load(plan, row, s, f"[seed {sd}, {i}/{len(todo)}]",
                                   runs_dir / f"{row['key']}-seed{sd}-{fp}.json")
            if out is None:
                skipped.append(f"{row['key']} seed {sd}")
                continue
            if "_curve" in out:
                curves[f"seed{sd}"] = out.pop("_curve")
            for k, v in out.items():
                per_key.setdefault(k, {})[sd] = v
            r = out[row["key"]]
            print(f"    {row['key']} seed {sd}: zs mAP {r['zs_map']:.4f}  P@10 {r['zs_p10']:.3f}  gen mAP "
                  f"{r['gen_map']:.4f}  best epoch {r['best_epoch']}  ({how})", flush=True)
    return per_key, curves, skipped


def add_trained(report: Report, todo: list[dict], per_key: dict[str, dict[int, dict]]) -> None:
    """One row per trained configuration (and the early-stopping rows read off the default run), in table order,
    with the seeds that finished."""
    for row in todo:
        for d in [row] + (DERIVED if row["key"] == "default" else []):
            if d["key"] in per_key:
                got = per_key[d["key"]]
                report.add(d["group"], d["name"], d["key"], [got[sd] for sd in sorted(got)], seeds=sorted(got))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seeds = [0] if args.quick else [int(x) for x in args.seeds.split(",") if x.strip()]
    torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    t_all = time.time()

    snapshot_ft2(args.refresh_features)
    params_path = Path(args.params)
    base = default_settings(params_path, seeds, args.quick)
    shard = load_test_shard(TEST_DIR)
    test = TestSet(shard)
    ensure_e0_features(params_path)
    feats = {name: test_features(name, shard) for name in FEATURE_SETS}
    plan = Plan(args, base, seeds, feats, test, t_all)

    report = new_report(plan)
    add_baselines(report, plan)
    only = {x.strip() for x in args.only.split(",") if x.strip()}
    todo = [r for r in rows(base) if not only or r["key"] in only]
    per_key, curves, skipped = train_rows(plan, todo)
    add_trained(report, todo, per_key)
    report.data["default_curve"] = curves
    if skipped:
        report.data["skipped"] = skipped
        print(f"ablation: not run (budget or --no-train): {', '.join(skipped)}", flush=True)
    report.save()
    print_results(report)
    print(f"ablation: {time.time() - t_all:.0f} s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
