"""Micrographs + particle coordinates -> the PU training files.

Frames. Coordinates are particle centres in the ORIGINAL micrograph's pixels (x = column,
y = row of the array as read, see :mod:`datasets.micrographs`). A micrograph of ``H x W``
pixels downsampled by ``f`` becomes ``h x w = round(H/f) x round(W/f)`` pixels (antialiased
bilinear, a low-pass filter as wide as the factor); with ``sy = H/h`` and ``sx = W/w`` pixel ``u`` of the small image covers
original pixels ``[u*sx, (u+1)*sx)``, so its centre is at original ``x = (u + 0.5) * sx - 0.5``
(:func:`to_original`), and the inverse is :func:`to_downsampled`. The classified window is
``P x P`` pixels of the downsampled, normalised micrograph; the stored patch adds ``context``
pixels on every side (``P + 2 * context``, see ``FixMatchPUModel.context``: it makes the dense
picker agree with the patch classifier). "The patch centred on pixel c" covers
``c - S/2 .. c + S/2 - 1`` per axis for a patch of side S, with zeros (the mean after
z-scoring) beyond the micrograph's edge; ``models/dense.py`` uses the same convention, so a
picked map cell maps back exactly. ``metadata.patch_size`` is the stored side, ``window_size``
is ``P``.

What preprocess_cryoem.py (``run_preprocess``) writes with the functions of this module, from the
training micrographs (all but val/test):

* positives: patches centred on the LABELLED particles: a seeded random subset of each
  micrograph's annotated particles (``labelled_fraction`` of them, at least 1, or
  ``labelled_count``). The other annotated particles stay hidden in the unlabelled data, as in
  a real PU setting where a user hand-picks a few particles per micrograph.
* unlabelled: a sliding window of ``P x P`` patches, stride ``stride``, over the whole
  micrograph (windows fully inside).
* ``metadata.prior``: the class prior for ``loss.prior: auto``: the fraction of unlabelled
  windows whose centre lies within ``positive_radius`` (default: half the particle radius) of
  an annotated particle, over the training micrographs. This uses ALL annotated particles of
  the coordinate file, so it is right when the file's annotation is complete (as in a
  benchmark that hides most labels). When it is not (a real user's few picks), give
  ``expected_particles`` per micrograph instead: prior = that number x the area of a
  ``positive_radius`` disc / the micrograph's area (the estimate Topaz uses).

From held-out micrographs (their annotation taken as complete): labelled ``val.pt`` /
``test.pt``: label 1 for patches centred on every annotated particle, label 0 for sliding
windows whose centre is farther than the particle radius from every annotated particle
(windows in between are ambiguous and left out).

Also written: ``labelled_positives.csv`` (the labelled particles, original frame: what a
comparison method must be given) and ``preprocess.json`` (the metadata and the counts).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial import cKDTree

from datasets.micrographs import micrograph_key, resolve_pixel_size
from utils.checkpoint import save_checkpoint
from utils.errors import UserError
from utils.io import to_json_safe

NORMALIZATIONS = ("zscore", "none")
DTYPES = {"float16": torch.float16, "float32": torch.float32}
FORMAT_VERSION = 1
DATA_FILES = ("preprocessed_data.pt", "val.pt", "test.pt", "labelled_positives.csv", "preprocess.json")
logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- image and frames
def prepare_micrograph(array, downsample=1.0, normalization="zscore", device=None):
    """A micrograph array ``[H, W]`` -> (float32 tensor ``[h, w]``, ``(sx, sy)``), see module docstring.

    Downsampling is antialiased bilinear (``F.interpolate(..., antialias=True)``, any factor >= 1);
    ``zscore`` then subtracts the mean and divides by the standard deviation of the
    downsampled micrograph (per micrograph, so exposure differences between micrographs vanish).
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if not downsample >= 1:
        raise ValueError(f"downsample must be >= 1, got {downsample!r}")
    x = torch.as_tensor(np.ascontiguousarray(array), dtype=torch.float32, device=device)
    H, W = x.shape
    h, w = downsampled_shape((H, W), downsample)
    if (h, w) != (H, W):
        # antialiased bilinear: a triangle filter as wide as the factor, centred on the
        # output pixel's centre in the input, (u + 0.5) * scale - 0.5 (= to_original)
        x = F.interpolate(x[None, None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0, 0]
    if normalization == "zscore":
        std = x.std()
        x = (x - x.mean()) / (std if std > 0 else 1.0)
    return x.contiguous(), (W / w, H / h)


def downsampled_shape(shape, downsample):
    """``(h, w)`` of an ``(H, W)`` micrograph downsampled by ``downsample`` (module docstring)."""
    H, W = shape
    return max(1, round(H / downsample)), max(1, round(W / downsample))


def to_downsampled(xy, scale):
    """Original-frame ``[N, 2]`` (x, y) -> downsampled-frame (u, v), floats (module docstring)."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    return (xy + 0.5) / np.asarray(scale, dtype=np.float64) - 0.5


def to_original(uv, scale):
    """Downsampled-frame ``[N, 2]`` (u, v) -> original-frame (x, y), floats (module docstring)."""
    uv = np.asarray(uv, dtype=np.float64).reshape(-1, 2)
    return (uv + 0.5) * np.asarray(scale, dtype=np.float64) - 0.5


def crops_at(image, centres_rc, patch_size):
    """``[N, P, P]`` patches of ``image [h, w]`` centred on integer pixels ``centres_rc [N, 2]`` (row, col).

    The patch centred on ``c`` covers ``c - P/2 .. c + P/2 - 1``; outside the image reads 0.
    """
    centres = torch.as_tensor(np.asarray(centres_rc, dtype=np.int64).reshape(-1, 2), device=image.device)
    half = patch_size // 2
    padded = F.pad(image, (half, half, half, half))
    offsets = torch.arange(patch_size, device=image.device)
    rows = (centres[:, 0, None] + offsets)[:, :, None]  # + half - half: padded index of c - P/2 + i
    cols = (centres[:, 1, None] + offsets)[:, None, :]
    return padded[rows, cols]


def window_centres(h, w, patch_size, stride):
    """``[M, 2]`` int64 (row, col) centres of the sliding windows fully inside an ``h x w`` image."""
    rows = np.arange(0, h - patch_size + 1, stride) + patch_size // 2
    cols = np.arange(0, w - patch_size + 1, stride) + patch_size // 2
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    return np.stack([rr.ravel(), cc.ravel()], axis=1).astype(np.int64)


def _nearest_distance(points_xy, targets_xy):
    """Distance from each point to its nearest target (inf when there is no target)."""
    if len(targets_xy) == 0:
        return np.full(len(points_xy), np.inf)
    return cKDTree(targets_xy).query(points_xy, k=1)[0]


# ----------------------------------------------------------------------------- options
@dataclass(frozen=True)
class PreprocessOptions:
    """What ``preprocess_cryoem.py`` exposes as flags (distances in original pixels).

    ``particle_diameter_A`` (Angstrom) replaces ``particle_radius`` when given: the radius is then
    ``diameter / 2 / pixel size``, the pixel size from ``pixel_size`` (Angstrom per pixel), the MRC
    headers or the coordinates' STAR optics block (:func:`datasets.micrographs.resolve_pixel_size`).
    """
    particle_radius: float | None = None
    patch_size: int = 128
    context: int = 64
    stride: int = 64
    downsample: float = 1.0
    labelled_fraction: float = 1.0
    labelled_count: int | None = None
    val_micrographs: tuple = ()
    test_micrographs: tuple = ()
    positive_radius: float | None = None
    expected_particles: float | None = None
    normalization: str = "zscore"
    seed: int = 0
    chunk_size: int = 20000
    dtype: str = "float16"
    particle_diameter_A: float | None = None
    pixel_size: float | None = None

    def check(self):
        """UserError naming the flag for a value out of range."""
        def bad(flag, value, expected):
            raise UserError(f"{flag} is {value!r}, expected {expected}")
        if self.particle_radius is None or not self.particle_radius > 0 or not math.isfinite(self.particle_radius):
            bad("--particle-radius", self.particle_radius, "a positive number of pixels")
        if self.patch_size < 8 or self.patch_size % 2:
            bad("--patch-size", self.patch_size, "an even number >= 8")
        if self.context < 0 or self.context % 32:
            bad("--context", self.context, "a non-negative multiple of 32 px (the trunk's stride)")
        if self.stride < 1:
            bad("--stride", self.stride, "a positive number of pixels")
        if not self.downsample >= 1 or not math.isfinite(self.downsample):
            bad("--downsample", self.downsample, "a factor >= 1")
        if self.labelled_count is None and not 0 < self.labelled_fraction <= 1:
            bad("--labelled-fraction", self.labelled_fraction, "a fraction in (0, 1]")
        if self.labelled_count is not None and self.labelled_count < 1:
            bad("--labelled-count", self.labelled_count, "a positive number of particles per micrograph")
        if self.positive_radius is not None and not 0 < self.positive_radius < math.inf:
            bad("--positive-radius", self.positive_radius, "a positive number of pixels")
        if self.expected_particles is not None and not 0 < self.expected_particles < math.inf:
            bad("--expected-particles", self.expected_particles, "a positive number per micrograph")
        if self.normalization not in NORMALIZATIONS:
            bad("--normalize", self.normalization, f"one of {', '.join(NORMALIZATIONS)}")
        if self.dtype not in DTYPES:
            bad("--dtype", self.dtype, f"one of {', '.join(DTYPES)}")
        if self.chunk_size < 1:
            bad("--chunk-size", self.chunk_size, "a positive number of patches")

    @property
    def pos_radius(self):
        return self.positive_radius if self.positive_radius is not None else self.particle_radius / 2


# ----------------------------------------------------------------------------- the data of a run
def resolve_particle_radius(opts, paths, coordinates_path, log=None):
    """``(opts, pixel size or None)``: the pixel size of ``paths`` (``opts.pixel_size``, the MRC
    headers or the STAR optics block of ``coordinates_path``), and ``opts`` with the particle radius
    in px when it is given as a diameter in Angstrom; logs where the numbers came from."""
    log = log or logger
    pixel_size, pixel_source = resolve_pixel_size(paths, opts.pixel_size, coordinates_path, log)
    if opts.particle_diameter_A is not None:
        if not (math.isfinite(opts.particle_diameter_A) and opts.particle_diameter_A > 0):
            raise UserError(f"--particle-diameter-A is {opts.particle_diameter_A!r}, expected a positive number of "
                            f"Angstrom")
        if pixel_size is None:
            raise UserError(f"--particle-diameter-A {opts.particle_diameter_A:g} needs the pixel size, and neither the "
                            f"micrographs (no MRC header with one) nor {coordinates_path} (no optics block) give it; "
                            f"pass --pixel-size A/px, or --particle-radius in px")
        opts = dataclasses.replace(opts, particle_radius=opts.particle_diameter_A / 2 / pixel_size)
        log.info("particle radius %.2f px: diameter %g A / 2 / %g A/px (from %s)", opts.particle_radius,
                 opts.particle_diameter_A, pixel_size, pixel_source)
    elif pixel_size is not None:
        log.info("pixel size %g A/px (from %s): particle diameter %.0f A", pixel_size, pixel_source,
                 2 * opts.particle_radius * pixel_size if opts.particle_radius else float("nan"))
    return opts, pixel_size


def micrograph_roles(paths, opts):
    """Micrograph key -> 'train' / 'val' / 'test'; names given for val/test must exist."""
    keys = [micrograph_key(p.name) for p in paths]
    roles = dict.fromkeys(keys, "train")
    for role, names in (("val", opts.val_micrographs), ("test", opts.test_micrographs)):
        flag = f"--{role}-micrographs"
        for name in names:
            key = micrograph_key(name)
            if key not in roles:
                raise UserError(f"{flag}: no micrograph named {name!r} among the inputs "
                                f"(have {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''})")
            if roles[key] != "train":
                raise UserError(f"{flag}: micrograph {name!r} is already held out for {roles[key]}")
            roles[key] = role
    if "train" not in roles.values():
        raise UserError("every micrograph is held out for val/test: leave at least one for training")
    return roles


def labelled_subset(n, opts, rng):
    """Indices of the annotated particles kept as labelled positives on one micrograph."""
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    k = opts.labelled_count if opts.labelled_count is not None else max(1, round(opts.labelled_fraction * n))
    return np.sort(rng.choice(n, size=min(k, n), replace=False))


class ChunkWriter:
    """Collects patches and writes ``chunk_NNN.pt`` files of ``chunk_size`` patches, each with
    the run's ``metadata``; a single file becomes ``preprocessed_data.pt``."""

    def __init__(self, folder, chunk_size, dtype, metadata):
        self.folder, self.chunk_size, self.dtype, self.metadata = folder, chunk_size, dtype, metadata
        self.pos, self.unl, self.n_buffered, self.files = [], [], 0, []
        self.n_pos = self.n_unl = 0

    def add(self, positive, unlabeled):
        self.pos.append(positive.to("cpu", self.dtype))
        self.unl.append(unlabeled.to("cpu", self.dtype))
        self.n_pos += len(positive)
        self.n_unl += len(unlabeled)
        self.n_buffered += len(positive) + len(unlabeled)
        while self.n_buffered >= self.chunk_size:
            self.flush(self.chunk_size)

    def flush(self, n=None):
        """Write ``n`` buffered patches (positives first; all when ``n`` is None) as the next chunk."""
        if not self.n_buffered:
            return
        pos, unl = torch.cat(self.pos), torch.cat(self.unl)
        n = self.n_buffered if n is None else n
        k = min(n, len(pos))
        path = self.folder / f"chunk_{len(self.files):03d}.pt"
        save_checkpoint({"patches": {"positive": pos[:k].clone(), "unlabeled": unl[:n - k].clone()},
                         "metadata": self.metadata}, path)
        self.files.append(path)
        self.pos, self.unl = [pos[k:]], [unl[n - k:]]
        self.n_buffered -= n

    def finish(self):
        """Write the rest; one file only becomes preprocessed_data.pt."""
        self.flush()
        if len(self.files) == 1:
            target = self.folder / "preprocessed_data.pt"
            os.replace(self.files[0], target)
            self.files = [target]
        return self.files


def existing_data(out_dir):
    """Data files from an earlier preprocessing in ``out_dir`` (what ``--overwrite`` replaces)."""
    out_dir = Path(out_dir)
    return sorted(p.name for p in list(out_dir.glob("chunk_*.pt")) + [out_dir / n for n in DATA_FILES] if p.exists())


def window_geometry(paths, sizes, by_key, opts):
    """Micrograph key -> ``(h, w, scale, window centres, distance of each window centre to the
    nearest particle)`` (module docstring), from the micrographs' ``sizes`` (key -> ``(H, W)``) and
    their particles ``by_key`` (key -> ``[N, 2]`` x, y); UserError for a micrograph smaller than
    the window."""
    P = opts.patch_size
    geometry = {}
    for path in paths:
        key = micrograph_key(path.name)
        H, W = sizes[key]
        h, w = downsampled_shape((H, W), opts.downsample)
        if h < P or w < P:
            raise UserError(f"{path}: {w}x{h} px after downsampling by {opts.downsample:g} is smaller than "
                            f"--patch-size {P}")
        scale = (W / w, H / h)
        centres = window_centres(h, w, P, opts.stride)
        dist = _nearest_distance(to_original(centres[:, ::-1], scale), by_key.get(key, np.zeros((0, 2))))
        geometry[key] = (h, w, scale, centres, dist)
    return geometry


def class_prior(opts, train_geometry, train_sizes):
    """The class prior of the training micrographs (module docstring); UserError when it is unusable."""
    if opts.expected_particles is None:
        n_close = sum(int((g[4] <= opts.pos_radius).sum()) for g in train_geometry)
        n_windows = sum(len(g[3]) for g in train_geometry)
        prior = n_close / n_windows if n_windows else float("nan")
        if prior == 0:
            raise UserError(f"no unlabelled window is centred within {opts.pos_radius:g} px (--positive-radius) of an "
                            f"annotated particle, so the prior estimate is 0: use a smaller --stride or a larger "
                            f"--positive-radius")
    else:
        disc = math.pi * opts.pos_radius ** 2
        prior = float(np.mean([min(opts.expected_particles * disc / (H * W), 1.0) for H, W in train_sizes]))
    if not 0 < prior < 1:
        raise UserError(f"the prior estimate is {prior:g}, expected a value in (0, 1): check --particle-radius "
                        f"/ --positive-radius / --expected-particles")
    return prior


def data_metadata(opts, prior, pixel_size, coordinates_path, paths, roles):
    """The ``metadata`` every data file carries (what training and picking read back)."""
    return to_json_safe({
        "format_version": FORMAT_VERSION, "tool": "preprocess_cryoem.py",
        "patch_size": opts.patch_size + 2 * opts.context, "window_size": opts.patch_size, "context": opts.context,
        "stride": opts.stride, "downsample": float(opts.downsample), "normalization": opts.normalization,
        "particle_radius": float(opts.particle_radius), "positive_radius": float(opts.pos_radius),
        "pixel_size": pixel_size, "particle_diameter_A": opts.particle_diameter_A,
        "prior": float(prior),
        "prior_method": ("expected_particles" if opts.expected_particles is not None
                         else "annotated coordinates: fraction of unlabelled windows within positive_radius"),
        "expected_particles": opts.expected_particles,
        "labelled_fraction": None if opts.labelled_count is not None else float(opts.labelled_fraction),
        "labelled_count": opts.labelled_count, "seed": opts.seed, "dtype": opts.dtype,
        "coordinates": str(coordinates_path),
        "source_micrographs": [p.name for p in paths if roles[micrograph_key(p.name)] == "train"],
        "val_micrographs": [p.name for p in paths if roles[micrograph_key(p.name)] == "val"],
        "test_micrographs": [p.name for p in paths if roles[micrograph_key(p.name)] == "test"],
    })
