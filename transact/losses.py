"""Training losses (DESIGN §2.6): weighted multi-head BCE and TransAct V2's Next Action Loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .batch import Batch
from .model import ModelOutput, RankingModel, gather_rows
from .quant import dequantize


def weighted_bce(probs: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_h w_h · BCE(p_h, y_h), each head's BCE averaged over candidates."""
    per_head = F.binary_cross_entropy(probs.clamp(1e-7, 1 - 1e-7), labels, reduction="none").mean(0)
    return (per_head * weights).sum()


def next_action_loss(model: RankingModel, batch: Batch, out: ModelOutput) -> torch.Tensor:
    """Sampled-softmax Next Action Loss over the rt[:r] segment of the V2 sequence.

    At each slot t of the most recent ``r`` real-time actions whose action is positive, the projected
    output u(t) must score the item of the next positive action above the negatives: the user's
    impressions (default) or the other rows' targets in the batch. The causal mask keeps u(t) from
    seeing the target."""
    v2 = model.transact_v2
    if v2 is None or out.v2_hidden is None or out.v2_selection is None:
        return torch.zeros((), device=batch.cand_item.device)
    cfg, mcfg = v2.config, model.config
    r, req, dev = cfg.r_rt, batch.cand_request, batch.cand_item.device
    positive_mask = sum(1 << mcfg.action_names.index(a) for a in mcfg.positive_actions)

    # Slot j of the recent segment holds rt position count - r + j (valid when >= 0).
    rt_n = batch.rt.valid_count(batch.request_ts)[req]  # (N,)
    j = torch.arange(r, device=dev)
    pos = rt_n.unsqueeze(1) - r + j  # (N, r)
    valid = pos >= 0
    action = gather_rows(batch.rt.action, req, pos)
    positive = valid & ((action.to(torch.int64) & positive_mask) != 0)
    # Next positive slot after j: a suffix minimum over the positive slot indices.
    slot_if_pos = torch.where(positive, j.expand_as(pos), torch.full_like(pos, r))
    suffix_min = slot_if_pos.flip(1).cummin(1).values.flip(1)
    nxt = torch.cat([suffix_min[:, 1:], torch.full_like(suffix_min[:, :1], r)], dim=1)
    use = positive & (nxt < r)
    if not bool(use.any()):
        return torch.zeros((), device=dev)

    # The recent segment is the last group of the packed sequence: slot j sits at num_valid - r + j.
    sel = out.v2_selection
    packed = (sel.num_valid.unsqueeze(1) - r + j).clamp_min(0)
    hidden = out.v2_hidden.gather(1, packed.unsqueeze(-1).expand(-1, -1, out.v2_hidden.shape[-1]))
    u = v2.nal_proj(hidden[use])  # (M, 32)
    target_pos = pos.gather(1, nxt.clamp_max(r - 1))
    target = dequantize(gather_rows(batch.rt.item, req, target_pos)[use], mcfg.quant_scale)  # (M, 32)
    pos_logit = (u * target).sum(-1, keepdim=True)

    if cfg.nal_negatives == "in_batch":
        neg_logit = u @ target.t()
        neg_logit = neg_logit.masked_fill(torch.eye(len(u), dtype=torch.bool, device=dev), float("-inf"))
    else:
        rows = req.unsqueeze(1).expand(-1, r)[use]  # request of each use
        imp = dequantize(batch.imp.item[rows], mcfg.quant_scale)  # (M, Limp, 32)
        imp_ok = batch.imp.valid(batch.request_ts)[rows]
        neg_logit = torch.einsum("md,mld->ml", u, imp).masked_fill(~imp_ok, float("-inf"))
    logits = torch.cat([pos_logit, neg_logit], dim=1)
    return -torch.log_softmax(logits, dim=1)[:, 0].mean()


def total_loss(model: RankingModel, batch: Batch, out: ModelOutput) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted BCE + nal_weight · NAL; also returns the parts for logging."""
    if batch.labels is None:
        raise ValueError("labels: the training batch has no labels")
    weights = torch.tensor(model.config.loss_weights, device=out.probs.device)
    bce = weighted_bce(out.probs, batch.labels, weights)
    loss = bce
    parts = {"bce": float(bce.detach())}
    if model.transact_v2 is not None and model.config.transact_v2.nal_weight > 0:
        nal = next_action_loss(model, batch, out)
        loss = loss + model.config.transact_v2.nal_weight * nal
        parts["nal"] = float(nal.detach())
    return loss, parts
