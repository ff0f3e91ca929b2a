"""Detection and segmentation metrics, written out by hand (numpy; torch only to label regions).

Each takes `scores` (higher: more anomalous) and binary `labels` of any shape (flattened), and
treats equal scores as one threshold, so tied items give the same result in any order. A set
with no positives (or, for AUROC, no negatives) raises ValueError.
"""
from __future__ import annotations

import numpy as np
import torch

from ..masks import components


def _flat(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1) > 0.5
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores but {y.size} labels")
    if np.isnan(s).any():
        raise ValueError("the scores hold NaN")
    return s, y


def counts_by_threshold(scores, labels, weights=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(thresholds, tp, fp): the distinct scores from the highest down, and the true and false
    positives of "score >= threshold" at each (tp: the sum of the positives' `weights`, default
    1 each). ValueError if no label is positive."""
    s, y = _flat(scores, labels)
    if not y.any():
        raise ValueError("the labels hold no positive")
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], s.size - 1]  # the last index of each tie group
    positives = np.cumsum(y)[last]
    w = y if weights is None else np.where(y, np.asarray(weights).reshape(-1)[order], 0.0)
    return s[last], (positives if weights is None else np.cumsum(w)[last]), last + 1 - positives


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


def connected_components(masks) -> tuple[np.ndarray, int]:
    """(labels, count): the 8-connected regions of binary `masks` (N, H, W), each image's own
    (minibldm.masks.components), numbered 1..count across the batch; 0 off the masks."""
    m = np.asarray(masks) > 0.5
    if m.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {m.shape}")
    labels, count = np.zeros(m.shape, dtype=np.int64), 0
    for i in np.nonzero(m.reshape(len(m), -1).any(1))[0]:
        lab = components(torch.from_numpy(m[i]).float()).numpy()
        ids, inverse = np.unique(lab, return_inverse=True)  # ids[0] == -1: off the mask
        labels[i] = np.where(lab >= 0, inverse.reshape(lab.shape) + count, 0)
        count += len(ids) - 1
    return labels, count


def aupro(scores, masks, fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap curve up to a false-positive rate of `fpr_limit`,
    divided by `fpr_limit` (MVTec AD's pixel metric, Bergmann et al., IJCV 2021).

    scores, masks: (N, H, W). At a threshold t, PRO(t) is the mean over the masks' 8-connected
    regions of the fraction of the region's pixels with score >= t, and FPR(t) the fraction of
    all negative pixels with score >= t. Exactly: each positive pixel adds 1 / (regions x its
    region's size) to PRO, so PRO is the weighted count of `counts_by_threshold`. The curve runs
    through (0, 0) and every distinct threshold, linear in between (trapezoids), cut at
    `fpr_limit` by linear interpolation."""
    s, y = _flat(scores, masks)
    labels, n = connected_components(np.asarray(masks).reshape(np.shape(scores)))
    if n == 0:
        raise ValueError("the masks hold no region")
    if y.all():
        raise ValueError("AUPRO needs negative pixels too")
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    sizes = np.bincount(labels.reshape(-1), minlength=n + 1).astype(np.float64)
    _, pro, fp = counts_by_threshold(s, y, weights=1.0 / (n * sizes[labels.reshape(-1)]))
    fpr, pro = np.r_[0.0, fp / (~y).sum()], np.r_[0.0, pro]
    keep = np.searchsorted(fpr, fpr_limit, side="right")  # points with fpr <= limit
    x, p = fpr[:keep], pro[:keep]
    if keep < fpr.size and x[-1] < fpr_limit:  # the segment that crosses the limit
        t = (fpr_limit - x[-1]) / (fpr[keep] - x[-1])
        x, p = np.r_[x, fpr_limit], np.r_[p, p[-1] + t * (pro[keep] - p[-1])]
    return float(np.sum(np.diff(x) * (p[1:] + p[:-1])) / 2 / fpr_limit)
