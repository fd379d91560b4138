"""The transformer stack on Hopper's warp-group MMA (wgmma), written in Gluon: ``skut``'s per-sequence launch
for TransAct V2's shape (d_model 64, one head, FFN up to 64, sequences up to 256 tokens).

Why a second kernel: with mma.sync (``skut._skut_kernel``) every warp holds whole weight and K/V tiles as
matrix operands in registers, which costs ~255 registers per thread and keeps the L1 / shared-memory pipe
busy; Triton 3.6's own wgmma lowering of that kernel miscomputes or faults at 64-row tiles
(benchmarks/RESULTS.md). Here the layouts are spelled out: wgmma reads its B operand (weights, K, V)
straight from shared memory, shared by the warp group, and its A operand (rows, Q, probabilities) from
registers.

One program (one warp group) per sequence, every layer. Per layer, in two passes:
1. Wk and Wv into shared memory; K and V of every row into shared memory (the whole sequence: 64-row tiles,
   rows past S as zeros). Padded keys stay in place, masked by a per-key bias worked out once per sequence
   (they are not compacted as in ``skut``).
2. Wq, Wo, W1, W2 into shared memory (reusing Wk's and Wv's buffers: 72 KB in all for 192 tokens, so three
   programs fit on an SM at 168 registers); then query tile after query tile: Q, flash attention over the
   key tiles it may see (online softmax in base 2; the scale and log2(e) are in Wq), out projection with
   the residual, LayerNorm, FFN, LayerNorm; the rows go to the activation buffer (the next layer's input)
   or, in the last layer, to the output and the pool.
A causal stack of few enough sequences that two programs per SM hold them all (``launch``) runs one pass per
layer instead: all six matrices stay in shared memory (~89 KB), and each tile computes its own K, V and Q
together (three asynchronous products) before its attention, since a causal tile needs no later tile's keys;
registers are not capped there.

Same function and conventions as ``skut._skut_kernel`` (packed weights from ``pack_encoder_weights``,
fully masked rows are zeros, pools, ``pool_proj``). Gluon has no interpreter: the kernel runs on sm_90
only and is checked by tests/gpu against the float64 reference; ``skut_forward`` uses it where
``skut.choose_config`` sets ``wgmma``.
"""

from __future__ import annotations

import torch
import triton

from . import sm_count

try:  # Gluon ships with Triton 3.5+; its barrier was renamed in 3.9
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

    _cta_barrier = gl.barrier if hasattr(gl, "barrier") else gl.thread_barrier
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


def supported(packed, seq_len: int, device: torch.device) -> bool:  # noqa: ANN001 (PackedEncoder)
    """Whether this kernel can run the stack: Gluon in a Triton of ``TRITON_RANGE``, an sm_90 GPU, V2's shape,
    16-bit weights."""
    return (
        HAVE_GLUON and triton_version_ok(triton.__version__)
        and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9
        and packed.d_model == D_MODEL and packed.n_heads == 1 and packed.ff_pad <= MAX_FF
        and packed.dtype in (torch.float16, torch.bfloat16) and 0 < seq_len <= MAX_SEQ
    )  # fmt: skip


if HAVE_GLUON:

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
        LW: gl.constexpr = 4 * D * D + 2 * D * F
        LV: gl.constexpr = 9 * D + F + 2
        OFF_BO: gl.constexpr = 3 * D
        OFF_B1: gl.constexpr = OFF_BO + 3 * D
        OFF_B2: gl.constexpr = OFF_B1 + F
        OFF_EPS: gl.constexpr = OFF_B2 + 3 * D

        # Accumulators: wgmma's layout over one warp group (each warp 16 rows); A operands in registers.
        ACC: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, D, 16])
        ACC_F: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                        instr_shape=[16, F, 16])  # fmt: skip
        A_OP: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=ACC, k_width=2)
        A_OP_F: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=ACC_F, k_width=2)
        LOAD: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[4, 8], warps_per_cta=[4, 1],
                                              order=[1, 0])  # fmt: skip
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
        cf = gl.arange(0, F, layout=gl.SliceLayout(0, ACC_F))
        kn = gl.arange(0, BM, layout=gl.SliceLayout(0, ACC))
        pooled = gl.full([D], float("-inf"), gl.float32, gl.SliceLayout(0, ACC))
        for t in range(0, NT):
            kidx = t * BM + kn
            key_ok = kidx < S
            if HAS_MASK:
                key_ok = key_ok & (gl.load(m_b + kidx, mask=key_ok, other=1) == 0)
            kb_s.index(t).store(gl.where(key_ok, 0.0, float("-inf")))

        for layer in range(0, n_layers):
            w_l = w_ptr + layer * LW
            v_l = v_ptr + layer * LV
            src_b = a_b
            if layer == 0:
                src_b = x_b
            _cta_barrier()  # every warp is done with the last layer's weights, K / V and rows
            if ONE_PASS:
                _stage(wk_s, w_l + D * D, D, D, LOAD)
                _stage(wv_s, w_l + 2 * D * D, D, D, LOAD)
            else:
                _stage(wa_s, w_l + D * D, D, D, LOAD)
                _stage(wb_s, w_l + 2 * D * D, D, D, LOAD)
                fence_async_shared()
                _cta_barrier()
                for t in range(0, NT):
                    rows, ok = _tile(t, rm, cd, S, D, BM)
                    xa = gl.convert_layout(gl.load(_row_ptrs(src_b, rows, cd, D), mask=ok, other=0.0), A_OP)
                    k = warpgroup_mma(xa, wa_s, gl.zeros([BM, D], gl.float32, ACC), use_acc=False)
                    v = warpgroup_mma(xa, wb_s, gl.zeros([BM, D], gl.float32, ACC), use_acc=False)
                    k_s.index(t).store(k.to(DT))
                    v_s.index(t).store(v.to(DT))
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
                xa = gl.convert_layout(gl.load(x_ptrs, mask=ok, other=0.0), A_OP)
                if ONE_PASS:
                    # Causal: this tile's keys are the last it needs. Its K, V and Q are in flight together.
                    k = warpgroup_mma(xa, wk_s, gl.zeros([BM, D], gl.float32, ACC), use_acc=False, is_async=True)
                    v = warpgroup_mma(xa, wv_s, gl.zeros([BM, D], gl.float32, ACC), use_acc=False, is_async=True)
                    q = warpgroup_mma(xa, wa_s, gl.zeros([BM, D], gl.float32, ACC), use_acc=False, is_async=True)
                    k, v, q = warpgroup_mma_wait(num_outstanding=0, deps=[k, v, q])
                    k_s.index(t).store(k.to(DT))
                    v_s.index(t).store(v.to(DT))
                    fence_async_shared()
                    _cta_barrier()
                else:
                    q = warpgroup_mma(xa, wa_s, gl.zeros([BM, D], gl.float32, ACC), use_acc=False)
                qa = gl.convert_layout((q + gl.expand_dims(gl.load(v_l + cd), 0)).to(DT), A_OP)
                m_i = gl.full([BM], -1.0e30, gl.float32, gl.SliceLayout(1, ACC))
                l_i = gl.zeros([BM], gl.float32, gl.SliceLayout(1, ACC))
                acc = gl.zeros([BM, D], gl.float32, ACC)
                n_kt = t * 0 + NT
                if CAUSAL:
                    n_kt = t + 1
                for j in range(0, n_kt):
                    s = warpgroup_mma(qa, k_s.index(j).permute((1, 0)), gl.zeros([BM, BM], gl.float32, ACC),
                                      use_acc=False)  # fmt: skip
                    s = s + gl.expand_dims(kb_s.index(j).load(gl.SliceLayout(0, ACC)), 0)
                    if CAUSAL:
                        s = gl.where(gl.expand_dims(j * BM + kn, 0) <= gl.expand_dims(rows, 1), s, float("-inf"))
                    m_new = gl.maximum(m_i, gl.max(s, axis=1))
                    alpha = gl.exp2(m_i - m_new)
                    p = gl.exp2(s - gl.expand_dims(m_new, 1))
                    l_i = l_i * alpha + gl.sum(p, axis=1)
                    acc = warpgroup_mma(gl.convert_layout(p.to(DT), A_OP), v_s.index(j), acc * gl.expand_dims(alpha, 1))
                    m_i = m_new
                # A row that saw no valid key gets a zero attention output (never 0/0).
                inv_l = gl.where(l_i > 0, 1.0 / gl.maximum(l_i, 1e-30), 0.0)
                oa = gl.convert_layout((acc * gl.expand_dims(inv_l, 1)).to(DT), A_OP)
                # The residual is read again here rather than kept in registers through the key loop.
                x = gl.load(x_ptrs, mask=ok, other=0.0).to(gl.float32)
                attn = warpgroup_mma(oa, wb_s, x + gl.expand_dims(gl.load(v_l + OFF_BO + cd), 0))
                x = _layernorm(attn, v_l, OFF_BO + D, OFF_BO + 2 * D, gl.load(v_l + OFF_EPS), D, ACC)
                hid = warpgroup_mma(gl.convert_layout(x.to(DT), A_OP_F), w1_s, gl.zeros([BM, F], gl.float32, ACC_F),
                                    use_acc=False)  # fmt: skip
                hid = gl.maximum(hid + gl.expand_dims(gl.load(v_l + OFF_B1 + cf), 0), 0.0)
                ff = warpgroup_mma(gl.convert_layout(hid.to(DT), A_OP), w2_s,
                                   x + gl.expand_dims(gl.load(v_l + OFF_B2 + cd), 0))  # fmt: skip
                y = _layernorm(ff, v_l, OFF_B2 + D, OFF_B2 + 2 * D, gl.load(v_l + OFF_EPS + 1), D, ACC)
                if layer + 1 < n_layers:
                    gl.store(_row_ptrs(a_b, rows, cd, D), y.to(DT), mask=ok)
                else:
                    if FINAL_NORM:
                        f_off = n_layers * LV  # the final norm's vectors follow every layer's
                        y = _layernorm(y, v_ptr, f_off, f_off + D, gl.load(v_ptr + f_off + 2 * D), D, ACC)
                    y = gl.where(gl.expand_dims(l_i > 0, 1), y, 0.0)  # rows that may see no key: zeros
                    if STORE_OUT:
                        gl.store(_row_ptrs(a_b, rows, cd, D), y.to(DT), mask=ok)
                    if POOL != 0:
                        keep = rows < S
                        if POOL == 1 and HAS_MASK:
                            keep = keep & (gl.load(m_b + rows, mask=keep, other=1) == 0)
                        tile_max = gl.max(gl.where(gl.expand_dims(keep, 1), y, float("-inf")), axis=0)
                        pooled = gl.maximum(pooled, tile_max)

        if POOL != 0:
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
                gl.store(pool_ptr + b * D + cd, pooled.to(pool_ptr.dtype.element_ty))


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
