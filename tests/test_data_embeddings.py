"""Item embeddings from co-occurrence: structure, determinism, and training data only."""

import numpy as np
import pytest

from transact.data.embeddings import learn_item_embeddings, quantize_embeddings
from transact.data.logs import load_action_log
from transact.errors import TransactError


def two_groups(num_users: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Users like either items 0-9 or items 10-19 (each user picks 6 of their group)."""
    rng = np.random.default_rng(seed)
    user, item = [], []
    for u in range(num_users):
        group = u % 2
        picks = rng.choice(10, 6, replace=False) + 10 * group
        user += [u] * 6
        item += picks.tolist()
    return np.array(user), np.array(item)


def test_co_occurring_items_are_close_and_unseen_items_are_zero():
    user, item = two_groups()
    emb = learn_item_embeddings(user, item, np.ones(len(user)), num_items=25, dim=8, seed=0)
    assert emb.shape == (25, 8) and emb.dtype == np.float32
    assert np.allclose(np.linalg.norm(emb[:20], axis=1), 1.0, atol=1e-5)
    assert not emb[20:].any()  # items 20-24 never occur
    sim = emb[:20] @ emb[:20].T
    within = np.concatenate([sim[:10, :10][np.triu_indices(10, 1)], sim[10:, 10:][np.triu_indices(10, 1)]])
    across = sim[:10, 10:]
    assert within.min() > across.max()


def test_fold_in_beyond_the_vocabulary_and_determinism():
    user, item = two_groups()
    full = learn_item_embeddings(user, item, np.ones(len(user)), num_items=20, dim=4, seed=1)
    small = learn_item_embeddings(user, item, np.ones(len(user)), num_items=20, dim=4, seed=1, max_vocab=8)
    assert np.array_equal(full, learn_item_embeddings(user, item, np.ones(len(user)), 20, dim=4, seed=1))
    # Items outside the 8-item vocabulary still land next to their own group.
    sim = small @ small.T
    for i in range(20):
        own = [j for j in range(20) if j // 10 == i // 10 and j != i]
        other = [j for j in range(20) if j // 10 != i // 10]
        assert sim[i, own].mean() > sim[i, other].mean() + 0.5


def test_zero_weight_events_are_ignored_and_codes_fit_the_scale():
    user, item = two_groups()
    weight = np.where(item < 10, 1.0, 0.0)
    emb = learn_item_embeddings(user, item, weight, num_items=20, dim=4)
    assert emb[:10].any(axis=1).all() and not emb[10:].any()
    codes, scale = quantize_embeddings(emb)
    assert codes.dtype == np.int8 and scale > 0 and int(np.abs(codes).max()) <= 127
    assert np.abs(codes[:10].astype(np.float32) * scale / 127 - np.clip(emb[:10], -scale, scale)).max() <= (
        scale / 127 / 2 + 1e-6
    )


def test_loader_learns_embeddings_from_the_training_period_only(tmp_path):
    rng = np.random.default_rng(0)
    rows = ["user,item,action,timestamp"]
    t = 0
    for day in range(40):  # 40 daily sessions of 8 users over items a0..a9; item 'late' only on the last day
        for u in range(8):
            for it in rng.choice(10, 4, replace=False):
                rows.append(f"u{u},a{it},click,{t}")
                t += 1000
            if day == 39:
                rows.append(f"u{u},late,click,{t}")
        t += 86_400_000
    path = tmp_path / "log.csv"
    path.write_text("\n".join(rows) + "\n")
    ds = load_action_log(path, max_candidates=5, valid_frac=0.1, test_frac=0.1, now_ms=t + 1)
    late = int(np.flatnonzero(ds.item_keys == "late")[0])
    assert not ds.item_codes[late].any()  # only seen after the training period
    assert all(ds.item_codes[i].any() for i in range(len(ds.item_keys)) if i != late)
    _, _, test = ds.split_by_time(0.1, 0.1)
    assert late in test.cand_item
    # Splitting with a shorter training period than the embeddings saw would leak: refused.
    with pytest.raises(TransactError, match="field 'split'"):
        ds.split_by_time(0.2, 0.2)
