"""The fused NN-selection kernel against the float64 reference, under TRITON_INTERPRET=1 on the CPU.

Shapes are small (the interpreter runs every program in Python) but cover: lengths that are not
multiples of 16, one token, k above the length, empty users, one and several users, candidates of
different users in one block, ties (duplicate rows: the more recent must win), zero rows and
candidates, fp16 / fp32 / bf16 / int8 candidates, every code path (one or several chunks per
sequence, thresholds that let everything or little through, key lists that overflow into the exact
fallback scan) and the argument checks.
"""

from __future__ import annotations

import math

import pytest
import torch
import triton

import runtime.kernels.nn_select as nn_mod
from transact.selection import nn_select_reference

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 2e-5  # output scores are fp32 sums (refine pass) or fp16 hi/lo dots (exact fallback); reference float64


def make_inputs(lengths, n_per_user, dtype=torch.float16, seed=0, d=32):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    seq = torch.randint(-127, 128, (total, d), generator=g, dtype=torch.int8)
    starts = torch.tensor([sum(lengths[:i]) for i in range(len(lengths))], dtype=torch.int64)
    lens = torch.tensor(lengths, dtype=torch.int64)
    users = torch.arange(len(lengths)).repeat_interleave(torch.tensor(n_per_user))
    if dtype == torch.int8:
        cand = torch.randint(-127, 128, (users.numel(), d), generator=g, dtype=torch.int8)
    else:
        cand = torch.randn(users.numel(), d, generator=g).to(dtype)
    return seq, starts, lens, cand, users


def full_scores(seq, starts, lengths, cand, users):
    """float64 cosine of every candidate against every row of its user (for near-tie checks)."""
    out = []
    c = cand.double()
    c = c / c.norm(dim=1, keepdim=True).clamp_min(1e-12)
    for i in range(cand.shape[0]):
        u = int(users[i])
        rows = seq[int(starts[u]) : int(starts[u]) + int(lengths[u])].double()
        rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
        out.append(rows @ c[i])
    return out


def group_rows(length, splits, tile, groups, j):
    """The rows of group j (``split * groups + c``) of a sequence of ``length`` rows, as pass 1 forms them: chunks of
    whole tiles, group c of a chunk its rows c, c + groups, ..."""
    chunk = math.ceil(math.ceil(length / splits) / tile) * tile
    sp, c = divmod(j, groups)
    return list(range(sp * chunk + c, min(length, (sp + 1) * chunk), groups))


def assert_matches_reference(idx, scores, inputs, k):
    seq, starts, lens, cand, users = inputs
    ref_idx, ref_scores = nn_select_reference(seq, starts, lens, cand, users, k)
    idx, scores = idx.cpu().long(), scores.cpu()
    assert not torch.isnan(scores).any(), "unwritten (NaN-poisoned) score"
    assert torch.equal(idx == -1, ref_idx == -1), "padding slots differ"
    assert torch.equal(torch.isinf(scores), torch.isinf(ref_scores)), "-inf slots differ"
    fin = ~torch.isinf(ref_scores)
    if fin.any():
        assert (scores.double()[fin] - ref_scores[fin]).abs().max().item() <= TOL
    # A different index is allowed only where the reference scores of both picks are within TOL.
    full = full_scores(seq, starts, lens, cand, users)
    diff = (idx != ref_idx).nonzero().tolist()
    for i, j in diff:
        assert abs(full[i][idx[i, j]].item() - ref_scores[i, j].item()) <= TOL, (i, j)
    # and every row is a set of distinct positions
    for i in range(idx.shape[0]):
        v = idx[i][idx[i] >= 0]
        assert v.unique().numel() == v.numel(), f"duplicate positions in row {i}"


def brute_force(seq, starts, lengths, cand, users, k):
    """Exactly rounded cosine (math.fsum) per row, so identical rows tie exactly; then the rule:
    score desc, position desc. (A BLAS matmul may round identical rows differently.)"""
    idx = torch.full((cand.shape[0], k), -1, dtype=torch.int64)
    for i in range(cand.shape[0]):
        c = [float(v) for v in cand[i]]
        cn = math.sqrt(math.fsum(v * v for v in c))
        u = int(users[i])
        rows = []
        for p in range(int(lengths[u])):
            q = [float(v) for v in seq[int(starts[u]) + p]]
            qn = math.sqrt(math.fsum(v * v for v in q))
            s = 0.0 if qn == 0 or cn == 0 else math.fsum(a * b for a, b in zip(q, c, strict=True)) / (qn * cn)
            rows.append((s, p))
        rows.sort(key=lambda t: (-t[0], -t[1]))
        for j, (_, p) in enumerate(rows[:k]):
            idx[i, j] = p
    return idx


def run_kernel(inputs, k, config=None, idx_dtype=torch.int64, max_len=None):
    seq, starts, lens, cand, users = (t.to(DEV) for t in inputs)
    n = cand.shape[0]
    idx = torch.full((n, k), -7, dtype=idx_dtype, device=DEV)  # poison
    scores = torch.full((n, k), float("nan"), dtype=torch.float32, device=DEV)
    nn_mod.nn_select(seq, starts, lens, cand, users, k, idx_dtype=idx_dtype, config=config, out=(idx, scores),
                     max_len=max_len)  # fmt: skip
    assert not (idx == -7).any(), "unwritten index"
    return idx, scores


# Small grid of shapes and automatic configurations.
GRID = [
    # lengths, candidates per user, k, candidate dtype
    ([1], [1], 1, torch.float16),
    ([5], [3], 8, torch.float32),
    ([17], [2], 4, torch.float16),
    ([33], [1], 40, torch.float32),  # k > length, K padded to 64
    ([5, 17, 0, 33], [3, 1, 2, 4], 8, torch.float16),  # an empty user, users sharing a block
    ([0, 0], [2, 1], 3, torch.float32),  # nobody has actions
    ([65, 1, 20], [5, 6, 7], 16, torch.float16),
    ([40, 9], [2, 3], 5, torch.int8),
    ([23], [4], 6, torch.bfloat16),
]


@pytest.mark.parametrize("lengths,n_per_user,k,dtype", GRID)
def test_grid_matches_reference(lengths, n_per_user, k, dtype):
    inputs = make_inputs(lengths, n_per_user, dtype, seed=len(lengths) * 100 + k)
    idx, scores = run_kernel(inputs, k)
    assert_matches_reference(idx, scores, inputs, k)


@pytest.mark.parametrize("d", [8, 30, 48, 100])
def test_code_widths(d):
    """Codes narrower than pass 1's 32-wide integer dots (padded) and wider ones, not powers of two (30: not
    whole int32 words, so the scan widens the codes for the norms): the scan's error bound (and so the refine
    margin) grows with D; the selection stays exact."""
    inputs = make_inputs([300, 41], [6, 3], torch.float32, seed=d, d=d)
    idx, scores = run_kernel(inputs, 10)
    assert_matches_reference(idx, scores, inputs, 10)


# Every code path: one chunk or several, several block and tile sizes, a few or many groups, and a
# key capacity small enough that lists overflow into the exact fallback scan.
CONFIGS = [
    # block_n, k_pad, splits, groups_per_split, tile, capacity, users per scan step
    (16, 16, 1, 16, 64, None, 1),
    (32, 16, 3, 8, 64, None, 1),
    (16, 16, 4, 8, 16, None, 1),
    (16, 32, 2, 16, 32, 32, 1),  # capacity == k_pad: the 150-row user overflows
    (64, 16, 2, 16, 64, 16, 1),
    (16, 16, 2, 16, 64, None, 4),  # users side by side in the scan: 3 users over 4 slots
    (16, 16, 3, 8, 16, None, 2),  # 2 slots, the third user in a second round
    (32, 32, 2, 16, 32, 32, 4),  # and overflowing lists
]


@pytest.mark.parametrize("block_n,k_pad,splits,gps,tile,cap,users", CONFIGS)
def test_every_path(block_n, k_pad, splits, gps, tile, cap, users):
    k = 12
    inputs = make_inputs([150, 37, 3], [5, 9, 2], torch.float16, seed=block_n + splits)
    cfg = nn_mod.NNSelectConfig(block_n, k_pad, splits, 4, gps, tile=tile, capacity=cap, users_per_step=users)
    idx, scores = run_kernel(inputs, k, cfg)
    assert_matches_reference(idx, scores, inputs, k)


@pytest.mark.parametrize("lengths,n_per_user,k,max_len", [
    ([100], [20], 32, 100),  # the runtime's rt / imp shape, scaled down
    ([5, 17, 0, 33], [3, 1, 2, 4], 8, 33),  # users sharing a block, an empty user
    ([33], [3], 40, 33),  # k > length
    ([70, 12], [9, 8], 6, 20),  # the hint is too small: later tiles are merged in, still exact
])  # fmt: skip
def test_short_path(lengths, n_per_user, k, max_len, monkeypatch):
    """The one-pass kernel for sequences the caller bounds by ``max_len``."""

    def four_passes(*args):
        raise AssertionError("max_len <= SHORT_MAX must take the one-pass kernel")

    monkeypatch.setattr(nn_mod, "_nn_select_triton", four_passes)
    inputs = make_inputs(lengths, n_per_user, torch.float16, seed=k + max_len)
    idx, scores = run_kernel(inputs, k, max_len=max_len)
    assert_matches_reference(idx, scores, inputs, k)


def test_wide_offsets_rule():
    """64-bit row offsets exactly where (T, D) has 2**31 elements or more (meta tensors: nothing allocated)."""
    assert not nn_mod.wide_offsets(torch.empty((2**25 - 1, 64), dtype=torch.int8, device="meta"))
    assert nn_mod.wide_offsets(torch.empty((2**25, 64), dtype=torch.int8, device="meta"))
    assert not nn_mod.wide_offsets(torch.empty((100_000, 64), dtype=torch.int8))


@pytest.mark.parametrize("users,cap,max_len", [(1, None, None), (4, 16, None), (1, None, 120)])
def test_wide_and_narrow_offsets_agree(users, cap, max_len, monkeypatch):
    """Every kernel with 64-bit row offsets (the path for sequences of 2**31 elements or more, forced here) selects
    exactly what the 32-bit path does: the scans (1 and 4 users per step), the refine pass with its exact
    fallback (capacity 16, and the first user's rows five vectors repeated: runs of equal scores overflow the
    lists), and the one-pass kernel for short sequences."""
    k = 12
    inputs = make_inputs([120, 37, 3], [5, 9, 2], torch.float16, seed=41 + users)
    inputs[0][:120] = inputs[0][:5].repeat(24, 1)
    cfg = None if max_len else nn_mod.NNSelectConfig(16, 16, 2, 4, 16, tile=64, capacity=cap, users_per_step=users)
    narrow = run_kernel(inputs, k, cfg, max_len=max_len)
    monkeypatch.setattr(nn_mod, "wide_offsets", lambda seq: True)
    wide = run_kernel(inputs, k, cfg, max_len=max_len)
    assert torch.equal(wide[0], narrow[0]) and torch.equal(wide[1], narrow[1])
    assert_matches_reference(*wide, inputs, k)


def test_short_path_ties_prefer_recent():
    g = torch.Generator().manual_seed(12)
    base = torch.randint(-127, 128, (4, 32), generator=g, dtype=torch.int8)
    seq = base[torch.randint(0, 4, (90,), generator=g)]  # many exact ties
    cand = torch.randn(6, 32, generator=g).half()
    cand[5] = 0  # every score 0: pure recency order
    inputs = (seq, torch.tensor([0]), torch.tensor([90]), cand, torch.zeros(6, dtype=torch.int64))
    for max_len in (90, 40):  # one tile, and three merged tiles
        idx, _ = run_kernel(inputs, 25, max_len=max_len)
        assert torch.equal(idx.cpu().long(), brute_force(*inputs, 25))
        assert idx[5].tolist() == list(range(89, 64, -1))


def test_prefilter_large_k():
    """k = 64 (the production K) with several chunks: the threshold must keep every top-k key."""
    k = 64
    inputs = make_inputs([700], [16], torch.float16, seed=3)
    cfg = nn_mod.NNSelectConfig(block_n=16, k_pad=64, splits=3, num_warps=4, groups_per_split=64)
    idx, scores = run_kernel(inputs, k, cfg)
    assert_matches_reference(idx, scores, inputs, k)


def launch_refine(inputs, gm, k, cfg, rows=64, steps=33, top2=False):
    """Pass 2 on given group maxima (``top2``: and the seconds and rows after them): (idx, scores, threshold
    keys, list lengths)."""
    seq, starts, lens, cand, users = inputs
    n = cand.shape[0]
    g_tot = gm.shape[1] // (2 if top2 else 1)
    idx = torch.full((n, k), -7, dtype=torch.int64, device=DEV)
    scores = torch.full((n, k), float("nan"), device=DEV)
    gid = torch.full((n, g_tot), -5, dtype=torch.int32, device=DEV)
    tau = torch.full((n,), 7, dtype=torch.int64, device=DEV)
    cnt = torch.full((n,), 99, dtype=torch.int32, device=DEV)
    keys = torch.empty((n, cfg.capacity), dtype=torch.int64, device=DEV)
    nn_mod._nn_refine_kernel[(n,)](
        seq, starts, lens, cand, users, gm, gid, tau, cnt, keys, idx, scores, seq.shape[1], k, g_tot, cfg.splits,
        cfg.capacity, nn_mod.margin(seq.shape[1]), BS=cfg.tile, C=cfg.groups_per_split,
        G_P=triton.next_power_of_2(g_tot), R=rows, STEPS=steps, K=cfg.k_pad, CH=64, D_P=32, WIDE=False, GDC=False,
        M_BULK=8, TOP2=top2, num_warps=4,
    )  # fmt: skip
    return idx, scores, tau, cnt


def test_threshold_filters():
    """Pass 1 keeps each group's maximum; pass 2's threshold is the k-th largest of them, and few keys
    beyond k reach the lists: about k groups of the sequence are read again, not all of it."""
    k = 16
    inputs = tuple(t.to(DEV) for t in make_inputs([2000], [4], torch.float16, seed=8))
    seq, starts, lens, cand, users = inputs
    cfg = nn_mod.choose_config(4, 1, 2000, k, torch.device(DEV))
    n = cand.shape[0]
    gm = torch.full((n, cfg.splits * cfg.groups_per_split), 7, dtype=torch.int32, device=DEV)
    nn_mod.scan_launch(1, (1, cfg.splits))(
        seq, starts, lens, cand, users, gm, n, 32, gm.shape[1], cfg.splits,
        BN=cfg.block_n, BS=cfg.tile, C=cfg.groups_per_split, D_P=32, num_warps=4,
    )  # fmt: skip
    s = full_scores(*(t.cpu() for t in inputs))
    chunk = -(-2000 // cfg.splits)
    chunk = -(-chunk // cfg.tile) * cfg.tile
    err = nn_mod.scan_error(32)
    for i in range(n):  # each group maximum is the max of its own positions, within pass 1's bound
        for j in range(gm.shape[1]):
            sp, c = divmod(j, cfg.groups_per_split)
            pos = [p for p in range(sp * chunk, min(2000, (sp + 1) * chunk)) if p % cfg.groups_per_split == c]
            want = max(s[i][p].item() for p in pos)
            got = nn_mod_decode(gm[i, j].item())
            assert abs(got - want) <= err
    idx, scores, tau, cnt = launch_refine(inputs, gm, k, cfg)
    assert_matches_reference(idx, scores, inputs, k)
    for i in range(n):
        kth_group_max = torch.sort(gm[i].cpu(), descending=True).values[k - 1].item()
        assert tau[i].item() == kth_group_max << 32  # exact with 33 rounds (and the snap)
        passing = (torch.tensor([float(v) for v in s[i]]) >= nn_mod_decode(kth_group_max) - TOL).sum().item()
        assert k <= passing <= cnt[i].item() < 4 * k  # every key at the threshold, and few more
    # Fewer rounds: a bound at or below the k-th largest maximum, one of the maxima (at least k reach
    # it), and the same selection; 16 rows per step (several steps).
    for steps in (1, 4, 12):
        idx2, scores2, tau2, cnt2 = launch_refine(inputs, gm, k, cfg, rows=16, steps=steps)
        assert torch.equal(idx2, idx)
        torch.testing.assert_close(scores2, scores, atol=1e-6, rtol=0)  # sums over other layouts
        for i in range(n):
            kth = torch.sort(gm[i].cpu(), descending=True).values[k - 1].item()
            assert (tau2[i] >> 32).item() <= kth and int((gm[i] >= (tau2[i] >> 32)).sum()) >= k
            assert (tau2[i] >> 32).item() in gm[i].tolist()
            assert cnt2[i] >= cnt[i]
        if steps == 1:
            assert (tau2 < tau).any()  # one three-way split of the range of maxima stops short of the exact value


@pytest.mark.parametrize("users_per_step", [1, 2, 4])
def test_scan_group_maxima_of_users_sharing_a_block(users_per_step):
    """Pass 1 alone, one block of candidates over five users (one empty, one shorter than a tile, one
    with its candidates apart), one user per step or several side by side: every group maximum is its
    own user's positions' maximum within pass 1's bound, never another user's, and a group with no
    position at all is -2**31 (below every score)."""
    lengths, per_user = [0, 37, 300, 5, 70], [3, 2, 4, 3, 1]
    inputs = [t.to(DEV) for t in make_inputs(lengths, per_user, torch.float16, seed=21)]
    inputs[4][[1, 9]] = inputs[4][[9, 1]].clone()  # a user's candidates need not be adjacent
    seq, starts, lens, cand, users = inputs
    splits, groups, tile = 4, 8, 16
    n = cand.shape[0]
    gm = torch.full((n, splits * groups), 7, dtype=torch.int32, device=DEV)  # poison
    args = (seq, starts, lens, cand, users, gm, n, 32, gm.shape[1], splits)
    nn_mod.scan_launch(users_per_step, (1, splits))(*args, BN=16, BS=tile, C=groups, D_P=32, num_warps=4)
    s = full_scores(*(t.cpu() for t in inputs))
    err = nn_mod.scan_error(32)
    empty = 0
    for i in range(n):
        for j in range(gm.shape[1]):
            pos = group_rows(lengths[int(users[i])], splits, tile, groups, j)
            got = gm[i, j].item()
            if len(pos) == 0:
                empty += 1
                assert got == -(2**31), (i, j)
            else:
                assert abs(nn_mod_decode(got) - max(s[i][p].item() for p in pos)) <= err, (i, j)
    assert 0 < empty < gm.numel()


@pytest.mark.parametrize("users_per_step", [2, 4])
def test_scan_norms_from_words_and_from_codes_agree(users_per_step):
    """The packed scan takes the rows' squared norms from int32 words (four codes each) where the rows allow it
    and from the widened codes where they are not 4-byte aligned: the same rows through both ways give the same
    group maxima bit for bit (both norms are exact integers), and the words are used for aligned rows."""
    lengths, per_user = [150, 37, 90, 64], [4, 4, 4, 4]
    seq, starts, lens, cand, users = (t.to(DEV) for t in make_inputs(lengths, per_user, torch.float16, seed=33))
    seq[5] = 0  # a zero row scores 0 either way
    shifted = torch.zeros(seq.numel() + 1, dtype=torch.int8, device=DEV)
    shifted[1:] = seq.flatten()
    unaligned = shifted[1:].view(seq.shape)  # the same rows at an odd address
    assert nn_mod.seq_words(seq) is not None and nn_mod.seq_words(unaligned) is None
    splits, groups, tile, n = 2, 16, 32, cand.shape[0]
    out = []
    for rows in (seq, unaligned):
        gm = torch.full((n, splits * groups), 7, dtype=torch.int32, device=DEV)  # poison
        args = [rows, starts, lens, cand, users, gm, n, 32, gm.shape[1], splits]
        nn_mod.scan_launch(users_per_step, (1, splits))(*args, BN=16, BS=tile, C=groups, D_P=32, num_warps=4)
        out.append(gm.cpu())
    assert (out[0] != 7).all()
    assert torch.equal(out[0], out[1])


def exact_group_maxima(scores, groups):
    """Each candidate's group maxima of a one-chunk sequence (group j: positions j, j + groups, ...)
    from its exact scores, as pass 1 stores them (ordered int32)."""
    return torch.tensor([[nn_mod_encode(float(row[j::groups].max())) for j in range(groups)] for row in scores],
                        dtype=torch.int32)  # fmt: skip


def test_key_lists_sorted_or_ranked():
    """A list of up to 2 K keys is ordered by one sort, a longer one (up to the capacity) by rank
    counts: a candidate equal to a vector planted 100 times in its user's 150 rows ties at the top
    with all 100 copies (a 100-key list, ranked), a random one of a user with random rows keeps a
    short list (sorted). Both exactly as the brute force."""
    g = torch.Generator().manual_seed(21)
    seq = torch.randint(-127, 128, (300, 32), generator=g, dtype=torch.int8)
    planted = torch.randperm(150, generator=g)[:100]
    seq[planted] = seq[planted[0]].clone()
    cand = torch.stack([seq[planted[0]].float() * 0.37, torch.randn(32, generator=g)]).half()
    inputs = (seq, torch.tensor([0, 150]), torch.tensor([150, 150]), cand, torch.tensor([0, 1]))
    k = 20
    cfg = nn_mod.NNSelectConfig(16, 32, 1, 4, 32, tile=64)  # K = 32, capacity 256, 32 groups
    gm = exact_group_maxima(full_scores(*inputs), 32)
    idx, scores, _, cnt = launch_refine(tuple(t.to(DEV) for t in inputs), gm.to(DEV), k, cfg)
    assert cnt[0].item() == 100  # 2 K < 100 <= capacity: the rank counts
    assert k <= cnt[1].item() <= 2 * cfg.k_pad  # the sort
    assert torch.equal(idx.cpu().long(), brute_force(*inputs, k))
    assert idx[0].tolist() == sorted(planted.tolist(), reverse=True)[:k]
    assert_matches_reference(idx, scores, inputs, k)


def test_refine_steps_and_short_last_step():
    """The refine pass reads the visited groups' rows R at a time and a rest of at most R / 4 in one
    short step: for every R, whether the rest takes full steps, the short step after them, or the
    short step alone, the kept list (its length) and the selection are the same, and the brute
    force's."""
    g = torch.Generator().manual_seed(5)
    seq = torch.randint(-127, 128, (600, 32), generator=g, dtype=torch.int8)
    cand = torch.randn(3, 32, generator=g).half()
    inputs = (seq, torch.tensor([0]), torch.tensor([600]), cand, torch.zeros(3, dtype=torch.int64))
    k = 10
    cfg = nn_mod.NNSelectConfig(16, 16, 1, 4, 64, tile=64)  # one 640-row chunk, 64 groups of 10 rows
    gm = exact_group_maxima(full_scores(*inputs), 64)
    on_dev = tuple(t.to(DEV) for t in inputs)
    want = brute_force(*inputs, k)
    paths, lengths = set(), set()
    for rows in (4, 8, 16, 32, 64, 128, 512):
        idx, scores, tau, cnt = launch_refine(on_dev, gm.to(DEV), k, cfg, rows=rows)
        assert torch.equal(idx.cpu().long(), want), rows
        assert_matches_reference(idx, scores, inputs, k)
        lengths.add(tuple(cnt.tolist()))
        for i in range(3):  # which path this R takes, from the groups the kernel visits
            t = torch.tensor([nn_mod_decode((tau[i] >> 32).item())], dtype=torch.float32)
            floor = nn_mod_encode((t - torch.tensor(2 * nn_mod.margin(32), dtype=torch.float32)).item())
            n_rows = int((gm[i] >= floor).sum()) * 10
            rest = n_rows % rows
            paths.add("short only" if n_rows <= rows // 4 else "full + short" if 0 < rest <= rows // 4 else "full")
    assert len(lengths) == 1  # the same keys kept whatever the steps
    assert paths == {"full", "full + short", "short only"}


def test_threshold_kth_group_max_or_open():
    """Hand-worked: the 3rd largest of a row's group maxima, as a key threshold (its code << 32); a
    row with fewer than k non-empty groups lets every key through (the lowest code). The user has no
    rows, so the lists stay empty and every slot is padding."""
    empty = -(2**31)
    rows = [[0.5, -0.25, 0.75, 0.1, None, -0.5, None, 0.0], [0.3, None, None, -0.9, None, None, None, None]]
    gm = torch.tensor([[empty if v is None else nn_mod_encode(v) for v in r] for r in rows], dtype=torch.int32)
    seq = torch.ones((1, 32), dtype=torch.int8)
    inputs = (seq, torch.tensor([0]), torch.tensor([0]), torch.ones((2, 32)), torch.tensor([0, 0]))
    cfg = nn_mod.NNSelectConfig(16, 16, 2, 4, 4, tile=64)
    idx, scores, tau, cnt = launch_refine(tuple(t.to(DEV) for t in inputs), gm.to(DEV), 3, cfg)
    assert tau.tolist() == [nn_mod_encode(0.1) << 32, empty << 32]
    assert cnt.tolist() == [0, 0]
    assert (idx == -1).all() and torch.isinf(scores).all()


def test_refine_visits_only_groups_near_the_threshold():
    """Hand-made maxima steer pass 2: with the threshold at the 2nd largest maximum (~0.4985), only the
    two groups at or above it (less the margin) are read; a row that scores 0.9 in a group whose
    recorded maximum is low is never looked at (the kernel trusts pass 1), one just under the
    threshold in a visited group is not kept, and the top 2 come from the visited groups' rows."""
    d = 32
    unit = torch.zeros(d)
    unit[0] = 1.0
    c = 4  # groups per chunk, one chunk of 64 rows: group j holds rows j, j + 4, ..., j + 60
    seq = torch.zeros((64, d), dtype=torch.int8)
    seq[:, 1] = 40  # every row orthogonal to the candidate: score 0 ...
    def put(row, score):  # ... except these, at a chosen cosine with the candidate (e_0)
        a = round(40 * score / math.sqrt(1 - score * score))
        seq[row, 0] = a
    put(5, 0.6)   # group 1
    put(9, 0.49)  # group 1: 0.4819 (codes 22, 40), under the threshold
    put(2, 0.5)   # group 2: 0.4985 (codes 23, 40), the threshold
    put(3, 0.9)   # group 3, whose recorded maximum says 0.1: not visited
    scores = (seq.double() @ unit.double()) / seq.double().norm(dim=1)
    gm = torch.tensor([[nn_mod_encode(v) for v in (0.0, float(scores[5]), float(scores[2]), 0.1)]],
                      dtype=torch.int32)  # fmt: skip
    inputs = (seq, torch.tensor([0]), torch.tensor([64]), unit[None].half(), torch.tensor([0]))
    cfg = nn_mod.NNSelectConfig(16, 16, 1, 4, c, tile=64)
    idx, got, tau, cnt = launch_refine(tuple(t.to(DEV) for t in inputs), gm.to(DEV), 2, cfg)
    assert tau.item() == int(gm[0, 2]) << 32
    assert cnt.item() == 2  # rows 5 and 2; row 9 scored but under the threshold, row 3 never read
    assert idx.tolist() == [[5, 2]]
    torch.testing.assert_close(got.cpu()[0].double(), scores[[5, 2]], atol=1e-6, rtol=0)


def nn_mod_encode(x: float) -> int:
    """The kernel's order-preserving float32 -> int32 map."""
    b = torch.tensor([x], dtype=torch.float32).view(torch.int32).item()
    return b if b >= 0 else b ^ 0x7FFFFFFF


def nn_mod_decode(bits: int) -> float:
    """Inverse of the kernel's order-preserving float32 -> int32 map."""
    b = bits if bits >= 0 else bits ^ 0x7FFFFFFF
    return torch.tensor([b], dtype=torch.int32).view(torch.float32).item()


@pytest.mark.parametrize("splits,cap", [(1, None), (3, None), (2, 32), (1, 16)])
def test_ties_prefer_recent(splits, cap):
    """Duplicated rows give bit-identical scores: the larger position must come first, exactly.

    With a small capacity the runs of equal scores overflow the key lists, so the exact fallback
    scan decides."""
    g = torch.Generator().manual_seed(11)
    base = torch.randint(-127, 128, (6, 32), generator=g, dtype=torch.int8)
    pick = torch.randint(0, 6, (70,), generator=g)
    seq = base[pick]  # 70 rows, each one of 6 distinct vectors: many exact ties
    seq[10] = 0  # a zero row scores 0
    seq[50] = 0
    starts = torch.tensor([0])
    lens = torch.tensor([70])
    cand = torch.randn(5, 32, generator=g).half()
    cand[4] = 0  # a zero candidate: every score 0, so pure recency order
    users = torch.zeros(5, dtype=torch.int64)
    k = 20
    cfg = nn_mod.NNSelectConfig(16, 32, splits, 4, 16, tile=32, capacity=cap)
    inputs = (seq, starts, lens, cand, users)
    idx, scores = run_kernel(inputs, k, cfg)
    assert_matches_reference(idx, scores, inputs, k)
    assert torch.equal(idx.cpu().long(), brute_force(*inputs, k))
    assert idx[4].tolist() == list(range(69, 49, -1))
    assert (scores[4] == 0).all()


def test_zero_candidates_of_several_users_take_their_newest_positions():
    """A zero candidate ties at 0 with every row; its key list overflows and the final pass answers
    with the newest k positions of its own user's sequence (exactly the reference's tie rule)."""
    g = torch.Generator().manual_seed(12)
    lens = torch.tensor([40, 0, 75, 33])
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), lens.cumsum(0)[:-1]])
    seq = torch.randint(-127, 128, (int(lens.sum()), 32), generator=g, dtype=torch.int8)
    users = torch.tensor([2, 0, 1, 3, 2, 0, 3, 1])
    cand = torch.randn(8, 32, generator=g).half()
    zero = torch.tensor([0, 1, 2, 6])
    cand[zero] = 0
    k = 12
    inputs = (seq, starts, lens, cand, users)
    idx, scores = run_kernel(inputs, k, nn_mod.NNSelectConfig(16, 32, 2, 4, 16, tile=32, capacity=16))
    assert_matches_reference(idx, scores, inputs, k)
    assert torch.equal(idx.cpu().long(), brute_force(*inputs, k))
    for i in zero.tolist():
        n = int(lens[users[i]])
        want = list(range(n - 1, max(n - 1 - k, -1), -1))
        assert idx[i].tolist() == want + [-1] * (k - len(want))
        assert (scores[i][: len(want)] == 0).all() and torch.isinf(scores[i][len(want) :]).all()


def test_int32_indices_and_unordered_users():
    """Candidates of different users interleaved, int32 output."""
    inputs = make_inputs([30, 18, 7], [4, 4, 4], torch.float32, seed=5)
    seq, starts, lens, cand, users = inputs
    perm = torch.randperm(users.numel(), generator=torch.Generator().manual_seed(0))
    inputs = (seq, starts, lens, cand[perm], users[perm])
    idx, scores = run_kernel(inputs, 9, idx_dtype=torch.int32)
    assert idx.dtype == torch.int32
    assert_matches_reference(idx, scores, inputs, 9)


def test_torch_fallback_matches_reference():
    inputs = make_inputs([5, 17, 0, 33, 1], [3, 1, 2, 4, 2], torch.float16, seed=9)
    idx, scores = nn_mod.nn_select_torch(*inputs, 10)
    assert_matches_reference(idx, scores, inputs, 10)
    g = torch.Generator().manual_seed(4)
    seq = torch.randint(-127, 128, (4, 32), generator=g, dtype=torch.int8)[
        torch.randint(0, 4, (50,), generator=g)
    ]
    tie_inputs = (
        seq,
        torch.tensor([0]),
        torch.tensor([50]),
        torch.randn(6, 32, generator=g),
        torch.zeros(6, dtype=torch.int64),
    )
    idx, _ = nn_mod.nn_select_torch(*tie_inputs, 30)
    assert torch.equal(idx, brute_force(*tie_inputs, 30))


def test_zero_candidates():
    seq, starts, lens, _, _ = make_inputs([10], [1])
    idx, scores = nn_mod.nn_select(
        seq, starts, lens, torch.randn(0, 32).half(), torch.zeros(0, dtype=torch.int64), 4
    )
    assert idx.shape == (0, 4) and scores.shape == (0, 4)


@pytest.mark.parametrize(
    "bad,match",
    [
        (dict(seq=torch.zeros(4, 32)), "seq"),
        (dict(starts=torch.zeros(2, 2, dtype=torch.int64)), "starts"),
        (dict(lengths=torch.zeros(3, dtype=torch.int64)), "starts and lengths"),
        (dict(cand=torch.zeros(3, 16)), "cand has D"),
        (dict(cand=torch.zeros(3, 32, dtype=torch.float64)), "cand must"),
        (dict(cand_user=torch.zeros(2, dtype=torch.int64)), "cand_user"),
        (dict(cand_user=torch.zeros(3)), "cand_user"),
        (dict(k=0), "k must"),
        (dict(max_len=-1), "max_len"),
        (dict(max_len=2.5), "max_len"),
    ],
)
def test_argument_checks(bad, match):
    args = dict(
        seq=torch.ones(4, 32, dtype=torch.int8),
        starts=torch.zeros(1, dtype=torch.int64),
        lengths=torch.ones(1, dtype=torch.int64),
        cand=torch.ones(3, 32),
        cand_user=torch.zeros(3, dtype=torch.int64),
        k=2,
    )
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        nn_mod.nn_select(**args)


def test_kernel_k_limit():
    seq, starts, lens, cand, users = (t.to(DEV) for t in make_inputs([300], [2]))
    with pytest.raises(ValueError, match="k must be <= 256"):
        nn_mod.nn_select(seq, starts, lens, cand, users, 257)


def test_kernel_d_limit():
    """Codes far wider than any model's are refused (pass 1's int32 dots are exact up to ~16,000)."""
    seq, starts, lens, cand, users = (t.to(DEV) for t in make_inputs([40], [2], d=4097))
    with pytest.raises(ValueError, match="D must be <= 4096"):
        nn_mod.nn_select(seq, starts, lens, cand, users, 4)


def test_kernel_group_limit():
    """A caller's configuration with more group maxima per candidate than the refine pass holds in
    registers and counts in 16 bits is refused before any launch."""
    seq, starts, lens, cand, users = (t.to(DEV) for t in make_inputs([300], [2]))
    cfg = nn_mod.NNSelectConfig(16, 16, nn_mod.MAX_GROUPS // 64 + 1, 4, 64)
    with pytest.raises(ValueError, match=f"more than {nn_mod.MAX_GROUPS}"):
        nn_mod.nn_select(seq, starts, lens, cand, users, 4, config=cfg)


def test_config_is_shape_only():
    """The automatic choice depends on shapes alone and always yields valid block sizes."""
    for n, u, t, k in [(1, 1, 1, 1), (256, 1, 16000, 64), (256, 64, 64 * 100000, 64), (5000, 100, 10**6, 96),
                       (256, 1, 50_000, 64), (256, 1, 100_000, 200), (1024, 8, 96_000, 96)]:
        cfg = nn_mod.choose_config(n, u, t, k, torch.device("cpu"))
        assert cfg.k_pad >= k and cfg.k_pad & (cfg.k_pad - 1) == 0
        assert cfg.block_n >= 16 and cfg.splits >= 1 and cfg.tile >= cfg.k_pad
        assert cfg.splits * cfg.groups_per_split <= nn_mod.MAX_GROUPS
        assert cfg.splits * cfg.groups_per_split >= min(nn_mod.GROUPS_PER_K * cfg.k_pad, cfg.splits * cfg.tile)
        assert cfg.tile % cfg.groups_per_split == 0 and cfg.capacity >= cfg.k_pad


def test_group_rule_worked_by_hand(monkeypatch):
    """choose_config's groups on a 132-SM GPU, worked by hand: at least 16 x k_pad maxima per candidate,
    groups of at most 8 rows where the tile allows, at most MAX_GROUPS maxima."""
    monkeypatch.setattr(nn_mod, "sm_count", lambda device: 132)
    # 1 user x 16,000, k 64: 8 blocks of 32 candidates; 63 chunks of 256 rows (4 tiles of 64);
    # max(ceil(1024 / 63), 256 / 8) = 32. More than 256 candidates per user: blocks of 64.
    cfg = nn_mod.choose_config(256, 1, 16000, 64, torch.device("cpu"))
    assert (cfg.block_n, cfg.splits, cfg.tile, cfg.groups_per_split, cfg.users_per_step) == (32, 63, 64, 32, 1)
    # Users side by side in a scan step, as many as a 16-candidate block holds (up to 4), in chunks of at least
    # 8 tiles: 64 users x 100,000 rows (4 candidates each): 64 chunks of 1,600 rows (25 tiles), 4 users; with 8
    # candidates each, 2; with 16, 1.
    assert nn_mod.choose_config(256, 64, 64 * 100_000, 64, torch.device("cpu")).users_per_step == 4
    assert nn_mod.choose_config(256, 32, 32 * 100_000, 64, torch.device("cpu")).users_per_step == 2
    assert nn_mod.choose_config(256, 16, 16 * 100_000, 64, torch.device("cpu")).users_per_step == 1
    # Shorter sequences take fewer chunks (of 8 tiles) to go side by side, while 16 blocks x chunks >= 2 x 132
    # programs: at 16,000 rows, 63 chunks of 256 rows (4 tiles) would scan one user per step; ceil(16,000 / 512)
    # = 32 chunks, 4 users (32 users: 2). 16 users (16 candidates each) never share a block: 63 chunks. At 4,000
    # rows, 8 chunks would leave 128 programs: 16 chunks of 256 rows, one user per step; with 512 candidates
    # (32 blocks) at 8,000 rows, 16 chunks (512 programs). Those counts round down to a power of two where 16
    # blocks x chunks stay >= 264: at 24,000 rows ceil(24,000 / 512) = 47 -> 32 chunks (2,048 maxima, not
    # 3,008 in a 4,096-wide tile); at 12,000 rows 24 -> 16 would leave 256 programs: 24 chunks; with 512
    # candidates (32 blocks) 24 -> 16 (512 programs).
    fields = ("splits", "groups_per_split", "users_per_step")
    for (n, u, length), want in {(256, 64, 16_000): (32, 64, 4), (256, 32, 16_000): (32, 64, 2),
                                 (256, 16, 16_000): (63, 32, 1), (256, 64, 4_000): (16, 64, 1),
                                 (512, 128, 8_000): (16, 64, 4), (256, 64, 24_000): (32, 64, 4),
                                 (256, 64, 12_000): (24, 64, 4), (512, 64, 12_000): (16, 64, 2)}.items():  # fmt: skip
        cfg = nn_mod.choose_config(n, u, u * length, 64, torch.device("cpu"))
        assert tuple(getattr(cfg, f) for f in fields) == want, (n, u, length, cfg)
    assert nn_mod.choose_config(256, 64, 64 * 100_000, 64, torch.device("cpu"), block_n=32).users_per_step == 1
    assert nn_mod.choose_config(1024, 1, 16000, 64, torch.device("cpu")).block_n == 64
    # 1 user x 100,000, k 200 (k_pad 256): 98 chunks of 1,024 rows; max(ceil(4096 / 98), 1024 / 8) = 128.
    # 98 x 128 maxima are past GROUP_CAP (4,096): 64 chunks would keep less than 2/3 of 98, so groups are
    # halved to 64, and not again: 98 x 32 would leave fewer than 16 x 256 maxima.
    cfg = nn_mod.choose_config(256, 1, 100_000, 200, torch.device("cpu"))
    assert (cfg.splits, cfg.tile, cfg.groups_per_split) == (98, 256, 64)
    assert cfg.splits * cfg.groups_per_split <= nn_mod.MAX_GROUPS
    # Past GROUP_CAP with k 64 / 96 (8 blocks of 32 candidates): 1 user x 50,000, k 64: 128 chunks of 448 rows
    # (tile 64), 64 groups; 4,096 / 64 = 64 chunks keep less than 2/3 of 128: 32 groups (4,096 maxima). 1 user
    # x 40,000, k 96: 79 chunks of 512 rows (tile 128), 64 groups (5,056); 64 chunks keep 2/3 and 8 x 64 >= 264
    # programs: 64 x 64. Under it, a total just past a power of two: 1 user x 20,000, k 64: 79 chunks x 32
    # groups (2,528) -> 64 chunks (2,048); at k 96, 40 x 64 (2,560) stays: 32 chunks would leave 8 x 32 < 264
    # programs and less than 7/8 of 40.
    for (length, k), want in {(50_000, 64): (128, 32), (40_000, 96): (64, 64), (20_000, 64): (64, 32),
                              (20_000, 96): (40, 64)}.items():  # fmt: skip
        cfg = nn_mod.choose_config(256, 1, length, k, torch.device("cpu"))
        assert (cfg.splits, cfg.groups_per_split) == want, (length, k, cfg)
    # 64 users x 100,000, k 64: 66 chunks (8 x 132 programs / 16 blocks) of 1,536 rows, 64 groups each
    # (the tile's width): 4,224 maxima, just past 4,096, so 64 chunks (a 4,096-wide tile, not 8,192); with the
    # groups' seconds and rows kept (TOP2), the fewest chunks that fill one wave of 4 x 132 scan programs: 32
    # (2,048 maxima, at least 16 x 64).
    cfg = nn_mod.choose_config(256, 64, 6_400_000, 64, torch.device("cpu"))
    assert (cfg.block_n, cfg.splits, cfg.groups_per_split, cfg.users_per_step) == (16, 32, 64, 4)
    monkeypatch.setattr(nn_mod, "TOP2", False)
    cfg = nn_mod.choose_config(256, 64, 6_400_000, 64, torch.device("cpu"))
    assert (cfg.block_n, cfg.splits, cfg.groups_per_split) == (16, 64, 64)


@pytest.mark.parametrize("users_per_step,tile,groups", [(1, 32, 8), (1, 64, 64), (2, 32, 8), (4, 64, 16)])
def test_scan_seconds_and_rows(users_per_step, tile, groups):
    """Pass 1 with ``TOP2``: each group's maximum as without it (bit for bit), its second largest score within
    pass 1's bound of the float64 second (stored rounded up: never below it by more than the bound, above it by
    less than 2**16 ordered steps), and the row of its maximum one whose float64 score is within twice the bound
    of the group's maximum. Rows planted twice in a group make its second equal to its maximum."""
    lengths, per_user = [0, 37, 300, 5, 170], [3, 2, 4, 3, 4]
    inputs = [t.to(DEV) for t in make_inputs(lengths, per_user, torch.float16, seed=23)]
    seq, starts, lens, cand, users = inputs
    c2 = int((users == 2).nonzero()[0])  # user 2's first candidate, planted twice in one group of its rows
    for p in (40, 40 + groups):
        seq[int(starts[2]) + p] = (cand[c2].float() * 60).round().clamp(-127, 127).to(torch.int8)
    splits, n = 3, cand.shape[0]
    g_tot = splits * groups
    args = dict(BN=16, BS=tile, C=groups, D_P=32, num_warps=4)
    gm = torch.full((n, g_tot), 7, dtype=torch.int32, device=DEV)  # poison
    nn_mod.scan_launch(users_per_step, (1, splits))(seq, starts, lens, cand, users, gm, n, 32, g_tot, splits, **args)
    both = torch.full((n, 2 * g_tot), 7, dtype=torch.int32, device=DEV)
    nn_mod.scan_launch(users_per_step, (1, splits))(seq, starts, lens, cand, users, both, n, 32, g_tot, splits,
                                                    TOP2=True, **args)  # fmt: skip
    both = both.cpu()
    assert torch.equal(both[:, :g_tot], gm.cpu())
    s = full_scores(*(t.cpu() for t in inputs))
    err = nn_mod.scan_error(32)
    equal_pairs = 0
    for i in range(n):
        for j in range(g_tot):
            pos = group_rows(lengths[int(users[i])], splits, tile, groups, j)
            packed = int(both[i, g_tot + j])
            bound, row = packed & ~0xFFFF, packed & 0xFFFF  # Python ints: bound keeps the sign
            if len(pos) < 2:
                assert bound == -(2**31)  # no second
            else:
                vals = sorted((s[i][p].item() for p in pos), reverse=True)
                assert nn_mod_decode(bound) >= vals[1] - err, (i, j)
                assert bound - nn_mod_encode(vals[1] + err) < 2**16, (i, j)
                equal_pairs += int(i == c2 and nn_mod_decode(bound) >= nn_mod_decode(int(both[i, j])))
            if pos:
                assert pos[0] + row * groups in pos, (i, j, row)
                assert s[i][pos[0] + row * groups].item() >= max(s[i][p].item() for p in pos) - 2 * err
    assert equal_pairs == 1  # the planted pair's group: its second is its maximum


@pytest.mark.parametrize("users_per_step", [1, 4])
def test_refine_one_row_per_group_is_the_same_selection(users_per_step):
    """The refine pass with ``TOP2`` scores only the maximum's row of each visited group whose second cannot reach
    the top k: the same threshold, the same list of kept keys (length) and the same selection as scoring every
    row of every visited group, and the reference's; most visited groups take one row, and groups holding two
    top rows (planted copies) are scored whole."""
    k, lengths, per_user = 12, [900, 1300, 40, 700], [4, 4, 4, 4]
    inputs = [t.to(DEV) for t in make_inputs(lengths, per_user, torch.float16, seed=29)]
    seq, starts, lens, cand, users = inputs
    for u, c in ((0, 0), (1, 5)):  # user u's candidate c planted at rows 7 and 7 + 16 (one group) and 500
        for p in (7, 23, 500):
            seq[int(starts[u]) + p] = (cand[c].float() * 60).round().clamp(-127, 127).to(torch.int8)
    cfg = nn_mod.NNSelectConfig(block_n=16, k_pad=16, splits=2, num_warps=4, groups_per_split=16, tile=64,
                                users_per_step=users_per_step)  # fmt: skip
    n, g_tot = cand.shape[0], 2 * 16
    both = torch.full((n, 2 * g_tot), 7, dtype=torch.int32, device=DEV)
    nn_mod.scan_launch(users_per_step, (1, 2))(seq, starts, lens, cand, users, both, n, 32, g_tot, 2, BN=16, BS=64,
                                               C=16, D_P=32, TOP2=True, num_warps=4)  # fmt: skip
    idx, scores, tau, cnt = launch_refine(inputs, both[:, :g_tot].contiguous(), k, cfg)
    idx2, scores2, tau2, cnt2 = launch_refine(inputs, both, k, cfg, top2=True)
    assert_matches_reference(idx2, scores2, inputs, k)
    assert torch.equal(idx2, idx) and torch.equal(scores2, scores)
    assert torch.equal(tau2, tau) and torch.equal(cnt2, cnt)
    # Which visited groups took one row, from the stored seconds (as the kernel decides).
    both, margin = both.cpu(), nn_mod.margin(32)
    singles = wholes = 0
    for i in range(n):
        t = nn_mod_decode(int(tau[i] >> 32))
        floor2 = nn_mod_encode(t - 2 * margin)
        for j in range(g_tot):
            if int(both[i, j]) > -(2**31) and int(both[i, j]) >= floor2:
                one = (int(both[i, g_tot + j]) & ~0xFFFF) < floor2
                singles, wholes = singles + one, wholes + (not one)
    assert singles >= 8 * n and wholes >= 2  # the planted pairs' groups are whole


@pytest.mark.parametrize("users_per_step,tile,k", [(1, 128, 96), (4, 64, 40)])
def test_overflowing_lists_with_one_row_per_group(users_per_step, tile, k):
    """Runs of exactly equal scores (rows drawn from 10 items) overflow the key lists while the refine pass scores
    one row of most groups (``TOP2``): the exact scan rebuilds them, and the selection is the reference's, ties to
    the newer row, a zero candidate's newest rows included."""
    g = torch.Generator().manual_seed(5)
    lengths = [300, 250, 120, 10]
    base = torch.randint(-127, 128, (10, 32), generator=g, dtype=torch.int8)
    seq = base[torch.randint(0, 10, (sum(lengths),), generator=g)].to(DEV)
    starts = torch.tensor([0, 300, 550, 670], device=DEV)
    lens = torch.tensor(lengths, device=DEV)
    users = torch.arange(4, device=DEV).repeat_interleave(4)
    cand = torch.randn(16, 32, generator=g).half().to(DEV)
    cand[3] = 0
    cfg = nn_mod.NNSelectConfig(block_n=16, k_pad=max(16, triton.next_power_of_2(k)), splits=3, num_warps=4,
                                groups_per_split=64 if tile == 128 else 16, tile=tile, capacity=k + 16,
                                users_per_step=users_per_step)  # fmt: skip
    assert nn_mod.use_top2(cfg, seq.shape[0])
    idx, scores = run_kernel((seq, starts, lens, cand, users), k, cfg)
    assert_matches_reference(idx, scores, (seq, starts, lens, cand, users), k)
    ref_idx, _ = nn_select_reference(*(t.cpu() for t in (seq, starts, lens, cand, users)), k)
    assert torch.equal(idx.cpu().long(), ref_idx)
