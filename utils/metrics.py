"""Evaluation metrics with scikit-learn semantics, returned as plain (JSON-ready) Python types.

Sections: input helpers, multi-label metrics (the paper's F1mi/F1ma/Acc/mAP/"Overall" plus the
MIML ranking metrics), single-label metrics (main_single.py), binary metrics (CryoEM), and
log/checkpoint helpers.
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
    - ``mAP``: scikit-learn's macro ``average_precision_score`` as it comes, as the reference
      code computed it: a class without a positive in ``y_true`` counts with AP 0 (sklearn's
      warning silenced).
    - ``mAP_present``: the macro AP over the classes with at least one positive only (AP is
      undefined without positives); ``mAP_present_classes`` says how many; NaN when none.
    - ``hamming_loss``: fraction of wrong (sample, class) decisions.
    - ``one_error``: see :func:`one_error`.
    - ``ranking_loss``: ``label_ranking_loss``, the fraction of (true, false) label pairs that
      are mis-ordered; a tie counts as mis-ordered; rows with all or no labels count 0.
    - ``coverage``: ``coverage_error``, the mean rank of the lowest-scored true label (ties get
      the worst rank; a row without labels counts 0). This is sklearn's convention; the MIML
      literature's coverage (Tsoumakas et al. 2010) is this minus 1.
    - ``per_class_acc``: per class, accuracy of its binary decision over the samples.
    - ``per_class_ap``: per class, AP, or None for a class without positives.
    - ``overall``: mean of f1_mi, f1_ma, acc_total and mAP (the paper's "Overall").
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
        warnings.simplefilter("ignore", UserWarning)  # "No positive class found in y_true"
        mAP = float(skm.average_precision_score(y_true, y_score, average="macro"))
        has_pos = y_true.any(axis=0)
        per_class_ap = [float(skm.average_precision_score(y_true[:, c], y_score[:, c]))
                        if has_pos[c] else None for c in range(n_classes)]
    aps = [ap for ap in per_class_ap if ap is not None]
    mAP_present = float(np.mean(aps)) if aps else float("nan")
    acc_total = float(skm.accuracy_score(y_true, y_pred))
    per_class_acc = [float(a) for a in np.mean(y_true == y_pred, axis=0)]

    m = {
        "acc_total": acc_total,
        "f1_mi": float(f1_mi),
        "f1_ma": float(f1_ma),
        "mAP": mAP,
        "mAP_present": mAP_present,
        "mAP_present_classes": len(aps),
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


# ---------------------------------------------------------------------- single-label metrics

def singlelabel_metrics(y_true, y_score, threshold=0.5, class_names=None):
    """The multi-label metrics plus single-label ones, for rows with exactly one true label.

    Adds to :func:`multilabel_metrics`:

    - ``top1_acc``: fraction of samples whose highest score is their label
      (``accuracy_score`` of the label index vs ``argmax``; ties go to the first index).
    - ``balanced_acc``: mean recall over the classes present in ``y_true``
      (``balanced_accuracy_score``).
    - ``confusion_matrix``: ``C x C`` counts, rows = true class, columns = top-1 prediction
      (``confusion_matrix`` with ``labels=range(C)``, so absent classes keep their row).

    Raises ValueError when a row of ``y_true`` does not hold exactly one label.
    """
    m = multilabel_metrics(y_true, y_score, threshold, class_names)
    y_true, y_score = _check_multilabel(y_true, y_score)
    counts = y_true.sum(axis=1)
    if (counts != 1).any():
        row = int(np.flatnonzero(counts != 1)[0])
        raise ValueError(f"expected exactly one label per row for single-label metrics, "
                         f"row {row} has {int(counts[row])}")
    true_idx = y_true.argmax(axis=1)
    pred_idx = y_score.argmax(axis=1)
    n_classes = y_true.shape[1]
    m["top1_acc"] = float(skm.accuracy_score(true_idx, pred_idx))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # predictions of classes absent from y_true
        m["balanced_acc"] = float(skm.balanced_accuracy_score(true_idx, pred_idx))
    m["confusion_matrix"] = skm.confusion_matrix(true_idx, pred_idx, labels=list(range(n_classes))).tolist()
    return m


# --------------------------------------------------------------------------- binary metrics

def binary_metrics(y_true, y_score, threshold=0.5):
    """Binary classification metrics of scores (probabilities) against 0/1 labels.

    Keys (plain floats; NaN when undefined, e.g. AUC with a single class in ``y_true``):

    - ``auc``: ``roc_auc_score``; ``ap``: ``average_precision_score``.
    - ``precision``, ``recall``, ``f1`` of ``y_score >= threshold`` (``zero_division=0``).
    - ``best_f1`` and ``best_f1_threshold``: the largest F1 over the thresholds of
      ``precision_recall_curve`` (predict positive when the score is >= that threshold).
    - ``threshold``, ``n_samples``, ``n_positive``.
    """
    y_true, y_score = _to_numpy(y_true).reshape(-1), _to_numpy(y_score).reshape(-1)
    if y_true.shape != y_score.shape or y_true.size == 0:
        raise ValueError(f"expected non-empty 1-D y_true and y_score of the same length, "
                         f"got {y_true.shape} and {y_score.shape}")
    if not np.isin(y_true, (0, 1)).all():
        raise ValueError("expected y_true to contain only 0/1")
    if not np.isfinite(y_score).all():
        raise ValueError("expected y_score to hold finite numbers")
    y_true = y_true.astype(np.int64)
    y_score = y_score.astype(np.float64)
    y_pred = (y_score >= threshold).astype(np.int64)
    both = 0 < y_true.sum() < y_true.size
    nan = float("nan")
    m = {
        "auc": float(skm.roc_auc_score(y_true, y_score)) if both else nan,
        "ap": float(skm.average_precision_score(y_true, y_score)) if y_true.any() else nan,
        "precision": float(skm.precision_score(y_true, y_pred, zero_division=0)),
        "recall": float(skm.recall_score(y_true, y_pred, zero_division=0)),
        "f1": float(skm.f1_score(y_true, y_pred, zero_division=0)),
        "threshold": float(threshold),
    }
    if y_true.any():
        prec, rec, thr = skm.precision_recall_curve(y_true, y_score)
        prec, rec = prec[:-1], rec[:-1]  # the last point (recall 0) has no threshold
        denom = prec + rec
        f1 = np.divide(2 * prec * rec, denom, out=np.zeros_like(denom), where=denom > 0)
        best = int(np.argmax(f1))
        m["best_f1"], m["best_f1_threshold"] = float(f1[best]), float(thr[best])
    else:
        m["best_f1"], m["best_f1_threshold"] = nan, nan
    m["n_samples"] = int(y_true.size)
    m["n_positive"] = int(y_true.sum())
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
