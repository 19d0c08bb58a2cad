"""The inference path, sketch or image -> embedding: extractor CNN (+ projection), the feature normalisation
training used, then the SEM-PCYC generator. One implementation for evaluation, the gallery stage, the TorchServe
handler and the benchmarks; `bundle_state` is what models/sem_pcyc.pt holds.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .backbones import Extractor, to_input
from .model import Config, SemPcyc


class FeatureNorm(nn.Module):
    """The feature normalisation training used (train.feature_norm), applied identically at inference."""

    def __init__(self, kind: str, dim: int):
        super().__init__()
        self.kind = kind
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def fit(self, feats: np.ndarray) -> FeatureNorm:
        if self.kind == "standardize":
            self.mean.copy_(torch.from_numpy(feats.mean(0)))
            self.std.copy_(torch.from_numpy(feats.std(0) + 1e-6))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "standardize":
            return (x - self.mean) / self.std
        if self.kind == "l2":
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
        self.sketch_norm = FeatureNorm(meta.get("feature_norm", "none"), cfg.feat_dim)
        self.image_norm = FeatureNorm(meta.get("feature_norm", "none"), cfg.feat_dim)
        self.invert_sketch = bool(meta["invert_sketch"])
        self.size = int(meta["size"])

    def embed_sketches(self, sketches_uint8: torch.Tensor) -> torch.Tensor:
        feats = self.sketch_extractor(to_input(sketches_uint8, self.invert_sketch))
        return self.gen_sk2se(self.sketch_norm(feats))

    def embed_images(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return self.gen_im2se(self.image_norm(self.image_extractor(to_input(images_uint8, False))))

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> Encoder:
        bundle = torch.load(path, map_location=device, weights_only=True)
        enc = cls(bundle["meta"], Config(**bundle["config"]))
        enc.sketch_extractor.load_state_dict(bundle["sketch_extractor"])
        enc.image_extractor.load_state_dict(bundle["image_extractor"])
        enc.gen_sk2se.load_state_dict(bundle["gen_sk2se"])
        enc.gen_im2se.load_state_dict(bundle["gen_im2se"])
        enc.sketch_norm.load_state_dict(bundle["sketch_norm"])
        enc.image_norm.load_state_dict(bundle["image_norm"])
        return enc.to(device).eval()


def bundle_state(meta: dict, cfg: Config, extractors: dict, norms: dict, model: SemPcyc) -> dict:
    """What models/sem_pcyc.pt holds: plain tensors and plain Python values (loads with weights_only=True)."""
    return {"format": "sem-pcyc-bundle/1", "meta": meta, "config": cfg.to_dict(),
            "sketch_extractor": extractors["sketch_extractor"], "image_extractor": extractors["image_extractor"],
            "sketch_norm": norms["sketch"].state_dict(), "image_norm": norms["image"].state_dict(),
            "gen_sk2se": model.gen_sk2se.state_dict(), "gen_im2se": model.gen_im2se.state_dict()}
