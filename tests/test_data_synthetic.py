"""The synthetic generator: deterministic, and its planted signal really needs the lifelong sequence."""

import numpy as np
import pytest
import torch

from transact.data.synthetic import make_synthetic
from transact.quant import dequantize


@pytest.fixture(scope="module")
def data():
    return make_synthetic(num_users=300, requests_per_user=4, seed=11)


def auc(y: np.ndarray, s: np.ndarray) -> float:
    """Mann-Whitney AUC with tied scores averaged."""
    y = y.astype(bool)
    order = np.argsort(s, kind="stable")
    _, inv, cnt = np.unique(s[order], return_inverse=True, return_counts=True)
    ranks = np.empty(len(s))
    ranks[order] = (np.bincount(inv, np.arange(1, len(s) + 1)) / cnt)[inv]
    p, n = y.sum(), (~y).sum()
    return float((ranks[y].sum() - p * (p + 1) / 2) / (p * n))


def probe_features(ds) -> tuple[np.ndarray, np.ndarray]:
    """Per candidate, for ll then rt: how many earlier positive / hide actions were on similar items
    (cosine > 0.6), as log counts and as shares of the sequence. Only the Batch is used."""
    feats, labels = [], []
    for b in ds.batches(128):
        cand = b.cand_item / b.cand_item.norm(dim=1, keepdim=True)
        cols = []
        for s in (b.ll, b.rt):
            items = dequantize(s.item, ds.scale)
            items = items / items.norm(dim=-1, keepdim=True).clamp_min(1e-9)
            valid = s.valid(b.request_ts)[b.cand_request]
            similar = (torch.einsum("nd,nld->nl", cand, items[b.cand_request]) > 0.6) & valid
            act = s.action[b.cand_request]
            pos = (similar & ((act & 3) != 0)).sum(1).float()
            hide = (similar & ((act & 4) != 0)).sum(1).float()
            n = valid.sum(1).clamp_min(1)
            cols += [torch.log1p(pos), torch.log1p(hide), pos / n, hide / n]
        feats.append(torch.stack(cols, 1).numpy())
        labels.append(b.labels.numpy())
    return np.concatenate(feats).astype(np.float64), np.concatenate(labels)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, steps: int = 25):
    """Newton's method; returns a scoring function."""
    x1 = np.column_stack([x, np.ones(len(x))])
    w = np.zeros(x1.shape[1])
    for _ in range(steps):
        p = 1 / (1 + np.exp(-x1 @ w))
        hess = (x1 * (p * (1 - p))[:, None]).T @ x1 + l2 * np.eye(len(w))
        w -= np.linalg.solve(hess, x1.T @ (p - y) + l2 * w)
    return lambda z: np.column_stack([z, np.ones(len(z))]) @ w


def test_deterministic_for_a_seed():
    a = make_synthetic(num_users=40, requests_per_user=2, seed=3)
    b = make_synthetic(num_users=40, requests_per_user=2, seed=3)
    c = make_synthetic(num_users=40, requests_per_user=2, seed=4)
    for name in ("user", "item", "action", "ts", "surface"):
        assert np.array_equal(getattr(a.log, name), getattr(b.log, name))
    assert np.array_equal(a.item_codes, b.item_codes) and a.scale == b.scale
    assert np.array_equal(a.user_dense, b.user_dense) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.labels, c.labels)


def test_shapes_and_rates(data):
    assert data.num_requests == 1200 and data.num_candidates == 1200 * 16 and data.num_items == 2000
    rates = data.labels.mean(0)
    assert 0.15 < rates[0] < 0.4 and 0.03 < rates[1] < 0.15 and 0.03 < rates[2] < 0.2
    # Items of one topic are much closer to each other than to other topics.
    e = data.item_codes.astype(np.float64)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    same = (e[:50] @ e[:50].T)[np.triu_indices(50, 1)].mean()
    other = (e[:50] @ e[50:100].T).mean()
    assert same > 0.6 and abs(other) < 0.3


def test_lifelong_sequence_carries_signal_beyond_rt(data):
    """A plain logistic regression on 'how much did the user engage with / hide similar items' in ll+rt
    beats the same features from rt alone on a later time split, for every head."""
    train, _, test = data.split_by_time(0.1, 0.25)
    x_tr, y_tr = probe_features(train)
    x_te, y_te = probe_features(test)
    for h, head in enumerate(data.heads):
        rt_only = auc(y_te[:, h], fit_logistic(x_tr[:, 4:], y_tr[:, h])(x_te[:, 4:]))
        both = auc(y_te[:, h], fit_logistic(x_tr, y_tr[:, h])(x_te))
        assert both > 0.75, (head, both)
        assert both > rt_only + 0.05, (head, rt_only, both)
