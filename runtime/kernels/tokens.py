"""Token builders: the transformer inputs of both sequence modules in one launch each.

Between the selection kernel and the transformer kernel the V2 module orders each candidate's
selected positions, gathers the int8 items, action masks and surfaces of those rows, dequantises,
adds the action, surface and position embeddings and places the null token; the V1 module reads the
newest ``seq_len`` real-time actions of the candidate's request, maps each action mask to its vocabulary
row and concatenates item and candidate. Written in torch that is some eighty small launches per
request (about 0.3 ms on an H200, each a few microseconds); here it is one program per candidate.

Both work on one token arena: the int8 items (T, 32), int32 action masks (T,) and int32 surfaces
(T,) of the three sequences of all request rows, laid out group by group (in any order: the runtime
puts ll last so that it can upload it on its own), each row of a group at ``base[group] + row * width[group]``.

``v2_tokens`` / ``v1_tokens`` run the Triton kernels on CUDA tensors (and on CPU tensors under
``TRITON_INTERPRET=1``), otherwise their PyTorch versions ``v2_tokens_torch`` / ``v1_tokens_torch``,
which are also the references the tests compare the kernels with.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from transact.config import ITEM_DIM as ITEM  # int8 item codes per row (DESIGN §2.1)

from . import interpreting

_ITEM: tl.constexpr = tl.constexpr(ITEM)  # the same, inside the kernels
POS_BITS = 26  # a V2 sort key is (segment << 26) | position: positions below 2**26
_INVALID: tl.constexpr = tl.constexpr(0x7FFFFFFF)  # the key of an empty slot: sorts last


@dataclass(frozen=True)
class TokenArena:
    """The three sequences (ll, rt, imp) of R request rows in one set of flat tensors.

    item (T, 32) int8, action (T,) int32 bitmask, surface (T,) int32; row r of group g starts at
    ``base[g] + r * width[g]``."""

    item: torch.Tensor
    action: torch.Tensor
    surface: torch.Tensor
    base: tuple[int, int, int]
    width: tuple[int, int, int]

    def rows(self, group: int, rows: int) -> torch.Tensor:
        """(rows * width, 32) item codes of one group."""
        lo = self.base[group]
        return self.item[lo : lo + rows * self.width[group]]


@dataclass(frozen=True)
class V2Embeddings:
    """The V2 module's token tables (fp32): action (A, d) summed over set bits, surface (S, d),
    position (P, d), the null token (d,)."""

    action: torch.Tensor
    surface: torch.Tensor
    position: torch.Tensor
    null: torch.Tensor


# --------------------------------------------------------------------------------------------
# V2: selected positions -> ordered tokens
# --------------------------------------------------------------------------------------------


@triton.jit
def _v2_tokens_kernel(
    ll_ptr, rt_ptr, imp_ptr,  # (N, K_*) int32 selected positions, any order, -1 = empty slot
    rt_count_ptr, cand_req_ptr, cand_ptr,  # (R,) valid rt rows, (N,) request row, (N, 32) fp32
    item_ptr, action_ptr, surface_ptr,  # the token arena
    base_ll, base_rt, base_imp, w_ll, w_rt, w_imp,
    act_emb_ptr, surf_emb_ptr, pos_emb_ptr, null_ptr,  # fp32 tables, rows of D
    x_ptr, pad_ptr, pos_out_ptr, group_out_ptr,  # (N, T, D) out dtype, (N, T) uint8, (N, T) int64 x2
    scale,
    K_LL: tl.constexpr, K_RT: tl.constexpr, K_IMP: tl.constexpr, R_RT: tl.constexpr,
    T: tl.constexpr, T_P: tl.constexpr, A: tl.constexpr, D: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0).to(tl.int64)
    t = tl.arange(0, T_P)
    req = tl.load(cand_req_ptr + n).to(tl.int64)
    # Segments of the unordered slots: ll picks, rt picks, imp picks, the newest R_RT rt rows.
    in_ll = t < K_LL
    in_rt = (t >= K_LL) & (t < K_LL + K_RT)
    in_imp = (t >= K_LL + K_RT) & (t < K_LL + K_RT + K_IMP)
    in_rec = (t >= K_LL + K_RT + K_IMP) & (t < T)
    p = tl.load(ll_ptr + n * K_LL + t, mask=in_ll, other=-1)
    p = tl.where(in_rt, tl.load(rt_ptr + n * K_RT + (t - K_LL), mask=in_rt, other=-1), p)
    p = tl.where(in_imp, tl.load(imp_ptr + n * K_IMP + (t - K_LL - K_RT), mask=in_imp, other=-1), p)
    recent = tl.load(rt_count_ptr + req).to(tl.int32) - R_RT + (t - (K_LL + K_RT + K_IMP))
    p = tl.where(in_rec, recent, p)
    seg = in_rt.to(tl.int32) + 2 * in_imp.to(tl.int32) + 3 * in_rec.to(tl.int32)
    # One ascending sort orders segment by segment, oldest -> newest, and packs empty slots last.
    key = tl.sort(tl.where(p >= 0, (seg << 26) | p, _INVALID))
    valid = key != _INVALID
    seg = key >> 26
    pos = key & ((1 << 26) - 1)
    group = tl.where(seg == 3, 1, seg)
    base = tl.where(group == 0, base_ll, tl.where(group == 1, base_rt, base_imp)).to(tl.int64)
    width = tl.where(group == 0, w_ll, tl.where(group == 1, w_rt, w_imp)).to(tl.int64)
    flat = tl.where(valid, base + req * width + pos, 0)
    in_t = t < T
    tl.store(pos_out_ptr + n * T + t, tl.where(valid, pos, -1).to(tl.int64), mask=in_t)
    tl.store(group_out_ptr + n * T + t, tl.where(valid, group, -1).to(tl.int64), mask=in_t)

    c = tl.arange(0, D)
    is_item = c < _ITEM
    codes = tl.load(item_ptr + flat[:, None] * _ITEM + c[None, :], mask=valid[:, None] & is_item[None, :], other=0)
    cand = tl.load(cand_ptr + n * _ITEM + (c - _ITEM), mask=c >= _ITEM, other=0.0)
    x = tl.where(is_item[None, :], codes.to(tl.float32) * scale, cand[None, :])
    action = tl.load(action_ptr + flat, mask=valid, other=0)
    for a in tl.static_range(A):  # the multi-hot action vector times the action table
        x += ((action >> a) & 1).to(tl.float32)[:, None] * tl.load(act_emb_ptr + a * D + c)[None, :]
    surface = tl.load(surface_ptr + flat, mask=valid, other=0).to(tl.int64)
    x += tl.load(surf_emb_ptr + surface[:, None] * D + c[None, :])
    x = x * valid.to(tl.float32)[:, None]  # padding slots carry no features, only positions
    x += tl.load(pos_emb_ptr + t[:, None] * D + c[None, :], mask=in_t[:, None], other=0.0)
    # A user with no actions at all gets the learned null token in slot 0.
    null = (tl.sum(valid.to(tl.int32), axis=0) == 0) & (t == 0)
    x = tl.where(null[:, None], tl.load(null_ptr + c)[None, :], x)
    tl.store(x_ptr + (n * T + t[:, None]) * D + c[None, :], x.to(x_ptr.dtype.element_ty), mask=in_t[:, None])
    tl.store(pad_ptr + n * T + t, (~(valid | null)).to(tl.uint8), mask=in_t)


def v2_tokens(
    arena: TokenArena,
    picks: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    rt_count: torch.Tensor,
    r_rt: int,
    cand: torch.Tensor,
    cand_req: torch.Tensor,
    emb: V2Embeddings,
    scale: float,
    dtype: torch.dtype = torch.float16,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The V2 transformer input of every candidate from its nearest-neighbour picks.

    Args:
        arena: the three sequences of all request rows.
        picks: (N, k_ll), (N, k_rt), (N, k_imp) selected positions within the candidate's row of
            each group, in any order, -1 for empty slots (``nn_select``'s output).
        rt_count: (R,) valid rt rows per request row; the newest ``r_rt`` of them always enter.
        r_rt: how many of the newest rt rows enter.
        cand: (N, 32) float32 candidate embeddings; cand_req: (N,) request row of each candidate.
        emb: the module's token tables; scale: dequantisation scale per code (quant_scale / 127).
        dtype: of the returned tokens.
    Returns:
        x (N, T, d) tokens, T = k_ll + k_rt + k_imp + r_rt: the chosen rows ordered ll, rt, imp, the
        newest rt rows (each oldest -> newest), valid tokens first; pad (N, T) bool key-padding mask;
        pos, group (N, T) int64 position and group (0 ll, 1 rt, 2 imp) of each token, -1 when padding.
    """
    _check_v2(arena, picks, rt_count, r_rt, cand, cand_req, emb)
    if not (cand.is_cuda or interpreting()):
        x, pad, pos, group = v2_tokens_torch(arena, picks, rt_count, r_rt, cand, cand_req, emb, scale)
        return x.to(dtype), pad, pos, group
    n, dev = cand.shape[0], cand.device
    k_ll, k_rt, k_imp = (p.shape[1] for p in picks)
    t, d = k_ll + k_rt + k_imp + r_rt, emb.action.shape[1]
    x = torch.empty((n, t, d), dtype=dtype, device=dev)
    pad = torch.empty((n, t), dtype=torch.bool, device=dev)
    pos = torch.empty((n, t), dtype=torch.int64, device=dev)
    group = torch.empty((n, t), dtype=torch.int64, device=dev)
    if n == 0 or t == 0:
        return x, pad, pos, group
    ll, rt, imp = (p.to(torch.int32).contiguous() for p in picks)
    _v2_tokens_kernel[(n,)](
        ll, rt, imp, rt_count.contiguous(), cand_req.contiguous(), cand.contiguous(),
        arena.item, arena.action, arena.surface, *arena.base, *arena.width,
        emb.action.contiguous(), emb.surface.contiguous(), emb.position.contiguous(), emb.null.contiguous(),
        x, pad.view(torch.uint8), pos, group, float(scale),
        K_LL=k_ll, K_RT=k_rt, K_IMP=k_imp, R_RT=r_rt, T=t, T_P=triton.next_power_of_2(t),
        A=emb.action.shape[0], D=d, num_warps=8,
    )  # fmt: skip
    return x, pad, pos, group


def v2_tokens_torch(
    arena: TokenArena,
    picks: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    rt_count: torch.Tensor,
    r_rt: int,
    cand: torch.Tensor,
    cand_req: torch.Tensor,
    emb: V2Embeddings,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``v2_tokens`` in PyTorch (float32 tokens): the same steps as ``TransActV2.select`` + ``tokens``."""
    dev, n = cand.device, cand.shape[0]
    req = cand_req.long()
    far = 1 << 40

    def ascending(p: torch.Tensor) -> torch.Tensor:  # oldest -> newest, empty slots last
        key = torch.where(p >= 0, p.long(), torch.full_like(p, far, dtype=torch.int64))
        key = key.sort(dim=1).values
        return torch.where(key >= far, torch.full_like(key, -1), key)

    recent = (rt_count.long() - r_rt)[req].unsqueeze(1) + torch.arange(r_rt, device=dev)
    recent = torch.where(recent >= 0, recent, torch.full_like(recent, -1))
    pos = torch.cat([ascending(p) for p in picks] + [recent], dim=1)
    sizes = [p.shape[1] for p in picks] + [r_rt]
    group = torch.cat([torch.full((n, k), g, dtype=torch.int64, device=dev)
                       for g, k in zip((0, 1, 2, 1), sizes, strict=True)], dim=1)  # fmt: skip
    valid = pos >= 0
    order = (~valid).to(torch.int8).sort(dim=1, stable=True).indices  # valid first, order kept
    pos, group, valid = pos.gather(1, order), group.gather(1, order), valid.gather(1, order)
    t = pos.shape[1]
    base = torch.tensor(arena.base, dtype=torch.int64, device=dev)
    width = torch.tensor(arena.width, dtype=torch.int64, device=dev)
    flat = torch.where(valid, base[group] + req.unsqueeze(1) * width[group] + pos, 0)
    x = torch.cat([arena.item[flat].float() * scale, cand.float().unsqueeze(1).expand(-1, t, -1)], dim=-1)
    bit = torch.arange(emb.action.shape[0], device=dev, dtype=torch.int32)
    bits = ((arena.action[flat].unsqueeze(-1) >> bit) & 1).float()
    x = x + bits @ emb.action + emb.surface[arena.surface[flat].long()]
    x = x * valid.unsqueeze(-1)
    x = x + emb.position[:t]
    null = (valid.sum(1) == 0).unsqueeze(1) & (torch.arange(t, device=dev) == 0).unsqueeze(0)
    x = torch.where(null.unsqueeze(-1), emb.null.expand_as(x), x)
    pad = ~(valid | null)
    return x, pad, torch.where(valid, pos, -1), torch.where(valid, group, -1)


def _check_v2(arena, picks, rt_count, r_rt, cand, cand_req, emb) -> None:
    n = cand.shape[0]
    if cand.dim() != 2 or cand.shape[1] != ITEM:
        raise ValueError(f"cand must be (N, {ITEM}), got {tuple(cand.shape)}")
    for name, p in zip(("ll", "rt", "imp"), picks, strict=True):
        if p.dim() != 2 or p.shape[0] != n:
            raise ValueError(f"picks[{name}] must be (N={n}, k), got {tuple(p.shape)}")
    d = emb.action.shape[1]
    if d != 2 * ITEM:
        raise ValueError(f"V2 tokens are item ⊕ candidate: d_model must be {2 * ITEM}, got {d}")
    t = sum(p.shape[1] for p in picks) + r_rt
    if emb.position.shape[0] < t:
        raise ValueError(f"the position table has {emb.position.shape[0]} rows, the tokens need {t}")
    if max(arena.width) >= 1 << POS_BITS:
        raise ValueError(f"sequence widths must be below 2**{POS_BITS}, got {arena.width}")
    if rt_count.dim() != 1 or cand_req.shape != (n,):
        raise ValueError("rt_count must be (R,) and cand_req (N,)")


# --------------------------------------------------------------------------------------------
# V1: the newest real-time actions of the request, newest first
# --------------------------------------------------------------------------------------------


@triton.jit
def _v1_tokens_kernel(
    rt_count_ptr, cand_req_ptr, cand_ptr, item_ptr, action_ptr, base_rt, w_rt,
    lookup_ptr, emb_ptr, x_ptr, mask_ptr, scale,
    S: tl.constexpr, S_P: tl.constexpr, A: tl.constexpr, D: tl.constexpr, D_P: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, S_P)
    req = tl.load(cand_req_ptr + n).to(tl.int64)
    p = tl.load(rt_count_ptr + req).to(tl.int64) - 1 - j  # slot j: the j-th newest valid action
    stored = (p >= 0) & (j < S)
    flat = base_rt + req * w_rt + tl.minimum(tl.maximum(p, 0), w_rt - 1)
    bits = tl.load(action_ptr + flat, mask=stored, other=0).to(tl.int64) & 0xFFFFFFFF
    top = tl.zeros((S_P,), tl.int64) - 1  # index of the highest set bit, -1 for no bit
    for b in tl.static_range(32):
        top += (bits >= (1 << b)).to(tl.int64)
    action = tl.where(stored, top + 1, 0)  # action id: highest bit + 1, 0 = nothing stored
    ids = tl.load(lookup_ptr + action + 1)
    c = tl.arange(0, D_P)
    is_emb = c < A
    is_item = (c >= A) & (c < A + _ITEM)
    is_cand = (c >= A + _ITEM) & (c < D)
    x = tl.load(emb_ptr + ids[:, None] * A + c[None, :], mask=(j < S)[:, None] & is_emb[None, :], other=0.0)
    codes = tl.load(item_ptr + flat[:, None] * _ITEM + (c - A)[None, :], mask=stored[:, None] & is_item[None, :],
                    other=0)  # fmt: skip
    x = tl.where(is_item[None, :], codes.to(tl.float32) * scale, x)
    cand = tl.load(cand_ptr + n * _ITEM + (c - A - _ITEM), mask=is_cand, other=0.0)
    x = tl.where(is_cand[None, :], cand[None, :], x)
    tl.store(x_ptr + (n * S + j[:, None]) * D + c[None, :], x.to(x_ptr.dtype.element_ty),
             mask=(j < S)[:, None] & (c < D)[None, :])  # fmt: skip
    tl.store(mask_ptr + n * S + j, ((ids <= 0) & (j != 0)).to(tl.uint8), mask=j < S)  # slot 0 always attends


def v1_tokens(
    arena: TokenArena,
    rt_count: torch.Tensor,
    seq_len: int,
    cand: torch.Tensor,
    cand_req: torch.Tensor,
    lookup: torch.Tensor,
    action_emb: torch.Tensor,
    scale: float,
    concat_candidate: bool = True,
    dtype: torch.dtype = torch.float16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The V1 transformer input of every candidate: its request's newest ``seq_len`` rt actions.

    Args:
        arena: the token arena (only the rt group is read); rt_count: (R,) valid rt rows per row.
        cand: (N, 32) float32; cand_req: (N,) request row of each candidate.
        lookup: the module's ``action_type_lookup`` (index action id + 1 -> vocabulary row);
        action_emb: (V, a) float32 action embedding table; scale: quant_scale / 127.
        concat_candidate: append the candidate embedding to every token.
    Returns:
        x (N, S, a + 32 [+ 32]) tokens, newest first; mask (N, S) bool key-padding mask (padding
        slots, never slot 0).
    """
    n, dev = cand.shape[0], cand.device
    a = action_emb.shape[1]
    d = a + ITEM * (2 if concat_candidate else 1)
    if cand.dim() != 2 or cand.shape[1] != ITEM or cand_req.shape != (n,):
        got = f"{tuple(cand.shape)} and {tuple(cand_req.shape)}"
        raise ValueError(f"cand must be (N, {ITEM}) and cand_req (N,), got {got}")
    if not (cand.is_cuda or interpreting()):
        x, mask = v1_tokens_torch(arena, rt_count, seq_len, cand, cand_req, lookup, action_emb, scale, concat_candidate)
        return x.to(dtype), mask
    x = torch.empty((n, seq_len, d), dtype=dtype, device=dev)
    mask = torch.empty((n, seq_len), dtype=torch.bool, device=dev)
    if n == 0 or seq_len == 0:
        return x, mask
    _v1_tokens_kernel[(n,)](
        rt_count.contiguous(), cand_req.contiguous(), cand.contiguous(), arena.item, arena.action,
        arena.base[1], arena.width[1], lookup.contiguous(), action_emb.contiguous(), x, mask.view(torch.uint8),
        float(scale), S=seq_len, S_P=triton.next_power_of_2(seq_len), A=a, D=d,
        D_P=triton.next_power_of_2(d), num_warps=4,
    )  # fmt: skip
    return x, mask


def v1_tokens_torch(
    arena: TokenArena,
    rt_count: torch.Tensor,
    seq_len: int,
    cand: torch.Tensor,
    cand_req: torch.Tensor,
    lookup: torch.Tensor,
    action_emb: torch.Tensor,
    scale: float,
    concat_candidate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``v1_tokens`` in PyTorch (float32): the same steps as ``transact_inputs`` + ``TransAct.forward``."""
    from transact.model import highest_bit

    dev, s = cand.device, seq_len
    rows = rt_count.shape[0]
    p = rt_count.long().unsqueeze(1) - 1 - torch.arange(s, device=dev)
    stored = p >= 0
    w_rt = arena.width[1]
    flat = arena.base[1] + torch.arange(rows, device=dev).unsqueeze(1) * w_rt + p.clamp(0, w_rt - 1)
    action = torch.where(stored, highest_bit(arena.action[flat]) + 1, torch.zeros_like(p))
    ids = lookup[action + 1]  # (R, S)
    item = arena.item[flat].float() * scale * stored.unsqueeze(-1)
    req = cand_req.long()
    x = torch.cat([action_emb[ids], item], dim=-1)[req]
    if concat_candidate:
        x = torch.cat([x, cand.float().unsqueeze(1).expand(-1, s, -1)], dim=-1)
    mask = (ids <= 0)[req]
    mask[:, 0] = False
    return x, mask
