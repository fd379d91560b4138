"""The ranking model's dense part (``RankingModel.dense``) in 2 + layers launches on the GPU.

What it computes, for N candidates of R request rows (DESIGN §2.5):

    x  = LayerNorm(user_dense[req] ⊕ item_dense ⊕ surface_emb[surface[req]] ⊕ hour_emb[hour[req]]
                   ⊕ cand ⊕ v1 ⊕ v2)
    x_{l+1} = x0 * (x_l W_lᵀ + b_l) + x_l              (DCN-v2 cross layers)
    h = ReLU(... ReLU(x W_1ᵀ + b_1) ...)                (MLP)
    p = sigmoid(h W_hᵀ + b_h)                          (heads)

In torch this is about twenty launches of a few microseconds each (gathers, embeddings, the
concatenation, LayerNorm, and an elementwise launch or two after every matrix product), which on the
GPU take longer than the products themselves. Here ``_dense_input_kernel`` gathers, concatenates and
normalises each row in one launch (the whole row in registers), and every linear layer is one
``_linear_kernel`` launch with its epilogue (the cross update, ReLU or sigmoid) fused. Products run
on TF32 tensor cores, as the torch path does with ``allow_tf32``.

The sequence-module outputs come as up to three column blocks (``seq_parts``), each a 2-D view with
its own row stride and float dtype: V1's ``out_linear`` output, V1's output rows read straight from
the transformer's (N, S, d) fp16 buffer, and V2's output, so that no concatenation is written first.

``dense_forward`` runs the kernels on CUDA tensors (and on CPU tensors under ``TRITON_INTERPRET=1``)
for up to ``FUSED_MAX_ROWS`` candidates, otherwise ``dense_torch``, the same computation in torch from
the packed weights (above that size cuBLAS's products are faster than these).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import interpreting, mma_sync_only, sm_count, tf32_matmuls

__all__ = ["DenseWeights", "pack_dense", "dense_forward", "dense_torch", "linear_config"]

EPILOGUES = ("none", "relu", "cross", "sigmoid")
MAX_SEQ_PARTS = 3
# Above this many rows cuBLAS's products win (a 4,096 x 1,184 x 1,184 cross layer: 0.043 ms against the
# best of these tiles, 0.063; at 1,024 rows the fused path is still 1.26x the torch one as a whole), so
# larger batches take ``dense_torch``: benchmarks/RESULTS.md.
FUSED_MAX_ROWS = 1024


@dataclass(frozen=True)
class DenseWeights:
    """The dense part's parameters, fp32 and contiguous, on one device (``pack_dense``).

    ``layers`` in order: (epilogue, W (out, in), b (out,)); epilogue "cross" (x0 * (xWᵀ + b) + x),
    "relu" (MLP) or "sigmoid" (the heads, last)."""

    surface_emb: torch.Tensor
    hour_emb: torch.Tensor
    norm_weight: torch.Tensor
    norm_bias: torch.Tensor
    norm_eps: float
    layers: tuple[tuple[str, torch.Tensor, torch.Tensor], ...]

    @property
    def width(self) -> int:
        """Columns of the normalised input row."""
        return self.norm_weight.shape[0]

    @property
    def heads(self) -> int:
        return self.layers[-1][1].shape[0]


def pack_dense(model: torch.nn.Module, device: torch.device | str | None = None) -> DenseWeights:
    """Copy a ``RankingModel``'s dense-part parameters into fp32 contiguous tensors (once, at load)."""
    dev = torch.device(device) if device is not None else model.head.weight.device

    def t(p: torch.Tensor) -> torch.Tensor:
        return p.detach().to(dev, torch.float32).contiguous()

    layers: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    for cross in model.cross:
        layers.append(("cross", t(cross.linear.weight), t(cross.linear.bias)))
    for mod in model.mlp:
        if isinstance(mod, torch.nn.Linear):
            layers.append(("relu", t(mod.weight), t(mod.bias)))
        elif not isinstance(mod, torch.nn.ReLU):
            raise ValueError(f"model.mlp holds a {type(mod).__name__}; only Linear + ReLU are supported")
    layers.append(("sigmoid", t(model.head.weight), t(model.head.bias)))
    norm = model.input_norm
    return DenseWeights(
        t(model.surface_emb.weight), t(model.hour_emb.weight), t(norm.weight), t(norm.bias), float(norm.eps),
        tuple(layers),
    )


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _append(x, c0, ptr, idx, stride, width, cols, row_ok):
    """Place columns [c0, c0 + width) of the row tile x: row ``idx`` of a (·, stride) table, as fp32.
    Returns the tile and the next free column."""
    j = cols - c0
    inside = (j >= 0) & (j < width)
    j = tl.where(inside, j, 0)
    m = row_ok[:, None] & inside[None, :]
    x += tl.load(ptr + idx[:, None].to(tl.int64) * stride + j[None, :], mask=m, other=0.0).to(tl.float32)
    return x, c0 + width


@triton.jit
def _dense_input_kernel(
    ud_ptr, id_ptr, sur_ptr, hour_ptr, se_ptr, he_ptr, cand_ptr, req_ptr,
    p0_ptr, p1_ptr, p2_ptr, nw_ptr, nb_ptr, out_ptr,
    M, WU, WI, E, WC, W0, W1, W2, ST0, ST1, ST2, D, eps,
    BM: tl.constexpr, BD: tl.constexpr,
):  # fmt: skip
    """BM whole rows per program: gather, concatenate, LayerNorm (two-pass variance), store."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    row_ok = rows < M
    cols = tl.arange(0, BD)
    req = tl.load(req_ptr + rows, mask=row_ok, other=0)
    sur = tl.load(sur_ptr + req, mask=row_ok, other=0)
    hr = tl.load(hour_ptr + req, mask=row_ok, other=0)
    x = tl.zeros((BM, BD), tl.float32)
    x, c = _append(x, 0, ud_ptr, req, WU, WU, cols, row_ok)  # the model's order (RankingModel.dense)
    x, c = _append(x, c, id_ptr, rows, WI, WI, cols, row_ok)
    x, c = _append(x, c, se_ptr, sur, E, E, cols, row_ok)
    x, c = _append(x, c, he_ptr, hr, E, E, cols, row_ok)
    x, c = _append(x, c, cand_ptr, rows, WC, WC, cols, row_ok)
    x, c = _append(x, c, p0_ptr, rows, ST0, W0, cols, row_ok)
    x, c = _append(x, c, p1_ptr, rows, ST1, W1, cols, row_ok)
    x, c = _append(x, c, p2_ptr, rows, ST2, W2, cols, row_ok)
    dmask = cols < D
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(dmask[None, :], x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / D
    w = tl.load(nw_ptr + cols, mask=dmask, other=0.0)
    b = tl.load(nb_ptr + cols, mask=dmask, other=0.0)
    y = xc * (1.0 / tl.sqrt(var + eps))[:, None] * w[None, :] + b[None, :]
    tl.store(out_ptr + rows[:, None].to(tl.int64) * D + cols[None, :], y, mask=row_ok[:, None] & dmask[None, :])


@triton.jit
def _linear_kernel(
    x_ptr, w_ptr, b_ptr, x0_ptr, out_ptr, M, N, K,
    EPI: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """out = epi(x Wᵀ + b) for one (BM, BN) tile; x (M, K), W (N, K), out and x0 (M, N), all contiguous.

    EPI 0: none, 1: ReLU, 2: cross update x0 * (·) + x (N == K), 3: sigmoid."""
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok = rm < M
    n_ok = rn < N
    x_rows = x_ptr + rm[:, None].to(tl.int64) * K
    w_rows = w_ptr + rn[:, None].to(tl.int64) * K
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + rk
        k_ok = k < K
        a = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_rows + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)  # (BN, BK), rows of W
        acc = tl.dot(a, tl.trans(wt), acc, input_precision=PREC)
    acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0)[None, :]
    offs = rm[:, None].to(tl.int64) * N + rn[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if EPI == 1:
        acc = tl.maximum(acc, 0.0)
    elif EPI == 2:
        x0 = tl.load(x0_ptr + offs, mask=mask, other=0.0)
        xl = tl.load(x_ptr + offs, mask=mask, other=0.0)  # N == K: the layer's input row, same columns
        acc = x0 * acc + xl
    elif EPI == 3:
        acc = tl.sigmoid(acc)
    tl.store(out_ptr + offs, acc, mask=mask)


# --------------------------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------------------------


def linear_config(m: int, n: int, k: int, sms: int) -> tuple[int, int, int, bool]:
    """(BM, BN, BK, wgmma) for an (m, k) x (k, n) product.

    Long products (k >= 512, m >= 64: the cross layers and the first MLP layer) take 64 x 32 tiles on
    Hopper's wgmma, which measured 1.3x faster than any mma.sync tile at 256 x 1,184 x 1,184
    (benchmarks/RESULTS.md). The rest take mma.sync tiles from 64 x 64, halved (the larger side first)
    until the grid has two programs per SM or the tiles are 16 x 16: these products are short, and more,
    smaller programs hide more of each program's chain of dependent steps."""
    if m >= 64 and k >= 512:
        return 64, 32, 64, True
    bm = 64
    bn = min(64, max(16, triton.next_power_of_2(n)))
    while triton.cdiv(m, bm) * triton.cdiv(n, bn) < 2 * sms and (bm > 16 or bn > 16):
        if bm >= bn and bm > 16:
            bm //= 2
        else:
            bn //= 2
    return bm, bn, 64, False


def _check(w, user_dense, item_dense, surface, hour, cand_req, cand, seq_parts) -> int:
    """What the kernels rely on (a ValueError names the tensor otherwise); returns N."""
    if not isinstance(w, DenseWeights):
        raise ValueError(f"w must be DenseWeights (see pack_dense), got {type(w).__name__}")
    if len(seq_parts) > MAX_SEQ_PARTS:
        raise ValueError(f"at most {MAX_SEQ_PARTS} sequence parts, got {len(seq_parts)}")
    tables = {"user_dense": user_dense, "item_dense": item_dense, "cand": cand}
    tables |= {f"seq_parts[{i}]": p for i, p in enumerate(seq_parts)}
    for name, t in tables.items():
        if not isinstance(t, torch.Tensor) or t.dim() != 2 or (t.shape[1] > 1 and t.stride(1) != 1):
            raise ValueError(f"{name} must be a 2-D tensor with contiguous rows, got {getattr(t, 'shape', t)}")
    n = cand.shape[0]
    for name, t in (*tables.items(), ("cand_req", cand_req)):
        if name != "user_dense" and t.shape[0] != n:
            raise ValueError(f"{name} has {t.shape[0]} rows, cand has {n}")
    if surface.shape != hour.shape or surface.shape[0] != user_dense.shape[0]:
        raise ValueError("surface and hour must have one entry per request row (user_dense's rows)")
    width = sum(t.shape[1] for t in tables.values()) + 2 * w.surface_emb.shape[1]
    if width != w.width:
        raise ValueError(f"the input row has {width} columns, the model's dense part expects {w.width}")
    return n


def dense_forward(
    w: DenseWeights,
    user_dense: torch.Tensor,
    item_dense: torch.Tensor,
    surface: torch.Tensor,
    hour: torch.Tensor,
    cand_req: torch.Tensor,
    cand: torch.Tensor,
    seq_parts: Sequence[torch.Tensor] = (),
    *,
    tf32: bool = True,
) -> torch.Tensor:
    """Head probabilities (N, H) fp32, as ``RankingModel.dense``.

    Args:
        w: ``pack_dense`` of the model, on the inputs' device.
        user_dense (R, du), surface (R,), hour (R,): per request row; cand_req (N,) maps candidates to rows.
        item_dense (N, di), cand (N, 32): per candidate.
        seq_parts: the sequence-module outputs in model order (V1 then V2), each (N, w_i), any float
            dtype, rows contiguous, any row stride; their widths must add up with the rest to the
            model's input width.
        tf32: products on TF32 tensor cores (default) or in full fp32.

    Runs the kernels for up to ``FUSED_MAX_ROWS`` candidates (more: ``dense_torch`` on cuBLAS, faster there).
    """
    n = _check(w, user_dense, item_dense, surface, hour, cand_req, cand, seq_parts)
    if not (cand.is_cuda or interpreting()) or n > FUSED_MAX_ROWS:
        with tf32_matmuls(tf32 and cand.is_cuda):
            return _dense_torch(w, user_dense, item_dense, surface, hour, cand_req, cand, seq_parts)
    dev = cand.device
    d = w.width
    if n == 0:
        return torch.empty((0, w.heads), dtype=torch.float32, device=dev)
    x0 = torch.empty((n, d), dtype=torch.float32, device=dev)
    parts = [(p, p.stride(0), p.shape[1]) if p.shape[1] else (cand, 0, 0) for p in seq_parts]
    parts += [(cand, 0, 0)] * (MAX_SEQ_PARTS - len(parts))  # absent: no column, never read
    user_dense, item_dense, cand = (t.float().contiguous() for t in (user_dense, item_dense, cand))
    bd = triton.next_power_of_2(max(d, 16))
    bm = max(1, min(16, 4096 // bd))
    e = w.surface_emb.shape[1]
    _dense_input_kernel[(triton.cdiv(n, bm),)](
        user_dense, item_dense, surface, hour, w.surface_emb, w.hour_emb, cand, cand_req,
        parts[0][0], parts[1][0], parts[2][0], w.norm_weight, w.norm_bias, x0,
        n, user_dense.shape[1], item_dense.shape[1], e, cand.shape[1],
        parts[0][2], parts[1][2], parts[2][2], parts[0][1], parts[1][1], parts[2][1], d, w.norm_eps,
        BM=bm, BD=bd, num_warps=4,
    )  # fmt: skip
    x = x0
    sms = sm_count(dev)
    for epi, wt, b in w.layers:
        out = torch.empty((n, wt.shape[0]), dtype=torch.float32, device=dev)
        bm_l, bn_l, bk_l, wgmma = linear_config(n, wt.shape[0], wt.shape[1], sms)
        with contextlib.nullcontext() if wgmma else mma_sync_only():
            _linear_kernel[(triton.cdiv(n, bm_l), triton.cdiv(wt.shape[0], bn_l))](
                x, wt, b, x0, out, n, wt.shape[0], wt.shape[1],
                EPI=EPILOGUES.index(epi), BM=bm_l, BN=bn_l, BK=bk_l, PREC="tf32" if tf32 else "ieee",
                num_warps=4, num_stages=3,
            )  # fmt: skip
        x = out
    return x


def dense_torch(
    w: DenseWeights,
    user_dense: torch.Tensor,
    item_dense: torch.Tensor,
    surface: torch.Tensor,
    hour: torch.Tensor,
    cand_req: torch.Tensor,
    cand: torch.Tensor,
    seq_parts: Sequence[torch.Tensor] = (),
) -> torch.Tensor:
    """The same computation in torch from the packed weights (the CPU path), fp32."""
    _check(w, user_dense, item_dense, surface, hour, cand_req, cand, seq_parts)
    return _dense_torch(w, user_dense, item_dense, surface, hour, cand_req, cand, seq_parts)


def _dense_torch(w, user_dense, item_dense, surface, hour, cand_req, cand, seq_parts) -> torch.Tensor:
    """``dense_torch`` on inputs already checked (``dense_forward``'s fallback checks them once)."""
    req = cand_req.long()
    x = torch.cat(
        [user_dense[req].float(), item_dense.float(), w.surface_emb[surface.long()[req]],
         w.hour_emb[hour.long()[req]], cand.float(), *(p.float() for p in seq_parts)], dim=1,
    )  # fmt: skip
    x0 = x = torch.nn.functional.layer_norm(x, (w.width,), w.norm_weight, w.norm_bias, w.norm_eps)
    for epi, wt, b in w.layers:
        y = torch.nn.functional.linear(x, wt, b)
        if epi == "cross":
            y = x0 * y + x
        elif epi == "relu":
            y = torch.relu(y)
        elif epi == "sigmoid":
            y = torch.sigmoid(y)
        x = y
    return x
