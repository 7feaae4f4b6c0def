"""Evaluation metrics with scikit-learn semantics, returned as plain (JSON-ready) Python types.

Sections: input helpers, multi-label metrics (the paper's F1mi/F1ma/Acc/mAP/"Overall" plus the
MIML ranking metrics), and log/checkpoint helpers. Binary and single-label metrics belong here
too, each in its own section.
"""
import math
import warnings

import numpy as np
from sklearn import metrics as skm
from sklearn.exceptions import UndefinedMetricWarning


# ---------------------------------------------------------------------------- input helpers

def _to_numpy(x):
    """A numpy array from a numpy array, list or torch tensor (any device, with or without grad)."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _check_multilabel(y_true, y_score):
    """Validate and convert ``[n, C]`` multi-hot targets and scores; return both as arrays."""
    y_true, y_score = _to_numpy(y_true), _to_numpy(y_score)
    if y_true.ndim != 2 or y_score.ndim != 2:
        raise ValueError(f"expected 2-D y_true and y_score of shape [n_samples, n_classes], "
                         f"got shapes {y_true.shape} and {y_score.shape}")
    if y_true.shape != y_score.shape:
        raise ValueError(f"expected y_true and y_score of the same shape, "
                         f"got {y_true.shape} and {y_score.shape}")
    if y_true.shape[0] == 0:
        raise ValueError("expected at least one sample, got an empty y_true")
    if y_true.shape[1] < 2:
        # sklearn's ranking metrics reject a single column; one class is a binary problem
        raise ValueError(f"expected at least 2 classes for multi-label metrics, "
                         f"got {y_true.shape[1]}")
    if not np.isin(y_true, (0, 1)).all():
        raise ValueError("expected y_true to contain only 0/1 (multi-hot labels)")
    if not np.issubdtype(y_score.dtype, np.number) or not np.isfinite(y_score).all():
        raise ValueError("expected y_score to hold finite numbers (class probabilities)")
    return y_true.astype(np.int64), y_score.astype(np.float64)


# ----------------------------------------------------------------------- multi-label metrics

def one_error(y_true, y_score):
    """Fraction of samples whose top-scored label is not a true label.

    Only samples with at least one true label count (the label set must be non-empty for the
    question to make sense); ties go to the first maximal index (``np.argmax``). NaN when no
    sample has a true label. Expects validated numpy arrays.
    """
    has_label = y_true.any(axis=1)
    if not has_label.any():
        return float("nan")
    top = np.argmax(y_score[has_label], axis=1)
    hits = y_true[has_label][np.arange(top.size), top]
    return float(np.mean(hits == 0))


def multilabel_metrics(y_true, y_score, threshold=0.5, class_names=None):
    """Multi-label metrics of ``[n, C]`` scores against multi-hot targets, sklearn conventions.

    Predictions are ``y_score >= threshold``. Keys of the returned dict (plain Python types):

    - ``acc_total``: subset accuracy (``accuracy_score`` on multi-hot = exact match of the row).
    - ``f1_mi`` / ``f1_ma``: F1 micro / macro; a class with no true and no predicted positive
      has F1 0 in the macro mean (``zero_division=0``, sklearn's warning silenced).
    - ``mAP``: macro average precision (``average_precision_score``) over the classes with at
      least one positive in ``y_true`` only, since AP is undefined without positives (sklearn
      would warn and return 0 for such a class). ``mAP_classes`` says how many were used; NaN
      when none.
    - ``hamming_loss``: fraction of wrong (sample, class) decisions.
    - ``one_error``: see :func:`one_error`.
    - ``ranking_loss``: ``label_ranking_loss``, the fraction of (true, false) label pairs that
      are mis-ordered; a tie counts as mis-ordered; rows with all or no labels count 0.
    - ``coverage``: ``coverage_error``, the mean rank of the lowest-scored true label (ties get
      the worst rank; a row without labels counts 0). This is sklearn's convention; the MIML
      literature's coverage (Tsoumakas et al. 2010) is this minus 1.
    - ``per_class_acc``: per class, accuracy of its binary decision over the samples.
    - ``per_class_ap``: per class, AP, or None for a class without positives.
    - ``overall``: mean of f1_mi, f1_ma, acc_total and mAP (the paper's "Overall"; NaN if mAP is).
    - ``threshold``, ``n_samples``; and ``per_class`` = ``{name: {"acc", "ap"}}`` when
      ``class_names`` (length C) is given.

    Raises ValueError unless both inputs are non-empty 2-D arrays of the same shape with at
    least 2 classes, 0/1 targets and finite scores.
    """
    y_true, y_score = _check_multilabel(y_true, y_score)
    n, n_classes = y_true.shape
    if class_names is not None and len(class_names) != n_classes:
        raise ValueError(f"expected {n_classes} class_names, got {len(class_names)}")
    y_pred = (y_score >= threshold).astype(np.int64)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        f1_mi = skm.f1_score(y_true, y_pred, average="micro", zero_division=0)
        f1_ma = skm.f1_score(y_true, y_pred, average="macro", zero_division=0)
        has_pos = y_true.any(axis=0)
        per_class_ap = [float(skm.average_precision_score(y_true[:, c], y_score[:, c]))
                        if has_pos[c] else None for c in range(n_classes)]
    aps = [ap for ap in per_class_ap if ap is not None]
    # the mean of per-column binary APs is exactly sklearn's average="macro"
    mAP = float(np.mean(aps)) if aps else float("nan")
    acc_total = float(skm.accuracy_score(y_true, y_pred))
    per_class_acc = [float(a) for a in np.mean(y_true == y_pred, axis=0)]

    m = {
        "acc_total": acc_total,
        "f1_mi": float(f1_mi),
        "f1_ma": float(f1_ma),
        "mAP": mAP,
        "mAP_classes": len(aps),
        "hamming_loss": float(skm.hamming_loss(y_true, y_pred)),
        "one_error": one_error(y_true, y_score),
        "ranking_loss": float(skm.label_ranking_loss(y_true, y_score)),
        "coverage": float(skm.coverage_error(y_true, y_score)),
        "per_class_acc": per_class_acc,
        "per_class_ap": per_class_ap,
        "overall": float((f1_mi + f1_ma + acc_total + mAP) / 4),
        "threshold": float(threshold),
        "n_samples": int(n),
    }
    if class_names is not None:
        m["per_class"] = {str(name): {"acc": acc, "ap": ap}
                          for name, acc, ap in zip(class_names, per_class_acc, per_class_ap)}
    return m


# ------------------------------------------------------------------- log/checkpoint helpers

_SHORT_NAMES = {"acc_total": "acc"}


def format_metrics(m, keys=("f1_mi", "f1_ma", "acc_total", "mAP", "overall")):
    """One log line, e.g. ``f1_mi 0.8123 f1_ma 0.7012 acc 0.5000 mAP 0.7788 overall 0.6981``.

    Floats get 4 decimals (NaN and None print ``nan``), ints print as ints; a missing key is a
    KeyError so that a typo does not vanish from the log.
    """
    parts = []
    for key in keys:
        v = m[key]
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            text = str(int(v))
        else:
            text = f"{float('nan') if v is None else float(v):.4f}"
        parts.append(f"{_SHORT_NAMES.get(key, key)} {text}")
    return " ".join(parts)


def best_improved(best, current, keys=("f1_mi", "f1_ma", "acc_total", "mAP")):
    """Keys (in ``keys`` order) whose current value is strictly above the best so far.

    A key missing from ``best``, or stored there as NaN/None, counts as -inf; a NaN, None or
    missing current value never improves. Pure: neither dict is modified.
    """
    improved = []
    for key in keys:
        cur = current.get(key)
        if cur is None or math.isnan(cur):
            continue
        prev = best.get(key)
        if prev is None or math.isnan(prev):
            prev = -math.inf
        if cur > prev:
            improved.append(key)
    return improved
