"""`sempcyc report`: reports/report.md for a release — params and metrics diff against the previous release tag,
training curves and the retrieval grid as images, serve-check and deploy summaries. The workflow's report job posts it
with the GitHub CLI (its images travel in the run's artifact, not to a third-party host).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt

from ..errors import UserError
from ..evaluation import BASELINES
from ..vcs import TAG_RE, dvc, parse_tags, release_tags, tag_of, tags_at

matplotlib.use("Agg")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--against", help="tag or revision to compare with (default: the previous sem-pcyc@v* tag)")
    parser.add_argument("--out", default="reports/report.md", help="report file (default: %(default)s)")


def _dvc(*args: str) -> str:
    """dvc's output, or a line saying it failed (a report shows what it can)."""
    proc = dvc(*args, check=False)
    if proc.returncode == 0:
        return proc.stdout.strip()
    return f"(`dvc {' '.join(args)}` failed: {proc.stderr.strip()[:300]})"


def previous_tag(against: str | None) -> str | None:
    if against:
        return against
    here = set(tags_at("HEAD"))
    versions = parse_tags([t for t in release_tags() if t not in here and TAG_RE.match(t)])
    return tag_of(versions[-1]) if versions else None


def training_curves(live_dir: Path, out: Path) -> bool:
    plots = sorted((live_dir / "plots" / "metrics").rglob("*.tsv"))
    if not plots:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for path in plots:
        rows = [line.split("\t") for line in path.read_text().splitlines()[1:] if line.strip()]
        if not rows:
            continue
        name = str(path.relative_to(live_dir / "plots" / "metrics").with_suffix(""))
        ax = axes[1] if name.startswith("val") else axes[0]
        ax.plot([int(r[0]) for r in rows], [float(r[-1]) for r in rows], label=name)
    axes[0].set_title("training losses per epoch")
    axes[0].set_yscale("symlog")
    axes[1].set_title("validation mAP@all (held-out seen-side classes)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return True


def _json(path: str) -> dict | None:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def run(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    metrics = _json("reports/eval/metrics.json")
    if metrics is None:
        raise UserError("reports/eval/metrics.json not found; run `dvc repro evaluate` first")
    release = _json("reports/release.json") or {}
    lines = [f"# SEM-PCYC release {release.get('tag', '(local run)')}", ""]
    gate = _json("reports/gate.json")
    if gate and not gate.get("passed"):
        lines += [f"**Quality gate {'OVERRIDDEN' if gate.get('overridden') else 'failed'}:** {gate['reason']}", ""]
    if release.get("deploy") == "failed":
        lines += [f"**Deploy failed:** {release['tag']} is released, but not on every host; rerun the release with "
                  "the same inputs to finish the deploy (see Deploy below).", ""]
    lines += quality_section(metrics) + gate_section(gate) + changes_section(previous_tag(args.against))
    lines += images_section(out)
    lines += serve_check_section(_json("reports/serve_check.json")) + deploy_section(_json("reports/deploy.json"))
    if release.get("timings_s"):
        lines += ["## Release timings (s)", "", "```", json.dumps(release["timings_s"], indent=1), "```", ""]
    out.write_text("\n".join(lines), encoding="utf-8")
    print(f"report: {out}")


def quality_section(metrics: dict) -> list[str]:
    lines = ["## Retrieval quality", "",
             "Unseen-class sketches (zero-shot: against unseen-class images; generalised: against the whole gallery) "
             "and held-out sketches of training classes (seen) against the whole gallery.", "",
             "| setting | method | mAP@all | P@10 | P@100 |", "|---|---|---|---|---|"]
    for setting in ("zero_shot", "generalised", "seen_generalised"):
        block = metrics.get(setting, {})
        for method in ("sem_pcyc", "sem_pcyc_itq64", *BASELINES):
            if method in block:
                m = block[method]
                lines.append(f"| {setting} | {method} | {m['map_all']:.4f} | {m['p_at_10']:.4f} | "
                             f"{m['p_at_100']:.4f} |")
    if "harmonic" in metrics:
        lines += ["", "H (harmonic mean of the unseen and seen generalised mAP@all): "
                  + ", ".join(f"{m} {v:.4f}" for m, v in metrics["harmonic"].items())]
    return lines + [""] + [f"- {note}" for note in metrics.get("notes", [])] + [""]


def gate_section(gate: dict | None) -> list[str]:
    """The quality gate's comparison with the last release: each figure's new - last and its interval."""
    if not gate or not gate.get("figures"):
        return []
    lines = [f"## Quality gate against {gate.get('last_release') or 'the last release'}", "",
             f"Paired per query on the same test set: {gate['unseen_classes']} unseen classes "
             f"({gate['unseen_queries']} queries), {gate['seen_classes']} seen classes ({gate['seen_queries']} "
             f"queries). {gate['confidence']:.0%} intervals of new - last from a bootstrap over classes "
             f"({gate['resamples']} resamples, seed {gate['seed']}); a figure fails when its whole interval is "
             f"below -{gate['tolerance']}.", "",
             "| figure | new | last release | new - last | interval |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {f['new']:.4f} | {f['last']:.4f} | {f['new_minus_last']:+.4f} | "
              f"[{f['low']:+.4f}, {f['high']:+.4f}] |" for name, f in gate["figures"].items()]
    return lines + [""] + [f"- warning: {w}" for w in gate.get("warnings", [])] + [""]


def changes_section(against: str | None) -> list[str]:
    if not against:
        return ["## Changes", "", "First release: nothing to compare with.", ""]
    return [f"## Changes since {against}", "", "### Params", "", _dvc("params", "diff", against, "--md")
            or "no param changes", "", "### Metrics", "", _dvc("metrics", "diff", against, "--md")
            or "no metric changes", ""]


def images_section(out: Path) -> list[str]:
    lines = []
    curves = out.parent / "report_train_curves.png"
    if training_curves(Path("dvclive"), curves):
        lines += ["## Training", "", f"![training curves]({curves.name})", ""]
    grid = Path("reports/eval/retrieval_grid.png")
    if grid.exists():
        rel = Path("eval/retrieval_grid.png") if out.parent == Path("reports") else grid
        lines += ["## Retrieval examples", "", "Query sketches (left) with their top-10 gallery images; green = "
                  "same class, red = wrong.", "", f"![retrieval grid]({rel.as_posix()})", ""]
    return lines


def serve_check_section(check: dict | None) -> list[str]:
    if not check:
        return []
    return ["## Serve check", "", f"- passed: {check.get('passed')}; parity top-10: {check.get('parity_top10')}; "
            f"errors: {check.get('errors')} of {check.get('requests')} requests",
            f"- latency p50 {check.get('latency_ms_p50')} ms, p95 {check.get('latency_ms_p95')} ms; "
            f"ready in {check.get('ready_seconds')} s", ""]


def deploy_section(dep: dict | None) -> list[str]:
    if not dep:
        return []
    lines = ["## Deploy", ""]
    if not dep.get("targets"):
        lines.append(f"- {dep.get('message', 'no targets')}")
    for t in dep.get("targets", []):
        lines.append(f"- {t['target']}: {t['status']}"
                     + (f" ({t.get('bytes_sent', 0):,} bytes)" if t.get("bytes_sent") else "")
                     + (f" — {t['error']}" if t.get("error") else ""))
    return lines + [""]
