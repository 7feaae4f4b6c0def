"""models/dense.py: the dense probability map against the crop-by-crop classifier."""
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from datasets.cryoem_preprocess import crops_at, to_original
from models.dense import (check_geometry, dilated_trunk, map_shape, probability_map, symmetric_average, tile_spans,
                          trunk_reach)
from models.fixmatch_pu import FixMatchPUModel
from utils.picking import picker as particle_picker
from utils.picking.picker import PickSettings, pick_micrograph


def _local_model(seed=0, features=6, context=0):
    """A FixMatchPUModel whose trunk sees only its own 32 x 32 block (stride 32, no padding):
    dense and crop inference must then agree to float precision."""
    torch.manual_seed(seed)
    m = FixMatchPUModel("resnet18", dropout=0.5, context=context)
    m.trunk = nn.Sequential(nn.Conv2d(1, features, 32, stride=32), nn.ReLU(), nn.Conv2d(features, features, 1))
    m.head = nn.Sequential(nn.Dropout(0.5), nn.Linear(features, 1))
    return m


@pytest.mark.parametrize("patch, stride, shape, context", [
    (32, 32, (100, 70), 0), (64, 16, (90, 131), 0), (64, 8, (77, 64), 0), (96, 32, (128, 128), 0),
    (96, 16, (100, 90), 32), (128, 8, (70, 75), 32), (160, 32, (130, 100), 64)])
def test_dense_equals_crops_for_a_local_trunk(patch, stride, shape, context):
    model = _local_model(context=context)
    model.train()  # probability_map must switch dropout off and restore the mode
    img = torch.randn(*shape)
    dense = probability_map(model, img, patch, stride, "dense")
    crops = probability_map(model, img, patch, stride, "crops", batch_size=17)
    assert dense.shape == crops.shape == map_shape(*shape, stride)
    torch.testing.assert_close(dense, crops, atol=1e-5, rtol=0)
    assert model.training


def test_crop_map_cell_is_the_classifier_on_the_patch_centred_there():
    model = _local_model(seed=1).eval()
    img = torch.randn(70, 90)
    prob = probability_map(model, img, 32, 8, "crops")
    for a, b in [(0, 0), (3, 5), (8, 11)]:  # centre pixel (row, col) = (8a, 8b)
        patch = crops_at(img, [[8 * a, 8 * b]], 32)[None]
        with torch.no_grad():
            expect = torch.sigmoid(model(patch))[0]
        assert float(prob[a, b]) == pytest.approx(float(expect), abs=1e-6)


def test_resnet_dense_map_tracks_the_crop_map():
    # a real ResNet trunk sees real neighbours densely and zero padding in a crop, so the two
    # maps differ near patch borders; on a smooth, structured image they must still rank the
    # same places high (measured: the difference is the border effect, not a shift of the grid)
    torch.manual_seed(0)
    model = FixMatchPUModel("resnet18").eval()
    yy, xx = torch.meshgrid(torch.arange(160.0), torch.arange(160.0), indexing="ij")
    img = torch.zeros(160, 160)
    for cy, cx in [(40, 40), (40, 120), (120, 80)]:
        img -= torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 80.0) * 3
    dense = probability_map(model, img, 64, 16, "dense")
    crops = probability_map(model, img, 64, 16, "crops")
    corr = np.corrcoef(dense.flatten().numpy(), crops.flatten().numpy())[0, 1]
    assert corr > 0.5
    # a one-cell misregistration of the grid would correlate far worse than the real alignment
    shifted = np.corrcoef(dense[:, 1:].flatten().numpy(), crops[:, :-1].flatten().numpy())[0, 1]
    assert corr > shifted


def test_context_pools_the_central_window_only():
    # with context 32 a 96 px input has 3 x 3 trunk features; only the centre one is pooled
    model = _local_model(context=32).eval()
    x = torch.randn(2, 1, 96, 96)
    with torch.no_grad():
        centre = model.head(model.trunk(x)[:, :, 1, 1]).squeeze(1)
        assert torch.allclose(model(x), centre, atol=1e-6)
        x2 = x.clone()
        x2[:, :, :32] = 5.0  # changing the context rows changes nothing for this local trunk
        assert torch.allclose(model(x2), centre, atol=1e-6)
    with pytest.raises(ValueError, match="multiple of 32"):
        FixMatchPUModel("resnet18", context=16)


def test_context_brings_the_resnet_dense_map_closer_to_the_crops():
    # the same random ResNet-18 weights, classifying 64 px windows: bare (64 px crops) or with
    # 32 / 64 px of context (128 / 192 px crops, central 2 x 2 features pooled). Densely, all
    # pool the same features; the crops with context see real pixels where bare ones see zero
    # padding, and with 64 px the padded feature maps of layer4 are two cells away instead of one
    torch.manual_seed(0)
    bare = FixMatchPUModel("resnet18").eval()
    models = {0: bare}
    for context in (32, 64):
        models[context] = FixMatchPUModel("resnet18", context=context).eval()
        models[context].load_state_dict(bare.state_dict())
    img = torch.randn(192, 192)
    img = torch.nn.functional.avg_pool2d(img[None, None], 5, 1, 2)[0, 0] * 4  # some spatial structure
    gaps = {}
    for context, model in models.items():
        dense = probability_map(model, img, 64 + 2 * context, 16, "dense")
        crops = probability_map(model, img, 64 + 2 * context, 16, "crops")
        gaps[context] = float(torch.logit(dense).sub(torch.logit(crops)).abs().mean())
    print(gaps)  # seed 0: about 1.81, 0.34, 0.18
    assert gaps[32] < 0.5 * gaps[0]
    assert gaps[64] < 0.7 * gaps[32]


def test_geometry_checks():
    check_geometry(128, 32)
    check_geometry(64, 8)
    with pytest.raises(ValueError, match="divisible by the trunk stride"):
        check_geometry(48, 16)
    with pytest.raises(ValueError, match="must divide the trunk stride"):
        check_geometry(64, 12)
    with pytest.raises(ValueError, match="mode must be"):
        probability_map(_local_model(), torch.zeros(40, 40), 32, 32, "sparse")


def test_picks_come_back_in_the_original_frame(monkeypatch):
    # a hand-made map with peaks at cells (row a, col b) = (3, 5) and (9, 2), map stride 8,
    # downsampling 2 of a 200 x 240 micrograph (scale 2 on both axes): the cell centres are
    # downsampled pixels (u, v) = (8b, 8a) -> original x = (u + 0.5) * 2 - 0.5
    def fake_map(model, image, patch_size, stride, mode, batch_size, max_tile=None, **options):
        assert image.shape == (100, 120) and stride == 8
        m = torch.zeros(map_shape(100, 120, 8))
        m[3, 5], m[9, 2] = 0.9, 0.7
        return m

    monkeypatch.setattr(particle_picker, "probability_map", fake_map)
    settings = PickSettings(threshold=0.5, min_distance=20, downsample=2, normalization="zscore",
                            patch_size=32, stride=8, refine=False)
    array = np.random.default_rng(0).normal(size=(200, 240)).astype(np.float32)
    picks, _, _ = pick_micrograph(None, array, settings, torch.device("cpu"), name="m.mrc")
    expect = to_original([[40, 24], [16, 72]], (2, 2))
    np.testing.assert_allclose(picks[["x", "y"]].to_numpy(), expect)
    np.testing.assert_allclose(expect, [[80.5, 48.5], [32.5, 144.5]])
    assert list(picks["score"]) == pytest.approx([0.9, 0.7]) and set(picks["micrograph"]) == {"m.mrc"}
    assert isinstance(picks, pd.DataFrame)


# ------------------------------------------------------------------------------------- tiles

def test_trunk_reach_is_the_receptive_field():
    # the local trunk sees its own 32 px block; ResNet-18's receptive field is 435 px, centred on
    # the feature's block (measured below by perturbing one input pixel)
    assert trunk_reach(_local_model().trunk) == (32, 0, 31)
    trunk = FixMatchPUModel("resnet18").trunk.eval()
    J, lo, hi = trunk_reach(trunk)
    assert (J, lo, hi) == (32, -217, 217)
    x = torch.zeros(1, 1, 640, 32)
    with torch.no_grad():
        base = trunk(x)[0, :, 10, 0]  # feature 10 <- input rows 320 - 217 .. 320 + 217
        for row, changes in ((320 + lo, True), (320 + hi, True), (320 + lo - 1, False), (320 + hi + 1, False)):
            y = x.clone()
            y[0, 0, row, :] = 5.0
            assert (trunk(y)[0, :, 10, 0] != base).any().item() is changes, row


@pytest.mark.parametrize("patch, stride, shape, context, tile", [
    (32, 32, (300, 270), 0, 96), (64, 16, (250, 301), 0, 128), (96, 8, (200, 170), 32, 128)])
def test_tiled_map_equals_untiled_for_a_local_trunk(patch, stride, shape, context, tile):
    model = _local_model(context=context).eval()
    img = torch.randn(*shape)
    whole = probability_map(model, img, patch, stride, "dense")
    tiled = probability_map(model, img, patch, stride, "dense", max_tile=tile)
    assert len(tile_spans(whole.shape[0] // (32 // stride), shape[0] + patch + 32, patch, context, tile,
                          trunk_reach(model.trunk))) >= 2  # really tiled
    torch.testing.assert_close(tiled, whole, atol=1e-6, rtol=0)


def test_tiled_resnet_map_and_picks_equal_untiled():
    # ResNet-18 with 64 px of context on a 900 x 960 image: 2 x 2 tiles of at most 1000 px whose
    # seams cross the image; the stitched map equals the whole-image map, and so do the picks
    torch.manual_seed(0)
    model = FixMatchPUModel("resnet18", context=64).eval()
    array = np.random.default_rng(1).normal(size=(900, 960)).astype(np.float32)
    settings = dict(threshold=0.0, min_distance=40, downsample=1, normalization="none", patch_size=192, stride=32)
    a, whole, _ = pick_micrograph(model, array, PickSettings(**settings, max_tile=None), torch.device("cpu"))
    b, tiled, _ = pick_micrograph(model, array, PickSettings(**settings, max_tile=1000), torch.device("cpu"))
    spans = tile_spans(whole.shape[0], 900 + 192 + 32, 192, 64, 1000, trunk_reach(model.trunk))
    assert len(spans) == 2 and spans[0][3] > spans[1][2]  # two overlapping row tiles
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=0)
    assert len(a) > 10
    pd.testing.assert_frame_equal(a, b, atol=1e-4)


def test_tile_too_small_for_the_receptive_field():
    with pytest.raises(ValueError, match="use at least 466 px"):
        tile_spans(20, 900, 96, 32, 400, (32, -217, 217))


# ------------------------------------------------------------------- dilated trunk, TTA

@pytest.mark.parametrize("stride", [16, 8])
def test_dilated_trunk_gives_the_shift_and_stitch_map(stride):
    # one pass of ResNet-18 with layer4 at stride 1 and dilation 2 against (32 / stride)^2 shifted
    # passes of the plain trunk, interleaved
    torch.manual_seed(0)
    model = FixMatchPUModel("resnet18", context=64).eval()
    img = torch.nn.functional.avg_pool2d(torch.randn(1, 1, 300, 260), 5, 1, 2)[0, 0] * 4
    stitched = probability_map(model, img, 192, stride, "dense", dilate=False)
    dilated = probability_map(model, img, 192, stride, "dense", dilate=True)
    assert dilated.shape == stitched.shape == map_shape(300, 260, stride)
    assert float(stitched.std()) > 0.01  # a map with structure, not a constant
    torch.testing.assert_close(dilated, stitched, atol=5e-5, rtol=0)
    view = dilated_trunk(model.trunk)
    assert view.layer4[0].conv1.stride == (1, 1) and view.layer4[1].conv2.dilation == (2, 2)
    assert view.layer4[0].conv1.weight is model.trunk.layer4[0].conv1.weight  # shared, not copied
    assert model.trunk.layer4[0].conv1.stride == (2, 2)  # the model itself is untouched
    assert trunk_reach(view)[0] == 16


def test_dilated_resnet50_trunk_gives_the_shift_and_stitch_map():
    torch.manual_seed(0)
    model = FixMatchPUModel("resnet50", context=32).eval()
    img = torch.randn(200, 170)
    torch.testing.assert_close(probability_map(model, img, 128, 16, "dense", dilate=True),
                               probability_map(model, img, 128, 16, "dense", dilate=False), atol=5e-5, rtol=0)


def test_tiled_dilated_map_equals_untiled():
    torch.manual_seed(0)
    model = FixMatchPUModel("resnet18", context=64).eval()
    img = torch.randn(700, 650)
    whole = probability_map(model, img, 192, 16, "dense")
    tiled = probability_map(model, img, 192, 16, "dense", max_tile=800)
    J, lo, hi = trunk_reach(dilated_trunk(model.trunk))
    assert len(tile_spans(whole.shape[0], 700 + 192 + 32, 192, 64, 800, (J, lo, hi))) >= 2  # really tiled
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape, stride", [((33, 49), 8), ((30, 45), 8), ((64, 64), 16)])
def test_symmetric_average_of_an_equivariant_map_is_that_map(shape, stride):
    # a map that samples the image at its grid points is exactly equivariant: averaging it over the
    # 8 rotations and flips must give it back, which only holds if every view is turned back onto
    # the right cells
    img = torch.randn(*shape)

    def sample(x):
        return torch.sigmoid(x[::stride, ::stride])

    expect = sample(img)
    assert expect.shape == map_shape(*shape, stride)
    torch.testing.assert_close(symmetric_average(sample, img, stride), expect, atol=1e-6, rtol=0)


def test_tta_map_of_a_symmetric_input_is_symmetric():
    torch.manual_seed(0)
    model = FixMatchPUModel("resnet18", context=32).eval()
    n = 16 * 12 + 1  # n - 1 a multiple of the stride: the grid's centre is the image's
    yy, xx = torch.meshgrid(torch.arange(n) - n // 2, torch.arange(n) - n // 2, indexing="ij")
    img = -3 * torch.exp(-(yy ** 2 + xx ** 2).float() / 300) + torch.cos(xx.float() / 9) * torch.cos(yy.float() / 9)
    assert torch.equal(img, img.T) and torch.equal(img, img.flip(0))  # symmetric under the 8 transforms
    plain = probability_map(model, img, 128, 16, "dense")
    tta = probability_map(model, img, 128, 16, "dense", tta=True)
    for turns in range(4):
        for flip in (False, True):
            view = torch.rot90(tta, turns, (0, 1))
            torch.testing.assert_close(view.flip(1) if flip else view, tta, atol=1e-5, rtol=0)
    assert float((plain - plain.flip(1)).abs().max()) > 1e-3  # the network alone is not symmetric


@pytest.mark.parametrize("stride", [8, 32])
def test_tta_runs_in_tiles_too(stride):
    model = _local_model(context=32).eval()
    img = torch.randn(250, 301)
    whole = probability_map(model, img, 96, stride, "dense", tta=True)
    tiled = probability_map(model, img, 96, stride, "dense", tta=True, max_tile=128)
    assert len(tile_spans(whole.shape[0] // (32 // stride), 250 + 96 + 32, 96, 32, 128,
                          trunk_reach(model.trunk))) >= 2  # really tiled
    torch.testing.assert_close(tiled, whole, atol=1e-6, rtol=0)
    assert not torch.allclose(whole, probability_map(model, img, 96, stride, "dense"), atol=1e-3)  # TTA did act


def test_tta_map_of_a_rotated_micrograph_is_the_rotated_map():
    torch.manual_seed(0)
    model = FixMatchPUModel("resnet18", context=32).eval()
    img = torch.randn(16 * 9 + 1, 16 * 12 + 1)
    tta = probability_map(model, img, 128, 16, "dense", tta=True)
    turned = probability_map(model, torch.rot90(img, 1, (0, 1)), 128, 16, "dense", tta=True)
    torch.testing.assert_close(turned, torch.rot90(tta, 1, (0, 1)), atol=1e-5, rtol=0)
