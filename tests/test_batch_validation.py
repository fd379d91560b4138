"""validate_batch: a good batch passes, and each kind of bad input is refused with a message naming the tensor."""

from dataclasses import replace

import pytest
import torch

from transact.batch import BatchError, validate_batch
from transact.config import ModelConfig
from transact.data.random_batch import random_batch

CFG = ModelConfig()


def good(**kw):
    return random_batch(CFG, num_requests=2, num_candidates=5, ll=30, rt=12, imp=9, seed=3, **kw)


def refused(batch) -> str:
    with pytest.raises(BatchError) as e:
        validate_batch(batch, CFG)
    return str(e.value)


def test_a_good_batch_passes():
    validate_batch(good(), CFG)
    validate_batch(good(labels=True), CFG)


def test_a_length_set_by_another_input_is_named():
    b = good()
    # rt_ts is cut one token short: the intact rt_action is reported, with the input that fixed L_rt.
    cut = replace(b.rt, ts=b.rt.ts[:, :-1], length=b.rt.length.clamp(max=11))
    assert refused(replace(b, rt=cut)) == (
        "rt_action: expected shape [R=2, L_rt=11] (L_rt from rt_ts), got [2, 12]"
    )
    # One request too many in user_dense: R comes from request_ts.
    assert refused(replace(b, user_dense=torch.randn(3, CFG.user_dense_dim))) == (
        f"user_dense: expected shape [R=2, {CFG.user_dense_dim}] (R from request_ts), got [3, {CFG.user_dense_dim}]"
    )
    # A tensor's own fixed width is wrong: no note, since no other input set it.
    assert refused(replace(b, cand_item=torch.randn(5, 16))) == "cand_item: expected shape [N=5, 32], got [5, 16]"


def test_a_sequence_of_the_wrong_rank_is_refused_before_its_lengths():
    b = good()
    flat = replace(b.ll, ts=b.ll.ts[0])
    assert refused(replace(b, ll=flat)) == "ll_ts: expected shape [R=2, L_ll], got [30]"


def test_dtypes_values_and_order_are_checked():
    b = good()
    assert refused(replace(b, hour=b.hour.to(torch.int32))) == "hour: expected dtype torch.int64, got torch.int32"
    nan = b.cand_item.clone()
    nan[1, 4] = float("nan")
    assert refused(replace(b, cand_item=nan)) == "cand_item: contains NaN or infinite values"
    assert refused(replace(b, hour=torch.tensor([3, 24]))) == "hour: values must lie in [0, 23]"
    assert refused(replace(b, cand_request=torch.tensor([0, 1, 2, 0, 1]))) == "cand_request: values must lie in [0, 2)"
    too_long = replace(b.imp, length=torch.tensor([9, 10]))
    assert refused(replace(b, imp=too_long)) == "imp_length: must lie in [0, 9]"
    swapped = b.ll.ts.clone()
    swapped[0, [3, 4]] = swapped[0, [4, 3]]
    assert refused(replace(b, ll=replace(b.ll, ts=swapped))) == "ll_ts: each sequence must be sorted oldest -> newest"
