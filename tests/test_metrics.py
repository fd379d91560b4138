import numpy as np
import pytest
import torch

from transact.metrics import auc, hit_at_k


def brute_auc(s, y):
    pos = [a for a, b in zip(s, y, strict=True) if b]
    neg = [a for a, b in zip(s, y, strict=True) if not b]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(4))
def test_auc_matches_pairwise_count_with_ties(seed):
    rng = np.random.default_rng(seed)
    s = rng.integers(0, 5, 60).astype(float)  # many ties
    y = rng.integers(0, 2, 60)
    assert auc(s, y) == pytest.approx(brute_auc(s, y))


def test_auc_agrees_with_torch_sorting_on_distinct_scores():
    s = torch.randn(500, generator=torch.Generator().manual_seed(0)).numpy()
    y = (s + np.random.default_rng(1).normal(size=500) > 0).astype(int)
    assert auc(s, y) == pytest.approx(brute_auc(s, y))
    assert np.isnan(auc(s, np.ones(500)))


def test_hit_at_3_hand_worked():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.1, 0.9, 0.2, 0.3, 0.4, 0.5])
    labels = np.array([0, 0, 0, 1, 0, 0, 1, 0, 0, 0])
    groups = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 2])
    # group 0: positive ranked 4th -> miss; group 1: positive ranked 4th -> miss; group 2: no positive.
    assert hit_at_k(scores, labels, groups, 3) == 0.0
    assert hit_at_k(scores, labels, groups, 4) == 1.0
    # Ties are pessimistic: a positive tied with three negatives at the top is not a hit at 3.
    assert hit_at_k(np.ones(4), np.array([1, 0, 0, 0]), np.zeros(4), 3) == 0.0
