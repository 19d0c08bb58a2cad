"""SEM-PCYC training throughput (pairs/s): cached extractor features (the train stage's path) against recomputing
the frozen extractor features of every batch's sketches and images (what the original code did), same SEM-PCYC step.

cached     `train.Trainer.run_epoch`: class-balanced pair indices -> rows of the cached (normalised) features ->
           `model.train_step`.
recompute  the same sampler and `model.train_step`, but each batch's sketches and images (uint8 arrays from
           data/prepared/train, already in memory) go through the frozen sketch / image extractors first
           (no gradients, eval mode), then the same feature normalisation. Image decoding and disk reads, which the
           original also paid per batch, are left out, so this is a lower bound on its cost.

Both use the default train settings (params.yaml) and the features stage's extractors; one warm-up step each is
not timed. Prints pairs/s for both and their ratio.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import tqdm as _tqdm


class _QuietTqdm(_tqdm.tqdm):
    """The stages' progress bars, always disabled (train.py passes disable= explicitly, so TQDM_DISABLE would not
    reach them); this script prints its own progress. A subclass, not a function: libraries imported with the
    stages (dvc, via dvclive) call tqdm's class methods."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{**kwargs, "disable": True})


_tqdm.tqdm = _QuietTqdm

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import REPO  # noqa: E402
from sempcyc import params as params_mod  # noqa: E402
from sempcyc.runtime.backbones import Extractor, to_input  # noqa: E402
from sempcyc.runtime.model import train_step  # noqa: E402
from sempcyc.shards import load_train_shard  # noqa: E402
from sempcyc.stages import train  # noqa: E402

TRAIN_DIR = REPO / "data" / "prepared" / "train"


def default_features() -> Path:
    return REPO / "models" / "features"


def cached_rate(s: train.TrainRun, data: dict, steps: int) -> float:
    """Pairs/s of the train stage's loop on cached features (`Trainer.run_epoch`, iters_per_epoch = the number
    of timed steps), after a warm-up epoch of 2 steps (allocations, first-call overheads)."""
    trainer = train.Trainer(data, replace(s, iters_per_epoch=2))
    trainer.run_epoch()
    trainer.s = replace(trainer.s, iters_per_epoch=steps)
    trainer.pairs = 0
    t = time.perf_counter()
    trainer.run_epoch()
    return trainer.pairs / (time.perf_counter() - t)


def frozen_extractors(data: dict) -> dict[str, Extractor]:
    """The features stage's sketch and image extractors, in eval mode and without gradients."""
    meta, bundle = data["meta"], data["extractors"]
    extractors = {}
    for domain in ("sketch", "image"):
        ex = Extractor(meta["backbone"], meta["feature_proj_dim"], pretrained=False)
        ex.load_state_dict(bundle[f"{domain}_extractor"])
        extractors[domain] = ex.eval().requires_grad_(False)
    return extractors


def recompute_step_fn(s: train.TrainRun, data: dict, batch_size: int):
    """A function doing one SEM-PCYC step on features recomputed from the batch's uint8 sketches and images;
    it returns (extractor seconds, SEM-PCYC step seconds)."""
    shard = load_train_shard(TRAIN_DIR)
    classes, fit = shard["classes"], set(data["fit_classes"])
    sk_rows = np.flatnonzero([classes[c] in fit for c in shard["sketches_labels"]])  # fit_sk row i = shard row
    im_rows = np.flatnonzero([classes[c] in fit for c in shard["images_labels"]])    # sk_rows[i], as in train
    sketches, images = np.asarray(shard["sketches"]), np.asarray(shard["images"])  # in RAM: no disk in the timing
    extractors, norms = frozen_extractors(data), data["norms"]
    trainer = train.Trainer(data, s)
    invert, thicken = bool(data["meta"]["invert_sketch"]), int(data["meta"].get("thicken_lines", 1))

    def recompute_step() -> tuple[float, float]:
        sk_i, im_i, y = trainer.sampler.batch(batch_size)
        t0 = time.perf_counter()
        with torch.no_grad():
            sk_in = to_input(torch.from_numpy(sketches[sk_rows[sk_i]]), invert, thicken)
            a = norms["sketch"](extractors["sketch"](sk_in))
            b = norms["image"](extractors["image"](to_input(torch.from_numpy(images[im_rows[im_i]]), False, thicken)))
        t1 = time.perf_counter()
        yt = torch.from_numpy(y).long()
        train_step(trainer.model, trainer.opts, a, b, trainer.fit_sem, yt, net=trainer.net)
        return t1 - t0, time.perf_counter() - t1

    return recompute_step


def recompute_rate(args, s: train.TrainRun, data: dict) -> float:
    """Pairs/s when the frozen extractors run on every batch's raw sketches and images before the same step
    (one untimed warm-up step); prints the split between extractors and SEM-PCYC step."""
    recompute_step = recompute_step_fn(s, data, args.batch_size)
    recompute_step()                                          # warm-up
    cnn = sem = 0.0
    t = time.perf_counter()
    for _ in range(args.recompute_steps):
        c, m = recompute_step()
        cnn, sem = cnn + c, sem + m
    elapsed = time.perf_counter() - t
    recompute = args.recompute_steps * args.batch_size / elapsed
    print(f"recompute features: {recompute:8.1f} pairs/s  ({args.recompute_steps} steps of {args.batch_size}; "
          f"per step {elapsed / args.recompute_steps:.2f} s: extractors {cnn / args.recompute_steps:.2f} s, "
          f"SEM-PCYC step {sem / args.recompute_steps:.3f} s)", flush=True)
    return recompute


def measure(args, s: train.TrainRun, data: dict, features_dir: Path) -> dict:
    meta = data["meta"]
    print(f"throughput: {features_dir} ({meta['backbone']}, {meta['feat_dim']}-d, fine-tuned "
          f"{meta['finetune_epochs']} epochs); preset {s.preset}, D={s.dim_out}, batch {args.batch_size} pairs, "
          f"{torch.get_num_threads()} torch threads on {os.cpu_count()} CPUs", flush=True)
    cached = cached_rate(s, data, args.cached_steps)
    print(f"cached features:   {cached:9.1f} pairs/s  ({args.cached_steps} steps of {args.batch_size})", flush=True)
    recompute = recompute_rate(args, s, data)
    print(f"ratio cached / recompute: {cached / recompute:.0f}x", flush=True)
    epoch_pairs = s.iters_per_epoch * args.batch_size
    print(f"one train epoch ({s.iters_per_epoch} steps x {args.batch_size} pairs): cached "
          f"{epoch_pairs / cached:.1f} s, recompute {epoch_pairs / recompute:.0f} s", flush=True)
    return {"cached": cached, "recompute": recompute}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", default=None, help="features stage output (default: models/features)")
    ap.add_argument("--batch-size", type=int, default=128, help="pairs per step, both paths (default: %(default)s)")
    ap.add_argument("--cached-steps", type=int, default=20,
                    help="timed steps on cached features (default: %(default)s)")
    ap.add_argument("--recompute-steps", type=int, default=3,
                    help="timed steps recomputing extractor features (default: %(default)s)")
    ap.add_argument("--threads", default="1",
                    help="torch thread counts to measure, comma-separated, 0 = torch's default (default: "
                    "%(default)s; on 2 cores shared with other jobs 2 threads measured 10-100x slower than 1: "
                    "the OpenMP workers wait on each other for every small op)")
    args = ap.parse_args(argv)
    features_dir = Path(args.features) if args.features else default_features()

    s = train.read_settings(params_mod.load(REPO / "params.yaml"), str(REPO / "params.yaml"))
    s = replace(s, device="cpu", batch_size=args.batch_size)
    data = train.load_training_data(features_dir, TRAIN_DIR, s)
    results = {}
    torch_default = torch.get_num_threads()
    for n in [int(x) for x in args.threads.split(",") if x.strip()]:
        torch.set_num_threads(n or torch_default)
        results[torch.get_num_threads()] = measure(args, s, data, features_dir)
    if len(results) > 1:
        (n1, r1), *rest = sorted(results.items())
        for n, r in rest:
            print(f"threads {n} vs {n1}: cached {r['cached'] / r1['cached']:.2f}x, recompute "
                  f"{r['recompute'] / r1['recompute']:.2f}x the pairs/s", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f} (1 min) on {os.cpu_count()} CPUs", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
