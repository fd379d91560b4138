"""Ranking metrics: AUC (with ties) and HIT@k per head, computed per request."""

from __future__ import annotations

import numpy as np


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum statistic; ties share their average rank.

    NaN when only one class is present."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels) > 0.5
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    # Average ranks over runs of equal scores.
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def hit_at_k(scores: np.ndarray, labels: np.ndarray, groups: np.ndarray, k: int = 3) -> float:
    """Share of requests (with at least one positive and one negative) whose top-k by score holds a
    positive. Equal scores are ordered pessimistically (negatives first)."""
    scores, labels, groups = np.asarray(scores), np.asarray(labels) > 0.5, np.asarray(groups)
    hits, total = 0, 0
    order = np.lexsort((labels, -scores, groups))  # by group, score desc, negatives before positives
    g_sorted = groups[order]
    bounds = np.flatnonzero(np.diff(g_sorted)) + 1
    for chunk in np.split(order, bounds):
        y = labels[chunk]
        if y.all() or not y.any():
            continue
        total += 1
        hits += bool(y[:k].any())
    return hits / total if total else float("nan")
