"""The inference path, sketch or image -> embedding: extractor CNN (+ projection) then the SEM-PCYC generator.

One implementation for the features stage, evaluation, the gallery stage, the TorchServe handler and the
benchmarks. Imports only its siblings backbones and model (relatively), so the archive can ship these files as a
small package of their own.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .backbones import build_backbone, to_input
from .model import Config, SemPcyc


class Extractor(nn.Module):
    """f_sk or f_im: a backbone's pooled features, optionally projected to `dim` (the fine-tuned head)."""

    def __init__(self, backbone: str, dim: int | None, pretrained: bool = True, weights_path: str | None = None):
        super().__init__()
        self.backbone = build_backbone(backbone, pretrained=pretrained, weights_path=weights_path)
        n = self.backbone.num_features
        self.proj = nn.Linear(n, dim) if dim else nn.Identity()
        self.out_dim = dim or n

    def forward(self, x_0_255: torch.Tensor) -> torch.Tensor:
        return self.proj(self.backbone.forward_features(self.backbone.normalize(x_0_255)))


def batched(fn, arrays: np.ndarray, batch_size: int, device: str = "cpu", progress=None) -> np.ndarray:
    """Apply `fn` (uint8 tensor batch -> float tensor) over a uint8 array in batches, without gradients."""
    outs = []
    with torch.inference_mode():
        for start in range(0, len(arrays), batch_size):
            chunk = torch.from_numpy(np.array(arrays[start:start + batch_size])).to(device)  # writable copy
            outs.append(fn(chunk).float().cpu().numpy())
            if progress is not None:
                progress.update(len(chunk))
    if not outs:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(outs).astype(np.float32)


class FeatureNorm(nn.Module):
    """The feature normalisation training used (train.feature_norm), applied identically at inference."""

    def __init__(self, kind: str, dim: int):
        super().__init__()
        self.kind = kind
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def fit(self, feats: np.ndarray) -> "FeatureNorm":
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
    def load(cls, path: str | Path, device: str = "cpu") -> "Encoder":
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
