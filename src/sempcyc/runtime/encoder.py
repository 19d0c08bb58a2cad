"""The inference path, sketch or image -> embedding: extractor CNN (+ projection), the feature normalisation
training used, then the SEM-PCYC generator. One implementation for evaluation, the gallery stage, the TorchServe
handler and the benchmarks; `bundle_state` is what models/sem_pcyc.pt holds.
"""
from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .backbones import Extractor, extract, to_input
from .model import Config, SeenPosterior, SemPcyc, fuse, with_posterior

# models/sem_pcyc.pt's image_extractor entry when it equals the sketch extractor (stored once, 19 MB saved)
SAME_EXTRACTOR = "same as sketch_extractor"


class FeatureNorm(nn.Module):
    """The feature normalisation training used (train.feature_norm), applied identically at inference: none;
    standardize (per-coordinate mean and std of the training classes); l2 (onto the sphere of radius sqrt(dim));
    centre (the training classes' mean removed, then l2: per domain, this takes away the sketch/photo offset),
    optionally projected first onto `out_dim` principal directions shared by both domains (train.feature_dim)."""

    def __init__(self, kind: str, dim: int, out_dim: int | None = None):
        super().__init__()
        self.kind = kind
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        if out_dim:
            self.register_buffer("basis", torch.eye(dim, out_dim))

    def fit(self, feats: np.ndarray, basis: np.ndarray | None = None) -> FeatureNorm:
        if self.kind in ("standardize", "centre"):
            self.mean.copy_(torch.from_numpy(feats.mean(0)))
        if self.kind == "standardize":
            self.std.copy_(torch.from_numpy(feats.std(0) + 1e-6))
        if basis is not None:
            self.basis.copy_(torch.from_numpy(basis))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "standardize":
            return (x - self.mean) / self.std
        if self.kind in ("l2", "centre"):
            x = x - self.mean if self.kind == "centre" else x
            x = x @ self.basis if hasattr(self, "basis") else x
            return nn.functional.normalize(x, dim=-1) * x.shape[-1] ** 0.5
        return x


class Encoder(nn.Module):
    """Everything a query or gallery item goes through, loaded from models/sem_pcyc.pt."""

    def __init__(self, meta: dict, cfg: Config):
        super().__init__()
        self.meta = meta
        self.sketch_extractor = Extractor(meta["backbone"], meta["feature_proj_dim"], pretrained=False)
        self.image_extractor = Extractor(meta["backbone"], meta["feature_proj_dim"], pretrained=False)
        model = SemPcyc(cfg)
        self.gen_sk2se, self.gen_im2se = model.gen_sk2se, model.gen_im2se
        self.cfg = cfg
        self.posterior: SeenPosterior | None = None
        kind, pca = meta.get("feature_norm", "none"), meta.get("feature_pca_dim")
        self.sketch_norm = FeatureNorm(kind, meta["feat_dim"], pca)
        self.image_norm = FeatureNorm(kind, meta["feat_dim"], pca)
        self.invert_sketch = bool(meta["invert_sketch"])
        self.photo_edges = bool(meta["photo_edges"])
        self.thicken = int(meta.get("thicken_lines", 1))  # bundles from before it drew lines as they came
        self.size = int(meta["size"])
        self.channels_last = False

    def embed_sketches(self, sketches_uint8: torch.Tensor) -> torch.Tensor:
        x = to_input(sketches_uint8, self.invert_sketch, self.thicken)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.embed_sketch_features(self.sketch_extractor(x))

    def freeze_sketch_path(self) -> Encoder:
        """Serve sketches through a frozen TorchScript trace of the extractor in channels-last memory (BatchNorm
        folded into the convolutions): 1.5x faster for one sketch on one CPU thread than eager mode (measured
        9.3 vs 14.5 ms, efficientnet_lite0 at 128 px), embeddings equal within 1e-5. Two warm-up calls let TorchScript's
        profiling passes run before the first request does."""
        if self.channels_last:
            return self  # already frozen (another SketchSearch over the same encoder)
        example = torch.zeros(1, 3, self.size, self.size).contiguous(memory_format=torch.channels_last)
        module = copy.deepcopy(self.sketch_extractor).eval().to(memory_format=torch.channels_last)
        with torch.inference_mode(), warnings.catch_warnings():
            # TorchScript is marked deprecated in favour of torch.compile, which needs a C++ toolchain and tens of
            # seconds per worker start; with torch pinned, the trace is the cheap way to this speed-up
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
            # the TF-"same" paddings become constants of the trace: right, as every sketch arrives size x size
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            frozen = torch.jit.freeze(torch.jit.trace(module, example))
            frozen(example)
            frozen(example)
        self.sketch_extractor, self.channels_last = frozen, True
        return self

    def embed_images(self, images_uint8: torch.Tensor) -> torch.Tensor:
        features = extract(self.image_extractor, images_uint8, self.invert_sketch, self.photo_edges,
                           self.thicken)
        return self.embed_image_features(features)

    def embed_sketch_features(self, features: torch.Tensor) -> torch.Tensor:
        """The embedding of sketch-extractor features: embed_sketches after its CNN (evaluate feeds it the
        baseline's backbone features when the extractor is that backbone, rather than running the CNN twice)."""
        a = self.sketch_norm(features)
        return with_posterior(fuse(a, self.gen_sk2se(a), self.cfg.embed_skip), a, self.posterior, self.cfg)

    def embed_image_features(self, features: torch.Tensor) -> torch.Tensor:
        """The embedding of image-extractor features: embed_images after its CNN."""
        b = self.image_norm(features)
        return with_posterior(fuse(b, self.gen_im2se(b), self.cfg.embed_skip), b, self.posterior, self.cfg)

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> Encoder:
        return cls.from_bundle(torch.load(path, map_location=device, weights_only=True), device)

    @classmethod
    def from_bundle(cls, bundle: dict, device: str = "cpu") -> Encoder:
        """The Encoder of a loaded models/sem_pcyc.pt (bundle_state's dict), for callers that read more of it."""
        enc = cls(bundle["meta"], Config(**bundle["config"]))
        enc.sketch_extractor.load_state_dict(bundle["sketch_extractor"])
        if bundle["image_extractor"] == SAME_EXTRACTOR:
            enc.image_extractor = enc.sketch_extractor  # one module: half the weights in a serving worker
        else:
            enc.image_extractor.load_state_dict(bundle["image_extractor"])
        enc.gen_sk2se.load_state_dict(bundle["gen_sk2se"])
        enc.gen_im2se.load_state_dict(bundle["gen_im2se"])
        enc.sketch_norm.load_state_dict(bundle["sketch_norm"])
        enc.image_norm.load_state_dict(bundle["image_norm"])
        if "posterior" in bundle:  # bundles from before the seen-class posterior have none
            state = bundle["posterior"]
            weight, empty = state["linear.weight"], torch.zeros(0, 0)  # bundles from before a part lack its key
            semantics, projection = state.get("semantics", empty), state.get("projection", empty)
            enc.posterior = SeenPosterior(weight.shape[1], weight.shape[0], semantics.shape[1] if semantics.numel()
                                          else 0, projection.shape[1] if projection.numel() else 0)
            state = {**state, "semantics": semantics, "projection": projection}
            enc.posterior.load_state_dict(state)
        return enc.to(device).eval()


def bundle_state(meta: dict, cfg: Config, extractors: dict, norms: dict, model: SemPcyc,
                 baseline_norms: dict | None = None) -> dict:
    """What models/sem_pcyc.pt holds: plain tensors and plain Python values (loads with weights_only=True).
    Equal extractors (one backbone for both domains: frozen, or with shared tuned blocks) are stored once.
    `baseline_norms` (tuned blocks only): the input normalisation fitted on the untuned backbone's features, for
    evaluate's model-input baseline; serving never reads it."""
    sketch, image = extractors["sketch_extractor"], extractors["image_extractor"]
    same = sketch.keys() == image.keys() and all(torch.equal(sketch[k], image[k]) for k in sketch)
    return {"format": "sem-pcyc-bundle/1", "meta": meta, "config": cfg.to_dict(),
            "sketch_extractor": sketch, "image_extractor": SAME_EXTRACTOR if same else image,
            "sketch_norm": norms["sketch"].state_dict(), "image_norm": norms["image"].state_dict(),
            "gen_sk2se": model.gen_sk2se.state_dict(), "gen_im2se": model.gen_im2se.state_dict(),
            **({"posterior": model.posterior.state_dict()} if model.posterior is not None else {}),
            **({"baseline_norms": {d: n.state_dict() for d, n in baseline_norms.items()}} if baseline_norms else {})}
