"""utils.picking.peaks (peaks, NMS, refinement) and utils.picking.matching (matching, P/R/F1/AP) and utils.figures.pr_curve_image.

Every expected number is worked out by hand in the comments next to the example; scikit-learn
is used only where it computes the same quantity (the PR curve's points, and AP once rescaled
from "fraction of matched picks" to "fraction of reference particles").
"""
import logging
import math

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn import metrics as skm

from utils.errors import UserError
from utils.figures import CURVE_COLOURS, pr_curve_image
from utils.picking.matching import (evaluate_picks, match_picks, match_targets,
                                    ranking_metrics)
from utils.picking.peaks import find_peaks, nms, prior_threshold, sub_cell_offsets


def table(rows):
    """A coordinates table from (micrograph, x, y, score) tuples."""
    return pd.DataFrame(rows, columns=["micrograph", "x", "y", "score"]).astype(
        {"micrograph": str, "x": np.float64, "y": np.float64, "score": np.float64})


# ------------------------------------------------------------------------------------ peaks

def test_find_peaks_blobs_and_below_threshold():
    m = np.zeros((12, 12))
    m[2, 3] = 0.9                     # blob A: peak at row 2, column 3 -> x=3, y=2
    m[1, 3] = m[3, 3] = m[2, 2] = m[2, 4] = 0.5  # its flanks: above threshold, not maxima
    m[8, 9] = 0.8                     # blob B -> x=9, y=8
    m[8, 8] = 0.45
    m[10, 1] = 0.3                    # a lone maximum below the threshold 0.4
    m[5, 10] = 0.4                    # one AT the threshold (kept) -> x=10, y=5, 3 rows from B
    xy, scores = find_peaks(m, threshold=0.4, min_distance=2)
    assert xy.dtype == np.float64 and scores.dtype == np.float64
    np.testing.assert_array_equal(xy, [[3.0, 2.0], [9.0, 8.0], [10.0, 5.0]])
    np.testing.assert_array_equal(scores, [0.9, 0.8, 0.4])
    # a torch tensor gives the same answer; a threshold above everything gives empty [0, 2]
    xy_t, scores_t = find_peaks(torch.tensor(m, dtype=torch.float32), threshold=0.4, min_distance=2)
    np.testing.assert_array_equal(xy_t, xy)
    np.testing.assert_allclose(scores_t, scores, rtol=1e-7)
    xy, scores = find_peaks(m, threshold=0.95, min_distance=2)
    assert xy.shape == (0, 2) and scores.shape == (0,)


def test_find_peaks_one_greedy_nms_no_max_filter():
    # 0.9 / 0.8 / 0.7 in adjacent cells, minimum distance 1.5 cells: greedy NMS keeps 0.9, drops
    # 0.8 (1 cell away) and keeps 0.7 (2 cells from 0.9; the DROPPED 0.8 suppresses nothing). A
    # max-filter before NMS would also have removed 0.7, whose neighbour 0.8 is higher.
    m = np.zeros((3, 10))
    m[1, 2], m[1, 3], m[1, 4] = 0.9, 0.8, 0.7
    xy, scores = find_peaks(m, threshold=0.5, min_distance=1.5)
    np.testing.assert_array_equal(xy, [[2.0, 1.0], [4.0, 1.0]])
    np.testing.assert_array_equal(scores, [0.9, 0.7])
    # exactly min_distance away is not closer: 0.9 at column 2 and 0.8 at column 4, distance 2
    m = np.zeros((3, 10))
    m[1, 2], m[1, 4], m[1, 7] = 0.9, 0.8, 0.7
    xy, _ = find_peaks(m, threshold=0.5, min_distance=2)
    np.testing.assert_array_equal(xy, [[2.0, 1.0], [4.0, 1.0], [7.0, 1.0]])
    # the distance is round: a diagonal neighbour is sqrt(2) = 1.41 cells away
    m = np.zeros((5, 5))
    m[2, 2], m[3, 3] = 0.9, 0.8
    assert len(find_peaks(m, 0.5, 1.5)[0]) == 1 and len(find_peaks(m, 0.5, 1.4)[0]) == 2


def _bump(shape, centre, sigma=(2.0, 1.5), tilt=0.3, top=2.0):
    """A probability map whose logit is a quadratic cap (elliptical, tilted) peaking at ``centre`` (x, y)."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float64)
    dx, dy = xx - centre[0], yy - centre[1]
    logit = top - dx ** 2 / (2 * sigma[0] ** 2) - dy ** 2 / (2 * sigma[1] ** 2) + tilt * dx * dy / 4
    return 1 / (1 + np.exp(-logit))


@pytest.mark.parametrize("centre", [(10.3, 7.6), (5.4, 12.45), (15.0, 3.0), (8.77, 9.21)])
def test_refinement_recovers_a_sub_cell_peak(centre):
    m = _bump((20, 24), centre)
    grid, _ = find_peaks(m, threshold=0.5, min_distance=5)
    xy, scores = find_peaks(m, threshold=0.5, min_distance=5, refine=True)
    np.testing.assert_allclose(xy[0], centre, atol=1e-9)  # a quadratic logit is fitted exactly
    np.testing.assert_array_equal(grid[0], np.round(centre))  # the grid cell is the nearest one
    assert scores[0] == m[int(round(centre[1])), int(round(centre[0]))]  # the score stays the cell's
    # with a step and an origin the offset is scaled like the cells: x = origin + (col + d) * step
    xy, _ = find_peaks(m, threshold=0.5, min_distance=20, origin=(3.0, 5.0), step=4.0, refine=True)
    np.testing.assert_allclose(xy[0], [3.0 + 4 * centre[0], 5.0 + 4 * centre[1]], atol=1e-8)


def test_refinement_leaves_flanks_and_borders_on_the_grid():
    # a kept cell that is not the maximum of its 3 x 3 neighbourhood (0.7 beside the dropped 0.8),
    # and a peak on the map's border, are not moved; offsets never exceed half a cell
    m = np.zeros((5, 10))
    m[2, 2], m[2, 3], m[2, 4] = 0.9, 0.8, 0.7
    m[0, 8] = 0.95
    xy, _ = find_peaks(m, threshold=0.5, min_distance=1.5, refine=True)
    assert [0.95, 0.9, 0.7] == pytest.approx(find_peaks(m, 0.5, 1.5, refine=True)[1])
    np.testing.assert_array_equal(xy[0], [8.0, 0.0])
    np.testing.assert_array_equal(xy[2], [4.0, 2.0])
    assert 2.0 < xy[1][0] <= 2.5 and xy[1][1] == 2.0  # pulled towards 0.8 (right), at most half a cell
    d_row, d_col = sub_cell_offsets(np.where(m > 0, m, 1e-3), np.array([2]), np.array([2]))
    assert 0 < d_col[0] <= 0.5 and d_row[0] == pytest.approx(0.0, abs=1e-12)
    # a maximum whose fitted surface peaks 0.93 cells to the right (its corner cells rise that
    # way): clipped to half a cell, the grid point nearest a round peak
    v = np.full((5, 5), 0.01)
    v[1, 1:4], v[2, 1:4], v[3, 1:4] = [0.1, 0.5, 0.89], [0.5, 0.9, 0.5], [0.1, 0.5, 0.89]
    d_row, d_col = sub_cell_offsets(v, np.array([2]), np.array([2]))
    assert d_col[0] == 0.5 and d_row[0] == pytest.approx(0.0, abs=1e-12)


def test_prior_threshold_selects_the_prior_fraction():
    scores = np.linspace(0, 1, 101)
    t = prior_threshold(scores, 0.1)
    assert t == pytest.approx(0.91) and np.sum(scores >= t) == 10  # round(0.1 * 101) = 10 -> the 10th highest
    assert prior_threshold([0.2, 0.9, 0.4], 0.01) == 0.9  # at least one window
    with pytest.raises(ValueError):
        prior_threshold([0.2, np.nan], 0.5)


def test_find_peaks_plateaus():
    # a 2x3 plateau of 0.7 (rows 5-6, columns 5-7): all six cells are local maxima; NMS keeps the
    # first in row-major order, (x=5, y=5), and drops the others, 1, 2, 1, sqrt2, sqrt5 < 3 away
    m = np.zeros((12, 12))
    m[5:7, 5:8] = 0.7
    xy, scores = find_peaks(m, threshold=0.5, min_distance=3)
    np.testing.assert_array_equal(xy, [[5.0, 5.0]])
    np.testing.assert_array_equal(scores, [0.7])
    # a 1x4 plateau (row 1, columns 2-5), min_distance 2: keep x=2; x=3 is 1 away (dropped);
    # x=4 is exactly 2 away from x=2 (not closer: kept); x=5 is 1 away from x=4 (dropped)
    m = np.zeros((4, 10))
    m[1, 2:6] = 0.6
    xy, _ = find_peaks(m, threshold=0.5, min_distance=2)
    np.testing.assert_array_equal(xy, [[2.0, 1.0], [4.0, 1.0]])


def test_find_peaks_step_and_origin():
    # cell (a, b) is at x = 10 + 4 b, y = 20 + 4 a
    m = np.zeros((6, 8))
    m[2, 5] = 0.9   # -> (30, 28)
    m[4, 1] = 0.6   # -> (14, 36), 17.9 px from the first
    xy, scores = find_peaks(m, threshold=0.5, min_distance=10, origin=(10.0, 20.0), step=4.0)
    np.testing.assert_array_equal(xy, [[30.0, 28.0], [14.0, 36.0]])
    np.testing.assert_array_equal(scores, [0.9, 0.6])
    # two EQUAL separate maxima 3 cells = 12 px apart (both are maxima of their windows):
    # min_distance 13 px drops the second (12 < 13), 12 px keeps both (not closer than 12)
    m = np.zeros((3, 6))
    m[1, 1] = m[1, 4] = 0.7
    xy, _ = find_peaks(m, threshold=0.5, min_distance=13, origin=(10.0, 20.0), step=4.0)
    np.testing.assert_array_equal(xy, [[14.0, 24.0]])
    xy, _ = find_peaks(m, threshold=0.5, min_distance=12, origin=(10.0, 20.0), step=4.0)
    np.testing.assert_array_equal(xy, [[14.0, 24.0], [26.0, 24.0]])


def test_nms_greedy_order():
    xy = [[0, 0], [3, 0], [1, 0], [10, 10], [5.5, 0]]
    scores = [0.5, 0.9, 0.8, 0.1, 0.5]
    # by score: 1 (0.9) kept; 2 (0.8) is 2 < 2.5 from 1: dropped; 0 (0.5) is 3 from 1 and only
    # 1 from the DROPPED 2: kept; 4 (0.5, after 0 by input order) is 2.5 from 1: not closer, kept;
    # 3 kept
    np.testing.assert_array_equal(nms(xy, scores, 2.5), [1, 0, 4, 3])
    assert nms(xy, scores, 2.5).dtype == np.int64
    np.testing.assert_array_equal(nms(xy, scores, 0), [1, 2, 0, 4, 3])
    assert nms(np.zeros((0, 2)), [], 3).tolist() == []


# --------------------------------------------------------------------------------- matching

def test_match_picks_one_to_one_and_radius():
    targets = [[0, 0], [10, 0], [30, 0]]
    # given in a shuffled order; by score: p0 (1,0) 0.9 -> T0 (1 px); p1 (0,1) 0.8 -> T0 is
    # taken and T1 is 10.05 px away: FP; p2 (12,0) 0.7 -> T1 (2 px); p3 (50,50) 0.6: FP;
    # p4 (33,4) 0.5 -> T2 at exactly 5 px = radius: TP
    picks = [[12, 0], [50, 50], [1, 0], [33, 4], [0, 1]]
    scores = [0.7, 0.6, 0.9, 0.5, 0.8]
    order, is_tp = match_picks(picks, scores, targets, radius=5)
    np.testing.assert_array_equal(order, [2, 4, 0, 1, 3])
    np.testing.assert_array_equal(is_tp, [True, False, True, False, True])
    # a hair smaller radius loses the last match
    _, is_tp = match_picks(picks, scores, targets, radius=4.999)
    np.testing.assert_array_equal(is_tp, [True, False, True, False, False])
    # no targets / no picks
    assert match_picks(picks, scores, np.zeros((0, 2)), 5)[1].tolist() == [False] * 5
    order, is_tp = match_picks(np.zeros((0, 2)), [], targets, 5)
    assert order.tolist() == [] and is_tp.tolist() == []


def test_match_picks_nearest_not_first():
    # targets A (0,0), B (4,0), radius 4. The 0.9 pick at (3,0) takes the NEAREST, B (1 px; A is
    # 3 px); the 0.5 pick at (7,0) then has A 7 px away and B taken: FP. (Matching the first
    # target in range would give A to the first pick and B to the second.)
    order, is_tp = match_picks([[3, 0], [7, 0]], [0.9, 0.5], [[0, 0], [4, 0]], radius=4)
    np.testing.assert_array_equal(is_tp, [True, False])
    # equally near targets: the lower index is taken, so the next pick gets the other one
    _, is_tp = match_picks([[5, 0], [5, 0.5]], [0.9, 0.8], [[4, 0], [6, 0]], radius=1.2)
    np.testing.assert_array_equal(is_tp, [True, True])


def test_assignment_matching_finds_the_most_pairs():
    # targets T0 (0,0), T1 (10,0), radius 6. Pick A (5,0) 0.9 is 5 px from both, pick B (-4,0)
    # 0.8 is 4 px from T0 only. Greedy: A takes T0 (equally near: lower index), B finds T0 taken
    # -> 1 match. Assignment ignores the scores: A-T1 and B-T0 -> 2 matches.
    picks, scores, targets = [[5, 0], [-4, 0]], [0.9, 0.8], [[0, 0], [10, 0]]
    order, target = match_targets(picks, scores, targets, 6)
    np.testing.assert_array_equal(target, [0, -1])
    order, target = match_targets(picks, scores, targets, 6, matching="assignment")
    np.testing.assert_array_equal(order, [0, 1])
    np.testing.assert_array_equal(target, [1, 0])
    # among matchings with the most pairs, the least sum of squared distances: a pick 1 px from
    # T0 and 3 px from T1 beside one 2 px from both takes T0
    _, target = match_targets([[1, 0], [2, 1.5]], [0.5, 0.9], [[0, 0], [4, 0]], 3, matching="assignment")
    assert target.tolist() == [1, 0]  # in order: the 0.9 pick -> T1, the 0.5 pick -> T0
    # exactly at the radius counts; farther never does
    assert match_targets([[6, 0]], [0.5], [[0, 0]], 6, "assignment")[1].tolist() == [0]
    assert match_targets([[6.01, 0]], [0.5], [[0, 0]], 6, "assignment")[1].tolist() == [-1]
    with pytest.raises(ValueError, match="matching must be one of"):
        match_targets([[0, 0]], [1.0], [[0, 0]], 1, "hungarian")


def test_evaluate_assignment_and_matched_distances():
    reference = table([("m1", 0, 0, np.nan), ("m1", 10, 0, np.nan)])
    picks = table([("m1", 5, 0, 0.9), ("m1", -4, 0, 0.8)])
    greedy = evaluate_picks(picks, reference, 6, 0.5)["overall"]
    best = evaluate_picks(picks, reference, 6, 0.5, matching="assignment")
    assert best["matching"] == "assignment"
    assert (greedy["tp"], best["overall"]["tp"]) == (1, 2)
    # distances of the matched picks at the threshold: 5 and 4 px -> mean 4.5, p90 4 + 0.9 = 4.9
    assert best["overall"]["distance_mean"] == pytest.approx(4.5)
    assert best["overall"]["distance_p90"] == pytest.approx(4.9)
    assert greedy["distance_mean"] == pytest.approx(5.0)
    # above the threshold 0.85 only the 0.9 pick counts; no match at all gives NaN
    assert evaluate_picks(picks, reference, 6, 0.85, matching="assignment")["overall"]["distance_mean"] == 5.0
    assert math.isnan(evaluate_picks(picks, reference, 1, 0.5)["overall"]["distance_mean"])


# -------------------------------------------------------------------------- metrics by hand

# One micrograph, four reference particles (T3 is never found), radius 5:
#   score 0.9 (101,100) -> T0          TP   precision@1 = 1/1
#   score 0.8 (150,150) nothing near   FP   precision@2 = 1/2
#   score 0.7 (200,102) -> T1          TP   precision@3 = 2/3
#   score 0.6 (100,103) T0 taken       FP   precision@4 = 2/4
#   score 0.4 (297,104) -> T2 (5 px)   TP   precision@5 = 3/5
# AP = (1 + 2/3 + 3/5) / 4 = (15/15 + 10/15 + 9/15) / 4 = 34/60 = 17/30
# threshold 0.5: 4 picks, 2 TP -> P = 1/2, R = 2/4, F1 = 1/2
# F1 per step: k=1 P 1 R 1/4 -> 0.4; k=2 1/2, 1/4 -> 1/3; k=3 2/3, 1/2 -> 4/7; k=4 1/2, 1/2 -> 1/2;
#   k=5 3/5, 3/4 -> 2*(9/20)/(27/20) = 2/3  => best F1 2/3 at threshold 0.4 (P 3/5, R 3/4)
HAND_REFERENCE = table([("m1", 100, 100, np.nan), ("m1", 200, 100, np.nan), ("m1", 300, 100, np.nan),
                        ("m1", 400, 400, np.nan)])
HAND_PICKS = table([("m1", 150, 150, 0.8), ("m1", 100, 103, 0.6), ("m1", 297, 104, 0.4),
                    ("m1", 101, 100, 0.9), ("m1", 200, 102, 0.7)])


def test_hand_example_ap_f1_best_f1():
    result = evaluate_picks(HAND_PICKS, HAND_REFERENCE, radius=5, threshold=0.5)
    assert result["radius"] == 5.0 and result["threshold"] == 0.5
    assert list(result["per_micrograph"]) == ["m1"]
    m = result["overall"]
    assert (m["n_picks_total"], m["n_targets"], m["n_picks"], m["tp"]) == (5, 4, 4, 2)
    assert m["precision"] == pytest.approx(0.5, abs=1e-12)
    assert m["recall"] == pytest.approx(0.5, abs=1e-12)
    assert m["f1"] == pytest.approx(0.5, abs=1e-12)
    assert m["average_precision"] == pytest.approx(17 / 30, abs=1e-12)
    assert m["best_f1"] == pytest.approx(2 / 3, abs=1e-12)
    assert m["best_f1_threshold"] == 0.4
    assert m["best_f1_precision"] == pytest.approx(3 / 5, abs=1e-12)
    assert m["best_f1_recall"] == pytest.approx(3 / 4, abs=1e-12)
    np.testing.assert_allclose(m["curve"]["precision"], [1, 1 / 2, 2 / 3, 1 / 2, 3 / 5], atol=1e-12)
    np.testing.assert_allclose(m["curve"]["recall"], [1 / 4, 1 / 4, 2 / 4, 2 / 4, 3 / 4], atol=1e-12)
    assert m["curve"]["threshold"] == [0.9, 0.8, 0.7, 0.6, 0.4]
    # one micrograph: its row equals the overall one, without the curve
    assert result["per_micrograph"]["m1"] == {k: v for k, v in m.items() if k != "curve"}
    # the threshold is inclusive: at 0.4 every pick counts (the best-F1 point)
    m = evaluate_picks(HAND_PICKS, HAND_REFERENCE, radius=5, threshold=0.4)["overall"]
    assert (m["n_picks"], m["tp"]) == (5, 3) and m["f1"] == pytest.approx(2 / 3, abs=1e-12)
    # above every score: no picks, precision 0 by definition, recall 0
    m = evaluate_picks(HAND_PICKS, HAND_REFERENCE, radius=5, threshold=0.95)["overall"]
    assert (m["n_picks"], m["tp"], m["precision"], m["recall"], m["f1"]) == (0, 0, 0.0, 0.0, 0.0)
    assert m["average_precision"] == pytest.approx(17 / 30, abs=1e-12)  # AP ignores the threshold


def test_ties_are_one_threshold_step():
    # ranked (stable): 0.9 TP, 0.7 FP, 0.7 TP, 0.5 FP; 2 targets
    # AP as ranked = (1/1 + 2/3) / 2 = 5/6
    # steps: thr 0.9: P 1, R 1/2, F1 2/3; thr 0.7 (both 0.7 picks): P 2/3, R 1, F1 0.8;
    #        thr 0.5: P 1/2, R 1, F1 2/3  -> best F1 0.8 at 0.7; the point after only ONE of the
    #        0.7 picks (P 1/2, R 1/2) is not a threshold and not on the curve
    m = ranking_metrics([0.9, 0.7, 0.7, 0.5], [True, False, True, False], 2, threshold=0.7, curve=True)
    assert m["average_precision"] == pytest.approx(5 / 6, abs=1e-12)
    assert (m["n_picks"], m["tp"]) == (3, 2)
    assert m["best_f1"] == pytest.approx(0.8, abs=1e-12) and m["best_f1_threshold"] == 0.7
    np.testing.assert_allclose(m["curve"]["precision"], [1, 2 / 3, 1 / 2], atol=1e-12)
    np.testing.assert_allclose(m["curve"]["recall"], [1 / 2, 1, 1], atol=1e-12)
    assert m["curve"]["threshold"] == [0.9, 0.7, 0.5]
    # equal best F1 at two thresholds: the higher one wins. 0.9 TP, 0.8 FP, 0.7 FP, 0.6 TP over
    # 2 targets (F1 = 2 TP / (picks + targets)): 2/3, 2/4, 2/5, 4/6 -> 2/3 at 0.9 (P 1, R 1/2),
    # not at 0.6 (P 1/2, R 1)
    m = ranking_metrics([0.9, 0.8, 0.7, 0.6], [True, False, False, True], 2, threshold=0.5)
    assert m["best_f1"] == pytest.approx(2 / 3, abs=1e-12) and m["best_f1_threshold"] == 0.9
    assert (m["best_f1_precision"], m["best_f1_recall"]) == (1.0, 0.5)
    # no TP among the first picks: 0.9 FP, 0.8 TP, 0.7 FP over 2 targets: F1 0, 2/4, 2/5 -> 0.8
    m = ranking_metrics([0.9, 0.8, 0.7], [False, True, False], 2, threshold=0.5)
    assert m["best_f1"] == pytest.approx(0.5, abs=1e-12) and m["best_f1_threshold"] == 0.8


def test_ties_in_evaluate_keep_input_order():
    # picks in input order: 0.9 on T0, 0.7 far away, 0.7 on T1, 0.5 far away -> the ranking of
    # test_ties_are_one_threshold_step, AP 5/6; swapping the two 0.7 rows ranks the TP first:
    # AP = (1 + 1) / 2 = 1, while the threshold steps (and best F1 0.8) are unchanged
    ref = table([("m", 0, 0, np.nan), ("m", 100, 0, np.nan)])
    rows = [("m", 0, 0, 0.9), ("m", 50, 50, 0.7), ("m", 100, 0, 0.7), ("m", 200, 200, 0.5)]
    m = evaluate_picks(table(rows), ref, radius=3, threshold=0.6)["overall"]
    assert m["average_precision"] == pytest.approx(5 / 6, abs=1e-12)
    assert m["best_f1"] == pytest.approx(0.8, abs=1e-12) and m["best_f1_threshold"] == 0.7
    m = evaluate_picks(table([rows[0], rows[2], rows[1], rows[3]]), ref, radius=3, threshold=0.6)["overall"]
    assert m["average_precision"] == pytest.approx(1.0, abs=1e-12)
    assert m["best_f1"] == pytest.approx(0.8, abs=1e-12) and m["best_f1_threshold"] == 0.7


def test_per_micrograph_vs_overall_pooling():
    # micrograph a: targets (10,10), (50,50); picks (51,50) 0.9 TP, (80,80) 0.6 FP
    # micrograph b: target (100,100); picks (10,10) 0.8 -- right on a's target, but another
    #   micrograph: FP --, (100,101) 0.7 TP. Names differ in folder/suffix only.
    # threshold 0.65:
    #   a: 1 pick, 1 TP -> P 1, R 1/2, F1 2/3; AP = 1/2; best F1 2/3 at 0.9
    #   b: 2 picks, 1 TP -> P 1/2, R 1, F1 2/3; AP = (1/2)/1 = 1/2; best F1 2/3 at 0.7
    #   pooled ranking 0.9 TP, 0.8 FP, 0.7 TP, 0.6 FP over 3 targets: 3 picks, 2 TP -> P 2/3,
    #   R 2/3, F1 2/3; AP = (1 + 2/3)/3 = 5/9 (not the mean of 1/2 and 1/2);
    #   steps: F1 1/2, 2/5, 2/3, 4/7 -> best 2/3 at 0.7
    ref = table([("data/a.jpg", 10, 10, np.nan), ("data/a.jpg", 50, 50, np.nan), ("b.mrc", 100, 100, np.nan)])
    picks = table([("a.mrc", 51, 50, 0.9), ("a.mrc", 80, 80, 0.6), ("b", 10, 10, 0.8), ("b", 100, 101, 0.7)])
    result = evaluate_picks(picks, ref, radius=4, threshold=0.65)
    a, b, overall = result["per_micrograph"]["a"], result["per_micrograph"]["b"], result["overall"]
    assert sorted(result["per_micrograph"]) == ["a", "b"]
    assert (a["n_picks"], a["tp"], a["n_targets"]) == (1, 1, 2)
    assert (a["precision"], a["recall"]) == (1.0, 0.5)
    assert a["average_precision"] == 0.5 and a["best_f1_threshold"] == 0.9
    assert (b["n_picks"], b["tp"], b["n_targets"]) == (2, 1, 1)
    assert (b["precision"], b["recall"]) == (0.5, 1.0)
    assert b["average_precision"] == 0.5 and b["best_f1_threshold"] == 0.7
    assert (overall["n_picks_total"], overall["n_picks"], overall["tp"], overall["n_targets"]) == (4, 3, 2, 3)
    assert overall["precision"] == pytest.approx(2 / 3, abs=1e-12)
    assert overall["recall"] == pytest.approx(2 / 3, abs=1e-12)
    assert overall["average_precision"] == pytest.approx(5 / 9, abs=1e-12)
    assert overall["best_f1"] == pytest.approx(2 / 3, abs=1e-12) and overall["best_f1_threshold"] == 0.7
    assert "curve" in overall and "curve" not in a and "curve" not in b
    # pooling all coordinates as one micrograph WOULD match b's (10,10) pick to a's target: 3 TP
    one = evaluate_picks(picks.assign(micrograph="x"), ref.assign(micrograph="x"), radius=4, threshold=0.65)
    assert one["overall"]["tp"] == 3


def test_evaluated_micrographs(caplog):
    ref = table([("a", 10, 10, np.nan), ("b", 10, 10, np.nan), ("c", 10, 10, np.nan)])
    picks = table([("a", 10, 10, 0.9)])
    # by default only micrographs with picks are evaluated, with a warning about the others
    with caplog.at_level(logging.WARNING, logger="utils.picking.matching"):
        result = evaluate_picks(picks, ref, radius=2, threshold=0.5)
    assert list(result["per_micrograph"]) == ["a"]
    assert result["overall"]["recall"] == 1.0
    assert "2 micrograph(s) without any pick are not evaluated ('b', 'c')" in caplog.text
    # named micrographs: b has no picks, so its particle counts as missed; names may carry a suffix
    result = evaluate_picks(picks, ref, radius=2, threshold=0.5, micrographs=["a.mrc", "dir/b.png"])
    assert list(result["per_micrograph"]) == ["a", "b"]
    b = result["per_micrograph"]["b"]
    assert (b["n_picks_total"], b["n_targets"], b["precision"], b["recall"], b["average_precision"]) == (0, 1, 0.0, 0.0, 0.0)
    assert math.isnan(b["best_f1_threshold"])
    assert result["overall"]["recall"] == 0.5 and result["overall"]["average_precision"] == 0.5
    # a picks micrograph outside the named ones is ignored
    result = evaluate_picks(picks, ref, radius=2, threshold=0.5, micrographs=["c"])
    assert list(result["per_micrograph"]) == ["c"] and result["overall"]["n_picks_total"] == 0


def test_evaluate_bad_inputs():
    ref = table([("a", 10, 10, np.nan), ("b", 10, 10, np.nan)])
    with pytest.raises(UserError, match=r"micrographs 'zz': not in the reference; expected .*'a', 'b'"):
        evaluate_picks(table([("a", 10, 10, 0.9)]), ref, 2, 0.5, micrographs=["a", "zz.mrc"])
    with pytest.raises(UserError, match=r"picks: micrographs 'q' have no particles in the reference"):
        evaluate_picks(table([("a", 10, 10, 0.9), ("q.jpg", 1, 1, 0.5)]), ref, 2, 0.5)
    with pytest.raises(UserError, match=r"picks: 1 of 2 scores are missing \(NaN\), first on micrograph 'a'"):
        evaluate_picks(table([("a", 10, 10, 0.9), ("a", 1, 1, np.nan)]), ref, 2, 0.5)
    with pytest.raises(UserError, match="picks: no coordinates"):
        evaluate_picks(table([]), ref, 2, 0.5)


def test_picks_without_scores():
    # a BOX file has no scores: both picks count whatever the threshold; 1 TP of 2 targets
    ref = table([("a", 10, 10, np.nan), ("a", 50, 50, np.nan)])
    picks = table([("a", 10, 11, np.nan), ("a", 90, 90, np.nan)])
    m = evaluate_picks(picks, ref, radius=2, threshold=0.99)["overall"]
    assert (m["n_picks"], m["tp"], m["precision"], m["recall"], m["f1"]) == (2, 1, 0.5, 0.5, 0.5)
    assert math.isnan(m["average_precision"]) and math.isnan(m["best_f1_threshold"])
    assert m["best_f1"] == 0.5 and len(m["curve"]["precision"]) == 1


def test_against_sklearn_random():
    # sklearn's PR curve over the matched/unmatched picks has the same points once its recall
    # (over matched picks) is rescaled to recall over reference particles: x tp_total / n_targets;
    # with distinct scores the same holds for AP. Scores rounded to 1 decimal give ties for the
    # curve check (sklearn also makes one step per distinct score).
    rng = np.random.default_rng(0)
    ref_xy = rng.uniform(0, 200, size=(40, 2))
    pick_xy = np.concatenate([ref_xy[:30] + rng.normal(0, 2, size=(30, 2)), rng.uniform(0, 200, size=(20, 2))])
    for scores in (rng.random(50), np.round(rng.random(50), 1)):
        order, is_tp = match_picks(pick_xy, scores, ref_xy, radius=4)
        m = ranking_metrics(scores[order], is_tp, len(ref_xy), threshold=0.5, curve=True)
        scale = is_tp.sum() / len(ref_xy)
        precision, recall, thresholds = skm.precision_recall_curve(is_tp, scores[order])
        np.testing.assert_allclose(m["curve"]["precision"], precision[:-1][::-1], atol=1e-12)
        np.testing.assert_allclose(m["curve"]["recall"], recall[:-1][::-1] * scale, atol=1e-12)
        np.testing.assert_array_equal(m["curve"]["threshold"], thresholds[::-1])
        picked = scores[order] >= 0.5
        assert m["precision"] == pytest.approx(skm.precision_score(is_tp, picked), abs=1e-12)
    scores = rng.random(50)
    order, is_tp = match_picks(pick_xy, scores, ref_xy, radius=4)
    m = ranking_metrics(scores[order], is_tp, len(ref_xy), threshold=0.5)
    expected = skm.average_precision_score(is_tp, scores[order]) * is_tp.sum() / len(ref_xy)
    assert m["average_precision"] == pytest.approx(expected, abs=1e-12)


def test_curve_subsampled():
    # 2500 distinct scores, every other pick a TP of 2500 targets: 2500 steps -> at most 1000
    # points, the first and the last kept
    n = 2500
    scores = np.linspace(1, 0, n, endpoint=False)
    is_tp = np.arange(n) % 2 == 0
    m = ranking_metrics(scores, is_tp, n, threshold=0.5, curve=True)
    c = m["curve"]
    assert 900 < len(c["precision"]) <= 1000 and len(c["recall"]) == len(c["threshold"]) == len(c["precision"])
    assert c["threshold"][0] == scores[0] and c["threshold"][-1] == scores[-1]
    assert c["precision"][0] == 1.0 and c["recall"][-1] == pytest.approx(0.5, abs=1e-12)


# ---------------------------------------------------------------------------------- figure

def test_pr_curve_image():
    img = pr_curve_image({"one": ([0.0, 1.0], [1.0, 1.0]), "two": ([0.5], [0.5])}, title="t")
    assert img.dtype == np.uint8 and img.shape == (400, 480, 3)
    colours = {tuple(c) for c in img.reshape(-1, 3)}
    assert CURVE_COLOURS[0] in colours and CURVE_COLOURS[1] in colours
    # plot area: left 44, right 12, top 28, bottom 36 -> precision 1 is row 28, recall 0.5 at
    # column 44 + 0.5 * 424 = 256, precision 0.5 at row 28 + 0.5 * 336 = 196
    assert tuple(img[28, 300]) == CURVE_COLOURS[0]
    assert tuple(img[196, 256]) == CURVE_COLOURS[1]
    assert pr_curve_image({}).shape == (400, 480, 3)
    with pytest.raises(ValueError, match="2 recall values but 1 precision"):
        pr_curve_image({"bad": ([0, 1], [1])})
