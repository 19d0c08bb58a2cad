"""The release's quality gate (unit): the new model against the no-training baselines on both sides and against
the last release, within the tolerance, on the same test set (the last release's model re-scored when classes
were added), and an override on record.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from sempcyc.commands import release as release_mod
from sempcyc.commands.release import gate_note, quality_gate
from sempcyc.errors import UserError


def metrics(ours: float, baseline: float, seen: float | None = None, centred: float | None = None) -> dict:
    """An evaluate report: `ours` on the unseen side (zero-shot and generalised), `seen` (default: `ours`) on the
    seen side; the raw-feature baseline at `baseline` everywhere, the centred one at `centred` (default below)."""
    seen = ours if seen is None else seen
    centred = baseline / 2 if centred is None else centred

    def side(value: float) -> dict:
        return {"sem_pcyc": {"map_all": value}, "pretrained": {"map_all": baseline},
                "pretrained_centred": {"map_all": centred}, "random": {"map_all": 0.01}}
    h = {m: 2 * a * b / (a + b) for m, a, b in (("sem_pcyc", ours, seen), ("pretrained", baseline, baseline),
                                                ("pretrained_centred", centred, centred), ("random", 0.01, 0.01))}
    return {"zero_shot": side(ours), "generalised": side(ours), "seen_generalised": side(seen), "harmonic": h}


@pytest.mark.parametrize("current, previous, passed, words", [
    (metrics(0.30, 0.20), None, True, "first release"),          # first release: only the baselines count
    (metrics(0.15, 0.20), None, False, "baseline"),              # below the no-training baseline
    (metrics(0.15, 0.20), metrics(0.10, 0.05), False, "baseline"),
    (metrics(0.30, 0.20), metrics(0.35, 0.20), False, "below the last release"),  # 0.05 > tolerance 0.02
    (metrics(0.34, 0.20), metrics(0.35, 0.20), True, "last release"),             # within tolerance
    (metrics(0.40, 0.20), metrics(0.35, 0.20), True, "last release"),             # better
    # the strongest baseline is the one to beat: here the centred features, not the raw ones
    (metrics(0.30, 0.20, centred=0.32), None, False, "(pretrained_centred, 0.3200)"),
])
def test_quality_gate(current, previous, passed, words):
    ok, why = quality_gate(current, previous, 0.02)
    assert ok is passed, why
    assert words in why


def test_quality_gate_refuses_a_one_sided_model():
    """Unseen side far above the baseline, seen side collapsed below it: refused, naming the seen side."""
    ok, why = quality_gate(metrics(0.60, 0.20, seen=0.15), None, 0.02)
    assert not ok and "seen-query generalised mAP@all 0.1500 is below" in why
    ok, why = quality_gate(metrics(0.60, 0.20, seen=0.40), metrics(0.60, 0.20, seen=0.60), 0.02)
    assert not ok and "seen-query generalised mAP@all 0.4000 is more than 0.02 below" in why
    assert "zero-shot" not in why  # only the failing side is named


def test_quality_gate_against_a_release_from_before_the_seen_side():
    older = {"zero_shot": {"sem_pcyc": {"map_all": 0.35}, "pretrained": {"map_all": 0.2}}}
    assert quality_gate(metrics(0.36, 0.2), older, 0.02)[0] is True
    assert quality_gate(metrics(0.30, 0.2), older, 0.02)[0] is False


def test_gate_note_records_an_override():
    assert gate_note(False, "unseen mAP@all 0.1 is below the baseline 0.2") == \
        "quality gate OVERRIDDEN: unseen mAP@all 0.1 is below the baseline 0.2"
    assert gate_note(True, "unseen mAP@all 0.3").startswith("quality gate passed: ")


def test_quality_gate_tolerance_edges():
    assert quality_gate(metrics(0.33, 0.2), metrics(0.35, 0.2), 0.021)[0] is True
    assert quality_gate(metrics(0.33, 0.2), metrics(0.35, 0.2), 0.019)[0] is False
    assert quality_gate(metrics(0.35, 0.2), metrics(0.35, 0.2), 0.0)[0] is True


def gate_run(override: bool) -> release_mod.Release:
    args = argparse.Namespace(override_gate=override)
    return release_mod.ReleaseRun(args, Path("params.yaml"), None, None)


@pytest.mark.parametrize("override", [False, True])
def test_gate_compares_with_the_last_release_on_the_same_test_set(monkeypatch, override):
    """Same test set: the last release's own report, nothing re-scored. Another test set (classes added): the last
    release's model scored on this one. When that fails: refused with one line naming --override-gate, or, with
    the override, no comparison with it."""
    last = {"test_set": "A", "zero_shot": {"sem_pcyc": {"map_all": 0.5}}}
    rescored = {"test_set": "B", "zero_shot": {"sem_pcyc": {"map_all": 0.4}}}
    calls = []
    monkeypatch.setattr(release_mod, "previous_metrics", lambda tag: last if tag else None)
    monkeypatch.setattr(release_mod, "rescore", lambda tag, params: calls.append(tag) or (rescored, ""))
    run = gate_run(override)
    assert release_mod.comparable_previous(run, None, {"test_set": "B"}) is None
    assert release_mod.comparable_previous(run, "sem-pcyc@v0.1.0", {"test_set": "A"}) is last and calls == []
    assert release_mod.comparable_previous(run, "sem-pcyc@v0.1.0", {"test_set": "B"}) is rescored
    assert calls == ["sem-pcyc@v0.1.0"] and "rescore_last_release" in run.timings
    monkeypatch.setattr(release_mod, "rescore", lambda tag, params: (None, "its evaluate failed, see above"))
    if override:
        assert release_mod.comparable_previous(run, "sem-pcyc@v0.1.0", {"test_set": "B"}) is None
    else:
        with pytest.raises(UserError, match="could not score sem-pcyc@v0.1.0's model on this test .*--override-gate"):
            release_mod.comparable_previous(run, "sem-pcyc@v0.1.0", {"test_set": "B"})
