"""The TransAct ranking model, top to bottom (DESIGN §2.3–2.5).

* ``TransAct``       — the real-time module (V1); inputs, parameter names and output match the
                       reference module so that its state dicts load with ``strict=True``.
* ``TransActV2``     — the lifelong module: nearest-neighbour selection over ll / rt / imp, token
                       features, a causal transformer and masked max pooling.
* ``RankingModel``   — features ⊕ sequence outputs -> DCN-v2 cross layers -> MLP -> sigmoid heads.

Every op here is chosen so that the model exports to ONNX with dynamic request, candidate and
sequence sizes: no data-dependent Python control flow, no in-place writes into inputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .batch import Batch, Seq
from .config import ITEM_DIM, ModelConfig, TransActConfig, TransActV2Config
from .quant import dequantize
from .selection import normalize_codes, normalize_rows

NEG_INF = float("-inf")
# Tie-break step for the selection key: position * 2**-50 stays below the float32 spacing of any
# score with |s| >= 2**-9, so it only separates exactly equal scores (in favour of the newer action).
TIE_STEP = 2.0**-50


def highest_bit(mask: torch.Tensor) -> torch.Tensor:
    """Index of the highest set bit of an int32 bitmask (-1 for 0), without shifts or logs."""
    m = mask.to(torch.int64) & 0xFFFFFFFF  # bit 31 of a negative int32 becomes an ordinary bit
    pow2 = torch.pow(2, torch.arange(1, 32, device=mask.device, dtype=torch.int64))
    hb = (m.unsqueeze(-1) >= pow2).sum(-1)
    return torch.where(m > 0, hb, torch.full_like(hb, -1))


def bits(mask: torch.Tensor, n: int) -> torch.Tensor:
    """(..., n) float multi-hot vector of the low ``n`` bits of an int32 bitmask."""
    pow2 = torch.pow(2, torch.arange(n, device=mask.device, dtype=torch.int64))
    return (torch.bitwise_and(mask.to(torch.int64).unsqueeze(-1), pow2) != 0).to(torch.float32)


def gather_rows(x: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x (R, L, ...), rows (N,), pos (N, K) -> (N, K, ...); out-of-range positions read a clamped slot
    (callers mask them)."""
    flat = x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])
    index = rows.unsqueeze(1) * x.shape[1] + pos.clamp(0, x.shape[1] - 1)
    return flat[index]


# ---------------------------------------------------------------------------------------------
# TransAct (V1)
# ---------------------------------------------------------------------------------------------


class TransAct(nn.Module):
    """Real-time user action module; same inputs and state dict as the reference module."""

    def __init__(self, config: TransActConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.register_buffer("action_type_lookup", self.convert_vocab_to_idx(config.action_vocab))
        self.action_emb_module = nn.Embedding(len(config.action_vocab), config.action_emb_dim, padding_idx=0)
        layer = nn.TransformerEncoderLayer(
            d_model=d, nhead=config.nhead, dim_feedforward=config.dim_feedforward,
            dropout=config.dropout, batch_first=True,
        )  # fmt: skip
        self.transformer_encoder = nn.TransformerEncoder(layer, config.num_layer, enable_nested_tensor=False)
        if config.concat_max_pool:
            self.out_linear = nn.Linear(d, d)

    @staticmethod
    def convert_vocab_to_idx(vocab: list[int]) -> torch.Tensor:
        """Lookup table: index ``a + 1`` holds the rank of action id ``a``; index 0 (and the
        smallest id, rank 0) map to the padding row."""
        table = torch.zeros(100, dtype=torch.long)
        for rank, action in enumerate(sorted(vocab)):
            table[action + 1] = rank
        return table

    def key_padding_mask(
        self, action_ids: torch.Tensor, action_time: torch.Tensor, request_time: torch.Tensor
    ) -> torch.Tensor:
        """True where attention must ignore the slot: padding, the future and, in training, a random
        recent window (one draw per row). Slot 0 is always kept so no row is fully masked."""
        req = request_time.reshape(-1, 1)
        if self.training and self.config.time_window_ms > 0:
            window = torch.randint(0, self.config.time_window_ms + 1, req.shape, device=req.device)
        else:
            window = torch.zeros_like(req)
        mask = (action_ids <= 0) | ((req - action_time) < window)
        first = torch.arange(mask.shape[1], device=mask.device) == 0
        return mask & ~first

    def forward(
        self,
        action_type_seq: torch.Tensor,
        item_embedding_seq: torch.Tensor,
        action_time_seq: torch.Tensor,
        request_time: torch.Tensor,
        item_embedding: torch.Tensor,
    ) -> torch.Tensor:
        """(B, S) action ids newest first, (B, S, 32) items, (B, S) times, (B,) request time,
        (B, 32) candidate -> (B, d + latest_n * d)."""
        tokens, mask = self.row_tokens(action_type_seq, item_embedding_seq, action_time_seq, request_time)
        if self.config.concat_candidate_emb:
            cand = item_embedding.to(torch.float32).unsqueeze(1).expand(-1, tokens.shape[1], -1)
            tokens = torch.cat([tokens, cand], dim=-1)
        return self.output(self.transformer_encoder(tokens, src_key_padding_mask=mask))

    def forward_rows(
        self, action: torch.Tensor, item: torch.Tensor, action_time: torch.Tensor, request_time: torch.Tensor,
        item_embedding: torch.Tensor, cand_request: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        """``forward`` on request rows (R, S, ...) with candidates (N, 32) mapped to them by ``cand_request``:
        each candidate's sequence is its row's. The export replaces this to compute a row's part of the
        first layer once (``export.onnx_export.transact_forward_rows``)."""
        rows = (action[cand_request], item[cand_request], action_time[cand_request], request_time[cand_request])
        return self(*rows, item_embedding)

    def row_tokens(
        self, action_type_seq: torch.Tensor, item_embedding_seq: torch.Tensor, action_time_seq: torch.Tensor,
        request_time: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """The tokens without the candidate's part, [action embedding ; item] (B, S, 64), and the key-padding
        mask (B, S), True = ignore."""
        s = self.config.seq_len
        ids = self.action_type_lookup[action_type_seq[:, :s] + 1]
        mask = self.key_padding_mask(ids, action_time_seq[:, :s], request_time)
        tokens = torch.cat([self.action_emb_module(ids), item_embedding_seq[:, :s].to(torch.float32)], dim=-1)
        return tokens, mask

    def output(self, out: torch.Tensor) -> torch.Tensor:
        """Encoder output (B, S, d) -> Linear(max-pool) ⊕ the first ``latest_n`` rows, flattened."""
        parts = []
        if self.config.concat_max_pool:
            parts.append(self.out_linear(out.max(dim=1).values))
        if self.config.latest_n_emb > 0:
            out = out[:, : self.config.latest_n_emb]
        parts.append(out.flatten(1))
        return torch.cat(parts, dim=1)


def transact_row_inputs(
    rt: Seq, request_ts: torch.Tensor, seq_len: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference module's inputs (newest first) for each request row: action ids (R, S), items
    (R, S, 32), times (R, S).

    Only actions before the request enter (the reference would keep a future action in slot 0).
    Action id = highest set bit of the mask + 1, so 0 is "no action" (padding)."""
    j = torch.arange(seq_len, device=rt.ts.device)
    pos = rt.valid_count(request_ts).unsqueeze(1) - 1 - j  # (R, S) newest first
    stored = pos >= 0
    rows = torch.arange(rt.ts.shape[0], device=rt.ts.device)
    ts = torch.where(stored, gather_rows(rt.ts, rows, pos), torch.zeros_like(pos))
    action = torch.where(stored, highest_bit(gather_rows(rt.action, rows, pos)) + 1, torch.zeros_like(pos))
    item = dequantize(gather_rows(rt.item, rows, pos), scale) * stored.unsqueeze(-1)
    return action, item, ts


def transact_inputs(
    rt: Seq, request_ts: torch.Tensor, cand_request: torch.Tensor, seq_len: int, scale: float
) -> tuple[torch.Tensor, ...]:
    """``transact_row_inputs`` per candidate (N, S, ...): the reference module's forward inputs."""
    action, item, ts = transact_row_inputs(rt, request_ts, seq_len, scale)
    return action[cand_request], item[cand_request], ts[cand_request]


# ---------------------------------------------------------------------------------------------
# TransAct V2
# ---------------------------------------------------------------------------------------------


def _exported_topk(
    codes: torch.Tensor, valid: torch.Tensor, cand_hat: torch.Tensor, cand_request: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exported graph's scores + top-k from the (R, L, 32) int8 codes: (N, k) scores (-inf when empty) and
    positions.

    Every request against every candidate, then each candidate's own row (R x N x L work, exactly right
    for one request). The flip, the validity mask and the k empty columns TopK needs are applied to the
    (R, L) codes, not to the (N, L) scores, so the graph builds that matrix once (matmul + bias) and
    reads it once (TopK); flipping and padding the int8 codes before they are normalised moves a quarter of
    the bytes, and a zero row normalises to zero. Items run newest first: ONNX TopK breaks ties by the lower
    index, so the more recent action wins, as the float64 key does in eager (same set, float32 bytes only)."""
    r, length, d = codes.shape
    n = cand_hat.shape[0]
    rev = normalize_codes(torch.cat([codes.flip(1), codes.new_zeros(r, k, d)], dim=1))  # (R, L + k, D)
    bias = torch.where(valid.flip(1), 0.0, NEG_INF).to(rev.dtype)
    bias = torch.cat([bias, bias.new_full((r, k), NEG_INF)], dim=1)  # (R, L + k)
    scores = torch.matmul(cand_hat, rev.transpose(1, 2)) + bias.unsqueeze(1)  # (R, N, L + k)
    scores = scores.reshape(r * n, length + k)[cand_request * n + torch.arange(n, device=cand_request.device)]
    top, j = scores.topk(k, dim=1, sorted=False)  # any order: the positions are sorted next
    return top, torch.where(j < length, length - 1 - j, j)


def select_recent_nn(
    seq_item: torch.Tensor, count: torch.Tensor, cand_hat: torch.Tensor, cand_request: torch.Tensor, k: int
) -> torch.Tensor:
    """Vectorised nearest-neighbour selection: (N, k) positions of the chosen tokens (the same set as
    ``selection.nn_select_reference``), in ascending position order (oldest -> newest), -1 padded.

    seq_item (R, L, 32) int8, count (R,) valid prefix per request, cand_hat (N, 32) normalised."""
    r, length = seq_item.shape[0], seq_item.shape[1]
    n = cand_hat.shape[0]
    pos = torch.arange(length, device=seq_item.device)
    valid = pos.unsqueeze(0) < count.unsqueeze(1)  # (R, L)
    if torch.compiler.is_compiling():
        top, idx = _exported_topk(seq_item, valid, cand_hat, cand_request, k)
    else:
        items = normalize_rows(seq_item.to(torch.float32))
        if r == 1:  # the exported graph's product: the same float32 scores
            scores = torch.matmul(cand_hat, items.transpose(1, 2)).reshape(n, length)
        else:
            # Eager with many requests (training): candidates padded per request, one batched matmul,
            # R x C x L work with C the most candidates of any request.
            order = torch.argsort(cand_request, stable=True)
            req_sorted = cand_request[order]
            counts = torch.bincount(cand_request, minlength=r)
            slot = torch.arange(n, device=order.device) - (counts.cumsum(0) - counts)[req_sorted]
            padded = cand_hat.new_zeros(r, int(counts.max()), cand_hat.shape[1])
            padded[req_sorted, slot] = cand_hat[order]
            per_request = torch.bmm(padded, items.transpose(1, 2))  # (R, C, L)
            scores = torch.empty(n, length, dtype=items.dtype, device=items.device)
            scores[order] = per_request[req_sorted, slot]
        masked = torch.where(valid[cand_request], scores, NEG_INF)
        key = masked.to(torch.float64) + pos.to(torch.float64) * TIE_STEP  # -inf stays -inf
        pad = torch.full((n, k), NEG_INF, dtype=torch.float64, device=key.device)  # TopK needs >= k columns
        top, idx = torch.cat([key, pad], dim=1).topk(k, dim=1)
    chosen = top > NEG_INF
    # Oldest -> newest: sort the chosen positions ascending, empty slots last.
    order_key = torch.where(chosen, idx, idx + 2 * (length + k))
    order = order_key.topk(k, dim=1, largest=False).indices
    idx, chosen = idx.gather(1, order), chosen.gather(1, order)
    return torch.where(chosen, idx, torch.full_like(idx, -1))


@dataclass
class Selection:
    """The tokens of each candidate's V2 sequence: which sequence, which position, valid or not."""

    group: torch.Tensor  # (N, T) 0 ll, 1 rt, 2 imp
    pos: torch.Tensor  # (N, T) position in that sequence
    valid: torch.Tensor  # (N, T) bool, valid tokens packed to the front
    num_valid: torch.Tensor  # (N,) total valid tokens (0 for a user with no actions)
    num_recent: torch.Tensor  # (N,) valid tokens of the rt[:r] group (the last ones)


class TransActV2(nn.Module):
    """Lifelong sequence module (DESIGN §2.4)."""

    def __init__(self, config: TransActV2Config, num_actions: int, num_surfaces: int, scale: float) -> None:
        super().__init__()
        self.config, self.num_actions, self.scale = config, num_actions, scale
        d = config.d_model
        self.action_emb = nn.Parameter(torch.randn(num_actions, d) * 0.02)  # summed over set bits
        self.surface_emb = nn.Embedding(num_surfaces, d)
        self.pos_emb = nn.Embedding(config.max_tokens, d)
        self.null_token = nn.Parameter(torch.randn(d) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model=d, nhead=config.nhead, dim_feedforward=config.dim_feedforward,
            dropout=config.dropout, batch_first=True,
        )  # fmt: skip
        self.transformer_encoder = nn.TransformerEncoder(layer, config.num_layer, enable_nested_tensor=False)
        self.out_linear = nn.Linear(d, d)
        self.nal_proj = nn.Linear(d, config.nal_dim)
        for emb in (self.surface_emb, self.pos_emb):
            nn.init.normal_(emb.weight, std=0.02)

    def select(self, batch: Batch, cand_emb: torch.Tensor) -> Selection:
        """Steps 1–2: nearest neighbours per group, each oldest -> newest, packed to the front."""
        cfg = self.config
        cand_hat = normalize_rows(cand_emb.to(torch.float32))
        req, dev = batch.cand_request, cand_emb.device
        ll_n = batch.ll.valid_count(batch.request_ts) * int(cfg.use_ll)
        rt_n = batch.rt.valid_count(batch.request_ts)
        imp_n = batch.imp.valid_count(batch.request_ts)
        rest_n = (rt_n - cfg.r_rt).clamp_min(0)
        ll_pos = select_recent_nn(batch.ll.item, ll_n, cand_hat, req, cfg.k_ll)
        rt_pos = select_recent_nn(batch.rt.item, rest_n, cand_hat, req, cfg.k_rt)
        imp_pos = select_recent_nn(batch.imp.item, imp_n, cand_hat, req, cfg.k_imp)
        recent = (rt_n - cfg.r_rt)[req].unsqueeze(1) + torch.arange(cfg.r_rt, device=dev)
        recent = torch.where(recent >= 0, recent, torch.full_like(recent, -1))
        pos = torch.cat([ll_pos, rt_pos, imp_pos, recent], dim=1)
        group = torch.cat(
            [torch.full_like(ll_pos, 0), torch.full_like(rt_pos, 1), torch.full_like(imp_pos, 2),
             torch.full_like(recent, 1)], dim=1,
        )  # fmt: skip
        valid = pos >= 0
        t = pos.shape[1]
        slot = torch.arange(t, device=dev).unsqueeze(0)
        order = torch.where(valid, slot, slot + t).topk(t, dim=1, largest=False).indices
        pos, group, valid = pos.gather(1, order), group.gather(1, order), valid.gather(1, order)
        num_recent = (recent >= 0).sum(1)
        return Selection(group, pos, valid, valid.sum(1), num_recent)

    def tokens(self, batch: Batch, cand_emb: torch.Tensor, sel: Selection) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 3: token features (N, T, 64) and the key-padding mask (N, T), null token included."""
        req = batch.cand_request
        # One gather per field from the three sequences laid side by side: slot (group g, position p)
        # reads column offset[g] + p. Invalid slots read some token and are zeroed below.
        seqs = (batch.ll, batch.rt, batch.imp)
        l_ll, l_rt = batch.ll.ts.shape[1], batch.rt.ts.shape[1]
        zero = torch.zeros_like(sel.pos)
        offset = torch.where(sel.group == 1, zero + l_ll, torch.where(sel.group == 2, zero + l_ll + l_rt, zero))
        col = offset + sel.pos.clamp_min(0)
        item = gather_rows(torch.cat([s.item for s in seqs], dim=1), req, col).to(torch.float32)
        action = gather_rows(torch.cat([s.action for s in seqs], dim=1), req, col)
        surface = gather_rows(torch.cat([s.surface for s in seqs], dim=1), req, col)
        t = sel.pos.shape[1]
        x = torch.cat(
            [dequantize(item, self.scale), cand_emb.to(torch.float32).unsqueeze(1).expand(-1, t, -1)], dim=-1
        )
        x = x + bits(action, self.num_actions) @ self.action_emb + self.surface_emb(surface)
        x = x * sel.valid.unsqueeze(-1)  # padding slots carry no features (but do get positions)
        x = x + self.pos_emb.weight[:t]
        # A user with no actions at all gets the learned null token in slot 0. Only slot 0 is selected
        # and the rest copied: a broadcast select over all (N, T, D) costs ONNX Runtime's CPU kernel 3x
        # a copy.
        no_actions = sel.num_valid == 0
        x = torch.cat([torch.where(no_actions.unsqueeze(-1), self.null_token, x[:, 0]).unsqueeze(1), x[:, 1:]], dim=1)
        first = torch.arange(t, device=x.device) == 0
        null = no_actions.unsqueeze(1) & first.unsqueeze(0)
        return x, ~(sel.valid | null)

    def encode(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """Step 4: causal transformer with key padding."""
        t = x.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        # is_causal=True states what the mask is (PyTorch would otherwise compare it with a causal mask
        # element by element, a data-dependent check that torch.export cannot trace); the mask is still used.
        return self.transformer_encoder(x, mask=causal, src_key_padding_mask=pad, is_causal=True)

    def pool(self, hidden: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """Step 5: Linear(masked max pool) ⊕ the last ``latest_n`` valid rows."""
        # Padded rows get -inf by adding a (N, T, 1) bias: the same values as masked_fill, and ONNX Runtime
        # runs a broadcast Add about 3.5x faster than the broadcast Where that masked_fill exports to.
        bias = torch.where(pad, NEG_INF, 0.0).to(hidden.dtype).unsqueeze(-1)
        pooled = (hidden + bias).max(dim=1).values
        parts = [self.out_linear(pooled)]
        n = self.config.latest_n
        if n > 0:
            count = (~pad).sum(1, keepdim=True)
            pos = count - n + torch.arange(n, device=hidden.device)
            rows = hidden.gather(1, pos.clamp_min(0).unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
            parts.append((rows * (pos >= 0).unsqueeze(-1)).flatten(1))
        return torch.cat(parts, dim=1)

    def forward(self, batch: Batch, cand_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Selection]:
        sel = self.select(batch, cand_emb)
        x, pad = self.tokens(batch, cand_emb, sel)
        hidden = self.encode(x, pad)
        return self.pool(hidden, pad), hidden, sel


# ---------------------------------------------------------------------------------------------
# The ranking model
# ---------------------------------------------------------------------------------------------


class CrossLayer(nn.Module):
    """DCN-v2 full-rank cross layer: x_{l+1} = x_0 * (W x_l + b) + x_l."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        nn.init.zeros_(self.linear.bias)
        nn.init.normal_(self.linear.weight, std=dim**-0.5 * 0.1)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0 * self.linear(x) + x


@dataclass
class ModelOutput:
    probs: torch.Tensor  # (N, H)
    v2_hidden: torch.Tensor | None = None
    v2_selection: Selection | None = None
    v1: torch.Tensor | None = None  # the sequence-module outputs that dense() read, (N, d1) and (N, d2)
    v2: torch.Tensor | None = None


class RankingModel(nn.Module):
    """Point-wise multi-task wide & deep ranker with TransAct and TransAct V2 features."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.transact = TransAct(c.transact) if c.transact.enabled else None
        self.transact_v2 = (
            TransActV2(c.transact_v2, len(c.action_names), c.num_surfaces, c.quant_scale)
            if c.transact_v2.enabled
            else None
        )
        self.surface_emb = nn.Embedding(c.num_surfaces, c.context_emb_dim)
        self.hour_emb = nn.Embedding(24, c.context_emb_dim)
        dim = c.user_dense_dim + c.item_dense_dim + 2 * c.context_emb_dim + ITEM_DIM
        dim += c.transact.out_dim + c.transact_v2.out_dim
        self.input_norm = nn.LayerNorm(dim)
        self.cross = nn.ModuleList(CrossLayer(dim) for _ in range(c.cross_layers))
        layers: list[nn.Module] = []
        for width in c.mlp_dims:
            layers += [nn.Linear(dim, width), nn.ReLU()]
            dim = width
        self.mlp = nn.Sequential(*layers)
        self.head = nn.Linear(dim, len(c.heads))
        self.register_buffer("score_weights", torch.tensor(c.score_weights, dtype=torch.float32))

    def sequence_features(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, ModelOutput]:
        """The two sequence-module outputs, (N, d1) and (N, d2) (width 0 when switched off)."""
        n, dev = batch.cand_item.shape[0], batch.cand_item.device  # a symbolic size under export
        v1 = torch.zeros(n, 0, device=dev)
        v2 = torch.zeros(n, 0, device=dev)
        aux = ModelOutput(probs=torch.zeros(0))
        if self.transact is not None:
            action, item, ts = transact_row_inputs(
                batch.rt, batch.request_ts, self.config.transact.seq_len, self.config.quant_scale
            )
            v1 = self.transact.forward_rows(action, item, ts, batch.request_ts, batch.cand_item, batch.cand_request)
        if self.transact_v2 is not None:
            v2, aux.v2_hidden, aux.v2_selection = self.transact_v2(batch, batch.cand_item)
        return v1, v2, aux

    def dense(
        self,
        user_dense: torch.Tensor,
        item_dense: torch.Tensor,
        surface: torch.Tensor,
        hour: torch.Tensor,
        cand_request: torch.Tensor,
        cand_item: torch.Tensor,
        v1: torch.Tensor,
        v2: torch.Tensor,
    ) -> torch.Tensor:
        """The CPU-side graph: features and sequence outputs -> head probabilities (N, H)."""
        x = torch.cat(
            [user_dense[cand_request], item_dense, self.surface_emb(surface)[cand_request],
             self.hour_emb(hour)[cand_request], cand_item, v1, v2], dim=1,
        )  # fmt: skip
        x0 = x = self.input_norm(x)
        for layer in self.cross:
            x = layer(x0, x)
        return torch.sigmoid(self.head(self.mlp(x)))

    def forward_with_aux(self, batch: Batch) -> ModelOutput:
        v1, v2, aux = self.sequence_features(batch)
        aux.v1, aux.v2 = v1, v2
        aux.probs = self.dense(
            batch.user_dense, batch.item_dense, batch.surface, batch.hour, batch.cand_request,
            batch.cand_item, v1, v2,
        )  # fmt: skip
        return aux

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.forward_with_aux(batch).probs

    def score(self, probs: torch.Tensor) -> torch.Tensor:
        """Final ranking score Σ_h w_h p_h."""
        return probs @ self.score_weights


@contextmanager
def transformer_fastpath(enabled: bool) -> Iterator[None]:
    """Switch PyTorch's fused transformer inference path on or off for a block, then restore it."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)
