"""The token-builder kernels under TRITON_INTERPRET=1 on the CPU: against their PyTorch versions on
random arenas, and against the model's own modules (``TransActV2.select`` + ``tokens``,
``transact_inputs`` + ``TransAct``'s token concatenation) on a random batch."""

from __future__ import annotations

import pytest
import torch

import runtime.kernels.tokens as tok_mod
from transact.config import ModelConfig, TransActConfig, TransActV2Config
from transact.data.random_batch import random_batch
from transact.model import RankingModel, transact_inputs

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def random_arena(widths, rows, n_actions, n_surfaces, g):
    # The runtime's layout: rt, imp, then ll (last, so that it can be uploaded on its own), after a few
    # unused rows so that no group starts at 0.
    lead = 3
    base = (lead + rows * (widths[1] + widths[2]), lead, lead + rows * widths[1])
    total = lead + rows * sum(widths)
    item = torch.randint(-127, 128, (total, 32), generator=g, dtype=torch.int8)
    action = torch.randint(0, 1 << n_actions, (total,), generator=g, dtype=torch.int32)
    surface = torch.randint(0, n_surfaces, (total,), generator=g, dtype=torch.int32)
    return tok_mod.TokenArena(item.to(DEV), action.to(DEV), surface.to(DEV), base, tuple(widths))


def random_picks(counts, cand_req, k, g):
    """(N, k) distinct positions below each candidate's row count, shuffled, -1 where the row is short."""
    out = torch.full((cand_req.shape[0], k), -1, dtype=torch.int64)
    for i, r in enumerate(cand_req.tolist()):
        c = int(counts[r])
        chosen = torch.randperm(c, generator=g)[: min(k, c)]
        slots = torch.randperm(k, generator=g)[: chosen.shape[0]]
        out[i, slots] = chosen
    return out.to(DEV)


def v2_case(seed, widths=(40, 12, 9), rows=3, n=7, ks=(8, 4, 4), r_rt=3, counts=None, d=64):
    g = torch.Generator().manual_seed(seed)
    arena = random_arena(widths, rows, 3, 5, g)
    if counts is None:
        counts = torch.stack([torch.randint(0, w + 1, (rows,), generator=g) for w in widths])
    counts = torch.as_tensor(counts, dtype=torch.int32)
    cand_req = torch.randint(0, rows, (n,), generator=g, dtype=torch.int32)
    rest = (counts[1] - r_rt).clamp_min(0)
    picks = tuple(random_picks(c, cand_req, k, g) for c, k in zip((counts[0], rest, counts[2]), ks, strict=True))
    emb = tok_mod.V2Embeddings(
        torch.randn(3, d, generator=g).to(DEV), torch.randn(5, d, generator=g).to(DEV),
        torch.randn(sum(ks) + r_rt + 4, d, generator=g).to(DEV), torch.randn(d, generator=g).to(DEV),
    )  # fmt: skip
    cand = torch.randn(n, 32, generator=g).to(DEV)
    return arena, picks, counts[1].to(DEV), r_rt, cand, cand_req.to(DEV), emb, 0.65 / 127


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_v2_tokens_match_torch(seed: int, dtype: torch.dtype) -> None:
    args = v2_case(seed)
    x, pad, pos, group = tok_mod.v2_tokens(*args, dtype=dtype)
    rx, rpad, rpos, rgroup = tok_mod.v2_tokens_torch(*args)
    assert torch.equal(pos, rpos) and torch.equal(group, rgroup) and torch.equal(pad, rpad)
    err = (x.double() - rx.double()).norm() / rx.double().norm()
    assert err < (1e-6 if dtype == torch.float32 else 1e-3), err


def test_v2_tokens_edge_rows() -> None:
    """Row 0 has no actions at all (null token), row 1 fewer rt rows than r_rt, row 2 full groups;
    tails of 19 tokens are not a power of two."""
    counts = [[0, 5, 40], [0, 2, 12], [0, 0, 9]]  # (group, row)
    args = v2_case(3, counts=counts, ks=(8, 4, 4), r_rt=3)
    x, pad, pos, group = tok_mod.v2_tokens(*args, dtype=torch.float32)
    rx, rpad, rpos, rgroup = tok_mod.v2_tokens_torch(*args)
    assert torch.equal(pos, rpos) and torch.equal(group, rgroup) and torch.equal(pad, rpad)
    torch.testing.assert_close(x, rx, rtol=1e-6, atol=1e-6)
    cand_req = args[5].long()
    empty = cand_req == 0
    if empty.any():  # the null token sits in slot 0 and is the only unmasked slot
        assert not pad[empty, 0].any() and pad[empty, 1:].all()
        torch.testing.assert_close(x[empty, 0], args[6].null.expand(int(empty.sum()), -1))


def test_v2_tokens_match_the_model() -> None:
    """Picks taken from the model's own selection give the model's own tokens and mask."""
    cfg = ModelConfig(transact=TransActConfig(enabled=False),
                      transact_v2=TransActV2Config(k_ll=6, k_rt=4, k_imp=3, r_rt=2))  # fmt: skip
    torch.manual_seed(0)
    model = RankingModel(cfg).eval()
    b = random_batch(cfg, 3, 8, ll=[30, 0, 4], rt=[12, 3, 0], imp=[6, 0, 2], seed=1, future=1)
    m2 = model.transact_v2
    with torch.no_grad():
        sel = m2.select(b, b.cand_item)
        want_x, want_pad = m2.tokens(b, b.cand_item, sel)
    rt_n = b.rt.valid_count(b.request_ts)
    rest = (rt_n - cfg.transact_v2.r_rt).clamp_min(0)[b.cand_request]

    def picks(g: int, k: int, recent: bool = False) -> torch.Tensor:
        keep = sel.valid & (sel.group == g)
        if g == 1:
            keep &= (sel.pos >= rest.unsqueeze(1)) if recent else (sel.pos < rest.unsqueeze(1))
        out = torch.full((sel.pos.shape[0], k), -1, dtype=torch.int64)
        for i in range(out.shape[0]):
            p = sel.pos[i][keep[i]].flip(0)  # any order will do
            out[i, : p.shape[0]] = p
        return out

    v2 = cfg.transact_v2
    seqs = (b.ll, b.rt, b.imp)
    widths = tuple(s.ts.shape[1] for s in seqs)
    rows = b.request_ts.shape[0]
    arena = tok_mod.TokenArena(
        torch.cat([s.item.reshape(-1, 32) for s in seqs]).to(DEV),
        torch.cat([s.action.reshape(-1) for s in seqs]).to(DEV),
        torch.cat([s.surface.reshape(-1) for s in seqs]).to(torch.int32).to(DEV),
        (0, rows * widths[0], rows * (widths[0] + widths[1])), widths,
    )  # fmt: skip
    emb = tok_mod.V2Embeddings(m2.action_emb.detach(), m2.surface_emb.weight.detach(), m2.pos_emb.weight.detach(),
                               m2.null_token.detach())  # fmt: skip
    emb = tok_mod.V2Embeddings(*(t.to(DEV) for t in (emb.action, emb.surface, emb.position, emb.null)))
    got = tok_mod.v2_tokens(
        arena, (picks(0, v2.k_ll).to(DEV), picks(1, v2.k_rt).to(DEV), picks(2, v2.k_imp).to(DEV)),
        rt_n.to(torch.int32).to(DEV), v2.r_rt, b.cand_item.to(DEV), b.cand_request.to(torch.int32).to(DEV), emb,
        cfg.quant_scale / 127.0, dtype=torch.float32,
    )  # fmt: skip
    x, pad, pos, group = (t.cpu() for t in got)
    assert torch.equal(pad, want_pad)
    assert torch.equal(pos, torch.where(sel.valid, sel.pos, -1))
    assert torch.equal(group, torch.where(sel.valid, sel.group, -1))
    torch.testing.assert_close(x, want_x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("concat", [True, False])
def test_v1_tokens_match_the_model(concat: bool) -> None:
    """Against ``transact_inputs`` + the reference module's token concatenation and padding mask."""
    cfg = ModelConfig(transact=TransActConfig(seq_len=11, concat_candidate_emb=concat),
                      transact_v2=TransActV2Config(enabled=False))  # fmt: skip
    torch.manual_seed(0)
    model = RankingModel(cfg).eval()
    b = random_batch(cfg, 3, 9, ll=[5, 5, 5], rt=[30, 4, 0], imp=[2, 2, 2], seed=2, future=2)
    m1, s = model.transact, cfg.transact.seq_len
    action, item, ts = transact_inputs(b.rt, b.request_ts, b.cand_request, s, cfg.quant_scale)
    ids = m1.action_type_lookup[action + 1]
    parts = [m1.action_emb_module(ids), item.float()]
    if concat:
        parts.append(b.cand_item.float().unsqueeze(1).expand(-1, s, -1))
    want_x = torch.cat(parts, dim=-1).detach()
    want_mask = m1.key_padding_mask(ids, ts, b.request_ts[b.cand_request])
    rows, w = b.request_ts.shape[0], b.rt.ts.shape[1]
    arena = tok_mod.TokenArena(
        torch.cat([torch.zeros(2, 32, dtype=torch.int8), b.rt.item.reshape(-1, 32)]).to(DEV),
        torch.cat([torch.zeros(2, dtype=torch.int32), b.rt.action.reshape(-1)]).to(DEV),
        torch.zeros(rows * w + 2, dtype=torch.int32, device=DEV), (0, 2, 2 + rows * w), (1, w, 0),
    )  # fmt: skip
    rt_n = b.rt.valid_count(b.request_ts).to(torch.int32).to(DEV)
    args = (arena, rt_n, s, b.cand_item.to(DEV), b.cand_request.to(torch.int32).to(DEV),
            m1.action_type_lookup.to(DEV), m1.action_emb_module.weight.detach().to(DEV), cfg.quant_scale / 127.0,
            concat)  # fmt: skip
    x, mask = tok_mod.v1_tokens(*args, dtype=torch.float32)
    assert torch.equal(mask.cpu(), want_mask)
    torch.testing.assert_close(x.cpu(), want_x, rtol=1e-6, atol=1e-6)
    rx, rmask = tok_mod.v1_tokens_torch(*args)
    assert torch.equal(rmask.cpu(), want_mask)
    torch.testing.assert_close(rx.cpu(), want_x, rtol=1e-6, atol=1e-6)


def test_argument_checks() -> None:
    arena, picks, rt_n, r_rt, cand, cand_req, emb, scale = v2_case(0)
    with pytest.raises(ValueError, match="cand must be"):
        tok_mod.v2_tokens(arena, picks, rt_n, r_rt, cand[:, :16], cand_req, emb, scale)
    with pytest.raises(ValueError, match="position table"):
        short = tok_mod.V2Embeddings(emb.action, emb.surface, emb.position[:3], emb.null)
        tok_mod.v2_tokens(arena, picks, rt_n, r_rt, cand, cand_req, short, scale)
    with pytest.raises(ValueError, match="picks\\[rt\\]"):
        tok_mod.v2_tokens(arena, (picks[0], picks[1][:2], picks[2]), rt_n, r_rt, cand, cand_req, emb, scale)
