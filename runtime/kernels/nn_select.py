"""Fused nearest-neighbour selection over int8 jagged user sequences (DESIGN §2.4 step 1, §4).

For each candidate ``c`` (mapped to user ``u = cand_user[c]``) return the ``k`` positions of
``seq[starts[u] : starts[u] + lengths[u]]`` with the largest cosine similarity to the candidate,
best first, equal scores broken by the larger (more recent) position; ``-1`` / ``-inf`` pad the
slots a short sequence cannot fill. The exact definition is ``transact.selection.nn_select_reference``.

GPU design (no (N, S) score matrix ever reaches memory):

* Scores and the tie rule are folded into one unique 64-bit key per (candidate, position):
  ``(order-preserving int32 of the fp32 score) << 32 | position``. Descending key order is exactly
  "score desc, then position desc", so every selection below is a plain top-k over distinct keys.
* Dequantisation cancels in the cosine. Row norms come from the int8 codes (exact). Pass 1 only
  bounds the selection, so it scores with integer tensor-core dots straight on the int8 codes: the
  normalised candidate as two int8 pieces, ``c ~= (254 a + b) / (127 * 254)`` (each element within
  ``0.5 / (127 * 254)``), two exact int32 dots, no conversion of the rows; the refine pass and the
  exact fallback score in fp32 (CUDA cores, or fp16 ``hi + lo`` tensor-core dots: int8 codes are
  exact in fp16).
* Two launches, both graph-capturable, neither waiting on the host:
  1. scan: each program owns a block of candidates and one chunk of every sequence they use
     (split over the sequence fills the GPU when there are few candidates) and keeps the maximum
     score of each of C disjoint groups of the chunk's rows (group j: rows j, j + C, j + 2C, ...);
     about 16 x k groups per candidate in all. A block whose candidates belong to several users scans
     one user per step, or (long chunks) 2 or 4 users side by side: their tiles go into one accumulator
     against each user's own candidates, so every score of the step is kept (on sm_90, for the usual
     configuration, ``nn_scan_wgmma``'s Gluon kernel does this step on the warp-group MMA: same maxima);
  2. refine, one program per candidate: the k-th largest group maximum is a lower bound of its k-th
     best score (at least k distinct positions reach it), so only the ~k groups whose maximum reaches
     it can hold a top-k row. Their rows (~1/16 of the sequence) are scored again on the CUDA cores
     and keys at or above the bound go to the candidate's list. Where the scan also kept each group's
     second largest score and the row of its largest (``TOP2``, ``use_top2``), a visited group whose
     second is below the bound gives that one row only: ~k rows scored again, not ~k groups' rows.
     The usual list, k keys and a few more, is ordered by one sort of 2K keys (K: k padded to a power
     of two); in a longer one each key's rank (the number of larger keys, counted chunk against chunk)
     is its output slot, so the top k land in order with no wide sort. A list that overflowed its
     capacity (long runs of exactly equal scores) is rebuilt by an exact full scan.
  No program keeps a running top-k while it scans, which is what made the earlier single-pass
  design slow: its per-tile merges were serial within each program. (The design before this one
  scanned the whole sequence twice, the second time to collect the keys above the bound.)
* Short sequences (the caller's ``max_len`` hint up to ``SHORT_MAX`` rows, e.g. the 100-row rt and
  impression sequences) take one launch instead: one program per candidate ranks all its keys.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from transact.selection import nn_select_reference

from . import interpreting, mma_sync_only, nn_scan_wgmma, sm_count

__all__ = ["nn_select", "nn_select_torch", "nn_select_reference", "NNSelectConfig"]

# Sentinel keys start at -2**63 (distinct offsets keep them distinct); every real key is at least
# (INT32_MIN + 1) << 32, so all sentinels sort below all real keys.
_BIG_USER = tl.constexpr(2**31 - 1)  # "no user": larger than any user index
_MAX_K = 256  # register budget of the (block_n, K) key tiles; the models use k <= 96
_MAX_D = 4096  # pass 1's int32 dots stay exact well beyond this (_scores_i8); the models' codes have D = 32
I8_SCALE = 127 * 254  # pass 1's candidate pieces: c ~= (254 a + b) / I8_SCALE, a and b int8
_I8_SCALE = tl.constexpr(I8_SCALE)
GROUPS_PER_K = 16  # group maxima per candidate, per top-k slot, at least (choose_config)
ROWS_PER_GROUP = 8  # rows per group, at most, where the tile allows (choose_config)
MAX_GROUPS = 8192  # group maxima per candidate, at most (the refine pass's registers and 16-bit counts)
GROUP_CAP = 4096  # group maxima per candidate choose_config takes, at most, where 16 x k_pad leave room
REFINE_ROWS = 256  # rows the refine pass scores per step
THRESHOLD_STEPS = 6  # three-way rounds in float space between the smallest and largest group maximum (_kth_group_max)
SHORT_MAX = 128  # sequences up to this many rows (by the caller's max_len) take the one-pass kernel
PACKED_MIN_STEPS = 8  # tiles per chunk from which a block's users are scanned side by side (choose_config)
# Where the refine pass is the scan's programmatic dependent (``dependent_launch``), a packed scan (2 or 4 users
# per step) is also the programmatic dependent of the kernel before it: its programs are placed as that kernel's last
# ones run (the refine pass signals at its start, so back-to-back selections overlap) and wait before reading
# anything. On the H100, selections back to back in a CUDA graph: 64 users x 16,000 rows 1.03x, x 100,000 1.016x
# (with the Gluon scan's prefetch); the one-user scan lost 0.5 % as a dependent and stays a plain launch
# (benchmarks/RESULTS.md, fifty-second session).
SCAN_DEPENDENT = True
# The scan also keeps each group's second largest score and the row of its largest, so that the refine pass scores
# one row of each visited group whose second cannot reach the top k instead of all of its rows (``_nn_refine_kernel``),
# where ``use_top2`` says it pays.
TOP2 = True


# --------------------------------------------------------------------------------------------
# Triton helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def _flip(bits):
    """The sign-magnitude to two's-complement flip of int32 float bits; its own inverse."""
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _ordered_bits(s):
    """fp32 -> int32 with the same order."""
    return _flip(s.to(tl.int32, bitcast=True))


@triton.jit
def _score_of(bits):
    """The inverse of ``_ordered_bits``: int32 -> the fp32 score."""
    return _flip(bits).to(tl.float32, bitcast=True)


@triton.jit
def _inv_norm(nrm2):
    """1 / sqrt(nrm2) of a candidate's squared norm; 0 for a zero candidate (it then scores 0)."""
    return tl.where(nrm2 > 0, 1.0 / tl.sqrt(tl.maximum(nrm2, 1e-30)), 0.0)


@triton.jit
def _load_cand_unit(cand_ptr, rows, row_ok, D, D_P: tl.constexpr):
    """Normalised candidates (BN, D_P) in fp32; a zero candidate stays zero (it scores 0)."""
    d = tl.arange(0, D_P)
    c = tl.load(
        cand_ptr + rows[:, None].to(tl.int64) * D + d[None, :],
        mask=row_ok[:, None] & (d[None, :] < D),
        other=0,
    ).to(tl.float32)
    return c * _inv_norm(tl.sum(c * c, axis=1))[:, None]


@triton.jit
def _load_cand_i8(cand_ptr, rows, row_ok, D, D_P: tl.constexpr):
    """Normalised candidates as two int8 pieces (a, b): 254 a + b is within 0.5 of 127 * 254 * c."""
    x = _load_cand_unit(cand_ptr, rows, row_ok, D, D_P) * 127.0  # |x| <= 127
    a = tl.floor(x + 0.5)
    b = tl.floor((x - a) * 254.0 + 0.5)  # x - a is exact and within [-0.5, 0.5]: |b| <= 127
    return a.to(tl.int8), b.to(tl.int8)


@triton.jit
def _load_cand_hi_lo(cand_ptr, rows, row_ok, D, D_P: tl.constexpr):
    """Normalised candidates as an fp16 (hi, lo) pair: hi + lo carries ~22 mantissa bits."""
    c = _load_cand_unit(cand_ptr, rows, row_ok, D, D_P)
    hi = c.to(tl.float16)
    lo = (c - hi.to(tl.float32)).to(tl.float16)
    return hi, lo


@triton.jit
def _load_masked(seq_ptr, start, p, p_ok, D, D_P: tl.constexpr):
    """int8 rows (R, D_P) of a user's sequence at positions ``p`` (R, 1) where ``p_ok`` (R, 1), else zeros."""
    d = tl.arange(0, D_P)
    return tl.load(seq_ptr + (start + p) * D + d[None, :], mask=p_ok & (d[None, :] < D), other=0)


@triton.jit
def _load_tile(seq_ptr, start, pos, pos_ok, D, D_P: tl.constexpr):
    """int8 rows (BS, D_P) of one tile of a user's sequence (zeros where masked)."""
    return _load_masked(seq_ptr, start, pos[:, None], pos_ok[:, None], D, D_P)


@triton.jit
def _load_rows(seq_ptr, start, pos, D, D_P: tl.constexpr):
    """int8 rows (R, D_P) at positions ``pos`` of a user's sequence, -1: no row (zeros). The mask is taken
    from the positions as the tile lays them out, so only the positions change layout."""
    p = pos[:, None]
    return _load_masked(seq_ptr, start, p, p >= 0, D, D_P)


@triton.jit
def _scores(q, c_hi, c_lo):
    """Cosine scores (BN, BS) fp32 of the candidates against int8 rows q (BS, D_P)."""
    qf = q.to(tl.float32)
    nrm2 = tl.sum(qf * qf, axis=1)  # exact: int8 codes
    inv = tl.where(nrm2 > 0, 1.0 / tl.sqrt(tl.maximum(nrm2, 1.0)), 0.0)  # a zero row scores 0
    qt = tl.trans(q.to(tl.float16))
    dot = tl.dot(c_hi, qt) + tl.dot(c_lo, qt)
    s = dot * inv[None, :]
    return tl.where(s == 0.0, 0.0, s)  # -0.0 and +0.0 must be the same score (ties by position)


@triton.jit
def _squares_of_bytes(w, ASM: tl.constexpr):
    """The sum of the squares of the four int8 in each int32 word w (exact): one ``dp4a`` per word on the
    GPU (ASM), four sign-extended products where inline PTX cannot run (the interpreter)."""
    if ASM:
        return tl.inline_asm_elementwise("dp4a.s32.s32 $0, $1, $1, 0;", "=r,r", [w], dtype=tl.int32,
                                         is_pure=True, pack=1)  # fmt: skip
    b0 = (w << 24) >> 24
    b1 = (w << 16) >> 24
    b2 = (w << 8) >> 24
    b3 = w >> 24
    return b0 * b0 + b1 * b1 + b2 * b2 + b3 * b3


@triton.jit
def _sq_norms_of_codes(q):
    """Squared norms (R,) of int8 rows q (R, D_P), exact in int32: every code widened and squared."""
    qi = q.to(tl.int32)
    return tl.sum(qi * qi, axis=1)


@triton.jit
def _sq_norms_of_words(seqw_ptr, start, pos, pos_ok, D, D_P: tl.constexpr, ASM: tl.constexpr):
    """Squared norms (R,) of the rows at ``pos``, exact in int32, from the rows read again as int32 words (D a
    multiple of 4, rows 4-byte aligned: ``seq_words``), four codes per ``dp4a``: in the packed scan the norms
    were ~40 % of the loop's instructions with the codes widened."""
    j = tl.arange(0, D_P // 4)
    w = tl.load(seqw_ptr + (start + pos[:, None]) * (D // 4) + j[None, :],
                mask=pos_ok[:, None] & (j[None, :] < D // 4), other=0)  # fmt: skip
    return tl.sum(_squares_of_bytes(w, ASM), axis=1)


@triton.jit
def _scan_scale(nrm2):
    """Pass 1's scale of int8 rows of squared norms nrm2 (exact): 1 / (I8_SCALE * the row norm); 0 for a zero
    row. The approximate rsqrt (CUDA's rsqrtf: within 2 ulp, a relative 2**-22), not a rounded division by a
    rounded square root (a slow-path branch per row block): pass 1 only bounds scores, and ``scan_error``
    allows for it."""
    return tl.where(nrm2 > 0, (1.0 / _I8_SCALE) * tl.math.rsqrt(tl.maximum(nrm2, 1).to(tl.float32)), 0.0)


@triton.jit
def _scores_i8(q, inv, pos_ok, c_a, c_b):
    """Pass 1's scores (BN, BS) fp32 of the candidates' int8 pieces against int8 rows q (BS, D_P) with
    scales ``inv`` (``_scan_scale``), -inf at positions not ``pos_ok``: within ``scan_error(D)`` of the
    exact cosine. Integer dots on the codes as loaded, exact in int32. A zero score is +0.0, never -0.0:
    the int32 zero converts to +0.0 and the row's inverse norm is >= 0, so scores order as their ordered
    bits do."""
    qt = tl.trans(q)
    # 254 a.q + b.q, exact in int32: |a_i| <= 127 |c_i| + 0.5 and sum |c_i| <= sqrt(D) for a unit c, so
    # |254 a.q| <= 254 * 127 * (127 sqrt(D) + D / 2) < 2**31 for D up to ~16,000 (_MAX_D is 4,096).
    dot = tl.dot(c_b, qt, acc=tl.dot(c_a, qt, out_dtype=tl.int32) * 254, out_dtype=tl.int32)
    # Adding 0 leaves dot * inv as it is (one rounding, fused or not); adding -inf masks the position.
    return dot.to(tl.float32) * inv[None, :] + tl.where(pos_ok, 0.0, float("-inf"))[None, :]


@triton.jit
def _group_max_bits(gmax):
    """Group maxima kept in fp32 (-inf: no row) as the ordered int32 bits the refine pass reads; no row
    at all is -2**31, below every score's bits."""
    return tl.where(gmax == float("-inf"), -(2**31), _ordered_bits(gmax))


@triton.jit
def _tile_scores(seq_ptr, start, pos, pos_ok, c_hi, c_lo, D, D_P: tl.constexpr):
    """Cosine scores (BN, BS) fp32 of the candidates against one tile of a user's sequence."""
    return _scores(_load_tile(seq_ptr, start, pos, pos_ok, D, D_P), c_hi, c_lo)


@triton.jit
def _row_start(starts_ptr, u, WIDE: tl.constexpr):
    """User u's first row in the type of the rows' offsets: int64 where they may pass 2**31 - 1 (WIDE, from
    the sequence's size: ``wide_offsets``), else int32. 32-bit offsets cut the packed scan's step from 386
    to 356 instructions (sm_90)."""
    start = tl.load(starts_ptr + u)
    if WIDE:
        start = start.to(tl.int64)
    else:
        start = start.to(tl.int32)
    return start


@triton.jit
def _user_chunk(starts_ptr, lengths_ptr, u, split, SPLITS, BS: tl.constexpr, WIDE: tl.constexpr):
    """Rows [p_lo, p_hi) of user u handled by this split; chunk sizes are whole tiles. No rows for
    u = _BIG_USER (no user)."""
    some = u < _BIG_USER
    i = tl.where(some, u, 0)  # a block has a candidate, so user 0 exists
    start = _row_start(starts_ptr, i, WIDE)
    length = tl.where(some, tl.load(lengths_ptr + i).to(tl.int32), 0)
    chunk = tl.cdiv(tl.cdiv(length, SPLITS), BS) * BS
    p_lo = split * chunk
    p_hi = tl.minimum(length, p_lo + chunk)
    return start, p_lo, p_hi


@triton.jit
def _next_user(users, u):
    """The smallest user of the block above u; _BIG_USER: none."""
    return tl.min(tl.where(users > u, users, _BIG_USER), axis=0)


@triton.jit
def _user_after(users, u, starts_ptr, lengths_ptr, split, SPLITS, BS: tl.constexpr, WIDE: tl.constexpr):
    """The smallest user of the block above u (_BIG_USER: none) and its chunk, as ``_user_chunk``."""
    u_a = _next_user(users, u)
    start, p_lo, p_hi = _user_chunk(starts_ptr, lengths_ptr, u_a, split, SPLITS, BS, WIDE)
    return u_a, start, p_lo, p_hi


@triton.jit
def _scan_block(cand_ptr, user_ptr, N, D, BN: tl.constexpr, D_P: tl.constexpr):
    """Pass 1's block of candidates (program axis 0): rows, which exist, their users (_BIG_USER: none) and
    their int8 pieces."""
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    row_ok = rows < N
    users = tl.load(user_ptr + rows, mask=row_ok, other=_BIG_USER).to(tl.int32)
    c_a, c_b = _load_cand_i8(cand_ptr, rows, row_ok, D, D_P)
    return rows, row_ok, users, c_a, c_b


@triton.jit
def _fold_tile(gmax, s, keep, BN: tl.constexpr, BS: tl.constexpr, C: tl.constexpr):
    """Group maxima (BN, C) updated with a tile's scores (BN, BS), for the candidates ``keep`` only (masked
    after the group max, on C columns, not BS)."""
    tile_max = tl.max(tl.reshape(s, (BN, BS // C, C)), axis=1)
    return tl.maximum(gmax, tl.where(keep[:, None], tile_max, float("-inf")))


@triton.jit
def _fold_tile_top2(gmax, g2, garg, s, keep, r0, BN: tl.constexpr, BS: tl.constexpr, C: tl.constexpr):
    """``_fold_tile`` that also keeps each group's second largest score ``g2`` and the row of its largest
    ``garg`` (row r of group j: chunk position j + C r; ``r0`` is the tile's first). Equal maxima make the
    second equal to the first."""
    if BS == C:
        m1 = tl.where(keep[:, None], s, float("-inf"))
        garg = tl.where(m1 > gmax, r0, garg)
        g2 = tl.maximum(g2, tl.minimum(gmax, m1))
    else:
        v = tl.reshape(s, (BN, BS // C, C))
        m1, i = tl.max(v, axis=1, return_indices=True)
        sub = tl.arange(0, BS // C)
        m2 = tl.max(tl.where(sub[None, :, None] == i[:, None, :], float("-inf"), v), axis=1)
        m1 = tl.where(keep[:, None], m1, float("-inf"))
        m2 = tl.where(keep[:, None], m2, float("-inf"))
        garg = tl.where(m1 > gmax, r0 + i, garg)
        g2 = tl.maximum(tl.maximum(g2, m2), tl.minimum(gmax, m1))
    return tl.maximum(gmax, m1), g2, garg


@triton.jit
def _second_and_row(g2, garg):
    """Second maxima and rows of the maxima packed in one int32 for the refine pass: the second's ordered bits
    rounded up to a multiple of 2**16 in the upper half (so a bound from above, -2**31 for none), the row in
    the lower half (rows below 2**16: ``use_top2``)."""
    bits = _group_max_bits(g2)
    hi = (bits >> 16) + ((bits & 0xFFFF) != 0).to(tl.int32)
    return (hi << 16) | (garg & 0xFFFF)


@triton.jit
def _store_group_maxima(gm_ptr, gmax, rows, row_ok, split, STRIDE, C: tl.constexpr):
    """Write a block's group maxima of this split as the ordered bits the refine pass reads (``STRIDE``: the
    length of a candidate's row of ``gm``, G_TOT); returns where they went."""
    g = tl.arange(0, C)
    ptrs = gm_ptr + rows[:, None].to(tl.int64) * STRIDE + split * C + g[None, :]
    tl.store(ptrs, _group_max_bits(gmax), mask=row_ok[:, None])
    return ptrs


@triton.jit
def _store_scan(gm_ptr, gmax, g2, garg, rows, row_ok, split, G_TOT, C: tl.constexpr, TOP2: tl.constexpr):
    """A scan's output for a block and split: its group maxima (``_store_group_maxima``) or, with ``TOP2``, a
    candidate's row of ``gm`` holding its G_TOT maxima, then G_TOT packed seconds and rows (``_second_and_row``)."""
    if TOP2:
        ptrs = _store_group_maxima(gm_ptr, gmax, rows, row_ok, split, 2 * G_TOT, C)
        tl.store(ptrs + G_TOT, _second_and_row(g2, garg), mask=row_ok[:, None])
    else:
        _store_group_maxima(gm_ptr, gmax, rows, row_ok, split, G_TOT, C)


@triton.jit
def _merge_keys(buf, key, K: tl.constexpr, M_BULK: tl.constexpr):
    """Running top-K set ``buf`` (BN, K) of distinct keys, merged with a tile of distinct keys.

    Both tensors hold distinct values (sentinels included). Keys not above the current minimum
    of ``buf`` can never enter it; if many rows have many such keys, the bitonic top-K of
    sorted(buf, desc) and sorted(key, asc) does it in one go, else one insertion per key.
    """
    SENT_TOP: tl.constexpr = -(2**63) + 4 * K  # every sentinel used here is below it
    col = tl.arange(0, K).to(tl.int64)
    # A row with nothing yet (first tile of a chunk) takes the tile as it is: no sort needed.
    empty = tl.max(buf, axis=1) <= SENT_TOP
    buf = tl.where(empty[:, None], tl.where(key > SENT_TOP, key, -(2**63) + col[None, :]), buf)
    key = tl.where(empty[:, None], -(2**63) + K + col[None, :], key)
    bmin = tl.min(buf, axis=1)
    thr = tl.maximum(bmin, SENT_TOP)
    cnt = tl.sum((key > thr[:, None]).to(tl.int32), axis=1)
    if tl.max(cnt, axis=0) > M_BULK:
        buf = tl.maximum(tl.sort(buf, descending=True), tl.sort(key))
        # Tile sentinels may have entered; give buf's sentinels back their own distinct values.
        buf = tl.where(buf > SENT_TOP, buf, -(2**63) + col[None, :])
    else:
        best = tl.max(key, axis=1)
        need = best > thr
        go = tl.max(need.to(tl.int32), axis=0)
        while go > 0:
            slot = need[:, None] & (buf == bmin[:, None])
            buf = tl.where(slot, best[:, None], buf)
            key = tl.where(key == best[:, None], -(2**63), key)
            bmin = tl.min(buf, axis=1)
            thr = tl.maximum(bmin, SENT_TOP)
            best = tl.max(key, axis=1)
            need = best > thr
            go = tl.max(need.to(tl.int32), axis=0)
    return buf


@triton.jit
def _store_keys(buf, rows, row_ok, idx_ptr, score_ptr, k, W: tl.constexpr):
    """Decode keys sorted in descending order, (BN, W), into (position, score); write the first k."""
    col = tl.arange(0, W)
    hi = (buf >> 32).to(tl.int32)
    valid = hi > -(2**31)
    score = tl.where(valid, _score_of(hi), float("-inf"))
    pos = tl.where(valid, (buf & 0xFFFFFFFF).to(tl.int32), -1)
    offs = rows[:, None].to(tl.int64) * k + col[None, :]
    m = row_ok[:, None] & (col[None, :] < k)
    tl.store(idx_ptr + offs, pos.to(idx_ptr.dtype.element_ty), mask=m)
    tl.store(score_ptr + offs, score, mask=m)


@triton.jit
def _store_sorted(buf, rows, row_ok, idx_ptr, score_ptr, k, K: tl.constexpr):
    """Sort the top-K set and write its first k columns."""
    _store_keys(tl.sort(buf, descending=True), rows, row_ok, idx_ptr, score_ptr, k, K)


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _nn_scan_kernel(
    seq_ptr,
    starts_ptr,
    lengths_ptr,
    cand_ptr,
    user_ptr,
    gm_ptr,
    N,
    D,
    G_TOT,
    SPLITS,
    BN: tl.constexpr,
    BS: tl.constexpr,
    C: tl.constexpr,
    D_P: tl.constexpr,
    WIDE: tl.constexpr,
    GDC: tl.constexpr,
    TOP2: tl.constexpr = False,
):
    """Pass 1: one chunk of every sequence a block of candidates uses, in tiles of BS positions; the
    max score of each of C column groups of the chunk (group j: the positions p_lo + j + C * r); with
    ``TOP2`` also each group's second largest score and the row r of its largest (``_store_scan``)."""
    if GDC:  # the refine pass's primary (a plain launch itself: SCAN_DEPENDENT takes only the packed scans)
        tl.extra.cuda.gdc_launch_dependents()  # see _nn_refine_kernel
    split = tl.program_id(1)
    rows, row_ok, users, c_a, c_b = _scan_block(cand_ptr, user_ptr, N, D, BN, D_P)
    # Group maxima in fp32 (the scores' own order; max and masks cost one instruction each), turned
    # into ordered bits once at the end.
    gmax = tl.full((BN, C), float("-inf"), tl.float32)
    g2 = tl.full((BN, C), float("-inf"), tl.float32)
    garg = tl.zeros((BN, C), tl.int32)
    r0 = tl.zeros((), tl.int32)  # the tile's first row of its groups
    # Each distinct user of the block once (fast when candidates are grouped), its chunk tile by tile,
    # as one stream of steps: the next step's tile is in flight while one is scored, also where the
    # next step is the next user's first tile (a block of 16 candidates over 4 users would otherwise
    # wait for four first tiles). ``_a`` names the user after this one.
    ar = tl.arange(0, BS)
    u = tl.min(users, axis=0)
    start, p0, p_hi = _user_chunk(starts_ptr, lengths_ptr, u, split, SPLITS, BS, WIDE)
    u_a, start_a, p0_a, p_hi_a = _user_after(users, u, starts_ptr, lengths_ptr, split, SPLITS, BS, WIDE)
    q = _load_tile(seq_ptr, start, p0 + ar, p0 + ar < p_hi, D, D_P)
    while u < _BIG_USER:
        last = p0 + BS >= p_hi  # this user's last tile (or an empty chunk: one step, all masked)
        u_n = tl.where(last, u_a, u)
        start_n = tl.where(last, start_a, start)
        p0_n = tl.where(last, p0_a, p0 + BS)
        p_hi_n = tl.where(last, p_hi_a, p_hi)
        q_n = _load_tile(seq_ptr, start_n, p0_n + ar, p0_n + ar < p_hi_n, D, D_P)  # in flight meanwhile
        # Norms from the widened codes: here (rows loaded to registers, not to shared memory) the words cost
        # more instructions than they save (Triton 3.6, sm_90: 242 in the loop against 206).
        ok = p0 + ar < p_hi
        inv = _scan_scale(_sq_norms_of_codes(q))
        s = _scores_i8(q, inv, ok, c_a, c_b)
        if TOP2:
            gmax, g2, garg = _fold_tile_top2(gmax, g2, garg, s, users == u, r0, BN, BS, C)
            r0 = tl.where(last, 0, r0 + BS // C)
        else:
            gmax = _fold_tile(gmax, s, users == u, BN, BS, C)
        if last:
            u_a, start_a, p0_a, p_hi_a = _user_after(users, u_n, starts_ptr, lengths_ptr, split, SPLITS, BS,
                                                     WIDE)  # fmt: skip
        u, start, p0, p_hi, q = u_n, start_n, p0_n, p_hi_n, q_n
    _store_scan(gm_ptr, gmax, g2, garg, rows, row_ok, split, G_TOT, C, TOP2)


@triton.jit
def _slot(users, c_a, c_b, prev, starts_ptr, lengths_ptr, split, SPLITS, BS: tl.constexpr, WIDE: tl.constexpr):
    """The smallest user of the block above ``prev`` (_BIG_USER: none), its chunk, which candidates are
    its own and their int8 pieces (zeros in the other candidates' rows)."""
    u, start, p_lo, p_hi = _user_after(users, prev, starts_ptr, lengths_ptr, split, SPLITS, BS, WIDE)
    own = users == u
    return u, start, p_lo, p_hi, own, tl.where(own[:, None], c_a, 0), tl.where(own[:, None], c_b, 0)


@triton.jit
def _slot_step(seq_ptr, seqw_ptr, start, pos, p_hi, a, b, acc_a, acc_b, D, D_P: tl.constexpr, WORDS: tl.constexpr,
               ASM: tl.constexpr):  # fmt: skip
    """One slot of a packed step: its user's rows at ``pos`` (BS,) scored into the accumulators, and the
    rows' scales: the inverse norm (over ``I8_SCALE``), -1 where there is no row."""
    ok = pos < p_hi
    q = _load_tile(seq_ptr, start, pos, ok, D, D_P)
    if WORDS:
        inv = _scan_scale(_sq_norms_of_words(seqw_ptr, start, pos, ok, D, D_P, ASM))
    else:
        inv = _scan_scale(_sq_norms_of_codes(q))
    qt = tl.trans(q)
    acc_a = tl.dot(a, qt, acc=acc_a, out_dtype=tl.int32)
    acc_b = tl.dot(b, qt, acc=acc_b, out_dtype=tl.int32)
    return tl.where(ok, inv, -1.0), acc_a, acc_b


@triton.jit
def _nn_scan_packed_kernel(
    seq_ptr,
    seqw_ptr,
    starts_ptr,
    lengths_ptr,
    cand_ptr,
    user_ptr,
    gm_ptr,
    N,
    D,
    G_TOT,
    SPLITS,
    BN: tl.constexpr,
    BS: tl.constexpr,
    C: tl.constexpr,
    U: tl.constexpr,
    D_P: tl.constexpr,
    WORDS: tl.constexpr,
    ASM: tl.constexpr,
    WIDE: tl.constexpr,
    GDC: tl.constexpr,
    TOP2: tl.constexpr = False,
):
    """Pass 1 for blocks whose candidates belong to several users: ``_nn_scan_kernel``'s group maxima,
    U (2 or 4) users per step. A step scores the same BS positions of U users' chunks: each user's rows
    against its own candidates' int8 pieces (zeros in the other rows), all into one (BN, BS) accumulator,
    so each score of the step is a candidate against its own user's row. (The one-user scan scales, masks
    and reduces all BN x BS scores once per user and keeps only that user's candidates' rows of them.)"""
    if GDC:  # the refine pass's primary, and the dependent of the kernel before (SCAN_DEPENDENT)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    split = tl.program_id(1)
    rows, row_ok, users, c_a, c_b = _scan_block(cand_ptr, user_ptr, N, D, BN, D_P)
    gmax = tl.full((BN, C), float("-inf"), tl.float32)
    g2 = tl.full((BN, C), float("-inf"), tl.float32)
    garg = tl.zeros((BN, C), tl.int32)
    ar = tl.arange(0, BS)
    zero = tl.zeros((BN, BS), tl.int32)
    last = tl.full((), -1, tl.int32)
    while _next_user(users, last) < _BIG_USER:
        # The next U users of the block (_BIG_USER: none; its chunk is empty and owns no candidate).
        u0, st0, lo0, hi0, own0, a0, b0 = _slot(users, c_a, c_b, last, starts_ptr, lengths_ptr, split, SPLITS, BS,
                                                WIDE)  # fmt: skip
        u1, st1, lo1, hi1, own1, a1, b1 = _slot(users, c_a, c_b, u0, starts_ptr, lengths_ptr, split, SPLITS, BS,
                                                WIDE)  # fmt: skip
        span = tl.maximum(tl.maximum(hi0 - lo0, hi1 - lo1), 0)
        tail = tl.minimum(hi0 - lo0, tl.where(u1 < _BIG_USER, hi1 - lo1, 2**30))
        mine = own0 | own1
        last = u1
        if U == 4:
            u2, st2, lo2, hi2, own2, a2, b2 = _slot(users, c_a, c_b, u1, starts_ptr, lengths_ptr, split, SPLITS,
                                                    BS, WIDE)  # fmt: skip
            u3, st3, lo3, hi3, own3, a3, b3 = _slot(users, c_a, c_b, u2, starts_ptr, lengths_ptr, split, SPLITS,
                                                    BS, WIDE)  # fmt: skip
            span = tl.maximum(span, tl.maximum(hi2 - lo2, hi3 - lo3))
            tail = tl.minimum(tail, tl.minimum(tl.where(u2 < _BIG_USER, hi2 - lo2, 2**30),
                                               tl.where(u3 < _BIG_USER, hi3 - lo3, 2**30)))  # fmt: skip
            mine = mine | own2 | own3
            last = u3
        full_steps = tl.maximum(tail, 0) // BS  # steps before any used slot reaches the end of its chunk
        # Each candidate's row scales come from its user's slot: one gather from the U slots' scales joined,
        # not U - 1 selects. Each select broadcast one slot's (BS,) scales into the accumulator's layout, a
        # layout conversion through shared memory with its own barriers (8 -> 2 per 4-user step on sm_90);
        # measured on H200, selections identical: 64 users x 100,000 1.05-1.06x, 64 x 16,000 1.01x.
        if U == 4:
            slot_of = tl.where(own1, 1, tl.where(own2, 2, tl.where(own3, 3, 0)))
        else:
            slot_of = tl.where(own1, 1, 0)
        slot_idx = slot_of[:, None] + tl.zeros((BN, BS), tl.int32)
        for t in range(0, tl.cdiv(span, BS)):
            off = t * BS + ar
            inv0, acc_a, acc_b = _slot_step(seq_ptr, seqw_ptr, st0, lo0 + off, hi0, a0, b0,
                                            zero, zero, D, D_P, WORDS, ASM)
            inv1, acc_a, acc_b = _slot_step(seq_ptr, seqw_ptr, st1, lo1 + off, hi1, a1, b1,
                                            acc_a, acc_b, D, D_P, WORDS, ASM)
            if U == 4:
                inv2, acc_a, acc_b = _slot_step(seq_ptr, seqw_ptr, st2, lo2 + off, hi2, a2, b2,
                                                acc_a, acc_b, D, D_P, WORDS, ASM)
                inv3, acc_a, acc_b = _slot_step(seq_ptr, seqw_ptr, st3, lo3 + off, hi3, a3, b3,
                                                acc_a, acc_b, D, D_P, WORDS, ASM)
                inv = tl.trans(tl.reshape(tl.join(tl.join(inv0, inv2), tl.join(inv1, inv3)), (BS, 4)))
                scale = tl.gather(inv, slot_idx, axis=0)
            else:
                inv = tl.trans(tl.join(inv0, inv1))
                scale = tl.gather(inv, slot_idx, axis=0)
            # Each candidate's pieces are zero in the other users' slots: the sums are its own exact dot.
            s = (acc_a * 254 + acc_b).to(tl.float32) * scale
            if t >= full_steps:  # a chunk ends in this step: positions past it (scale -1) score -inf
                s = tl.where(scale < 0, float("-inf"), s)
            if TOP2:
                gmax, g2, garg = _fold_tile_top2(gmax, g2, garg, s, mine, t * (BS // C), BN, BS, C)
            else:
                gmax = _fold_tile(gmax, s, mine, BN, BS, C)
    _store_scan(gm_ptr, gmax, g2, garg, rows, row_ok, split, G_TOT, C, TOP2)


@triton.jit
def _keys_of(q, pos, ok, c):
    """Keys of one candidate (c: normalised, fp32, (D_P,)) against int8 rows q (R, D_P) at positions
    ``pos``; INT64_MIN where not ``ok``. Scores in fp32 on the CUDA cores."""
    qf = q.to(tl.float32)
    nrm2 = tl.sum(qf * qf, axis=1)  # exact: int8 codes
    inv = tl.where(nrm2 > 0, 1.0 / tl.sqrt(tl.maximum(nrm2, 1.0)), 0.0)
    s = tl.sum(qf * c[None, :], axis=1) * inv
    s = tl.where(s == 0.0, 0.0, s)  # -0.0 and +0.0 are the same score
    key = (_ordered_bits(s).to(tl.int64) << 32) | pos.to(tl.int64)
    return tl.where(ok, key, -(2**63))


@triton.jit
def _row_keys(seq_ptr, start, p0, length, c, D, W: tl.constexpr, D_P: tl.constexpr):
    """Keys (W,) of one candidate against rows [p0, p0 + W) of its sequence."""
    pos = p0 + tl.arange(0, W)
    ok = pos < length
    return _keys_of(_load_tile(seq_ptr, start, pos, ok, D, D_P), pos, ok, c)


@triton.jit
def _load_cand_row(cand_ptr, row, D, D_P: tl.constexpr):
    """Candidate ``row`` normalised in fp32, (D_P,); a zero candidate stays zero (it scores 0)."""
    d = tl.arange(0, D_P)
    c = tl.load(cand_ptr + row.to(tl.int64) * D + d, mask=d < D, other=0).to(tl.float32)
    return c * _inv_norm(tl.sum(c * c, axis=0))


@triton.jit
def _store_ranked(key, rank, row, idx_ptr, score_ptr, k):
    """Write each real key whose rank (number of larger keys) is below k into slot ``rank``."""
    ok = (key > -(2**63)) & (rank < k)
    offs = row.to(tl.int64) * k + rank
    tl.store(idx_ptr + offs, (key & 0xFFFFFFFF).to(idx_ptr.dtype.element_ty), mask=ok)
    tl.store(score_ptr + offs, _score_of((key >> 32).to(tl.int32)), mask=ok)


@triton.jit
def _store_empty(row, n_real, idx_ptr, score_ptr, k, K: tl.constexpr):
    """-1 / -inf in the slots [n_real, k) that no key fills."""
    slot = tl.arange(0, K)
    m = (slot >= n_real) & (slot < k)
    offs = row.to(tl.int64) * k + slot
    tl.store(idx_ptr + offs, tl.full((K,), -1, tl.int32).to(idx_ptr.dtype.element_ty), mask=m)
    tl.store(score_ptr + offs, tl.full((K,), float("-inf"), tl.float32), mask=m)


@triton.jit
def _nn_short_kernel(
    seq_ptr,
    starts_ptr,
    lengths_ptr,
    cand_ptr,
    user_ptr,
    idx_ptr,
    score_ptr,
    D,
    k,
    W: tl.constexpr,
    K: tl.constexpr,
    D_P: tl.constexpr,
    WIDE: tl.constexpr,
):
    """One program per candidate, one pass for short sequences: the keys of the whole sequence (one
    W-row tile when the caller's bound holds) and each key's rank among them; no sort.

    A sequence longer than W (a wrong hint) is ranked tile against tile, recomputing the other
    tile's keys: slow, exact."""
    row = tl.program_id(0)
    u = tl.load(user_ptr + row)
    start = _row_start(starts_ptr, u, WIDE)
    length = tl.load(lengths_ptr + u).to(tl.int32)
    c = _load_cand_row(cand_ptr, row, D, D_P)
    _store_empty(row, length, idx_ptr, score_ptr, k, K)
    for p0 in range(0, length, W):
        mine = _row_keys(seq_ptr, start, p0, length, c, D, W, D_P)
        rank = tl.zeros((W,), tl.int32)
        for p1 in range(0, length, W):
            if p1 == p0:
                other = mine
            else:
                other = _row_keys(seq_ptr, start, p1, length, c, D, W, D_P)
            rank += tl.sum((other[None, :] > mine[:, None]).to(tl.int32), axis=1)
        _store_ranked(mine, rank, row, idx_ptr, score_ptr, k)


@triton.jit
def _min_max_count(lo_a, hi_a, n_a, lo_b, hi_b, n_b):
    """Combine of one reduction for the smallest, the largest and a count."""
    return tl.minimum(lo_a, lo_b), tl.maximum(hi_a, hi_b), n_a + n_b


@triton.jit
def _kth_group_max(gm_ptr, row, k, G_TOT, STRIDE, G_P: tl.constexpr, STEPS: tl.constexpr):
    """A lower bound T of the k-th largest of a candidate's group maxima (ordered int32, as an int64)
    with at least k maxima >= T: a search in float space between the smallest and largest maximum,
    then up to the smallest maximum at or above the bound. So T is one of the maxima, below the k-th
    largest by less than (max - min) / 3**STEPS, the exact k-th once that is below their spacing (a
    few more groups pass, nothing is lost). INT32_MIN when fewer than k groups are non-empty (no
    threshold).

    Each round splits the bracket in three and counts the maxima at both inner points in one
    block-wide sum (two 16-bit counts packed in an int32; G_P <= MAX_GROUPS < 2**16): those sums are
    the refine pass's longest dependent chain, so the smallest and largest maximum and the count of
    non-empty groups come from one reduction too (23 barriers in the search instead of 29; against three
    reductions 0.99-1.02x on H200, within the noise: kept for the barriers). The maxima are cosines
    spread over a range of about 1, which 6 rounds resolve to ~1.4e-3: the few more groups that then
    pass cost less than two more rounds (measured on H200, selections identical: 6 rounds against 8, 1 user x 16,000
    rows top-64 1.03x, top-96 1.02x, 64 users 1.01x, 64 users x 100,000 1.01x; 5 rounds 1.00-1.03x, 4
    0.99-1.01x, 3 0.80-0.96x). Five-way rounds (four counts in an int64, 4 rounds) measured 0.96-0.99x:
    the counts' arithmetic per maximum grew more than the sums fell. (``STRIDE``: the row length of ``gm``.)"""
    g = tl.arange(0, G_P)
    gm = tl.load(gm_ptr + row.to(tl.int64) * STRIDE + g, mask=g < G_TOT, other=-(2**31))
    real = gm > -(2**31)
    gf = tl.where(real, _score_of(gm), float("-inf"))
    # lo <= the k-th largest <= hi throughout
    lo, hi, n_real = tl.reduce((tl.where(real, gf, float("inf")), gf, real.to(tl.int32)), 0, _min_max_count)
    for _ in tl.static_range(STEPS):
        t1 = lo + (hi - lo) * (1.0 / 3.0)
        t2 = lo + (hi - lo) * (2.0 / 3.0)
        both = tl.sum((gf >= t1).to(tl.int32) + ((gf >= t2).to(tl.int32) << 16), axis=0)
        above_t2 = (both >> 16) >= k
        above_t1 = (both & 0xFFFF) >= k
        lo = tl.where(above_t2, t2, tl.where(above_t1, t1, lo))
        hi = tl.where(above_t2, hi, tl.where(above_t1, t2, t1))
    lo = tl.min(tl.where(gf >= lo, gf, float("inf")), axis=0)  # as many maxima reach it
    lo = tl.where(n_real >= k, _ordered_bits(lo), -(2**31)).to(tl.int64)
    return gm, real, lo


@triton.jit
def _below(bits, margin):
    """Ordered int32 of (the score whose ordered int32 is ``bits``) - margin."""
    return _ordered_bits(_score_of(bits) - margin)


@triton.jit
def _sort_list(keys_base, cnt, row, idx_ptr, score_ptr, k, W: tl.constexpr):
    """The top k of a list of at most W distinct keys, best first, by one sort (padding sorts last
    and decodes to -1 / -inf)."""
    j = tl.arange(0, W)
    lst = tl.load(keys_base + j, mask=j < cnt, other=-(2**63))
    one = tl.zeros((1,), tl.int32)
    _store_keys(tl.sort(lst, descending=True)[None, :], row + one, one == 0, idx_ptr, score_ptr, k, W)


@triton.jit
def _rank_list(keys_base, cnt, row, idx_ptr, score_ptr, k, K: tl.constexpr, CH: tl.constexpr):
    """The top k of a list of ``cnt`` distinct keys, best first: each key's rank is the number of
    larger keys (counted chunk against chunk), keys ranked below k go straight to their slot."""
    _store_empty(row, cnt, idx_ptr, score_ptr, k, K)
    j = tl.arange(0, CH)
    for c0 in range(0, cnt, CH):
        mine = tl.load(keys_base + c0 + j, mask=c0 + j < cnt, other=-(2**63))
        rank = tl.zeros((CH,), tl.int32)
        for c1 in range(0, cnt, CH):
            other = tl.load(keys_base + c1 + j, mask=c1 + j < cnt, other=-(2**63))
            rank += tl.sum((other[None, :] > mine[:, None]).to(tl.int32), axis=1)
        _store_ranked(mine, rank, row, idx_ptr, score_ptr, k)


@triton.jit
def _exact_scan(seq_ptr, start, length, cand_ptr, row, zero, idx_ptr, score_ptr, D, k,
                K: tl.constexpr, D_P: tl.constexpr, M_BULK: tl.constexpr):  # fmt: skip
    """The top k of a candidate over its whole sequence with a running top-K set: the rare exact
    path for key lists that overflowed (long runs of equal scores defeat the threshold)."""
    col = tl.arange(0, K)
    if zero:
        # A zero candidate scores exactly 0 against every row (see _load_cand_hi_lo), so the tie
        # rule alone decides: the newest k positions. Items without an embedding look like this,
        # and the full scan below, one program's serial pass, costs far more (~5 ms at 16,000
        # positions when it still went oldest tile first).
        pos = length - 1 - col
        ok = pos >= 0
        offs = row.to(tl.int64) * k + col
        tl.store(idx_ptr + offs, tl.where(ok, pos, -1).to(idx_ptr.dtype.element_ty), mask=col < k)
        tl.store(score_ptr + offs, tl.where(ok, 0.0, float("-inf")), mask=col < k)
    else:
        # A block of 16 rows with only this candidate live (the tile scores need 16-row dots).
        rows = row + tl.arange(0, 16)
        live = tl.arange(0, 16) == 0
        buf = tl.full((16, K), -(2**63), tl.int64) + col[None, :]  # distinct sentinels
        tile_sent = tl.full((16, K), -(2**63) + K, tl.int64) + col[None, :]
        c_hi, c_lo = _load_cand_hi_lo(cand_ptr, rows, live, D, D_P)
        # Newest tile first: a run of equal scores (what overflows a list) then fills the set with
        # its newest positions, which win the tie, and every older copy falls below the set's
        # minimum, a cheap rejection, instead of displacing the set tile after tile by a sort.
        n_tiles = tl.cdiv(length, K)
        for t in range(0, n_tiles):
            pos = (n_tiles - 1 - t) * K + col
            pos_ok = pos < length
            s = _tile_scores(seq_ptr, start, pos, pos_ok, c_hi, c_lo, D, D_P)
            key = (_ordered_bits(s).to(tl.int64) << 32) | pos[None, :].to(tl.int64)
            key = tl.where(live[:, None] & pos_ok[None, :], key, tile_sent)
            buf = _merge_keys(buf, key, K, M_BULK)
        _store_sorted(buf, rows, live, idx_ptr, score_ptr, k, K)


@triton.jit
def _visited_rows(gid_base, slot, r, in_range, chunk, length, C: tl.constexpr):
    """Positions of row ``r`` of the visited groups in slots ``slot`` (of the packed group ids), -1 where
    there is no such row; group j of a chunk holds rows p_lo + j + C * r. (One tensor, not positions and a
    mask: each vector the rows' tile needs in its own layout is one conversion through shared memory.)"""
    grp = tl.load(gid_base + slot, mask=in_range, other=0)
    split = grp // C
    pos = split * chunk + grp % C + r * C
    return tl.where(in_range & (pos < tl.minimum(length, split * chunk + chunk)), pos, -1)


@triton.jit
def _advance(slot, r, q_step, r_step, rows_per_group):
    """(group slot, row) of flat row f + R from those of f, where R = q_step * rows_per_group + r_step:
    an add and a carry instead of a division per step (r stays below rows_per_group)."""
    r = r + r_step
    wrap = r >= rows_per_group
    return slot + q_step + wrap.to(tl.int32), tl.where(wrap, r - rows_per_group, r)


@triton.jit
def _keep_keys(q, pos, c, key_floor, keys_base, n_keys, CAP):
    """Append the keys >= key_floor of rows q (positions ``pos``, -1: no row) to the list at ``keys_base``
    that holds ``n_keys``; its new length (past CAP: what does not fit is dropped, the exact scan takes
    over)."""
    key = _keys_of(q, pos, pos >= 0, c)
    take = (key > -(2**63)) & (key >= key_floor)  # a real key is above INT64_MIN, the floor may be it
    # The count is the prefix sum's largest value, not a sum of its own: that would compute ``take`` a second
    # time in the rows' layout, and the key with it, where the scan needs it in its own.
    taken = tl.cumsum(take.to(tl.int32), axis=0)
    slot = n_keys + taken - 1
    tl.store(keys_base + slot, key, mask=take & (slot < CAP))
    return n_keys + tl.max(taken, axis=0)


@triton.jit
def _nn_refine_kernel(
    seq_ptr,
    starts_ptr,
    lengths_ptr,
    cand_ptr,
    user_ptr,
    gm_ptr,
    gid_ptr,
    tau_ptr,
    cnt_ptr,
    keys_ptr,
    idx_ptr,
    score_ptr,
    D,
    k,
    G_TOT,
    SPLITS,
    CAP,
    margin,
    BS: tl.constexpr,
    C: tl.constexpr,
    G_P: tl.constexpr,
    R: tl.constexpr,
    STEPS: tl.constexpr,
    K: tl.constexpr,
    CH: tl.constexpr,
    D_P: tl.constexpr,
    WIDE: tl.constexpr,
    GDC: tl.constexpr,
    M_BULK: tl.constexpr,
    TOP2: tl.constexpr = False,
):
    """Pass 2, one program per candidate: its threshold, the rows of the groups that reach it scored
    again, the top k of those, best first.

    The threshold T is the k-th largest group maximum of pass 1 or just below it (``_kth_group_max``),
    so at least k distinct positions score >= T. This pass scores rows in fp32 on the CUDA cores;
    with ``margin`` E at least the largest difference between its scores and pass 1's (``margin()``),
    every group whose maximum is >= T - 2E is visited and every key >= T - E kept: at least k keys,
    and every one that can be in the top k. Only those ~k groups are read again (~500 of 16,000
    rows at k = 64), R rows per step, the next step's rows in flight while a step is scored. A last
    step of at most R / 4 rows (as for k groups and one more: 520 rows at k = 64) takes an R / 4
    tile, loaded with the first step's.
    With ``TOP2`` (the scan kept each group's second largest score and the row of its largest,
    ``_store_scan``), a visited group whose second is below the visiting bound T - 2E can hold one key
    at or above T - E only, its maximum's row: that row alone is scored (usually every visited group but
    one or two, so ~k rows instead of ~k groups' rows: 64 against 1,600 at 100,000 rows, k = 64).
    ``tau`` and ``cnt`` receive the threshold key and the list's length.
    """
    row = tl.program_id(0)
    if GDC:  # the next selection's scan may start as this launch's programs run (SCAN_DEPENDENT)
        tl.extra.cuda.gdc_launch_dependents()
    # The candidate's user, sequence and row first: their loads (two dependent ones) are then in flight
    # during the threshold search instead of ahead of the first rows' loads.
    u = tl.load(user_ptr + row)
    start = _row_start(starts_ptr, u, WIDE)
    length = tl.load(lengths_ptr + u).to(tl.int32)
    c = _load_cand_row(cand_ptr, row, D, D_P)
    if GDC:
        # Launched as the scan's programmatic dependent (sm_90+): every scan program signals at its start (a
        # packed scan once its own wait is over, so the inputs above are final), and this kernel's programs are
        # placed as the scan's last programs run and load the above meanwhile; the group maxima are read only
        # after the scan has finished and its stores are visible.
        tl.extra.cuda.gdc_wait()
    if TOP2:
        stride = 2 * G_TOT
    else:
        stride = G_TOT
    gm, real, lo = _kth_group_max(gm_ptr, row, k, G_TOT, stride, G_P, STEPS)
    tl.store(tau_ptr + row, lo << 32)
    no_thr = lo <= -(2**31)  # fewer than k non-empty groups: every row counts
    t32 = lo.to(tl.int32)
    key_floor = tl.where(no_thr, -(2**31), _below(t32, margin)).to(tl.int64) << 32
    floor2 = _below(t32, 2 * margin)
    visit = tl.where(no_thr, real, real & (gm >= floor2))
    chunk = tl.cdiv(tl.cdiv(length, SPLITS), BS) * BS  # as _user_chunk
    rows_per_group = tl.maximum(chunk // C, 1)
    # The visited groups' ids, packed to the front of this candidate's row of ``gid``. The slot, not the mask,
    # carries the store's condition: the compiler then converts to the scattered store's layout after the prefix
    # sum, not before it (where the sum ran as 16 warp scans, 80 shuffles; 749 -> 441 instructions on sm_90).
    gid_base = gid_ptr + row.to(tl.int64) * G_TOT
    g = tl.arange(0, G_P)
    if TOP2:
        # Groups whose second is below the bound give their maximum's row alone: its position, packed to the
        # back of the row of ``gid`` (the whole groups fill it from the front; together at most G_TOT).
        packed = tl.load(gm_ptr + row.to(tl.int64) * stride + G_TOT + g, mask=visit, other=0)
        one_row = ((packed & -65536) < floor2) & ~no_thr  # the rounded-up second is below the bound
        single = visit & one_row
        whole = visit & ~one_row
        one = tl.where(single, tl.cumsum(single.to(tl.int32), axis=0), 0)
        tl.store(gid_base + (G_TOT - one), (g // C) * chunk + g % C + (packed & 0xFFFF) * C, mask=one > 0)
        n_single = tl.sum(single.to(tl.int32), axis=0)
    else:
        whole = visit
        n_single = 0
    slot = tl.where(whole, tl.cumsum(whole.to(tl.int32), axis=0) - 1, -1)
    tl.store(gid_base + slot, g, mask=slot >= 0)
    n_visit = tl.sum(whole.to(tl.int32), axis=0)
    tl.debug_barrier()

    n_rows = n_visit * rows_per_group
    keys_base = keys_ptr + row.to(tl.int64) * CAP
    n_keys = tl.zeros((), tl.int32)
    # Rows [0, n_full) in steps of R; rows [n_full, n_rows), when at most R / 4, in one short step.
    rest = n_rows % R
    short = (rest > 0) & (rest <= R // 4)
    n_full = tl.where(short, n_rows - rest, n_rows)
    # Flat row f is row f % rows_per_group of visited group slot f // rows_per_group: divided here, for the
    # short tile and the first step; each later step advances the pair without a division.
    f_s = n_full + tl.arange(0, R // 4)
    pos_s = _visited_rows(gid_base, f_s // rows_per_group, f_s % rows_per_group, f_s < n_rows, chunk, length, C)
    q_s = _load_rows(seq_ptr, start, pos_s, D, D_P)
    if TOP2:  # the single rows, R / 2 at a time (from the back of the row of gid); the first ones loaded here
        j1 = tl.arange(0, R // 2)
        pos_1 = tl.load(gid_base + (G_TOT - 1 - j1), mask=j1 < n_single, other=-1)
        q_1 = _load_rows(seq_ptr, start, pos_1, D, D_P)
    r = tl.arange(0, R)
    f0 = tl.zeros((), tl.int32)
    slot, rr = r // rows_per_group, r % rows_per_group
    q_step, r_step = R // rows_per_group, R % rows_per_group
    pos = _visited_rows(gid_base, slot, rr, r < n_full, chunk, length, C)
    q = _load_rows(seq_ptr, start, pos, D, D_P)
    if TOP2:
        n_keys = _keep_keys(q_1, pos_1, c, key_floor, keys_base, n_keys, CAP)
        for s0 in range(R // 2, n_single, R // 2):
            pos_1 = tl.load(gid_base + (G_TOT - 1 - s0 - j1), mask=s0 + j1 < n_single, other=-1)
            n_keys = _keep_keys(_load_rows(seq_ptr, start, pos_1, D, D_P), pos_1, c, key_floor, keys_base, n_keys,
                                CAP)  # fmt: skip
        if n_keys > CAP:
            f0 = n_full  # a list past CAP goes to the exact scan
    while f0 < n_full:
        slot, rr = _advance(slot, rr, q_step, r_step, rows_per_group)
        pos_n = _visited_rows(gid_base, slot, rr, f0 + R + r < n_full, chunk, length, C)
        q_n = _load_rows(seq_ptr, start, pos_n, D, D_P)  # in flight while this step is scored
        n_keys = _keep_keys(q, pos, c, key_floor, keys_base, n_keys, CAP)
        f0 = tl.where(n_keys > CAP, n_full, f0 + R)  # a list past CAP goes to the exact scan: stop early
        pos, q = pos_n, q_n
    if short and n_keys <= CAP:
        n_keys = _keep_keys(q_s, pos_s, c, key_floor, keys_base, n_keys, CAP)
    tl.store(cnt_ptr + row, n_keys)
    tl.debug_barrier()
    if n_keys <= CAP:
        if n_keys <= 2 * K:  # the usual list, k keys and a few more: one sort
            _sort_list(keys_base, n_keys, row, idx_ptr, score_ptr, k, 2 * K)
        else:
            _rank_list(keys_base, n_keys, row, idx_ptr, score_ptr, k, K, CH)
    else:
        _exact_scan(seq_ptr, start, length, cand_ptr, row, tl.max(tl.abs(c), axis=0) == 0.0, idx_ptr,
                    score_ptr, D, k, K, D_P, M_BULK)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NNSelectConfig:
    """Launch parameters (all chosen from shapes only, never from tensor values).

    block_n candidates and ``tile`` positions per score tile; ``splits`` chunks per sequence (the
    second grid axis of the scans); ``groups_per_split`` group maxima per chunk for the threshold;
    ``capacity`` keys kept per candidate before the exact fallback scan takes over; ``users_per_step``
    users of a block scored side by side in one step of the scan (1: ``_nn_scan_kernel``, one user per
    step; 2 or 4: ``_nn_scan_packed_kernel``).
    """

    block_n: int
    k_pad: int
    splits: int
    num_warps: int
    groups_per_split: int
    tile: int | None = None  # default max(64, k_pad)
    capacity: int | None = None  # default 8 * k_pad
    users_per_step: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "tile", self.tile or max(64, self.k_pad))
        object.__setattr__(self, "capacity", self.capacity or 8 * self.k_pad)
        g = self.groups_per_split
        if self.tile % g or g & (g - 1):
            raise ValueError(f"groups_per_split must be a power of two dividing tile={self.tile}")
        if self.users_per_step not in (1, 2, 4):
            raise ValueError(f"users_per_step must be 1, 2 or 4, got {self.users_per_step}")


def _tiles_per_chunk(avg_len: int, splits: int, tile: int) -> int:
    """Tiles of ``tile`` rows in one of ``splits`` chunks of an average user's ``avg_len`` rows."""
    return triton.cdiv(triton.cdiv(max(avg_len, 1), splits), tile)


def choose_config(
    n_cand: int,
    n_users: int,
    total_rows: int,
    k: int,
    device: torch.device,
    *,
    block_n: int | None = None,
    splits: int | None = None,
) -> NNSelectConfig:
    """Pick block sizes and the split count from shapes alone (no device sync).

    Chunks of about four tiles per program, as many as keep ~8 programs per SM busy: the scans are
    latency-bound chains of small loads and dots, so more and shorter programs win (measured on
    H200: 1 user, 256 candidates, S=16,000, with the fp16 scan: 64-candidate blocks, 64 chunks, 38 us
    of kernel time; 16-candidate blocks 49 us; with the integer scan, 32-candidate blocks 25.5-26.3 us
    against 26.8-27.6 for 64, in two runs); chunks of eight tiles where that lets a block's users be scanned side
    by side (below). At least 16 x k group maxima per candidate and groups of at most ~8
    rows where the tile allows: the second pass then reads about k groups again, a small part of the
    sequence (more groups: a longer threshold search, so at most ``GROUP_CAP`` of them where 16 x k allow).
    """
    k_pad = max(16, triton.next_power_of_2(k))
    tile = max(64, k_pad)
    sms = sm_count(device)
    per_user = max(n_cand // max(n_users, 1), 1)
    if block_n is None:  # as many candidates per block as a user has (a block scans each of its users)
        block_n = 64 if per_user > 256 else 32 if per_user >= 32 else 16
        if k_pad >= 128:  # 128-row tiles: 32-candidate blocks (4 warps) beat 64 (8 warps), 47 vs 56 us at k=96
            block_n = min(block_n, 32)
    n_blocks = triton.cdiv(max(n_cand, 1), block_n)
    avg_len = total_rows // max(n_users, 1)
    chosen = splits is None  # a caller's split count is kept as given
    packable = block_n == 16 and block_n >= 2 * per_user  # a block holds 2 or more users (see below)
    if chosen:
        splits = max(1, min(triton.cdiv(avg_len, 4 * tile), max(1, 8 * sms // n_blocks), 128))
        # Where a block's users could go side by side but chunks are too short for it, fewer and longer chunks
        # that let them, while at least two programs per SM remain (measured on H200, 256 candidates: 64 users
        # x 16,000 rows 32 chunks 1.05x, x 24,000 47 chunks 1.08x; 32 users x 16,000 1.03x; 128 users x 16,000
        # 1.07x; 128 users x 8,000 (512 candidates) 16 chunks 1.05x; not taken: 64 users x 8,000, 256 programs,
        # 0.99x; x 4,000, 128 programs, 0.94x).
        if packable:
            longer = max(triton.cdiv(avg_len, PACKED_MIN_STEPS * tile), 1)
            # ... rounded down to a power of two where that too leaves two programs per SM: a candidate's maxima
            # then fill the refine pass's power-of-two tile, where a total just past one doubles its threshold
            # search (H200, 256 candidates, 40 / 47 / 59 -> 32 chunks: 64 users x 20,000 / 24,000 / 30,000 rows
            # 1.26x / 1.17x / 1.08x; 32 users x 24,000 1.09x; 128 users x 24,000 1.15x; 512 candidates, 20 -> 16:
            # 128 users x 10,000 1.12x, 24 -> 16: 64 users x 12,000 1.01x).
            pow2 = 1 << (longer.bit_length() - 1)
            if n_blocks * pow2 >= 2 * sms:
                longer = pow2
            if longer < splits and n_blocks * longer >= 2 * sms:
                splits = longer
            # A packed scan keeps the groups' seconds and rows (use_top2), so the refine pass reads ~k rows however
            # long the groups are, and fewer maxima shorten its threshold search: the fewest chunks (a power of two)
            # that still fill one wave of four scan programs per SM, while 16 x k_pad maxima remain (H100, 256
            # candidates, selections identical: 64 users x 100,000 rows, 64 -> 32 chunks 1.11x, 24 1.08x, 16 1.03x;
            # x 16,000 keeps 32, where 16 measured 0.87x; benchmarks/RESULTS.md, fifty-third session).
            wave = 4 * sms // n_blocks
            packed = _tiles_per_chunk(avg_len, splits, tile) >= PACKED_MIN_STEPS
            if TOP2 and packed and wave >= 1:
                wave = 1 << (wave.bit_length() - 1)
                if wave < splits and wave * tile >= GROUPS_PER_K * k_pad:
                    splits = wave
    chunk = triton.cdiv(triton.cdiv(max(avg_len, 1), splits), tile) * tile
    gps = max(triton.cdiv(GROUPS_PER_K * k_pad, splits), triton.cdiv(chunk, ROWS_PER_GROUP))
    gps = min(tile, max(2, triton.next_power_of_2(gps)))
    # The refine pass searches a candidate's maxima in a power-of-two tile, at a cost that grows with the tile,
    # while the rows it reads again grow with rows / maxima. At most GROUP_CAP maxima: fewer chunks where
    # _fewer_chunks allows, else shorter groups while 16 x k_pad maxima remain (and always down to MAX_GROUPS,
    # what its registers hold). Measured on H200, 256 candidates, selections identical: 1 user x 40,000 rows,
    # k = 96, 79 -> 64 chunks of 64 groups 1.36x; 1 user x 36,000 / 50,000 / 100,000, k = 64, 128 chunks x 64
    # -> 32 groups 1.39x / 1.30x / 1.20x, at k = 96 x 70,000 / 100,000 1.16x / 1.09x; 8 users x 100,000 1.39x;
    # 4,096 -> 2,048 maxima lost at 50,000 rows and more, 0.69-0.89x.
    while splits * gps > GROUP_CAP:
        fewer = _fewer_chunks(splits, gps, GROUP_CAP, n_blocks, sms) if chosen else splits
        if fewer < splits:
            splits = fewer
        elif gps > 2 and (splits * gps > MAX_GROUPS or splits * gps // 2 >= GROUPS_PER_K * k_pad):
            gps //= 2
        else:
            break
    # ... and a total just past a power of two is brought down to it (64 users x 100,000 rows, 66 -> 64 chunks
    # of 64: 0.247 -> 0.200 ms; 1 user x 20,000 / 24,000 rows, 79 / 94 -> 64 chunks of 32, 1.10x / 1.10x).
    if chosen:
        splits = _fewer_chunks(splits, gps, triton.next_power_of_2(splits * gps) // 2, n_blocks, sms)
    # Users per scan step: as many as a block holds on average (a user's candidates adjacent), up to 4,
    # where chunks are long enough for the packed scan's pipelined steps (measured on H200, 64 users with 4
    # candidates each: at 100,000 rows, 25 steps per chunk, 0.135 ms against 0.154 with one user per step;
    # at 16,000, 4 steps, 0.0385 against 0.0370, and level once the scan's scale took rsqrt: 0.0358 / 0.0356).
    # (16-candidate blocks only: the block size the GPU tests run packed.)
    users = 1
    if packable and _tiles_per_chunk(avg_len, splits, tile) >= PACKED_MIN_STEPS:
        users = 4 if block_n >= 4 * per_user else 2
    return NNSelectConfig(block_n, k_pad, splits, scan_warps(block_n, tile), gps, tile, users_per_step=users)


def _fewer_chunks(splits: int, gps: int, limit: int, n_blocks: int, sms: int) -> int:
    """The chunks for at most ``limit`` maxima of ``gps`` groups each, where that keeps at least 2/3 of
    ``splits`` and two programs per SM (or 7/8 of ``splits``); else ``splits``. Longer chunks cost the scan
    its parallelism: at 1 user x 30,000 rows, k = 96, 59 -> 32 chunks (256 programs) measured 0.92x."""
    fewer = limit // gps
    if fewer < splits and 3 * fewer >= 2 * splits and (n_blocks * fewer >= 2 * sms or 8 * fewer >= 7 * splits):
        return fewer
    return splits


def scan_launch(users_per_step: int, grid: tuple[int, int]) -> Callable[..., object]:
    """Pass 1's launcher over ``grid``: ``_nn_scan_kernel`` for one user per step, else the packed scan with
    ``U = users_per_step`` (``nn_scan_wgmma``'s Gluon kernel where ``nn_scan_wgmma.usable``). Both take
    (seq, starts, lengths, cand, cand_user, gm, N, D, G_TOT, SPLITS, **meta); the launcher adds ``WIDE``
    (``wide_offsets``), ``GDC`` and ``TOP2`` (False) unless given and, for the Triton packed scan, the rows' int32
    view for the norms (``seq_words``). With ``GDC`` (the refine pass its programmatic dependent) and ``SCAN_DEPENDENT``
    a packed scan itself starts as the programmatic dependent of the kernel before it (the packed scans wait for
    it under ``GDC``: a no-op on a plain launch)."""

    def launch(seq: torch.Tensor, *args: object, **meta: object) -> object:
        meta.setdefault("WIDE", wide_offsets(seq))
        meta.setdefault("GDC", False)
        meta.setdefault("TOP2", False)
        dependent = bool(meta["GDC"]) and SCAN_DEPENDENT and users_per_step > 1
        if users_per_step == 1:
            return _nn_scan_kernel[grid](seq, *args, **meta)
        d = args[6]  # (starts, lengths, cand, cand_user, gm, N, D, ...)
        if nn_scan_wgmma.usable(seq, d, meta["BN"], meta["BS"], meta["C"], users_per_step):
            return nn_scan_wgmma.launch(grid, seq, *args, users_per_step=users_per_step, wide=meta["WIDE"],
                                        gdc=meta["GDC"], dependent=dependent, top2=meta["TOP2"])  # fmt: skip
        words = seq_words(seq)
        return _nn_scan_packed_kernel[grid](seq, seq if words is None else words, *args, U=users_per_step,
                                            WORDS=words is not None, ASM=not interpreting(), launch_pdl=dependent,
                                            **meta)  # fmt: skip

    return launch


def use_top2(cfg: NNSelectConfig, total_rows: int) -> bool:
    """Whether a selection's scan keeps the groups' seconds and rows (``TOP2``): with a packed scan, and with the
    one-user scan at 128-row tiles (k > 64), where the refine pass's rows outweigh the scan's extra work (H100,
    256 candidates, selections identical: 64 users x 100,000 rows 1.06-1.07x, x 16,000 1.03x, 32 users x 16,000
    1.00x; one-user scan at 16,000 rows, top-96 1.09x, top-64 0.96x; 1 / 8 users x 100,000, top-96, 1.07x / 1.06x,
    top-64, 0.92x / 0.96x; benchmarks/RESULTS.md, fifty-third session); and only where a group's rows are numbered
    in 16 bits (``_second_and_row``; a chunk of all ``total_rows`` bounds every user's)."""
    chunk = triton.cdiv(triton.cdiv(max(total_rows, 1), cfg.splits), cfg.tile) * cfg.tile
    fits = chunk // cfg.groups_per_split < 2**16
    return TOP2 and fits and (cfg.users_per_step > 1 or cfg.tile >= 128)


def dependent_launch(device: torch.device) -> bool:
    """Whether the refine pass starts as the scan's programmatic dependent (CUDA, sm_90 and later; not under
    the interpreter): its programs then load their own inputs while the scan finishes."""
    return device.type == "cuda" and not interpreting() and torch.cuda.get_device_capability(device)[0] >= 9


def wide_offsets(seq: torch.Tensor) -> bool:
    """Whether the kernels must address the rows (T, D) with 64-bit offsets: an element's offset
    (start + position) x D + d passes 2**31 - 1 only where T x D does. (The masked lanes of a tile's tail
    may wrap in 32 bits; they are never read.)"""
    return seq.numel() >= 2**31


def seq_words(seq: torch.Tensor) -> torch.Tensor | None:
    """The int8 rows (T, D) as int32 words (T, D / 4), four codes each, for the scan's row norms; None where D
    is not a multiple of 4 or the rows are not 4-byte aligned (the scan then widens the codes themselves)."""
    if seq.shape[1] % 4 or seq.data_ptr() % 4 or not seq.is_contiguous():
        return None
    return seq.view(torch.int32)


def scan_warps(block_n: int, tile: int) -> int:
    """Warps of a launch whose score tile is (block_n, tile): 4, or 8 past 4,096 scores."""
    return 4 if block_n * tile <= 4096 else 8


def scan_error(d: int) -> float:
    """A bound of |pass 1's score - the exact cosine| for d-dimensional codes: each element of the
    candidate's int8 pieces is within 0.5 / (127 * 254) of it, so (Cauchy-Schwarz over the unit row)
    the dot is within that times sqrt(d); fp32 rounding of the sum and the scaling (the int32 sum's
    conversion, the approximate rsqrt of the norm (2 ulp: 2**-22), two products, together < 2**-21
    relative to a score of magnitude <= 1) adds < 2**-20."""
    return 0.5 / I8_SCALE * math.sqrt(d) + 2.0**-20


def margin(d: int) -> float:
    """The refine pass's margin E: twice the largest possible difference between its fp32 scores
    (d products of magnitude <= 1, each sum step within 2**-24) and pass 1's."""
    return 2.0 * (scan_error(d) + d * 2.0**-24)


def _check_inputs(seq, starts, lengths, cand, cand_user, k):
    if not isinstance(seq, torch.Tensor) or seq.dim() != 2 or seq.dtype != torch.int8:
        raise ValueError(f"seq must be a (T, D) int8 tensor, got {_describe(seq)}")
    for name, t in (("starts", starts), ("lengths", lengths), ("cand_user", cand_user)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be a 1-D int32/int64 tensor, got {_describe(t)}")
    if starts.shape != lengths.shape:
        raise ValueError(
            f"starts and lengths must have the same shape, got {tuple(starts.shape)} "
            f"and {tuple(lengths.shape)}"
        )
    if (
        not isinstance(cand, torch.Tensor)
        or cand.dim() != 2
        or cand.dtype not in (torch.float16, torch.float32, torch.bfloat16, torch.int8)
    ):
        raise ValueError(f"cand must be a (N, D) float16/float32/bfloat16/int8 tensor, got {_describe(cand)}")
    if cand.shape[1] != seq.shape[1]:
        raise ValueError(f"cand has D={cand.shape[1]} but seq has D={seq.shape[1]}")
    if cand_user.shape[0] != cand.shape[0]:
        raise ValueError(
            f"cand_user must have one entry per candidate ({cand.shape[0]}), got {cand_user.shape[0]}"
        )
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    devs = {t.device for t in (seq, starts, lengths, cand, cand_user)}
    if len(devs) != 1:
        raise ValueError(f"all inputs must be on one device, got {sorted(str(d) for d in devs)}")


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"tensor(shape={tuple(t.shape)}, dtype={t.dtype})"
    return type(t).__name__


def nn_select(
    seq: torch.Tensor,
    starts: torch.Tensor,
    lengths: torch.Tensor,
    cand: torch.Tensor,
    cand_user: torch.Tensor,
    k: int,
    *,
    idx_dtype: torch.dtype = torch.int64,
    config: NNSelectConfig | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k cosine neighbours of every candidate within its own user's int8 sequence.

    Args:
        seq: (T, D) int8 item codes of all users, concatenated (each user's rows oldest -> newest).
        starts, lengths: (U,) first row and number of valid rows of each user.
        cand: (N, D) candidate embeddings, float16/float32/bfloat16 or int8 codes.
        cand_user: (N,) the user of each candidate (fastest when a user's candidates are adjacent).
        k: neighbours per candidate.
        idx_dtype: torch.int64 (default) or torch.int32 for the positions.
        config: launch parameters; by default chosen from the shapes.
        out: optional preallocated (idx, scores) to write into (e.g. under CUDA-graph capture).
        max_len: a bound on every length known to the caller (e.g. the row width of a padded layout),
            a hint only: up to ``SHORT_MAX`` rows (and no ``config``) one single-pass launch replaces
            the two passes. Results are exact either way.
    Returns:
        idx (N, k) positions relative to the user's start, best first (-1 when the user has fewer
        than k rows), scores (N, k) float32 cosine similarities (-inf in empty slots).

    Runs the Triton kernels on CUDA tensors (and on CPU tensors under ``TRITON_INTERPRET=1``);
    otherwise the vectorised PyTorch version ``nn_select_torch``.
    """
    _check_inputs(seq, starts, lengths, cand, cand_user, k)
    if idx_dtype not in (torch.int32, torch.int64):
        raise ValueError(f"idx_dtype must be torch.int32 or torch.int64, got {idx_dtype}")
    if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 0):
        raise ValueError(f"max_len must be None or an int >= 0, got {max_len!r}")
    n = cand.shape[0]
    if out is not None:
        idx, scores = out
        if (
            idx.shape != (n, k)
            or idx.dtype != idx_dtype
            or scores.shape != (n, k)
            or scores.dtype != torch.float32
            or not idx.is_contiguous()
            or not scores.is_contiguous()
            or idx.device != seq.device
            or scores.device != seq.device
        ):
            raise ValueError(
                f"out must be contiguous ({n}, {k}) {idx_dtype} and float32 tensors on {seq.device}"
            )
    if not (seq.is_cuda or interpreting()):
        ref_idx, ref_scores = nn_select_torch(seq, starts, lengths, cand, cand_user, k)
        if out is None:
            return ref_idx.to(idx_dtype), ref_scores
        idx.copy_(ref_idx)
        scores.copy_(ref_scores)
        return idx, scores
    if k > _MAX_K:
        raise ValueError(f"k must be <= {_MAX_K} for the GPU kernel, got {k}")
    if seq.shape[1] > _MAX_D:
        raise ValueError(f"D must be <= {_MAX_D} for the GPU kernel, got {seq.shape[1]}")
    if out is None:
        idx = torch.empty((n, k), dtype=idx_dtype, device=seq.device)
        scores = torch.empty((n, k), dtype=torch.float32, device=seq.device)
    if config is None and max_len is not None and max_len <= SHORT_MAX:
        return _nn_select_short(seq, starts, lengths, cand, cand_user, k, idx, scores, max_len)
    return _nn_select_triton(seq, starts, lengths, cand, cand_user, k, idx, scores, config)


def _prepare(seq, starts, lengths, cand, cand_user):
    """Contiguous inputs; bf16 candidates as fp32 (the kernels split them into int8 or fp16 pieces)."""
    cand = cand.contiguous()
    if cand.dtype == torch.bfloat16:
        cand = cand.float()
    return seq.contiguous(), starts.contiguous(), lengths.contiguous(), cand, cand_user.contiguous()


def _nn_select_short(seq, starts, lengths, cand, cand_user, k, idx, scores, max_len, num_warps=None):
    """Sequences of at most SHORT_MAX rows: ``_nn_short_kernel``, one program per candidate."""
    n, d = cand.shape
    if n == 0:
        return idx, scores
    seq, starts, lengths, cand, cand_user = _prepare(seq, starts, lengths, cand, cand_user)
    w = max(16, triton.next_power_of_2(max_len))
    with mma_sync_only():
        _nn_short_kernel[(n,)](
            seq, starts, lengths, cand, cand_user, idx, scores, d, k,
            W=w, K=max(16, triton.next_power_of_2(k)), D_P=max(16, triton.next_power_of_2(d)), WIDE=wide_offsets(seq),
            num_warps=num_warps or (2 if w <= 64 else 4),
        )  # fmt: skip
    return idx, scores


def _nn_select_triton(seq, starts, lengths, cand, cand_user, k, idx, scores, config):
    n, d = cand.shape
    dev = seq.device
    if n == 0:
        return idx, scores
    seq, starts, lengths, cand, cand_user = _prepare(seq, starts, lengths, cand, cand_user)
    cfg = config or choose_config(n, starts.shape[0], seq.shape[0], k, dev)
    bn, kp, splits, gps, cap = cfg.block_n, cfg.k_pad, cfg.splits, cfg.groups_per_split, cfg.capacity
    d_p = max(32, triton.next_power_of_2(d))  # integer dots (pass 1) take K in steps of 32
    g_tot = splits * gps
    if g_tot > MAX_GROUPS:  # the refine pass holds them in registers and counts them in 16 bits
        raise ValueError(f"config gives {g_tot} group maxima per candidate (splits x groups_per_split), "
                         f"more than {MAX_GROUPS}")  # fmt: skip
    pdl, wide = dependent_launch(dev), wide_offsets(seq)
    top2 = use_top2(cfg, seq.shape[0])
    gm = torch.empty((n, g_tot * (2 if top2 else 1)), dtype=torch.int32, device=dev)
    gid = torch.empty((n, g_tot), dtype=torch.int32, device=dev)
    tau = torch.empty((n,), dtype=torch.int64, device=dev)
    cnt = torch.empty((n,), dtype=torch.int32, device=dev)
    keys = torch.empty((n, cap), dtype=torch.int64, device=dev)
    with mma_sync_only():
        scan_launch(cfg.users_per_step, (triton.cdiv(n, bn), splits))(
            seq, starts, lengths, cand, cand_user, gm, n, d, g_tot, splits,
            BN=bn, BS=cfg.tile, C=gps, D_P=d_p, WIDE=wide, GDC=pdl, TOP2=top2, num_warps=cfg.num_warps,
        )  # fmt: skip
        _nn_refine_kernel[(n,)](
            seq, starts, lengths, cand, cand_user, gm, gid, tau, cnt, keys, idx, scores, d, k, g_tot, splits, cap,
            margin(d), BS=cfg.tile, C=gps, G_P=triton.next_power_of_2(g_tot), R=REFINE_ROWS, STEPS=THRESHOLD_STEPS,
            K=kp, CH=64, D_P=d_p, WIDE=wide, GDC=pdl, launch_pdl=pdl, M_BULK=8, TOP2=top2, num_warps=4,
        )  # fmt: skip
    return idx, scores


# --------------------------------------------------------------------------------------------
# PyTorch version (CPU without the interpreter)
# --------------------------------------------------------------------------------------------
def nn_select_torch(
    seq: torch.Tensor,
    starts: torch.Tensor,
    lengths: torch.Tensor,
    cand: torch.Tensor,
    cand_user: torch.Tensor,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vectorised per-user PyTorch selection, the semantics of the kernel.

    Scores are computed in float64 and rounded to float32 before ranking, so that identical rows
    (which a BLAS product may round differently in the last float64 bit) tie exactly and the more
    recent one wins. Returns idx (N, k) int64 and scores (N, k) float32.
    """
    _check_inputs(seq, starts, lengths, cand, cand_user, k)
    n = cand.shape[0]
    dev = cand.device
    idx = torch.full((n, k), -1, dtype=torch.int64, device=dev)
    scores = torch.full((n, k), float("-inf"), dtype=torch.float32, device=dev)
    c = cand.to(torch.float64)
    c = c / c.norm(dim=1, keepdim=True).clamp_min(1e-12)
    users = cand_user.to(torch.int64)
    starts_l = starts.tolist()
    lengths_l = lengths.tolist()
    for u in torch.unique(users).tolist():
        length = int(lengths_l[u])
        if length == 0:
            continue
        rows = (users == u).nonzero().squeeze(1)
        items = seq[starts_l[u] : starts_l[u] + length].to(torch.float64)
        items = items / items.norm(dim=1, keepdim=True).clamp_min(1e-12)
        s = (c[rows] @ items.T).to(torch.float32)  # (n_u, L), newest last
        s = s.flip(1)  # newest first, so a stable descending sort breaks ties by recency
        top = min(k, length)
        order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :top]
        idx[rows, :top] = length - 1 - order
        scores[rows, :top] = torch.gather(s, 1, order)
    return idx, scores
