"""Detection and segmentation metrics, written out by hand (numpy only).

Each takes `scores` (higher: more anomalous) and binary `labels` of any shape (flattened), and
treats equal scores as one threshold, so tied items give the same result in any order. A set
with no positives (or, for AUROC, no negatives) raises ValueError.
"""
from __future__ import annotations

import numpy as np


def _flat(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1) > 0.5
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores but {y.size} labels")
    if np.isnan(s).any():
        raise ValueError("the scores hold NaN")
    return s, y


def counts_by_threshold(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, tp, fp): the distinct scores from the highest down, and the true and false
    positives of "score >= threshold" at each. ValueError if no label is positive."""
    s, y = _flat(scores, labels)
    if not y.any():
        raise ValueError("the labels hold no positive")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # the last index of each tie group
    tp = np.cumsum(y)[last]
    return s[last], tp, last + 1 - tp


def auroc(scores, labels) -> float:
    """Area under the ROC curve through the distinct thresholds (trapezoids): the Mann-Whitney
    statistic, P(positive scores above negative), a tied pair counting one half."""
    _, tp, fp = counts_by_threshold(scores, labels)
    n_pos, n_neg = int(tp[-1]), int(fp[-1])
    if n_neg == 0:
        raise ValueError(f"AUROC needs negatives too (got {n_pos} positives only)")
    tp, fp = np.r_[0, tp], np.r_[0, fp]
    return float(np.sum(np.diff(fp) * (tp[1:] + tp[:-1])) / (2 * n_pos * n_neg))


def average_precision(scores, labels) -> float:
    """sklearn's step-wise average precision, sum_n (R_n - R_{n-1}) P_n over the distinct
    thresholds from the highest down (no interpolation)."""
    _, tp, fp = counts_by_threshold(scores, labels)
    precision, recall = tp / (tp + fp), tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def f1_max(scores, labels) -> tuple[float, float, float]:
    """(best F1, its threshold t, IoU TP / (TP + FP + FN) at t) over the thresholds
    "score >= t"; F1 = 2TP / (2TP + FP + FN). The highest threshold wins a tie in F1."""
    t, tp, fp = counts_by_threshold(scores, labels)
    fn = tp[-1] - tp
    f1 = 2 * tp / (2 * tp + fp + fn)
    i = int(np.argmax(f1))
    return float(f1[i]), float(t[i]), float(tp[i] / (tp[i] + fp[i] + fn[i]))
