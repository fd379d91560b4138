"""RankingDataset: sequences cut at the request time, batching, splits and input checks."""

import numpy as np
import pytest
import torch

from transact.batch import validate_batch
from transact.config import ModelConfig, TransActV2Config
from transact.data.dataset import ActionLog, RankingDataset, Requests, cut_points, sessionize, time_cutoffs
from transact.data.synthetic import make_synthetic
from transact.errors import TransactError

CLICK, SAVE, HIDE = 1, 2, 4


@pytest.fixture(scope="module")
def synth() -> RankingDataset:
    return make_synthetic(num_users=120, requests_per_user=3, long_term_actions=(200, 500), max_ll=300, seed=5)


def tiny(**kw) -> RankingDataset:
    """Two users; the log is given out of order on purpose (the dataset sorts it, ties stable)."""
    #            user item action        ts  surface
    rows = [(0, 3, CLICK, 4000, 0),
            (0, 0, CLICK, 1000, 0),
            (0, 1, 0, 2000, 2),
            (0, 2, SAVE, 3000, 1),
            (0, 1, HIDE, 3000, 0),  # same time as the save: stays after it
            (1, 0, CLICK | SAVE, 500, 0),
            (0, 4, 0, 5000, 0)]  # fmt: skip
    user, item, action, ts, surface = (np.array(c) for c in zip(*rows, strict=True))
    log = ActionLog(user, item, action, ts, surface)
    req = Requests(
        user=np.array([0, 0, 1]), ts=np.array([3000, 9000, 600]), surface=np.array([0, 1, 0]),
        user_dense=np.zeros((3, 2), np.float32), cand_request=np.array([1, 0, 0, 2]),
        cand_item=np.array([4, 1, 3, 2]), cand_action=np.array([SAVE | CLICK, HIDE, 0, CLICK], np.int32),
        item_dense=np.arange(8, dtype=np.float32).reshape(4, 2),
    )  # fmt: skip
    codes = (np.arange(5 * 32).reshape(5, 32) % 200 - 100).astype(np.int8)
    return RankingDataset(log, req, codes, 0.5, **{"max_ll": 3, "max_rt": 2, "max_imp": 5, **kw})


def test_hand_worked_sequences_and_labels():
    ds = tiny()
    b = ds.batch([0, 1, 2])
    # Request 0 (user 0 at t=3000): only events strictly before 3000 -> ll/rt [item0 click], imp [item1].
    assert b.ll.length.tolist() == [1, 3, 1] and b.rt.length.tolist() == [1, 2, 1]
    assert b.imp.length.tolist() == [1, 2, 0]
    assert b.ll.ts[0, :1].tolist() == [1000] and b.imp.ts[0, :1].tolist() == [2000]
    # Request 1 (t=9000): explicit actions 0@1000, 2@3000 (save), 1@3000 (hide), 3@4000 -> the latest 3
    # in order oldest -> newest with the tie kept in log order; rt the latest 2.
    assert b.ll.ts[1].tolist() == [3000, 3000, 4000]
    assert b.ll.action[1].tolist() == [SAVE, HIDE, CLICK]
    assert b.ll.surface[1].tolist() == [1, 0, 0]
    assert torch.equal(b.ll.item[1], torch.from_numpy(ds.item_codes[[2, 1, 3]]))
    assert b.rt.action[1].tolist() == [HIDE, CLICK]
    assert b.imp.ts[1, :2].tolist() == [2000, 5000]
    # Padding: width = longest in the batch, padded slots are zero.
    assert b.ll.ts.shape == (3, 3) and b.ll.ts[0, 1:].tolist() == [0, 0] and int(b.ll.item[0, 1:].abs().sum()) == 0
    # Candidates grouped by request, labels = bits of what the user did (heads click, save, hide).
    assert b.cand_request.tolist() == [0, 0, 1, 2]
    assert b.labels.tolist() == [[0, 0, 1], [0, 0, 0], [1, 1, 0], [1, 0, 0]]
    assert b.item_dense.tolist() == [[2, 3], [4, 5], [0, 1], [6, 7]]
    assert torch.allclose(b.cand_item, torch.from_numpy(ds.item_codes[[1, 3, 4, 2]]).float() * 0.5 / 127)
    assert b.hour.tolist() == [0, 0, 0] and b.request_ts.tolist() == [3000, 9000, 600]
    # An empty sequence still has width 1 (and length 0).
    only_user1 = ds.batch([2])
    assert only_user1.imp.ts.shape == (1, 1) and only_user1.imp.length.tolist() == [0]


def test_batches_validate_against_model_config(synth):
    cfg = ModelConfig(**synth.model_overrides())
    assert cfg.user_dense_dim == synth.user_dense.shape[1] and cfg.quant_scale == synth.scale
    seen = []
    for b in synth.batches(50, shuffle=True, seed=0):
        validate_batch(b, cfg)
        assert b.num_requests <= 50
        seen.append(b.num_candidates)
    assert sum(seen) == synth.num_candidates


def brute_force(ds: RankingDataset, r: int) -> dict[str, list[tuple[int, int, int]]]:
    """The three sequences of request r by a plain loop over the log."""
    u, t = ds.req_user[r], ds.req_ts[r]
    log = ds.log
    before = [(int(log.ts[i]), int(log.action[i]), int(log.item[i])) for i in range(len(log))
              if log.user[i] == u and log.ts[i] < t]  # fmt: skip  (the log is in (user, ts) order)
    explicit = [e for e in before if e[1] != 0]
    impressions = [e for e in before if e[1] == 0]
    return {"ll": explicit[-ds.max_ll :], "rt": explicit[-ds.max_rt :], "imp": impressions[-ds.max_imp :]}


def test_sequences_match_brute_force_and_never_see_the_future(synth):
    ids = np.random.default_rng(0).choice(synth.num_requests, 12, replace=False)
    b = synth.batch(ids)
    for row, r in enumerate(ids):
        ref = brute_force(synth, int(r))
        for name in ("ll", "rt", "imp"):
            s = getattr(b, name)
            n = int(s.length[row])
            got = list(zip(s.ts[row, :n].tolist(), s.action[row, :n].tolist(), strict=True))
            assert got == [(ts, a) for ts, a, _ in ref[name]], (name, r)
            assert torch.equal(s.item[row, :n], torch.from_numpy(synth.item_codes[[i for *_, i in ref[name]]]))
    assert int(b.ll.length.max()) == synth.max_ll  # some users have more history than max_ll: truncated
    for b in synth.batches(64):
        for s in (b.ll, b.rt, b.imp):
            stored = torch.arange(s.ts.shape[1])[None, :] < s.length[:, None]
            assert bool((s.ts < b.request_ts[:, None])[stored].all())
            assert torch.equal(s.valid_count(b.request_ts), s.length)


def test_split_by_time_is_strictly_ordered(synth):
    train, valid, test = synth.split_by_time(0.15, 0.2)
    assert train.num_requests + valid.num_requests + test.num_requests == synth.num_requests
    assert train.req_ts.max() < valid.req_ts.min() and valid.req_ts.max() < test.req_ts.min()
    assert abs(test.num_requests - 0.2 * synth.num_requests) <= 5
    assert train.num_candidates + valid.num_candidates + test.num_candidates == synth.num_candidates
    # A subset yields the same examples as the full data set for the same request.
    r = int(np.flatnonzero(synth.req_ts == test.req_ts[3])[0])
    a, b = test.batch([3]), synth.batch([r])
    for name, t in a.named_tensors(with_labels=True):
        assert torch.equal(t, dict(b.named_tensors(with_labels=True))[name]), name


def test_time_cutoffs_keep_ties_together():
    ts = np.array([1, 2, 2, 2, 3, 4, 5, 5, 6, 7])
    t_valid, t_test = time_cutoffs(ts, 0.2, 0.3)
    # 3 test requests would cut between the two 5s: both go to test, which gets 4.
    assert (t_valid, t_test) == (4, 5)
    assert [(ts < t_valid).sum(), ((ts >= t_valid) & (ts < t_test)).sum(), (ts >= t_test).sum()] == [5, 1, 4]


def test_shuffle_is_deterministic_for_a_seed(synth):
    first = [b.request_ts.tolist() for b in synth.batches(40, shuffle=True, seed=7)]
    again = [b.request_ts.tolist() for b in synth.batches(40, shuffle=True, seed=7)]
    other = [b.request_ts.tolist() for b in synth.batches(40, shuffle=True, seed=8)]
    assert first == again and first != other
    assert sorted(sum(first, [])) == sorted(synth.req_ts.tolist())


def test_cut_points_binary_search():
    group = np.array([0, 0, 0, 2, 2, 5])
    ts = np.array([1, 5, 5, 0, 9, 3])
    start, cut = cut_points(group, ts, np.array([0, 0, 0, 2, 3, 5, 5]), np.array([0, 5, 6, 9, 1, 3, 4]))
    assert start.tolist() == [0, 0, 0, 3, 5, 5, 5]
    assert cut.tolist() == [0, 1, 3, 4, 5, 5, 6]


def test_sessionize_chunks_and_merges():
    log = ActionLog(np.array([0, 0, 0, 0, 1]), np.array([7, 8, 7, 9, 7]), np.array([0, 0, CLICK, HIDE, SAVE]),
                    np.array([0, 10, 20, 10_000, 5]))  # fmt: skip
    req_user, req_ts, _, cand_request, cand_item, cand_action = sessionize(log, gap_ms=1000, max_candidates=3)
    assert req_user.tolist() == [0, 0, 1] and req_ts.tolist() == [0, 10_000, 5]
    assert cand_request.tolist() == [0, 0, 1, 2] and cand_item.tolist() == [7, 8, 9, 7]
    assert cand_action.tolist() == [CLICK, 0, HIDE, SAVE]  # impression then click of item 7 -> click


@pytest.mark.parametrize(
    "change, field",
    [
        ({"user_dense": np.array([[0, 0], [np.nan, 0], [0, 0]], np.float32)}, "user_dense"),
        ({"item_dense": np.full((4, 2), np.inf, np.float32)}, "item_dense"),
        ({"cand_request": np.array([0, 0, 0, 2])}, "cand_request"),  # request 1 has no candidates
        ({"cand_item": np.array([4, 1, 3, 5])}, "cand_item"),
        ({"cand_action": np.array([8, 0, 0, 0], np.int32)}, "cand_action"),
        ({"surface": np.array([0, -1, 0])}, "surface"),
    ],
)
def test_bad_dataset_inputs_name_the_field(change, field):
    good = tiny()
    req = Requests(user=good.req_user, ts=good.req_ts, surface=good.req_surface, user_dense=good.user_dense,
                   cand_request=np.array([1, 0, 0, 2]), cand_item=np.array([4, 1, 3, 2]),
                   cand_action=np.array([3, 4, 0, 1], np.int32), item_dense=np.zeros((4, 2), np.float32))  # fmt: skip
    for k, v in change.items():
        setattr(req, k, v)
    with pytest.raises(TransactError, match=f"field '{field}'"):
        RankingDataset(good.log, req, good.item_codes, 0.5)


def test_model_overrides_build_a_valid_config():
    ds = tiny()
    cfg = ModelConfig(**{**ds.model_overrides(), "transact_v2": TransActV2Config(r_rt=1)})
    validate_batch(ds.batch([0, 1, 2]), cfg)
    assert (cfg.max_ll, cfg.max_rt, cfg.max_imp, cfg.num_surfaces) == (3, 2, 5, 3)
    custom = RankingDataset(ds.log, Requests(ds.req_user, ds.req_ts, ds.req_surface, ds.user_dense,
                            np.array([0, 1, 2]), np.array([1, 2, 3]), np.array([1, 2, 0], np.int32),
                            np.zeros((3, 1), np.float32)), ds.item_codes, 0.5, action_names=["like", "skip", "block"],
                            heads=["like"])  # fmt: skip
    cfg = ModelConfig(**custom.model_overrides())
    assert cfg.heads == ["like"] and cfg.positive_actions == ["like", "skip", "block"] and cfg.item_dense_dim == 1
