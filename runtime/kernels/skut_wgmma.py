"""The transformer stack on Hopper's warp-group MMA (wgmma), written in Gluon: ``skut``'s per-sequence and
per-query-tile (split) launches for TransAct V2's shape (d_model 64, one head, FFN up to 64, sequences up to
256 tokens).

Why a second kernel: with mma.sync (``skut._skut_kernel``) every warp holds whole weight and K/V tiles as
matrix operands in registers, which costs ~255 registers per thread and keeps the L1 / shared-memory pipe
busy; Triton 3.6's own wgmma lowering of that kernel miscomputes or faults at 64-row tiles
(benchmarks/RESULTS.md). Here the layouts are spelled out: wgmma reads its B operand (weights, K, V)
straight from shared memory, shared by the warp group, and its A operand (Q, probabilities, attention
outputs) from registers; the K / V products read the rows from shared memory too.

One program (one warp group) per sequence, every layer. Per layer, in two passes:
1. Wk and Wv into shared memory; K and V of every row into shared memory (the whole sequence: 64-row tiles,
   rows past S as zeros). Each tile's rows arrive by an asynchronous copy into its V slot, issued while the
   tile before is multiplied. Padded keys stay in place, masked by a per-key bias worked out once per
   sequence (they are not compacted as in ``skut``).
2. Wq, Wo, W1, W2 into shared memory (reusing Wk's and Wv's buffers: 72 KB in all for 192 tokens, so three
   programs fit on an SM at 168 registers); then query tile after query tile: Q, flash attention over the
   key tiles it may see (online softmax in base 2; the scale and log2(e) are in Wq), out projection with
   the residual, LayerNorm, FFN, LayerNorm; the rows go to the activation buffer (the next layer's input)
   or, in the last layer, to the output and the pool.
A causal stack of few enough sequences that two programs per SM hold them all (``launch``) runs one pass per
layer instead: all six matrices stay in shared memory (~89 KB), and each tile computes its own K, V and Q
together (three asynchronous products) before its attention, since a causal tile needs no later tile's keys;
registers are not capped there, and the weights and rows arrive by asynchronous copies issued a step ahead
(the next layer's Wq, Wk, Wv once the last tile's K, V and Q are out, its Wo, W1, W2 after the last tile; a
tile's rows into its V slot while the tile before is worked on, kept from there for the residual).

A causal stack of fewer sequences than the GPU has SMs leaves most SMs idle with one program per sequence:
``launch_split`` runs one program per (sequence, 64-row query tile) instead (``_skut_wgmma_split_kernel``),
each keeping its rows in registers through every layer and waiting, per layer, only for the earlier tiles'
K / V, which it reads back from L2 while attending to its own keys; its weights arrive by asynchronous copies
issued one step ahead.

A causal stack of 2-3 query tiles (65-192 tokens) runs one program per sequence with one warp group per query
tile instead (``launch_groups``, ``_skut_wgmma_groups_kernel``; Gluon's warp specialization): each warp group
keeps its rows in shared memory through every layer and hands its K / V to the later tiles through shared
memory and an mbarrier, and attends to all its keys (at most three key tiles) in one softmax, every score in
registers; each key's padding bias enters its scores through one more 16-wide k-step of the score products
(``_scores``), not an add per score, and so do the biases of Q, the out projection and the FFN (bias rows packed
at load time, ``PackedEncoder.rows``); the softmax's row sums are products too (the probabilities times a ones
buffer). The warp groups run apart, not in step, so the SM overlaps one tile's
softmax with another's products, and no hand-over goes through L2; at 144, 160 and 200 registers per thread (the
longer a tile's chain, the more) the three warp groups fill the SM, one program per SM. Up to a few waves of
programs it starts as the programmatic dependent of the kernel before it (PDL): its first programs fetch the
weights, and ask L2 for their rows, while that kernel's last ones run.

Same function and conventions as ``skut._skut_kernel`` (packed weights from ``pack_encoder_weights``,
fully masked rows are zeros, pools, ``pool_proj``). Gluon has no interpreter: the kernel runs on sm_90
only and is checked by tests/gpu against the float64 reference; ``skut_forward`` uses it where
``skut.choose_config`` sets ``wgmma`` (and ``split``: the per-tile launch; ``warp_groups``: the grouped one).
"""

from __future__ import annotations

import torch
import triton

from . import sm_count

try:  # Gluon ships with Triton 3.5+; its barrier was renamed in 3.9
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy, mbarrier
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait
    from triton.runtime.jit import constexpr_function

    _cta_barrier = gl.barrier if hasattr(gl, "barrier") else gl.thread_barrier
    # ... and its global-to-shared copy in 3.9 (from async_copy_global_to_shared to async_load)
    _async_load = async_copy.async_load if hasattr(async_copy, "async_load") else async_copy.async_copy_global_to_shared
    HAVE_GLUON = True
except ImportError:  # pragma: no cover - older Triton
    HAVE_GLUON = False

BLOCK = 64  # query rows per tile, keys per tile (one warp group: 4 warps x 16 rows)
MAX_SEQ = 256  # K and V of the whole sequence stay in shared memory
D_MODEL = 64
MAX_FF = 64
# Three programs per SM: 3 x 128 threads x 168 registers fit in 65,536, and 3 x ~73 KB of shared memory in
# 228 KB (ptxas takes ~185-205 registers if left alone, for the same code without spills).
MAX_REGS = 168
# The grouped launch: one warp group per query tile, up to three (128 threads each, 144 + 160 + 200 registers per
# thread fill an SM).
MAX_GROUPS = 3
# The grouped launch starts as the programmatic dependent of the kernel before it up to this many waves of programs
# (``launch_groups``).
DEPENDENT_WAVES = 4
# As a programmatic dependent, each grouped-launch program asks L2 for its sequence's rows and mask before it waits
# for the kernel before it (``_prefetch_sequence``): its first loads after the wait then hit L2, not HBM (H100, inputs
# not in L2: B=256 S=192 1.01-1.02x, B=128 1.03x, 100-128 tokens 1.03x; a plain launch copies its rows at once, and
# prefetching the next wave's sequence too measured no better: benchmarks/RESULTS.md, fifty-first session).
PREFETCH = True


# The grouped launch adds the biases of Q, the out projection and the FFN by one more 16-row k-step of their
# products (``PackedEncoder.rows``): each bias as the sum of BIAS_TERMS values of the compute dtype (near fp32 exact).
BIAS_ROWS = 16
BIAS_TERMS = 3
_BIAS_ROWS_C = triton.language.constexpr(BIAS_ROWS)
_BIAS_TERMS_C = triton.language.constexpr(BIAS_TERMS)

# Triton releases this kernel was built with (3.6.0, 3.7.1, 3.8.0, 3.9.0; checked on the GPU with 3.6): Gluon is
# experimental and its API moves between releases, so others take the mma.sync kernel.
TRITON_RANGE = ((3, 6), (3, 9))


def triton_version_ok(version: str) -> bool:
    """Whether a Triton version string ("3.6.0", "3.9.0+git...") lies in ``TRITON_RANGE``."""
    try:
        major, minor = (int(p) for p in version.split(".")[:2])
    except ValueError:
        return False
    return TRITON_RANGE[0] <= (major, minor) <= TRITON_RANGE[1]


# Gluon present in a Triton of TRITON_RANGE: fixed for the process, so not parsed per launch (``nn_scan_wgmma`` too).
GLUON_BUILT = HAVE_GLUON and triton_version_ok(triton.__version__)


def fits(packed, seq_len: int) -> bool:  # noqa: ANN001 (PackedEncoder)
    """Whether the stack has the shape this kernel is written for: V2's (d_model 64, one head, FFN up to 64),
    16-bit weights, 1 to ``MAX_SEQ`` tokens."""
    return (
        packed.d_model == D_MODEL and packed.n_heads == 1 and packed.ff_pad <= MAX_FF
        and packed.dtype in (torch.float16, torch.bfloat16) and 0 < seq_len <= MAX_SEQ
    )  # fmt: skip


def groups_fit(seq_len: int) -> bool:
    """Whether the grouped launch takes sequences of this length: 2 to ``MAX_GROUPS`` query tiles."""
    return BLOCK < seq_len <= MAX_GROUPS * BLOCK


def supported(packed, seq_len: int, device: torch.device) -> bool:  # noqa: ANN001 (PackedEncoder)
    """Whether this kernel can run the stack: Gluon in a Triton of ``TRITON_RANGE``, an sm_90 GPU, ``fits``."""
    return (
        GLUON_BUILT and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9
        and fits(packed, seq_len)
    )  # fmt: skip


if HAVE_GLUON:

    @constexpr_function
    def _acc_layout(n):
        """wgmma's accumulator layout for an (64, n) tile over one warp group (each warp 16 rows)."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, 16])

    @constexpr_function
    def _a_operand(n):
        """The register layout of an A operand (K of n) for wgmma: the accumulator's of width n, two 16-bit values per
        register."""
        return gl.DotOperandLayout(operand_index=0, parent=_acc_layout(n), k_width=2)

    @constexpr_function
    def _copy_layout(c):
        """Rows of c (16, 32 or 64) 16-bit columns in 16-byte pieces, one piece per thread per step."""
        return gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[32 // (c // 8), c // 8], warps_per_cta=[4, 1],
                                order=[1, 0])  # fmt: skip

    @constexpr_function
    def _layer_mats(d, f):
        """Elements of one layer's six matrices in ``PackedEncoder.mats`` (Wq, Wk, Wv, Wo: d x d; W1, W2: d x f)."""
        return 4 * d * d + 2 * d * f

    @constexpr_function
    def _layer_vecs(d, f):
        """Elements of one layer's vectors in ``PackedEncoder.vecs`` (biases, LayerNorm weights and biases, the two
        epsilons)."""
        return 9 * d + f + 2

    @gluon.jit
    def _layernorm(x, v_ptr, off_w, off_b, eps, D: gl.constexpr, LAYOUT: gl.constexpr):
        """Affine LayerNorm of the rows of x (fp32, every column real)."""
        cd = gl.arange(0, D, layout=gl.SliceLayout(0, LAYOUT))
        w = gl.load(v_ptr + off_w + cd)
        b = gl.load(v_ptr + off_b + cd)
        mean = gl.sum(x, axis=1) * (1.0 / D)
        xc = x - gl.expand_dims(mean, 1)
        var = gl.sum(xc * xc, axis=1) * (1.0 / D)
        return xc * gl.expand_dims(gl.rsqrt(var + eps), 1) * gl.expand_dims(w, 0) + gl.expand_dims(b, 0)

    @gluon.jit
    def _tile(t, rm, cd, S, D: gl.constexpr, BM: gl.constexpr):
        """Query tile t of a sequence: its rows, and which (row, column) pairs lie within S."""
        rows = t * BM + rm
        return rows, gl.expand_dims(rows < S, 1) & gl.expand_dims(cd < D, 0)

    @gluon.jit
    def _row_ptrs(base, rows, cd, D: gl.constexpr):
        """Pointers to the (rows, cd) elements of a (S, D) row-major sequence at ``base``."""
        return base + gl.expand_dims(rows, 1) * D + gl.expand_dims(cd, 0)

    @gluon.jit
    def _stage(dst, src_ptr, R: gl.constexpr, C: gl.constexpr, LOAD: gl.constexpr):
        """A row-major (R, C) matrix from global memory into the shared buffer ``dst``."""
        r = gl.arange(0, R, layout=gl.SliceLayout(1, LOAD))
        c = gl.arange(0, C, layout=gl.SliceLayout(0, LOAD))
        dst.store(gl.load(src_ptr + gl.expand_dims(r, 1) * C + gl.expand_dims(c, 0)))

    @gluon.jit
    def _key_bias_tile(kb_t, m_b, S, T: gl.constexpr, HAS_MASK: gl.constexpr, live=True):
        """Key tile T's biases into ``kb_t`` (64 keys, one per thread): 0 where a key may be attended to, -inf
        where padded (``m_b``: the sequence's padding mask), past S, or everywhere unless ``live``."""
        BM: gl.constexpr = kb_t.shape[0]
        kidx = T * BM + gl.arange(0, BM, layout=gl.BlockedLayout([1], [32], [4], [0]))
        key_ok = _keys_ok(m_b, kidx, (kidx < S) & live, HAS_MASK)
        kb_t.store(gl.where(key_ok, 0.0, float("-inf")))

    @gluon.jit
    def _keys_ok(m_b, kidx, ok, HAS_MASK: gl.constexpr):
        """Which keys ``kidx`` may be attended to: those where ``ok`` that the padding mask ``m_b`` keeps."""
        if HAS_MASK:
            ok = ok & (gl.load(m_b + kidx, mask=ok, other=1) == 0)
        return ok

    @gluon.jit
    def _key_bias(kb_s, m_b, S, n_t, NT: gl.constexpr, HAS_MASK: gl.constexpr):
        """Each key's bias for key tiles 0 .. n_t-1 into ``kb_s`` (the (NT, 64) buffer). A static loop, so that the
        mask loads of every tile are in flight together (one memory latency at the start, not one per tile)."""
        for t in gl.static_range(NT):
            _key_bias_tile(kb_s.index(t), m_b, S, t, HAS_MASK, t < n_t)

    @gluon.jit
    def _copy_async(dst, src_ptr, R: gl.constexpr, C: gl.constexpr):
        """Start copying a row-major (R, C) matrix (C of 16, 32 or 64) from global into shared memory in 16-byte
        pieces, one per thread per step (``async_copy.commit_group`` / ``wait_group`` track it)."""
        L: gl.constexpr = _copy_layout(C)
        r = gl.arange(0, R, layout=gl.SliceLayout(1, L))
        c = gl.arange(0, C, layout=gl.SliceLayout(0, L))
        _async_load(dst, src_ptr + gl.expand_dims(r, 1) * C + gl.expand_dims(c, 0))

    @gluon.jit
    def _copy_rows(dst, src_b, t, S, D: gl.constexpr):
        """Start copying rows t * 64 .. t * 64 + 63 of a (S, D) sequence at ``src_b`` into the (64, D) buffer ``dst``;
        rows past S are zero-filled."""
        L: gl.constexpr = _copy_layout(D)
        r = t * dst.shape[0] + gl.arange(0, dst.shape[0], layout=gl.SliceLayout(1, L))
        c = gl.arange(0, D, layout=gl.SliceLayout(0, L))
        ok = gl.expand_dims(r < S, 1) & gl.expand_dims(c < D, 0)
        _async_load(dst, src_b + gl.expand_dims(r, 1) * D + gl.expand_dims(c, 0), mask=ok)

    @gluon.jit
    def _copy_qkv(wq_s, wk_s, wv_s, w_l, D: gl.constexpr):
        """Start copying a layer's Wq, Wk, Wv (packed at ``w_l``) into shared memory."""
        _copy_async(wq_s, w_l, D, D)
        _copy_async(wk_s, w_l + D * D, D, D)
        _copy_async(wv_s, w_l + 2 * D * D, D, D)

    @gluon.jit
    def _copy_out_ffn(wo_s, w1_s, w2_s, w_l, D: gl.constexpr, F: gl.constexpr):
        """Start copying a layer's Wo, W1, W2 (packed at ``w_l``) into shared memory."""
        _copy_async(wo_s, w_l + 3 * D * D, D, D)
        _copy_async(w1_s, w_l + 4 * D * D, D, F)
        _copy_async(w2_s, w_l + 4 * D * D + D * F, F, D)

    @gluon.jit
    def _scores(qa, qe, k_s, kx_s, j, ACC: gl.constexpr):
        """Start the product of ``qa`` with key tile j's K, the keys' biases included (asynchronous): a second
        product, of ``qe`` (``_ones_column``: 1 in the first columns of each row) with the tile's bias columns
        ``kx_s[j]`` (its keys' biases, 0 or -inf, in column 0; 0 elsewhere, so only column 0 of ``qe`` counts), adds
        each key's bias to its scores exactly (no 0 x inf)."""
        BM: gl.constexpr = qa.shape[0]
        s = warpgroup_mma(qa, k_s.index(j).permute((1, 0)), gl.zeros([BM, BM], gl.float32, ACC), use_acc=False,
                          is_async=True)  # fmt: skip
        return warpgroup_mma(qe, kx_s.index(j).permute((1, 0)), s, is_async=True)

    @gluon.jit
    def _bias_columns(kx_t, m_b, S, T: gl.constexpr, HAS_MASK: gl.constexpr):
        """Key tile T's bias columns for ``_scores`` into ``kx_t`` (64 keys x KX): column 0 holds 0 where a key may be
        attended to, -inf where padded (``m_b``: the sequence's padding mask) or past S; every other column 0."""
        BM: gl.constexpr = kx_t.shape[0]
        KX: gl.constexpr = kx_t.shape[1]
        L: gl.constexpr = _row_layout(KX)
        kidx = T * BM + gl.arange(0, BM, layout=gl.SliceLayout(1, L))
        bias = gl.expand_dims(gl.where(_keys_ok(m_b, kidx, kidx < S, HAS_MASK), 0.0, float("-inf")), 1)
        kx_t.store(gl.where(_first_columns(KX, 1, L), bias, 0.0).to(kx_t.dtype))

    @gluon.jit
    def _ones_column(BM: gl.constexpr, KX: gl.constexpr, DT: gl.constexpr, A_OP: gl.constexpr):
        """``_scores``' ``qe``: (BM, KX) with 1 in columns 0 .. BIAS_TERMS-1 and 0 elsewhere, as an A operand: the
        bias columns use column 0 (their others are 0), the bias rows (``PackedEncoder.rows``) rows 0 .. BIAS_TERMS-1.
        """
        L: gl.constexpr = _row_layout(KX)
        ones = gl.where(_first_columns(KX, _BIAS_TERMS_C, L), gl.full([BM, KX], 1.0, DT, L), gl.zeros([BM, KX], DT, L))
        return gl.convert_layout(ones, A_OP)

    @constexpr_function
    def _row_layout(kx):
        """A row of kx columns per thread (``_bias_columns``, ``_ones_column``)."""
        return gl.BlockedLayout([1, kx], [32, 1], [4, 1], [1, 0])

    @gluon.jit
    def _first_columns(KX: gl.constexpr, N: gl.constexpr, L: gl.constexpr):
        """(1, KX) in L: true in columns 0 .. N-1 only."""
        return gl.expand_dims(gl.arange(0, KX, layout=gl.SliceLayout(0, L)) < N, 0)

    @gluon.jit
    def _biased(s, kb_s, j, ACC: gl.constexpr):
        """Scores of key tile j with its keys' biases (0 or -inf) added."""
        return s + gl.expand_dims(kb_s.index(j).load(gl.SliceLayout(0, ACC)), 0)

    @gluon.jit
    def _attend(qa, rows, k_s, v_s, kb_s, j0, j1, m_i, l_i, acc, CAUSAL: gl.constexpr, ACC: gl.constexpr,
                A_OP: gl.constexpr):  # fmt: skip
        """Flash-attention steps of one query tile over key tiles j0 .. j1-1 of ``k_s`` / ``v_s`` (online softmax
        in base 2): ``qa`` is Q with the scale and log2(e) folded in (an A operand), ``kb_s`` each key's bias
        (0 or -inf). Carries the running max, sum and unnormalised output (start from ``_attend_start``)."""
        BM: gl.constexpr = qa.shape[0]
        kn = gl.arange(0, BM, layout=gl.SliceLayout(0, ACC))
        for j in range(j0, j1):
            s = warpgroup_mma(qa, k_s.index(j).permute((1, 0)), gl.zeros([BM, BM], gl.float32, ACC),
                              use_acc=False)  # fmt: skip
            s = _biased(s, kb_s, j, ACC)
            if CAUSAL:
                s = gl.where(gl.expand_dims(j * BM + kn, 0) <= gl.expand_dims(rows, 1), s, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(s, axis=1))
            alpha = gl.exp2(m_i - m_new)
            p = gl.exp2(s - gl.expand_dims(m_new, 1))
            l_i = l_i * alpha + gl.sum(p, axis=1)
            acc = warpgroup_mma(gl.convert_layout(p.to(qa.dtype), A_OP), v_s.index(j), acc * gl.expand_dims(alpha, 1))
            m_i = m_new
        return m_i, l_i, acc

    @gluon.jit
    def _attend_rows(qa, qe, rows, k_s, v_s, kx_s, ones_s, bars, phase, T: gl.constexpr, ACC: gl.constexpr,
                     A_OP: gl.constexpr):  # fmt: skip
        """Causal attention of query tile T (at most 2) over key tiles 0 .. T in one softmax: every score stays
        in registers (up to 3 x 32 per thread), so there is no running max, no rescaling and no wait between
        key tiles; the products of all key tiles are in flight together. ``qa`` as in ``_attend``; ``qe`` and
        ``kx_s`` add the keys' biases (``_scores``); key tile j < T is waited for on ``bars[3 + j]`` (``phase``).
        Returns the row sums and the unnormalised output."""
        BM: gl.constexpr = qa.shape[0]
        DT: gl.constexpr = qa.dtype
        kn = gl.arange(0, BM, layout=gl.SliceLayout(0, ACC))
        s_t = _scores(qa, qe, k_s, kx_s, T, ACC)  # the diagonal tile: this tile's own keys
        if T >= 1:
            mbarrier.wait(bars.index(3), phase)
            s_0 = _scores(qa, qe, k_s, kx_s, 0, ACC)
        if T >= 2:
            mbarrier.wait(bars.index(4), phase)
            s_1 = _scores(qa, qe, k_s, kx_s, 1, ACC)
        if T == 0:
            s_t = warpgroup_mma_wait(num_outstanding=0, deps=[s_t])
        elif T == 1:
            s_t, s_0 = warpgroup_mma_wait(num_outstanding=0, deps=[s_t, s_0])
        else:
            s_t, s_0, s_1 = warpgroup_mma_wait(num_outstanding=0, deps=[s_t, s_0, s_1])
        s_t = gl.where(gl.expand_dims(T * BM + kn, 0) <= gl.expand_dims(rows, 1), s_t, float("-inf"))
        s_max = s_t
        if T >= 1:
            s_max = gl.maximum(s_max, s_0)
        if T >= 2:
            s_max = gl.maximum(s_max, s_1)
        # A row that may see no key keeps a finite max, so its probabilities are 0, not NaN.
        m = gl.expand_dims(gl.maximum(gl.max(s_max, axis=1), -1.0e30), 1)
        # Every probability first, then the three products back to back: the scores' registers are free
        # before the products' operands are taken.
        a_t = gl.convert_layout(gl.exp2(s_t - m).to(DT), A_OP)
        if T >= 1:
            a_0 = gl.convert_layout(gl.exp2(s_0 - m).to(DT), A_OP)
        if T >= 2:
            a_1 = gl.convert_layout(gl.exp2(s_1 - m).to(DT), A_OP)
        # The row sums by the tensor cores too: the probabilities times a column of ones (``ones_s``).
        NL: gl.constexpr = 8  # ones_s's columns
        ACC_L: gl.constexpr = _acc_layout(NL)
        acc = warpgroup_mma(a_t, v_s.index(T), gl.zeros([BM, qa.shape[1]], gl.float32, ACC), use_acc=False,
                            is_async=True)  # fmt: skip
        l_acc = warpgroup_mma(a_t, ones_s, gl.zeros([BM, NL], gl.float32, ACC_L), use_acc=False,
                              is_async=True)  # fmt: skip
        if T >= 1:
            acc = warpgroup_mma(a_0, v_s.index(0), acc, is_async=True)
            l_acc = warpgroup_mma(a_0, ones_s, l_acc, is_async=True)
        if T >= 2:
            acc = warpgroup_mma(a_1, v_s.index(1), acc, is_async=True)
            l_acc = warpgroup_mma(a_1, ones_s, l_acc, is_async=True)
        acc, l_acc = warpgroup_mma_wait(num_outstanding=0, deps=[acc, l_acc])
        l_i = gl.convert_layout(gl.max(l_acc, axis=1), gl.SliceLayout(1, ACC))
        return l_i, acc

    @gluon.jit
    def _attend_start(BM: gl.constexpr, D: gl.constexpr, ACC: gl.constexpr):
        """Running max, sum and output of ``_attend`` before any key."""
        m_i = gl.full([BM], -1.0e30, gl.float32, gl.SliceLayout(1, ACC))
        l_i = gl.zeros([BM], gl.float32, gl.SliceLayout(1, ACC))
        return m_i, l_i, gl.zeros([BM, D], gl.float32, ACC)

    @gluon.jit
    def _attend_end(l_i, acc):
        """The normalised output; a row that saw no valid key (sum 0) gets zeros, never 0/0."""
        inv_l = gl.where(l_i > 0, 1.0 / gl.maximum(l_i, 1e-30), 0.0)
        return acc * gl.expand_dims(inv_l, 1)

    @gluon.jit
    def _out_and_ffn(o, x, v_l, wo_s, w1_s, w2_s, D: gl.constexpr, F: gl.constexpr, ACC: gl.constexpr,
                     ACC_F: gl.constexpr, A_OP: gl.constexpr, A_OP_F: gl.constexpr):  # fmt: skip
        """The rest of a layer for one tile: out projection of the attention output ``o`` plus the residual
        ``x`` (both fp32), LayerNorm, FFN with its residual, LayerNorm (layer vectors at ``v_l``)."""
        DT: gl.constexpr = wo_s.dtype
        BM: gl.constexpr = o.shape[0]
        OFF_BO: gl.constexpr = 3 * D
        OFF_B1: gl.constexpr = OFF_BO + 3 * D
        OFF_B2: gl.constexpr = OFF_B1 + F
        OFF_EPS: gl.constexpr = OFF_B2 + 3 * D
        cd = gl.arange(0, D, layout=gl.SliceLayout(0, ACC))
        cf = gl.arange(0, F, layout=gl.SliceLayout(0, ACC_F))
        attn = warpgroup_mma(gl.convert_layout(o.to(DT), A_OP), wo_s, x + gl.expand_dims(gl.load(v_l + OFF_BO + cd), 0))
        x = _layernorm(attn, v_l, OFF_BO + D, OFF_BO + 2 * D, gl.load(v_l + OFF_EPS), D, ACC)
        hid = warpgroup_mma(gl.convert_layout(x.to(DT), A_OP_F), w1_s, gl.zeros([BM, F], gl.float32, ACC_F),
                            use_acc=False)  # fmt: skip
        hid = gl.maximum(hid + gl.expand_dims(gl.load(v_l + OFF_B1 + cf), 0), 0.0)
        ff = warpgroup_mma(gl.convert_layout(hid.to(DT), A_OP), w2_s, x + gl.expand_dims(gl.load(v_l + OFF_B2 + cd), 0))
        return _layernorm(ff, v_l, OFF_B2 + D, OFF_B2 + 2 * D, gl.load(v_l + OFF_EPS + 1), D, ACC)

    @gluon.jit
    def _out_and_ffn_rows(o, x, v_l, wo_s, w1_s, w2_s, bo_s, b1_s, b2_s, qe, qe_f, D: gl.constexpr,
                          F: gl.constexpr, ACC: gl.constexpr, ACC_F: gl.constexpr, A_OP: gl.constexpr,
                          A_OP_F: gl.constexpr):  # fmt: skip
        """``_out_and_ffn`` with the biases of the out projection and the FFN added by one more k-step of their
        products (``qe`` / ``qe_f`` times the bias rows ``bo_s``, ``b1_s``, ``b2_s``), not by adds."""
        DT: gl.constexpr = wo_s.dtype
        BM: gl.constexpr = o.shape[0]
        OFF_BO: gl.constexpr = 3 * D
        OFF_B2: gl.constexpr = OFF_BO + 3 * D + F
        OFF_EPS: gl.constexpr = OFF_B2 + 3 * D
        attn = warpgroup_mma(gl.convert_layout(o.to(DT), A_OP), wo_s, x, is_async=True)
        attn = warpgroup_mma(qe, bo_s, attn, is_async=True)
        attn = warpgroup_mma_wait(num_outstanding=0, deps=[attn])
        x = _layernorm(attn, v_l, OFF_BO + D, OFF_BO + 2 * D, gl.load(v_l + OFF_EPS), D, ACC)
        hid = warpgroup_mma(gl.convert_layout(x.to(DT), A_OP_F), w1_s, gl.zeros([BM, F], gl.float32, ACC_F),
                            use_acc=False, is_async=True)  # fmt: skip
        hid = warpgroup_mma(qe_f, b1_s, hid, is_async=True)
        hid = gl.maximum(warpgroup_mma_wait(num_outstanding=0, deps=[hid]), 0.0)
        ff = warpgroup_mma(gl.convert_layout(hid.to(DT), A_OP), w2_s, x, is_async=True)
        ff = warpgroup_mma(qe, b2_s, ff, is_async=True)
        ff = warpgroup_mma_wait(num_outstanding=0, deps=[ff])
        return _layernorm(ff, v_l, OFF_B2 + D, OFF_B2 + 2 * D, gl.load(v_l + OFF_EPS + 1), D, ACC)

    @gluon.jit
    def _last_rows(y, l_i, rows, ok, out_ptrs, m_b, S, v_ptr, f_off, D: gl.constexpr, FINAL_NORM: gl.constexpr,
                   STORE_OUT: gl.constexpr, HAS_MASK: gl.constexpr, POOL: gl.constexpr, ACC: gl.constexpr):  # fmt: skip
        """The last layer's rows of a tile: the final norm (its vectors at ``f_off``), zeros for rows that may
        see no key, stored if STORE_OUT. Returns the rows with -inf where the pool does not keep them."""
        if FINAL_NORM:
            y = _layernorm(y, v_ptr, f_off, f_off + D, gl.load(v_ptr + f_off + 2 * D), D, ACC)
        y = gl.where(gl.expand_dims(l_i > 0, 1), y, 0.0)  # rows that may see no key: zeros
        if STORE_OUT:
            gl.store(out_ptrs, y.to(out_ptrs.dtype.element_ty), mask=ok)
        keep = rows < S
        if POOL == 1 and HAS_MASK:
            keep = keep & (gl.load(m_b + rows, mask=keep, other=1) == 0)
        return gl.where(gl.expand_dims(keep, 1), y, float("-inf"))

    @gluon.jit
    def _store_pool(pooled, b, pool_ptr, pw_ptr, pb_ptr, D_OUT, D: gl.constexpr, O_P: gl.constexpr,
                    POOL_PROJ: gl.constexpr, ACC: gl.constexpr):  # fmt: skip
        """A sequence's pooled row (max; 0 where no row was kept), or Linear of it with POOL_PROJ."""
        pooled = gl.where(pooled == float("-inf"), 0.0, pooled)  # no row kept at all -> 0
        if POOL_PROJ:
            # Linear(pool), from the fp32 pool, on the CUDA cores (one product per sequence).
            PL: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 1], threads_per_warp=[32, 1],
                                                warps_per_cta=[1, 4], order=[0, 1])  # fmt: skip
            pr = gl.convert_layout(pooled, gl.SliceLayout(1, PL))
            ci = gl.arange(0, D, layout=gl.SliceLayout(1, PL))
            co = gl.arange(0, O_P, layout=gl.SliceLayout(0, PL))
            o_ok = co < D_OUT
            wt = gl.load(pw_ptr + gl.expand_dims(co, 0) * D + gl.expand_dims(ci, 1),
                         mask=gl.expand_dims(o_ok, 0) & gl.expand_dims(ci < D, 1), other=0.0)  # fmt: skip
            y_o = gl.sum(gl.expand_dims(pr, 1) * wt, axis=0) + gl.load(pb_ptr + co, mask=o_ok, other=0.0)
            gl.store(pool_ptr + b * D_OUT + co, y_o.to(pool_ptr.dtype.element_ty), mask=o_ok)
        else:
            cd = gl.arange(0, D, layout=gl.SliceLayout(0, ACC))
            gl.store(pool_ptr + b * D + cd, pooled.to(pool_ptr.dtype.element_ty))

    # Integer arguments equal to 1 would be compiled as constants; with n_layers = 1, Triton 3.6 then fails
    # to lower the kernel (ConvertTritonGPUToLLVM). None of them gains from it.
    @gluon.jit(do_not_specialize=["S", "n_layers", "D_OUT"])
    def _skut_wgmma_kernel(
        x_ptr, act_ptr, mask_ptr, w_ptr, v_ptr, pool_ptr, pw_ptr, pb_ptr, S, n_layers, D_OUT,
        D: gl.constexpr, F: gl.constexpr, NT: gl.constexpr, CAUSAL: gl.constexpr, HAS_MASK: gl.constexpr,
        POOL: gl.constexpr, FINAL_NORM: gl.constexpr, STORE_OUT: gl.constexpr, POOL_PROJ: gl.constexpr,
        O_P: gl.constexpr, ONE_PASS: gl.constexpr,
    ):  # fmt: skip
        BM: gl.constexpr = 64
        DT: gl.constexpr = w_ptr.dtype.element_ty
        LW: gl.constexpr = _layer_mats(D, F)
        LV: gl.constexpr = _layer_vecs(D, F)

        # Accumulators: wgmma's layout over one warp group (each warp 16 rows); A operands in registers.
        ACC: gl.constexpr = _acc_layout(D)
        ACC_F: gl.constexpr = _acc_layout(F)
        A_OP: gl.constexpr = _a_operand(D)
        A_OP_F: gl.constexpr = _a_operand(F)
        LOAD: gl.constexpr = _copy_layout(D)
        SH_DD: gl.constexpr = gl.NVMMASharedLayout.get_default_for([D, D], DT)
        SH_DF: gl.constexpr = gl.NVMMASharedLayout.get_default_for([D, F], DT)
        SH_FD: gl.constexpr = gl.NVMMASharedLayout.get_default_for([F, D], DT)
        SH_KV: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, D], DT)

        wa_s = gl.allocate_shared_memory(DT, [D, D], SH_DD)  # Wk, then Wq
        wb_s = gl.allocate_shared_memory(DT, [D, D], SH_DD)  # Wv, then Wo
        w1_s = gl.allocate_shared_memory(DT, [D, F], SH_DF)
        w2_s = gl.allocate_shared_memory(DT, [F, D], SH_FD)
        if ONE_PASS:
            wk_s = gl.allocate_shared_memory(DT, [D, D], SH_DD)
            wv_s = gl.allocate_shared_memory(DT, [D, D], SH_DD)
        k_s = gl.allocate_shared_memory(DT, [NT, BM, D], SH_KV)
        v_s = gl.allocate_shared_memory(DT, [NT, BM, D], SH_KV)
        # Per key: 0 where it may be attended to, -inf where padded or past S; worked out once per sequence
        # (a load of the padding mask in the key loop waited on global memory every step).
        kb_s = gl.allocate_shared_memory(gl.float32, [NT, BM], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))

        b = gl.program_id(0).to(gl.int64)
        x_b = x_ptr + b * S * D
        a_b = act_ptr + b * S * D
        m_b = mask_ptr + b * S
        rm = gl.arange(0, BM, layout=gl.SliceLayout(1, ACC))
        cd = gl.arange(0, D, layout=gl.SliceLayout(0, ACC))
        pooled = gl.full([D], float("-inf"), gl.float32, gl.SliceLayout(0, ACC))
        if ONE_PASS:
            # Weights and rows reach shared memory by asynchronous copies issued a step ahead, in this order of
            # groups: a layer's Wq, Wk, Wv (the last tile's K, V and Q out), its first tile's rows (the last
            # tile's attention done), its Wo, W1, W2 (the last tile done); tile t + 1's rows once tile t's K, V
            # and Q are out. A tile's rows go to its V slot, free until its V is computed from them.
            _copy_qkv(wa_s, wk_s, wv_s, w_ptr, D)
            async_copy.commit_group()
            _copy_rows(v_s.index(0), x_b, 0, S, D)
            async_copy.commit_group()
            _copy_out_ffn(wb_s, w1_s, w2_s, w_ptr, D, F)
            async_copy.commit_group()
        _key_bias(kb_s, m_b, S, NT, NT, HAS_MASK)

        for layer in range(0, n_layers):
            w_l = w_ptr + layer * LW
            v_l = v_ptr + layer * LV
            src_b = a_b
            if layer == 0:
                src_b = x_b
            if ONE_PASS:
                async_copy.wait_group(1)  # this layer's Wq, Wk, Wv and first rows (Wo, W1, W2 may be on their way)
                fence_async_shared()
                _cta_barrier()  # ... in every warp's view; every warp is done with the last layer's K / V and rows
            else:
                _cta_barrier()  # every warp is done with the last layer's weights, K / V and rows
                # Each tile's rows by an asynchronous copy into its V slot, the next tile's while this one's are
                # multiplied (as in the one-pass form).
                _copy_rows(v_s.index(0), src_b, 0, S, D)
                async_copy.commit_group()
                _stage(wa_s, w_l + D * D, D, D, LOAD)
                _stage(wb_s, w_l + 2 * D * D, D, D, LOAD)
                for t in range(0, NT):
                    async_copy.wait_group(0)  # this tile's rows
                    fence_async_shared()
                    _cta_barrier()
                    if NT > 1:  # (a constant, as below)
                        if t + 1 < NT:
                            _copy_rows(v_s.index(t + 1), src_b, t + 1, S, D)
                            async_copy.commit_group()
                    xs = v_s.index(t)
                    k = warpgroup_mma(xs, wa_s, gl.zeros([BM, D], gl.float32, ACC), use_acc=False, is_async=True)
                    v = warpgroup_mma(xs, wb_s, gl.zeros([BM, D], gl.float32, ACC), use_acc=False, is_async=True)
                    k, v = warpgroup_mma_wait(num_outstanding=0, deps=[k, v])
                    k_s.index(t).store(k.to(DT))
                    v_s.index(t).store(v.to(DT))  # over the rows: each warp's products are done with its own
                _cta_barrier()  # every warp is done with Wk and Wv
                _stage(wa_s, w_l, D, D, LOAD)
                _stage(wb_s, w_l + 3 * D * D, D, D, LOAD)
                _stage(w1_s, w_l + 4 * D * D, D, F, LOAD)
                _stage(w2_s, w_l + 4 * D * D + D * F, F, D, LOAD)
                fence_async_shared()
                _cta_barrier()

            for t in range(0, NT):
                rows, ok = _tile(t, rm, cd, S, D, BM)
                x_ptrs = _row_ptrs(src_b, rows, cd, D)
                if ONE_PASS:
                    if t > 0:
                        async_copy.wait_group(0)  # this tile's rows
                        fence_async_shared()
                        _cta_barrier()
                    # Causal: this tile's keys are the last it needs. Its K, V and Q are in flight together, from
                    # the rows in its V slot; the rows are also kept for the residual.
                    xs = v_s.index(t)
                    k = warpgroup_mma(xs, wk_s, gl.zeros([BM, D], gl.float32, ACC), use_acc=False, is_async=True)
                    v = warpgroup_mma(xs, wv_s, gl.zeros([BM, D], gl.float32, ACC), use_acc=False, is_async=True)
                    q = warpgroup_mma(xs, wa_s, gl.zeros([BM, D], gl.float32, ACC), use_acc=False, is_async=True)
                    x_res = xs.load(ACC)  # each thread reads the elements it overwrites with V below
                    k, v, q = warpgroup_mma_wait(num_outstanding=0, deps=[k, v, q])
                    if NT > 1:  # (a constant: with NT = 1, Triton 3.6 and 3.7 fail to lower these copies, unreached)
                        if t + 1 < NT:
                            _copy_rows(v_s.index(t + 1), src_b, t + 1, S, D)
                            async_copy.commit_group()
                    k_s.index(t).store(k.to(DT))
                    v_s.index(t).store(v.to(DT))
                    fence_async_shared()
                    _cta_barrier()
                    if t + 1 == NT and layer + 1 < n_layers:  # every warp is done with Wq, Wk, Wv
                        _copy_qkv(wa_s, wk_s, wv_s, w_l + LW, D)
                        async_copy.commit_group()
                    if t == 0:  # this layer's Wo, W1, W2 (the next tile's rows may be on their way)
                        if t + 1 < NT:
                            async_copy.wait_group(1)
                        else:
                            async_copy.wait_group(0)
                        fence_async_shared()
                        _cta_barrier()
                else:
                    xa = gl.convert_layout(gl.load(x_ptrs, mask=ok, other=0.0), A_OP)
                    q = warpgroup_mma(xa, wa_s, gl.zeros([BM, D], gl.float32, ACC), use_acc=False)
                qa = gl.convert_layout((q + gl.expand_dims(gl.load(v_l + cd), 0)).to(DT), A_OP)
                m_i, l_i, acc = _attend_start(BM, D, ACC)
                if CAUSAL:  # the causal mask on the diagonal key tile only
                    m_i, l_i, acc = _attend(qa, rows, k_s, v_s, kb_s, 0, t, m_i, l_i, acc, False, ACC, A_OP)
                    m_i, l_i, acc = _attend(qa, rows, k_s, v_s, kb_s, t, t + 1, m_i, l_i, acc, True, ACC, A_OP)
                else:
                    m_i, l_i, acc = _attend(qa, rows, k_s, v_s, kb_s, 0, NT, m_i, l_i, acc, False, ACC, A_OP)
                o = _attend_end(l_i, acc)
                if ONE_PASS:
                    if NT > 1:  # (a constant, as above)
                        if t + 1 == NT and layer + 1 < n_layers:  # V is done with: the next layer's first rows
                            _cta_barrier()
                            _copy_rows(v_s.index(0), a_b, 0, S, D)
                            async_copy.commit_group()
                    x = x_res.to(gl.float32)
                else:
                    # The residual is read again here rather than kept in registers through the key loop.
                    x = gl.load(x_ptrs, mask=ok, other=0.0).to(gl.float32)
                y = _out_and_ffn(o, x, v_l, wb_s, w1_s, w2_s, D, F, ACC, ACC_F, A_OP, A_OP_F)
                if layer + 1 < n_layers:
                    gl.store(_row_ptrs(a_b, rows, cd, D), y.to(DT), mask=ok)
                else:
                    y = _last_rows(y, l_i, rows, ok, _row_ptrs(a_b, rows, cd, D), m_b, S, v_ptr, n_layers * LV,
                                   D, FINAL_NORM, STORE_OUT, HAS_MASK, POOL, ACC)  # fmt: skip
                    if POOL != 0:
                        pooled = gl.maximum(pooled, gl.max(y, axis=0))
            if ONE_PASS and layer + 1 < n_layers:
                _cta_barrier()  # every warp is done with Wo, W1, W2 (and has stored its rows)
                if NT == 1:  # the next layer's rows are this tile's, only now stored
                    _copy_rows(v_s.index(0), a_b, 0, S, D)
                    async_copy.commit_group()
                _copy_out_ffn(wb_s, w1_s, w2_s, w_l + LW, D, F)
                async_copy.commit_group()

        if POOL != 0:
            _store_pool(pooled, b, pool_ptr, pw_ptr, pb_ptr, D_OUT, D, O_P, POOL_PROJ, ACC)

    @gluon.jit
    def _wait_and_count(cnt_ptr, n_before, count):
        """Wait until ``n_before`` programs have counted (``*cnt_ptr == n_before``), then count this one if
        ``count`` (a sequence's last tile is waited on by none: it skips the release and its fence).

        Stores of this program before the call are visible to any program that reads the count after it (a
        CTA barrier, then a release); after the call this program sees the stores of the programs counted
        before it (an acquire, then a CTA barrier)."""
        _cta_barrier()
        c = gl.atomic_add(cnt_ptr, 0, sem="acquire")
        while c < n_before:
            c = gl.atomic_add(cnt_ptr, 0, sem="acquire")
        _cta_barrier()
        if count:
            gl.atomic_add(cnt_ptr, 1, sem="release")

    @gluon.jit(do_not_specialize=["S", "n_layers", "D_OUT"])
    def _skut_wgmma_split_kernel(
        x_ptr, out_ptr, kv_ptr, mask_ptr, w_ptr, v_ptr, pool_ptr, pw_ptr, pb_ptr, sync_ptr, part_ptr, S, n_layers,
        D_OUT, D: gl.constexpr, F: gl.constexpr, NT: gl.constexpr, HAS_MASK: gl.constexpr, POOL: gl.constexpr,
        FINAL_NORM: gl.constexpr, STORE_OUT: gl.constexpr, POOL_PROJ: gl.constexpr, O_P: gl.constexpr,
    ):  # fmt: skip
        """Causal only: one program (one warp group) per (sequence, 64-row query tile), each running every
        layer on its own rows, kept in registers between layers. Per layer it computes its rows' K, V and Q
        together, hands K and V to the later tiles of its sequence through ``kv_ptr`` (one slot per layer, so
        no tile waits to reuse one), waits only for the earlier tiles' K and V of this layer and copies them
        into shared memory (asynchronously, from L2), then attends, projects and runs the FFN. A sequence's
        tiles thus run side by side on several SMs, each on a chain of one tile per layer.

        Programs take their (sequence, tile) from a ticket counter, not from the program id: a program waits
        only on programs that took a ticket before it, which are running or done, whatever order the GPU
        starts programs in. ``sync_ptr``: the ticket counter, then per sequence one counter per layer and a
        count of finished tiles, all zero at launch. With a pool, each tile leaves its max in ``part_ptr``
        and the last tile of a sequence to finish pools them."""
        BM: gl.constexpr = 64
        DT: gl.constexpr = w_ptr.dtype.element_ty
        LW: gl.constexpr = _layer_mats(D, F)
        LV: gl.constexpr = _layer_vecs(D, F)
        KV_L: gl.constexpr = 2 * NT * BM * D  # one layer's K and V of a sequence in kv_ptr, rows padded to tiles

        # Accumulators: wgmma's layout over one warp group (each warp 16 rows); A operands in registers.
        ACC: gl.constexpr = _acc_layout(D)
        ACC_F: gl.constexpr = _acc_layout(F)
        A_OP: gl.constexpr = _a_operand(D)
        A_OP_F: gl.constexpr = _a_operand(F)
        LOAD: gl.constexpr = _copy_layout(D)
        SH_DD: gl.constexpr = gl.NVMMASharedLayout.get_default_for([D, D], DT)
        SH_DF: gl.constexpr = gl.NVMMASharedLayout.get_default_for([D, F], DT)
        SH_FD: gl.constexpr = gl.NVMMASharedLayout.get_default_for([F, D], DT)
        SH_KV: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, D], DT)

        wq_s = gl.allocate_shared_memory(DT, [D, D], SH_DD)
        wk_s = gl.allocate_shared_memory(DT, [D, D], SH_DD)
        wv_s = gl.allocate_shared_memory(DT, [D, D], SH_DD)
        wo_s = gl.allocate_shared_memory(DT, [D, D], SH_DD)
        w1_s = gl.allocate_shared_memory(DT, [D, F], SH_DF)
        w2_s = gl.allocate_shared_memory(DT, [F, D], SH_FD)
        k_s = gl.allocate_shared_memory(DT, [NT, BM, D], SH_KV)
        v_s = gl.allocate_shared_memory(DT, [NT, BM, D], SH_KV)
        kb_s = gl.allocate_shared_memory(gl.float32, [NT, BM], gl.SwizzledSharedLayout(1, 1, 1, order=[0]))

        # Weights reach shared memory by asynchronous copies issued a step ahead: layer 0's here, the next
        # layer's Wq, Wk, Wv once this layer's K, V and Q are out, its Wo, W1, W2 once this layer's FFN is.
        _copy_qkv(wq_s, wk_s, wv_s, w_ptr, D)
        async_copy.commit_group()
        _copy_out_ffn(wo_s, w1_s, w2_s, w_ptr, D, F)
        async_copy.commit_group()
        ticket = gl.atomic_add(sync_ptr, 1)
        qt = ticket % NT
        b = (ticket // NT).to(gl.int64)
        seq_sync = sync_ptr + 1 + b * (n_layers + 1)
        m_b = mask_ptr + b * S
        rm = gl.arange(0, BM, layout=gl.SliceLayout(1, ACC))
        cd = gl.arange(0, D, layout=gl.SliceLayout(0, ACC))
        rows, ok = _tile(qt, rm, cd, S, D, BM)
        x = gl.load(_row_ptrs(x_ptr + b * S * D, rows, cd, D), mask=ok, other=0.0).to(gl.float32)
        _key_bias(kb_s, m_b, S, qt + 1, NT, HAS_MASK)  # the keys this tile may see
        kv_b = kv_ptr + b * n_layers * KV_L
        l_i = gl.zeros([BM], gl.float32, gl.SliceLayout(1, ACC))
        for layer in range(0, n_layers):
            v_l = v_ptr + layer * LV
            kv_l = kv_b + layer * KV_L
            async_copy.wait_group(1)  # this layer's Wq, Wk, Wv (its Wo, W1, W2 may still be on their way)
            fence_async_shared()
            _cta_barrier()
            xa = gl.convert_layout(x.to(DT), A_OP)
            k = warpgroup_mma(xa, wk_s, gl.zeros([BM, D], gl.float32, ACC), use_acc=False, is_async=True)
            v = warpgroup_mma(xa, wv_s, gl.zeros([BM, D], gl.float32, ACC), use_acc=False, is_async=True)
            q = warpgroup_mma(xa, wq_s, gl.zeros([BM, D], gl.float32, ACC), use_acc=False, is_async=True)
            k, v, q = warpgroup_mma_wait(num_outstanding=0, deps=[k, v, q])
            k = k.to(DT)
            v = v.to(DT)
            k_s.index(qt).store(k)
            v_s.index(qt).store(v)
            fence_async_shared()
            if qt + 1 < NT:  # later tiles of the sequence read them
                own = _row_ptrs(kv_l, qt * BM + rm, cd, D)
                gl.store(own, k)
                gl.store(own + NT * BM * D, v)
            _wait_and_count(seq_sync + layer, qt, qt + 1 < NT)  # this tile's K / V out, the earlier tiles' in
            if layer + 1 < n_layers:  # every warp is done with Wq, Wk, Wv: the next layer's on their way
                _copy_qkv(wq_s, wk_s, wv_s, w_ptr + (layer + 1) * LW, D)
                async_copy.commit_group()
            # The earlier tiles' K / V, written by other programs: from L2 (".cg"), never a stale L1 line; they
            # arrive while this tile attends to its own keys.
            lr = gl.arange(0, BM, layout=gl.SliceLayout(1, LOAD))
            lc = gl.arange(0, D, layout=gl.SliceLayout(0, LOAD))
            for j in range(0, qt):
                piece = _row_ptrs(kv_l, j * BM + lr, lc, D)  # 16 bytes per thread per step
                _async_load(k_s.index(j), piece, cache_modifier=".cg")
                _async_load(v_s.index(j), piece + NT * BM * D, cache_modifier=".cg")
            async_copy.commit_group()
            qa = gl.convert_layout((q + gl.expand_dims(gl.load(v_l + cd), 0)).to(DT), A_OP)
            m_i, l_i, acc = _attend_start(BM, D, ACC)
            m_i, l_i, acc = _attend(qa, rows, k_s, v_s, kb_s, qt, qt + 1, m_i, l_i, acc, True, ACC, A_OP)
            async_copy.wait_group(0)  # the earlier tiles' K / V, and this layer's Wo, W1, W2
            fence_async_shared()
            _cta_barrier()
            m_i, l_i, acc = _attend(qa, rows, k_s, v_s, kb_s, 0, qt, m_i, l_i, acc, False, ACC, A_OP)
            x = _out_and_ffn(_attend_end(l_i, acc), x, v_l, wo_s, w1_s, w2_s, D, F, ACC, ACC_F, A_OP, A_OP_F)
            _cta_barrier()  # every warp is done with Wo, W1, W2 and with the K / V tiles
            if layer + 1 < n_layers:
                _copy_out_ffn(wo_s, w1_s, w2_s, w_ptr + (layer + 1) * LW, D, F)
                async_copy.commit_group()

        y = _last_rows(x, l_i, rows, ok, _row_ptrs(out_ptr + b * S * D, rows, cd, D), m_b, S, v_ptr, n_layers * LV,
                       D, FINAL_NORM, STORE_OUT, HAS_MASK, POOL, ACC)  # fmt: skip
        if POOL != 0:
            gl.store(part_ptr + (b * NT + qt) * D + cd, gl.max(y, axis=0))
            _cta_barrier()
            done = gl.atomic_add(seq_sync + n_layers, 1, sem="acq_rel")
            if done == NT - 1:  # the sequence's last tile: every other tile's max is in
                _cta_barrier()
                pooled = gl.full([D], float("-inf"), gl.float32, gl.SliceLayout(0, ACC))
                for t in range(0, NT):
                    pooled = gl.maximum(pooled, gl.load(part_ptr + (b * NT + t) * D + cd, cache_modifier=".cg"))
                _store_pool(pooled, b, pool_ptr, pw_ptr, pb_ptr, D_OUT, D, O_P, POOL_PROJ, ACC)

    @gluon.jit
    def _copy_share(T: gl.constexpr, NT: gl.constexpr, wq_s, wk_s, wv_s, wo_s, w1_s, w2_s, bq_s, bo_s, b1_s, b2_s, w_l,
                    r_l, D: gl.constexpr, F: gl.constexpr):  # fmt: skip
        """Start copying tile T's share of a layer's six matrices (packed at ``w_l``) and its bias rows (at
        ``r_l``, ``PackedEncoder.rows``) into shared memory: the warp groups load a layer's weights together, the last
        tile's (the longest chain) the smallest share."""
        if NT == 2:
            if T == 0:
                _copy_qkv(wq_s, wk_s, wv_s, w_l, D)
                _copy_bias_rows(bq_s, bo_s, b1_s, b2_s, r_l, D, F)
            else:
                _copy_out_ffn(wo_s, w1_s, w2_s, w_l, D, F)
        else:
            if T == 0:
                _copy_async(wq_s, w_l, D, D)
                _copy_async(wk_s, w_l + D * D, D, D)
                _copy_bias_rows(bq_s, bo_s, b1_s, b2_s, r_l, D, F)
            elif T == 1:
                _copy_async(wv_s, w_l + 2 * D * D, D, D)
                _copy_async(wo_s, w_l + 3 * D * D, D, D)
            else:
                _copy_async(w1_s, w_l + 4 * D * D, D, F)
                _copy_async(w2_s, w_l + 4 * D * D + D * F, F, D)

    @gluon.jit
    def _gdc_wait():
        """Wait until the kernels this launch programmatically depends on have finished and their writes are
        visible (a no-op for a plain launch)."""
        gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32, is_pure=False, pack=1)

    @gluon.jit
    def _gdc_launch_dependents():
        """Let the launch that programmatically depends on this one start once every program has said so."""
        gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=gl.int32,
                                  is_pure=False, pack=1)  # fmt: skip

    @gluon.jit
    def _prefetch_l2(ptrs):
        """Ask L2 to fetch the lines that hold ``ptrs`` (a hint: nothing reaches registers or L1)."""
        gl.inline_asm_elementwise("prefetch.global.L2 [$1]; // dummy $0", "=r,l", [ptrs], dtype=gl.int32,
                                  is_pure=False, pack=1)  # fmt: skip

    @gluon.jit
    def _prefetch_sequence(x_ptr, mask_ptr, b, S, D: gl.constexpr, HAS_MASK: gl.constexpr):
        """Ask L2 for sequence b's rows ((S, D) 16-bit, S <= 256: 32 KB at most, one 128-byte line per element
        below) and its padding mask (S bytes). Safe before ``_gdc_wait``: L2 is where every SM's view of global
        memory meets, so lines fetched before the kernel before has written them are updated by its writes."""
        L: gl.constexpr = gl.BlockedLayout([2], [32], [4], [0])
        i = gl.arange(0, 256, layout=L)
        n = S * D
        _prefetch_l2(x_ptr + b * n + gl.minimum(i * 64, n - 1))
        if HAS_MASK:
            _prefetch_l2(mask_ptr + b * S + gl.minimum(i * 128, S - 1))

    @gluon.jit
    def _copy_bias_rows(bq_s, bo_s, b1_s, b2_s, r_l, D: gl.constexpr, F: gl.constexpr):
        """Start copying a layer's bias rows (``PackedEncoder.rows``: bq, bo, b2 as (16, D), then b1 as (16, F)) into
        shared memory."""
        R: gl.constexpr = _BIAS_ROWS_C
        _copy_async(bq_s, r_l, R, D)
        _copy_async(bo_s, r_l + R * D, R, D)
        _copy_async(b2_s, r_l + 2 * R * D, R, D)
        _copy_async(b1_s, r_l + 3 * R * D, R, F)

    @gluon.jit
    def _group_tile(T: gl.constexpr, NT: gl.constexpr, ptrs, S, n_layers, smem, D: gl.constexpr, F: gl.constexpr,
                    HAS_MASK: gl.constexpr, POOL: gl.constexpr, FINAL_NORM: gl.constexpr,
                    STORE_OUT: gl.constexpr, GDC: gl.constexpr):  # fmt: skip
        """One warp group's part of ``_skut_wgmma_groups_kernel``: query tile T of the program's sequence, every
        layer (the kernel pools the tiles' maxima after the join). ``ptrs``: the pointers it reads and writes,
        ``smem``: the kernel's shared buffers (both in the kernel's order).
        ``bars``: the weights of buffer 0 / 1 in (all shares), every tile done with a layer (with the pool's
        parts stored, in the last), then tile j's K / V of the current layer in (one each)."""
        x_ptr, out_ptr, mask_ptr, w_ptr, v_ptr, r_ptr = ptrs
        wq_s, wk_s, wv_s, wo_s, w1_s, w2_s, bq_s, bo_s, b1_s, b2_s, k_s, v_s, x_s, kx_s, ones_s, part_s, bars = smem
        BM: gl.constexpr = 64
        DT: gl.constexpr = w_ptr.dtype.element_ty
        LW: gl.constexpr = _layer_mats(D, F)
        LV: gl.constexpr = _layer_vecs(D, F)
        ACC: gl.constexpr = _acc_layout(D)
        ACC_F: gl.constexpr = _acc_layout(F)
        A_OP: gl.constexpr = _a_operand(D)
        A_OP_F: gl.constexpr = _a_operand(F)

        b = gl.program_id(0).to(gl.int64)
        m_b = mask_ptr + b * S
        rm = gl.arange(0, BM, layout=gl.SliceLayout(1, ACC))
        cd = gl.arange(0, D, layout=gl.SliceLayout(0, ACC))
        rows, ok = _tile(T, rm, cd, S, D, BM)
        xs = x_s.index(T)
        # This tile's rows and its share of layer 0's weights; its keys' biases. As a programmatic dependent (GDC)
        # the launch fetches the weights (constants of the stack) while the kernel before it finishes, and waits
        # for that kernel, whose outputs may be the rows and the mask, before the rest.
        if not GDC:
            _copy_rows(xs, x_ptr + b * S * D, T, S, D)
        _copy_share(T, NT, wq_s.index(0), wk_s.index(0), wv_s.index(0), wo_s.index(0), w1_s.index(0),
                    w2_s.index(0), bq_s.index(0), bo_s.index(0), b1_s.index(0), b2_s.index(0), w_ptr, r_ptr, D,
                    F)  # fmt: skip
        async_copy.commit_group()
        if GDC:
            _gdc_wait()
            _copy_rows(xs, x_ptr + b * S * D, T, S, D)
            async_copy.commit_group()
        _bias_columns(kx_s.index(T), m_b, S, T, HAS_MASK)
        qe = _ones_column(BM, kx_s.shape[2], DT, A_OP)
        qe_f = _ones_column(BM, kx_s.shape[2], DT, A_OP_F)
        LR: gl.constexpr = _BIAS_ROWS_C * (3 * D + F)
        for layer in range(0, n_layers):
            buf = layer % 2
            v_l = v_ptr + layer * LV
            if layer > 0:  # every tile is done with the last layer: its K / V slots and weight buffer are free
                mbarrier.wait(bars.index(2), (layer - 1) % 2)
            async_copy.wait_group(0)  # this tile's share of the layer's weights (and, first, its rows)
            fence_async_shared()
            _cta_barrier()
            mbarrier.arrive(bars.index(buf))
            if layer + 1 < n_layers:  # its share of the next layer's, into the other buffer
                nb = 1 - buf
                _copy_share(T, NT, wq_s.index(nb), wk_s.index(nb), wv_s.index(nb), wo_s.index(nb), w1_s.index(nb),
                            w2_s.index(nb), bq_s.index(nb), bo_s.index(nb), b1_s.index(nb), b2_s.index(nb),
                            w_ptr + (layer + 1) * LW, r_ptr + (layer + 1) * LR, D, F)  # fmt: skip
                async_copy.commit_group()
            mbarrier.wait(bars.index(buf), (layer // 2) % 2)  # every share of this layer's weights
            k = warpgroup_mma(xs, wk_s.index(buf), gl.zeros([BM, D], gl.float32, ACC), use_acc=False, is_async=True)
            v = warpgroup_mma(xs, wv_s.index(buf), gl.zeros([BM, D], gl.float32, ACC), use_acc=False, is_async=True)
            q = warpgroup_mma(xs, wq_s.index(buf), gl.zeros([BM, D], gl.float32, ACC), use_acc=False, is_async=True)
            q = warpgroup_mma(qe, bq_s.index(buf), q, is_async=True)  # Q's bias
            k, v, q = warpgroup_mma_wait(num_outstanding=0, deps=[k, v, q])
            k_s.index(T).store(k.to(DT))
            v_s.index(T).store(v.to(DT))
            fence_async_shared()
            _cta_barrier()
            if T + 1 < NT:  # the later tiles' wait
                mbarrier.arrive(bars.index(3 + T))
            qa = gl.convert_layout(q.to(DT), A_OP)
            l_i, acc = _attend_rows(qa, qe, rows, k_s, v_s, kx_s, ones_s, bars, layer % 2, T, ACC, A_OP)
            y = _out_and_ffn_rows(_attend_end(l_i, acc), xs.load(ACC).to(gl.float32), v_l, wo_s.index(buf),
                                  w1_s.index(buf), w2_s.index(buf), bo_s.index(buf), b1_s.index(buf), b2_s.index(buf),
                                  qe, qe_f, D, F, ACC, ACC_F, A_OP, A_OP_F)  # fmt: skip
            if layer + 1 < n_layers:
                xs.store(y.to(DT))  # the next layer's rows (this tile's own)
            else:
                y = _last_rows(y, l_i, rows, ok, _row_ptrs(out_ptr + b * S * D, rows, cd, D), m_b, S, v_ptr,
                               n_layers * LV, D, FINAL_NORM, STORE_OUT, HAS_MASK, POOL, ACC)  # fmt: skip
                if POOL != 0:  # this tile's max; the kernel pools the tiles' after the partitions join
                    part_s.index(T).store(gl.max(y, axis=0))
            _cta_barrier()  # every warp of the tile is done with the layer
            mbarrier.arrive(bars.index(2))

    @gluon.jit(do_not_specialize=["S", "n_layers", "D_OUT"])
    def _skut_wgmma_groups_kernel(
        x_ptr, out_ptr, mask_ptr, w_ptr, v_ptr, pool_ptr, pw_ptr, pb_ptr, r_ptr, S, n_layers, D_OUT,
        D: gl.constexpr, F: gl.constexpr, NT: gl.constexpr, HAS_MASK: gl.constexpr, POOL: gl.constexpr,
        FINAL_NORM: gl.constexpr, STORE_OUT: gl.constexpr, POOL_PROJ: gl.constexpr, O_P: gl.constexpr,
        GDC: gl.constexpr, PREFETCH: gl.constexpr,
    ):  # fmt: skip
        """Causal only, 2 or 3 query tiles: one program per sequence, one warp group per 64-row query tile
        (``_group_tile``), each running every layer on its own rows. A tile hands its K / V to the later tiles
        through shared memory and an mbarrier; the warp groups run apart, not in step, so one tile's
        exponentials overlap another's products. Weights are double-buffered by layer, each warp group
        copying a share; a layer's buffers are reused once every tile is done with the layer before.
        ``PREFETCH`` (with ``GDC``): this program's sequence asked of L2 before the wait (the module's constant)."""
        if GDC:  # every program has started: the next launch may be placed as SMs free up
            _gdc_launch_dependents()
            if PREFETCH:
                _prefetch_sequence(x_ptr, mask_ptr, gl.program_id(0).to(gl.int64), S, D, HAS_MASK)
        BM: gl.constexpr = 64
        DT: gl.constexpr = w_ptr.dtype.element_ty
        SH_DD: gl.constexpr = gl.NVMMASharedLayout.get_default_for([D, D], DT)
        SH_DF: gl.constexpr = gl.NVMMASharedLayout.get_default_for([D, F], DT)
        SH_FD: gl.constexpr = gl.NVMMASharedLayout.get_default_for([F, D], DT)
        SH_KV: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BM, D], DT)
        FLAT: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, order=[0])
        wq_s = gl.allocate_shared_memory(DT, [2, D, D], SH_DD)
        wk_s = gl.allocate_shared_memory(DT, [2, D, D], SH_DD)
        wv_s = gl.allocate_shared_memory(DT, [2, D, D], SH_DD)
        wo_s = gl.allocate_shared_memory(DT, [2, D, D], SH_DD)
        w1_s = gl.allocate_shared_memory(DT, [2, D, F], SH_DF)
        w2_s = gl.allocate_shared_memory(DT, [2, F, D], SH_FD)
        # the bias rows (``PackedEncoder.rows``): one 16-wide k-step of Q's, the out projection's and the FFN's products
        R: gl.constexpr = _BIAS_ROWS_C
        SH_RD: gl.constexpr = gl.NVMMASharedLayout.get_default_for([R, D], DT)
        bq_s = gl.allocate_shared_memory(DT, [2, R, D], SH_RD)
        bo_s = gl.allocate_shared_memory(DT, [2, R, D], SH_RD)
        b2_s = gl.allocate_shared_memory(DT, [2, R, D], SH_RD)
        b1_s = gl.allocate_shared_memory(DT, [2, R, F], gl.NVMMASharedLayout.get_default_for([R, F], DT))
        k_s = gl.allocate_shared_memory(DT, [NT, BM, D], SH_KV)
        v_s = gl.allocate_shared_memory(DT, [NT, BM, D], SH_KV)
        x_s = gl.allocate_shared_memory(DT, [NT, BM, D], SH_KV)
        # each key tile's bias columns (``_bias_columns``): one 16-wide k-step of the score products
        kx_s = gl.allocate_shared_memory(DT, [NT, BM, 16], gl.NVMMASharedLayout.get_default_for([BM, 16], DT))
        ones_s = gl.allocate_shared_memory(DT, [BM, 8], gl.NVMMASharedLayout.get_default_for([BM, 8], DT))
        part_s = gl.allocate_shared_memory(gl.float32, [NT, D], FLAT)
        bars = gl.allocate_shared_memory(gl.int64, [3 + NT, 1], mbarrier.MBarrierLayout())
        mbarrier.init(bars.index(0), count=NT)
        mbarrier.init(bars.index(1), count=NT)
        mbarrier.init(bars.index(2), count=NT)
        for j in gl.static_range(NT):
            mbarrier.init(bars.index(3 + j), count=1)
        ones_s.store(gl.full([BM, 8], 1.0, DT, gl.BlockedLayout([1, 8], [32, 1], [4, 1], [1, 0])))
        fence_async_shared()
        _cta_barrier()
        ptrs = (x_ptr, out_ptr, mask_ptr, w_ptr, v_ptr, r_ptr)
        smem = (wq_s, wk_s, wv_s, wo_s, w1_s, w2_s, bq_s, bo_s, b1_s, b2_s, k_s, v_s, x_s, kx_s, ones_s, part_s, bars)
        # (Each partition's tuple spelled out: a tuple built first and concatenated loses the constexprs. The last
        # tile, the longest chain, runs in the default partition. With three tiles the registers are split by need,
        # not evenly, per thread: tile 0 (one key tile of scores) 144, tile 1 (two) 160, the default partition the
        # rest, 200 (65,536 registers over three warp groups of 128 threads). At 168 each, the last tile spilled
        # 116 instructions' worth in the runtime's pooled form and 12 in the plain one; now 8 and 2, and the pooled
        # form runs 1.03x faster.)
        if NT == 2:
            gl.warp_specialize([
                (_group_tile, (1, 2, ptrs, S, n_layers, smem, D, F, HAS_MASK, POOL, FINAL_NORM, STORE_OUT, GDC)),
                (_group_tile, (0, 2, ptrs, S, n_layers, smem, D, F, HAS_MASK, POOL, FINAL_NORM, STORE_OUT, GDC)),
            ], [4], [168])  # fmt: skip
        else:
            gl.warp_specialize([
                (_group_tile, (2, 3, ptrs, S, n_layers, smem, D, F, HAS_MASK, POOL, FINAL_NORM, STORE_OUT, GDC)),
                (_group_tile, (0, 3, ptrs, S, n_layers, smem, D, F, HAS_MASK, POOL, FINAL_NORM, STORE_OUT, GDC)),
                (_group_tile, (1, 3, ptrs, S, n_layers, smem, D, F, HAS_MASK, POOL, FINAL_NORM, STORE_OUT, GDC)),
            ], [4, 4], [144, 160])  # fmt: skip
        if POOL != 0:
            # Every tile's max, read behind the join (a barrier over all the kernel's threads). Read by the last
            # tile behind the layer mbarrier instead, racecheck reported the hand-over (cause not identified).
            ACC: gl.constexpr = _acc_layout(D)
            pooled = part_s.index(0).load(gl.SliceLayout(0, ACC))
            for j in gl.static_range(1, NT):
                pooled = gl.maximum(pooled, part_s.index(j).load(gl.SliceLayout(0, ACC)))
            _store_pool(pooled, gl.program_id(0).to(gl.int64), pool_ptr, pw_ptr, pb_ptr, D_OUT, D, O_P, POOL_PROJ,
                        ACC)  # fmt: skip


def launch(
    x: torch.Tensor, act: torch.Tensor, mask: torch.Tensor, packed, pooled: torch.Tensor,  # noqa: ANN001
    pool_w: torch.Tensor, pool_b: torch.Tensor, d_out: int, causal: bool, has_mask: bool, pool: int,
    store_out: bool, pool_proj: bool, o_p: int,
):  # noqa: ANN201 (Triton's compiled kernel)
    """One program per sequence; arguments as ``skut_forward`` prepares them for ``skut._skut_kernel``.

    A causal stack of at most two sequences per SM takes the one-pass form (every program is resident at
    once, so the capped form's third program per SM would not be used)."""
    bsz, s, _ = x.shape
    one_pass = bool(causal) and bsz <= 2 * sm_count(x.device)
    return _skut_wgmma_kernel[(bsz,)](
        x, act, mask, packed.mats, packed.vecs, pooled, pool_w, pool_b, s, packed.n_layers, d_out,
        D=D_MODEL, F=packed.ff_pad, NT=-(-s // BLOCK), CAUSAL=causal, HAS_MASK=has_mask, POOL=pool,
        FINAL_NORM=packed.final_norm, STORE_OUT=store_out, POOL_PROJ=pool_proj, O_P=o_p, ONE_PASS=one_pass,
        num_warps=4, maxnreg=None if one_pass else MAX_REGS,
    )  # fmt: skip


def split_workspace_numel(batch: int, seq_len: int, n_layers: int) -> int:
    """Elements of K / V scratch that ``launch_split`` needs: every layer's K and V of every sequence, rows
    padded to whole tiles."""
    return batch * n_layers * 2 * -(-seq_len // BLOCK) * BLOCK * D_MODEL


def launch_split(
    x: torch.Tensor, out: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor, packed, pooled: torch.Tensor,  # noqa: ANN001
    pool_w: torch.Tensor, pool_b: torch.Tensor, d_out: int, has_mask: bool, pool: int, store_out: bool,
    pool_proj: bool, o_p: int,
):  # noqa: ANN201 (Triton's compiled kernel)
    """One program per (sequence, 64-row query tile) of a causal stack (``_skut_wgmma_split_kernel``); ``kv``
    holds ``split_workspace_numel`` elements of x's dtype."""
    bsz, s, _ = x.shape
    n_qt = -(-s // BLOCK)
    # Counters zeroed by every call (so every graph replay is a fresh launch); each tile's pool max.
    sync = torch.zeros(1 + bsz * (packed.n_layers + 1), dtype=torch.int32, device=x.device)
    part = torch.empty(bsz * n_qt * D_MODEL if pool else 1, dtype=torch.float32, device=x.device)
    return _skut_wgmma_split_kernel[(bsz * n_qt,)](
        x, out, kv, mask, packed.mats, packed.vecs, pooled, pool_w, pool_b, sync, part, s, packed.n_layers, d_out,
        D=D_MODEL, F=packed.ff_pad, NT=n_qt, HAS_MASK=has_mask, POOL=pool, FINAL_NORM=packed.final_norm,
        STORE_OUT=store_out, POOL_PROJ=pool_proj, O_P=o_p, num_warps=4,
    )  # fmt: skip


def launch_groups(
    x: torch.Tensor, out: torch.Tensor, mask: torch.Tensor, packed, pooled: torch.Tensor,  # noqa: ANN001
    pool_w: torch.Tensor, pool_b: torch.Tensor, d_out: int, has_mask: bool, pool: int, store_out: bool,
    pool_proj: bool, o_p: int, dependent: bool | None = None,
):  # noqa: ANN201 (Triton's compiled kernel)
    """One program per sequence of a causal stack of 2-3 query tiles (65-192 tokens), one warp group per tile
    (``_skut_wgmma_groups_kernel``); arguments as ``launch_split`` takes them, without its scratch.

    ``dependent``: launch as the programmatic dependent of the kernel before it in the stream (PDL): the programs
    start, and fetch the packed weights, while that kernel's last programs run, then wait for it to finish before
    reading anything else (so ``packed`` must not be written by the kernel just before: ``pack_encoder_weights``
    writes it by a copy); and they let a dependent launch after them start likewise. None: for launches of at
    most ``DEPENDENT_WAVES`` waves, where that overlap is ~1 µs of each launch; with more, the rows fetched after
    the weights cost more than the overlap gives. As a dependent, each program asks L2 for its sequence before the
    wait (``PREFETCH``)."""
    bsz, s, _ = x.shape
    if not groups_fit(s):
        raise ValueError(f"launch_groups runs 2-{MAX_GROUPS} query tiles of {BLOCK} rows, got S={s}")
    if dependent is None:
        dependent = bsz <= DEPENDENT_WAVES * sm_count(x.device)
    n_qt = -(-s // BLOCK)
    return _skut_wgmma_groups_kernel[(bsz,)](
        x, out, mask, packed.mats, packed.vecs, pooled, pool_w, pool_b, packed.rows, s, packed.n_layers, d_out,
        D=D_MODEL, F=packed.ff_pad, NT=n_qt, HAS_MASK=has_mask, POOL=pool, FINAL_NORM=packed.final_norm,
        STORE_OUT=store_out, POOL_PROJ=pool_proj, O_P=o_p, GDC=dependent,
        PREFETCH=PREFETCH, launch_pdl=dependent, num_warps=4,
    )  # fmt: skip

