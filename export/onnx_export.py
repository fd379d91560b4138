"""PyTorch -> ONNX for the two graphs of a bundle (DESIGN §3).

* ``full.onnx``  — the whole model, NN selection included: every ``Batch`` input in ``INPUT_NAMES`` order
  -> ``probabilities`` (N, H), ``scores`` (N,), when TransAct V2 is on the selection it made
  (``selection_group`` / ``selection_pos``, (N, T) int64, -1 in unused slots) so that parity checks can
  compare the chosen tokens, not only the final numbers, and the two sequence-module outputs ``v1`` / ``v2``
  (what ``dense.onnx`` takes), so that the cpu backend can run the graph up to them per chunk of candidates
  and ``dense.onnx`` over all of them (runtime.backends.cpu).
* ``dense.onnx`` — the CPU-side graph: dense/context features and the two sequence-module outputs
  ``v1`` / ``v2`` -> ``probabilities`` and ``scores``.

Both graphs carry their weights as initializers and are exported with the dynamo exporter
(``torch.export`` + onnxscript) with symbolic requests ``R``, candidates ``N`` and sequence lengths
``L_ll`` / ``L_rt`` / ``L_imp``. The transformer fast path is off and the model in eval mode while
tracing.

Self-attention inside ``full.onnx``: PyTorch's ``nn.MultiheadAttention`` decomposes into a long chain of
transposes, mask arithmetic and batched matmuls that materialise every (N, T, T) score tensor; ONNX
Runtime runs that about as fast as eager PyTorch. While exporting, each post-norm ``nn.TransformerEncoder``
is therefore traced through ``encoder_forward`` below, which computes the same function with the attention
of each layer written out as plain products per head (``_self_attention_onnx``: q, k and v each by its own
projection, scores, masks, softmax, weighted sum; no transposes of the token tensors). A causal layer of static
length (V2's T) runs as four query blocks, each against the keys up to its end: 62.5% of the score work. Where
a layer has one head, its output projection is folded into the values (``_values_through_out_proj``). V2's
kept tokens are a prefix of each sequence, so its causal layers need no key-padding mask at all
(``transact_v2_encode``). TransAct's first layer goes further (``candidate_attention``): its tokens are the
request's rt actions with the candidate's embedding appended, so the request row's share of the projections
and scores is computed once and every candidate's attention comes out of two products over the row's keys.
The eager model is untouched and the parity checker holds the exported graph to it. Both graphs are standard
ONNX (opset 18), with no operator of ONNX Runtime's own domains.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
import torch.nn.functional as F
from onnxscript import opset18 as op
from torch import nn
from torch.export import Dim

from transact.batch import INPUT_NAMES, SEQUENCES, Batch, Seq
from transact.config import ModelConfig
from transact.data.random_batch import random_batch
from transact.model import RankingModel, TransAct, TransActV2, transformer_fastpath

from .manifest import DEFAULT_OPSET, DENSE_INPUTS, DENSE_OUTPUTS, FULL_OUTPUTS, SELECTION_OUTPUTS, SEQUENCE_OUTPUTS

# Example sizes used for tracing: all >= 2 and pairwise different, so that no dynamic dim is specialised
# or unified with another one by accident.
EXAMPLE_R, EXAMPLE_N = 3, 11
EXAMPLE_WIDTH = {"ll": 53, "rt": 29, "imp": 23}


MASK_FILTER = -1e30  # added to masked attention scores; exp() of it is exactly 0, like -inf
# Causal attention of a static length runs as this many query blocks in full.onnx (V2: T = 192 -> 4 x 48), each
# against the keys up to its end: 62.5% of the (S, S) score work (benchmarks/RESULTS.md, 2026-12-06: the request
# with 2, 3 or 6 blocks within 1% of 4, with 8 3% slower; V2's layer as one whole block ~10% slower).
CAUSAL_BLOCKS = 4


class ExportFailed(RuntimeError):
    """torch.export / the ONNX translation failed; the message says which graph."""


# ---------------------------------------------------------------------------------------------
# Self-attention for export
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("transact_export::self_attention", mutates_args=())
def self_attention(
    x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor, keep: torch.Tensor, num_heads: int, causal: bool,
    block_ends: list[int], keys_prefix: bool,
) -> torch.Tensor:  # fmt: skip
    """Multi-head self-attention before the output projection: x (B, S, E), weight_t (E, 3E), bias (3E,),
    keep (B, S) int32 (1 = attend to this key), -> (B, S, E).

    ``block_ends`` (causal, static S only; empty = one block) only changes how the ONNX graph computes the same
    function: queries in blocks, each block against the keys up to its end (``_self_attention_onnx``).
    ``keys_prefix`` (causal only): the caller's kept keys are a prefix of every sequence, so no kept query ever
    reads a dropped key under the causal mask; the key-padding mask is left out, which changes only the rows of
    dropped positions."""
    if keys_prefix and causal:
        keep = torch.ones_like(keep)
    return _attention(x, weight_t, bias, keep, num_heads, causal)


def _attention(
    x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor, keep: torch.Tensor, num_heads: int, causal: bool
) -> torch.Tensor:
    b, s, e = x.shape
    hd = e // num_heads
    q, k, v = (x @ weight_t + bias).split(e, dim=-1)
    q, k, v = (t.reshape(b, s, num_heads, hd).transpose(1, 2) for t in (q, k, v))
    scores = (q @ k.transpose(-1, -2)) * hd**-0.5
    masked = (keep == 0)[:, None, None, :]
    if causal:
        masked = masked | torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1)
    probs = scores.masked_fill(masked, float("-inf")).softmax(-1)
    return (probs @ v).transpose(1, 2).reshape(b, s, e)


@self_attention.register_fake
def _self_attention_fake(x, weight_t, bias, keep, num_heads, causal, block_ends, keys_prefix):  # noqa: ANN001, ANN202
    return torch.empty_like(x)


def _dropped(keep):  # noqa: ANN001, ANN202
    """The keys that ``keep`` (int32, 1 = attend) drops, as booleans."""
    return op.Not(op.Cast(keep, to=onnx.TensorProto.BOOL))


def _causal_tile(start: int, end: int) -> onnx.TensorProto:
    """Query rows [start, end) against keys [0, end): 0 where the key is at or before the query, else MASK_FILTER."""
    tile = torch.zeros(end - start, end)
    tile[:, start:] = torch.full((end - start, end - start), MASK_FILTER).triu(1)
    return onnx.numpy_helper.from_array(tile.numpy())


def _self_attention_onnx(x, weight_t, bias, keep, num_heads: int, causal: bool, block_ends: list[int],  # noqa: ANN001, ANN202
                         keys_prefix: bool):  # fmt: skip
    # Plain products, per head: q, k and v each by its own projection (the score scale folded into q's weights;
    # no packed QKV product to split, which is a copy of all three), the scores of each query block against
    # the keys up to its end, a constant causal tile and the key-padding bias added, softmax, the weighted sum.
    # ONNX Runtime's com.microsoft.Attention computes these same products (bit for bit on V2's layer) but
    # splits its packed projection and builds its masks on every call: written out so, V2's layers made the
    # request 1.05-1.09x faster and TransAct's second layer ~1.03x more (benchmarks/RESULTS.md, 2026-12-06).
    # Standard ONNX only.
    e = weight_t.shape[0]
    hd = e // num_heads
    scale = op.Constant(value_float=hd**-0.5)
    axis0, axis1, axis2 = (op.Constant(value_ints=[a]) for a in (0, 1, 2))
    start0 = op.Constant(value_ints=[0])
    key_bias = None
    if not (causal and keys_prefix):
        neg, zero = op.Constant(value_float=MASK_FILTER), op.Constant(value_float=0.0)
        key_bias = op.Unsqueeze(op.Where(_dropped(keep), neg, zero), axis1)  # (B, 1, S)
    whole = not (causal and block_ends)
    spans = [(0, None)] if whole else list(zip([0, *block_ends[:-1]], block_ends, strict=True))
    if causal and whole:  # a dynamic (or short) length: the causal tile from the sequence's length
        s = op.Shape(x, start=1, end=2)
        tiles = [op.Trilu(op.Expand(op.Constant(value_float=MASK_FILTER), op.Concat(s, s, axis=0)),
                          op.Constant(value_int=1), upper=1)]  # fmt: skip
    else:
        tiles = [op.Constant(value=_causal_tile(a, z)) for a, z in spans] if causal else [None]
    # The projections on the tokens as rows (B S, E): ONNX Runtime fuses a 2-D product and its bias into one Gemm,
    # where with a dynamic batch the 3-D product's bias stayed a pass of its own over the result.
    rows = op.Reshape(x, op.Constant(value_ints=[-1, e]))
    per_head = op.Concat(op.Shape(x, start=0, end=2), op.Constant(value_ints=[hd]), axis=0)
    heads = []
    for h in range(num_heads):

        def weights(part: int, h: int = h):  # noqa: ANN202
            lo, hi = op.Constant(value_ints=[part * e + h * hd]), op.Constant(value_ints=[part * e + (h + 1) * hd])
            return op.Slice(weight_t, lo, hi, axis1), op.Slice(bias, lo, hi, axis0)

        (wq, bq), (wk, bk), (wv, bv) = weights(0), weights(1), weights(2)
        q = op.Reshape(op.Add(op.MatMul(rows, op.Mul(wq, scale)), op.Mul(bq, scale)), per_head)  # (B, S, hd)
        k = op.Reshape(op.Add(op.MatMul(rows, wk), bk), per_head)
        v = op.Reshape(op.Add(op.MatMul(rows, wv), bv), per_head)
        blocks = []
        for (start, end), tile in zip(spans, tiles, strict=True):
            stop = None if end is None else op.Constant(value_ints=[end])
            qb = q if end is None else op.Slice(q, op.Constant(value_ints=[start]), stop, axis1)
            last = end is None or end == block_ends[-1]
            kb, vb = (k, v) if last else (op.Slice(k, start0, stop, axis1), op.Slice(v, start0, stop, axis1))
            scores = op.MatMul(qb, op.Transpose(kb, perm=[0, 2, 1]))
            if tile is not None:
                scores = op.Add(scores, tile)
            if key_bias is not None:
                scores = op.Add(scores, key_bias if last else op.Slice(key_bias, start0, stop, axis2))
            blocks.append(op.MatMul(op.Softmax(scores, axis=-1), vb))
        heads.append(blocks[0] if len(blocks) == 1 else op.Concat(*blocks, axis=1))
    return heads[0] if num_heads == 1 else op.Concat(*heads, axis=-1)


# Smallest softmax denominator the factored candidate attention trusts (below it the two separately shifted
# exponentials may have underflowed; see _candidate_attention_onnx).
FACTORED_MIN_DENOMINATOR = 1e-20


@torch.library.custom_op("transact_export::candidate_attention", mutates_args=())
def candidate_attention(
    x: torch.Tensor, tokens: torch.Tensor, cand: torch.Tensor, cand_request: torch.Tensor, keep: torch.Tensor,
    weight_t: torch.Tensor, bias: torch.Tensor, num_heads: int,
) -> torch.Tensor:  # fmt: skip
    """Self-attention (before the output projection) over candidates' sequences whose tokens are their request
    row's tokens with the candidate's embedding appended: x (N, S, E) = [tokens (R, S, Et)[cand_request] ;
    cand (N, E - Et) on every slot], keep (R, S) int32 per row. The same function as ``self_attention`` on x
    with ``keep[cand_request]``; only the ONNX graph uses the structure (``_candidate_attention_onnx``)."""
    return _attention(x, weight_t, bias, keep[cand_request], num_heads, False)


@candidate_attention.register_fake
def _candidate_attention_fake(x, tokens, cand, cand_request, keep, weight_t, bias, num_heads):  # noqa: ANN001, ANN202
    return torch.empty_like(x)


def _candidate_attention_onnx(x, tokens, cand, cand_request, keep, weight_t, bias, num_heads: int):  # noqa: ANN001, ANN202
    # Each projection splits into the row's tokens' part and the candidate's: q = qa + qc, k = ka + kc,
    # v = va + vc. In the scores (qa_t + qc).(ka_s + kc) the terms without ka_s are the same for every key
    # s and cancel in the softmax, so a candidate's scores are A[t, s] + B_c[s], A = qa.ka (the row's,
    # computed once) and B_c = qc.ka, and since a row's weights sum to 1 (slot 0 is never masked),
    #     out_c[t] = sum_s e^A[t,s] e^B_c[s] va_s / sum_s e^A[t,s] e^B_c[s] + vc.
    # With e^A shifted by its row maxima and e^B by each candidate's, every candidate of a row comes out of
    # one product e^A @ [e^B_c * va for all c] and one e^A @ (e^B)^T: the QKV projection of N x S tokens
    # and the N x S x S score products of the plain form are gone. The two shifts are not the (t, c) pair's
    # own maximum, so a pair whose best key scores poorly on both sides can underflow; a candidate with a
    # denominator below FACTORED_MIN_DENOMINATOR anywhere is computed again in the plain form (usually none:
    # it then runs on zero rows). Every row pairs with every candidate (R x N work, exactly right for
    # one request row, as the selection).
    heads = op.Constant(value_ints=[0, 0, num_heads, -1])
    w_cand = op.Slice(weight_t, op.Shape(tokens, start=2), op.Constant(value_ints=[2**62]), op.Constant(value_ints=[0]))
    w_tok = op.Slice(weight_t, op.Constant(value_ints=[0]), op.Shape(tokens, start=2), op.Constant(value_ints=[0]))
    qa, ka, va = op.Split(op.Add(op.MatMul(tokens, w_tok), bias), axis=-1, num_outputs=3)  # (R, S, E) each
    head_dim = op.Div(op.Shape(x, start=2), op.Constant(value_ints=[num_heads]))
    scale = op.Reciprocal(op.Sqrt(op.Cast(head_dim, to=onnx.TensorProto.FLOAT)))
    qa = op.Mul(op.Transpose(op.Reshape(qa, heads), perm=[0, 2, 1, 3]), scale)  # (R, H, S, hd)
    ka = op.Transpose(op.Reshape(ka, heads), perm=[0, 2, 3, 1])  # (R, H, hd, S)
    va = op.Transpose(op.Reshape(va, heads), perm=[0, 2, 1, 3])  # (R, H, S, hd)
    unkept = _dropped(keep)  # (R, S)
    padded = op.Unsqueeze(unkept, op.Constant(value_ints=[1, 2]))  # (R, 1, 1, S)
    neg = op.Constant(value_float=MASK_FILTER)
    last = op.Constant(value_ints=[-1])
    a = op.Where(padded, neg, op.MatMul(qa, ka))  # (R, H, S, S)
    ea = op.Exp(op.Sub(a, op.ReduceMax(a, last, keepdims=1)))
    qc, _, vc = op.Split(op.MatMul(cand, w_cand), axis=-1, num_outputs=3)  # (N, E) each
    qc = op.Mul(op.Transpose(op.Reshape(qc, op.Constant(value_ints=[0, num_heads, -1])), perm=[1, 2, 0]), scale)
    # B_c with the keys first, (R, H, S, N), so that e^B_c * va comes out in the order the product with e^A reads
    # (keys, then candidates and their head dims) and nothing the size of N x S x hd is transposed.
    kt = op.Transpose(ka, perm=[0, 1, 3, 2])  # (R, H, S, hd)
    # (R, H, S, hd) @ (H, hd, N) -> (R, H, S, N), padded keys masked
    b = op.Where(op.Unsqueeze(unkept, op.Constant(value_ints=[1, 3])), neg, op.MatMul(kt, qc))
    eb = op.Exp(op.Sub(b, op.ReduceMax(b, op.Constant(value_ints=[2]), keepdims=1)))
    g = op.Mul(op.Unsqueeze(eb, last), op.Unsqueeze(va, op.Constant(value_ints=[3])))  # (R, H, S, N, hd)
    g = op.Reshape(g, op.Constant(value_ints=[0, 0, 0, -1]))  # (R, H, S, N * hd)
    num = op.Reshape(op.MatMul(ea, g), op.Concat(op.Constant(value_ints=[0, 0, 0, -1]), head_dim, axis=0))
    den = op.MatMul(ea, eb)  # (R, H, S, N)
    out = op.Div(num, op.Unsqueeze(den, last))  # (R, H, S, N, hd)
    out = op.Reshape(op.Transpose(out, perm=[0, 3, 2, 1, 4]), op.Concat(last, op.Shape(x, start=1), axis=0))
    n = op.Shape(cand_request)
    own = op.Add(op.Mul(cand_request, n), op.Range(op.Constant(value_int=0), op.Squeeze(n), op.Constant(value_int=1)))
    out = op.Add(op.Gather(out, own, axis=0), op.Unsqueeze(vc, op.Constant(value_ints=[1])))  # (N, S, E)
    smallest = op.Gather(op.Reshape(op.ReduceMin(den, op.Constant(value_ints=[1, 2]), keepdims=0), last), own)
    redo = op.Reshape(op.NonZero(op.Less(smallest, op.Constant(value_float=FACTORED_MIN_DENOMINATOR))), last)
    redo_keep = op.Gather(op.Gather(keep, cand_request), redo)
    plain = _self_attention_onnx(op.Gather(x, redo, axis=0), weight_t, bias, redo_keep, num_heads, False, [], False)
    return op.ScatterND(out, op.Unsqueeze(redo, last), plain)


def _normalize_codes_onnx(codes):  # noqa: ANN001, ANN202
    # One pass over the sequence where the decomposition of normalize_rows takes three (ReduceL2, Clip, Div):
    # LpNormalization divides each row by its L2 norm and leaves a zero row zero, as normalize_rows does, and
    # on int8 codes every such computation gives the same bits (transact.selection.normalize_codes).
    return op.LpNormalization(op.Cast(codes, to=onnx.TensorProto.FLOAT), axis=-1, p=2)


# Always used: the model's own custom ops.
MODEL_TRANSLATIONS = {torch.ops.transact.normalize_codes.default: _normalize_codes_onnx}
# With fuse_attention (the default): the export's attention ops.
TRANSLATIONS = {
    **MODEL_TRANSLATIONS,
    torch.ops.transact_export.self_attention.default: _self_attention_onnx,
    torch.ops.transact_export.candidate_attention.default: _candidate_attention_onnx,
}


def _fusable(encoder: nn.TransformerEncoder) -> bool:
    """Post-norm, ReLU, batch-first layers with packed QKV and biases: what ``encoder_forward`` implements."""
    for layer in encoder.layers:
        attn = layer.self_attn
        if (
            layer.norm_first or not attn.batch_first or not attn._qkv_same_embed_dim or attn.in_proj_bias is None
            or attn.bias_k is not None or attn.add_zero_attn or getattr(layer, "activation_relu_or_gelu", 0) != 1
        ):  # fmt: skip
            return False
    return True


def causal_block_ends(s: int | torch.SymInt, blocks: int = CAUSAL_BLOCKS) -> list[int]:
    """Query-block ends for causal attention over a static length (none for a dynamic or short one)."""
    if not isinstance(s, int) or s < 2 * blocks:
        return []
    size = -(-s // blocks)
    return [min(s, size * (i + 1)) for i in range(blocks)]


def encoder_forward(
    encoder: nn.TransformerEncoder,
    src: torch.Tensor,
    mask: torch.Tensor | None = None,
    src_key_padding_mask: torch.Tensor | None = None,
    is_causal: bool | None = None,
) -> torch.Tensor:
    """``nn.TransformerEncoder.forward`` for export (eval mode): the same maths, fused attention.

    ``mask`` must be None or the causal mask announced with ``is_causal=True`` (what the model passes)."""
    causal = mask is not None
    if causal and not is_causal:
        raise ExportFailed("attention masks other than the causal mask are not supported by the fused export")
    if src_key_padding_mask is None:
        keep = torch.ones(src.shape[:2], dtype=torch.int32, device=src.device)
    elif src_key_padding_mask.dtype == torch.bool:
        keep = (~src_key_padding_mask).to(torch.int32)
    else:  # additive float mask: 0 keeps, -inf drops
        keep = (src_key_padding_mask == 0).to(torch.int32)
    return _encoder_layers(encoder, src, keep, causal)


def _values_through_out_proj(attn: nn.MultiheadAttention) -> tuple[torch.Tensor, torch.Tensor]:
    """One head's QKV weights (E, 3E) and bias (3E,) with the output projection folded into the values: a row of
    attention weights sums to 1, so (P V) Wo^T + bo = P (V Wo^T + bo), and V Wo^T + bo = x (Wv^T Wo^T) +
    (bv Wo^T + bo). One (B S, E) x (E, E) product per layer fewer (V2's request 1.02x, benchmarks/RESULTS.md)."""
    e = attn.embed_dim
    w, bias, wo = attn.in_proj_weight.t(), attn.in_proj_bias, attn.out_proj.weight.t()
    wv = w[:, 2 * e :] @ wo
    bv = bias[2 * e :] @ wo + attn.out_proj.bias
    return torch.cat([w[:, : 2 * e], wv], dim=1), torch.cat([bias[: 2 * e], bv])


def _encoder_layers(
    encoder: nn.TransformerEncoder, src: torch.Tensor, keep: torch.Tensor, causal: bool,
    first_attention: torch.Tensor | None = None, keys_prefix: bool = False,
) -> torch.Tensor:  # fmt: skip
    """Every layer (and the final norm) on src (B, S, E) with keys ``keep`` (B, S) int32; ``first_attention``,
    when given, is the first layer's attention output (before its output projection), computed elsewhere;
    ``keys_prefix``: see ``self_attention``."""
    # Rows are independent outside attention: keep them 2-D there (plain Gemm and LayerNormalization;
    # ONNX Runtime would otherwise fuse the 3-D residual adds into SkipLayerNormalization, which its CPU
    # kernel runs several times slower than Add + LayerNormalization at these widths).
    b, s, e = src.shape
    x = src.reshape(b * s, e)
    ends = causal_block_ends(s) if causal else []
    for i, layer in enumerate(encoder.layers):
        attn = layer.self_attn
        if i == 0 and first_attention is not None:
            a = attn.out_proj(first_attention.reshape(b * s, e))
        elif attn.num_heads == 1:  # the output projection folded into the values
            weight_t, bias = _values_through_out_proj(attn)
            a = self_attention(x.reshape(b, s, e), weight_t, bias, keep, 1, causal, ends, keys_prefix).reshape(b * s, e)
        else:
            a = self_attention(x.reshape(b, s, e), attn.in_proj_weight.t(), attn.in_proj_bias, keep, attn.num_heads,
                               causal, ends, keys_prefix)  # fmt: skip
            a = attn.out_proj(a.reshape(b * s, e))
        x = layer.norm1(x + a)
        x = layer.norm2(x + layer.linear2(F.relu(layer.linear1(x))))
    if encoder.norm is not None:
        x = encoder.norm(x)
    return x.reshape(b, s, e)


def transact_forward_rows(
    self: TransAct, action: torch.Tensor, item: torch.Tensor, action_time: torch.Tensor, request_time: torch.Tensor,
    item_embedding: torch.Tensor, cand_request: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """``TransAct.forward_rows`` for export (eval mode): the first layer's attention through
    ``candidate_attention``, which works out the row's share of it once for all its candidates."""
    tokens, mask = self.row_tokens(action, item, action_time, request_time)
    keep = (~mask).to(torch.int32)
    cand = item_embedding.to(torch.float32)
    x = torch.cat([tokens[cand_request], cand.unsqueeze(1).expand(-1, tokens.shape[1], -1)], dim=-1)
    attn = self.transformer_encoder.layers[0].self_attn
    first = candidate_attention(x, tokens, cand, cand_request, keep, attn.in_proj_weight.t(), attn.in_proj_bias,
                                attn.num_heads)  # fmt: skip
    return self.output(_encoder_layers(self.transformer_encoder, x, keep[cand_request], False, first))


def transact_v2_encode(self: TransActV2, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """``TransActV2.encode`` for export (eval mode). The selection packs valid tokens to the front, so padding is a
    suffix and under the causal mask a valid row reads no padded key: the key-padding mask changes only padded
    rows, which the pool never reads, and the graph leaves it out."""
    return _encoder_layers(self.transformer_encoder, x, (~pad).to(torch.int32), True, keys_prefix=True)


@contextlib.contextmanager
def fused_attention(model: nn.Module) -> Iterator[None]:
    """Route every fusable ``nn.TransformerEncoder`` of ``model`` through ``encoder_forward``, TransActV2's causal
    encoder through ``transact_v2_encode``, and TransAct's request rows through ``transact_forward_rows`` when its
    tokens carry the candidate's embedding."""
    patched = []
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and _fusable(module):
            module.forward = encoder_forward.__get__(module)
            patched.append((module, "forward"))
        elif isinstance(module, TransActV2) and _fusable(module.transformer_encoder):
            module.encode = transact_v2_encode.__get__(module)
            patched.append((module, "encode"))
        elif (isinstance(module, TransAct) and module.config.concat_candidate_emb
              and _fusable(module.transformer_encoder)):  # fmt: skip
            module.forward_rows = transact_forward_rows.__get__(module)
            patched.append((module, "forward_rows"))
    try:
        yield
    finally:
        for module, name in patched:
            delattr(module, name)


@contextlib.contextmanager
def export_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode, no grad and PyTorch's transformer fast path off; everything restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with transformer_fastpath(False), torch.no_grad():
            yield
    finally:
        model.train(was_training)


class FullGraph(nn.Module):
    """Flat-tensor wrapper of ``RankingModel``: INPUT_NAMES tensors -> probabilities, scores (, selection), v1, v2."""

    def __init__(self, model: RankingModel) -> None:
        super().__init__()
        self.model = model
        self.with_selection = model.transact_v2 is not None

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        batch = Batch.from_named(dict(zip(INPUT_NAMES, tensors, strict=True)))
        out = self.model.forward_with_aux(batch)
        result = (out.probs, self.model.score(out.probs))
        if self.with_selection:
            sel = out.v2_selection
            result += (torch.where(sel.valid, sel.group, -1), torch.where(sel.valid, sel.pos, -1))
        return result + (out.v1, out.v2)


class DenseGraph(nn.Module):
    """``RankingModel.dense`` with the final score: DENSE_INPUTS -> probabilities, scores."""

    def __init__(self, model: RankingModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, user_dense, surface, hour, cand_request, cand_item, item_dense, v1, v2):  # noqa: ANN001
        probs = self.model.dense(user_dense, item_dense, surface, hour, cand_request, cand_item, v1, v2)
        return probs, self.model.score(probs)


def full_output_names(config: ModelConfig) -> tuple[str, ...]:
    return FULL_OUTPUTS + (SELECTION_OUTPUTS if config.transact_v2.enabled else ()) + SEQUENCE_OUTPUTS


def pad_batch(batch: Batch, widths: dict[str, int]) -> Batch:
    """The same batch with each sequence padded (zeros, beyond ``length``) to the given widths."""
    seqs = {}
    for s in SEQUENCES:
        seq: Seq = getattr(batch, s)
        extra = widths[s] - seq.ts.shape[1]
        if extra < 0:
            raise ValueError(f"{s}: cannot pad width {seq.ts.shape[1]} down to {widths[s]}")

        def pad(t: torch.Tensor, extra: int = extra) -> torch.Tensor:
            shape = (t.shape[0], extra, *t.shape[2:])
            return torch.cat([t, torch.zeros(shape, dtype=t.dtype)], dim=1)

        seqs[s] = Seq(pad(seq.ts), pad(seq.action), pad(seq.surface), pad(seq.item), seq.length)
    fields = {k: getattr(batch, k) for k in ("request_ts", "user_dense", "surface", "hour", "cand_request",
                                              "cand_item", "item_dense", "labels")}  # fmt: skip
    return Batch(**fields, **seqs)


def example_batch(config: ModelConfig, seed: int = 0) -> Batch:
    """A well-formed tracing example with sizes EXAMPLE_R / EXAMPLE_N / EXAMPLE_WIDTH."""
    lengths = {}
    for s in SEQUENCES:
        cap = min(getattr(config, f"max_{s}"), EXAMPLE_WIDTH[s])
        lengths[s] = [cap, cap // 2, max(cap - 3, 0)][:EXAMPLE_R]
    batch = random_batch(config, EXAMPLE_R, EXAMPLE_N, seed=seed, **lengths)
    return pad_batch(batch, EXAMPLE_WIDTH)


def full_dynamic_shapes() -> tuple[tuple[dict[int, Dim], ...]]:
    """Symbolic dims of every full-graph input: R, N and one length per sequence."""
    r, n = Dim("R"), Dim("N")
    length = {s: Dim(f"L_{s}") for s in SEQUENCES}
    specs: list[dict[int, Dim]] = []
    for name in INPUT_NAMES:
        seq = name.split("_", 1)[0]
        if seq in SEQUENCES:
            specs.append({0: r} if name.endswith("_length") else {0: r, 1: length[seq]})
        elif name in ("cand_request", "cand_item", "item_dense"):
            specs.append({0: n})
        else:
            specs.append({0: r})
    return (tuple(specs),)


def dense_example(model: RankingModel, batch: Batch) -> tuple[torch.Tensor, ...]:
    v1, v2, _ = model.sequence_features(batch)
    return (batch.user_dense, batch.surface, batch.hour, batch.cand_request, batch.cand_item,
            batch.item_dense, v1, v2)  # fmt: skip


def dense_dynamic_shapes() -> tuple[dict[int, Dim], ...]:
    r, n = Dim("R"), Dim("N")
    return ({0: r}, {0: r}, {0: r}, {0: n}, {0: n}, {0: n}, {0: n}, {0: n})


def _export(module: nn.Module, args: tuple, path: Path, input_names, output_names, dynamic_shapes, opset: int,
            translations: dict | None = None) -> None:  # fmt: skip
    """One dynamo export to a self-contained .onnx file (weights embedded), quietly."""
    quiet = io.StringIO()
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")  # "torchvision is not installed"
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module, args, dynamo=True, input_names=list(input_names), output_names=list(output_names),
                dynamic_shapes=dynamic_shapes, opset_version=opset, optimize=True, verbose=False,
                external_data=False, custom_translation_table=translations,
            )  # fmt: skip
            program.save(os.fspath(path), external_data=False)
    except Exception as e:  # the exporter raises many kinds; report one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportFailed(f"{path.name}: ONNX export failed: {type(e).__name__}: {first}") from e
    finally:
        registry_log.setLevel(level)


@dataclass
class ExportedGraphs:
    full: Path
    dense: Path


def export_graphs(
    model: RankingModel, out_dir: str | os.PathLike, opset: int = DEFAULT_OPSET, fuse_attention: bool = True
) -> ExportedGraphs:
    """Write ``full.onnx`` and ``dense.onnx`` for ``model`` into ``out_dir``.

    ``fuse_attention=False`` keeps PyTorch's own attention decomposition (standard ONNX only, slower)."""
    out = Path(out_dir)
    with export_mode(model):
        batch = example_batch(model.config)
        args = tuple(t for _, t in batch.named_tensors())
        full = out / "full.onnx"
        with fused_attention(model) if fuse_attention else contextlib.nullcontext():
            _export(FullGraph(model), args, full, INPUT_NAMES, full_output_names(model.config),
                    full_dynamic_shapes(), opset, TRANSLATIONS if fuse_attention else MODEL_TRANSLATIONS)  # fmt: skip
        dense = out / "dense.onnx"
        _export(DenseGraph(model), dense_example(model, batch), dense, DENSE_INPUTS, DENSE_OUTPUTS,
                dense_dynamic_shapes(), opset)  # fmt: skip
    return ExportedGraphs(full, dense)


__all__ = [
    "DEFAULT_OPSET", "DENSE_INPUTS", "DENSE_OUTPUTS", "FULL_OUTPUTS", "SELECTION_OUTPUTS", "SEQUENCE_OUTPUTS",
    "DenseGraph", "ExportFailed", "ExportedGraphs", "FullGraph", "encoder_forward", "example_batch", "export_graphs",
    "export_mode", "full_output_names", "fused_attention", "pad_batch",
]  # fmt: skip
