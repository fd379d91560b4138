"""The selection's packed scan (``nn_select._nn_scan_packed_kernel``) on Hopper's warp-group MMA, written in Gluon.

Same function: for a block of 16 candidates whose users are scanned side by side (2 or 4 per step), the maximum
pass-1 score of each of the chunk's 64 groups (group j: rows j, j + 64, ... of the chunk), per candidate, as the
ordered int32 bits the refine pass reads. Same arithmetic: the candidate's two int8 pieces, exact int32 dots on
the codes, the row's scale ``1 / (I8_SCALE * norm)`` by the approximate rsqrt, -inf past a chunk's end.

Why a second kernel: in the Triton one the scores are (candidates x rows) tiles of mma.sync, so each row's scale
is computed in one layout and moved into the accumulator's, through shared memory, for every user of every step,
and each row tile is addressed and loaded by every thread in a layout the compiler picks; the row norms and that
move were ~half of the step's instructions and stall samples (benchmarks/RESULTS.md). Here the rows are the
MMA's M dimension (64 rows, one warp group) and the candidates its N (16), so:

- a step's row tiles arrive in shared memory by asynchronous 16-byte copies (each tile one contiguous 2 KB
  block), ``STAGES`` steps ahead, and wgmma reads them there (A operand) against each user's pieces a and b side
  by side (B operand, 2 x 16 columns, zero in the other users' candidates), all of a step's users into one
  accumulator;
- each thread squares its 8 codes of each of its two accumulator rows by ``dp4a`` (from shared memory); with 4
  users per step a row's quad then sums user q's partial sums in its thread q and takes that one rsqrt (not each
  of the four threads all four), and shares the results: every thread ends with its rows' scales in the
  accumulator's row layout;
- group j of the chunk is row j of every tile (64 groups of 64-row tiles), so the maxima are elementwise
  ``max``es in registers, and a chunk's end is checked only in the steps that reach one.

Measured on H200 against the Triton kernel (benchmarks/RESULTS.md, fortieth session): the scan alone 1.26-1.31x at
64 users x 100,000 rows, 128 x 24,000, 32 x 16,000 (2 users per step) and 1.17x at 64 x 16,000; the selection
(scan and refine) at DESIGN's 64-user rows 1.22x (100,000 rows) and 1.08x (16,000); every group maximum bit for
bit the Triton kernel's.

Runs on sm_90 with Gluon, for 32-dimensional codes in 16-byte aligned rows, 16-candidate blocks, 64-row tiles and
64 groups per chunk (what ``nn_select.choose_config`` picks for packed steps at k <= 64); ``usable`` says when.
Gluon has no interpreter: tests/gpu checks it against the Triton kernel and float64.
"""

from __future__ import annotations

import torch
import triton

from . import interpreting
from .skut_wgmma import GLUON_BUILT, HAVE_GLUON

if HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait
    from triton.runtime.jit import constexpr_function

    from .skut_wgmma import _async_load, _cta_barrier, _gdc_launch_dependents, _gdc_wait, _prefetch_l2

BLOCK_N = 16  # candidates per block (the wgmma's N)
TILE = 64  # rows per tile (the wgmma's M: one warp group), and groups per chunk
D_CODES = 32  # int8 codes per row (the wgmma's K for 8-bit operands)
# Steps of row tiles in the pipeline (STAGES - 1 in flight ahead of the one multiplied): on the H100, 3 against 4 at
# 64 users x 100,000 rows 1.01x, x 16,000 1.015x, 1 user equal; 6 0.95x (benchmarks/RESULTS.md, fifty-first
# session). With four users per step (8 KB of rows) and four programs per SM, 3 still keeps 64 KB per SM in flight.
# The build with 64-bit row offsets keeps 4: with 3 it spills 8 bytes at the register cap (Triton 3.9; ``stages``).
STAGES = 3
WIDE_STAGES = 4
MAX_REGS = 128  # four programs per SM (ptxas takes ~140 if left alone, for the same code without spills)
# As a programmatic dependent (``GDC``), each program asks L2 for the first row tiles of its block's first users before
# it waits for the kernel before it (``_prefetch_first_tiles``). Not in the 64-bit-offset build (8 bytes of spills).
PREFETCH = True
_BIG_USER = triton.language.constexpr(2**31 - 1)  # "no user", as nn_select's
_I8_SCALE = triton.language.constexpr(127 * 254)  # nn_select.I8_SCALE


def shape_ok(d: int, block_n: int, tile: int, groups: int, users_per_step: int) -> bool:
    """Whether a packed scan's configuration is the one this kernel is written for: 32-dimensional codes, 16-candidate
    blocks, 64-row tiles, 64 groups per chunk, 2 or 4 users per step."""
    return (d, block_n, tile, groups) == (D_CODES, BLOCK_N, TILE, TILE) and users_per_step in (2, 4)


def usable(seq: torch.Tensor, d: int, block_n: int, tile: int, groups: int, users_per_step: int) -> bool:
    """Whether a packed scan launch can take this kernel: ``shape_ok``, Gluon in a Triton release ``skut_wgmma`` was
    built with, an sm_90 GPU, the codes in 16-byte aligned contiguous rows (its 16-byte asynchronous copies)."""
    return (
        shape_ok(d, block_n, tile, groups, users_per_step) and seq.shape[1] == d and GLUON_BUILT and not interpreting()
        and seq.is_cuda and torch.cuda.get_device_capability(seq.device)[0] == 9
        and seq.is_contiguous() and seq.data_ptr() % 16 == 0
    )  # fmt: skip


if HAVE_GLUON:

    @constexpr_function
    def _acc_layout(n):
        """The int8 wgmma's accumulator layout for a (64, n) tile over one warp group: warp w holds rows 16 w ..
        16 w + 15; lane l rows 16 w + l // 4 and 16 w + l // 4 + 8."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, 32])

    @constexpr_function
    def _codes_layout():
        """(64, 32) int8 codes as the accumulator's rows fall to threads: lane l of warp w holds codes
        8 (l % 4) .. 8 (l % 4) + 7 of rows 16 w + l // 4 and 16 w + l // 4 + 8, so a row's sum over its quad lands
        in ``SliceLayout(1, _acc_layout(n))`` as it is."""
        return gl.DistributedLinearLayout(
            reg_bases=[[0, 1], [0, 2], [0, 4], [8, 0]], lane_bases=[[0, 8], [0, 16], [1, 0], [2, 0], [4, 0]],
            warp_bases=[[16, 0], [32, 0]], block_bases=[], shape=[64, 32],
        )  # fmt: skip

    @constexpr_function
    def _parts_layout():
        """(64, 4): each row's four partial sums (one per thread of the row's quad) as the codes' layout leaves them."""
        return gl.DistributedLinearLayout(reg_bases=[[8, 0]], lane_bases=[[0, 1], [0, 2], [1, 0], [2, 0], [4, 0]],
                                          warp_bases=[[16, 0], [32, 0]], block_bases=[], shape=[64, 4])  # fmt: skip

    @constexpr_function
    def _by_user_layout():
        """(64, 4 parts, 4 users): thread q of a row's quad holds user q's four partial sums of the row."""
        return gl.DistributedLinearLayout(
            reg_bases=[[0, 1, 0], [0, 2, 0], [8, 0, 0]],
            lane_bases=[[0, 0, 1], [0, 0, 2], [1, 0, 0], [2, 0, 0], [4, 0, 0]],
            warp_bases=[[16, 0, 0], [32, 0, 0]], block_bases=[], shape=[64, 4, 4],
        )  # fmt: skip

    @constexpr_function
    def _all_users_layout():
        """(64, 4 users): every thread of a row's quad holds the row's value of each user."""
        return gl.DistributedLinearLayout(
            reg_bases=[[0, 1], [0, 2], [8, 0]], lane_bases=[[0, 0], [0, 0], [1, 0], [2, 0], [4, 0]],
            warp_bases=[[16, 0], [32, 0]], block_bases=[], shape=[64, 4],
        )  # fmt: skip

    @constexpr_function
    def _copy_layout():
        """(64, 32) int8 rows in 16-byte pieces, one per thread."""
        return gl.BlockedLayout(size_per_thread=[1, 16], threads_per_warp=[16, 2], warps_per_cta=[4, 1], order=[1, 0])

    @constexpr_function
    def _cand_layout():
        """(16, 32) candidates over 128 threads."""
        return gl.BlockedLayout(size_per_thread=[1, 4], threads_per_warp=[4, 8], warps_per_cta=[4, 1], order=[1, 0])

    @gluon.jit
    def _next_user(users, u):
        """The smallest user of the block above u; _BIG_USER: none."""
        return gl.min(gl.where(users > u, users, _BIG_USER), axis=0)

    @gluon.jit
    def _slot(users, prev, starts_ptr, lengths_ptr, split, SPLITS, BS: gl.constexpr, WIDE: gl.constexpr):
        """The smallest user of the block above ``prev`` (_BIG_USER: none) and its rows [lo, hi) in this split
        (chunks of whole tiles, as ``nn_select._user_chunk``; none for no user), from row ``start``."""
        u = _next_user(users, prev)
        some = u < _BIG_USER
        i = gl.where(some, u, 0)  # a block has a candidate, so user 0 exists
        start = gl.load(starts_ptr + i)
        if WIDE:
            start = start.to(gl.int64)
        else:
            start = start.to(gl.int32)
        length = gl.where(some, gl.load(lengths_ptr + i).to(gl.int32), 0)
        chunk = gl.cdiv(gl.cdiv(length, SPLITS), BS) * BS
        lo = split * chunk
        return u, start, lo, gl.minimum(length, lo + chunk)

    @gluon.jit
    def _own_pieces(p_t, pieces, users_c, u):
        """User u's candidates' int8 pieces (a in rows 0 .. BN-1, b below) into its B operand ``p_t``; zeros for the
        other candidates."""
        p_t.store(gl.where(gl.expand_dims(users_c == u, 1), pieces, 0))

    @gluon.jit
    def _copy_tile(dst, seq_ptr, start, p0, hi, live, D: gl.constexpr):
        """Start copying rows p0 .. p0 + 63 of a user's sequence (from row ``start``) into ``dst``; rows at or past
        ``hi``, or all unless ``live``, are zero-filled. The rows are one contiguous block: a scalar base and each
        thread's fixed offset."""
        L: gl.constexpr = _copy_layout()
        r = gl.arange(0, dst.shape[0], layout=gl.SliceLayout(1, L))
        col = gl.arange(0, D, layout=gl.SliceLayout(0, L))
        n_ok = gl.where(live, hi - p0, 0)
        ok = gl.expand_dims(r < n_ok, 1) & gl.expand_dims(col < D, 0)
        _async_load(dst, seq_ptr + (start + p0) * D + (gl.expand_dims(r * D, 1) + gl.expand_dims(col, 0)), mask=ok)

    @gluon.jit
    def _squares(tile):
        """A tile's codes squared and summed four at a time by ``dp4a`` (``_codes_layout``: four codes per register;
        the sum in the first of each four outputs, the others 0)."""
        return gl.inline_asm_elementwise("dp4a.s32.s32 $0, $4, $4, 0; mov.b32 $1, 0; mov.b32 $2, 0; mov.b32 $3, 0;",
                                         "=r,=r,=r,=r,r", [tile.load(_codes_layout())], dtype=gl.int32, is_pure=True,
                                         pack=4)  # fmt: skip

    @gluon.jit
    def _scale_of(nrm2):
        """Pass 1's scale of rows of squared norms nrm2: 1 / (I8_SCALE * the norm) by the approximate rsqrt, 0 for a
        zero row (``nn_select._scan_scale``)."""
        return gl.where(nrm2 > 0, (1.0 / _I8_SCALE) * gl.rsqrt(gl.maximum(nrm2, 1).to(gl.float32)), 0.0)

    @gluon.jit
    def _copy_step(bufs, rows, seq_ptr, step, slot, n_steps, U: gl.constexpr, BS: gl.constexpr, D: gl.constexpr):
        """Start copying step ``step``'s row tile of each of the U user slots into buffer ``slot`` of its ``bufs``
        (``rows``: each slot's first row, chunk start and end; none live past the last step), one commit group."""
        live = step < n_steps
        for j in gl.static_range(U):
            _copy_tile(bufs[j].index(slot), seq_ptr, rows[3 * j], rows[3 * j + 1] + step * BS, rows[3 * j + 2], live, D)
        async_copy.commit_group()

    @gluon.jit
    def _prefetch_first_tiles(seq_ptr, users, starts_ptr, lengths_ptr, split, SPLITS, T, BS: gl.constexpr,
                              U: gl.constexpr, WIDE: gl.constexpr):  # fmt: skip
        """Ask L2 for this split's first rows of the block's first U users: 128 lines of 128 bytes (4 rows of 32 codes
        each), 128 / U per user (two 64-row tiles at U = 4, the copies the pipeline starts with). Issued before the
        wait, so the user table may not be final yet: rows are clamped into the T rows of ``seq``, and whatever a
        stale entry fetched is only a wasted hint (L2 is where every SM's view of memory meets: lines fetched before
        the kernel before writes them are updated by its writes)."""
        L: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
        LINES: gl.constexpr = 128 // U
        i = gl.arange(0, 128, layout=L)
        first = gl.zeros([128], gl.int64, L)
        prev = gl.full([], -1, gl.int32)
        for j in gl.static_range(U):
            u, start, lo, _ = _slot(users, prev, starts_ptr, lengths_ptr, split, SPLITS, BS, WIDE)
            first = gl.where(i // LINES == j, start.to(gl.int64) + lo, first)
            prev = u
        row = gl.minimum(gl.maximum(first + (i % LINES) * 4, 0), T - 1)
        _prefetch_l2(seq_ptr + row * 32)

    @gluon.jit
    def _row_scale(tile, ROW: gl.constexpr):
        """A tile's rows' scales in the accumulator's row layout: each row's quad sums its threads' squares."""
        return _scale_of(gl.convert_layout(gl.sum(_squares(tile), axis=1), ROW, assert_trivial=True))

    @gluon.jit
    def _parts(tile):
        """A tile's rows' squared norms as four partial sums per row (``_parts_layout``), one per thread of its quad."""
        return gl.convert_layout(gl.sum(gl.reshape(_squares(tile), [64, 4, 8]), axis=2), _parts_layout(),
                                 assert_trivial=True)  # fmt: skip

    @gluon.jit
    def _row_scales4(ta, tb, tc, td, ROW: gl.constexpr):
        """The four users' row scales (as ``_row_scale``), each rsqrt once per row and user: a row's quad sums
        user q's partial sums in its thread q, then shares the four results."""
        x = gl.join(gl.join(_parts(ta), _parts(tc)), gl.join(_parts(tb), _parts(td)))  # (64, 4, 2, 2): user 2 i + o
        x = gl.convert_layout(gl.reshape(x, [64, 4, 4]), _by_user_layout())
        inv = gl.convert_layout(_scale_of(gl.sum(x, axis=1)), _all_users_layout())
        lo, hi = gl.split(gl.reshape(inv, [64, 2, 2]))  # users 0, 2 and 1, 3
        i0, i2 = gl.split(lo)
        i1, i3 = gl.split(hi)
        return (gl.convert_layout(i0, ROW, assert_trivial=True), gl.convert_layout(i1, ROW, assert_trivial=True),
                gl.convert_layout(i2, ROW, assert_trivial=True), gl.convert_layout(i3, ROW, assert_trivial=True))

    @gluon.jit
    def _products(tile, p_t, acc, first: gl.constexpr):
        """Start one slot's products (asynchronous): its rows against its user's pieces a and b side by side."""
        return warpgroup_mma(tile, p_t.permute((1, 0)), acc, use_acc=not first, is_async=True)

    @gluon.jit
    def _pair_sum(acc, OUT: gl.constexpr):
        """254 a + b of each candidate's two dots (columns c and BN + c of ``acc``, held by one thread), in OUT."""
        BM: gl.constexpr = acc.shape[0]
        N: gl.constexpr = acc.shape[1] // 2
        a, b = gl.split(gl.permute(gl.reshape(acc, [BM, 2, N]), [0, 2, 1]))
        return gl.convert_layout(a * 254 + b, OUT, assert_trivial=True)

    @gluon.jit
    def _ordered_bits(s):
        """fp32 -> int32 with the same order (``nn_select._ordered_bits``)."""
        bits = s.to(gl.int32, bitcast=True)
        return gl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)

    @gluon.jit
    def _max_bits(m):
        """Maxima as the refine pass reads them: ordered bits, -2**31 for none (``nn_select._group_max_bits``)."""
        return gl.where(m == float("-inf"), -(2**31), _ordered_bits(m))

    @gluon.jit
    def _gm_tile(gm_ptr, cn, rr, split, STRIDE, ok, BS: gl.constexpr):
        """Where a block's values for this split go in ``gm`` (a candidate's row ``STRIDE`` long; group j is row j
        of every tile), and the store's mask for the candidates ``ok``."""
        ptrs = gm_ptr + gl.expand_dims(cn.to(gl.int64) * STRIDE + split * BS, 0) + gl.expand_dims(rr, 1)
        return ptrs, gl.expand_dims(ok, 0) & gl.expand_dims(rr < BS, 1)

    @gluon.jit
    def _second_and_row(g2, garg):
        """The seconds rounded up to a multiple of 2**16 over the rows, in one int32 (``nn_select._second_and_row``)."""
        bits = _max_bits(g2)
        hi = (bits >> 16) + ((bits & 0xFFFF) != 0).to(gl.int32)
        return (hi << 16) | (garg & 0xFFFF)

    @gluon.jit
    def _nn_scan_wgmma_kernel(
        seq_ptr, starts_ptr, lengths_ptr, cand_ptr, user_ptr, gm_ptr, N, D, G_TOT, SPLITS, T,
        BN: gl.constexpr, BS: gl.constexpr, U: gl.constexpr, STAGES: gl.constexpr, WIDE: gl.constexpr,
        GDC: gl.constexpr, PREFETCH: gl.constexpr, TOP2: gl.constexpr,
    ):  # fmt: skip
        """Pass 1 for a block of BN = 16 candidates and one chunk of each of its users' sequences, U (2 or 4) users
        per step (program axes: block, split); writes the block's BS = 64 group maxima of this split. ``T``: the
        rows of ``seq``. ``GDC``: launched as the programmatic dependent of the kernel before (nn_select's
        ``SCAN_DEPENDENT``; the wait is a no-op for a plain launch) and the refine pass's primary; ``PREFETCH`` (with
        ``GDC``): the first row tiles asked of L2 before the wait. ``TOP2``: also each group's second largest
        score and the row (step) of its largest, packed after the maxima as ``nn_select._store_scan`` does,
        each user's candidates written once its steps are done."""
        if GDC:
            if PREFETCH:
                blk = gl.program_id(0) * BN + gl.arange(0, BN, layout=gl.SliceLayout(0, _acc_layout(BN)))
                pre = gl.load(user_ptr + blk, mask=blk < N, other=_BIG_USER).to(gl.int32)
                _prefetch_first_tiles(seq_ptr, pre, starts_ptr, lengths_ptr, gl.program_id(1), SPLITS, T, BS, U,
                                      WIDE)  # fmt: skip
            _gdc_wait()  # nothing below reads memory the kernel before may write until it has finished
            _gdc_launch_dependents()  # the refine pass may be placed (see nn_select._nn_refine_kernel)
        DC: gl.constexpr = 32
        ACC: gl.constexpr = _acc_layout(2 * BN)  # a's dots in columns 0 .. BN-1, b's in BN .. 2 BN - 1
        OUT: gl.constexpr = _acc_layout(BN)  # the scores, one column per candidate
        ROW: gl.constexpr = gl.SliceLayout(1, OUT)
        COL: gl.constexpr = gl.SliceLayout(0, OUT)
        SH_T: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BS, DC], gl.int8)
        # One buffer per user slot: copies into different slots' buffers are then not ordered by barriers.
        t0 = gl.allocate_shared_memory(gl.int8, [STAGES, BS, DC], SH_T)
        t1 = gl.allocate_shared_memory(gl.int8, [STAGES, BS, DC], SH_T)
        t2 = gl.allocate_shared_memory(gl.int8, [STAGES if U == 4 else 1, BS, DC], SH_T)
        t3 = gl.allocate_shared_memory(gl.int8, [STAGES if U == 4 else 1, BS, DC], SH_T)
        bufs = (t0, t1, t2, t3)
        # Each slot's B operand: its user's candidates' pieces a (columns 0 .. BN-1) and b (BN .. 2 BN - 1).
        SH_P: gl.constexpr = gl.NVMMASharedLayout.get_default_for([2 * BN, DC], gl.int8)
        p_s = gl.allocate_shared_memory(gl.int8, [U, 2 * BN, DC], SH_P)

        split = gl.program_id(1)
        # The block's candidates as two int8 pieces each, as nn_select._load_cand_i8 (254 a + b within 0.5 of
        # 127 * 254 * the unit candidate), a over b: rows c and BN + c of each slot's B operand.
        CAND: gl.constexpr = _cand_layout()
        cr = gl.program_id(0) * BN + gl.arange(0, 2 * BN, layout=gl.SliceLayout(1, CAND)) % BN
        cd = gl.arange(0, DC, layout=gl.SliceLayout(0, CAND))
        x = gl.load(cand_ptr + gl.expand_dims(cr.to(gl.int64) * D, 1) + gl.expand_dims(cd, 0),
                    mask=gl.expand_dims(cr < N, 1) & gl.expand_dims(cd < D, 0), other=0).to(gl.float32)  # fmt: skip
        nrm2 = gl.sum(x * x, axis=1)
        x = x * gl.expand_dims(gl.where(nrm2 > 0, 1.0 / gl.sqrt(gl.maximum(nrm2, 1e-30)), 0.0), 1) * 127.0
        a = gl.floor(x + 0.5)
        b = gl.floor((x - a) * 254.0 + 0.5)  # x - a is exact and within [-0.5, 0.5]: |b| <= 127
        upper = gl.expand_dims(gl.arange(0, 2 * BN, layout=gl.SliceLayout(1, CAND)) < BN, 1)
        pieces = gl.where(upper, a, b).to(gl.int8)
        users_c = gl.load(user_ptr + cr, mask=cr < N, other=_BIG_USER).to(gl.int32)
        cn = gl.program_id(0) * BN + gl.arange(0, BN, layout=COL)
        users = gl.load(user_ptr + cn, mask=cn < N, other=_BIG_USER).to(gl.int32)
        rr = gl.arange(0, BS, layout=ROW)
        zero = gl.zeros([BS, 2 * BN], gl.int32, ACC)
        gmax = gl.full([BS, BN], float("-inf"), gl.float32, OUT)
        last = gl.full([], -1, gl.int32)
        while _next_user(users, last) < _BIG_USER:
            # The next U users of the block (_BIG_USER: none; its chunk is empty and owns no candidate).
            u0, st0, lo0, hi0 = _slot(users, last, starts_ptr, lengths_ptr, split, SPLITS, BS, WIDE)
            u1, st1, lo1, hi1 = _slot(users, u0, starts_ptr, lengths_ptr, split, SPLITS, BS, WIDE)
            span = gl.maximum(gl.maximum(hi0 - lo0, hi1 - lo1), 0)
            tail = gl.minimum(hi0 - lo0, gl.where(u1 < _BIG_USER, hi1 - lo1, 2**30))
            slot_of = gl.where(users == u1, 1, 0)
            last = u1
            if U == 4:
                u2, st2, lo2, hi2 = _slot(users, u1, starts_ptr, lengths_ptr, split, SPLITS, BS, WIDE)
                u3, st3, lo3, hi3 = _slot(users, u2, starts_ptr, lengths_ptr, split, SPLITS, BS, WIDE)
                span = gl.maximum(span, gl.maximum(hi2 - lo2, hi3 - lo3))
                tail = gl.minimum(tail, gl.minimum(gl.where(u2 < _BIG_USER, hi2 - lo2, 2**30),
                                                   gl.where(u3 < _BIG_USER, hi3 - lo3, 2**30)))  # fmt: skip
                slot_of = gl.where(users == u2, 2, gl.where(users == u3, 3, slot_of))
                last = u3
            n_steps = gl.cdiv(span, BS)
            full_steps = gl.maximum(tail, 0) // BS  # steps before any used slot reaches the end of its chunk
            mine = (users == u0) | (users == u1)
            n_col = gl.where(users == u1, hi1 - lo1, hi0 - lo0)  # rows of each candidate's own chunk
            if U == 4:
                mine = mine | (users == u2) | (users == u3)
                n_col = gl.where(users == u2, hi2 - lo2, gl.where(users == u3, hi3 - lo3, n_col))

            # Every thread is done with the last users' pieces and tiles before they are overwritten.
            _cta_barrier()
            _own_pieces(p_s.index(0), pieces, users_c, u0)
            _own_pieces(p_s.index(1), pieces, users_c, u1)
            if U == 4:
                _own_pieces(p_s.index(2), pieces, users_c, u2)
                _own_pieces(p_s.index(3), pieces, users_c, u3)
            rows = (st0, lo0, hi0, st1, lo1, hi1)  # each slot's first row, chunk start and end
            if U == 4:
                rows = rows + (st2, lo2, hi2, st3, lo3, hi3)
            for s in gl.static_range(STAGES - 1):
                _copy_step(bufs, rows, seq_ptr, s, s, n_steps, U, BS, DC)
            g_it = gl.full([BS, BN], float("-inf"), gl.float32, OUT)
            if TOP2:
                g2_it = gl.full([BS, BN], float("-inf"), gl.float32, OUT)
                ga_it = gl.zeros([BS, BN], gl.int32, OUT)
            for t in range(0, n_steps):
                async_copy.wait_group(STAGES - 2)  # this step's tiles (this thread's copies)
                fence_async_shared()
                _cta_barrier()  # ... every thread's; and every thread is done with the step before's slot
                cs = t % STAGES
                acc = _products(t0.index(cs), p_s.index(0), zero, True)
                acc = _products(t1.index(cs), p_s.index(1), acc, False)
                if U == 4:
                    acc = _products(t2.index(cs), p_s.index(2), acc, False)
                    acc = _products(t3.index(cs), p_s.index(3), acc, False)
                # The rows' scales while the products run; each candidate takes its own user's.
                if U == 4:
                    s0, s1, s2, s3 = _row_scales4(t0.index(cs), t1.index(cs), t2.index(cs), t3.index(cs), ROW)
                    scale = gl.where(gl.expand_dims(slot_of == 1, 0), gl.expand_dims(s1, 1), gl.expand_dims(s0, 1))
                    scale = gl.where(gl.expand_dims(slot_of == 2, 0), gl.expand_dims(s2, 1), scale)
                    scale = gl.where(gl.expand_dims(slot_of == 3, 0), gl.expand_dims(s3, 1), scale)
                else:
                    scale = gl.expand_dims(_row_scale(t0.index(cs), ROW), 1)
                    scale = gl.where(gl.expand_dims(slot_of == 1, 0), gl.expand_dims(_row_scale(t1.index(cs), ROW), 1),
                                     scale)  # fmt: skip
                # The next copies, into the slot the step before read.
                nt = t + STAGES - 1
                _copy_step(bufs, rows, seq_ptr, nt, nt % STAGES, n_steps, U, BS, DC)
                acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc])
                # Each candidate's pieces are zero in the other users' slots: the sums are its own exact dot.
                sc = _pair_sum(acc, OUT).to(gl.float32) * scale
                if t >= full_steps:  # a chunk ends in this step: each candidate's rows past its own chunk score -inf
                    sc = gl.where(gl.expand_dims(t * BS + rr, 1) >= gl.expand_dims(n_col, 0), float("-inf"), sc)
                if TOP2:  # row t of group j is the chunk's row j + 64 t
                    ga_it = gl.where(sc > g_it, t, ga_it)
                    g2_it = gl.maximum(g2_it, gl.minimum(g_it, sc))
                g_it = gl.maximum(g_it, sc)
            async_copy.wait_group(0)  # the copies issued past the last step (none live)
            if TOP2:  # these users' candidates are done: their maxima, seconds and rows
                ptrs, done = _gm_tile(gm_ptr, cn, rr, split, 2 * G_TOT, mine & (cn < N), BS)
                gl.store(ptrs, _max_bits(g_it), mask=done)
                gl.store(ptrs + G_TOT, _second_and_row(g2_it, ga_it), mask=done)
            else:
                gmax = gl.maximum(gmax, gl.where(gl.expand_dims(mine, 0), g_it, float("-inf")))
        if not TOP2:
            # Group j of this split is row j of every tile: the maxima as the refine pass reads them.
            ptrs, ok = _gm_tile(gm_ptr, cn, rr, split, G_TOT, cn < N, BS)
            gl.store(ptrs, _max_bits(gmax), mask=ok)


def stages(wide: bool) -> int:
    """The pipeline depth of a launch: ``STAGES``, or ``WIDE_STAGES`` with 64-bit row offsets."""
    return WIDE_STAGES if wide else STAGES


def launch(
    grid: tuple[int, int], seq: torch.Tensor, starts: torch.Tensor, lengths: torch.Tensor, cand: torch.Tensor,
    cand_user: torch.Tensor, gm: torch.Tensor, n: int, d: int, g_tot: int, splits: int, *, users_per_step: int,
    wide: bool, gdc: bool, dependent: bool = False, top2: bool = False,
):  # noqa: ANN201 (Triton's compiled kernel)
    """The packed scan over ``grid`` (blocks, splits); arguments as ``nn_select.scan_launch`` takes them, the
    configuration fixed (``usable``). ``gdc``: the refine pass will be this launch's programmatic dependent;
    ``dependent`` (with ``gdc``): this launch is the programmatic dependent of the kernel before it; ``top2``: the
    seconds and rows too (``gm`` holds 2 x ``g_tot`` per candidate)."""
    return _nn_scan_wgmma_kernel[grid](
        seq, starts, lengths, cand, cand_user, gm, n, d, g_tot, splits, seq.shape[0],
        BN=BLOCK_N, BS=TILE, U=users_per_step, STAGES=stages(wide), WIDE=wide, GDC=gdc,
        PREFETCH=PREFETCH and dependent and not wide, TOP2=top2, launch_pdl=gdc and dependent, num_warps=4,
        maxnreg=MAX_REGS,
    )  # fmt: skip
