"""The tiny dataset and pipeline settings the tests and benches build in a few seconds: 12 classes of small drawn
PNGs (a coloured ellipse per image, a black outline per sketch) in a deterministic tar, and a repository's
params.yaml with small data, a tiny CNN and few iterations. Test and bench infrastructure (see __init__.py)."""
from __future__ import annotations

import copy
import io
import tarfile
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw

# 12 classes whose letter sums differ, so class_files() draws different pictures for each; with the default salt
# and test_fraction 0.2 the hash split puts 3 of them (bear, dog, guitar) on the unseen side.
CLASSES = ["apple", "bear", "car", "dog", "egg", "fish", "guitar", "house", "igloo", "kite", "moon", "owl"]
PER_CLASS = 4
SALT, TEST_FRACTION = "sem-pcyc", 0.2

# The tiny pipeline: the repository's params.yaml (every setting) with small data, a tiny CNN and few iterations.
TINY = {
    "data": {"tar": "ds.tar"},
    "split": {"test_fraction": TEST_FRACTION, "val_fraction": 0.15, "salt": SALT, "test_classes_file": ""},
    "prepare": {"size": 32},
    "model": {"backbone": "tiny", "backbone_weights": "", "invert_sketch": True, "photo_edges": True,
              "thicken_lines": 3, "dim_out": 16,
              "preset": "tuned", "overrides": {}},
    "features": {"tune_blocks": 0, "epochs": 1, "lr": 0.0001, "head_lr": 0.001, "batch_size": 8, "proj_dim": 24,
                 "seed": 0},
    "train": {"device": "cpu", "epochs": 2, "iters_per_epoch": 3, "batch_size": 8, "lr": 0.0001, "milestones": [],
              "gamma": 0.1, "patience": 5, "feature_norm": "standardize", "feature_dim": 0, "feature_whiten": 0.0,
              "feature_noise": 0.0, "threads": 1, "seed": 0},
    "evaluate": {"seed": 0, "grid_queries": 3},
    "gallery": {"batch_size": 16},
}


def merged(base: dict, overrides: dict) -> dict:
    """`base` with `overrides` merged in, section by section (a deep copy; neither is changed)."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and value:
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def tiny_params(params_file: Path) -> dict:
    """The tiny pipeline's params: every setting of `params_file` (a repository's params.yaml) with TINY's."""
    return merged(yaml.safe_load(params_file.read_text(encoding="utf-8")), TINY)


def png_bytes(seed: int, size: int = 48, mode: str = "RGB") -> bytes:
    """A small image that differs per seed: a coloured ellipse (image) or a black outline (sketch)."""
    rng = np.random.default_rng(seed)
    if mode == "L":
        img = Image.new("L", (size, size), 255)
        ImageDraw.Draw(img).ellipse(sketch_box(seed, size), outline=0, width=2)
    else:
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        img = Image.new("RGB", (size, size), (255, 255, 255))
        ImageDraw.Draw(img).ellipse([4, 4, size - int(rng.integers(5, 20)), size - 4], fill=colour)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def sketch_box(seed: int, size: int = 48) -> list[int]:
    """The bounding box [x0, y0, x1, y1] of the ellipse outline png_bytes(seed, size, mode="L") draws (2 px wide)."""
    rng = np.random.default_rng(seed)
    xs, ys = sorted(rng.integers(2, size - 2, 2)), sorted(rng.integers(2, size - 2, 2))
    return [int(xs[0]), int(ys[0]), int(xs[1]) + 1, int(ys[1]) + 1]


def class_files(classes: dict[str, tuple[int, int]], seed: int = 0) -> dict[str, bytes]:
    """{member path: bytes} for classes -> (n_images, n_sketches), under top folder 'ds'."""
    files = {}
    for cls, (n_img, n_sk) in sorted(classes.items()):
        base = sum(map(ord, cls)) * 100 + seed
        for i in range(n_img):
            files[f"ds/images/{cls}/{i:03d}.png"] = png_bytes(base + i)
        for i in range(n_sk):
            files[f"ds/sketches/{cls}/{i:03d}.png"] = png_bytes(base + 50 + i, mode="L")
    return files


def write_tar(path: Path, files: dict[str, bytes], extra: list[tarfile.TarInfo] | None = None,
              dirs: list[str] = ()) -> Path:
    """A deterministic tar of `files`; `extra` adds hand-made members (links, devices, ...)."""
    with tarfile.open(path, "w") as tar:
        for name in dirs:
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
        for info in extra or []:
            tar.addfile(info)
    return path
