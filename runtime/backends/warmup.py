"""Synthetic requests used to warm a backend up before it reports ready."""

from __future__ import annotations

import numpy as np

from transact.config import ITEM_DIM, ModelConfig

from ..session import Limits, Request, UserSeq


def synthetic_request(config: ModelConfig, n: int, lengths: dict[str, int], seed: int = 0) -> Request:
    """A well-formed request with ``n`` candidates and the given sequence lengths."""
    rng = np.random.default_rng(seed)
    now = 1_700_000_000_000

    def seq(length: int) -> UserSeq:
        ts = np.sort(rng.integers(now - 10**9, now - 1, length)).astype(np.int64)
        action = rng.integers(1, 2 ** len(config.action_names), length).astype(np.int32)
        surface = rng.integers(0, config.num_surfaces, length).astype(np.int64)
        item = rng.integers(-127, 128, (length, ITEM_DIM)).astype(np.int8)
        return UserSeq(ts, action, surface, item)

    return Request(
        request_ts=now, user_dense=rng.standard_normal(config.user_dense_dim).astype(np.float32),
        surface=int(rng.integers(0, config.num_surfaces)), hour=int(rng.integers(0, 24)),
        ll=seq(lengths["ll"]), rt=seq(lengths["rt"]), imp=seq(lengths["imp"]),
        cand_item=(rng.integers(-127, 128, (n, ITEM_DIM)) * (config.quant_scale / 127)).astype(np.float32),
        item_dense=rng.standard_normal((n, config.item_dense_dim)).astype(np.float32),
    )  # fmt: skip


def warmup_requests(config: ModelConfig, limits: Limits, shapes: list[tuple[int, int]]) -> list[list[Request]]:
    """For each (users, candidates): that many distinct users at the maximum sequence lengths."""
    lengths = {"ll": limits.max_ll, "rt": limits.max_rt, "imp": limits.max_imp}
    out = []
    for users, cands in shapes:
        per = max(1, cands // users)
        out.append([synthetic_request(config, min(per, limits.max_candidates), lengths, seed=i) for i in range(users)])
    return out
