"""Peaks of a particle-probability map: candidates, one greedy non-maximum suppression with a
round minimum distance, sub-cell refinement, and the prior-quantile threshold.

Coordinates are particle centres in original micrograph pixels, x = column, y = row of the
array as read (see datasets/micrographs.py); no flips here.
"""
import numpy as np
from scipy.spatial import cKDTree


def widened(r):
    """A search radius a hair above ``r``: the tree's own rounding must not lose a point at exactly
    ``r``; the rule itself is then applied to distances computed with ``np.hypot``."""
    return r * (1 + 1e-9) + 1e-12


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
        near = np.asarray(tree.query_ball_point(xy[i], widened(min_distance)), dtype=np.int64)
        if len(near):
            d = np.hypot(*(xy[near] - xy[i]).T)
            suppressed[near[d < min_distance]] = True
    return np.asarray(kept, dtype=np.int64)


def find_peaks(prob_map, threshold, min_distance, origin=(0.0, 0.0), step=1.0, refine=False):
    """Particle centres from a 2-D probability map: ``(xy [N, 2] float64, scores [N] float64)``.

    ``prob_map`` is a numpy array or torch tensor ``[h, w]``; its cell ``(a, b)`` (row, column)
    lies at ``x = origin[0] + b * step``, ``y = origin[1] + a * step`` in original micrograph
    pixels (e.g. ``step`` = the network's stride, ``origin`` = the centre of the first window).
    Every cell with a value ``>= threshold`` is a candidate, and the candidates go through one
    greedy non-maximum suppression (:func:`nms`: by descending value, equal values in row-major
    order of the map; a candidate is dropped when a KEPT one lies closer than ``min_distance``
    original px, a round distance). A cell that NMS drops therefore suppresses nothing: with
    0.9 / 0.8 / 0.7 in three adjacent cells and a minimum distance of 1.5 cells, 0.9 and 0.7 are
    kept. NaN cells are never candidates. Returned by descending score.

    ``refine``: each candidate that is a maximum of its full 3 x 3 neighbourhood (map border cells
    are not refined) moves to the peak of a quadratic surface fitted to the map's logit there
    (:func:`sub_cell_offsets`), at most half a cell per axis, before the NMS (so the distances it
    enforces hold between the positions returned); its score stays the cell's value.
    """
    values = _to_numpy(prob_map).astype(np.float64)
    if values.ndim != 2:
        raise ValueError(f"expected a 2-D probability map [h, w], got shape {values.shape}")
    if step <= 0:
        raise ValueError(f"step must be > 0, got {step}")
    rows, cols = np.nonzero(np.isfinite(values) & (values >= threshold))  # row-major order
    scores = values[rows, cols]
    dr, dc = sub_cell_offsets(values, rows, cols) if refine else (0.0, 0.0)
    # NMS on the positions written out, so that no two picks are closer than min_distance
    xy = np.stack([origin[0] + (cols + dc) * float(step), origin[1] + (rows + dr) * float(step)], axis=1)
    keep = nms(xy.reshape(-1, 2), scores, min_distance)
    return xy.astype(np.float64).reshape(-1, 2)[keep], scores[keep]


# Least-squares fit of f(x, y) = c0 + c1 x + c2 y + c3 x^2 + c4 y^2 + c5 x y to the 3 x 3 cells
# around a peak (x = column offset, y = row offset in -1..1), as one fixed linear map.
_DY, _DX = (g.ravel().astype(np.float64) for g in np.meshgrid([-1, 0, 1], [-1, 0, 1], indexing="ij"))
_QUADRATIC_FIT = np.linalg.pinv(np.stack([np.ones(9), _DX, _DY, _DX ** 2, _DY ** 2, _DX * _DY], axis=1))


def sub_cell_offsets(values, rows, cols, eps=1e-6):
    """Sub-cell position of the peaks at cells ``(rows, cols)`` of the map ``values [h, w]``:
    ``(d_row, d_col)`` arrays, each in ``[-0.5, 0.5]`` cells.

    The map's logit ``log(p / (1 - p))`` (probabilities clipped to ``[eps, 1 - eps]``) is fitted
    by a quadratic surface over the 3 x 3 cells around each peak (least squares, 6 coefficients
    from 9 values); the offset is the surface's vertex when the fit is a cap (negative definite),
    otherwise the vertex of each axis's own parabola where that one opens downwards, else 0. A
    logit that is a quadratic (e.g. a Gaussian bump under a sigmoid) is recovered exactly; the
    vertex is clipped to half a cell, because a cell that is the maximum of its neighbourhood is
    the grid point nearest a round peak. Cells that are not the maximum of their full 3 x 3
    neighbourhood (map border, flank of a larger peak) get offset 0.
    """
    rows, cols = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    d_row, d_col = np.zeros(len(rows)), np.zeros(len(rows))
    h, w = values.shape
    inside = (rows >= 1) & (rows < h - 1) & (cols >= 1) & (cols < w - 1)
    if not inside.any():
        return d_row, d_col
    p = np.clip(values, eps, 1 - eps)
    logit = np.log(p) - np.log1p(-p)
    r, c = rows[inside], cols[inside]
    patch = logit[r[:, None] + _DY.astype(np.int64)[None], c[:, None] + _DX.astype(np.int64)[None]]  # [n, 9]
    is_max = (patch.max(axis=1) <= patch[:, 4]) & np.isfinite(patch).all(axis=1)
    c1, c2, c3, c4, c5 = (patch @ _QUADRATIC_FIT.T)[:, 1:].T
    det = 4 * c3 * c4 - c5 ** 2
    cap = (c3 < 0) & (det > 0)
    safe = np.where(cap, det, 1.0)
    x = np.where(cap, (c2 * c5 - 2 * c1 * c4) / safe, np.where(c3 < 0, -c1 / (2 * np.where(c3 < 0, c3, -1.0)), 0.0))
    y = np.where(cap, (c1 * c5 - 2 * c2 * c3) / safe, np.where(c4 < 0, -c2 / (2 * np.where(c4 < 0, c4, -1.0)), 0.0))
    d_col[inside] = np.where(is_max, np.clip(x, -0.5, 0.5), 0.0)
    d_row[inside] = np.where(is_max, np.clip(y, -0.5, 0.5), 0.0)
    return d_row, d_col


def prior_threshold(scores, prior):
    """The threshold that calls the fraction ``prior`` of ``scores`` positive: the ``k``-th highest
    score, ``k = max(1, round(prior * n))`` (``score >= threshold`` then selects ``k`` of the ``n``
    windows, more only on ties). With a perfect ranking of unlabelled windows this keeps exactly
    the particles among them, as many as the class prior says there are.
    """
    scores = np.sort(np.asarray(scores, dtype=np.float64).reshape(-1))[::-1]
    if len(scores) == 0 or not np.isfinite(scores).all():
        raise ValueError(f"expected finite scores, got {len(scores)} values")
    if not 0 < prior < 1:
        raise ValueError(f"prior must be in (0, 1), got {prior!r}")
    k = max(1, int(round(prior * len(scores))))
    return float(scores[k - 1])
