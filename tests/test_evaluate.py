"""The evaluate stage on a tiny dataset (tiny CNN, 32-px arrays, a few iterations).

The inputs are the session's tiny model project (conftest.py: the real extract -> semantic (MiniLM) -> prepare ->
features -> train -> gallery, built once), read as `prepared` and `trained`; every test writes its own outputs
under tmp_path. Stages run in-process through `sempcyc.cli.main` (fast: torch is imported once) except where a
real process matters.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import (
    CLASSES,
    PER_CLASS,
    class_files,
    configured,
    evaluate_in,
    new_unseen_class,
    ok,
    write_params,
    write_tar,
)
from sempcyc.evaluation import BASELINES
from sempcyc.runtime.encoder import SAME_EXTRACTOR
from sempcyc.stages import evaluate as evaluate_mod

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------------- helpers

def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def shard_items(test: Path) -> int:
    return sum(len(np.load(test / f"{part}.npy")) for part in ("sketches", "seen_sketches", "images"))


# ------------------------------------------------------------------------------------------------ evaluate

def test_evaluate_reports(trained: Path, tmp_path: Path):
    write_params(tmp_path)
    ok(tmp_path, "evaluate", "--model", trained / "models/sem_pcyc.pt", "--test", trained / "data/prepared/test",
       "--out", "eval")
    report = json.loads((tmp_path / "eval/metrics.json").read_text())
    for setting in ("zero_shot", "generalised"):
        for method in ("sem_pcyc", "sem_pcyc_itq64", "pretrained", "random"):
            m = report[setting][method]
            assert set(m) >= {"map_all", "p_at_10", "p_at_100", "p_at_200"}, (setting, method)
            assert all(0.0 <= m[k] <= 1.0 for k in ("map_all", "p_at_10", "p_at_100", "p_at_200"))
    for method in ("sem_pcyc", *BASELINES):
        seen = report["seen_generalised"][method]["map_all"]
        assert 0.0 <= seen <= 1.0 and 0.0 <= report["harmonic"][method] <= 1.0
        assert 0.0 <= report["diagnostics"]["unseen_centroid_hit_rate"][method if method != "random" else
                                                                        "pretrained"] <= 1.0
    for setting in ("zero_shot", "generalised", "seen_generalised"):
        best = report[setting]["best_baseline"]
        assert report[setting][best]["map_all"] == max(report[setting][b]["map_all"] for b in BASELINES)
        # fine-tuned extractors: the model's input is not the backbone's features, so that baseline falls back
        assert report[setting]["pretrained_model_input"] == report[setting]["pretrained_centred_edges"]
    held_out = json.loads((trained / "data/prepared/test/seen_sketches_ids.json").read_text())
    assert report["counts"]["seen_queries"] == len(held_out) > 0
    unseen = json.loads((trained / "data/prepared/splits.json").read_text())["test"]
    assert report["counts"]["unseen_classes"] == len(unseen)
    assert report["counts"]["gallery_generalised"] == len(CLASSES) * PER_CLASS
    assert report["counts"]["gallery_zero_shot"] == len(unseen) * PER_CLASS
    assert any("P@100" in note for note in report["notes"])  # 4 images a class: P@100 cannot reach 1

    per_class = json.loads((tmp_path / "eval/per_class_ap.json").read_text())
    assert sorted(row["class"] for row in per_class) == sorted(unseen)
    curve = json.loads((tmp_path / "eval/pr_curve.json").read_text())
    assert {row["method"] for row in curve} >= {"sem_pcyc", "pretrained", "random"}
    assert all({"recall", "precision"} <= set(row) for row in curve)
    with Image.open(tmp_path / "eval/retrieval_grid.png") as grid:
        assert grid.format == "PNG"
        grid.load()
        assert grid.width > 0 and grid.height > 0


def plain_and_configured_reports(trained: Path, tmp_path: Path, **config) -> dict[str, dict]:
    """evaluate's metrics.json of the trained model ("plain") and of its copy with `config` changed ("expanding")."""
    write_params(tmp_path)
    changed = configured(trained / "models/sem_pcyc.pt", tmp_path / "expanding.pt", **config)
    reports = {}
    for name, model in (("plain", trained / "models/sem_pcyc.pt"), ("expanding", changed)):
        ok(tmp_path, "evaluate", "--model", model, "--test", trained / "data/prepared/test", "--out", name)
        reports[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    return reports


def test_evaluate_ranks_with_the_models_query_expansion_for_every_method(trained: Path, tmp_path: Path):
    reports = plain_and_configured_reports(trained, tmp_path, query_expansion=2)
    assert reports["plain"]["query_expansion"] == 0 and reports["expanding"]["query_expansion"] == 2
    changed = [m for m in ("sem_pcyc", "pretrained", "pretrained_centred")
               if reports["plain"]["generalised"][m] != reports["expanding"]["generalised"][m]]
    assert "pretrained" in changed or "pretrained_centred" in changed  # the baselines are expanded too
    assert reports["plain"]["generalised"]["random"] == reports["expanding"]["generalised"]["random"]


def test_evaluate_expands_the_gallery_of_every_method_by_the_models_gallery_expansion(trained: Path,
                                                                                       tmp_path: Path):
    reports = plain_and_configured_reports(trained, tmp_path, gallery_expansion=2)
    assert reports["plain"]["gallery_expansion"] == 0 and reports["expanding"]["gallery_expansion"] == 2
    for method in ("sem_pcyc", "pretrained", "pretrained_centred"):  # the baselines are expanded too
        assert reports["plain"]["generalised"][method] != reports["expanding"]["generalised"][method]
    assert reports["plain"]["generalised"]["random"] == reports["expanding"]["generalised"]["random"]


def test_evaluate_passes_never_depend_on_which_items_share_them():
    """CPU kernels pick their algorithm by batch size (efficientnet_lite0 gives other float bits at 64 than at 8),
    so every network pass takes exactly EMBED_BATCH rows: an item's vector is then the same bytes whichever items
    share its pass, which is what keeps cached and fresh vectors equal."""
    sizes = []

    def by_batch_size(x: torch.Tensor) -> torch.Tensor:  # a stand-in whose result depends on the batch size
        sizes.append(len(x))
        return x.float() * len(x)

    rows = [np.full(3, i, np.uint8) for i in range(2 * evaluate_mod.EMBED_BATCH + 3)]
    alone, among = evaluate_mod.fixed_batches(by_batch_size, rows[5:6]), evaluate_mod.fixed_batches(by_batch_size, rows)
    assert len(among) == len(rows) and np.array_equal(alone[0], among[5])
    assert set(sizes) == {evaluate_mod.EMBED_BATCH}


def test_evaluate_cache_embeds_only_new_items_and_changes_no_byte(trained: Path, tmp_path: Path):
    """A second run embeds nothing; after a class is added (the real extract -> semantic -> prepare), only its
    items; and the reports are the bytes a run without a cache writes."""
    write_params(tmp_path)
    model, test = trained / "models/sem_pcyc.pt", trained / "data/prepared/test"
    n, images = shard_items(test), len(np.load(test / "images.npy"))
    # fine-tuned extractors: nothing shared; the backbone reads every item, and each photo's edge map once more
    everything = {"items": n, "embedded": n, "backbone": n + images, "extractor": n, "shared": "none"}
    assert evaluate_in(tmp_path, model, test, "eval1", "cache") == everything
    nothing = {**everything, "embedded": 0, "backbone": 0, "extractor": 0}
    assert evaluate_in(tmp_path, model, test, "eval2", "cache") == nothing
    assert folder_bytes(tmp_path / "eval2") == folder_bytes(tmp_path / "eval1")

    extra = new_unseen_class(CLASSES)
    write_tar(tmp_path / "ds2.tar", class_files({c: (PER_CLASS, PER_CLASS) for c in [*CLASSES, extra]}))
    ok(tmp_path, "extract", "--tar", "ds2.tar", "--out", "ds2", "--index", "ds2.json")
    ok(tmp_path, "semantic", "--index", "ds2.json", "--out", "sem2")
    ok(tmp_path, "prepare", "--dataset", "ds2", "--index", "ds2.json", "--semantic", "sem2", "--out", "prep2")
    test2 = tmp_path / "prep2/test"
    assert extra in json.loads((test2 / "classes.json").read_text())["unseen"]
    new = 2 * PER_CLASS  # the new class's images (gallery) and sketches (unseen queries)
    assert shard_items(test2) == n + new
    added = {"items": n + new, "embedded": new, "backbone": new + PER_CLASS, "extractor": new, "shared": "none"}
    assert evaluate_in(tmp_path, model, test2, "eval3", "cache") == added
    assert evaluate_in(tmp_path, model, test2, "eval-cold", "cold-cache")["embedded"] == n + new
    assert folder_bytes(tmp_path / "eval3") == folder_bytes(tmp_path / "eval-cold")
    assert folder_bytes(tmp_path / "eval3") != folder_bytes(tmp_path / "eval1")
    # the release gate compares two reports only on the same test set: the class added changed the digest
    digest = {name: json.loads((tmp_path / name / "metrics.json").read_text())["test_set"]
              for name in ("eval1", "eval2", "eval3")}
    assert digest["eval1"] == digest["eval2"] != digest["eval3"] and len(digest["eval3"]) == 64


def test_evaluate_cache_new_model_and_damaged_files(trained: Path, tmp_path: Path):
    """Another model re-embeds every item but reuses the backbone features, and its cache file replaces the old
    model's; damaged cache files are computed again; the reports never depend on what the cache held."""
    write_params(tmp_path)
    model, test = trained / "models/sem_pcyc.pt", trained / "data/prepared/test"
    n = shard_items(test)
    evaluate_in(tmp_path, model, test, "eval1", "cache")
    bundle = torch.load(model, map_location="cpu", weights_only=True)
    first = next(iter(bundle["gen_im2se"]))
    bundle["gen_im2se"][first] = bundle["gen_im2se"][first] + 0.5
    torch.save(bundle, tmp_path / "other.pt")
    counts = evaluate_in(tmp_path, tmp_path / "other.pt", test, "eval2", "cache")
    assert (counts["embedded"], counts["backbone"]) == (n, 0)
    assert len(list((tmp_path / "cache").glob("model-*.npz"))) == 1
    assert len(list((tmp_path / "cache").glob("backbone-*.npz"))) == 1
    evaluate_in(tmp_path, tmp_path / "other.pt", test, "eval-cold", "cold-cache")
    assert folder_bytes(tmp_path / "eval2") == folder_bytes(tmp_path / "eval-cold")
    assert folder_bytes(tmp_path / "eval2") != folder_bytes(tmp_path / "eval1")

    (model_file,) = (tmp_path / "cache").glob("model-*.npz")
    model_file.write_bytes(b"not a zip file")
    (backbone_file,) = (tmp_path / "cache").glob("backbone-*.npz")
    backbone_file.write_bytes(backbone_file.read_bytes()[:1000])
    counts = evaluate_in(tmp_path, tmp_path / "other.pt", test, "eval3", "cache")
    assert (counts["embedded"], counts["backbone"]) == (n, n)
    assert folder_bytes(tmp_path / "eval3") == folder_bytes(tmp_path / "eval-cold")
    counts = evaluate_in(tmp_path, tmp_path / "other.pt", test, "eval4", "cache")  # the files were rewritten
    assert (counts["embedded"], counts["backbone"]) == (0, 0)


def test_evaluate_shares_the_backbone_pass_only_where_the_extractor_is_the_backbone(
        trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """features.epochs 0: the model's extractors are backbones without projection. With the tiny test CNN (random
    weights, seeded) the sketch extractor has the baseline backbone's weights and the image extractor others, so
    only sketches are shared; the reports equal those of a run that shares nothing."""
    write_params(tmp_path, {"features": {"epochs": 0}})
    ok(tmp_path, "features", "--train", trained / "data/prepared/train", "--out", "feat")
    ok(tmp_path, "train", "--features", "feat", "--train", trained / "data/prepared/train", "--out", "m0.pt",
       "--live-dir", "live", "--checkpoint", "ckpt.pt")
    test = trained / "data/prepared/test"
    n, images = shard_items(test), len(np.load(test / "images.npy"))
    # the backbone reads every item, and each photo's edge map (the photo-edge baseline)
    assert evaluate_in(tmp_path, tmp_path / "m0.pt", test, "shared", "cache1") == {
        "items": n, "embedded": n, "backbone": n + images, "extractor": images, "shared": "sketch"}
    # the same model with the sketch backbone read for photos too: the model's photo features (model.photo_edges:
    # photo and edge map) are the baselines' passes, the model's extractor runs on nothing
    bundle = torch.load(tmp_path / "m0.pt", weights_only=True)
    torch.save({**bundle, "image_extractor": SAME_EXTRACTOR}, tmp_path / "m1.pt")
    assert evaluate_in(tmp_path, tmp_path / "m1.pt", test, "shared1", "cache3") == {
        "items": n, "embedded": n, "backbone": n + images, "extractor": 0, "shared": "sketch, image"}
    monkeypatch.setattr(evaluate_mod, "runs_backbone", lambda *args: False)
    assert evaluate_in(tmp_path, tmp_path / "m0.pt", test, "separate", "cache2") == {
        "items": n, "embedded": n, "backbone": n + images, "extractor": n, "shared": "none"}
    assert folder_bytes(tmp_path / "shared") == folder_bytes(tmp_path / "separate")
    # frozen extractors: the model-input baseline is the backbone's features as the model normalises them (its
    # own training-class statistics), no longer the photo-edge baseline (test-shard seen-class means)
    report = json.loads((tmp_path / "shared/metrics.json").read_text())
    assert report["zero_shot"]["pretrained_model_input"] != report["zero_shot"]["pretrained_centred_edges"]
    evaluate_in(tmp_path, tmp_path / "m1.pt", test, "separate1", "cache4")
    assert folder_bytes(tmp_path / "shared1") == folder_bytes(tmp_path / "separate1")
