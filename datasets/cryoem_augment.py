"""Batched weak and strong augmentation of cryo-EM patches, on the batch's own device.

Both functions take a float batch ``x`` of shape [B, 1, S, S] (CPU or GPU) and return a new
tensor of the same shape and dtype. Every sample gets its own random parameters, drawn as
tensors of length B; nothing loops over samples in Python, so a GPU batch is augmented in a
few kernels and augmentation does not starve the GPU.

Weak (the teacher's view, FixMatch's "flip and shift", Sohn et al. 2020):
    * a random element of the dihedral group D4 (rot90 by k in {0..3}, optional flip),
      applied exactly by index permutation: particles have no preferred orientation, so
      all 8 are valid, and a horizontal flip is one of them;
    * a rotation by U(-10, 10) degrees and a translation by U(-S/8, S/8) pixels per axis
      (the "random crop"), in one bilinear resample (``affine_grid`` + ``grid_sample``) with
      reflection at the borders, so no zero-filled corners appear.

Strong (the student's view, RandAugment-like; valid for single-channel float images):
    * the weak geometry above;
    * 2 distinct ops per sample, chosen uniformly from :data:`STRONG_OPS`; the geometric ones
      (``rotate``: U(-45, 45) degrees instead of +-10, ``shear``: x' = x + s*y with
      s ~ U(-0.3, 0.3)) join the single resample, the photometric ones act on the patch
      standardised per sample, z = (x - mean) / std, and map back with x = z * std + mean:
        contrast   z' = c z,                      c ~ U(0.5, 1.5)
        brightness z' = z + b,                    b ~ U(-0.5, 0.5)
        gamma      z' = sign(z) |z|^g / std(...), g ~ U(0.6, 1.6)  (sign-preserving, so safe
                                                  for zero-mean data; rescaled to unit std)
        blur       z' = G_sigma * z,              sigma ~ U(0.5, 1.5) px, separable Gaussian
        sharpen    z' = z + a (z - G_1 * z),      a ~ U(0.5, 1.5)  (unsharp mask)
        posterize  z' = q round(z / q),           q ~ U(0.25, 1.0)
    * cutout: one square of side U{S/4 .. S/2} at a uniform position (clipped at the border)
      set to the patch mean;
    * additive Gaussian noise n ~ N(0, (sigma std)^2), sigma ~ U(0.05, 0.3);
    * a contrast change around the mean, x' = mean + c (x - mean), c ~ U(0.8, 1.25).

Reproducibility: pass a ``torch.Generator``; it must live on ``x``'s device
(``torch.Generator(device=x.device)``), since the random parameters are drawn there. The
same generator state and input give the same output. Without a generator the global RNG of
that device is used. float16/bfloat16 inputs are processed in float32 and cast back.
"""
import torch
import torch.nn.functional as F

WEAK_MAX_ROTATION = 10.0        # degrees
STRONG_MAX_ROTATION = 45.0      # degrees; with the rot90s this covers every orientation
MAX_SHIFT_FRACTION = 1.0 / 8    # of the patch size, per axis
MAX_SHEAR = 0.3
STRONG_OPS = ("contrast", "brightness", "gamma", "blur", "sharpen", "posterize", "rotate", "shear")
OPS_PER_SAMPLE = 2
_BLUR_RADIUS = 4                # kernel 9x9 (separable), enough for sigma <= 1.5
_EPS = 1e-6


def _check_batch(x):
    """Raise ValueError unless x is a float batch of square patches; False when it is empty."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"expected a batch of square patches [B, C, S, S], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"expected a float batch, got {x.dtype}")
    return x.shape[0] > 0 and x.shape[-1] > 0


def _work_dtype(x):
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def _uniform(low, high, n, generator, device, dtype):
    """n draws from U(low, high) on ``device``."""
    return low + (high - low) * torch.rand(n, generator=generator, device=device, dtype=dtype)


def _coin(n, generator, device, p=0.5):
    return torch.rand(n, generator=generator, device=device) < p


def _per_sample(v):
    """[B] -> [B, 1, 1, 1] for broadcasting against the batch."""
    return v.view(-1, 1, 1, 1)


# ------------------------------------------------------------------------------- geometry

def _sample_geometry(n, generator, device, dtype, shift_fraction=MAX_SHIFT_FRACTION):
    """Weak geometric parameters for n samples: D4 element, rotation (rad), shift (normalised)."""
    transpose = _coin(n, generator, device)
    hflip = _coin(n, generator, device)
    vflip = _coin(n, generator, device)
    angle = _uniform(-WEAK_MAX_ROTATION, WEAK_MAX_ROTATION, n, generator, device, dtype)
    # grid_sample's normalised coordinates span 2 units over S pixels: d px = 2 d / S units.
    max_shift = 2.0 * shift_fraction
    shift = _uniform(-max_shift, max_shift, (n, 2), generator, device, dtype)
    return {"transpose": transpose, "hflip": hflip, "vflip": vflip,
            "angle": torch.deg2rad(angle), "shear": torch.zeros(n, device=device, dtype=dtype),
            "shift": shift}


def _dihedral(x, transpose, hflip, vflip):
    """Per-sample exact D4 transform: optional transpose, then left-right, then up-down flip.

    The 2^3 combinations are the 8 symmetries of the square (rot90 by k, with or without a
    flip); each output is a permutation of its input's pixels (no interpolation).
    """
    x = torch.where(_per_sample(transpose), x.transpose(-1, -2), x)
    x = torch.where(_per_sample(hflip), x.flip(-1), x)
    return torch.where(_per_sample(vflip), x.flip(-2), x)


def _affine(x, angle, shear, shift):
    """One bilinear resample of each sample by rotation ``angle`` (rad), ``shear``, ``shift``.

    For output coordinates p (normalised to [-1, 1]) the input is read at
    R(angle) @ [[1, shear], [0, 1]] @ p + shift, with reflection outside the patch.
    """
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([
        torch.stack([cos, cos * shear - sin, shift[:, 0]], dim=1),
        torch.stack([sin, sin * shear + cos, shift[:, 1]], dim=1),
    ], dim=1)                                                     # [B, 2, 3]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _geometric(x, params):
    x = _dihedral(x, params["transpose"], params["hflip"], params["vflip"])
    return _affine(x, params["angle"], params["shear"], params["shift"])


# ----------------------------------------------------------------------------- photometry

def _stats(x):
    """Per-sample mean and std (clamped away from 0) over channels and pixels, [B, 1, 1, 1]."""
    flat = x.flatten(1)
    mean = flat.mean(dim=1)
    std = flat.std(dim=1, unbiased=False).clamp_min(_EPS)
    return _per_sample(mean), _per_sample(std)


def _reflect(i, size):
    """Index ``i`` (any integer tensor) reflected into [0, size) like ``F.pad(mode="reflect")``."""
    if size == 1:
        return torch.zeros_like(i)
    period = 2 * (size - 1)
    i = i.remainder(period)
    return torch.where(i < size, i, period - i)


def _gaussian_blur(x, sigma):
    """Separable Gaussian blur with a per-sample ``sigma`` [B], reflecting at the borders.

    Blurring along one axis is a matrix product with a per-sample banded matrix
    K[b, i, j] = sum over offsets o in [-r, r] with reflect(i + o) = j of w_b(o),
    w_b(o) = exp(-o^2 / (2 sigma_b^2)) / sum_o' exp(-o'^2 / (2 sigma_b^2)); the blurred patch
    is K z K^T. Batched matmuls are fast on both CPU and GPU, unlike a grouped convolution
    with one group per sample.
    """
    b, s = x.shape[0], x.shape[-1]
    offsets = torch.arange(-_BLUR_RADIUS, _BLUR_RADIUS + 1, device=x.device)
    weights = torch.exp(-0.5 * (offsets.to(x.dtype)[None, :] / sigma[:, None]) ** 2)
    weights = weights / weights.sum(dim=1, keepdim=True)                      # [B, k]
    columns = _reflect(torch.arange(s, device=x.device)[:, None] + offsets[None, :], s)  # [S, k]
    kernel = torch.zeros(b, s, s, device=x.device, dtype=x.dtype)
    kernel.scatter_add_(2, columns.expand(b, s, -1), weights[:, None, :].expand(b, s, -1))
    kernel = kernel[:, None]                                                  # [B, 1, S, S]
    return kernel @ x @ kernel.transpose(-1, -2)


def _choose_ops(n, generator, device):
    """Bool [n, len(STRONG_OPS)]: OPS_PER_SAMPLE distinct ops per sample, uniformly."""
    order = torch.rand(n, len(STRONG_OPS), generator=generator, device=device).argsort(dim=1)
    chosen = torch.zeros(n, len(STRONG_OPS), dtype=torch.bool, device=device)
    return chosen.scatter_(1, order[:, :OPS_PER_SAMPLE], True)


def _sample_strong(shape, generator, device, dtype, shift_fraction=MAX_SHIFT_FRACTION):
    """All strong parameters for a batch of ``shape`` (drawn in a fixed order, used or not)."""
    n = shape[0]
    params = _sample_geometry(n, generator, device, dtype, shift_fraction)
    chosen = _choose_ops(n, generator, device)
    params["ops"] = {name: chosen[:, i] for i, name in enumerate(STRONG_OPS)}

    def u(low, high):
        return _uniform(low, high, n, generator, device, dtype)

    params.update(
        strong_angle=torch.deg2rad(u(-STRONG_MAX_ROTATION, STRONG_MAX_ROTATION)),
        shear_amount=u(-MAX_SHEAR, MAX_SHEAR),
        contrast=u(0.5, 1.5), brightness=u(-0.5, 0.5), gamma=u(0.6, 1.6),
        blur_sigma=u(0.5, 1.5), sharpen=u(0.5, 1.5), posterize=u(0.25, 1.0),
        cutout_size=u(0.0, 1.0), cutout_y=u(0.0, 1.0), cutout_x=u(0.0, 1.0),
        noise_sigma=u(0.05, 0.3), final_contrast=u(0.8, 1.25),
    )
    params["noise"] = torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    ops = params["ops"]
    params["angle"] = torch.where(ops["rotate"], params["strong_angle"], params["angle"])
    params["shear"] = torch.where(ops["shear"], params["shear_amount"], params["shear"])
    return params


def _photometric_ops(x, params):
    """Apply the chosen photometric ops, in STRONG_OPS order, to the standardised patches."""
    ops = params["ops"]
    mean, std = _stats(x)
    z = (x - mean) / std

    def apply(name, result):
        return torch.where(_per_sample(ops[name]), result, z)

    z = apply("contrast", z * _per_sample(params["contrast"]))
    z = apply("brightness", z + _per_sample(params["brightness"]))
    powered = z.sign() * z.abs().pow(_per_sample(params["gamma"]))
    z = apply("gamma", powered / _stats(powered)[1])
    z = apply("blur", _gaussian_blur(z, params["blur_sigma"]))
    unsharp = z - _gaussian_blur(z, torch.ones_like(params["sharpen"]))
    z = apply("sharpen", z + _per_sample(params["sharpen"]) * unsharp)
    q = _per_sample(params["posterize"])
    z = apply("posterize", torch.round(z / q) * q)
    return z * std + mean


def _cutout(x, params):
    """Per sample, one square set to that patch's mean.

    Side L = floor(S/4 + u (S/2 - S/4 + 1)) in {S/4, ..., S/2}; the square covers rows
    y0 <= i < y0 + L with y0 = floor(v S - L / 2), v ~ U(0, 1) (same for columns), so its
    centre is uniform over the patch and parts outside the patch are clipped away.
    """
    s = x.shape[-1]
    low, high = max(1, s // 4), max(1, s // 2)
    side = (low + params["cutout_size"] * (high - low + 1)).floor().clamp(max=high)
    top = (params["cutout_y"] * s - side / 2).floor()
    left = (params["cutout_x"] * s - side / 2).floor()
    pos = torch.arange(s, device=x.device, dtype=x.dtype)
    rows = (pos >= top[:, None]) & (pos < (top + side)[:, None])              # [B, S]
    cols = (pos >= left[:, None]) & (pos < (left + side)[:, None])
    inside = (rows[:, :, None] & cols[:, None, :])[:, None]                   # [B, 1, S, S]
    mean, _ = _stats(x)
    return torch.where(inside, mean, x)


# ------------------------------------------------------------------------------ public API

def weak_augment(x, generator=None, shift_fraction=MAX_SHIFT_FRACTION):
    """Weak view of a batch x [B, 1, S, S]: random D4 symmetry, +-10 deg rotation, shift.

    Returns a new tensor of x's shape and dtype. ``generator`` (on x's device) makes it
    reproducible. See the module docstring for the distributions. ``shift_fraction``: the
    largest shift per axis as a fraction of S (1/8); a patch that carries context around a
    classified window of side P passes P / (8 S), so the particle moves by at most P/8 in the
    window whatever the context.
    """
    if not _check_batch(x):
        return x.clone()
    dtype = _work_dtype(x)
    params = _sample_geometry(x.shape[0], generator, x.device, dtype, shift_fraction)
    return _geometric(x.to(dtype), params).to(x.dtype)


def strong_augment(x, generator=None, shift_fraction=MAX_SHIFT_FRACTION):
    """Strong view of a batch x [B, 1, S, S]: weak geometry + 2 RandAugment-style ops per
    sample + cutout + Gaussian noise + contrast change (see the module docstring).

    Returns a new tensor of x's shape and dtype. ``generator`` (on x's device) makes it
    reproducible. ``shift_fraction`` as in :func:`weak_augment`.
    """
    if not _check_batch(x):
        return x.clone()
    dtype = _work_dtype(x)
    params = _sample_strong(x.shape, generator, x.device, dtype, shift_fraction)
    y = _geometric(x.to(dtype), params)
    y = _photometric_ops(y, params)
    y = _cutout(y, params)
    mean, std = _stats(y)
    y = y + _per_sample(params["noise_sigma"]) * std * params["noise"]
    y = mean + _per_sample(params["final_contrast"]) * (y - mean)
    return y.to(x.dtype)
