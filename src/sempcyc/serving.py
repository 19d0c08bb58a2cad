"""What the stages that build, check, serve and deploy the archive share: the `release` and `serve` params
sections, TorchServe's model configuration, the response check and ranking comparison used by serve-check and
deploy's smoke query, the query sketches they send, and the config.properties parser.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from .errors import UserError
from .params import setting

SEMVER = re.compile(r"^\d+\.\d+\.\d+([.-][0-9A-Za-z.-]+)?$")
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-]*")


@dataclass(frozen=True)
class ReleaseSettings:
    SECTION: ClassVar[str] = "release"
    model_name: str = setting()
    version: str = setting()
    gate_tolerance: float = setting(min=0.0)
    gate_confidence: float = setting(above=0.5, max=0.999)
    gate_resamples: int = setting(min=100)
    gate_seed: int = setting()

    def __post_init__(self):
        if not MODEL_NAME.fullmatch(self.model_name):
            raise UserError(f"params.yaml: release.model_name must be letters, digits, '_' or '-', "
                            f"got {self.model_name!r}")
        if not SEMVER.match(self.version):
            raise UserError(f"params.yaml: release.version must look like 1.2.3, got {self.version!r}")


@dataclass(frozen=True)
class ServeSettings:
    SECTION: ClassVar[str] = "serve"
    top_k: int = setting(min=1, max=10_000)
    workers: int = setting(min=1)
    max_pixels: int = setting(min=10_000)
    queue_size: int = setting(min=8)
    threads: int = setting(min=0)
    batch_size: int = setting(min=1, max=256)
    max_batch_delay_ms: int = setting(min=0)
    check_requests: int = setting(min=8)
    ann_nprobe: int = setting(min=1)
    ann_rerank: int = setting(min=1)
    ann_min_recall: float = setting(min=0.0, max=1.0)
    ready_timeout_s: int = setting(min=5)


def models_config(model_name: str, version: str, mar_name: str, batch_size: int, max_batch_delay_ms: int,
                  workers: int = 1) -> dict:
    """TorchServe's `models` config: the archive as the default version, with batching."""
    return {model_name: {version: {"defaultVersion": True, "marName": mar_name, "minWorkers": workers,
                                   "maxWorkers": workers, "batchSize": batch_size,
                                   "maxBatchDelay": max_batch_delay_ms, "responseTimeout": 120}}}


def same_ranking(served: list[dict], offline: list[dict], tol: float = 1e-5) -> bool:
    """Equal image lists, where neighbours whose scores differ by less than `tol` may swap (float noise
    between batched and single inference can reorder exact ties, never real differences)."""
    if len(served) != len(offline):
        return False
    if [r["image"] for r in served] == [r["image"] for r in offline]:
        return True
    if sorted(r["image"] for r in served) != sorted(r["image"] for r in offline):
        return False
    score = {r["image"]: r["score"] for r in offline}
    return all(abs(score[s["image"]] - o["score"]) < tol for s, o in zip(served, offline))


def check_response(status: int, body: bytes, k: int) -> str | None:
    """None when `body` is a valid answer of k items; else what is wrong."""
    if status != 200:
        return f"status {status}: {body[:200]!r}"
    try:
        items = json.loads(body)
    except json.JSONDecodeError:
        return f"not JSON: {body[:200]!r}"
    if not isinstance(items, list) or len(items) != k:
        got = f"{type(items).__name__} of {len(items) if isinstance(items, list) else '?'}"
        return f"expected a list of {k} items, got {got}"
    for item in items:
        if not (isinstance(item, dict) and isinstance(item.get("image"), str) and isinstance(item.get("class"), str)
                and isinstance(item.get("score"), float)):
            return f"bad item {item!r}"
    scores = [i["score"] for i in items]
    if scores != sorted(scores, reverse=True):
        return "items are not sorted best first"
    return None


def pick_queries(dataset: Path, splits: Path, per_class: int = 2) -> list[tuple[str, bytes]]:
    """(name, bytes) of the first sketches of every unseen class: queries whose answers a check can compare."""
    try:
        unseen = json.loads(splits.read_text(encoding="utf-8"))["test"]
    except FileNotFoundError:
        raise UserError(f"{splits}: not found; run `dvc repro prepare`") from None
    queries = []
    for cls in unseen:
        files = sorted((dataset / "sketches" / cls).glob("*"))[:per_class]
        queries += [(f"{cls}/{f.name}", f.read_bytes()) for f in files]
    if not queries:
        raise UserError(f"no sketches of unseen classes under {dataset}/sketches; run `dvc repro extract`")
    return queries


def parse_properties(text: str) -> dict:
    """key=value lines of a TorchServe config.properties (comments skipped)."""
    props = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props
