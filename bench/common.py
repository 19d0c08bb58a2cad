"""What several benches share. Each bench imports it by its bare name: `python bench/x.py` puts bench/ first on
sys.path, and the benches run on the installed sempcyc package (no sys.path edits).

  REPO         this checkout (its params.yaml, models/, data/)
  Host         a TorchServe serving host made from this checkout's docs/hosts.md and params.yaml
               (sempcyc.testing.hosts; deploy, gallery_deploy, release)
  Mixture      clustered synthetic embeddings, L2-normalised like the model's (index, gallery_neighbours,
               search_scale, served_scale)
  measure      requests/s and latencies of an archive served by a private TorchServe (serving, served_scale)
  demo_tars    the demo tar, and the same with three unseen catalogue classes added (pipeline, release)
"""
from __future__ import annotations

import http.client
import io
import os
import shutil
import tarfile
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from sempcyc import params as params_mod
from sempcyc.datasets import demo as demo_data
from sempcyc.datasets.demo import DemoParams, EmojiClass
from sempcyc.serving import ReleaseSettings, check_response, models_config
from sempcyc.split import SplitSettings, hash_unit
from sempcyc.testing import hosts
from sempcyc.torchserve import TorchServe

REPO = Path(__file__).resolve().parents[1]


class Host(hosts.Host):
    """A serving host made from this checkout's docs/hosts.md and params.yaml (sempcyc.testing.hosts.Host)."""

    def __init__(self, root: Path, token_auth: bool = False, extra: dict | None = None):
        super().__init__(root, REPO, token_auth, extra)


# ------------------------------------------------------------------------------- clustered synthetic embeddings

BLOCK = 100_000  # rows generated at a time: bounded temporaries at a million items


class Mixture:
    """Class-like clusters: centres on the sphere, sizes from a log-normal, per-cluster spread."""

    def __init__(self, dim: int, clusters: int, spread: float, uniform: bool, seed: int, groups: tuple):
        rng = np.random.default_rng(seed)
        self.dim, self.uniform = dim, uniform
        self.centres = _normalised(rng.standard_normal((clusters, dim), dtype=np.float32))
        count, group_spread = groups
        if count:  # classes in groups of look-alikes (cat, dog, fox): centres scattered around a group centre
            group = _normalised(rng.standard_normal((count, dim), dtype=np.float32))[rng.integers(0, count, clusters)]
            self.centres = _normalised(group + group_spread * self.centres)
        weights = rng.lognormal(0.0, 0.5, clusters)
        self.weights = weights / weights.sum()
        self.spreads = (spread * rng.uniform(0.75, 1.25, clusters)).astype(np.float32)

    def draw(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """n unit vectors and each one's cluster (-1 for uniform directions)."""
        rng = np.random.default_rng(seed)
        out = np.empty((n, self.dim), dtype=np.float32)
        labels = np.full(n, -1, dtype=np.int64)
        for start in range(0, n, BLOCK):
            m = min(BLOCK, n - start)
            noise = rng.standard_normal((m, self.dim), dtype=np.float32)
            if self.uniform:
                out[start:start + m] = _normalised(noise)
                continue
            label = labels[start:start + m] = rng.choice(len(self.centres), size=m, p=self.weights)
            noise *= (self.spreads[label] / np.sqrt(self.dim))[:, None]
            out[start:start + m] = _normalised(self.centres[label] + noise)
        return out, labels


def _normalised(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# ----------------------------------------------------------------------------- HTTP load on a served archive

def client_loop(host: str, port: int, path: str, bodies: list[bytes], counter: list, out: list, k: int) -> None:
    """Send requests on one keep-alive connection until the shared counter runs out."""
    conn = http.client.HTTPConnection(host, port, timeout=120)
    while True:
        with counter[1]:
            if counter[0] <= 0:
                break
            counter[0] -= 1
            i = counter[0]
        t0 = time.perf_counter()
        conn.request("POST", path, body=bodies[i % len(bodies)], headers={"Content-Type": "image/png"})
        resp = conn.getresponse()
        answer = resp.read()
        out.append((time.perf_counter() - t0) * 1000)
        problem = check_response(resp.status, answer, k)
        if problem:
            raise SystemExit(f"bad answer under load: {problem}")
    conn.close()


def load(url: str, path: str, bodies: list[bytes], clients: int, n_requests: int, k: int) -> tuple[float, list]:
    """(requests/s, latencies ms) of n_requests sent by `clients` threads."""
    host, port = url.split("//")[1].split(":")
    counter, latencies = [n_requests, threading.Lock()], []
    threads = [threading.Thread(target=client_loop, args=(host, int(port), path, bodies, counter, latencies, k))
               for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return n_requests / (time.perf_counter() - t0), latencies


def measure(cfg: dict, mar: Path, release: ReleaseSettings, bodies: list[bytes], n_requests: int, k: int,
            inspect=None) -> dict:
    """The three load levels on a private TorchServe of `mar` with `cfg`. `inspect(ts, before)`, when given, runs
    before them (before=None) and after them (before: what the first call returned), the instance up, and the
    second call's dict joins the result (e.g. the workers' memory and CPU time)."""
    with tempfile.TemporaryDirectory(prefix="sem-pcyc-bench-serving-") as tmp:
        store = Path(tmp) / "store"
        store.mkdir()
        shutil.copy2(mar, store / mar.name)
        models = models_config(release.model_name, release.version, mar.name, cfg["batch"], cfg["delay"],
                               workers=cfg["workers"])
        os.environ["SEM_PCYC_THREADS"] = str(cfg["threads"])  # the handler's per-worker torch threads
        with TorchServe(store, models, workdir=Path(tmp) / "ts") as ts:
            ts.wait_ready(release.model_name, 180)
            path = f"/predictions/{release.model_name}"
            load(ts.inference_url, path, bodies, 2 * cfg["workers"], 8 * cfg["workers"], k)  # warm every worker
            before = inspect(ts, None) if inspect else None
            _, one = load(ts.inference_url, path, bodies, 1, n_requests // 3, k)
            rps8, lat8 = load(ts.inference_url, path, bodies, 8, n_requests, k)
            rps32, lat32 = load(ts.inference_url, path, bodies, 32, n_requests, k)
            extra = inspect(ts, before) if inspect else {}
    return {"p50_1": np.percentile(one, 50), "p95_1": np.percentile(one, 95), "rps8": rps8,
            "p50_8": np.percentile(lat8, 50), "rps32": rps32, "p50_32": np.percentile(lat32, 50),
            "requests": len(one) + 2 * n_requests, **extra}


# -------------------------------------------------------------------------------------------------- demo tars

def split_tar(big: bytes, base_names: set[str], keep: set[str]) -> tuple[bytes, bytes]:
    """Two tars from the demo tar `big`: its files of the classes in `base_names`, and of those in `keep`
    (files outside a class folder, e.g. ATTRIBUTION.md, go into both)."""
    base_tar, ext_tar = io.BytesIO(), io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(big)) as src, tarfile.open(fileobj=base_tar, mode="w") as b, \
            tarfile.open(fileobj=ext_tar, mode="w") as e:
        for member in src.getmembers():
            parts = member.name.split("/")
            cls = parts[2] if len(parts) > 3 else None
            data = src.extractfile(member).read()
            if cls is None or cls in base_names:
                b.addfile(member, io.BytesIO(data))
            if cls is None or cls in keep:
                e.addfile(member, io.BytesIO(data))
    return base_tar.getvalue(), ext_tar.getvalue()


def demo_tars(params_file: Path) -> tuple[bytes, bytes, DemoParams, list[EmojiClass]]:
    """(base tar, extended tar, demo params, added classes): base = the default demo; extended = the same files
    plus the next three catalogue classes that the hash split puts on the unseen side."""
    demo, split = params_mod.read(params_file, DemoParams, SplitSettings)
    catalogue = demo_data.available_classes()
    base_names = {c.name for c in catalogue[:demo.classes]}
    extra = [c for c in catalogue[demo.classes:] if hash_unit(c.name, split.salt) < split.test_fraction][:3]
    big, _ = demo_data.build(replace(demo, classes=catalogue.index(extra[-1]) + 1), progress=False)
    base_tar, ext_tar = split_tar(big, base_names, base_names | {c.name for c in extra})
    return base_tar, ext_tar, demo, extra
