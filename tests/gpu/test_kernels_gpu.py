"""GPU checks of the Triton kernels (``pytest -m gpu``): the CPU grid plus production shapes, every
tile configuration the kernels may choose, bf16, and CUDA-graph capture; errors are measured
against float64 references."""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

import runtime.kernels.nn_select as nn_mod  # noqa: E402
import runtime.kernels.skut as sk  # noqa: E402
from transact.selection import nn_select_reference  # noqa: E402

DEV = "cuda"
SKUT_TOL = {torch.float32: (1e-4, 1e-3), torch.float16: (5e-3, 2e-2), torch.bfloat16: (3e-2, 1.5e-1)}
NN_TOL = 2e-5


# ----------------------------------------------------------------------------------------------
# skut
# ----------------------------------------------------------------------------------------------
make_encoder = sk.random_encoder


def make_mask(bsz, s, seed=1, dead=False):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(bsz, s, generator=g) < 0.25
    m[:, 0] = False
    if dead:
        m[0, : min(3, s)] = True
        m[-1, :] = True
    return m


def skut_case(s, d, h, f, n_layers, causal, masked, pool, dtype, bsz=3, config=None, dead=False, seed=0):
    enc = make_encoder(d, h, f, n_layers, seed=seed + s + d).to(DEV)
    x = torch.randn(bsz, s, d, device=DEV)
    mask = make_mask(bsz, s, seed=s, dead=dead).to(DEV) if masked else None
    packed = sk.pack_encoder_weights(enc, dtype)
    shape = (bsz, s, d) if pool is None else (bsz, d)
    out = torch.full(shape, float("nan"), dtype=dtype, device=DEV)
    sk.skut_forward(x.to(dtype), packed, mask, causal, pool, config=config, out=out)
    torch.cuda.synchronize()
    ref = sk.skut_reference(enc, x, mask, causal, pool)
    out = out.double()
    assert not torch.isnan(out).any()
    err = ((out - ref).norm() / ref.norm().clamp_min(1e-12)).item()
    rel_tol, abs_tol = SKUT_TOL[dtype]
    assert err <= rel_tol, f"relative error {err:.3e}"
    assert (out - ref).abs().max().item() <= abs_tol
    return out, ref


SKUT_GRID = [
    (1, 32, 4, 16, 2, True, True, None, torch.float32),
    (5, 64, 1, 32, 2, True, True, None, torch.float16),
    (17, 96, 2, 32, 2, False, True, "max_all", torch.float16),
    (33, 64, 1, 32, 2, True, True, "max_valid", torch.float16),
    (33, 48, 3, 24, 1, False, False, None, torch.float32),
    (17, 128, 4, 256, 1, True, False, None, torch.float16),
    (70, 32, 2, 64, 3, True, True, None, torch.float32),
    (45, 40, 2, 20, 2, False, True, "max_valid", torch.float32),
    (9, 64, 2, 16, 2, True, True, "max_all", torch.bfloat16),
    # production shapes
    (192, 64, 1, 32, 2, True, True, None, torch.float16),  # V2 (B=256 in the benchmark)
    (192, 64, 1, 32, 2, True, True, "max_valid", torch.float16),
    (100, 96, 2, 32, 2, False, True, "max_all", torch.float16),  # V1
    (2048, 64, 1, 32, 2, True, True, None, torch.float16),
    (300, 128, 4, 256, 4, True, True, None, torch.float16),
]


@pytest.mark.parametrize("s,d,h,f,n_layers,causal,masked,pool,dtype", SKUT_GRID)
def test_skut_grid(s, d, h, f, n_layers, causal, masked, pool, dtype):
    skut_case(s, d, h, f, n_layers, causal, masked, pool, dtype)


# Every configuration choose_config can return (the benchmark checks each config it sweeps itself).
SKUT_CONFIGS = sorted(
    {
        sk.choose_config(s, sk.pack_encoder_weights(make_encoder(d, 2, 32, 1), torch.float16), bsz, True,
                         torch.device(DEV))  # fmt: skip
        for s in (1, 16, 17, 33, 192, 2048)
        for d in (32, 64, 96, 128)
        for bsz in (1, 256)
    },
    key=lambda c: (c.split, c.block_m, c.block_n, c.num_warps, c.num_stages, c.f_chunk),
)


@pytest.mark.parametrize("config", SKUT_CONFIGS, ids=str)
@pytest.mark.parametrize("d,h,f", [(64, 1, 32), (96, 2, 64), (128, 4, 256)])
def test_skut_every_config(config, d, h, f):
    if config.f_chunk > sk._pad_dim(f):
        config = sk.SkutConfig(
            config.block_m, config.block_n, config.num_warps, sk._pad_dim(f), config.num_stages, config.split
        )
    for s in (37, 200):
        skut_case(s, d, h, f, 2, True, True, None, torch.float16, bsz=4, config=config, seed=1)


@pytest.mark.parametrize("causal", [True, False])
def test_skut_fully_masked_rows(causal):
    for pool in (None, "max_valid", "max_all"):
        out, _ = skut_case(17, 32, 2, 32, 2, causal, True, pool, torch.float32, dead=True)
        if pool is None:
            assert (out[-1] == 0).all()


SPLIT_CONFIGS = [sk.SkutConfig(bm, bn, w, 32, split=True) for bm, bn, w in
                 ((16, 16, 4), (32, 16, 4), (32, 32, 4), (64, 32, 4), (64, 64, 4), (128, 32, 8))]  # fmt: skip


@pytest.mark.parametrize("config", SPLIT_CONFIGS, ids=str)
@pytest.mark.parametrize(
    "bsz,s,pool", [(16, 192, None), (1024, 192, "max_valid"), (64, 2048, None), (5, 37, "max_all")], ids=str
)
def test_skut_split_launch(config, bsz, s, pool):
    """One program per (sequence, query tile), the V2 shape: few sequences (every tile at once), many
    (several waves of programs waiting on tickets taken earlier), long sequences (32+ tiles each)."""
    skut_case(s, 64, 1, 32, 2, True, True, pool, torch.float16, bsz=bsz, config=config, dead=True)


def test_skut_split_cuda_graph_replays():
    """The split launch's counters are zeroed in the graph itself: every replay is a fresh launch."""
    enc = make_encoder(64, 1, 32, 2).to(DEV)
    packed = sk.pack_encoder_weights(enc, torch.float16)
    bsz, s = 16, 192
    cfg = sk.SkutConfig(64, 64, 4, split=True)
    x = torch.randn(bsz, s, 64, device=DEV).half()
    mask = make_mask(bsz, s).to(DEV)
    out = torch.empty(bsz, 64, dtype=torch.float16, device=DEV)
    sk.skut_forward(x, packed, mask, True, "max_valid", config=cfg, out=out)  # compile outside capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        sk.skut_forward(x, packed, mask, True, "max_valid", config=cfg, out=out)
    for seed in (5, 6, 7):
        x.copy_(torch.randn_like(x))
        mask.copy_(make_mask(bsz, s, seed=seed).to(DEV))
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        ref = sk.skut_reference(enc, x.float(), mask, True, "max_valid")
        assert ((out.double() - ref).norm() / ref.norm()).item() < 5e-3


def test_skut_cuda_graph():
    enc = make_encoder(64, 1, 32, 2).to(DEV)
    packed = sk.pack_encoder_weights(enc, torch.float16)
    bsz, s = 8, 150
    x = torch.randn(bsz, s, 64, device=DEV).half()
    mask = make_mask(bsz, s).to(DEV)
    ws = torch.empty(sk.workspace_numel(bsz, s, packed), dtype=torch.float16, device=DEV)
    out = torch.empty(bsz, 64, dtype=torch.float16, device=DEV)
    sk.skut_forward(x, packed, mask, True, "max_valid", workspace=ws, out=out)  # compile outside capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        sk.skut_forward(x, packed, mask, True, "max_valid", workspace=ws, out=out)
    x.copy_(torch.randn_like(x))
    mask.copy_(make_mask(bsz, s, seed=5).to(DEV))
    g.replay()
    torch.cuda.synchronize()
    ref = sk.skut_reference(enc, x.float(), mask, True, "max_valid")
    assert ((out.double() - ref).norm() / ref.norm()).item() < 5e-3


WGMMA = sk.SkutConfig(64, 64, 4, wgmma=True)
WGMMA_SPLIT = sk.SkutConfig(64, 64, 4, wgmma=True, split=True)
WGMMA_GROUPS = sk.SkutConfig(64, 64, 4, wgmma=True, warp_groups=True)
needs_sm90 = pytest.mark.skipif(
    torch.cuda.get_device_capability()[0] != 9, reason="the wgmma kernel is built for sm_90 (H100 / H200)"
)


WGMMA_CASES = [
    (192, 32, 2, True, True, None, False, torch.float16, False),  # V2, every row out
    (192, 32, 2, True, True, "max_valid", True, torch.float16, False),  # V2 as the runtime runs it
    (1, 32, 2, True, True, None, False, torch.float16, False),
    (70, 16, 1, False, True, "max_all", False, torch.float16, True),
    (130, 64, 3, False, False, None, False, torch.bfloat16, False),
    (256, 32, 2, True, True, "max_valid", False, torch.bfloat16, True),
    (37, 32, 2, True, False, "max_all", True, torch.float16, False),
    (100, 32, 2, False, True, "max_valid", False, torch.float16, False),
    (130, 64, 3, True, True, "max_all", False, torch.float16, False),
    (100, 16, 1, True, True, None, False, torch.bfloat16, True),
]


@needs_sm90
@pytest.mark.parametrize(
    "s,f,n_layers,causal,masked,pool,proj,dtype,final,config",
    [(*case, WGMMA) for case in WGMMA_CASES]
    + [(*case, cfg) for cfg in (WGMMA_SPLIT, WGMMA_GROUPS) for case in WGMMA_CASES if case[3]],
    ids=str,
)
def test_skut_wgmma(s, f, n_layers, causal, masked, pool, proj, dtype, final, config):
    """The Gluon kernels (per sequence, and for causal stacks per query tile or per warp group) against the
    float64 modules: tails, one token, fully masked sequences and rows, every pool, Linear(pool), the final norm,
    1-3 layers, FFN 16-64, fp16 and bf16; with a pool it also hands back every row (``hidden``)."""
    bsz, d = 6, 64
    enc = sk.random_encoder(d, 1, f, n_layers, seed=s + f, final_norm=final).to(DEV)
    packed = sk.pack_encoder_weights(enc, dtype)
    x = torch.randn(bsz, s, d, device=DEV)
    mask = make_mask(bsz, s, seed=s, dead=True).to(DEV) if masked else None
    proj_w = (torch.randn(48, d, device=DEV) / 8, torch.randn(48, device=DEV)) if proj else None
    shape = (bsz, s, d) if pool is None else (bsz, 48 if proj else d)
    out = torch.full(shape, float("nan"), dtype=torch.float32 if proj else dtype, device=DEV)
    hidden = torch.full((bsz, s, d), float("nan"), dtype=dtype, device=DEV) if pool else None
    sk.skut_forward(x.to(dtype), packed, mask, causal, pool, config=config, out=out, hidden=hidden,
                    pool_proj=proj_w)  # fmt: skip
    # (one query tile: the per-tile and grouped launches hand over to the per-sequence one, as does the grouped
    # launch past three tiles)
    per_seq = s <= 64 or (config.warp_groups and s > 3 * 64)
    assert sk.last_launch_info["config"] == (WGMMA if per_seq else config)
    rows = sk.skut_reference(enc, x, mask, causal, None)
    ref = rows if pool is None else sk._pool(rows, mask, pool)
    if proj:
        ref = torch.nn.functional.linear(ref, proj_w[0].double(), proj_w[1].double())
    rel_tol, abs_tol = SKUT_TOL[dtype]
    for got, want in ((out, ref),) + (((hidden, rows),) if pool else ()):
        got = got.double()
        assert not torch.isnan(got).any()
        assert ((got - want).norm() / want.norm()).item() <= rel_tol
        assert (got - want).abs().max().item() <= abs_tol * (4 if proj else 1)
    if masked and pool is None:
        assert (out[-1] == 0).all()  # a sequence of padding only: every row sees no key


def wgmma_many_sequences(config, bsz, s, pool, seed, n_layers=2):
    """V2's stack on ``bsz`` causal, padded sequences (some of padding only) through ``config``, against float64."""
    enc = make_encoder(64, 1, 32, n_layers, seed=seed).to(DEV)
    packed = sk.pack_encoder_weights(enc, torch.float16)
    x = torch.randn(bsz, s, 64, device=DEV)
    mask = make_mask(bsz, s, seed=seed, dead=True).to(DEV)
    out = torch.full((bsz, s, 64) if pool is None else (bsz, 64), float("nan"), dtype=torch.float16, device=DEV)
    sk.skut_forward(x.half(), packed, mask, True, pool, config=config, out=out)
    ref = sk.skut_reference(enc, x, mask, True, pool)
    assert not torch.isnan(out).any()
    assert ((out.double() - ref).norm() / ref.norm()).item() <= SKUT_TOL[torch.float16][0]


@needs_sm90
@pytest.mark.parametrize("pool", [None, "max_valid"])
@pytest.mark.parametrize("s", [192, 256])
def test_skut_wgmma_split_many_sequences(pool, s):
    """The per-tile launch with several waves of programs (more tiles than fit on the GPU at once): later
    programs wait only on tickets taken before theirs."""
    bsz = 3 * torch.cuda.get_device_properties(0).multi_processor_count + 7
    wgmma_many_sequences(WGMMA_SPLIT, bsz, s, pool, seed=5)


@needs_sm90
@pytest.mark.parametrize(
    "s,pool,n_layers",
    [(100, None, 2), (100, "max_valid", 2), (192, None, 2), (192, "max_valid", 2), (192, None, 1),
     (150, "max_valid", 3), (130, "max_all", 1), (100, None, 5), (192, "max_valid", 6)],
)  # fmt: skip
def test_skut_wgmma_groups_many_sequences(s, pool, n_layers):
    """The grouped launch (two and three warp groups) with several waves of programs, at 1-6 layers (the weight
    buffers reused every other layer; every barrier's phase parity wrapping more than once) and every pool."""
    bsz = 3 * torch.cuda.get_device_properties(0).multi_processor_count + 7
    wgmma_many_sequences(WGMMA_GROUPS, bsz, s, pool, seed=6 + n_layers, n_layers=n_layers)


@needs_sm90
@pytest.mark.parametrize("waves", [1, 3, 5])
def test_skut_wgmma_groups_dependent_launch(monkeypatch, waves):
    """The grouped launch as a programmatic dependent (``launch_groups``' ``dependent``), captured in one CUDA graph:
    each launch reads the rows the one before wrote (read after write), the third writes the rows the second
    read (write after read), and a PyTorch kernel (no dependent launch) sits between two of them. Every output
    equals, bit for bit, that of the same chain of plain launches, and the chain's end the float64 stack run
    four times; up to DEPENDENT_WAVES waves of programs the launch is a dependent by default, past them plain."""
    from runtime.kernels import skut_wgmma as sw

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    bsz, s = waves * sms - 5, 192
    enc = make_encoder(64, 1, 32, 2, seed=11).to(DEV)
    packed = sk.pack_encoder_weights(enc, torch.float16)
    x0 = torch.randn(bsz, s, 64, device=DEV).half()
    mask = make_mask(bsz, s, seed=12, dead=True).to(DEV)
    real_launch = sw.launch_groups

    def chain(dependent):
        kernels = []
        monkeypatch.setattr(sw, "launch_groups", lambda *a, **k: kernels.append(
            real_launch(*a, **k, **({} if dependent is None else {"dependent": dependent}))) or kernels[-1])
        a, b, c = x0.clone(), torch.full_like(x0, float("nan")), torch.full_like(x0, float("nan"))

        def run():
            sk.skut_forward(a, packed, mask, True, None, out=b)  # b = f(a)
            sk.skut_forward(b, packed, mask, True, None, out=c)  # c = f(b)
            sk.skut_forward(c, packed, mask, True, None, out=b)  # b = f(c): b was read by the launch before
            b.mul_(1.0)  # a PyTorch kernel between two dependents
            sk.skut_forward(b, packed, mask, True, None, out=a)  # a = f(b)

        run()  # compile outside capture
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            run()
        a.copy_(x0)
        b.fill_(float("nan"))
        c.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        assert sk.last_launch_info["config"] == WGMMA_GROUPS
        return (a, b, c), {k.metadata.launch_pdl for k in kernels}

    dep, pdl = chain(True)
    assert pdl == {True}
    plain, pdl = chain(False)
    assert pdl == {False}
    default, pdl = chain(None)
    assert pdl == {waves <= sw.DEPENDENT_WAVES}
    assert all(torch.equal(d, p) for d, p in zip(dep, plain, strict=True))
    assert all(torch.equal(d, p) for d, p in zip(default, plain, strict=True))
    ref = x0.float()
    for _ in range(4):  # the kernel's fp16 rows between launches
        ref = sk.skut_reference(enc, ref.half().float(), mask, True, None).float()
    assert not torch.isnan(dep[0]).any()
    assert ((dep[0].double() - ref.double()).norm() / ref.double().norm()).item() <= SKUT_TOL[torch.float16][0]


@needs_sm90
@pytest.mark.parametrize("s,pool,waves", [(192, None, 3), (150, "max_valid", 3), (100, None, 1), (192, None, 6)])
def test_skut_wgmma_groups_prefetch(monkeypatch, s, pool, waves):
    """The grouped launch's L2 prefetch before its dependent wait (``skut_wgmma.PREFETCH``) changes no output: on and
    off equal bit for bit, within tolerance of float64; tails (S=150, 100: sequences that end inside a 128-byte
    line), and past DEPENDENT_WAVES waves, where the launch is plain and does not prefetch."""
    from runtime.kernels import skut_wgmma as sw

    bsz = waves * torch.cuda.get_device_properties(0).multi_processor_count - 3
    enc = make_encoder(64, 1, 32, 2, seed=13).to(DEV)
    packed = sk.pack_encoder_weights(enc, torch.float16)
    x = torch.randn(bsz, s, 64, device=DEV)
    mask = make_mask(bsz, s, seed=14, dead=True).to(DEV)
    outs = {}
    for prefetch in (False, True):
        monkeypatch.setattr(sw, "PREFETCH", prefetch)
        out = torch.full((bsz, s, 64) if pool is None else (bsz, 64), float("nan"), dtype=torch.float16, device=DEV)
        sk.skut_forward(x.half(), packed, mask, True, pool, config=WGMMA_GROUPS, out=out)
        torch.cuda.synchronize()
        assert sk.last_launch_info["config"] == WGMMA_GROUPS
        outs[prefetch] = out
    assert torch.equal(outs[False], outs[True])
    ref = sk.skut_reference(enc, x, mask, True, pool)
    assert not torch.isnan(outs[True]).any()
    assert ((outs[True].double() - ref).norm() / ref.norm()).item() <= SKUT_TOL[torch.float16][0]


@needs_sm90
@pytest.mark.parametrize("pool", [None, "max_valid"])
def test_skut_wgmma_two_pass_causal(pool):
    """More causal sequences than two per SM: the two-pass form (K / V of the whole sequence first)."""
    bsz = 2 * torch.cuda.get_device_properties(0).multi_processor_count + 5
    wgmma_many_sequences(WGMMA, bsz, 70, pool, seed=4)


@needs_sm90
@pytest.mark.parametrize("bsz", [256, 16])
def test_skut_wgmma_chosen_and_captured(bsz):
    """choose_config takes the wgmma kernels for V2 (one warp group per query tile at S=192; at S=256 per
    sequence at B=256, per query tile at B=16), and they replay from a CUDA graph."""
    enc = make_encoder(64, 1, 32, 2).to(DEV)
    packed = sk.pack_encoder_weights(enc, torch.float16)
    s = 192
    assert sk.choose_config(s, packed, bsz, True, torch.device(DEV)) == WGMMA_GROUPS
    assert sk.choose_config(256, packed, bsz, True, torch.device(DEV)) == (WGMMA_SPLIT if bsz == 16 else WGMMA)
    assert sk.choose_config(s, packed, bsz, False, torch.device(DEV)) == WGMMA
    two_tiles_many = 2 * torch.cuda.get_device_properties(0).multi_processor_count + 1  # the two-pass form's
    assert sk.choose_config(128, packed, two_tiles_many, True, torch.device(DEV)) == WGMMA
    assert sk.choose_config(128, packed, bsz, True, torch.device(DEV)) == WGMMA_GROUPS
    assert not sk.choose_config(300, packed, bsz, True, torch.device(DEV)).wgmma  # K / V would not fit
    assert not sk.choose_config(s, sk.pack_encoder_weights(enc, torch.float32), bsz, True, torch.device(DEV)).wgmma
    x = torch.randn(bsz, s, 64, device=DEV).half()
    mask = make_mask(bsz, s).to(DEV)
    out = torch.empty(bsz, s, 64, dtype=torch.float16, device=DEV)
    sk.skut_forward(x, packed, mask, True, None, out=out)  # compile outside capture
    assert sk.last_launch_info["config"].wgmma
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        sk.skut_forward(x, packed, mask, True, None, out=out)
    x.copy_(torch.randn_like(x))
    mask.copy_(make_mask(bsz, s, seed=9).to(DEV))
    out.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    ref = sk.skut_reference(enc, x.float(), mask, True, None)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 5e-3


def test_skut_wgmma_refuses_what_it_cannot_run():
    enc = make_encoder(96, 2, 32, 2).to(DEV)
    packed = sk.pack_encoder_weights(enc, torch.float16)
    x = torch.randn(2, 10, 96, device=DEV).half()
    with pytest.raises(ValueError, match="wgmma"):
        sk.skut_forward(x, packed, None, True, None, config=WGMMA)


# ----------------------------------------------------------------------------------------------
# nn_select
# ----------------------------------------------------------------------------------------------
def nn_inputs(lengths, n_per_user, dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    seq = torch.randint(-127, 128, (total, 32), generator=g, dtype=torch.int8)
    starts = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)[:-1].tolist()), dtype=torch.int64)
    lens = torch.tensor(lengths, dtype=torch.int64)
    users = torch.arange(len(lengths)).repeat_interleave(torch.tensor(n_per_user))
    cand = torch.randn(users.numel(), 32, generator=g).to(dtype)
    return seq, starts, lens, cand, users


def nn_check(inputs, k, config=None, idx_dtype=torch.int64, max_len=None):
    seq, starts, lens, cand, users = inputs
    n = cand.shape[0]
    idx = torch.full((n, k), -7, dtype=idx_dtype, device=DEV)
    scores = torch.full((n, k), float("nan"), device=DEV)
    nn_mod.nn_select(*(t.to(DEV) for t in inputs), k, idx_dtype=idx_dtype, config=config, out=(idx, scores),
                     max_len=max_len)  # fmt: skip
    torch.cuda.synchronize()
    idx, scores = idx.cpu().long(), scores.cpu()
    ref_idx, ref_scores = nn_select_reference(seq, starts, lens, cand, users, k)
    assert not (idx == -7).any() and not torch.isnan(scores).any()
    assert torch.equal(idx == -1, ref_idx == -1)
    fin = ~torch.isinf(ref_scores)
    if fin.any():
        assert (scores.double()[fin] - ref_scores[fin]).abs().max().item() <= NN_TOL
    bad = (idx != ref_idx).nonzero().tolist()
    if bad:  # allowed only between near-equal scores
        c = cand.double()
        c = c / c.norm(dim=1, keepdim=True).clamp_min(1e-12)
        for i, j in bad:
            u = int(users[i])
            row = seq[int(starts[u]) + int(idx[i, j])].double()
            s = (row @ c[i]) / row.norm().clamp_min(1e-12)
            assert abs(s.item() - ref_scores[i, j].item()) <= NN_TOL
    for i in range(idx.shape[0]):
        v = idx[i][idx[i] >= 0]
        assert v.unique().numel() == v.numel()


NN_GRID = [
    ([1], [1], 1),
    ([5], [3], 8),
    ([17], [2], 4),
    ([33], [1], 40),
    ([5, 17, 0, 33], [3, 1, 2, 4], 8),
    ([0, 0], [2, 1], 3),
    ([65, 1, 20], [5, 6, 7], 16),
    # production shapes
    ([16000], [256], 64),
    ([16000] * 64, [4] * 64, 64),
    ([3000] * 40, [7] * 40, 96),
    ([500, 20000], [300, 200], 32),
    # the lifelong top-96 at 100,000 rows: the one-user scan at 128-row tiles, which keeps the seconds
    ([100_000], [256], 96),
    ([100_000] * 8, [16] * 8, 96),
]


@pytest.mark.parametrize("lengths,n_per_user,k", NN_GRID, ids=lambda v: str(v)[:40])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_nn_select_grid(lengths, n_per_user, k, dtype):
    nn_check(nn_inputs(lengths, n_per_user, dtype, seed=k), k)


@pytest.mark.parametrize("lengths,n_per_user,k,max_len", [
    ([100], [256], 32, 100),  # the runtime's rt / imp selections
    ([100] * 16, [16] * 16, 32, 100),  # 16 request rows
    ([128, 3, 0], [100, 50, 20], 96, 128),  # the widest one-pass tile, k = 96
    ([1000, 90], [40, 30], 64, 100),  # a hint below the real length: merged tiles
    ([7], [5], 64, 7),  # k > length
])  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_nn_select_short_path(lengths, n_per_user, k, max_len, dtype):
    nn_check(nn_inputs(lengths, n_per_user, dtype, seed=k + max_len), k, max_len=max_len)


def test_nn_select_100k():
    nn_check(nn_inputs([100_000] * 8, [4] * 8, seed=1), 64)


# (k, block_n): every (k_pad, block_n) pair choose_config can pick; splits are a run-time argument,
# and a capacity of k_pad forces the overflow fallback on the long user.
NN_CONFIG_KB = [(16, 16), (16, 32), (16, 64), (64, 16), (64, 32), (64, 64), (96, 16), (96, 32), (200, 16)]


# ... and the users per scan step: 2 and 4 where choose_config can pick them (16-candidate blocks).
NN_CONFIG_KBU = [(k, b, u) for k, b in NN_CONFIG_KB for u in ((1, 2, 4) if b == 16 else (1,))]


@pytest.mark.parametrize("k,block_n,users", NN_CONFIG_KBU)
@pytest.mark.parametrize("splits,small_cap", [(1, False), (7, False), (33, False), (5, True)])
def test_nn_select_every_config(k, block_n, splits, small_cap, users):
    k_pad = max(16, 1 << (k - 1).bit_length())
    tile = max(64, k_pad)
    gps = min(tile, max(2, 1 << (math.ceil(nn_mod.GROUPS_PER_K * k_pad / splits) - 1).bit_length()))
    cfg = nn_mod.NNSelectConfig(block_n, k_pad, splits, nn_mod.scan_warps(block_n, tile), gps, tile,
                                k_pad if small_cap else None, users)
    # Users of 4 candidates each (16 per block) after the long ones: blocks of several users.
    lengths, per_user = [3000, 700, 0, 5] + [1500, 2, 900, 64] * 3, [40, 9, 3, 2] + [4, 4, 3, 5] * 3
    nn_check(nn_inputs(lengths, per_user, seed=block_n + splits), k, cfg)


def maxima_as_float(bits):
    """Pass 1's group maxima from their ordered int32 bits (``nn_select._ordered_bits``) back to float64."""
    return torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).view(torch.float32).double()


def check_group_maxima(bits, inputs, lengths, splits, groups, tile=64):
    """Pass 1's group maxima (ordered int32 bits, (N, splits x groups)) against the float64 maximum of each
    group's rows: within ``scan_error``, the bound the refine pass's margins rest on; empty groups -2**31."""
    seq, starts, _, cand, users = inputs
    n = cand.shape[0]
    got = maxima_as_float(bits)
    c = cand.double() / cand.double().norm(dim=1, keepdim=True)
    q = seq.double()
    q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-300)
    want = torch.full((n, splits * groups), float("-inf"), dtype=torch.float64)
    for i in range(n):
        u = int(users[i])
        length = lengths[u]
        s = q[int(starts[u]) : int(starts[u]) + length] @ c[i]
        chunk = math.ceil(math.ceil(length / splits) / tile) * tile
        for j in range(splits * groups):
            sp, g = divmod(j, groups)
            pos = torch.tensor(range(sp * chunk + g, min(length, (sp + 1) * chunk), groups), dtype=torch.long)
            if pos.numel():
                want[i, j] = s[pos].max()
    empty = torch.isinf(want)
    assert torch.equal(bits[empty], torch.full_like(bits[empty], -(2**31)))
    err = (got - want)[~empty].abs()
    assert err.max().item() <= nn_mod.scan_error(32), (err.max().item(), nn_mod.scan_error(32))


@pytest.mark.parametrize("users_per_step", [1, 2, 4])
def test_nn_scan_group_maxima_within_scan_error(users_per_step):
    """Pass 1 alone, as the hardware computes it (integer dots, the approximate rsqrt of the row norms),
    against float64. 8 users of 2,000 rows, 4 candidates each, 7 chunks of 32 groups (the Triton kernels:
    the Gluon scan takes 64)."""
    lengths, per_user = [2000, 1999, 1500, 2000, 64, 2000, 1000, 7], [4] * 8
    inputs = nn_inputs(lengths, per_user, torch.float16, seed=users_per_step)
    splits, groups, tile, n = 7, 32, 64, inputs[3].shape[0]
    gm = torch.full((n, splits * groups), 7, dtype=torch.int32, device=DEV)  # poison
    args = [t.to(DEV) for t in inputs] + [gm, n, 32, gm.shape[1], splits]
    nn_mod.scan_launch(users_per_step, (-(-n // 16), splits))(*args, BN=16, BS=tile, C=groups, D_P=32, num_warps=4)
    check_group_maxima(gm.cpu(), inputs, lengths, splits, groups, tile)


@needs_sm90
@pytest.mark.parametrize("users_per_step", [2, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.int8])
def test_nn_scan_wgmma_group_maxima(users_per_step, dtype):
    """The Gluon packed scan (sm_90, 64 groups per chunk, what ``scan_launch`` takes for such launches) against
    float64, and the Triton packed kernel's maxima on the same launch within twice ``scan_error`` of its own:
    users empty, of one row, shorter than a tile, ending mid-tile and past several chunks, 2-5 candidates each (so
    blocks hold up to 8 users: two rounds of 4 users per step, or four of 2), zero rows; candidates of every dtype
    the selection takes."""
    lengths = [2000, 1999, 0, 2000, 64, 2000, 1000, 7, 3000, 513, 1, 2048, 700, 1500, 90, 2500]
    per_user = [4, 4, 2, 4, 4, 3, 5, 4, 4, 4, 2, 4, 2, 2, 2, 4]
    inputs = list(nn_inputs(lengths, per_user, torch.float32, seed=users_per_step))
    inputs[0][::101] = 0  # zero rows score 0
    if dtype == torch.int8:
        inputs[3] = (inputs[3] * 40).clamp(-127, 127).round().to(torch.int8)
    else:
        inputs[3] = inputs[3].to(dtype)
    splits, groups, tile, n = 3, 64, 64, inputs[3].shape[0]
    seq, starts, lens, cand, users = (t.to(DEV) for t in inputs)
    assert nn_mod.nn_scan_wgmma.usable(seq, 32, 16, tile, groups, users_per_step)
    grid = (-(-n // 16), splits)
    out = []
    for gluon in (True, False):
        gm = torch.full((n, splits * groups), 7, dtype=torch.int32, device=DEV)  # poison
        args = (seq, starts, lens, cand, users, gm, n, 32, gm.shape[1], splits)
        if gluon:
            nn_mod.nn_scan_wgmma.launch(grid, *args, users_per_step=users_per_step, wide=False, gdc=False)
        else:
            with nn_mod.mma_sync_only():
                nn_mod._nn_scan_packed_kernel[grid](
                    seq, nn_mod.seq_words(seq), *args[1:], BN=16, BS=tile, C=groups, U=users_per_step, D_P=32,
                    WORDS=True, ASM=True, WIDE=False, GDC=False, num_warps=4)  # fmt: skip
        out.append(gm.cpu())
    check_group_maxima(out[0], inputs, lengths, splits, groups, tile)
    f = [maxima_as_float(b) for b in out]
    both = out[1] > -(2**31)
    assert torch.equal(out[0] > -(2**31), both)
    assert (f[0] - f[1])[both].abs().max().item() <= 2 * nn_mod.scan_error(32)


def check_seconds_and_rows(both, inputs, lengths, splits, groups, tile=64):
    """A scan's ``TOP2`` output (maxima, then packed seconds and rows: ``nn_select._store_scan``) against float64:
    each group's stored second bounds its float64 second from above within ``scan_error`` (and by less than 2**16
    ordered steps beyond it), none for a group of one row, and the row of each group's maximum scores within twice
    ``scan_error`` of the group's float64 maximum."""
    seq, starts, _, cand, users = inputs
    n, g_tot = cand.shape[0], splits * groups
    err = nn_mod.scan_error(32)
    c = cand.double() / cand.double().norm(dim=1, keepdim=True)
    q = seq.double()
    q = q / q.norm(dim=1, keepdim=True).clamp_min(1e-300)
    bound, row = both[:, g_tot:] & ~0xFFFF, both[:, g_tot:] & 0xFFFF
    b = maxima_as_float(bound)
    for i in range(n):
        u = int(users[i])
        length = lengths[u]
        s = q[int(starts[u]) : int(starts[u]) + length] @ c[i]
        chunk = math.ceil(math.ceil(length / splits) / tile) * tile
        for j in range(g_tot):
            sp, g = divmod(j, groups)
            pos = torch.tensor(range(sp * chunk + g, min(length, (sp + 1) * chunk), groups), dtype=torch.long)
            if pos.numel() < 2:
                assert bound[i, j].item() == -(2**31), (i, j)
            else:
                second = s[pos].topk(2).values[1].item()
                assert b[i, j].item() >= second - err, (i, j)
                assert bound[i, j].item() < maxima_as_bits(second + err) + 2**16, (i, j)
            if pos.numel():
                r = sp * chunk + g + row[i, j].item() * groups
                assert r in pos.tolist(), (i, j)
                assert s[r].item() >= s[pos].max().item() - 2 * err, (i, j)


def maxima_as_bits(x):
    """``maxima_as_float``'s inverse for one float (rounded to float32)."""
    b = torch.tensor([x], dtype=torch.float32).view(torch.int32).item()
    return b if b >= 0 else b ^ 0x7FFFFFFF


@needs_sm90
@pytest.mark.parametrize("users_per_step", [2, 4])
def test_nn_scan_wgmma_seconds_and_rows(users_per_step):
    """The Gluon packed scan keeping each group's second and its maximum's row (``nn_select.TOP2``): its maxima bit
    for bit those of its launch without them, its seconds and rows against float64 (``check_seconds_and_rows``),
    a row planted twice in one group of a user seen as a second equal to the maximum; then the whole selection on
    the production configuration (64 groups per chunk, Gluon scan) against the reference."""
    lengths = [2000, 1999, 0, 2000, 64, 2000, 1000, 7, 3000, 513, 1, 2048, 700, 1500, 90, 2500]
    per_user = [4, 4, 2, 4, 4, 3, 5, 4, 4, 4, 2, 4, 2, 2, 2, 4]
    inputs = list(nn_inputs(lengths, per_user, torch.float16, seed=50 + users_per_step))
    seq, starts, lens, cand, users = inputs
    seq[::101] = 0  # zero rows score 0
    c0 = int((users == 0).nonzero()[0])
    for p in (300, 364):  # user 0's first candidate twice in group 44 of its first chunk
        seq[p] = (cand[c0].float() * 60).round().clamp(-127, 127).to(torch.int8)
    splits, groups, tile, n = 3, 64, 64, cand.shape[0]
    dev = [t.to(DEV) for t in inputs]
    assert nn_mod.nn_scan_wgmma.usable(dev[0], 32, 16, tile, groups, users_per_step)
    grid, g_tot = (-(-n // 16), splits), splits * groups
    gm = torch.full((n, g_tot), 7, dtype=torch.int32, device=DEV)  # poison
    both = torch.full((n, 2 * g_tot), 7, dtype=torch.int32, device=DEV)
    for out, top2 in ((gm, False), (both, True)):
        nn_mod.nn_scan_wgmma.launch(grid, *dev, out, n, 32, g_tot, splits, users_per_step=users_per_step, wide=False,
                                    gdc=False, top2=top2)  # fmt: skip
    gm, both = gm.cpu(), both.cpu()
    assert torch.equal(both[:, :g_tot], gm)
    check_seconds_and_rows(both, inputs, lengths, splits, groups, tile)
    assert both[c0, g_tot + 44].item() & ~0xFFFF >= both[c0, 44].item()
    cfg = nn_mod.NNSelectConfig(16, 64, splits, 4, groups, tile, users_per_step=users_per_step)
    nn_check(inputs, 64, cfg)


@pytest.mark.parametrize("users_per_step", [2, 4])
def test_nn_scan_norms_from_words_match_codes(users_per_step):
    """The packed scan's row norms by ``dp4a`` on int32 words (aligned rows) and from the widened codes (the same
    rows at an odd address): bit-identical group maxima, 64 users of 4 candidates over 3,000 rows (some zero),
    then the whole selection (norms from words) against the reference."""
    lengths, per_user = [3000] * 60 + [1, 0, 64, 2999], [4] * 64
    inputs = nn_inputs(lengths, per_user, seed=40 + users_per_step)
    inputs[0][::97] = 0
    seq, starts, lens, cand, users = (t.to(DEV) for t in inputs)
    shifted = torch.zeros(seq.numel() + 1, dtype=torch.int8, device=DEV)
    shifted[1:] = seq.flatten()
    unaligned = shifted[1:].view(seq.shape)
    assert nn_mod.seq_words(seq) is not None and nn_mod.seq_words(unaligned) is None
    splits, groups, tile, n = 6, 32, 64, cand.shape[0]
    out = []
    for rows in (seq, unaligned):
        gm = torch.full((n, splits * groups), 7, dtype=torch.int32, device=DEV)  # poison
        nn_mod.scan_launch(users_per_step, (-(-n // 16), splits))(
            rows, starts, lens, cand, users, gm, n, 32, gm.shape[1], splits, BN=16, BS=tile, C=groups, D_P=32,
            num_warps=4)  # fmt: skip
        out.append(gm)
    assert not (out[0] == 7).all(dim=1).any()
    assert torch.equal(out[0], out[1])
    cfg = nn_mod.NNSelectConfig(16, 64, splits, 4, groups, tile, users_per_step=users_per_step)
    nn_check(inputs, 64, cfg)


@pytest.mark.parametrize("distinct", [20, 400])
def test_nn_select_repeated_items(distinct):
    """A lifelong sequence is full of repeats: 16,000 rows drawn from few distinct items give runs
    of exactly equal scores (with 20 items, longer than the key capacity, so the exact fallback
    scan runs). Identical rows score identically on both sides, so the selections match exactly."""
    g = torch.Generator().manual_seed(distinct)
    base = torch.randint(-127, 128, (distinct, 32), generator=g, dtype=torch.int8)
    seq = base[torch.randint(0, distinct, (16000,), generator=g)]
    cand = torch.randn(64, 32, generator=g).half()
    inputs = (seq, torch.tensor([0]), torch.tensor([16000]), cand, torch.zeros(64, dtype=torch.int64))
    idx, _ = nn_mod.nn_select(*(t.to(DEV) for t in inputs), 64)
    ref_idx, _ = nn_select_reference(*inputs, 64)
    assert torch.equal(idx.cpu(), ref_idx)


def test_nn_select_auto_configs_and_graph():
    # 24,000 rows: 32 chunks, the packed split count rounded down to a power of two; 1 user x 20,000 / 50,000
    # rows (k 64) and x 40,000 (k 96): fewer chunks or shorter groups for at most GROUP_CAP maxima (choose_config)
    for lengths, n_per_user, k in (([16000], [256], 64), ([16000] * 64, [4] * 64, 64), ([24000] * 64, [4] * 64, 64),
                                   ([20000], [256], 64), ([50000], [256], 64), ([40000], [256], 96)):  # fmt: skip
        inputs = nn_inputs(lengths, n_per_user, seed=2)
        nn_check(inputs, k, idx_dtype=torch.int32)
        dev_inputs = [t.to(DEV) for t in inputs]
        n = inputs[3].shape[0]
        idx = torch.empty((n, k), dtype=torch.int64, device=DEV)
        scores = torch.empty((n, k), device=DEV)
        nn_mod.nn_select(*dev_inputs, k, out=(idx, scores))
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            nn_mod.nn_select(*dev_inputs, k, out=(idx, scores))
        new_cand = torch.randn(dev_inputs[3].shape, device=DEV).to(dev_inputs[3].dtype)
        dev_inputs[3].copy_(new_cand)
        g.replay()
        torch.cuda.synchronize()
        ref_idx, _ = nn_select_reference(inputs[0], inputs[1], inputs[2], new_cand.cpu(), inputs[4], k)
        assert (idx.cpu() == ref_idx).float().mean().item() > 0.999


@needs_sm90
@pytest.mark.parametrize(
    "lengths,n_per_user,aligned",
    [([16000] * 64, [4] * 64, True), ([16000], [256], True), ([3000] * 40, [7] * 40, True),
     ([16000] * 64, [4] * 64, False)],
    ids=["64-users", "1-user", "40-users", "64-users-triton-scan"],
)  # fmt: skip
def test_nn_select_dependent_scan(monkeypatch, lengths, n_per_user, aligned):
    """The scan as the programmatic dependent of the kernel before it (``SCAN_DEPENDENT``; the Gluon packed scan with
    and without its L2 prefetch, and the Triton one, which rows at an odd address take), in a chain of three
    selections captured in one CUDA graph: each takes as its candidates the top-32 scores the one before wrote (read
    after write: the scan may be placed while that refine pass runs), with a PyTorch kernel between the last two.
    Outputs poisoned before the replay; every one equals, bit for bit, the chain's with plain scans, and each
    selection agrees with the reference on its own candidates."""
    k = 32  # the scores of one selection are the next one's 32-dimensional candidates
    inputs = nn_inputs(lengths, n_per_user, torch.float32, seed=21)
    seq, starts, lens, cand, users = (t.to(DEV) for t in inputs)
    if not aligned:
        shifted = torch.zeros(seq.numel() + 1, dtype=torch.int8, device=DEV)
        shifted[1:] = seq.flatten()
        seq = shifted[1:].view(seq.shape)
        assert not nn_mod.nn_scan_wgmma.usable(seq, 32, 16, 64, 64, 4)
    n = cand.shape[0]

    def chain(dependent, prefetch):
        monkeypatch.setattr(nn_mod, "SCAN_DEPENDENT", dependent)
        monkeypatch.setattr(nn_mod.nn_scan_wgmma, "PREFETCH", prefetch)
        outs = [(torch.empty(n, k, dtype=torch.int64, device=DEV), torch.empty(n, k, device=DEV)) for _ in range(3)]

        def run():
            nn_mod.nn_select(seq, starts, lens, cand, users, k, out=outs[0])
            nn_mod.nn_select(seq, starts, lens, outs[0][1], users, k, out=outs[1])
            outs[1][1].mul_(-1.0)  # a PyTorch kernel between two selections
            nn_mod.nn_select(seq, starts, lens, outs[1][1], users, k, out=outs[2])

        run()  # compile outside capture
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            run()
        for idx, scores in outs:
            idx.fill_(-7)
            scores.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        return [(idx.cpu(), scores.cpu()) for idx, scores in outs]

    plain = chain(False, False)
    for prefetch in (False, True):
        dep = chain(True, prefetch)
        assert all(torch.equal(a, b) for d, p in zip(dep, plain, strict=True) for a, b in zip(d, p, strict=True))
    cands = (inputs[3], plain[0][1], plain[1][1])  # the second selection's scores as the third read them
    for i, (c, (idx, scores)) in enumerate(zip(cands, plain, strict=True)):
        ref_idx, ref_scores = nn_select_reference(inputs[0], inputs[1], inputs[2], c, inputs[4], k)
        if i == 1:
            scores = -scores  # the second selection's scores were negated after it wrote them
        assert not (idx == -7).any() and not torch.isnan(scores).any()
        assert (scores.double() - ref_scores).abs().max().item() <= NN_TOL
        assert (idx == ref_idx).float().mean().item() > 0.999


# ----------------------------------------------------------------------------------------------
# token builders
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("counts", [[[15000], [90], [100]], [[0], [0], [0]], [[16000], [20], [3]]])
def test_v2_tokens_production_shape(counts) -> None:
    """The runtime's shape: one user, ll 16,000, rt 100, imp 100, 256 candidates, 96 + 32 + 32 + 32 tokens;
    a user with no actions (null tokens) and short rt / imp rows."""
    from test_kernel_tokens import tok_mod, v2_case

    args = v2_case(4, widths=(16000, 100, 100), rows=1, n=256, ks=(96, 32, 32), r_rt=32, counts=counts)
    x, pad, pos, group = tok_mod.v2_tokens(*args)
    rx, rpad, rpos, rgroup = tok_mod.v2_tokens_torch(*args)
    assert torch.equal(pos, rpos) and torch.equal(group, rgroup) and torch.equal(pad, rpad)
    assert (err := ((x.double() - rx.double()).norm() / rx.double().norm()).item()) < 1e-3, err


def test_v1_tokens_production_shape() -> None:
    """256 candidates of 4 request rows, 100 rt slots of 96 features (action 32 ⊕ item ⊕ candidate)."""
    from test_kernel_tokens import random_arena, tok_mod

    g = torch.Generator().manual_seed(5)
    arena = random_arena((64, 100, 100), 4, 3, 5, g)
    rt_n = torch.tensor([100, 37, 0, 1], dtype=torch.int32, device=DEV)
    cand = torch.randn(256, 32, generator=g).to(DEV)
    cand_req = torch.randint(0, 4, (256,), generator=g, dtype=torch.int32).to(DEV)
    lookup = torch.randint(0, 33, (100,), generator=g).to(DEV)
    lookup[0] = 0
    emb = torch.randn(33, 32, generator=g).to(DEV)
    args = (arena, rt_n, 100, cand, cand_req, lookup, emb, 0.65 / 127)
    x, mask = tok_mod.v1_tokens(*args)
    rx, rmask = tok_mod.v1_tokens_torch(*args)
    assert torch.equal(mask, rmask)
    assert (err := ((x.double() - rx.double()).norm() / rx.double().norm()).item()) < 1e-3, err

