"""Picks scored against reference coordinates: one-to-one matching, PR curve, AP, best F1.

Coordinates are particle centres in original micrograph pixels, x = column, y = row of the
array as read (see datasets/micrographs.py); no flips here. Peak finding is in
utils/picking/peaks.py.

Matching rules (used by :func:`match_picks` and :func:`evaluate_picks`), one to one within
``radius`` (distance <= radius) on each micrograph:

* ``greedy`` (default): picks are taken in descending score order (stable, so equal scores keep
  their input order) and each one is matched to the NEAREST still-unmatched reference particle;
  a pick that finds none is a false positive.
* ``assignment``: an optimal matching that ignores the scores, as Topaz's precision-recall tool
  (Bepler et al. 2019): as many pairs as possible, and among those the smallest sum of squared
  distances (``scipy.optimize.linear_sum_assignment``). A low-scored pick can then hold a particle
  that a high-scored one would have taken, which greedy matching never does.

The matching is done once, on all picks; the picks above a threshold are a prefix of the ranking,
so the precision/recall of every threshold is a point of the same PR curve.
"""
import logging
import math

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree

from datasets.micrographs import micrograph_key
from utils.errors import UserError
from utils.picking.peaks import widened

logger = logging.getLogger(__name__)

MAX_CURVE_POINTS = 1000  # the overall PR curve is subsampled to this many points for the JSON


MATCHINGS = ("greedy", "assignment")


def match_picks(pred_xy, pred_scores, true_xy, radius, matching="greedy"):
    """Match picks to reference particles of ONE micrograph; return ``(order, is_tp)``.

    ``order = np.argsort(-pred_scores, kind="stable")`` (descending score, ties in input order)
    and ``is_tp[j]`` (bool) tells whether pick ``order[j]`` was matched (see :func:`match_targets`
    for the rules).
    """
    order, target = match_targets(pred_xy, pred_scores, true_xy, radius, matching)
    return order, target >= 0


def match_targets(pred_xy, pred_scores, true_xy, radius, matching="greedy"):
    """``(order, target)``: ``target[j]`` is the index of the reference particle pick ``order[j]`` is
    matched to, -1 for none; ``order`` as in :func:`match_picks`.

    ``greedy``: in ``order``, each pick takes the nearest still-unmatched reference particle with
    distance ``<= radius`` (equally near ones: the lowest index); one-to-one, so a second pick on a
    particle is a false positive. Greedy by score is not a maximum matching: a high-scored pick
    between two particles takes the nearer one even when that leaves a lower-scored pick without a
    partner. ``assignment``: a maximum matching within ``radius`` (most pairs), with the least sum
    of squared distances among those; scores are not used.
    """
    if matching not in MATCHINGS:
        raise ValueError(f"matching must be one of {MATCHINGS}, got {matching!r}")
    pred_xy = np.asarray(pred_xy, dtype=np.float64).reshape(-1, 2)
    pred_scores = np.asarray(pred_scores, dtype=np.float64).reshape(-1)
    true_xy = np.asarray(true_xy, dtype=np.float64).reshape(-1, 2)
    if len(pred_xy) != len(pred_scores):
        raise ValueError(f"expected one score per pick, got {len(pred_xy)} picks and {len(pred_scores)} scores")
    order = np.argsort(-pred_scores, kind="stable")
    target = np.full(len(order), -1, dtype=np.int64)
    if len(order) == 0 or len(true_xy) == 0:
        return order, target
    if matching == "assignment":
        target[:] = _assignment(pred_xy[order], true_xy, radius)
        return order, target
    tree = cKDTree(true_xy)
    candidates = tree.query_ball_point(pred_xy[order], widened(radius))
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
            target[j] = near[best]
    return order, target


def _assignment(pred_xy, true_xy, radius):
    """Target index per pick (-1: none) of a maximum matching within ``radius`` with the least sum
    of squared distances among maximum matchings.

    A pair within the radius costs ``d^2 / r^2 - (n + 1)`` (in ``[-(n + 1), -n]``, n = the most
    pairs possible), any other 0: ``k + 1`` pairs then always cost less than ``k``, so the
    minimum-cost assignment has the most pairs, and among those the smallest sum of ``d^2``.
    """
    d = np.hypot(pred_xy[:, None, 0] - true_xy[None, :, 0], pred_xy[:, None, 1] - true_xy[None, :, 1])
    within = d <= radius
    target = np.full(len(pred_xy), -1, dtype=np.int64)
    rows_used = np.flatnonzero(within.any(axis=1))  # picks (and targets) with no partner in reach stay out
    cols_used = np.flatnonzero(within.any(axis=0))
    if len(rows_used) == 0:
        return target
    n = min(len(rows_used), len(cols_used))
    sub_d, sub_within = d[np.ix_(rows_used, cols_used)], within[np.ix_(rows_used, cols_used)]
    cost = np.where(sub_within, (sub_d / radius) ** 2 - (n + 1), 0.0)
    r, c = linear_sum_assignment(cost)
    ok = sub_within[r, c]
    target[rows_used[r[ok]]] = cols_used[c[ok]]
    return target


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


def _distance_stats(distances):
    """``distance_mean`` and ``distance_p90`` (px) of matched picks; NaN when there are none."""
    d = np.asarray(distances, dtype=np.float64)
    if len(d) == 0:
        return {"distance_mean": math.nan, "distance_p90": math.nan}
    return {"distance_mean": float(d.mean()), "distance_p90": float(np.percentile(d, 90))}


def evaluate_picks(picks, reference, radius, threshold, micrographs=None, matching="greedy"):
    """Score ``picks`` against ``reference`` per micrograph and overall; return a JSON-ready dict.

    Both are coordinate tables (columns micrograph, x, y, score; the reference's score is
    ignored), grouped by :func:`datasets.micrographs.micrograph_key`, so "a/Falcon_1.mrc" and
    "Falcon_1" are the same micrograph. Evaluated micrographs: the keys of ``micrographs`` when
    given (each must be in the reference; one without picks counts with zero picks), otherwise the
    keys present in ``picks`` (a warning names reference micrographs left out; every picks key
    must be in the reference). Picks are matched per micrograph only (see the module docstring:
    ``matching``, greedy by default), so a pick never matches a particle of another micrograph; the
    overall ranking pools the scores of all evaluated micrographs. ``distance_mean`` /
    ``distance_p90``: the mean and 90th percentile of the distances from the matched picks at
    ``threshold`` to their particles (how exactly picks are centred). Picks must all have a score or all have none (NaN); see
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
    per_micrograph, pooled_scores, pooled_tp, pooled_dist, n_targets_total = {}, [], [], [], 0
    for key in evaluated:
        mine, theirs = pick_rows.get(key, none), ref_rows.get(key, none)
        scores = pick_scores[mine] if scored else np.zeros(len(mine))
        order, target = match_targets(pick_xy[mine], scores, ref_xy[theirs], radius, matching)
        is_tp = target >= 0
        # distance of each matched pick (in ranking order) at the threshold to its particle
        kept = is_tp & ((scores[order] >= threshold) if scored else True)
        dist = np.hypot(*(pick_xy[mine][order][kept] - ref_xy[theirs][target[kept]]).T) if kept.any() else []
        n_targets = len(theirs)
        per_micrograph[key] = {**ranking_metrics(scores[order], is_tp, n_targets, threshold, scored=scored),
                               **_distance_stats(dist)}
        pooled_scores.append(scores[order])
        pooled_tp.append(is_tp)
        pooled_dist.append(np.asarray(dist, dtype=np.float64))
        n_targets_total += n_targets
    scores, is_tp = np.concatenate(pooled_scores), np.concatenate(pooled_tp)
    order = np.argsort(-scores, kind="stable")
    overall = {**ranking_metrics(scores[order], is_tp[order], n_targets_total, threshold, scored=scored, curve=True),
               **_distance_stats(np.concatenate(pooled_dist))}
    return {"radius": float(radius), "threshold": float(threshold), "matching": matching, "overall": overall,
            "per_micrograph": per_micrograph}
