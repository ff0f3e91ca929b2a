"""Detection and segmentation metrics, written out by hand (numpy only).

Every function takes `scores` (higher means more anomalous) and binary `labels` of any shape
(flattened), and treats equal scores as one threshold, so the result does not depend on the
order of tied items:

  * `auroc`: area under the ROC curve as the Mann-Whitney statistic, with tied scores given
    their average rank (a tied positive-negative pair counts one half).
  * `average_precision`: sklearn's step-wise AP, sum over thresholds of (R_n - R_{n-1}) P_n,
    taken at each distinct score from the highest down (no interpolation).
  * `f1_max`: the best F1 over all thresholds "score >= t", with its threshold and the IoU of
    the positives there (TP / (TP + FP + FN)).

A set with no positives or no negatives has no ROC curve (and no positives, no AP): those
raise ValueError.
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
    positives of "score >= threshold" at each."""
    s, y = _flat(scores, labels)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # the last index of each tie group
    tp = np.cumsum(y)[last]
    return s[last], tp, last + 1 - tp


def auroc(scores, labels) -> float:
    """Area under the ROC curve: (sum of the positives' ranks - P(P+1)/2) / (P N), ranks from
    1 (lowest score) with ties averaged."""
    s, y = _flat(scores, labels)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"AUROC needs positives and negatives (got {n_pos} and {n_neg})")
    order = np.argsort(s, kind="stable")
    s_sorted = s[order]
    starts = np.r_[0, np.nonzero(np.diff(s_sorted))[0] + 1]  # first index of each tie group
    ends = np.r_[starts[1:], s.size]  # one past the last
    group_rank = (starts + 1 + ends) / 2  # the mean of ranks starts+1 .. ends
    ranks = np.empty(s.size)
    ranks[order] = np.repeat(group_rank, ends - starts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(scores, labels) -> float:
    """sklearn's average precision: sum_n (R_n - R_{n-1}) P_n over the distinct thresholds."""
    _, tp, fp = counts_by_threshold(scores, labels)
    n_pos = tp[-1]
    if n_pos == 0:
        raise ValueError("average precision needs at least one positive")
    precision, recall = tp / (tp + fp), tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def f1_max(scores, labels) -> tuple[float, float, float]:
    """(best F1, its threshold t, IoU at t) over the thresholds "score >= t"; F1 = 2TP / (2TP +
    FP + FN). The highest threshold wins a tie in F1."""
    t, tp, fp = counts_by_threshold(scores, labels)
    n_pos = tp[-1]
    if n_pos == 0:
        raise ValueError("F1 needs at least one positive")
    fn = n_pos - tp
    f1 = 2 * tp / (2 * tp + fp + fn)
    i = int(np.argmax(f1))
    return float(f1[i]), float(t[i]), float(tp[i] / (tp[i] + fp[i] + fn[i]))
