"""The release's quality gate (gate.py): the new model against the strongest no-training baseline, and against the
last release on the same test set, query by query, with a confidence interval from a bootstrap over classes.

Synthetic per-query APs model what a retraining does: each class has a quality both trainings share, and each
training its own class-level luck and query-level noise; the tolerance is the repository's 0.02. Then the real
evaluate stage on the tiny pipeline: its per-query APs are what metrics.json averages, and two trainings that differ
only in seed pass the comparison. Last, the last release's side: which report the gate compares with, re-scoring
it, and that a re-score embeds only what the evaluate cache lacks.
"""
from __future__ import annotations

import argparse
import json
import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from helpers import (
    CLASSES,
    PER_CLASS,
    VENV_BIN,
    class_files,
    new_unseen_class,
    ok,
    repo_params,
    write_params,
    write_tar,
)
from sempcyc import embedcache, gate
from sempcyc.commands import release as release_mod
from sempcyc.commands import report as report_mod
from sempcyc.errors import UserError
from sempcyc.gate import Scored, quality_gate
from sempcyc.params import read_section
from sempcyc.serving import ReleaseSettings

SETTINGS = read_section(repo_params(), ReleaseSettings)  # the repository's gate settings: tolerance 0.02, 95 %


# ------------------------------------------------------------------------------------------------ synthetic APs

def trainings(rng: np.random.Generator, unseen: int = 9, seen: int = 30, queries: int = 16, class_sd: float = 0.05,
              query_sd: float = 0.1, drop: float = 0.0) -> tuple[dict, dict]:
    """Per-query APs (per_query_ap.json) of two trainings on one test set: `unseen` and `seen` classes of
    `queries` queries, the second `drop` lower everywhere."""
    quality = {side: rng.uniform(0.5, 0.9, n) for side, n in (("unseen", unseen), ("seen", seen))}

    def train(d: float) -> dict:
        out = {"test_set": "T"}
        for side, figures in (("unseen", ("zero_shot", "generalised")), ("seen", ("seen_generalised",))):
            luck = rng.normal(0, class_sd, len(quality[side]))
            out[side] = {f"{side}{c}/{q:03d}.png": {"class": f"{side}{c}", **{
                f: float(np.clip(quality[side][c] + luck[c] - d + rng.normal(0, query_sd) - 0.1 * (f == "generalised"),
                                 0, 1)) for f in figures}} for c in range(len(quality[side])) for q in range(queries)}
        return out
    return train(0.0), train(drop)


def metrics_of(per_query: dict, baseline: float = 0.1) -> dict:
    """The evaluate report whose mAP@all figures are the means of `per_query`; the strongest baseline (the raw
    features) at `baseline` everywhere, the centred ones at half of it, random at 0.01."""
    others = {"pretrained": baseline, "pretrained_centred": baseline / 2, "random": 0.01}

    def side(name: str, figure: str) -> dict:
        values = [row[figure] for row in per_query[name].values()]
        return {"sem_pcyc": {"map_all": float(np.mean(values))}, **{b: {"map_all": v} for b, v in others.items()}}
    m = {"zero_shot": side("unseen", "zero_shot"), "generalised": side("unseen", "generalised"),
         "seen_generalised": side("seen", "seen_generalised"), "test_set": per_query["test_set"]}
    g, s = m["generalised"]["sem_pcyc"]["map_all"], m["seen_generalised"]["sem_pcyc"]["map_all"]
    m["harmonic"] = {"sem_pcyc": 2 * g * s / (g + s), **others}
    return m


def judge(new: dict, old: dict | None, settings: ReleaseSettings = SETTINGS, baseline: float = 0.1):
    return quality_gate(metrics_of(new, baseline), new, None if old is None else Scored(metrics_of(old), old),
                        settings)


def shifted(per_query: dict, by: float) -> dict:
    """`per_query` with every AP moved by `by` (clipped to [0, 1]): a model scoring that much lower or higher."""
    return {**per_query, **{side: {q: {k: v if k == "class" or v is None else min(1.0, max(0.0, v + by))
                                       for k, v in row.items()} for q, row in per_query[side].items()}
                            for side in ("unseen", "seen")}}


# ------------------------------------------------------------------------------------------------ the rule

def test_a_retraining_within_noise_passes_where_a_fixed_tolerance_refused_it():
    """The issue's case: 9 unseen classes, zero-shot mAP@all 0.0227 lower than the last release's after an honest
    retraining. The fixed rule refused it; the interval shows the drop is within what the class draw explains."""
    rng = np.random.default_rng(4)
    while True:
        old, new = trainings(rng)
        drop = metrics_of(old)["zero_shot"]["sem_pcyc"]["map_all"] - metrics_of(new)["zero_shot"]["sem_pcyc"]["map_all"]
        if 0.02 < drop < 0.03:
            break
    verdict = judge(new, old)
    assert verdict.passed, verdict.why
    figure = verdict.record["figures"]["zero-shot mAP@all"]
    assert figure["new_minus_last"] == pytest.approx(-drop, abs=1e-6)
    assert figure["low"] < figure["new_minus_last"] < figure["high"] and figure["high"] > -0.02
    assert "9 unseen classes (144 queries), 30 seen classes (480 queries)" in verdict.why
    assert f"new - last {-drop:+.4f}, 95% interval [{figure['low']:+.4f}, {figure['high']:+.4f}]" in verdict.why


def test_a_clearly_worse_model_is_refused_with_its_interval():
    old, _ = trainings(np.random.default_rng(1))
    verdict = judge(shifted(old, -0.15), old)
    assert not verdict.passed
    figure = verdict.record["figures"]["zero-shot mAP@all"]
    assert figure["high"] < -0.02
    assert (f"zero-shot mAP@all {figure['new']:.4f} is below the last release's {figure['last']:.4f} by more than "
            f"0.02 beyond noise: new - last {figure['new_minus_last']:+.4f}, 95% interval "
            f"[{figure['low']:+.4f}, {figure['high']:+.4f}]") in verdict.why
    assert "\n" not in verdict.why and "9 unseen classes" in verdict.why


def test_a_model_that_buys_one_side_with_the_other_is_refused_naming_that_side():
    old, _ = trainings(np.random.default_rng(2))
    worse_seen = {**old, "seen": shifted(old, -0.2)["seen"]}
    verdict = judge(worse_seen, old)
    assert not verdict.passed
    assert "seen-query generalised mAP@all" in verdict.why and "H " in verdict.why
    assert "zero-shot mAP@all" not in verdict.why.split(" (9 unseen")[0]  # only the failing figures are named


def test_honest_retrainings_are_almost_never_refused_and_clear_drops_always_are():
    """200 pairs of trainings that differ only in luck (9 unseen classes, the issue's set size): the fixed rule
    (refuse a point drop over 0.02) refused many, the interval rule almost none; drops of 0.15 are all refused."""
    rng = np.random.default_rng(0)
    fast = replace(SETTINGS, gate_resamples=500)
    fixed = interval = 0
    for _ in range(200):
        old, new = trainings(rng)
        before, after = (metrics_of(m)["zero_shot"]["sem_pcyc"]["map_all"] for m in (old, new))
        fixed += after < before - 0.02
        interval += not judge(new, old, fast).passed
    assert fixed >= 20 and interval <= 3, (fixed, interval)
    refused = sum(not judge(*reversed(trainings(rng, drop=0.15)), fast).passed for _ in range(30))
    assert refused == 30


def test_same_inputs_same_verdict_and_the_seed_is_a_setting():
    old, new = trainings(np.random.default_rng(3))
    assert judge(new, old) == judge(new, old)
    other = judge(new, old, replace(SETTINGS, gate_seed=1))
    assert other.record["figures"] != judge(new, old).record["figures"] and other.passed == judge(new, old).passed


def test_a_set_too_small_to_see_the_tolerance_says_so():
    old, new = trainings(np.random.default_rng(5), unseen=3)
    verdict = judge(new, old)
    assert "warning: the test set is too small to see a drop of 0.02: the gate can refuse zero-shot mAP@all only " \
           "below -" in verdict.why and verdict.record["warnings"]
    old, new = trainings(np.random.default_rng(5), unseen=400, seen=400, class_sd=0.005, query_sd=0.02, queries=4)
    assert not judge(new, old).record["warnings"]


def test_identical_models_pass_with_no_tolerance():
    old, _ = trainings(np.random.default_rng(6))
    verdict = judge(old, old, replace(SETTINGS, gate_tolerance=0.0))
    assert verdict.passed and all(f["low"] == f["high"] == 0.0 for f in verdict.record["figures"].values())


def test_the_baseline_checks_stay():
    old, new = trainings(np.random.default_rng(7))
    verdict = judge(new, old, baseline=0.95)
    assert not verdict.passed
    assert "zero-shot mAP@all" in verdict.why and "is below the strongest no-training baseline (pretrained, " \
        "0.9500)" in verdict.why
    first = judge(new, None)
    assert first.passed and "not compared with a last release" in first.why and "figures" not in first.record


@pytest.mark.parametrize("unseen, words", [
    ({}, "the test set has no unseen-class queries"),
    ({"bear/000.png": {"class": "bear", "zero_shot": 0.5, "generalised": 0.4},
      "bear/001.png": {"class": "bear", "zero_shot": 0.6, "generalised": 0.5}},
     "the test set's unseen queries are of a single class (bear); an interval needs at least 2 classes"),
])
def test_a_test_set_it_cannot_judge_on_is_one_line_saying_what_to_do(unseen, words):
    old, _ = trainings(np.random.default_rng(8))
    small = {**old, "unseen": unseen}
    metrics = metrics_of(old)
    verdict = quality_gate(metrics, small, Scored(metrics, small), SETTINGS)
    assert not verdict.passed and not verdict.record["judged"]
    assert verdict.why.startswith("cannot judge against the last release: " + words)
    assert verdict.why.endswith("add unseen classes (split.test_fraction, split.test_classes_file) or sketches to "
                                "the data") and "\n" not in verdict.why


def test_reports_of_other_test_sets_or_without_per_query_aps_are_not_judged():
    old, new = trainings(np.random.default_rng(9))
    assert "not scored on the same test set" in judge(new, {**old, "test_set": "other"}).why
    verdict = quality_gate(metrics_of(new), new, Scored(metrics_of(old), None), SETTINGS)
    assert not verdict.passed and "per-query APs are missing" in verdict.why


def test_the_release_refuses_on_one_line_naming_the_interval_and_the_override(tmp_path, monkeypatch):
    """build_and_gate after its `dvc repro`: the verdict goes to reports/gate.json, the error is one line."""
    old, _ = trainings(np.random.default_rng(10))
    new = shifted(old, -0.15)
    (tmp_path / "reports/eval").mkdir(parents=True)
    (tmp_path / "reports/eval/metrics.json").write_text(json.dumps(metrics_of(new)))
    (tmp_path / "reports/eval/per_query_ap.json").write_text(json.dumps(new))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(release_mod, "dvc", lambda *args, **kwargs: None)
    monkeypatch.setattr(release_mod, "comparable_previous", lambda r, tag, test_set: Scored(metrics_of(old), old))
    r = release_mod.ReleaseRun(argparse.Namespace(override_gate=False), Path("params.yaml"), SETTINGS, None)
    with pytest.raises(UserError) as error:
        release_mod.build_and_gate(r, "sem-pcyc@v0.1.0")
    line = str(error.value)
    assert line.startswith("quality gate: zero-shot mAP@all ") and "95% interval [" in line and "\n" not in line
    assert line.endswith("Nothing deployed, pushed or tagged; rerun with --override-gate to release anyway")
    record = json.loads((tmp_path / "reports/gate.json").read_text())
    assert record["passed"] is False and record["last_release"] == "sem-pcyc@v0.1.0" and record["unseen_classes"] == 9


def test_report_md_shows_each_figures_interval_and_the_warnings():
    old, new = trainings(np.random.default_rng(13), unseen=3)
    record = {**judge(new, old).record, "last_release": "sem-pcyc@v0.1.0"}
    lines = report_mod.gate_section(record)
    assert lines[0] == "## Quality gate against sem-pcyc@v0.1.0"
    assert "3 unseen classes (48 queries), 30 seen classes (480 queries)" in lines[2]
    f = record["figures"]["zero-shot mAP@all"]
    assert (f"| zero-shot mAP@all | {f['new']:.4f} | {f['last']:.4f} | {f['new_minus_last']:+.4f} | "
            f"[{f['low']:+.4f}, {f['high']:+.4f}] |") in lines
    assert any(line.startswith("- warning: the test set is too small") for line in lines)
    assert report_mod.gate_section({**record, "figures": None}) == []


# ------------------------------------------------------------------------------------------ the real evaluate

@pytest.fixture(scope="module")
def two_seeds(tmp_path_factory, one_torch_thread) -> Path:
    """The tiny pipeline through features, then two trainings of the same data with seeds 0 and 1, each evaluated
    on the same test shard (folders eval0, eval1)."""
    root = tmp_path_factory.mktemp("seeds")
    write_tar(root / "ds.tar", class_files({c: (PER_CLASS, PER_CLASS) for c in CLASSES}))
    write_params(root)
    for name in ("extract", "semantic", "prepare", "features"):
        ok(root, name)
    for seed in (0, 1):
        write_params(root, {"train": {"seed": seed}}, name=f"seed{seed}.yaml")
        ok(root, "--params", f"seed{seed}.yaml", "train", "--out", f"seed{seed}.pt")
        ok(root, "evaluate", "--model", f"seed{seed}.pt", "--out", f"eval{seed}")
    return root


def reports(folder: Path) -> tuple[dict, dict]:
    return tuple(json.loads((folder / f"{name}.json").read_text()) for name in ("metrics", "per_query_ap"))


def test_evaluate_writes_every_querys_ap_under_its_id(two_seeds: Path):
    metrics, per_query = reports(two_seeds / "eval0")
    test = two_seeds / "data/prepared/test"
    assert per_query["test_set"] == metrics["test_set"]
    assert list(per_query["unseen"]) == json.loads((test / "sketches_ids.json").read_text())
    assert list(per_query["seen"]) == json.loads((test / "seen_sketches_ids.json").read_text())
    assert all(qid.split("/")[0] == row["class"] for side in ("unseen", "seen") for qid, row in per_query[side].items())
    for figure, side in (("zero_shot", "unseen"), ("generalised", "unseen"), ("seen_generalised", "seen")):
        aps = [row[figure] for row in per_query[side].values()]
        assert np.mean(aps) == pytest.approx(metrics[figure]["sem_pcyc"]["map_all"], abs=1e-12), figure


def test_two_trainings_of_the_same_data_with_different_seeds_pass_the_comparison(two_seeds: Path):
    (m0, q0), (m1, q1) = reports(two_seeds / "eval0"), reports(two_seeds / "eval1")
    assert q0 != q1  # the seeds made different models
    for new, old in (((m1, q1), (m0, q0)), ((m0, q0), (m1, q1))):
        verdict = quality_gate(*new, Scored(*old), SETTINGS)
        assert "last release's" not in verdict.why, verdict.why
        assert all(f["high"] >= -SETTINGS.gate_tolerance for f in verdict.record["figures"].values())
        assert verdict.record["unseen_classes"] == m0["counts"]["unseen_classes"]


def test_a_real_report_lowered_by_a_clear_margin_is_refused(two_seeds: Path):
    metrics, per_query = reports(two_seeds / "eval0")
    lower = shifted(per_query, -0.25)
    verdict = quality_gate(metrics, lower, Scored(metrics, per_query), replace(SETTINGS, gate_tolerance=0.0))
    assert not verdict.passed and "zero-shot mAP@all" in verdict.why and "beyond noise" in verdict.why


# ------------------------------------------------------------------------------------- the last release's side

def release_run(override: bool) -> release_mod.ReleaseRun:
    return release_mod.ReleaseRun(argparse.Namespace(override_gate=override), Path("params.yaml"), SETTINGS, None)


@pytest.mark.parametrize("override", [False, True])
def test_the_gate_compares_with_the_last_release_on_the_same_test_set(monkeypatch, override):
    """Same test set and per-query APs committed: the last release's own reports, nothing re-scored. Another test
    set (classes added), or reports older than the per-query APs: its model scored on this one. When that fails:
    refused with one line naming --override-gate, or, with the override, no comparison with it."""
    old, _ = trainings(np.random.default_rng(11))
    committed = Scored({"test_set": "A"}, {**old, "test_set": "A"})
    rescored = Scored({"test_set": "B"}, {**old, "test_set": "B"})
    reports_of = {"sem-pcyc@v0.1.0": committed, "sem-pcyc@v0.0.9": Scored({"test_set": "A"}, None)}
    calls = []
    monkeypatch.setattr(release_mod, "committed_report", lambda tag: reports_of.get(tag))
    monkeypatch.setattr(release_mod, "rescore", lambda tag, params: calls.append(tag) or (rescored, ""))
    run = release_run(override)
    assert release_mod.comparable_previous(run, None, "B") is None
    assert release_mod.comparable_previous(run, "sem-pcyc@v0.1.0", "A") is committed and calls == []
    assert release_mod.comparable_previous(run, "sem-pcyc@v0.1.0", "B") is rescored
    assert release_mod.comparable_previous(run, "sem-pcyc@v0.0.9", "A") is rescored
    assert calls == ["sem-pcyc@v0.1.0", "sem-pcyc@v0.0.9"] and "rescore_last_release" in run.timings
    monkeypatch.setattr(release_mod, "rescore", lambda tag, params: (None, "its evaluate failed, see above"))
    if override:
        assert release_mod.comparable_previous(run, "sem-pcyc@v0.1.0", "B") is None
    else:
        with pytest.raises(UserError, match="could not score sem-pcyc@v0.1.0's model on this test .*--override-gate"):
            release_mod.comparable_previous(run, "sem-pcyc@v0.1.0", "B")


@pytest.mark.integration
def test_a_last_release_whose_model_cannot_be_fetched_is_one_line_naming_it(dvc_project, monkeypatch):
    """A real git + DVC project whose release tag has reports but no model in any cache or remote."""
    proj, env = dvc_project
    (proj / "reports/eval").mkdir(parents=True)
    (proj / "reports/eval/metrics.json").write_text(json.dumps({"test_set": "old"}))
    (proj / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {"train": {
        "cmd": "sempcyc train", "outs": [{"path": "models/sem_pcyc.pt", "hash": "md5", "size": 3,
                                          "md5": "0123456789abcdef0123456789abcdef"}]}}}))
    for cmd in (["add", "-A"], ["commit", "-qm", "a release"], ["tag", "sem-pcyc@v0.1.0"]):
        subprocess.run(["git", *cmd], cwd=proj, env=env, check=True)
    monkeypatch.chdir(proj)
    for key in ("DVC_SITE_CACHE_DIR", "PATH"):
        monkeypatch.setenv(key, env[key])
    with pytest.raises(UserError) as error:
        release_mod.comparable_previous(release_run(False), "sem-pcyc@v0.1.0", "new")
    line = str(error.value)
    assert line.startswith("could not score sem-pcyc@v0.1.0's model on this test set (dvc get of its "
                           "models/sem_pcyc.pt failed: ") and "--override-gate" in line and "\n" not in line


# ------------------------------------------------------------------------------------- re-scoring from the cache

def counts(out: str) -> tuple[int, int]:
    """evaluate's (items, embedded) from its count line."""
    words = out.split("evaluate: ")[1].split()
    return int(words[0]), int(words[3].lstrip("("))


def test_a_rescore_embeds_only_what_the_cache_lacks_for_the_pinned_last_release(two_seeds: Path, tmp_path: Path):
    """The last release's model (seed0) was evaluated and pinned; a newer model (seed1) was evaluated since, and a
    class was added: re-scoring the last release embeds only the new class's items. Unpinned, its embeddings
    were gone (what happened before: each evaluate kept one model's file) and it embedded every item again."""
    root = two_seeds
    write_tar(root / "ds2.tar", class_files({c: (PER_CLASS, PER_CLASS) for c in [*CLASSES, new_unseen_class(CLASSES)]}))
    ok(root, "extract", "--tar", "ds2.tar", "--out", "ds2", "--index", "ds2.json")
    ok(root, "semantic", "--index", "ds2.json", "--out", "sem2")
    ok(root, "prepare", "--dataset", "ds2", "--index", "ds2.json", "--semantic", "sem2", "--out", "prep2")
    last, newer, cache = root / "seed0.pt", root / "seed1.pt", tmp_path / "cache"
    n, _ = counts(ok(root, "evaluate", "--model", last, "--cache", cache, "--out", tmp_path / "last"))
    new_items = 2 * PER_CLASS  # the added class's sketches and images
    embedcache.pin_models(cache, [gate.sha256_file(last)])  # what the release does once it released it
    ok(root, "evaluate", "--model", newer, "--test", "prep2/test", "--cache", cache, "--out", tmp_path / "newer")
    assert len(list(cache.glob("model-*.npz"))) == 2
    items, embedded = counts(ok(root, "evaluate", "--model", last, "--test", "prep2/test", "--cache", cache,
                                "--out", tmp_path / "rescored"))
    assert (items, embedded) == (n + new_items, new_items)
    embedcache.pin_models(cache, [])
    ok(root, "evaluate", "--model", newer, "--test", "prep2/test", "--cache", cache, "--out", tmp_path / "again")
    assert [p.name.startswith(embedcache.model_prefix(gate.sha256_file(newer))) for p in cache.glob("model-*.npz")] \
        == [True]
    assert counts(ok(root, "evaluate", "--model", last, "--test", "prep2/test", "--cache", cache,
                     "--out", tmp_path / "cold"))[1] == n + new_items


def test_pin_released_keeps_the_candidate_only_while_it_rescores(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    (tmp_path / "models/sem_pcyc.pt").write_bytes(b"candidate")
    candidate = gate.sha256_file(tmp_path / "models/sem_pcyc.pt")
    gate.pin_released("a" * 64, with_candidate=True)
    assert sorted(embedcache.pinned_models(embedcache.EVALUATE_CACHE)) == sorted(["a" * 64, candidate])
    gate.pin_released(candidate)
    assert embedcache.pinned_models(embedcache.EVALUATE_CACHE) == [candidate]
    (embedcache.EVALUATE_CACHE / embedcache.PINS_FILE).write_text("not json")
    assert embedcache.pinned_models(embedcache.EVALUATE_CACHE) == []


@pytest.mark.integration
def test_a_rescore_writing_the_evaluate_cache_leaves_the_evaluate_stage_current(dvc_project):
    """`dvc repro evaluate`, then another model evaluated into the same cache (what the release's re-score does):
    DVC still finds evaluate up to date, so an --override-gate rerun does not evaluate again."""
    proj, env = dvc_project
    write_params(proj, {"data": {"tar": "data/ds.tar"}})
    (proj / "data").mkdir()
    write_tar(proj / "data/ds.tar", class_files({c: (PER_CLASS, PER_CLASS) for c in CLASSES}))
    env = dict(env, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    for cmd in (["git", "add", "-A"], ["git", "commit", "-qm", "tiny"], [str(VENV_BIN / "dvc"), "repro", "evaluate"]):
        subprocess.run(cmd, cwd=proj, env=env, check=True, capture_output=True, timeout=600)
    bundle = torch.load(proj / "models/sem_pcyc.pt", weights_only=True)
    first = next(iter(bundle["gen_im2se"]))
    bundle["gen_im2se"][first] = bundle["gen_im2se"][first] + 0.5  # another model: every item embedded again
    model = proj.parent / "other.pt"
    torch.save(bundle, model)
    before = sorted(p.name for p in (proj / "models/evaluate-cache").iterdir())
    subprocess.run([str(VENV_BIN / "sempcyc"), "evaluate", "--model", str(model), "--out", str(proj.parent / "re")],
                   cwd=proj, env=env, check=True, capture_output=True, timeout=600)
    assert sorted(p.name for p in (proj / "models/evaluate-cache").iterdir()) != before  # it did write the cache
    status = subprocess.run([str(VENV_BIN / "dvc"), "status", "evaluate", "--json"], cwd=proj, env=env,
                            capture_output=True, text=True, check=True)
    assert json.loads(status.stdout) == {}, status.stdout


def test_a_last_release_from_before_the_seen_side_is_judged_on_the_unseen_side():
    old, new = trainings(np.random.default_rng(12))
    older = {"test_set": "T", "unseen": old["unseen"]}  # its evaluate held no seen queries out
    verdict = quality_gate(metrics_of(new), new, Scored(metrics_of(old), older), SETTINGS)
    assert set(verdict.record["figures"]) == {"zero-shot mAP@all", "unseen-query generalised mAP@all"}
    assert verdict.passed, verdict.why
    assert not quality_gate(metrics_of(shifted(new, -0.2)), shifted(new, -0.2), Scored(metrics_of(old), older),
                            SETTINGS).passed
