"""The release's quality gate: the new model against the strongest no-training baseline and against the last
release, figure by figure (zero-shot, each side's generalised mAP@all, H).
"""
from __future__ import annotations

from .evaluation import BASELINES

# What the quality gate checks, each against the strongest no-training baseline and against the last release.
GATED = {"zero_shot": "zero-shot mAP@all", "generalised": "unseen-query generalised mAP@all",
         "seen_generalised": "seen-query generalised mAP@all", "harmonic": "H"}


def gate_figures(metrics: dict, method: str = "sem_pcyc") -> dict[str, float]:
    """The gated figures of `method` that `metrics` (an evaluate report, maybe an older one) has."""
    figures = {k: metrics[k][method]["map_all"] for k in GATED if k != "harmonic" and method in metrics.get(k, {})}
    if method in metrics.get("harmonic", {}):
        figures["harmonic"] = metrics["harmonic"][method]
    return figures


def quality_gate(metrics: dict, previous: dict | None, tolerance: float) -> tuple[bool, str]:
    """Pass when zero-shot mAP@all, H and each side's generalised mAP@all beat the strongest no-training baseline
    and none is more than `tolerance` below the last release's: a model cannot buy one side with the other."""
    ours = gate_figures(metrics)
    best = {k: max((gate_figures(metrics, b).get(k, 0.0), b) for b in BASELINES) for k in ours}
    failures = [f"{GATED[k]} {v:.4f} is below the strongest no-training baseline ({best[k][1]}, {best[k][0]:.4f})"
                for k, v in ours.items() if v < best[k][0]]
    last = gate_figures(previous) if previous is not None else {}
    failures += [f"{GATED[k]} {v:.4f} is more than {tolerance} below the last release's {last[k]:.4f}"
                 for k, v in ours.items() if k in last and v < last[k] - tolerance]
    if failures:
        return False, "; ".join(failures)
    return True, ", ".join(f"{GATED[k]} {v:.4f} (baseline {best[k][0]:.4f}"
                           + (f", last release {last[k]:.4f})" if k in last else ")") for k, v in ours.items()) \
        + (f"; tolerance {tolerance}" if last else "; first release")


def gate_note(passed: bool, why: str) -> str:
    """The quality gate's verdict as the release commit and tag record it: an override stays visible."""
    return f"quality gate {'passed' if passed else 'OVERRIDDEN'}: {why}"
