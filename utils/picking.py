"""Particle picking: peaks of a probability map, and picks scored against reference coordinates.

Coordinates are particle centres in original micrograph pixels, x = column, y = row of the
array as read (see datasets/micrographs.py); no flips anywhere.

Matching rule (used by :func:`match_picks` and :func:`evaluate_picks`): picks are taken in
descending score order (stable, so equal scores keep their input order) and each one is matched
to the NEAREST still-unmatched reference particle within ``radius`` (distance <= radius); a
reference particle is matched at most once, and a pick that finds none is a false positive.
The matching is done once, at the lowest threshold; the picks above a threshold are a prefix of
the ranking, so the precision/recall of every threshold is a point of the same PR curve.
"""
import logging
import math

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.spatial import cKDTree

from datasets.micrographs import micrograph_key
from utils.errors import UserError

logger = logging.getLogger(__name__)

MAX_CURVE_POINTS = 1000  # the overall PR curve is subsampled to this many points for the JSON


def _widened(r):
    """A search radius a hair above ``r``: the tree's own rounding must not lose a point at exactly
    ``r``; the rule itself is then applied to distances computed with ``np.hypot``."""
    return r * (1 + 1e-9) + 1e-12


# ------------------------------------------------------------------------------------- peaks

def _to_numpy(x):
    """A numpy array from a numpy array, list or torch tensor (any device, with or without grad)."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def nms(xy, scores, min_distance):
    """Greedy non-maximum suppression; return the kept indices (int64) in descending score order.

    Points are visited by descending score (stable: equal scores keep their input order); a
    point is dropped when an already KEPT point lies closer than ``min_distance`` (Euclidean,
    strictly closer: a point exactly ``min_distance`` away is kept). Dropped points suppress
    nothing. ``min_distance <= 0`` keeps every point.
    """
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(xy) != len(scores):
        raise ValueError(f"expected one score per point, got {len(xy)} points and {len(scores)} scores")
    order = np.argsort(-scores, kind="stable")
    if min_distance <= 0 or len(xy) < 2:
        return order.astype(np.int64)
    tree = cKDTree(xy)
    suppressed = np.zeros(len(xy), dtype=bool)
    kept = []
    for i in order:
        if suppressed[i]:
            continue
        kept.append(i)
        near = np.asarray(tree.query_ball_point(xy[i], _widened(min_distance)), dtype=np.int64)
        if len(near):
            d = np.hypot(*(xy[near] - xy[i]).T)
            suppressed[near[d < min_distance]] = True
    return np.asarray(kept, dtype=np.int64)


def find_peaks(prob_map, threshold, min_distance, origin=(0.0, 0.0), step=1.0):
    """Particle centres from a 2-D probability map: ``(xy [N, 2] float64, scores [N] float64)``.

    ``prob_map`` is a numpy array or torch tensor ``[h, w]``; its cell ``(a, b)`` (row, column)
    lies at ``x = origin[0] + b * step``, ``y = origin[1] + a * step`` in original micrograph
    pixels (e.g. ``step`` = the network's stride, ``origin`` = the centre of the first window).
    A cell is a peak when its value is ``>= threshold`` and ``>=`` every value of the
    ``(2k+1) x (2k+1)`` cells around it (cells outside the map are ignored), where
    ``k = max(1, floor(min_distance / step))``. Peaks then go through :func:`nms` with
    ``min_distance`` in original pixels, so plateaus (several equal cells) give no two peaks
    closer than ``min_distance``. NaN cells are never peaks. Returned by descending score
    (equal scores in row-major order of the map).
    """
    values = _to_numpy(prob_map).astype(np.float64)
    if values.ndim != 2:
        raise ValueError(f"expected a 2-D probability map [h, w], got shape {values.shape}")
    if step <= 0:
        raise ValueError(f"step must be > 0, got {step}")
    values = np.where(np.isnan(values), -np.inf, values)
    k = max(1, math.floor(min_distance / step))
    # 'nearest' pads with values of the map itself, so the maximum is over in-map cells only
    local_max = ndimage.maximum_filter(values, size=2 * k + 1, mode="nearest")
    rows, cols = np.nonzero((values >= local_max) & (values >= threshold) & np.isfinite(values))
    scores = values[rows, cols]
    xy = np.stack([origin[0] + cols * float(step), origin[1] + rows * float(step)], axis=1).astype(np.float64)
    keep = nms(xy, scores, min_distance)
    return xy[keep].reshape(-1, 2), scores[keep]


# ---------------------------------------------------------------------------------- matching

def match_picks(pred_xy, pred_scores, true_xy, radius):
    """Match picks to reference particles of ONE micrograph; return ``(order, is_tp)``.

    ``order = np.argsort(-pred_scores, kind="stable")`` (descending score, ties in input order)
    and ``is_tp[j]`` (bool) tells whether pick ``order[j]`` was matched. Greedy in that order:
    each pick takes the nearest still-unmatched reference particle with distance ``<= radius``
    (equally near ones: the lowest index); one-to-one, so a second pick on a particle is a false
    positive. Greedy by score is not a maximum matching: a high-scored pick between two particles
    takes the nearer one even when that leaves a lower-scored pick without a partner.
    """
    pred_xy = np.asarray(pred_xy, dtype=np.float64).reshape(-1, 2)
    pred_scores = np.asarray(pred_scores, dtype=np.float64).reshape(-1)
    true_xy = np.asarray(true_xy, dtype=np.float64).reshape(-1, 2)
    if len(pred_xy) != len(pred_scores):
        raise ValueError(f"expected one score per pick, got {len(pred_xy)} picks and {len(pred_scores)} scores")
    order = np.argsort(-pred_scores, kind="stable")
    is_tp = np.zeros(len(order), dtype=bool)
    if len(order) == 0 or len(true_xy) == 0:
        return order, is_tp
    tree = cKDTree(true_xy)
    candidates = tree.query_ball_point(pred_xy[order], _widened(radius))
    taken = np.zeros(len(true_xy), dtype=bool)
    for j, near in enumerate(candidates):
        near = np.asarray(sorted(near), dtype=np.int64)
        near = near[~taken[near]]
        if len(near) == 0:
            continue
        d = np.hypot(*(true_xy[near] - pred_xy[order[j]]).T)
        best = int(np.argmin(d))  # first of equally near ones = the lowest index
        if d[best] <= radius:
            taken[near[best]] = True
            is_tp[j] = True
    return order, is_tp


def _f1(precision, recall):
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def _subsample(n, max_points):
    """Indices of at most ``max_points`` evenly spread points of ``n``, first and last included."""
    if n <= max_points:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max_points).round().astype(np.int64))


def ranking_metrics(scores, is_tp, n_targets, threshold, scored=True, curve=False):
    """Metrics of picks ranked by descending score (``scores``, ``is_tp`` already in that order).

    - ``n_picks`` = picks with ``score >= threshold``, ``tp`` = the matched ones among them;
      precision = tp / n_picks (0 when no pick passes), recall = tp / n_targets (0 when there are
      no targets), F1 = their harmonic mean (0 when both are 0).
    - ``average_precision`` = sum over the ranking of precision@k x (1 if pick k is a new true
      positive) / n_targets (Topaz's definition: unmatched targets count, so it is at most the
      recall of all picks); equal scores are taken in their ranked (stable) order.
    - ``best_f1`` (with its threshold, precision, recall): the maximum F1 over thresholds at the
      picks' scores, picks of equal score entering together (one threshold step); on equal F1
      the higher threshold. NaN threshold when there are no picks.
    - ``curve`` (when asked): precision, recall and threshold at each such step, from the highest
      threshold down, subsampled to at most ``MAX_CURVE_POINTS`` points.

    ``scored=False`` (picks without scores): every pick counts as picked, AP is NaN and the
    best-F1 point is that of all picks, at a NaN threshold.
    """
    scores = np.asarray(scores, dtype=np.float64)
    is_tp = np.asarray(is_tp, dtype=bool)
    n = len(scores)
    cum_tp = np.cumsum(is_tp)
    ranks = np.arange(1, n + 1)
    precision_at = cum_tp / np.maximum(ranks, 1)
    recall_at = cum_tp / n_targets if n_targets > 0 else np.zeros(n)

    n_picks = int(np.sum(scores >= threshold)) if scored else n
    tp = int(cum_tp[n_picks - 1]) if n_picks > 0 else 0
    precision = tp / n_picks if n_picks > 0 else 0.0
    recall = tp / n_targets if n_targets > 0 else 0.0

    if scored:
        ap = float(np.sum(precision_at[is_tp]) / n_targets) if n_targets > 0 else 0.0
        # the last pick of each group of equal scores: one threshold step per distinct score
        step_end = np.flatnonzero(np.append(scores[1:] != scores[:-1], True)) if n else np.array([], dtype=np.int64)
    else:
        ap = math.nan
        step_end = np.array([n - 1]) if n else np.array([], dtype=np.int64)
    step_p, step_r = precision_at[step_end], recall_at[step_end]
    step_thr = scores[step_end] if scored else np.full(len(step_end), math.nan)
    step_f1 = np.array([_f1(p, r) for p, r in zip(step_p, step_r)])

    out = {"n_picks_total": n, "n_targets": int(n_targets), "n_picks": n_picks, "tp": tp,
           "precision": precision, "recall": recall, "f1": _f1(precision, recall),
           "average_precision": ap}
    if len(step_end):
        b = int(np.argmax(step_f1))  # first maximum = highest threshold
        out.update(best_f1=float(step_f1[b]), best_f1_threshold=float(step_thr[b]),
                   best_f1_precision=float(step_p[b]), best_f1_recall=float(step_r[b]))
    else:
        out.update(best_f1=0.0, best_f1_threshold=math.nan, best_f1_precision=0.0, best_f1_recall=0.0)
    if curve:
        keep = _subsample(len(step_end), MAX_CURVE_POINTS)
        out["curve"] = {"precision": step_p[keep].tolist(), "recall": step_r[keep].tolist(),
                        "threshold": step_thr[keep].tolist()}
    return out


def _names(keys, limit=3):
    keys = list(keys)
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _rows_by_key(keys):
    """``{key: row positions}`` (positions in input order) of an array of micrograph keys."""
    return pd.Series(keys, dtype=object).groupby(keys, sort=False).indices if len(keys) else {}


def evaluate_picks(picks, reference, radius, threshold, micrographs=None):
    """Score ``picks`` against ``reference`` per micrograph and overall; return a JSON-ready dict.

    Both are coordinate tables (columns micrograph, x, y, score; the reference's score is
    ignored), grouped by :func:`datasets.micrographs.micrograph_key`, so "a/Falcon_1.mrc" and
    "Falcon_1" are the same micrograph. Evaluated micrographs: the keys of ``micrographs`` when
    given (each must be in the reference; one without picks counts with zero picks), otherwise the
    keys present in ``picks`` (a warning names reference micrographs left out; every picks key
    must be in the reference). Picks are matched per micrograph only (see the module docstring:
    greedy by descending score, nearest unmatched target within ``radius``), so a pick never
    matches a particle of another micrograph; the overall ranking pools the scores of all
    evaluated micrographs. Picks must all have a score or all have none (NaN); see
    :func:`ranking_metrics` for the metrics and for picks without scores.

    Returns ``{"radius", "threshold", "overall": M, "per_micrograph": {key: M}}``, M as in
    :func:`ranking_metrics`, with a ``curve`` in ``overall`` only. Mismatched names raise
    :class:`UserError`.
    """
    pick_keys = picks["micrograph"].astype(str).map(micrograph_key).to_numpy()
    ref_keys = reference["micrograph"].astype(str).map(micrograph_key).to_numpy()
    ref_set = set(ref_keys)
    if micrographs is not None:
        evaluated = list(dict.fromkeys(micrograph_key(str(m)) for m in micrographs))
        unknown = [k for k in evaluated if k not in ref_set]
        if unknown:
            raise UserError(f"micrographs {_names(unknown)}: not in the reference; expected names of "
                            f"the reference such as {_names(sorted(ref_set))}")
        if not evaluated:
            raise UserError("no micrographs to evaluate: the list of micrograph names is empty")
    else:
        evaluated = sorted(set(pick_keys))
        if not evaluated:
            raise UserError("picks: no coordinates to evaluate")
        unknown = [k for k in evaluated if k not in ref_set]
        if unknown:
            raise UserError(f"picks: micrographs {_names(unknown)} have no particles in the reference; "
                            f"expected names of the reference such as {_names(sorted(ref_set))}")
        left_out = sorted(ref_set - set(evaluated))
        if left_out:
            logger.warning("reference: %d micrograph(s) without any pick are not evaluated (%s); "
                           "name them with the micrograph list to count their particles as missed",
                           len(left_out), _names(left_out))

    chosen = np.isin(pick_keys, evaluated)
    pick_scores = picks["score"].to_numpy(dtype=np.float64)
    nan_scores = np.isnan(pick_scores[chosen])
    scored = not nan_scores.all() if len(nan_scores) else True
    if scored and nan_scores.any():
        first = picks["micrograph"].to_numpy()[chosen][nan_scores][0]
        raise UserError(f"picks: {int(nan_scores.sum())} of {len(nan_scores)} scores are missing (NaN), "
                        f"first on micrograph {first!r}; expected a score for every pick or for none")
    if not scored:
        logger.warning("picks have no scores: every pick counts as picked, the threshold is not "
                       "used and average precision is undefined (NaN)")

    pick_xy = picks[["x", "y"]].to_numpy(dtype=np.float64)
    ref_xy = reference[["x", "y"]].to_numpy(dtype=np.float64)
    pick_rows, ref_rows = _rows_by_key(pick_keys), _rows_by_key(ref_keys)
    none = np.array([], dtype=np.int64)
    per_micrograph, pooled_scores, pooled_tp, n_targets_total = {}, [], [], 0
    for key in evaluated:
        mine, theirs = pick_rows.get(key, none), ref_rows.get(key, none)
        scores = pick_scores[mine] if scored else np.zeros(len(mine))
        order, is_tp = match_picks(pick_xy[mine], scores, ref_xy[theirs], radius)
        n_targets = len(theirs)
        per_micrograph[key] = ranking_metrics(scores[order], is_tp, n_targets, threshold, scored=scored)
        pooled_scores.append(scores[order])
        pooled_tp.append(is_tp)
        n_targets_total += n_targets
    scores, is_tp = np.concatenate(pooled_scores), np.concatenate(pooled_tp)
    order = np.argsort(-scores, kind="stable")
    overall = ranking_metrics(scores[order], is_tp[order], n_targets_total, threshold, scored=scored, curve=True)
    return {"radius": float(radius), "threshold": float(threshold), "overall": overall,
            "per_micrograph": per_micrograph}
