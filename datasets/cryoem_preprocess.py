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

What is written (``run_preprocess``), from the training micrographs (all but val/test):

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
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.spatial import cKDTree

from datasets.micrographs import (check_coordinates, drop_duplicate_coordinates, list_micrographs, micrograph_key,
                                  micrograph_shape, read_coordinates, read_micrograph, resolve_pixel_size, write_csv)
from utils.checkpoint import save_checkpoint
from utils.checks import check_output_dir
from utils.errors import UserError
from utils.io import to_json_safe, write_json
from utils.run_lock import RunLock

NORMALIZATIONS = ("zscore", "none")
DTYPES = {"float16": torch.float16, "float32": torch.float32}
FORMAT_VERSION = 1
DATA_FILES = ("preprocessed_data.pt", "val.pt", "test.pt", "labelled_positives.csv", "preprocess.json")


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


# ----------------------------------------------------------------------------- the run
def _roles(paths, opts):
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


def _labelled_subset(n, opts, rng):
    """Indices of the annotated particles kept as labelled positives on one micrograph."""
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    k = opts.labelled_count if opts.labelled_count is not None else max(1, round(opts.labelled_fraction * n))
    return np.sort(rng.choice(n, size=min(k, n), replace=False))


class _ChunkWriter:
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


def _install(tmp, out_dir):
    """Move the new files from ``tmp`` into ``out_dir``, replacing the previous preprocessing."""
    for old in list(out_dir.glob("chunk_*.pt")) + [out_dir / n for n in DATA_FILES]:
        if old.exists() and not (tmp / old.name).exists():
            old.unlink()
    for new in sorted(tmp.iterdir()):
        os.replace(new, out_dir / new.name)


def existing_data(out_dir):
    """Data files from an earlier preprocessing in ``out_dir`` (what ``--overwrite`` replaces)."""
    out_dir = Path(out_dir)
    return sorted(p.name for p in list(out_dir.glob("chunk_*.pt")) + [out_dir / n for n in DATA_FILES] if p.exists())


def _prior(opts, train_geometry, train_sizes):
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


def run_preprocess(micrograph_inputs, coordinates_path, out_dir, opts, logger=None, overwrite=False):
    """Write the training files for ``micrograph_inputs`` + ``coordinates_path`` into ``out_dir``.

    Returns the summary that is also written to ``preprocess.json``. Everything is written to
    a temporary folder inside ``out_dir`` first and moved into place at the end, so an error
    (bad input found late) leaves an earlier preprocessing untouched.
    """
    log = logger or logging.getLogger(__name__)
    paths = list_micrographs(micrograph_inputs)
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
    opts.check()
    out_dir = Path(out_dir)
    check_output_dir(out_dir, "--output-dir")
    lock = RunLock(out_dir, hint="or choose another --output-dir")
    lock.check()
    if existing_data(out_dir) and not overwrite:
        raise UserError(f"{out_dir} already holds preprocessed data ({', '.join(existing_data(out_dir)[:3])}); "
                        f"pass --overwrite to replace it or choose another --output-dir")
    roles = _roles(paths, opts)
    coords, info = read_coordinates(coordinates_path)
    log.info(info)

    # headers only: the micrograph sizes fix the frames, the windows and the prior before any
    # pixel is decoded (an unreadable file found later still leaves out_dir untouched)
    sizes = {micrograph_key(p.name): micrograph_shape(p) for p in paths}
    coords = drop_duplicate_coordinates(check_coordinates(coords, sizes, str(coordinates_path), log),
                                        str(coordinates_path), log)
    by_key = {k: g[["x", "y"]].to_numpy(np.float64) for k, g in coords.groupby("key", sort=False)}
    P = opts.patch_size
    full = P + 2 * opts.context  # stored patch: the window and its context on every side
    geometry = {}  # key -> (h, w, scale, window centres, distance of each window to the nearest particle)
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
    prior = _prior(opts, [geometry[k] for k in geometry if roles[k] == "train"],
                   [sizes[k] for k in sizes if roles[k] == "train"])
    metadata = to_json_safe({
        "format_version": FORMAT_VERSION, "tool": "preprocess_cryoem.py",
        "patch_size": full, "window_size": P, "context": opts.context, "stride": opts.stride,
        "downsample": float(opts.downsample), "normalization": opts.normalization,
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

    rng = np.random.default_rng(opts.seed)
    dtype = DTYPES[opts.dtype]
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    lock.acquire()
    tmp = None
    try:
        lock.tidy(log)
        for old in out_dir.glob(".preprocess-*"):  # left by a killed run (we hold the lock: not a live one)
            shutil.rmtree(old, ignore_errors=True)
            log.info("removed %s, left by an interrupted preprocessing", old)
        tmp = Path(tempfile.mkdtemp(prefix=".preprocess-", dir=out_dir))
        writer = _ChunkWriter(tmp, opts.chunk_size, dtype, metadata)
        held = {"val": {"patches": [], "labels": []}, "test": {"patches": [], "labels": []}}
        per_mic, labelled_rows = {}, []
        for path in paths:
            key = micrograph_key(path.name)
            h, w, scale, centres, dist = geometry[key]
            image, _ = prepare_micrograph(read_micrograph(path), opts.downsample, opts.normalization)
            if tuple(image.shape) != (h, w):
                raise UserError(f"{path}: decoded as {image.shape[1]}x{image.shape[0]} px after downsampling, but its "
                                f"header says {w}x{h}")
            xy = by_key.get(key, np.zeros((0, 2)))
            particle_rc = np.rint(to_downsampled(xy, scale)[:, ::-1]).astype(np.int64)
            role = roles[key]
            stats = {"role": role, "size": [int(sizes[key][1]), int(sizes[key][0])], "n_annotated": len(xy)}
            if role == "train":
                keep = _labelled_subset(len(xy), opts, rng)
                writer.add(crops_at(image, particle_rc[keep], full), crops_at(image, centres, full))
                for x, y in xy[keep]:
                    labelled_rows.append((path.name, float(x), float(y)))
                stats.update(n_labelled=len(keep), n_unlabeled=len(centres))
                if len(xy) == 0:
                    log.warning("%s: no annotated particle in %s: it gives unlabelled patches only",
                                path, coordinates_path)
            else:
                neg = centres[dist > opts.particle_radius]
                patches = torch.cat([crops_at(image, particle_rc, full), crops_at(image, neg, full)])
                held[role]["patches"].append(patches.to("cpu", dtype))
                held[role]["labels"].append(torch.cat([torch.ones(len(particle_rc)), torch.zeros(len(neg))]))
                stats.update(n_positive=len(particle_rc), n_negative=len(neg))
                if len(xy) == 0:
                    log.warning("%s is held out for %s but has no annotated particle in %s: all its patches are "
                                "labelled 0", path, role, coordinates_path)
            per_mic[path.name] = stats
            log.info("%s (%s): %s", path.name, role, ", ".join(f"{k} {v}" for k, v in stats.items() if k != "role"))
            del image

        if writer.n_pos == 0:
            raise UserError(f"no labelled positive: no annotated particle of {coordinates_path} lies on a training "
                            f"micrograph")
        files = writer.finish()
        for role, parts in held.items():
            if parts["patches"]:
                save_checkpoint({"patches": torch.cat(parts["patches"]), "labels": torch.cat(parts["labels"])},
                                tmp / f"{role}.pt")
        write_csv(tmp / "labelled_positives.csv",
                  pd.DataFrame(labelled_rows, columns=["micrograph", "x", "y"]).assign(score=np.nan))
        summary = {"metadata": metadata, "micrographs": per_mic,
                   "n_positive": writer.n_pos, "n_unlabeled": writer.n_unl,
                   "files": [p.name for p in files] + [f"{r}.pt" for r in held if held[r]["patches"]],
                   "options": to_json_safe(asdict(opts))}
        write_json(tmp / "preprocess.json", summary)
        _install(tmp, out_dir)
    except UserError as exc:  # a full disk names the temporary folder's file: name its real place
        if tmp is None or str(tmp) not in str(exc):
            raise
        raise UserError(str(exc).replace(str(tmp), str(out_dir))) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        lock.release()
        if created and not any(out_dir.iterdir()):  # a failed first run leaves no empty folder behind
            out_dir.rmdir()
    log.info("wrote %s to %s: %d labelled positives, %d unlabelled patches, prior %.4f (%s)",
             ", ".join(summary["files"]), out_dir, writer.n_pos, writer.n_unl, prior, metadata["prior_method"])
    return summary
