"""The class prior pi of the nnPU risk (Kiryo et al. 2017) and the picking threshold it sets.

``loss.prior`` travels: YAML (or ``--prior``) -> :func:`resolve_prior` (``auto`` = the data's
``metadata.prior``) -> :class:`utils.cryoem.epoch.StepParams` -> ``nnpu_loss``; it is stored in
``best_model.pt["prior"]`` and results.json, and :func:`picking_threshold` turns it into the
threshold ``pick_particles.py --threshold auto`` uses (README, CryoEM "The prior" and "The threshold").
"""
import math

import torch

from utils.cryoem.epoch import evaluate
from utils.errors import UserError
from utils.picking.peaks import prior_threshold
from utils.seed import seeded_loader

# The documented default of loss.prior when the data hold no estimate (README, CryoEM "Config").
DOCUMENTED_PRIOR = 0.3
# at most this many unlabelled training patches are scored for the prior rule (a seeded subset)
MAX_THRESHOLD_PATCHES = 20000


def _source(data):
    return data.files[0] if data.files else "data.data_dir"


def _metadata_prior(data):
    return data.metadata.get("prior") if isinstance(data.metadata, dict) else None


def resolve_prior(cfg, data, log):
    """The class prior of the run: ``loss.prior``, or for ``auto`` the data's ``metadata.prior``.

    Training data written by other tools (``preprocessed_data.pt``) need not carry a prior: ``auto``
    then uses the documented default 0.3 and ``log`` gets a warning; a ``metadata.prior`` that is
    present but not a number in (0, 1) is an error (a broken file, not a missing estimate). A
    configured prior more than 2x off the data's estimate is a warning (:func:`prior_mismatch`).
    """
    prior = cfg["loss"]["prior"]
    meta = _metadata_prior(data)
    if prior != "auto":
        prior = float(prior)
    elif meta is None:
        prior = DOCUMENTED_PRIOR
        log.warning(
            f"WARNING: loss.prior is 'auto' but the data in {_source(data)} hold no metadata.prior (no estimate from "
            f"preprocess_cryoem.py): using {DOCUMENTED_PRIOR:g}, the documented default, NOT an estimate of this "
            f"data's prior; the nnPU risk and the picking threshold depend on it: set loss.prior in the YAML config "
            f"or pass --prior P (e.g. --prior 0.1)")
    elif not isinstance(meta, (int, float)) or isinstance(meta, bool) or not 0.0 < meta < 1.0:
        raise UserError(f"loss.prior is 'auto' but the data in {_source(data)} "
                        f"has metadata.prior {meta!r}, expected a number in (0, 1); set loss.prior to a number")
    else:
        prior = float(meta)
    mismatch = prior_mismatch(prior, data)
    if mismatch:
        log.warning(mismatch)
    return prior


def prior_origin(cfg, data):
    """Where the run's prior came from, for its log line: "" (the config), or the data's metadata,
    or the documented default."""
    if cfg["loss"]["prior"] != "auto":
        return ""
    return " (from the data's metadata)" if _metadata_prior(data) is not None \
        else " (the documented default: the data hold no prior)"


def prior_mismatch(prior, data):
    """A warning when a configured prior is more than 2x off the data's own estimate, else None."""
    meta = _metadata_prior(data)
    if not isinstance(meta, (int, float)) or isinstance(meta, bool) or not 0 < meta < 1:
        return None
    if max(prior / meta, meta / prior) <= 2:
        return None
    return (f"WARNING: loss.prior {prior:g} is {max(prior / meta, meta / prior):.1f}x off the prior the data in "
            f"{_source(data)} was made with ({meta:.4g}); the nnPU risk and the "
            f"picking threshold depend on it: set loss.prior: auto to use the data's")


def picking_threshold(model, data, prior, val, device, cfg):
    """How ``pick_particles.py --threshold auto`` picks, as a dict (``rule``, ``why``, and the rule's numbers).

    * ``val_best_f1``: ``value`` = the best-F1 threshold on a LABELLED val set (``val.pt``: held-out
      micrographs whose every particle is annotated), when there is one with both classes;
    * ``prior`` (data made from micrographs by preprocess_cryoem.py): otherwise (val is a
      positive-vs-unlabelled hold-out, whose F1 is biased by the particles hidden among the
      unlabelled) the prior says how many particles a micrograph holds: the fraction ``prior`` of
      windows lies within ``positive_radius`` of a particle, i.e. ``particles_per_px = prior /
      (pi * positive_radius^2)`` per original px^2 (Topaz's estimate, inverted); picking then keeps
      that many picks per micrograph area, i.e. the threshold is the score of the last of them
      (utils/picking/picker.py). It is fixed on the dense map's own peaks, because a window's
      score and a peak's differ (a peak is the best of its neighbourhood, and for a small window
      the dense map is not the crop classifier, models/dense.py);
    * ``prior_windows`` (patch data without micrograph geometry): ``value`` = the score above which
      the fraction ``prior`` of the unlabelled training windows lies
      (:func:`utils.picking.peaks.prior_threshold`).
    """
    if val is not None and not data.val.heldout and math.isfinite(val.get("best_f1_threshold", math.nan)):
        return {"value": float(val["best_f1_threshold"]), "rule": "val_best_f1", "val_best_f1": val["best_f1"],
                "why": f"best F1 {val['best_f1']:.3f} on the labelled val set"}
    meta = data.metadata if isinstance(data.metadata, dict) else {}
    radius = meta.get("positive_radius")
    if isinstance(radius, (int, float)) and not isinstance(radius, bool) and radius > 0:
        density = float(prior) / (math.pi * float(radius) ** 2)
        return {"rule": "prior", "prior": float(prior), "positive_radius": float(radius), "particles_per_px": density,
                "why": f"prior {prior:.3g} of windows within {radius:g} px of a particle: {density * 1e6:.3g} "
                       f"particles per million px, as many picks per micrograph"}
    n_unl, n_pos = data.train.n_unl, data.train.n_pos
    index = torch.arange(n_pos, n_pos + n_unl)
    if n_unl > MAX_THRESHOLD_PATCHES:
        generator = torch.Generator().manual_seed(int(cfg["training"]["seed"]))
        index = index[torch.randperm(n_unl, generator=generator)[:MAX_THRESHOLD_PATCHES]]
    subset = torch.utils.data.Subset(data.train, index.tolist())
    loader = seeded_loader(subset, device, cfg["data"]["num_workers"], cfg["training"]["seed"],
                           batch_size=2 * cfg["training"]["batch_size"])
    _, scores = evaluate(model, loader, device, desc="threshold")
    value = prior_threshold(scores.numpy(), prior)
    return {"value": value, "rule": "prior_windows", "prior": float(prior), "n_windows": len(index),
            "why": f"the top {prior:.3g} (the prior) of {len(index)} unlabelled training windows score above it"}
