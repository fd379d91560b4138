"""Reference nearest-neighbour selection over int8 user sequences (DESIGN §2.4 step 1).

This is the readable, exact definition that the fused GPU kernel and the model's vectorised
selection are both checked against. Semantics:

* Sequences are jagged: user ``u`` owns rows ``seq[starts[u] : starts[u] + lengths[u]]``, stored
  oldest -> newest. ``lengths`` counts only the *valid* prefix (actions before the request time);
  callers cut it, so a larger position always means a more recent action.
* Score = cosine similarity between the dequantised item and the candidate. The quantisation scale
  is one positive constant, so it cancels: we use the raw int8 codes. A zero vector scores 0.
* Output per candidate: the ``k`` best positions (relative to the user's start), best first; equal
  scores are broken by the more recent action (larger position first). Slots beyond the user's
  length hold index -1 and score -inf.
"""

from __future__ import annotations

import torch

EPS = 1e-12


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise the last dimension; an all-zero row stays zero (no NaN)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(EPS)


@torch.library.custom_op("transact::normalize_codes", mutates_args=())
def normalize_codes(codes: torch.Tensor) -> torch.Tensor:
    """``normalize_rows`` of int8 item codes (..., 32), in float32.

    An op of its own so that the ONNX export writes it as one ``LpNormalization`` node (one pass over the
    lifelong sequence instead of three: export.onnx_export). On int8 codes every implementation gives the same
    bits: each square and each partial sum of 32 of them is an integer below 2**24, so the sum is exact in float32
    in any order, and IEEE's square root and division are correctly rounded."""
    if codes.dtype != torch.int8 or codes.shape[-1] > 1024:  # 1024 * 128**2 = 2**24: the exactness bound
        raise ValueError(f"normalize_codes: int8 rows of at most 1024 codes, got {codes.dtype} {tuple(codes.shape)}")
    return normalize_rows(codes.to(torch.float32))


@normalize_codes.register_fake
def _normalize_codes_fake(codes: torch.Tensor) -> torch.Tensor:
    return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)


def nn_select_reference(
    seq: torch.Tensor,
    starts: torch.Tensor,
    lengths: torch.Tensor,
    cand: torch.Tensor,
    cand_user: torch.Tensor,
    k: int,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k cosine neighbours of each candidate within its own user's sequence.

    Args:
        seq: (T, D) int8 item codes of all users, concatenated.
        starts, lengths: (U,) first row and number of valid rows of each user.
        cand: (N, D) candidate embeddings (float or int8).
        cand_user: (N,) the user each candidate belongs to.
        k: how many neighbours to return.
        dtype: precision of the scores (float64 for an exact reference).
    Returns:
        idx (N, k) int64 positions relative to the user's start (-1 for empty slots), and
        scores (N, k) in ``dtype`` (-inf for empty slots).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    n = cand.shape[0]
    idx = torch.full((n, k), -1, dtype=torch.int64)
    scores = torch.full((n, k), float("-inf"), dtype=dtype)
    cand_hat = normalize_rows(cand.detach().cpu().to(dtype))
    for i in range(n):
        u = int(cand_user[i])
        start, length = int(starts[u]), int(lengths[u])
        if length == 0:
            continue
        items = normalize_rows(seq[start : start + length].detach().cpu().to(dtype))
        # Multiply and sum per row (not a matmul, whose blocking may round equal rows differently), so
        # that identical items get bit-identical scores and the recency tie-break decides.
        s = (items * cand_hat[i]).sum(dim=1)
        # Newest first, then a stable sort by descending score: equal scores keep newest-first order.
        newest_first = torch.arange(length - 1, -1, -1)
        order = torch.sort(s[newest_first], descending=True, stable=True).indices
        take = newest_first[order[:k]]
        idx[i, : take.numel()] = take
        scores[i, : take.numel()] = s[take]
    return idx, scores
