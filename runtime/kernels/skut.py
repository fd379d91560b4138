"""A whole ``nn.TransformerEncoder`` stack in one Triton launch (DESIGN §2.4 step 4, §4).

Same function as ``nn.TransformerEncoderLayer`` (post-norm, ReLU, biases, affine LayerNorm,
batch-first) stacked ``n_layers`` times, with a causal mask and/or a boolean key-padding mask
(True = ignore), any sequence length, d_model 32-128 (any d up to 128), 1-4 heads, FFN 16-256.

Semantics beyond PyTorch's: a query row that can see no key at all (every key it may attend to is
padded) is *fully masked*. PyTorch returns NaN there (and the NaN then leaks into later layers);
here that row's output is exactly zero, and so is its contribution to ``pool="max_all"``. Such a row
is always a padded position itself, so it is never a key of another row and no other row changes.
``skut_reference`` defines this with the real PyTorch modules, layer by layer.

Kernel design: one program per sequence runs every layer. Per layer it walks query tiles of
BLOCK_M rows: Q projection, flash-style attention (online softmax in base 2 with the softmax scale
and log2(e) folded into Wq) over key tiles of the layer's K/V, out projection, residual + LayerNorm,
FFN (in chunks of the hidden width), residual + LayerNorm, then directly the next layer's K/V
for these rows. K/V live in a small per-sequence global scratch (double-buffered across layers,
L2-resident for typical sizes), activations between layers in the output buffer; a CTA barrier
separates layers. K/V hold the valid (non-padded) keys only, compacted in position order (each row's
slot is worked out once per sequence and kept in the workspace), so padded keys cost nothing: a
causal query row attends to the first ``nvis`` slots (the valid keys at or before it), any other
row to all of them, and key tiles wholly below every row's limit of a query tile run without masks
(only the diagonal tiles and the last one test slots). K's bias is left out and V's folded into the
out projection's at packing (``pack_encoder_weights`` says why).

A causal stack of few sequences (fewer than the GPU has SMs) takes the split launch instead: one program
per (sequence, query tile), each running every layer on its own rows and waiting, per layer, only for the
earlier tiles' K/V (``_skut_split_kernel``), so a sequence's tiles run side by side.

On H100 / H200 the V2 module's shape (d_model 64, one head, FFN up to 64, up to 256 tokens, 16-bit weights)
takes ``skut_wgmma`` instead (where ``choose_config`` sets ``wgmma``): both launches written again in Gluon,
whose products read weights, K and V from shared memory through Hopper's warp-group MMA.

Weights are packed once (``pack_encoder_weights``): transposed, zero-padded to powers of two, per head, matrices in the
compute dtype and vectors in fp32, all in one contiguous byte buffer. Matrix products use
mma.sync (see ``runtime.kernels.mma_sync_only``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl
from torch import nn

from . import interpreting, mma_sync_only, skut_wgmma, sm_count

__all__ = [
    "PackedEncoder",
    "SkutConfig",
    "pack_encoder_weights",
    "skut_forward",
    "skut_reference",
    "skut_torch",
    "choose_config",
    "workspace_numel",
    "POOL_MODES",
    "SWEEP_CONFIGS",
]

POOL_MODES = (None, "max_valid", "max_all")
_LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------
# Weight packing
# --------------------------------------------------------------------------------------------
@dataclass
class PackedEncoder:
    """All layers' parameters, packed once at load time.

    ``buffer`` is one contiguous uint8 allocation; ``mats`` (compute dtype) and ``vecs`` (fp32) are
    views into it. Layout per layer, matrices: WqT, WkT, WvT as (H, D_P, DH_P); WoT (H, DH_P, D_P);
    W1T (D_P, F_P); W2T (F_P, D_P). Vectors: bq, bk, bv (H, DH_P); bo, ln1 weight, ln1 bias (D_P);
    b1 (F_P); b2, ln2 weight, ln2 bias (D_P); ln1 eps, ln2 eps. Then the optional final norm:
    weight, bias (D_P), eps. Wq and bq carry the factor log2(e) / sqrt(head_dim). bk and bv are
    zero: K's bias cancels in the softmax and V's is folded into bo (``pack_encoder_weights``).
    ``rows`` (compute dtype), per layer, the bias rows of ``skut_wgmma``'s grouped launch, which adds
    biases by one more k-step of a product: bq (H * DH_P), bo, b2 (D_P), b1 (F_P), each as
    (``skut_wgmma.BIAS_ROWS``, width) with the bias split into ``BIAS_TERMS`` terms of the dtype in
    its first rows (each the rounding of what the terms before leave), zeros below.
    """

    buffer: torch.Tensor
    mats: torch.Tensor
    vecs: torch.Tensor
    rows: torch.Tensor
    dtype: torch.dtype
    n_layers: int
    d_model: int
    n_heads: int
    d_ff: int
    final_norm: bool

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def d_pad(self) -> int:
        return _pad_dim(self.d_model)

    @property
    def dh_pad(self) -> int:
        return _pad_dim(self.head_dim)

    @property
    def ff_pad(self) -> int:
        return _pad_dim(self.d_ff)

    def to(self, device: torch.device | str) -> PackedEncoder:
        """A copy on another device (the views are rebuilt over the moved buffer)."""
        buf = self.buffer.to(device)

        def view(t: torch.Tensor) -> torch.Tensor:
            off = t.data_ptr() - self.buffer.data_ptr()
            return buf[off : off + t.numel() * t.element_size()].view(t.dtype).view(t.shape)

        return PackedEncoder(
            buf, view(self.mats), view(self.vecs), view(self.rows), self.dtype, self.n_layers, self.d_model,
            self.n_heads, self.d_ff, self.final_norm,
        )  # fmt: skip


def _pad_dim(n: int) -> int:
    return max(16, triton.next_power_of_2(n))


def _bias_rows(vecs: torch.Tensor, n: int, lv: int, widths: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``PackedEncoder.rows`` (float64 values of ``dtype``) from the packed float64 vectors: per layer, bq, bo, b2,
    b1 (of ``widths``: H * DH_P, D_P, F_P) as blocks of ``skut_wgmma.BIAS_ROWS`` rows."""
    hq, d_p, f_p = widths
    per_layer = vecs[: n * lv].view(n, lv)
    blocks = []
    for off, width in ((0, hq), (3 * hq, d_p), (3 * hq + 3 * d_p + f_p, d_p), (3 * hq + 3 * d_p, f_p)):
        rest = per_layer[:, off : off + width].to(torch.float32).double()  # what the fp32 vectors hold
        terms = torch.zeros(n, skut_wgmma.BIAS_ROWS, width, dtype=torch.float64)
        for t in range(skut_wgmma.BIAS_TERMS):
            terms[:, t] = rest.to(dtype).double()
            rest = rest - terms[:, t]
        blocks.append(terms.flatten(1))
    return torch.cat(blocks, 1)


def _layer_sizes(h: int, d_p: int, dh_p: int, f_p: int) -> tuple[int, int]:
    mats = 4 * h * d_p * dh_p + 2 * d_p * f_p
    vecs = 3 * h * dh_p + 6 * d_p + f_p + 2
    return mats, vecs


def _check_layer(layer: nn.Module, i: int) -> None:
    if not isinstance(layer, nn.TransformerEncoderLayer):
        raise ValueError(
            f"encoder.layers[{i}] must be an nn.TransformerEncoderLayer, got {type(layer).__name__}"
        )
    if layer.norm_first:
        raise ValueError(f"encoder.layers[{i}] uses norm_first=True; only post-norm layers are supported")
    act = getattr(layer, "activation_relu_or_gelu", 0)
    if (
        act != 1
        and layer.activation is not torch.nn.functional.relu
        and not isinstance(layer.activation, nn.ReLU)
    ):
        raise ValueError(f"encoder.layers[{i}] activation must be ReLU, got {layer.activation}")
    if not layer.self_attn._qkv_same_embed_dim:
        raise ValueError(f"encoder.layers[{i}].self_attn must use one in_proj_weight (kdim = vdim = d_model)")


def pack_encoder_weights(
    encoder: nn.TransformerEncoder | nn.TransformerEncoderLayer,
    dtype: torch.dtype = torch.float16,
    device: torch.device | str | None = None,
) -> PackedEncoder:
    """Flatten every layer's parameters into one contiguous buffer, once (at load time).

    Args:
        encoder: an ``nn.TransformerEncoder`` (or a single layer) of post-norm ReLU layers.
        dtype: compute dtype of the matrices (float16, bfloat16 or float32).
        device: where the buffer lives (default: the encoder's device).
    """
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
    if isinstance(encoder, nn.TransformerEncoderLayer):
        layers, final = [encoder], None
    elif isinstance(encoder, nn.TransformerEncoder):
        layers, final = list(encoder.layers), encoder.norm
    else:
        raise ValueError(f"encoder must be an nn.TransformerEncoder, got {type(encoder).__name__}")
    if not layers:
        raise ValueError("encoder has no layers")
    for i, layer in enumerate(layers):
        _check_layer(layer, i)
    first = layers[0]
    d = first.self_attn.embed_dim
    h = first.self_attn.num_heads
    f = first.linear1.out_features
    for i, layer in enumerate(layers):
        if (layer.self_attn.embed_dim, layer.self_attn.num_heads, layer.linear1.out_features) != (d, h, f):
            raise ValueError(f"encoder.layers[{i}] has a different shape from layer 0")
    if not 1 <= d <= 128:
        raise ValueError(f"d_model must be in [1, 128], got {d}")
    if not 1 <= h <= 4:
        raise ValueError(f"nhead must be in [1, 4], got {h}")
    if not 1 <= f <= 256:
        raise ValueError(f"dim_feedforward must be in [1, 256], got {f}")
    dh = d // h
    d_p, dh_p, f_p = _pad_dim(d), _pad_dim(dh), _pad_dim(f)
    lm, lv = _layer_sizes(h, d_p, dh_p, f_p)
    n = len(layers)
    n_vecs = n * lv + (2 * d_p + 1 if final is not None else 0)
    mats = torch.zeros(n * lm, dtype=torch.float64)
    vecs = torch.zeros(n_vecs, dtype=torch.float64)
    qscale = _LOG2E / math.sqrt(dh)

    def vec(t: torch.Tensor | None, size: int, default: float = 0.0) -> torch.Tensor:
        if t is None:
            return torch.full((size,), default, dtype=torch.float64)
        return t.detach().to("cpu", torch.float64)

    with torch.no_grad():
        for li, layer in enumerate(layers):
            att = layer.self_attn
            w_in = att.in_proj_weight.detach().to("cpu", torch.float64)  # (3d, d)
            b_in = vec(att.in_proj_bias, 3 * d)
            w_out = att.out_proj.weight.detach().to("cpu", torch.float64)  # (d, d)
            mo = mats[li * lm : (li + 1) * lm]
            vo = vecs[li * lv : (li + 1) * lv]
            wq, wk, wv, wo = (mo[j * h * d_p * dh_p : (j + 1) * h * d_p * dh_p] for j in range(4))
            wq, wk, wv = (t.view(h, d_p, dh_p) for t in (wq, wk, wv))
            wo = wo.view(h, dh_p, d_p)
            w1 = mo[4 * h * d_p * dh_p : 4 * h * d_p * dh_p + d_p * f_p].view(d_p, f_p)
            w2 = mo[4 * h * d_p * dh_p + d_p * f_p :].view(f_p, d_p)
            bq = vo[: h * dh_p].view(h, dh_p)  # bk and bv (the next two) stay zero: see below
            o = 3 * h * dh_p
            bo, l1w, l1b = vo[o : o + d_p], vo[o + d_p : o + 2 * d_p], vo[o + 2 * d_p : o + 3 * d_p]
            o += 3 * d_p
            b1 = vo[o : o + f_p]
            o += f_p
            b2, l2w, l2b = vo[o : o + d_p], vo[o + d_p : o + 2 * d_p], vo[o + 2 * d_p : o + 3 * d_p]
            o += 3 * d_p
            for hh in range(h):
                sl = slice(hh * dh, (hh + 1) * dh)
                wq[hh, :d, :dh] = w_in[0 * d : 1 * d][sl].T * qscale
                wk[hh, :d, :dh] = w_in[1 * d : 2 * d][sl].T
                wv[hh, :d, :dh] = w_in[2 * d : 3 * d][sl].T
                wo[hh, :dh, :d] = w_out[:, sl].T
                bq[hh, :dh] = b_in[0 * d : 1 * d][sl] * qscale
            # K's bias adds q . bk to every score of a query row: a constant per row, which the
            # softmax cancels, so it is left out. V's bias passes through the attention unchanged
            # (a row's weights sum to 1) and then through the out projection: it joins that bias.
            # Only a row that can see no key (weights summing to 0) tells them apart, and its
            # output is defined as zero anyway. bk and bv stay zero in the buffer.
            bo[:d] = vec(att.out_proj.bias, d) + w_out @ b_in[2 * d : 3 * d]
            w1[:d, :f] = layer.linear1.weight.detach().to("cpu", torch.float64).T
            b1[:f] = vec(layer.linear1.bias, f)
            w2[:f, :d] = layer.linear2.weight.detach().to("cpu", torch.float64).T
            b2[:d] = vec(layer.linear2.bias, d)
            l1w[:d] = vec(layer.norm1.weight, d, 1.0)
            l1b[:d] = vec(layer.norm1.bias, d)
            l2w[:d] = vec(layer.norm2.weight, d, 1.0)
            l2b[:d] = vec(layer.norm2.bias, d)
            vo[o] = layer.norm1.eps
            vo[o + 1] = layer.norm2.eps
        if final is not None:
            fo = vecs[n * lv :]
            fo[:d] = vec(final.weight, d, 1.0)
            fo[d_p : d_p + d] = vec(final.bias, d)
            fo[2 * d_p] = final.eps

    if device is None:
        device = first.linear1.weight.device
    rows = _bias_rows(vecs, n, lv, (h * dh_p, d_p, f_p), dtype)
    esize = torch.empty((), dtype=dtype).element_size()
    m_bytes = mats.numel() * esize
    v_off = (m_bytes + 255) // 256 * 256  # keep every view 256-byte aligned
    r_off = (v_off + vecs.numel() * 4 + 255) // 256 * 256
    buf = torch.zeros(r_off + rows.numel() * esize, dtype=torch.uint8)
    buf[:m_bytes].view(dtype).copy_(mats.to(dtype))
    buf[v_off : v_off + vecs.numel() * 4].view(torch.float32).copy_(vecs.to(torch.float32))
    buf[r_off:].view(dtype).copy_(rows.flatten().to(dtype))
    buf = buf.to(device)
    return PackedEncoder(
        buf, buf[:m_bytes].view(dtype), buf[v_off : v_off + vecs.numel() * 4].view(torch.float32),
        buf[r_off:].view(dtype).view(rows.shape), dtype, n, d, h, f, final is not None,
    )  # fmt: skip


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------
@triton.jit
def _layernorm(x, v_ptr, off_w, off_b, eps, dmask, D: tl.constexpr, D_P: tl.constexpr):
    """Affine LayerNorm over the first D of D_P columns (padded columns stay 0)."""
    cd = tl.arange(0, D_P)
    w = tl.load(v_ptr + off_w + cd)
    b = tl.load(v_ptr + off_b + cd)
    # A product by 1 / D and the approximate rsqrt (2 ulp) instead of rounded divisions and a rounded
    # square root: a few ulp of fp32 on rows the kernel writes as fp16; ~3 % on the split launch.
    mean = tl.sum(x, axis=1) * (1.0 / D)
    xc = x - mean[:, None]
    if D < D_P:
        xc = tl.where(dmask[None, :], xc, 0.0)
    var = tl.sum(xc * xc, axis=1) * (1.0 / D)
    return xc * tl.math.rsqrt(var + eps)[:, None] * w[None, :] + b[None, :]


@triton.jit
def _key_slots(mask_ptr, b, rows, row_ok, run, S, HAS_MASK: tl.constexpr):
    """Which of these rows are keys, and where: (valid, slot, nvis) for one tile of query rows.

    Keys are stored compacted, valid keys only, in position order: a valid row's slot is the number of
    valid keys before it (``run`` counts those before the tile), and ``nvis`` (valid keys at or before
    each row) is how many slots a causal query row may attend to.
    """
    valid = row_ok
    if HAS_MASK:
        pad = tl.load(mask_ptr + b * S + rows, mask=row_ok, other=1)
        valid = row_ok & (pad == 0)
    nvis = run + tl.cumsum(valid.to(tl.int32), axis=0)
    return valid, nvis - 1, nvis


@triton.jit
def _attend(
    q, acc, m_i, l_i, k_base, v_base, k0, n_kv, lim, rn, ch,
    DH_P: tl.constexpr, MASKED: tl.constexpr, PREC: tl.constexpr, KV_CACHE: tl.constexpr,
):  # fmt: skip
    """One key tile of flash attention (online softmax in base 2). Slots >= ``lim`` (per query row)
    are masked when MASKED; unmasked tiles lie wholly below every row's limit and need no test."""
    kidx = k0 + rn
    offs = kidx[:, None] * DH_P + ch[None, :]
    if MASKED:
        kv_ok = kidx < n_kv  # never read slots this layer did not write
        kt = tl.load(k_base + offs, mask=kv_ok[:, None], other=0.0, cache_modifier=KV_CACHE)
        vt = tl.load(v_base + offs, mask=kv_ok[:, None], other=0.0, cache_modifier=KV_CACHE)
    else:
        kt = tl.load(k_base + offs, cache_modifier=KV_CACHE)
        vt = tl.load(v_base + offs, cache_modifier=KV_CACHE)
    s = tl.dot(q, tl.trans(kt), input_precision=PREC)
    if MASKED:
        s = tl.where(kidx[None, :] < lim[:, None], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), vt, input_precision=PREC)
    return acc, m_new, l_i


@triton.jit
def _store_kv(
    x16,
    slot,
    valid,
    w_layer,
    kv_k,
    kv_v,
    S,
    H: tl.constexpr,
    D_P: tl.constexpr,
    DH_P: tl.constexpr,
    PREC: tl.constexpr,
):
    """K and V of the valid rows for every head, into their slots of one layer's K/V scratch (no
    biases: see ``pack_encoder_weights``)."""
    cd = tl.arange(0, D_P)
    ch = tl.arange(0, DH_P)
    HW: tl.constexpr = H * D_P * DH_P
    for h in tl.static_range(H):
        wk = tl.load(w_layer + HW + h * D_P * DH_P + cd[:, None] * DH_P + ch[None, :])
        wv = tl.load(w_layer + 2 * HW + h * D_P * DH_P + cd[:, None] * DH_P + ch[None, :])
        k = tl.dot(x16, wk, input_precision=PREC)
        v = tl.dot(x16, wv, input_precision=PREC)
        offs = (h * S + slot[:, None]).to(tl.int64) * DH_P + ch[None, :]
        tl.store(kv_k + offs, k.to(kv_k.dtype.element_ty), mask=valid[:, None])
        tl.store(kv_v + offs, v.to(kv_v.dtype.element_ty), mask=valid[:, None])


@triton.jit
def _encoder_layer(
    x, x_src, x_ok, w_l, v_l, kv_cur, lim, n_kv, n_full, S,
    D: tl.constexpr, D_P: tl.constexpr, H: tl.constexpr, DH_P: tl.constexpr, F_P: tl.constexpr,
    F_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
    KV_CACHE: tl.constexpr, RELOAD: tl.constexpr,
):  # fmt: skip
    """One encoder layer on a tile of rows x (BLOCK_M, D_P) fp32 whose keys are the first ``n_kv``
    slots of ``kv_cur`` (row i may see slots < lim[i]; key tiles below ``n_full`` need no mask):
    self-attention summed over heads through the out projection, residual + LayerNorm, FFN in
    chunks of the hidden width, residual + LayerNorm. Returns the new rows, fp32.

    With RELOAD, x's rows are also in memory at ``x_src`` (masked by ``x_ok``), as loaded: the
    residual reads them again after the key loop instead of keeping x in registers through it (the
    key loop is where the registers run out; fewer spills)."""
    dt = kv_cur.dtype.element_ty
    rn = tl.arange(0, BLOCK_N)
    cd = tl.arange(0, D_P)
    ch = tl.arange(0, DH_P)
    cf = tl.arange(0, F_CHUNK)
    dmask = cd < D
    HW: tl.constexpr = H * D_P * DH_P
    OFF_BO: tl.constexpr = 3 * H * DH_P
    OFF_B1: tl.constexpr = OFF_BO + 3 * D_P
    OFF_B2: tl.constexpr = OFF_B1 + F_P
    OFF_EPS: tl.constexpr = OFF_B2 + 3 * D_P
    KV_STRIDE = H * S * DH_P  # K of one buffer, then its V
    x16 = x.to(dt)

    # ---- self-attention, one head at a time, summed through the out projection onto the residual
    for h in tl.static_range(H):
        wq = tl.load(w_l + h * D_P * DH_P + cd[:, None] * DH_P + ch[None, :])
        bq = tl.load(v_l + h * DH_P + ch)
        q = (tl.dot(x16, wq, input_precision=PREC) + bq[None, :]).to(dt)
        m_i = tl.full((BLOCK_M,), -1.0e30, tl.float32)
        l_i = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, DH_P), tl.float32)
        k_base = kv_cur + h * S * DH_P
        v_base = kv_cur + KV_STRIDE + h * S * DH_P
        for k0 in range(0, n_full, BLOCK_N):
            acc, m_i, l_i = _attend(
                q, acc, m_i, l_i, k_base, v_base, k0, n_kv, lim, rn, ch, DH_P, False, PREC, KV_CACHE
            )
        for k0 in range(n_full, n_kv, BLOCK_N):
            acc, m_i, l_i = _attend(
                q, acc, m_i, l_i, k_base, v_base, k0, n_kv, lim, rn, ch, DH_P, True, PREC, KV_CACHE
            )
        # A row that saw no valid key gets a zero attention output (never 0/0).
        inv_l = tl.where(l_i > 0, 1.0 / tl.maximum(l_i, 1e-30), 0.0)
        o_h = acc * inv_l[:, None]
        wo = tl.load(w_l + 3 * HW + h * DH_P * D_P + ch[:, None] * D_P + cd[None, :])
        if h == 0:
            if RELOAD:
                x = tl.load(x_src, mask=x_ok, other=0.0).to(tl.float32)
            bo = tl.load(v_l + OFF_BO + cd)
            attn = x + bo[None, :]
        attn = tl.dot(o_h.to(dt), wo, attn, input_precision=PREC)
    eps1 = tl.load(v_l + OFF_EPS)
    x = _layernorm(attn, v_l, OFF_BO + D_P, OFF_BO + 2 * D_P, eps1, dmask, D, D_P)

    # ---- feed-forward, in chunks of the hidden width
    x16 = x.to(dt)
    b2 = tl.load(v_l + OFF_B2 + cd)
    ff = x + b2[None, :]
    for f0 in tl.static_range(0, F_P, F_CHUNK):
        w1 = tl.load(w_l + 4 * HW + cd[:, None] * F_P + (f0 + cf)[None, :])
        b1 = tl.load(v_l + OFF_B1 + f0 + cf)
        hid = tl.maximum(tl.dot(x16, w1, input_precision=PREC) + b1[None, :], 0.0)
        w2 = tl.load(w_l + 4 * HW + D_P * F_P + (f0 + cf)[:, None] * D_P + cd[None, :])
        ff = tl.dot(hid.to(dt), w2, ff, input_precision=PREC)
    eps2 = tl.load(v_l + OFF_EPS + 1)
    return _layernorm(ff, v_l, OFF_B2 + D_P, OFF_B2 + 2 * D_P, eps2, dmask, D, D_P)


@triton.jit
def _last_rows(
    x, rows, row_ok, valid, lim, o_b, v_ptr, n_layers,
    D: tl.constexpr, D_P: tl.constexpr, LV: tl.constexpr,
    FINAL_NORM: tl.constexpr, STORE_OUT: tl.constexpr, POOL: tl.constexpr,
):  # fmt: skip
    """The last layer's rows: the final norm, zeros for fully masked rows (those that may see no
    key), stored if STORE_OUT; returns their max over the rows the pool keeps, (D_P,) fp32."""
    cd = tl.arange(0, D_P)
    dmask = cd < D
    if FINAL_NORM:
        f_off = n_layers * LV  # the final norm's vectors follow every layer's
        eps_f = tl.load(v_ptr + f_off + 2 * D_P)
        x = _layernorm(x, v_ptr, f_off, f_off + D_P, eps_f, dmask, D, D_P)
    x = tl.where((lim == 0)[:, None], 0.0, x)
    if STORE_OUT:
        tl.store(o_b + rows[:, None] * D + cd[None, :], x.to(o_b.dtype.element_ty),
                 mask=row_ok[:, None] & dmask[None, :])  # fmt: skip
    keep = row_ok
    if POOL == 1:
        keep = valid
    return tl.max(tl.where(keep[:, None], x, float("-inf")), axis=0)


@triton.jit
def _store_pool(pooled, b, pool_ptr, pw_ptr, pb_ptr, D_OUT, D: tl.constexpr, D_P: tl.constexpr,
                POOL_PROJ: tl.constexpr, O_P: tl.constexpr):  # fmt: skip
    """A sequence's pooled row (max; 0 where no row was kept), or Linear of it with POOL_PROJ."""
    cd = tl.arange(0, D_P)
    dmask = cd < D
    pooled = tl.where(pooled == float("-inf"), 0.0, pooled)  # no valid row at all -> 0
    if POOL_PROJ:
        # Linear(pool) (a module's out_linear), from the fp32 pool: one product per sequence,
        # on the CUDA cores, instead of two more launches (a cast and a GEMM) after this one.
        co = tl.arange(0, O_P)
        o_ok = co < D_OUT
        wt = tl.load(pw_ptr + co[None, :] * D + cd[:, None], mask=dmask[:, None] & o_ok[None, :], other=0.0)
        y = tl.sum(pooled[:, None] * wt, axis=0) + tl.load(pb_ptr + co, mask=o_ok, other=0.0)
        tl.store(pool_ptr + b * D_OUT + co, y.to(pool_ptr.dtype.element_ty), mask=o_ok)
    else:
        tl.store(pool_ptr + b * D + cd, pooled.to(pool_ptr.dtype.element_ty), mask=dmask)


@triton.jit
def _skut_kernel(
    x_ptr,
    out_ptr,
    kv_ptr,
    slot_ptr,
    mask_ptr,
    w_ptr,
    v_ptr,
    pool_ptr,
    pw_ptr,
    pb_ptr,
    S,
    n_layers,
    D_OUT,
    D: tl.constexpr,
    D_P: tl.constexpr,
    H: tl.constexpr,
    DH_P: tl.constexpr,
    F_P: tl.constexpr,
    F_CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_MASK: tl.constexpr,
    POOL: tl.constexpr,
    FINAL_NORM: tl.constexpr,
    KV_BUFS: tl.constexpr,
    PREC: tl.constexpr,
    STORE_OUT: tl.constexpr,
    POOL_PROJ: tl.constexpr,
    O_P: tl.constexpr,
):
    """One program per sequence: every layer, query tile after query tile.

    Which rows are keys and their slots are the same in every layer: the first pass (layer 0's K/V)
    works them out once and leaves them per row in ``slot_ptr`` as ``2 * nvis + valid``; each layer's
    tile then reads them with its rows, and the tile's key bounds from its first and last row (``nvis``
    grows with the row), with no prefix sum, reduction or barrier."""
    b = tl.program_id(0).to(tl.int64)
    dt = out_ptr.dtype.element_ty
    rm = tl.arange(0, BLOCK_M)
    cd = tl.arange(0, D_P)
    dmask = cd < D
    LW: tl.constexpr = 4 * H * D_P * DH_P + 2 * D_P * F_P
    LV: tl.constexpr = 3 * H * DH_P + 6 * D_P + F_P + 2

    x_b = x_ptr + b * S * D
    o_b = out_ptr + b * S * D
    kv_b = kv_ptr + b * (KV_BUFS * 2 * H) * S * DH_P
    slot_b = slot_ptr + b * S
    KV_STRIDE = H * S * DH_P  # K of one buffer, then its V

    n_qt = tl.cdiv(S, BLOCK_M)

    # K/V of layer 0, the rows' slots, and the number of valid keys.
    n_valid = 0
    for qt in range(0, n_qt):
        rows = qt * BLOCK_M + rm
        row_ok = rows < S
        valid, slot, nvis = _key_slots(mask_ptr, b, rows, row_ok, n_valid, S, HAS_MASK)
        n_valid = tl.max(nvis, axis=0)
        tl.store(slot_b + rows, nvis * 2 + valid.to(tl.int32), mask=row_ok)
        x = tl.load(x_b + rows[:, None] * D + cd[None, :], mask=row_ok[:, None] & dmask[None, :], other=0.0)
        _store_kv(x.to(dt), slot, valid, w_ptr, kv_b, kv_b + KV_STRIDE, S, H, D_P, DH_P, PREC)
    tl.debug_barrier()

    pooled = tl.full((D_P,), float("-inf"), tl.float32)
    for layer in range(0, n_layers):
        w_l = w_ptr + layer * LW
        v_l = v_ptr + layer * LV
        kv_cur = kv_b + (layer % KV_BUFS) * 2 * KV_STRIDE
        kv_nxt = kv_b + ((layer + 1) % KV_BUFS) * 2 * KV_STRIDE
        for qt in range(0, n_qt):
            rows = qt * BLOCK_M + rm
            row_ok = rows < S
            xmask = row_ok[:, None] & dmask[None, :]
            src_b = o_b
            if layer == 0:
                src_b = x_b
            x_src = src_b + rows[:, None] * D + cd[None, :]
            x = tl.load(x_src, mask=xmask, other=0.0).to(tl.float32)
            code = tl.load(slot_b + rows, mask=row_ok, other=0)
            valid = (code & 1) != 0
            nvis = code >> 1
            slot = nvis - 1
            # Key slots each row may see: causal, the valid keys up to the row; else all valid keys.
            # Key tiles wholly below every row's limit of the tile need no mask.
            if CAUSAL:
                lim = nvis
                n_kv = tl.load(slot_b + tl.minimum(qt * BLOCK_M + BLOCK_M, S) - 1) >> 1  # the tile's last row
                n_full = ((tl.load(slot_b + qt * BLOCK_M) >> 1) // BLOCK_N) * BLOCK_N  # its first row
            else:
                lim = rm * 0 + n_valid
                n_kv = n_valid
                n_full = (n_valid // BLOCK_N) * BLOCK_N
            x = _encoder_layer(x, x_src, xmask, w_l, v_l, kv_cur, lim, n_kv, n_full, S, D, D_P, H, DH_P, F_P,
                               F_CHUNK, BLOCK_M, BLOCK_N, PREC, "", True)  # fmt: skip
            if layer + 1 < n_layers:
                x16 = x.to(dt)
                _store_kv(x16, slot, valid, w_l + LW, kv_nxt, kv_nxt + KV_STRIDE, S, H, D_P, DH_P, PREC)
                tl.store(o_b + rows[:, None] * D + cd[None, :], x16, mask=xmask)
            else:
                tile_max = _last_rows(x, rows, row_ok, valid, lim, o_b, v_ptr, n_layers, D, D_P, LV, FINAL_NORM,
                                      STORE_OUT, POOL)  # fmt: skip
                pooled = tl.maximum(pooled, tile_max)
        tl.debug_barrier()
    if POOL != 0:
        _store_pool(pooled, b, pool_ptr, pw_ptr, pb_ptr, D_OUT, D, D_P, POOL_PROJ, O_P)


@triton.jit
def _wait_and_count(cnt_ptr, n_before):
    """Wait until ``n_before`` programs have counted (``*cnt_ptr == n_before``), then count this one.

    Every thread's stores before the call are visible to any program that reads the count after it
    (a CTA barrier, then a release by the thread that counts); after the call this program sees the
    stores of the ``n_before`` programs counted before it (an acquire, then a CTA barrier)."""
    c = tl.atomic_add(cnt_ptr, 0, sem="acquire")
    while c < n_before:
        c = tl.atomic_add(cnt_ptr, 0, sem="acquire")
    tl.debug_barrier()
    tl.atomic_add(cnt_ptr, 1, sem="release")


@triton.jit
def _skut_split_kernel(
    x_ptr,
    out_ptr,
    kv_ptr,
    mask_ptr,
    w_ptr,
    v_ptr,
    pool_ptr,
    pw_ptr,
    pb_ptr,
    sync_ptr,
    part_ptr,
    S,
    n_layers,
    D_OUT,
    D: tl.constexpr,
    D_P: tl.constexpr,
    H: tl.constexpr,
    DH_P: tl.constexpr,
    F_P: tl.constexpr,
    F_CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_MASK: tl.constexpr,
    POOL: tl.constexpr,
    FINAL_NORM: tl.constexpr,
    PREC: tl.constexpr,
    STORE_OUT: tl.constexpr,
    POOL_PROJ: tl.constexpr,
    O_P: tl.constexpr,
    RUN_CHUNK: tl.constexpr,
):
    """Causal only: one program per (sequence, query tile), each running every layer on its own rows
    (kept in registers between layers). A causal row needs the keys of its own and earlier tiles
    only, so a tile waits for the tiles before it to have stored each layer's K/V (one counter per
    sequence and layer, counted in tile order) and for nothing else: the tiles of a sequence run
    side by side, each on a chain of one tile per layer instead of the whole sequence's.

    Programs take their (sequence, tile) from a ticket counter, not from the program id: a program
    then only ever waits on programs that took a ticket before it, so are running or done, whatever
    order the GPU starts programs in. ``sync_ptr`` holds the ticket counter, then per sequence one
    counter per layer and a count of finished tiles; all must be zero at launch. With a pool, each
    tile leaves its max in ``part_ptr`` and the last tile of a sequence to finish pools them."""
    n_qt = tl.cdiv(S, BLOCK_M)
    ticket = tl.atomic_add(sync_ptr, 1)
    qt = ticket % n_qt
    b = (ticket // n_qt).to(tl.int64)
    seq_sync = sync_ptr + 1 + b * (n_layers + 1)
    rm = tl.arange(0, BLOCK_M)
    cd = tl.arange(0, D_P)
    dmask = cd < D
    LW: tl.constexpr = 4 * H * D_P * DH_P + 2 * D_P * F_P
    LV: tl.constexpr = 3 * H * DH_P + 6 * D_P + F_P + 2
    KV_STRIDE = H * S * DH_P
    kv_b = kv_ptr + b * (n_layers * 2 * H) * S * DH_P  # one K/V buffer per layer: no tile waits to reuse one

    # Valid keys before this tile (its rows' first slot).
    first = qt * BLOCK_M
    run = first
    if HAS_MASK:
        run = first * 0
        rr = tl.arange(0, RUN_CHUNK)
        for r0 in range(0, first, RUN_CHUNK):
            pad = tl.load(mask_ptr + b * S + r0 + rr, mask=r0 + rr < first, other=1)
            run += tl.sum((pad == 0).to(tl.int32), axis=0)
    rows = first + rm
    row_ok = rows < S
    valid, slot, nvis = _key_slots(mask_ptr, b, rows, row_ok, run, S, HAS_MASK)
    n_kv = tl.max(nvis, axis=0)
    n_full = (tl.min(nvis, axis=0) // BLOCK_N) * BLOCK_N
    xmask = row_ok[:, None] & dmask[None, :]
    x = tl.load(x_ptr + b * S * D + rows[:, None] * D + cd[None, :], mask=xmask, other=0.0).to(tl.float32)
    _store_kv(x.to(kv_ptr.dtype.element_ty), slot, valid, w_ptr, kv_b, kv_b + KV_STRIDE, S, H, D_P, DH_P, PREC)
    tile_max = tl.full((D_P,), float("-inf"), tl.float32)
    for layer in range(0, n_layers):
        w_l = w_ptr + layer * LW
        v_l = v_ptr + layer * LV
        kv_cur = kv_b + layer * 2 * KV_STRIDE
        _wait_and_count(seq_sync + layer, qt)  # this tile's keys out, the earlier tiles' in
        # Other programs wrote these keys: read them from L2 (".cg"), never from a stale L1 line.
        x = _encoder_layer(x, x_ptr, xmask, w_l, v_l, kv_cur, nvis, n_kv, n_full, S, D, D_P, H, DH_P, F_P,
                           F_CHUNK, BLOCK_M, BLOCK_N, PREC, ".cg", False)  # fmt: skip
        if layer + 1 < n_layers:
            kv_nxt = kv_cur + 2 * KV_STRIDE
            _store_kv(x.to(kv_ptr.dtype.element_ty), slot, valid, w_l + LW, kv_nxt, kv_nxt + KV_STRIDE, S, H, D_P,
                      DH_P, PREC)  # fmt: skip
        else:
            tile_max = _last_rows(x, rows, row_ok, valid, nvis, out_ptr + b * S * D, v_ptr, n_layers, D, D_P, LV,
                                  FINAL_NORM, STORE_OUT, POOL)  # fmt: skip
    if POOL != 0:
        tl.store(part_ptr + (b * n_qt + qt) * D_P + cd, tile_max)
        tl.debug_barrier()
        done = tl.atomic_add(seq_sync + n_layers, 1, sem="acq_rel")
        if done == n_qt - 1:  # the sequence's last tile: every other tile's max is in
            tl.debug_barrier()
            pooled = tl.full((D_P,), float("-inf"), tl.float32)
            for t in range(0, n_qt):
                pooled = tl.maximum(pooled, tl.load(part_ptr + (b * n_qt + t) * D_P + cd, cache_modifier=".cg"))
            _store_pool(pooled, b, pool_ptr, pw_ptr, pb_ptr, D_OUT, D, D_P, POOL_PROJ, O_P)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SkutConfig:
    """Tile sizes of the kernel (all tested: see tests/test_kernel_skut.py and tests/gpu).

    ``split`` (causal only): one program per (sequence, query tile) instead of one per sequence
    (``_skut_split_kernel``). ``max_regs``: a cap on registers per thread (ptxas spills the rest to
    local memory), so that more programs share an SM; None lets ptxas take up to 255. ``wgmma``: the
    Hopper kernels of ``skut_wgmma`` instead (their own fixed tiles: 64 rows, 64 keys, 4 warps; the other
    fields but ``split`` and ``warp_groups`` are not used), where ``skut_wgmma.supported`` says they run; with
    ``split``, its per-tile launch (a sequence of one tile takes the per-sequence launch, the same computation);
    with ``warp_groups`` (causal only), its grouped launch: one program per sequence, one warp group per
    64-row query tile (a sequence of one tile, or of more than ``skut_wgmma.MAX_GROUPS``, takes the
    per-sequence launch)."""

    block_m: int
    block_n: int
    num_warps: int
    f_chunk: int = 64
    num_stages: int = 2
    split: bool = False
    max_regs: int | None = None
    wgmma: bool = False
    warp_groups: bool = False


LONG_SEQ = 2048  # sequences from this length on pipeline three K/V tiles deep (choose_config)
SHORT_SEQ = 256  # up to this length, 32-wide key tiles (ahead at S=192, behind at 512 and 1024)

# Configurations the benchmark sweeps (each one is also checked by tests/gpu/test_kernels_gpu.py).
SWEEP_CONFIGS = (
    SkutConfig(64, 64, 4),
    SkutConfig(64, 32, 4),
    SkutConfig(64, 32, 8),
    SkutConfig(64, 16, 8),
    SkutConfig(32, 32, 4),
    SkutConfig(32, 16, 4),
    SkutConfig(128, 32, 8),
    SkutConfig(64, 32, 4, split=True),  # causal stacks only
    SkutConfig(64, 64, 4, num_stages=3),
)


# Where the wgmma kernels run: their per-tile launch below this fraction of the SMs' count in sequences (three
# tiles of a 192-token sequence each take an SM; H200: ahead up to 80 sequences, level at 96).
WGMMA_SPLIT_BELOW = 0.7


def choose_config(
    seq_len: int,
    packed: PackedEncoder,
    batch: int | None = None,
    causal: bool = False,
    device: torch.device | None = None,
) -> SkutConfig:
    """Shape-based choice; no device sync.

    With mma.sync every warp holds whole K/V and weight tiles as matrix operands in registers, so key
    tiles stay narrow (32) and a program's register budget decides how many fit on an SM. Measured
    (benchmarks/RESULTS.md, ``benchmarks/skut_sweep.py``): for d_model <= 64 and S up to a few hundred,
    64-row query tiles with 4 warps (253 registers, two programs per SM) beat 128 rows with 8 warps by
    1.5x at B=256, S=192 on H200, and also win at B=2048 (0.49 vs 0.72 ms for 32 rows / 4 warps) and at
    S=2048 (3.05 vs 3.68 ms for 128 rows / 8 warps); 64-wide key tiles then beat 32-wide ones at every
    V2 row of DESIGN §5 once padded keys were compacted (S=2048 1.61 vs 1.90 ms, B=2048 0.463 vs 0.470,
    B=256 and B=16 by 2-6%), until the key slots were kept per row: since then 32-wide key tiles are
    ahead again up to ``SHORT_SEQ`` tokens (S=192: B=2048 0.391 vs 0.410 ms, B=256 0.0548 vs 0.0555; but
    S=512: 0.200 vs 0.192, S=1024: 0.590 vs 0.526, both B=256); for the V1 shape (d_model 96, two heads,
    FFN 32, S=100) 128-row tiles with 8 warps beat 32-row ones by 2.5x. A causal stack of fewer
    sequences than the GPU has SMs (``batch`` and ``device`` given) leaves SMs idle with one program per
    sequence: the split launch, one program per 64-row query tile, runs the tiles side by side (B=16
    S=192: 0.024 against 0.046 ms on H200; at B=256 and more the per-sequence launch stays faster, 0.065
    against 0.073 ms). From ``LONG_SEQ`` tokens on, three K/V stages instead of two (B=256 S=2048: 1.51
    against 1.60 ms; they cost 2-10 % at S=1024, 512 and 192). Where ``skut_wgmma`` runs (sm_90, V2's shape), its
    kernels replace both launches (H200, S=192: B=256 ~1.12x, B=2048 1.29x; B=16 1.11x), and its per-tile
    launch gives way to its per-sequence one from ``WGMMA_SPLIT_BELOW`` of the SMs' count on (80 sequences:
    0.0220 against 0.0292 ms; 96: 0.0310 against 0.0295). A causal stack of 2-3 query tiles (65-192 tokens) takes
    its grouped launch, one warp group per query tile: with three tiles at every batch (S=192 against the
    launches above: B=64 1.33x, B=128 1.43x, B=256 1.09x, B=512 1.26x, B=2048 1.03x; B=16 1.02x, B=1 0.98x),
    with two up to twice the SMs' count (S=128: B=1 1.30x, B=64 1.33x, B=256 1.04x; B=2048 0.99x).
    """
    f_chunk = 64  # clamped to the padded FFN width at launch
    if seq_len <= 16:
        return SkutConfig(16, 16, 4, f_chunk)
    if packed.d_pad > 64:
        if seq_len > 64 and packed.ff_pad <= 64:
            return SkutConfig(128, 32, 8, f_chunk)
        return SkutConfig(32, 32, 8, f_chunk)
    if seq_len <= 32:
        return SkutConfig(32, 16, 4, f_chunk)
    wgmma = device is not None and skut_wgmma.supported(packed, seq_len, device)
    if wgmma and causal and skut_wgmma.groups_fit(seq_len):
        # Two tiles fall behind the two-pass form at many sequences (H200, B=2048: S=128 0.99x, S=100 0.94x).
        if seq_len > 2 * skut_wgmma.BLOCK or batch is None or batch <= 2 * sm_count(device):
            return SkutConfig(64, 64, 4, f_chunk, wgmma=True, warp_groups=True)
    if causal and seq_len > 64 and batch is not None and device is not None:
        # Split below the SMs' count, or below WGMMA_SPLIT_BELOW of it where the wgmma kernels run.
        if wgmma and batch < sm_count(device) * WGMMA_SPLIT_BELOW:
            return SkutConfig(64, 64, 4, f_chunk, split=True, wgmma=True)
        if not wgmma and batch < sm_count(device):
            return SkutConfig(64, 32, 4, f_chunk, split=True)
    if wgmma:
        return SkutConfig(64, 64, 4, f_chunk, wgmma=True)
    if seq_len >= LONG_SEQ:  # long key loops: a third stage of K/V in flight pays for its shared memory
        return SkutConfig(64, 64, 4, f_chunk, num_stages=3)
    if seq_len <= SHORT_SEQ:
        return SkutConfig(64, 32, 4, f_chunk)
    return SkutConfig(64, 64, 4, f_chunk)


def _check_forward_args(x, packed, key_padding_mask, pool):
    if not isinstance(packed, PackedEncoder):
        raise ValueError(
            f"packed must be a PackedEncoder (see pack_encoder_weights), got {type(packed).__name__}"
        )
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"x must be a (B, S, d_model) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype != packed.dtype:
        raise ValueError(f"x has dtype {x.dtype} but the weights were packed for {packed.dtype}")
    if x.shape[2] != packed.d_model:
        raise ValueError(f"x has d_model={x.shape[2]} but the encoder has d_model={packed.d_model}")
    if x.device != packed.buffer.device:
        raise ValueError(f"x is on {x.device} but the packed weights are on {packed.buffer.device}")
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool:
            raise ValueError("key_padding_mask must be a bool tensor (True = ignore)")
        if tuple(key_padding_mask.shape) != tuple(x.shape[:2]):
            raise ValueError(
                f"key_padding_mask must have shape {tuple(x.shape[:2])}, got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != x.device:
            raise ValueError(f"key_padding_mask is on {key_padding_mask.device}, x on {x.device}")
    if pool not in POOL_MODES:
        raise ValueError(f"pool must be one of {POOL_MODES}, got {pool!r}")


def skut_forward(
    x: torch.Tensor,
    packed: PackedEncoder,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    pool: str | None = None,
    *,
    config: SkutConfig | None = None,
    workspace: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
    pool_proj: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run every layer of the packed encoder on ``x`` (B, S, d_model) in one kernel launch.

    Args:
        x: (B, S, d_model) activations in the packed dtype.
        packed: weights from ``pack_encoder_weights``.
        key_padding_mask: optional (B, S) bool, True = padded key (ignored by attention).
        causal: each position attends only to itself and earlier positions.
        pool: None -> (B, S, d) outputs; "max_valid" -> (B, d) max over non-padded positions;
            "max_all" -> (B, d) max over all S positions.
        config: tile sizes (default from ``choose_config``).
        workspace: optional preallocated K/V scratch of at least ``workspace_numel(B, S, packed)``
            elements of the packed dtype (useful under CUDA-graph capture; otherwise allocated per call).
        out: optional preallocated result ((B, S, d); with ``pool``, (B, d); with ``pool_proj``, (B, d_out)
            fp32), contiguous.
        hidden: with ``pool``, a contiguous (B, S, d) tensor that also receives every output row (the
            pooled rows and the rows themselves from one launch).
        pool_proj: with ``pool``, (weight (d_out, d), bias (d_out,)) fp32 contiguous: the launch returns
            Linear(pool) in fp32 instead (a module's ``out_linear``, from the pool before rounding).
    Returns:
        (B, S, d) or, with ``pool``, (B, d) in x's dtype, or (B, d_out) fp32 with ``pool_proj``. Fully
        masked rows are zeros.

    Runs the Triton kernel on CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1``);
    otherwise ``skut_torch``.
    """
    _check_forward_args(x, packed, key_padding_mask, pool)
    bsz, s, d = x.shape
    dev = x.device
    d_out = _check_pool_proj(pool_proj, pool, d, dev)
    res_shape = (bsz, s, d) if pool is None else (bsz, d_out)
    res_dtype = torch.float32 if pool_proj is not None else x.dtype
    if out is not None and (
        tuple(out.shape) != res_shape or out.dtype != res_dtype or out.device != dev or not out.is_contiguous()
    ):
        raise ValueError(f"out must be a contiguous {res_shape} {res_dtype} tensor on {dev}")
    if hidden is not None and (
        pool is None or tuple(hidden.shape) != (bsz, s, d) or hidden.dtype != x.dtype or hidden.device != dev
        or not hidden.is_contiguous()
    ):  # fmt: skip
        raise ValueError(f"hidden needs a pool mode and must be a contiguous {(bsz, s, d)} {x.dtype} tensor on {dev}")
    if not (x.is_cuda or interpreting()):
        rows = skut_torch(x, packed, key_padding_mask, causal, None)
        if hidden is not None:
            hidden.copy_(rows)
        res = _pool(rows, key_padding_mask, pool)
        if pool_proj is not None:
            res = torch.nn.functional.linear(res.float(), *pool_proj)
        return res if out is None else out.copy_(res)
    cfg = config or choose_config(s, packed, bsz, causal, dev)
    for name in ("block_m", "block_n", "f_chunk"):
        v = getattr(cfg, name)
        if v < 16 or v & (v - 1):
            raise ValueError(f"config.{name} must be a power of two >= 16, got {v}")
    for name in ("split", "warp_groups"):
        if getattr(cfg, name) and not causal:
            raise ValueError(f"config.{name} needs causal=True (a tile then needs no later tile's keys)")
    if cfg.warp_groups and (cfg.split or not cfg.wgmma):
        raise ValueError("config.warp_groups is a launch of the wgmma kernels (wgmma=True), not one with split")
    if cfg.wgmma and not skut_wgmma.supported(packed, s, dev):
        raise ValueError("config.wgmma needs an sm_90 GPU, Triton 3.6-3.9 (Gluon), d_model 64, one head, FFN <= 64, "
                         f"16-bit weights and 1 <= S <= {skut_wgmma.MAX_SEQ}")  # fmt: skip
    if cfg.split and cfg.wgmma and s <= skut_wgmma.BLOCK:
        cfg = replace(cfg, split=False)  # one query tile: the per-sequence launch is the same computation
    if cfg.warp_groups and not skut_wgmma.groups_fit(s):
        cfg = replace(cfg, warp_groups=False)  # one tile (the same computation), or more tiles than groups
    if cfg.max_regs is not None and not 32 <= cfg.max_regs <= 255:
        raise ValueError(f"config.max_regs must be in [32, 255] (registers per thread), got {cfg.max_regs}")
    if pool is None:
        act = out if out is not None else torch.empty((bsz, s, d), dtype=x.dtype, device=dev)
        pooled = act
    else:
        pooled = out if out is not None else torch.empty(res_shape, dtype=res_dtype, device=dev)
        # Activations between layers need a (B, S, d) buffer; one layer needs none, nor a split or grouped
        # launch (its rows stay on chip): x stands in (its dtype is the compute dtype; nothing is written).
        act = hidden
        if act is None:
            on_chip = cfg.split or cfg.warp_groups
            act = torch.empty((bsz, s, d), dtype=x.dtype, device=dev) if packed.n_layers > 1 and not on_chip else x
    if bsz == 0 or s == 0:
        if pool is not None:
            if pool_proj is not None:  # the pool of nothing is 0, and Linear(0) is the bias
                pooled.copy_(pool_proj[1].expand(bsz, d_out))
            else:
                pooled.zero_()
        return pooled
    f_chunk = min(cfg.f_chunk, packed.ff_pad)  # both powers of two, so it divides the padded width
    need = workspace_numel(bsz, s, packed, cfg)
    if workspace is None:
        # The per-sequence wgmma kernel keeps K / V in shared memory: no scratch to allocate on every call.
        workspace = x if need == 0 else torch.empty(need, dtype=x.dtype, device=dev)
    elif workspace.dtype != x.dtype or workspace.numel() < need or workspace.device != dev:
        raise ValueError(f"workspace must hold >= {need} elements of {x.dtype} on {dev}")
    x = x.contiguous()
    mask = key_padding_mask.contiguous().view(torch.uint8) if key_padding_mask is not None else x
    # What both kernels take: the tensors, the sizes, and the constexprs of shapes, masks and pool.
    head = (x, act, workspace, mask, packed.mats, packed.vecs, pooled,
            *(pool_proj if pool_proj is not None else (pooled, pooled)))  # fmt: skip
    sizes = (s, packed.n_layers, d_out)
    meta = dict(
        D=d, D_P=packed.d_pad, H=packed.n_heads, DH_P=packed.dh_pad, F_P=packed.ff_pad, F_CHUNK=f_chunk,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HAS_MASK=key_padding_mask is not None,
        POOL=POOL_MODES.index(pool), FINAL_NORM=packed.final_norm,
        PREC="ieee" if x.dtype == torch.float32 else "tf32", STORE_OUT=pool is None or hidden is not None,
        POOL_PROJ=pool_proj is not None, O_P=max(16, triton.next_power_of_2(d_out)),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if cfg.max_regs is not None:  # (the interpreter ignores it)
        meta["maxnreg"] = cfg.max_regs
    if cfg.wgmma:  # the Gluon kernels: per query tile, one warp group per query tile, or per sequence
        tail = (pooled, *head[7:9], d_out)
        flags = (meta["HAS_MASK"], meta["POOL"], meta["STORE_OUT"], meta["POOL_PROJ"], meta["O_P"])
        if cfg.split:
            compiled = skut_wgmma.launch_split(x, act, workspace, mask, packed, *tail, *flags)
        elif cfg.warp_groups:
            compiled = skut_wgmma.launch_groups(x, act, mask, packed, *tail, *flags)
        else:
            compiled = skut_wgmma.launch(x, act, mask, packed, *tail, bool(causal), *flags)
        _note_launch(compiled, cfg)
        return pooled
    with mma_sync_only():
        if cfg.split:
            n_qt = triton.cdiv(s, cfg.block_m)
            # Counters zeroed by every call (so every graph replay is a fresh launch); each tile's pool max.
            sync = torch.zeros(1 + bsz * (packed.n_layers + 1), dtype=torch.int32, device=dev)
            part = torch.empty(bsz * n_qt * packed.d_pad if pool else 1, dtype=torch.float32, device=dev)
            compiled = _skut_split_kernel[(bsz * n_qt,)](*head, sync, part, *sizes, **meta, RUN_CHUNK=1024)
        else:
            slots = workspace[need - _slot_numel(bsz, s, x.dtype) : need].view(torch.int32)  # each row's key slot
            compiled = _skut_kernel[(bsz,)](*head[:3], slots, *head[3:], *sizes, **meta, CAUSAL=bool(causal),
                                            KV_BUFS=min(2, packed.n_layers))  # fmt: skip
    _note_launch(compiled, cfg)
    return pooled


# Registers / spills / shared memory of the last compiled launch (for the benchmark's report).
last_launch_info: dict = {}


def _note_launch(compiled, cfg) -> None:
    info = {k: getattr(compiled, k, None) for k in ("n_regs", "n_spills")}
    info["shared"] = getattr(getattr(compiled, "metadata", None), "shared", None)
    info["config"] = cfg
    last_launch_info.clear()
    last_launch_info.update(info)


def workspace_numel(batch: int, seq_len: int, packed: PackedEncoder, config: SkutConfig | None = None) -> int:
    """Elements of scratch that ``skut_forward`` needs for a (batch, seq_len) input: with ``config``,
    as launched with it (one program per sequence alternates two layers' K/V and keeps each row's key
    slot, a split launch keeps every layer's K/V; the per-sequence and grouped wgmma launches need none, its
    per-tile launch keeps every layer's K/V in whole 64-row tiles); without, enough for any, whichever the call
    picks."""
    kv_buf = batch * 2 * packed.n_heads * seq_len * packed.dh_pad  # one layer's K and V
    split = packed.n_layers * kv_buf
    per_seq = min(2, packed.n_layers) * kv_buf + _slot_numel(batch, seq_len, packed.dtype)
    wgmma_split = skut_wgmma.split_workspace_numel(batch, seq_len, packed.n_layers)
    if config is None:
        return max(split, per_seq, wgmma_split if skut_wgmma.fits(packed, seq_len) else 0)
    if config.wgmma:  # the per-sequence kernel keeps K / V in shared memory
        return wgmma_split if config.split else 0
    return split if config.split else per_seq


def _slot_numel(batch: int, seq_len: int, dtype: torch.dtype) -> int:
    """Elements of ``dtype`` that hold one int32 per row (the K/V part before them has an even count)."""
    return -(-batch * seq_len * 4 // dtype.itemsize)


# --------------------------------------------------------------------------------------------
# PyTorch references
# --------------------------------------------------------------------------------------------
def _dead_rows(
    key_padding_mask: torch.Tensor | None, bsz: int, s: int, causal: bool, device: torch.device
) -> torch.Tensor:
    """(B, S) True where a query row can attend to no key."""
    if key_padding_mask is None:
        return torch.zeros((bsz, s), dtype=torch.bool, device=device)
    valid = ~key_padding_mask
    if causal:
        return valid.cumsum(dim=1) == 0
    return (~valid.any(dim=1, keepdim=True)).expand(bsz, s)


def _check_pool_proj(pool_proj, pool, d: int, dev: torch.device) -> int:
    """The projected width (d without a projection); a ValueError names what does not fit."""
    if pool_proj is None:
        return d
    if pool is None:
        raise ValueError("pool_proj projects the pool: it needs a pool mode")
    wt, b = pool_proj
    if wt.dim() != 2 or wt.shape[1] != d or tuple(b.shape) != (wt.shape[0],):
        raise ValueError(f"pool_proj must be (weight (d_out, {d}), bias (d_out,)), got "
                         f"{tuple(wt.shape)} and {tuple(b.shape)}")  # fmt: skip
    if not (wt.dtype == b.dtype == torch.float32 and wt.is_contiguous() and b.is_contiguous()):
        raise ValueError("pool_proj's weight and bias must be contiguous fp32")
    if wt.device != dev or b.device != dev:
        raise ValueError(f"pool_proj is on {wt.device} / {b.device}, x on {dev}")
    return wt.shape[0]


def _pool(out: torch.Tensor, key_padding_mask: torch.Tensor | None, pool: str | None) -> torch.Tensor:
    if pool is None:
        return out
    if pool == "max_all" or key_padding_mask is None:
        return out.amax(dim=1) if out.shape[1] else out.new_zeros(out.shape[0], out.shape[2])
    filled = out.masked_fill(key_padding_mask[..., None], float("-inf"))
    pooled = filled.amax(dim=1) if out.shape[1] else out.new_full((out.shape[0], out.shape[2]), float("-inf"))
    return torch.where(torch.isinf(pooled) & (pooled < 0), torch.zeros_like(pooled), pooled)


def random_encoder(
    d: int, h: int, f: int, n_layers: int, seed: int = 0, batch_first: bool = True, final_norm: bool = False
) -> nn.TransformerEncoder:
    """A post-norm ReLU encoder with distinct, non-trivial weights in every layer (LayerNorm included),
    for checking and timing the kernel against its reference."""
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(d, h, f, dropout=0.0, batch_first=batch_first, layer_norm_eps=1e-5)
    enc = nn.TransformerEncoder(
        layer, n_layers, norm=nn.LayerNorm(d, eps=1e-6) if final_norm else None, enable_nested_tensor=False
    )
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[1] ** 0.5)
    return enc.eval()


def skut_reference(
    encoder: nn.TransformerEncoder,
    x: torch.Tensor,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    pool: str | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The definition: the real PyTorch layers (fast path off, eval), in ``dtype``, layer by layer,
    with fully masked rows set to zero after every layer (they are never keys of other rows).

    Args as ``skut_forward`` but with the ``nn.TransformerEncoder`` itself; ``x`` is (B, S, d).
    Returns float ``dtype`` outputs.
    """
    enc = copy.deepcopy(encoder).to(device=x.device, dtype=dtype).eval()
    layers = list(enc.layers) if isinstance(enc, nn.TransformerEncoder) else [enc]
    final = enc.norm if isinstance(enc, nn.TransformerEncoder) else None
    bsz, s, _ = x.shape
    h = x.to(dtype)
    dead = _dead_rows(key_padding_mask, bsz, s, causal, x.device)
    attn_mask = (
        torch.triu(torch.ones(s, s, dtype=torch.bool, device=x.device), diagonal=1) if causal else None
    )
    kpm = key_padding_mask
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad():
            for layer in layers:
                if not getattr(layer.self_attn, "batch_first", False):
                    out = layer(h.transpose(0, 1), src_mask=attn_mask, src_key_padding_mask=kpm).transpose(
                        0, 1
                    )
                else:
                    out = layer(h, src_mask=attn_mask, src_key_padding_mask=kpm)
                h = torch.where(dead[..., None], torch.zeros((), dtype=dtype, device=x.device), out)
            if final is not None:
                h = torch.where(dead[..., None], torch.zeros((), dtype=dtype, device=x.device), final(h))
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    return _pool(h, key_padding_mask, pool)


def skut_torch(
    x: torch.Tensor,
    packed: PackedEncoder,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    pool: str | None = None,
) -> torch.Tensor:
    """PyTorch evaluation of the packed weights (the CPU path); same semantics as the kernel.

    Works from the packed buffer alone (the original module is not needed at run time), in float32
    on CPU, and returns x's dtype.
    """
    _check_forward_args(x, packed, key_padding_mask, pool)
    bsz, s, d = x.shape
    h_, dh, f = packed.n_heads, packed.head_dim, packed.d_ff
    d_p, dh_p, f_p = packed.d_pad, packed.dh_pad, packed.ff_pad
    lm, lv = _layer_sizes(h_, d_p, dh_p, f_p)
    mats = packed.mats.float()
    vecs = packed.vecs.float()
    hw = h_ * d_p * dh_p
    y = x.float()
    dead = _dead_rows(key_padding_mask, bsz, s, causal, x.device)
    allowed = torch.ones((bsz, 1, s, s), dtype=torch.bool, device=x.device)
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask[:, None, None, :]
    if causal:
        allowed = allowed & torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
    for li in range(packed.n_layers):
        mo = mats[li * lm : (li + 1) * lm]
        vo = vecs[li * lv : (li + 1) * lv]
        wq, wk, wv = (mo[j * hw : (j + 1) * hw].view(h_, d_p, dh_p)[:, :d, :dh] for j in range(3))
        wo = mo[3 * hw : 4 * hw].view(h_, dh_p, d_p)[:, :dh, :d]
        w1 = mo[4 * hw : 4 * hw + d_p * f_p].view(d_p, f_p)[:d, :f]
        w2 = mo[4 * hw + d_p * f_p :].view(f_p, d_p)[:f, :d]
        bq, bk, bv = (vo[j * h_ * dh_p : (j + 1) * h_ * dh_p].view(h_, dh_p)[:, :dh] for j in range(3))
        o = 3 * h_ * dh_p
        bo, l1w, l1b = vo[o : o + d], vo[o + d_p : o + d_p + d], vo[o + 2 * d_p : o + 2 * d_p + d]
        o += 3 * d_p
        b1 = vo[o : o + f]
        o += f_p
        b2, l2w, l2b = vo[o : o + d], vo[o + d_p : o + d_p + d], vo[o + 2 * d_p : o + 2 * d_p + d]
        o += 3 * d_p
        eps1, eps2 = float(vo[o]), float(vo[o + 1])
        q = torch.einsum("bsd,hde->bhse", y, wq) + bq[None, :, None, :]
        k = torch.einsum("bsd,hde->bhse", y, wk) + bk[None, :, None, :]
        v = torch.einsum("bsd,hde->bhse", y, wv) + bv[None, :, None, :]
        sc = (q @ k.transpose(-1, -2)).masked_fill(~allowed, float("-inf"))  # base-2 logits
        p = torch.exp2(sc - sc.amax(dim=-1, keepdim=True).clamp_min(-1e30))
        p = p / p.sum(dim=-1, keepdim=True).clamp_min(1e-30)
        att = torch.einsum("bhst,bhte->bhse", p, v)
        attn = torch.einsum("bhse,hed->bsd", att, wo) + bo
        y = nn.functional.layer_norm(y + attn, (d,), l1w, l1b, eps1)
        ff = torch.relu(y @ w1 + b1) @ w2 + b2
        y = nn.functional.layer_norm(y + ff, (d,), l2w, l2b, eps2)
    if packed.final_norm:
        fo = vecs[packed.n_layers * lv :]
        y = nn.functional.layer_norm(y, (d,), fo[:d], fo[d_p : d_p + d], float(fo[2 * d_p]))
    y = y.masked_fill(dead[..., None], 0.0)
    return _pool(y, key_padding_mask, pool).to(x.dtype)
