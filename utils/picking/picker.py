"""Pick particles on whole micrographs with a trained classifier.

One micrograph: read -> downsample + normalise exactly as the training patches were made
(the checkpoint's ``data_metadata``, written by preprocess_cryoem.py) -> probability map
(:func:`models.dense.probability_map`, in tiles of bounded size) -> every cell above the score
floor, one greedy non-maximum suppression and sub-cell refinement (:func:`utils.picking.peaks.find_peaks`)
-> candidates in the ORIGINAL micrograph's pixel frame (:func:`datasets.cryoem_preprocess.to_original`),
whatever the downsampling. The picks are the candidates whose score reaches the threshold:
``--threshold auto`` takes the one training stored in the checkpoint (:func:`resolve_threshold`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw

from datasets.cryoem_preprocess import NORMALIZATIONS, downsampled_shape, prepare_micrograph, to_original
from datasets.micrographs import read_micrograph
from models.dense import check_geometry, probability_map
from models.fixmatch_pu import FixMatchPUModel
from utils.checkpoint import load_checkpoint
from utils.errors import UserError
from utils.picking.peaks import find_peaks


# Default largest tile side (px of the downsampled micrograph) for the dense trunk; its peak memory
# against other tile sizes: benchmarks/README.md, "Picking memory" (why tiles: README, "Memory").
DEFAULT_TILE = 3072
# Candidates are kept down to this score (or the threshold, when lower), for re-thresholding.
DEFAULT_FLOOR = 0.01


@dataclass(frozen=True)
class PickSettings:
    """How to pick; distances in original micrograph pixels, ``stride`` and ``max_tile`` in
    downsampled pixels. ``threshold``: a number, or None while it waits for the candidates
    (:class:`ThresholdChoice`)."""
    threshold: float | None
    min_distance: float
    downsample: float
    normalization: str
    patch_size: int
    stride: int = 32
    mode: str = "dense"
    batch_size: int = 256
    refine: bool = True
    max_tile: int | None = DEFAULT_TILE
    floor: float = DEFAULT_FLOOR
    tta: bool = False
    dilate: bool = True  # models.dense.dilated_trunk below the trunk's stride (False: shift-and-stitch)

    @property
    def candidate_floor(self):
        """The lowest score a candidate keeps: the floor, or the threshold when that is lower."""
        return self.floor if self.threshold is None else min(self.floor, self.threshold)


def load_picker(path, device, which="model"):
    """``(model in eval mode, checkpoint dict)`` from a ``best_model.pt`` of the CryoEM trainer.

    ``which``: ``"model"`` (the EMA teacher, evaluated during training) or ``"student"``.
    """
    # an ANA file, a CryoEM last.pt (no data metadata), training data, ...: say what it is
    ckpt = load_checkpoint(path, map_location="cpu", expected=("cryoem-best",), flag="--checkpoint")
    missing = [k for k in (which, "backbone", "patch_size") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise UserError(f"{path}: missing key(s) {', '.join(missing)}; expected a best_model.pt written by "
                        f"train_pu_selective_fixmatch.py")
    model = FixMatchPUModel(ckpt["backbone"], context=int(ckpt.get("context", 0)))
    try:
        model.load_state_dict(ckpt[which])
    except RuntimeError as exc:
        raise UserError(f"{path}: '{which}' does not fit backbone {ckpt['backbone']}: "
                        f"{str(exc).strip().splitlines()[-1].strip()}") from None
    return model.to(device).eval(), ckpt


@dataclass(frozen=True)
class ThresholdChoice:
    """The picking threshold, or how to fix it once a run's candidates are known.

    ``value``: the threshold (None: set by the expected number of particles, ``particles_per_px``
    per original px^2, see :meth:`apply`); ``rule``: how it was chosen, for the log.
    """
    value: float | None
    rule: str
    particles_per_px: float | None = None

    def apply(self, scores, areas, floor=0.0):
        """``(threshold, rule)`` for a run whose candidates have ``scores`` on micrographs of ``areas``
        (original px^2): ``value``, or the score of the ``k``-th best candidate, ``k`` = the expected
        number of particles ``round(particles_per_px * sum(areas))`` (at least 1), so that the run keeps
        as many picks as the prior says there are (all candidates, and ``floor``, when there are fewer)."""
        if self.value is not None:
            return float(self.value), self.rule
        k = max(1, int(round(self.particles_per_px * float(sum(areas)))))
        ranked = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
        rule = f"{self.rule}; {k} particles expected on {len(areas)} micrograph(s): the score of the {k}th best candidate"
        if len(ranked) < k:
            return (float(ranked[-1]) if len(ranked) else float(floor)), rule + f" (only {len(ranked)} candidates)"
        return float(ranked[k - 1]), rule


def resolve_threshold(ckpt, path, threshold):
    """A :class:`ThresholdChoice`: ``threshold`` itself (a number), or for ``"auto"`` the rule training
    stored in the checkpoint (``picking_threshold``, see utils/cryoem/prior.py)."""
    if threshold != "auto":
        return ThresholdChoice(float(threshold), "given by --threshold")
    stored = ckpt.get("picking_threshold")
    if not isinstance(stored, dict):
        raise UserError(f"{path}: holds no picking threshold (trained before thresholds were stored); pass "
                        f"--threshold T, e.g. evaluate_picks.py's best-F1 threshold on an annotated micrograph")
    rule = f"auto: {stored.get('rule', '?')} rule, {stored.get('why', '')}".rstrip(", ")
    density = stored.get("particles_per_px")
    if isinstance(density, (int, float)) and not isinstance(density, bool) and density > 0:
        return ThresholdChoice(None, rule, float(density))
    if not isinstance(stored.get("value"), (int, float)):
        raise UserError(f"{path}: its picking_threshold holds neither a value nor particles_per_px; pass --threshold T")
    return ThresholdChoice(float(stored["value"]), rule)


def resolve_settings(ckpt, path, threshold, *, min_distance=None, downsample=None, normalization=None, stride=32,
                     mode="dense", batch_size=256, refine=True, max_tile=DEFAULT_TILE, floor=DEFAULT_FLOOR,
                     tta=False):
    """Fill what the flags leave open from the checkpoint's ``data_metadata``; UserError naming the flag.

    ``threshold`` is a number, or None when it is fixed later from the candidates (see
    :func:`resolve_threshold`); ``max_tile`` None means untiled.
    """
    meta = ckpt.get("data_metadata") or {}
    # a value the user did not type is named by where it came from: the checkpoint's data metadata
    named = {"--downsample": "--downsample", "--normalize": "--normalize", "--min-distance": "--min-distance"}
    if downsample is None:
        downsample = meta.get("downsample", 1.0)
        named["--downsample"] = f"{path}: its data metadata downsample (used as no --downsample was given)"
    if normalization is None:
        normalization = meta.get("normalization", "zscore")
        named["--normalize"] = f"{path}: its data metadata normalization (used as no --normalize was given)"
    if min_distance is None:
        min_distance = meta.get("particle_radius")
        named["--min-distance"] = f"{path}: its data metadata particle_radius (used as no --min-distance was given)"
        if min_distance is None:
            raise UserError(f"{path}: its data metadata hold no particle_radius (data not made by "
                            f"preprocess_cryoem.py); pass --min-distance")
    if isinstance(downsample, bool) or not isinstance(downsample, (int, float)) or not downsample >= 1:
        raise UserError(f"{named['--downsample']} is {downsample!r}, expected a factor >= 1")
    if normalization not in NORMALIZATIONS:
        raise UserError(f"{named['--normalize']} is {normalization!r}, expected one of {', '.join(NORMALIZATIONS)}")
    if isinstance(min_distance, bool) or not isinstance(min_distance, (int, float)) or not min_distance > 0:
        raise UserError(f"{named['--min-distance']} is {min_distance!r}, expected a positive number of pixels")
    if threshold is not None and not 0 <= threshold <= 1:
        raise UserError(f"--threshold is {threshold!r}, expected a probability in [0, 1] or auto")
    if not 0 <= floor <= 1:
        raise UserError(f"--score-floor is {floor!r}, expected a probability in [0, 1]")
    patch_size = int(ckpt["patch_size"])
    if mode == "dense":
        try:
            check_geometry(patch_size, stride)
        except ValueError as exc:
            raise UserError(f"--stride {stride} with patch size {patch_size}: {exc}") from None
    elif stride < 1:
        raise UserError(f"--stride is {stride!r}, expected a positive number of pixels")
    if max_tile is not None and max_tile < patch_size:
        raise UserError(f"--tile-size is {max_tile!r}, expected at least the patch size {patch_size} px (or 0 for "
                        f"no tiling)")
    return PickSettings(threshold=None if threshold is None else float(threshold), min_distance=float(min_distance), downsample=float(downsample),
                        normalization=normalization, patch_size=patch_size, stride=int(stride), mode=mode,
                        batch_size=int(batch_size), refine=bool(refine), max_tile=max_tile, floor=float(floor),
                        tta=bool(tta))


def window_size(ckpt):
    """Side of the classified window in downsampled px (the patch without its context)."""
    meta = ckpt.get("data_metadata") or {}
    return int(meta.get("window_size", int(ckpt["patch_size"]) - 2 * int(ckpt.get("context", 0))))


def check_micrographs(paths, settings, window):
    """``{path: (H, W)}``, reading every micrograph once before anything is written; a
    :class:`UserError` names the first that cannot be picked: unreadable, NaN/infinite or constant
    pixels (see :func:`datasets.micrographs.read_micrograph`), or smaller than the model's
    classified ``window`` (px, see :func:`window_size`) after downsampling, as preprocess_cryoem.py
    refuses it."""
    sizes = {}
    for path in paths:
        H, W = read_micrograph(path).shape
        h, w = downsampled_shape((H, W), settings.downsample)
        if h < window or w < window:
            raise UserError(f"{path}: {W}x{H} px, {w}x{h} after downsampling by {settings.downsample:g}, is smaller "
                            f"than the model's {window} px window; expected at least {window} px per side after "
                            f"downsampling")
        sizes[path] = (H, W)
    return sizes


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def pick_micrograph(model, array, settings, device, name=""):
    """Candidates of one micrograph array ``[H, W]``: ``(DataFrame micrograph,x,y,score, prob map, timing dict)``.

    Every candidate scores at least ``settings.candidate_floor``; the picks at the threshold are
    those with ``score >= settings.threshold`` (greedy NMS decides each candidate from higher-scored
    ones only, so they are exactly the picks of a run at that threshold). Rows are sorted by
    descending score; x, y are in the original pixel frame.
    """
    t0 = time.perf_counter()
    image, scale = prepare_micrograph(array, settings.downsample, settings.normalization, device=device)
    _sync(device)
    t1 = time.perf_counter()
    prob = probability_map(model, image, settings.patch_size, settings.stride, settings.mode, settings.batch_size,
                           max_tile=settings.max_tile if settings.mode == "dense" else None, tta=settings.tta,
                           dilate=settings.dilate)
    _sync(device)
    t2 = time.perf_counter()
    # peaks in map cells (one cell = stride downsampled px), then to the original frame
    cell = settings.stride * min(scale)
    ab, scores = find_peaks(prob.cpu(), settings.candidate_floor, settings.min_distance / cell, refine=settings.refine)
    uv = np.asarray(ab, dtype=np.float64).reshape(-1, 2) * settings.stride  # (col, row) in downsampled px
    xy = to_original(uv, scale)
    t3 = time.perf_counter()
    picks = pd.DataFrame({"micrograph": name, "x": xy[:, 0], "y": xy[:, 1], "score": np.asarray(scores, np.float64)})
    return picks, prob.cpu(), {"prepare_s": t1 - t0, "map_s": t2 - t1, "peaks_s": t3 - t2}


def overlay_image(array, picks, radius, max_side=1024, threshold=None):
    """RGB PNG-ready image: the micrograph (contrast-stretched, shrunk to ``max_side``) with a
    circle of ``radius`` (original px) per pick; picks below ``threshold`` are drawn thinner in grey."""
    a = np.asarray(array, dtype=np.float32)
    lo, hi = np.percentile(a, [1, 99])
    grey = np.clip((a - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)
    img = Image.fromarray(grey).convert("RGB")
    f = min(1.0, max_side / max(img.size))
    if f < 1:
        img = img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))), Image.BILINEAR)
    draw = ImageDraw.Draw(img)
    r = max(2.0, radius * f)
    for x, y, s in zip(picks["x"], picks["y"], picks["score"]):
        weak = threshold is not None and s < threshold
        cx, cy = (x + 0.5) * f - 0.5, (y + 0.5) * f - 0.5
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=(150, 150, 150) if weak else (0, 220, 60),
                     width=1 if weak else 2)
    return img
