"""Item embeddings learned from co-occurrence in user histories (numpy only).

Items that the same users engage with get similar vectors: a positive-PMI item-item matrix over the
most frequent items is factorised with a randomised eigendecomposition, and the rarer items are
folded in through the users who touched them. Callers pass only *training* events, so an item first
seen later gets a zero vector (the model treats it as "no similarity to anything").
"""

from __future__ import annotations

import numpy as np
import torch

from ..quant import fit_scale, quantize


def _dense_rows(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    out = np.zeros(shape, dtype=np.float64)
    np.add.at(out, (rows, cols), vals)
    return out


def _top_eigvecs(m: np.ndarray, k: int, rng: np.random.Generator, iters: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Largest-magnitude eigenpairs of a symmetric matrix by randomised subspace iteration."""
    n = m.shape[0]
    k = min(k, n)
    q = np.linalg.qr(m @ rng.standard_normal((n, min(n, k + 10))))[0]
    for _ in range(iters):
        q = np.linalg.qr(m @ q)[0]
    vals, vecs = np.linalg.eigh(q.T @ m @ q)
    top = np.argsort(-np.abs(vals))[:k]
    return vals[top], q @ vecs[:, top]


def learn_item_embeddings(
    user: np.ndarray,
    item: np.ndarray,
    weight: np.ndarray,
    num_items: int,
    dim: int = 32,
    seed: int = 0,
    max_vocab: int = 2048,
    chunk_users: int = 2048,
) -> np.ndarray:
    """(num_items, dim) float32 unit rows (zero rows for items absent from the events).

    Args:
        user, item, weight: one row per (training) event; repeated (user, item) pairs add up.
        num_items: size of the item table.
        dim: embedding width.
        seed: the randomised factorisation is deterministic for a seed.
        max_vocab: the PPMI matrix covers this many most frequent items; the rest are folded in.
        chunk_users: users per block when accumulating co-occurrences (bounds memory).
    """
    user, item = np.asarray(user, np.int64), np.asarray(item, np.int64)
    weight = np.asarray(weight, np.float64)
    out = np.zeros((num_items, dim), dtype=np.float32)
    keep = weight > 0
    user, item, weight = user[keep], item[keep], weight[keep]
    if len(user) == 0:
        return out
    rng = np.random.default_rng(seed)
    # Sum repeated (user, item) pairs, then dampen heavy repeats so one fan does not dominate.
    uid, u = np.unique(user, return_inverse=True)
    pair, inv = np.unique(u * num_items + item, return_inverse=True)
    w = np.log1p(np.bincount(inv, weights=weight))
    pu, pi = pair // num_items, pair % num_items

    counts = np.bincount(pi, minlength=num_items)
    vocab = np.argsort(-counts, kind="stable")[: min(max_vocab, int((counts > 0).sum()))]
    col = np.full(num_items, -1, dtype=np.int64)
    col[vocab] = np.arange(len(vocab))
    in_vocab = col[pi] >= 0
    v = len(vocab)

    # Item-item co-occurrence C = X^T X over the vocabulary, accumulated in blocks of users.
    co = np.zeros((v, v), dtype=np.float64)
    vu, vc, vw = pu[in_vocab], col[pi[in_vocab]], w[in_vocab]
    for lo in range(0, len(uid), chunk_users):
        sel = (vu >= lo) & (vu < lo + chunk_users)
        x = _dense_rows(vu[sel] - lo, vc[sel], vw[sel], (min(chunk_users, len(uid) - lo), v))
        co += x.T @ x
    np.fill_diagonal(co, 0.0)
    total = co.sum()
    if total <= 0:
        return out
    marg = co.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        pmi = np.log(co * total / np.outer(marg, marg))
    ppmi = np.where(np.isfinite(pmi) & (pmi > 0), pmi, 0.0)

    vals, vecs = _top_eigvecs(ppmi, dim, rng)
    emb = vecs * np.sqrt(np.abs(vals))[None, :]
    # A deterministic sign per component (the largest entry positive) so reruns agree exactly.
    flip = np.sign(emb[np.abs(emb).argmax(axis=0), np.arange(emb.shape[1])])
    emb = emb * np.where(flip == 0, 1.0, flip)
    full = np.zeros((num_items, dim), dtype=np.float64)
    full[vocab, : emb.shape[1]] = emb

    # Fold in the rest: a user's profile is the weighted sum of their vocabulary items; an item
    # outside the vocabulary is the weighted sum of the profiles of its users.
    if v < int((counts > 0).sum()):
        profile = np.zeros((len(uid), dim))
        np.add.at(profile, vu, vw[:, None] * full[vocab][vc])
        rest = ~in_vocab
        np.add.at(full, pi[rest], w[rest][:, None] * profile[pu[rest]])

    norm = np.linalg.norm(full, axis=1, keepdims=True)
    out[:] = np.where(norm > 1e-12, full / np.maximum(norm, 1e-12), 0.0)
    return out


def quantize_embeddings(emb: np.ndarray, scale: float | None = None) -> tuple[np.ndarray, float]:
    """float (I, 32) -> int8 codes and the scale used (fitted from the data when not given)."""
    t = torch.from_numpy(np.ascontiguousarray(emb, dtype=np.float32))
    if scale is None:
        nonzero = t[t.norm(dim=1) > 0]
        scale = fit_scale(nonzero) if nonzero.numel() else 0.65
    return quantize(t, scale).numpy(), float(scale)
