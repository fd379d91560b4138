"""Random but well-formed model inputs: for tests, parity checks and benchmarks."""

from __future__ import annotations

import torch

from ..batch import Batch, Seq
from ..config import ITEM_DIM, ModelConfig
from ..quant import dequantize

HOUR_MS = 3_600_000


def random_seq(
    lengths: list[int], pad_to: int, request_ts: torch.Tensor, num_actions: int, num_surfaces: int,
    g: torch.Generator, future: int = 0,
) -> Seq:
    """Sorted random sequences; the last ``future`` stored tokens of each row lie after the request."""
    r = len(lengths)
    width = max(pad_to, 1)
    ts = torch.zeros(r, width, dtype=torch.int64)
    for i, n in enumerate(lengths):
        if n:
            past = torch.sort(torch.randint(1, 400 * HOUR_MS, (n,), generator=g)).values
            t = request_ts[i] - past.flip(0)  # oldest first, all before the request
            if future:
                t[n - future :] = request_ts[i] + torch.arange(1, future + 1) * 1000
            ts[i, :n] = t
    action = torch.randint(1, 2**num_actions, (r, width), generator=g, dtype=torch.int64).to(torch.int32)
    surface = torch.randint(0, num_surfaces, (r, width), generator=g)
    item = torch.randint(-127, 128, (r, width, ITEM_DIM), generator=g, dtype=torch.int64).to(torch.int8)
    return Seq(ts, action, surface, item, torch.tensor(lengths, dtype=torch.int64))


def random_batch(
    config: ModelConfig, num_requests: int = 2, num_candidates: int = 5,
    ll: int | list[int] = 300, rt: int | list[int] = 50, imp: int | list[int] = 40,
    seed: int = 0, future: int = 0, labels: bool = False,
) -> Batch:
    """A batch of ``num_requests`` users and ``num_candidates`` candidates spread over them."""
    g = torch.Generator().manual_seed(seed)
    r = num_requests
    request_ts = torch.randint(10**12, 2 * 10**12, (r,), generator=g)

    def lens(x: int | list[int], limit: int) -> list[int]:
        return [min(x, limit)] * r if isinstance(x, int) else list(x)

    na, ns = len(config.action_names), config.num_surfaces
    seqs = {}
    for name, x in (("ll", ll), ("rt", rt), ("imp", imp)):
        ls = lens(x, getattr(config, f"max_{name}"))
        seqs[name] = random_seq(ls, max(ls), request_ts, na, ns, g, future=min(future, min(ls)))
    cand_request = torch.arange(num_candidates) % r
    codes = torch.randint(-127, 128, (num_candidates, ITEM_DIM), generator=g, dtype=torch.int64).to(torch.int8)
    return Batch(
        request_ts=request_ts,
        user_dense=torch.randn(r, config.user_dense_dim, generator=g),
        surface=torch.randint(0, ns, (r,), generator=g),
        hour=torch.randint(0, 24, (r,), generator=g),
        cand_request=cand_request,
        cand_item=dequantize(codes, config.quant_scale),
        item_dense=torch.randn(num_candidates, config.item_dense_dim, generator=g),
        labels=torch.randint(0, 2, (num_candidates, len(config.heads)), generator=g).float() if labels else None,
        **seqs,
    )
