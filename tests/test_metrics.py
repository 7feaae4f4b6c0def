"""utils.metrics against scikit-learn (random data) and against values worked out by hand."""
import copy
import json
import math
import warnings

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from utils.metrics import best_improved, format_metrics, multilabel_metrics

N, C = 50, 5


def random_case(seed, n=N, n_classes=C):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 2, size=(n, n_classes))
    # scores correlated with the labels, so the metrics are away from their trivial values
    y_score = np.clip(0.35 * y_true + 0.65 * rng.random((n, n_classes)), 0, 1)
    return y_true, y_score


def one_error_loop(y_true, y_score):
    """Reference one-error, written as a plain loop."""
    errors, counted = 0, 0
    for t, s in zip(y_true, y_score):
        if t.sum() == 0:
            continue
        counted += 1
        top = max(range(len(s)), key=lambda j: (s[j], -j))  # highest score, first index on ties
        errors += int(t[top] == 0)
    return errors / counted


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("threshold", [0.5, 0.3])
def test_against_sklearn_random(seed, threshold):
    y_true, y_score = random_case(seed)
    y_pred = (y_score >= threshold).astype(int)
    m = multilabel_metrics(y_true, y_score, threshold=threshold)

    assert m["acc_total"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
    assert m["f1_mi"] == pytest.approx(skm.f1_score(y_true, y_pred, average="micro", zero_division=0))
    assert m["f1_ma"] == pytest.approx(skm.f1_score(y_true, y_pred, average="macro", zero_division=0))
    assert y_true.any(axis=0).all()  # every class has positives, so mAP is sklearn's plain macro AP
    assert m["mAP"] == pytest.approx(skm.average_precision_score(y_true, y_score, average="macro"))
    assert m["mAP_present_classes"] == C and m["mAP_present"] == pytest.approx(m["mAP"])
    assert m["hamming_loss"] == pytest.approx(skm.hamming_loss(y_true, y_pred))
    assert m["one_error"] == pytest.approx(one_error_loop(y_true, y_score))
    assert m["ranking_loss"] == pytest.approx(skm.label_ranking_loss(y_true, y_score))
    assert m["coverage"] == pytest.approx(skm.coverage_error(y_true, y_score))
    assert m["per_class_acc"] == pytest.approx(
        [skm.accuracy_score(y_true[:, c], y_pred[:, c]) for c in range(C)])
    assert m["per_class_ap"] == pytest.approx(
        [skm.average_precision_score(y_true[:, c], y_score[:, c]) for c in range(C)])
    assert m["overall"] == pytest.approx(np.mean([m["f1_mi"], m["f1_ma"], m["acc_total"], m["mAP"]]))
    assert m["threshold"] == threshold and m["n_samples"] == N
    assert "per_class" not in m


def test_hand_computed_example():
    y_true = np.array([[1, 0, 1],
                       [0, 1, 0],
                       [1, 1, 0],
                       [0, 0, 0]])
    y_score = np.array([[0.9, 0.2, 0.6],   # pred [1,0,1] = true; top label 0 is true
                        [0.7, 0.4, 0.1],   # pred [1,0,0] != true; top label 0 is false
                        [0.3, 0.8, 0.5],   # pred [0,1,1] != true; top label 1 is true
                        [0.1, 0.2, 0.3]])  # pred [0,0,0] = true; no true label: not in one-error
    m = multilabel_metrics(y_true, y_score, class_names=["a", "b", "c"])
    # exact rows: 0 and 3 -> 2/4
    assert m["acc_total"] == 0.5
    # rows with a label: 0, 1, 2; only row 1's top label is wrong -> 1/3
    assert m["one_error"] == pytest.approx(1 / 3)
    # class 0: pred [1,1,0,0] vs [1,0,1,0] -> 2/4; class 1: [0,0,1,0] vs [0,1,1,0] -> 3/4;
    # class 2: [1,0,1,0] vs [1,0,0,0] -> 3/4
    assert m["per_class_acc"] == [0.5, 0.75, 0.75]
    # 4 wrong cells of 12
    assert m["hamming_loss"] == pytest.approx(1 / 3)
    # TP 3 (r0c0, r0c2, r2c1), FP 2 (r1c0, r2c2), FN 2 (r1c1, r2c0): 2*3 / (2*3 + 2 + 2)
    assert m["f1_mi"] == pytest.approx(0.6)
    # per class F1: c0 TP1 FP1 FN1 -> 1/2; c1 TP1 FN1 -> 2/3; c2 TP1 FP1 -> 2/3
    assert m["f1_ma"] == pytest.approx((1 / 2 + 2 / 3 + 2 / 3) / 3)
    # AP c0: ranking T F T F -> (1/1 + 2/3)/2 = 5/6; c1: T T first -> 1; c2: T first -> 1
    assert m["per_class_ap"] == pytest.approx([5 / 6, 1.0, 1.0])
    assert m["mAP"] == pytest.approx(17 / 18)
    # mis-ordered (true, false) pairs: r0 0/2, r1 1/2, r2 1/2, r3 none -> (0 + .5 + .5 + 0)/4
    assert m["ranking_loss"] == pytest.approx(0.25)
    # rank of lowest true label: r0 2, r1 2, r2 3, r3 0 -> 7/4 (MIML convention would be 0.75)
    assert m["coverage"] == pytest.approx(1.75)
    assert m["overall"] == pytest.approx((0.6 + (1 / 2 + 2 / 3 + 2 / 3) / 3 + 0.5 + 17 / 18) / 4)
    assert m["per_class"] == {"a": {"acc": 0.5, "ap": pytest.approx(5 / 6)},
                              "b": {"acc": 0.75, "ap": 1.0},
                              "c": {"acc": 0.75, "ap": 1.0}}


def test_threshold_is_inclusive_and_one_error_ties_take_first_index():
    y_score = np.array([[0.5, 0.5, 0.1]])
    # the score equal to the threshold is a positive prediction: [1,1,0] matches exactly
    assert multilabel_metrics([[1, 1, 0]], y_score)["acc_total"] == 1.0
    # tie between labels 0 and 1: the top label is 0
    assert multilabel_metrics([[0, 1, 0]], y_score)["one_error"] == 1.0
    assert multilabel_metrics([[1, 0, 0]], y_score)["one_error"] == 0.0


def test_map_is_sklearns_macro_ap_including_classes_without_positives():
    y_true, y_score = random_case(7)
    y_true[:, 2] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the metric silences sklearn's warning about class 2
        m = multilabel_metrics(y_true, y_score)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sk = skm.average_precision_score(y_true, y_score)  # the reference's call, defaults as they come
    assert m["mAP"] == pytest.approx(sk)
    keep = [0, 1, 3, 4]
    assert m["mAP"] == pytest.approx(
        sum(skm.average_precision_score(y_true[:, c], y_score[:, c]) for c in keep) / 5)  # class 2 counts 0
    assert m["mAP_present"] == pytest.approx(
        skm.average_precision_score(y_true[:, keep], y_score[:, keep], average="macro"))
    assert m["mAP_present"] > m["mAP"]
    assert m["mAP_present_classes"] == 4
    assert m["per_class_ap"][2] is None
    assert m["per_class_ap"][0] == pytest.approx(skm.average_precision_score(y_true[:, 0], y_score[:, 0]))
    assert m["overall"] == pytest.approx(np.mean([m["f1_mi"], m["f1_ma"], m["acc_total"], sk]))


def test_no_positives_at_all_without_warnings():
    y_true = np.zeros((6, 3), dtype=int)
    y_score = np.full((6, 3), 0.2)  # no predicted positives either: F1's zero-division case
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = multilabel_metrics(y_true, y_score)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert m["mAP"] == pytest.approx(skm.average_precision_score(y_true, y_score))
    assert math.isnan(m["mAP_present"]) and m["mAP_present_classes"] == 0
    assert math.isnan(m["one_error"])
    assert m["per_class_ap"] == [None, None, None]
    assert m["f1_mi"] == 0.0 and m["f1_ma"] == 0.0 and m["acc_total"] == 1.0


def test_torch_inputs_match_numpy():
    y_true, y_score = random_case(3)
    expected = multilabel_metrics(y_true, y_score)
    got = multilabel_metrics(torch.tensor(y_true), torch.tensor(y_score, requires_grad=True))
    assert got == expected  # same float64/int64 arrays after conversion, so identical results


def test_json_serialisable_plain_types():
    y_true, y_score = random_case(5)
    y_true[:, 1] = 0
    m = multilabel_metrics(y_true, y_score, class_names=list("vwxyz"))
    assert json.loads(json.dumps(m, allow_nan=False))["mAP"] == pytest.approx(m["mAP"])
    for key in ("acc_total", "f1_mi", "f1_ma", "mAP", "hamming_loss", "one_error",
                "ranking_loss", "coverage", "overall", "threshold"):
        assert type(m[key]) is float, key
    assert type(m["n_samples"]) is int and type(m["mAP_present_classes"]) is int
    assert type(m["per_class_acc"]) is list and all(type(v) is float for v in m["per_class_acc"])
    assert type(m["per_class_ap"]) is list
    assert all(v is None or type(v) is float for v in m["per_class_ap"])
    assert m["per_class"]["w"] == {"acc": m["per_class_acc"][1], "ap": None}


@pytest.mark.parametrize("y_true, y_score", [
    (np.zeros(5), np.zeros(5)),                    # 1-D
    (np.zeros((4, 3)), np.zeros((4, 2))),          # shapes differ
    (np.zeros((4, 3)), np.zeros((5, 3))),          # sample counts differ
    (np.zeros((2, 3, 4)), np.zeros((2, 3, 4))),    # 3-D
    (np.zeros((0, 3)), np.zeros((0, 3))),          # empty
    (np.zeros((4, 1)), np.zeros((4, 1))),          # one class
    (np.full((4, 3), 2), np.zeros((4, 3))),        # targets not 0/1
    (np.zeros((4, 3)), np.full((4, 3), np.nan)),   # non-finite scores
])
def test_bad_inputs_raise(y_true, y_score):
    with pytest.raises(ValueError, match="expected"):
        multilabel_metrics(y_true, y_score)


def test_wrong_number_of_class_names_raises():
    y_true, y_score = random_case(0)
    with pytest.raises(ValueError, match="class_names"):
        multilabel_metrics(y_true, y_score, class_names=["a", "b"])


def test_best_improved():
    current = {"f1_mi": 0.8, "f1_ma": 0.6, "acc_total": 0.5, "mAP": float("nan")}
    assert best_improved({}, current) == ["f1_mi", "f1_ma", "acc_total"]  # NaN mAP never improves
    best = {"f1_mi": 0.8, "f1_ma": 0.7, "acc_total": 0.4, "mAP": 0.9}
    best_before, current_before = copy.deepcopy(best), copy.deepcopy(current)
    assert best_improved(best, current) == ["acc_total"]  # equal is not an improvement
    assert best == best_before  # pure: inputs untouched
    assert current.keys() == current_before.keys() and math.isnan(current["mAP"])
    assert all(current[k] == current_before[k] for k in ("f1_mi", "f1_ma", "acc_total"))
    # a NaN best (e.g. mAP with no positives at epoch 1) does not block later improvements
    assert best_improved({"mAP": float("nan")}, {"mAP": 0.1}, keys=("mAP",)) == ["mAP"]
    assert best_improved({"mAP": 0.1}, {}, keys=("mAP",)) == []


def test_format_metrics():
    m = {"f1_mi": 0.81234, "f1_ma": 0.70119, "acc_total": 0.5, "mAP": float("nan"),
         "overall": 0.69814, "n_samples": 12}
    assert format_metrics(m) == "f1_mi 0.8123 f1_ma 0.7012 acc 0.5000 mAP nan overall 0.6981"
    assert format_metrics(m, keys=("mAP", "n_samples")) == "mAP nan n_samples 12"
    y_true, y_score = random_case(1)
    real = multilabel_metrics(y_true, y_score)
    line = format_metrics(real)
    assert line.split()[::2] == ["f1_mi", "f1_ma", "acc", "mAP", "overall"]
    assert float(line.split()[1]) == pytest.approx(real["f1_mi"], abs=5e-5)
    with pytest.raises(KeyError):
        format_metrics(m, keys=("f1_micro",))


# ------------------------------------------------------------------------- binary metrics

def test_binary_metrics_match_sklearn():
    from utils.metrics import binary_metrics

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200)
    score = np.clip(0.35 * y + rng.random(200) * 0.7, 0, 1)
    m = binary_metrics(y, score, threshold=0.6)
    pred = score >= 0.6
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, score))
    assert m["ap"] == pytest.approx(skm.average_precision_score(y, score))
    assert m["precision"] == pytest.approx(skm.precision_score(y, pred))
    assert m["recall"] == pytest.approx(skm.recall_score(y, pred))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert (m["threshold"], m["n_samples"], m["n_positive"]) == (0.6, 200, int(y.sum()))
    # best F1 over every candidate threshold, by brute force
    f1s = {t: skm.f1_score(y, score >= t) for t in np.unique(score)}
    best_t = max(f1s, key=f1s.get)
    assert m["best_f1"] == pytest.approx(f1s[best_t])
    assert skm.f1_score(y, score >= m["best_f1_threshold"]) == pytest.approx(m["best_f1"])


def test_binary_metrics_single_class_gives_nan_auc():
    from utils.metrics import binary_metrics

    m = binary_metrics([0, 0, 0], [0.1, 0.7, 0.2])
    assert np.isnan(m["auc"]) and np.isnan(m["ap"]) and np.isnan(m["best_f1"])
    assert m["precision"] == 0.0 and m["recall"] == 0.0
    m = binary_metrics([1, 1], [0.9, 0.2])
    assert np.isnan(m["auc"]) and m["ap"] == pytest.approx(1.0) and m["recall"] == 0.5


def test_binary_metrics_reject_bad_input():
    from utils.metrics import binary_metrics

    with pytest.raises(ValueError, match="only 0/1"):
        binary_metrics([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="same length"):
        binary_metrics([0, 1], [0.1])
    with pytest.raises(ValueError, match="finite"):
        binary_metrics([0, 1], [0.1, float("nan")])
