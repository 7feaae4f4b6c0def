"""datasets.cryoem_augment: shapes, reproducibility, exact symmetries, per-sample randomness."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from datasets import cryoem_augment as aug
from datasets.cryoem_augment import STRONG_OPS, strong_augment, weak_augment

S = 32
AUGMENTS = [weak_augment, strong_augment]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def gen(seed, device="cpu"):
    return torch.Generator(device=device).manual_seed(seed)


def patches(b=8, s=S, seed=0):
    """Asymmetric test patches: a blob off centre plus noise, standardised."""
    g = gen(seed)
    yy, xx = torch.meshgrid(torch.arange(s, dtype=torch.float32),
                            torch.arange(s, dtype=torch.float32), indexing="ij")
    blob = torch.exp(-((yy - s * 0.3) ** 2 + (xx - s * 0.6) ** 2) / (2 * (s / 8) ** 2))
    x = blob + 0.3 * torch.randn(b, 1, s, s, generator=g)
    return (x - x.mean()) / x.std()


def same_image(b=16, s=S):
    return patches(1, s).expand(b, 1, s, s).contiguous()


def identity_geometry(b, dtype=torch.float32):
    false = torch.zeros(b, dtype=torch.bool)
    return {"transpose": false, "hflip": false, "vflip": false,
            "angle": torch.zeros(b, dtype=dtype), "shear": torch.zeros(b, dtype=dtype),
            "shift": torch.zeros(b, 2, dtype=dtype)}


# ------------------------------------------------------------------------ output contract

@pytest.mark.parametrize("fn", AUGMENTS)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_shape_dtype_device_finite(fn, device, dtype):
    x = patches(5).to(device=device, dtype=dtype)
    y = fn(x, gen(0, device))
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    assert torch.isfinite(y).all()
    assert not torch.equal(y, x)


@pytest.mark.parametrize("fn", AUGMENTS)
def test_input_is_not_modified(fn):
    x = patches(4)
    before = x.clone()
    fn(x, gen(0))
    assert torch.equal(x, before)


@pytest.mark.parametrize("fn", AUGMENTS)
def test_constant_and_extreme_patches_stay_finite(fn):
    x = torch.cat([torch.full((2, 1, S, S), 3.0), 1e4 * patches(2), torch.zeros(2, 1, S, S)])
    y = fn(x, gen(1))
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("fn", AUGMENTS)
@pytest.mark.parametrize("shape", [(0, 1, 16, 16), (1, 1, 16, 16), (3, 1, 4, 4), (2, 1, 1, 1)])
def test_empty_single_and_tiny_batches(fn, shape):
    x = torch.randn(shape, generator=gen(0))
    y = fn(x, gen(1))
    assert y.shape == x.shape and torch.isfinite(y).all()


@pytest.mark.parametrize("fn", AUGMENTS)
def test_bad_input_is_rejected(fn):
    with pytest.raises(ValueError, match="square patches"):
        fn(torch.zeros(2, 1, 8, 9))
    with pytest.raises(ValueError, match="square patches"):
        fn(torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="float batch"):
        fn(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))


# ------------------------------------------------------------------------ reproducibility

@pytest.mark.parametrize("fn", AUGMENTS)
def test_same_seed_same_output_other_seed_other_output(fn):
    x = patches(6)
    a = fn(x, gen(123))
    b = fn(x, gen(123))
    c = fn(x, gen(124))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("fn", AUGMENTS)
def test_generator_advances_and_global_rng_is_used_without_one(fn):
    x = patches(6)
    g = gen(5)
    assert not torch.allclose(fn(x, g), fn(x, g))
    torch.manual_seed(9)
    a = fn(x)
    torch.manual_seed(9)
    assert torch.equal(a, fn(x))


def test_strong_differs_from_weak_with_the_same_seed():
    x = patches(6)
    weak, strong = weak_augment(x, gen(7)), strong_augment(x, gen(7))
    # the same seed draws the same symmetry, rotation and shift first; the strong view
    # differs from the weak one by its extra ops, cutout and noise in every sample
    assert ((strong - weak).flatten(1).abs().mean(dim=1) > 0.05).all()


# ----------------------------------------------------------------- per-sample randomness

@pytest.mark.parametrize("fn", AUGMENTS)
def test_every_sample_gets_its_own_parameters(fn):
    x = same_image(16)
    y = fn(x, gen(0)).flatten(1)
    # all 16 outputs of one input image are pairwise different
    distinct = torch.cdist(y, y) + torch.eye(16) * 1e9
    assert distinct.min() > 1e-3


def test_weak_uses_all_eight_symmetries_across_a_batch():
    params = aug._sample_geometry(4096, gen(0), "cpu", torch.float32)
    code = params["transpose"].long() * 4 + params["hflip"].long() * 2 + params["vflip"].long()
    counts = torch.bincount(code, minlength=8)
    assert (counts > 400).all()                  # about 512 each
    degrees = torch.rad2deg(params["angle"])
    assert degrees.abs().max() <= 10 and degrees.std() > 4
    assert params["shift"].abs().max() <= 2 / 8  # S/8 pixels = 2/8 normalised units


def test_two_distinct_strong_ops_per_sample():
    chosen = aug._choose_ops(2000, gen(0), "cpu")
    assert chosen.shape == (2000, len(STRONG_OPS))
    assert (chosen.sum(dim=1) == 2).all()
    frequency = chosen.float().mean(dim=0)      # each op in 2/8 = 25% of the samples
    assert ((frequency - 2 / len(STRONG_OPS)).abs() < 0.05).all()
    pairs = {tuple(row.nonzero().flatten().tolist()) for row in chosen}
    assert len(pairs) == len(list(itertools.combinations(range(len(STRONG_OPS)), 2)))


# ------------------------------------------------------------------------ exact geometry

def test_dihedral_is_exactly_rot90_and_flips():
    x = patches(1)
    expected = {
        (False, False, False): x,
        (False, True, False): x.flip(-1),
        (False, False, True): x.flip(-2),
        (False, True, True): torch.rot90(x, 2, (-2, -1)),
        (True, False, False): x.transpose(-1, -2),
        (True, True, False): torch.rot90(x, -1, (-2, -1)),
        (True, False, True): torch.rot90(x, 1, (-2, -1)),
        (True, True, True): torch.rot90(x.transpose(-1, -2), 2, (-2, -1)),
    }
    flags = list(expected)
    batch = x.expand(len(flags), 1, S, S)
    t, h, v = (torch.tensor([f[i] for f in flags]) for i in range(3))
    out = aug._dihedral(batch, t, h, v)
    for i, key in enumerate(flags):
        assert torch.equal(out[i:i + 1], expected[key]), key
        # a permutation of the pixels: the same multiset of values
        assert torch.equal(out[i].flatten().sort().values, x.flatten().sort().values)
    assert len({tuple(o.flatten().tolist()) for o in out}) == 8   # all 8 distinct


def test_affine_identity_parameters_return_the_input():
    x = patches(4)
    p = identity_geometry(4)
    assert torch.allclose(aug._geometric(x, p), x, atol=1e-5)


def test_affine_shift_by_whole_pixels_moves_the_content():
    x = patches(1)
    p = identity_geometry(1)
    p["shift"] = torch.tensor([[2 * 3 / S, 0.0]])  # 3 px along x (the width)
    y = aug._affine(x, p["angle"], p["shear"], p["shift"])
    assert torch.allclose(y[..., :, :S - 3], x[..., :, 3:], atol=1e-5)
    # outside the patch the content is reflected, not zero-filled
    assert torch.allclose(y[..., :, S - 3:], x[..., :, S - 3:].flip(-1), atol=1e-5)


def test_affine_rotation_by_90_degrees_matches_rot90():
    x = patches(1)
    p = identity_geometry(1)
    y = aug._affine(x, torch.tensor([torch.pi / 2]), p["shear"], p["shift"])
    assert torch.allclose(y, torch.rot90(x, 1, (-2, -1)), atol=1e-4)


def test_weak_interpolates_within_the_input_range_without_zero_fill():
    const = torch.full((8, 1, S, S), 2.5)
    assert torch.allclose(weak_augment(const, gen(0)), const)
    x = torch.rand(8, 1, S, S, generator=gen(1)) + 1.0   # values in [1, 2): a zero would show
    y = weak_augment(x, gen(2))
    assert y.min() >= x.min() - 1e-6 and y.max() <= x.max() + 1e-6


# ---------------------------------------------------------------------- photometric ops

def strong_params_with(ops, b=4, seed=0):
    params = aug._sample_strong((b, 1, S, S), gen(seed), "cpu", torch.float32)
    params["ops"] = {name: torch.full((b,), name in ops) for name in STRONG_OPS}
    return params


def standardise(x):
    mean, std = aug._stats(x)
    return (x - mean) / std, mean, std


def test_no_photometric_op_is_the_identity():
    x = patches(4)
    assert torch.allclose(aug._photometric_ops(x, strong_params_with(())), x, atol=1e-5)


@pytest.mark.parametrize("op", ["contrast", "brightness", "gamma", "posterize"])
def test_pointwise_ops_follow_their_formula(op):
    x = patches(4)
    params = strong_params_with((op,))
    z, mean, std = standardise(x)
    v = params[op].view(-1, 1, 1, 1)
    if op == "contrast":
        z_expected = v * z
    elif op == "brightness":
        z_expected = z + v
    elif op == "gamma":
        powered = z.sign() * z.abs() ** v
        z_expected = powered / powered.flatten(1).std(dim=1, unbiased=False).view(-1, 1, 1, 1)
    else:
        z_expected = torch.round(z / v) * v
    y = aug._photometric_ops(x, params)
    assert torch.allclose(y, z_expected * std + mean, atol=1e-4)


def test_blur_matches_a_reflect_padded_convolution():
    x = patches(3)
    sigma = torch.tensor([0.5, 1.0, 1.5])
    y = aug._gaussian_blur(x, sigma)
    r = aug._BLUR_RADIUS
    offsets = torch.arange(-r, r + 1, dtype=torch.float32)
    for i in range(3):   # a reference written sample by sample, with torch's conv2d
        w = torch.exp(-offsets ** 2 / (2 * sigma[i] ** 2))
        w = w / w.sum()
        ref = F.pad(x[i:i + 1], (r, r, r, r), mode="reflect")
        ref = F.conv2d(F.conv2d(ref, w.view(1, 1, 1, -1)), w.view(1, 1, -1, 1))
        assert torch.allclose(y[i:i + 1], ref, atol=1e-5)
    const = torch.full((2, 1, S, S), 4.0)
    assert torch.allclose(aug._gaussian_blur(const, torch.tensor([0.7, 1.3])), const)


def test_blur_and_sharpen_change_high_frequencies_in_opposite_directions():
    x = patches(4)

    def roughness(t):
        z, _, _ = standardise(t)
        return (z[..., 1:] - z[..., :-1]).abs().mean()

    blurred = aug._photometric_ops(x, strong_params_with(("blur",)))
    sharpened = aug._photometric_ops(x, strong_params_with(("sharpen",)))
    assert roughness(blurred) < roughness(x) < roughness(sharpened)


def test_geometric_strong_ops_replace_the_weak_angle_and_shear():
    params = aug._sample_strong((2000, 1, S, S), gen(0), "cpu", torch.float32)
    rotate, shear = params["ops"]["rotate"], params["ops"]["shear"]
    degrees = torch.rad2deg(params["angle"]).abs()
    assert degrees[~rotate].max() <= 10 and degrees[rotate].max() > 30
    assert (params["shear"][~shear] == 0).all() and params["shear"][shear].abs().max() > 0.2


def test_cutout_sets_one_square_to_the_patch_mean():
    b = 64
    x = patches(b) + 5.0                       # no pixel equals the mean by chance
    params = aug._sample_strong(x.shape, gen(3), "cpu", torch.float32)
    params["cutout_y"] = torch.full((b,), 0.5)  # centred: the square lies fully inside
    params["cutout_x"] = torch.full((b,), 0.5)
    y = aug._cutout(x, params)
    mean = x.flatten(1).mean(dim=1)
    changed = y != x
    sides = []
    for i in range(b):   # inspect each sample's square
        rows = changed[i, 0].any(dim=1).nonzero().flatten()
        cols = changed[i, 0].any(dim=0).nonzero().flatten()
        side = len(rows)
        assert side == len(cols) and changed[i].sum() == side * side
        assert rows[-1] - rows[0] + 1 == side                        # contiguous
        assert S // 4 <= side <= S // 2
        assert torch.allclose(y[i][changed[i]], mean[i].expand(side * side))
        sides.append(side)
    assert len(set(sides)) > 5                                       # sizes vary per sample


def test_cutout_is_clipped_at_the_border():
    x = patches(2) + 5.0
    params = aug._sample_strong(x.shape, gen(4), "cpu", torch.float32)
    params["cutout_size"] = torch.ones(2)      # the largest square, S/2
    params["cutout_y"] = torch.tensor([0.0, 0.999])
    params["cutout_x"] = torch.tensor([0.0, 0.999])
    changed = aug._cutout(x, params) != x
    assert changed[0].sum() == (S // 4) ** 2 and changed[0, 0, 0, 0]
    assert changed[1].sum() == (S // 4 + 1) ** 2 and changed[1, 0, -1, -1]


def test_shift_fraction_bounds_how_far_the_centre_moves():
    # a bright 2 x 2 block at the centre of a 64 px patch: the default shift (S/8 = 8 px per
    # axis) moves it several px in some samples; shift_fraction 1/32 (a 64 px patch carrying
    # 24 px of context around a 16 px window: 16/8 = 2 px) keeps it within 2 px per axis, plus
    # the +-10 degree rotation's and the resampling's fraction of a pixel
    from datasets.cryoem_augment import weak_augment
    x = torch.zeros(64, 1, 64, 64)
    x[:, :, 31:33, 31:33] = 1.0

    def displacement(shift_fraction):
        g = torch.Generator().manual_seed(0)
        y = weak_augment(x, generator=g, shift_fraction=shift_fraction)[:, 0]
        yy, xx = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
        w = y.clamp(min=0)
        cy = (w * yy).sum((1, 2)) / w.sum((1, 2))
        cx = (w * xx).sum((1, 2)) / w.sum((1, 2))
        return torch.maximum((cy - 31.5).abs(), (cx - 31.5).abs())

    assert float(displacement(1 / 32).max()) <= 2.5
    assert float(displacement(1 / 8).max()) > 4.0
