"""TransAct (V1) against an independent float64 computation built from PyTorch's own layers."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from transact.config import TransActConfig
from transact.model import TransAct, highest_bit, transformer_fastpath


class ReferenceShaped(nn.Module):
    """The reference module's parameter layout, built independently from nn primitives."""

    def __init__(self, vocab: list[int], d_action: int = 32, d_item: int = 32, layers: int = 2) -> None:
        super().__init__()
        table = torch.zeros(100, dtype=torch.long)
        for i, a in enumerate(sorted(vocab)):
            table[a + 1] = i
        self.register_buffer("action_type_lookup", table)
        self.action_emb_module = nn.Embedding(len(vocab), d_action, padding_idx=0)
        d = d_action + 2 * d_item
        layer = nn.TransformerEncoderLayer(d, 2, 32, batch_first=True)
        self.transformer_encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out_linear = nn.Linear(d, d)


def float64_forward(ref: ReferenceShaped, actions, items, times, req, cand, seq_len=100, latest_n=10):
    """The reference algorithm written out step by step in float64 with a float -inf mask."""
    ref = copy.deepcopy(ref).double().eval()
    actions, items, times = actions[:, :seq_len], items[:, :seq_len].double(), times[:, :seq_len]
    ids = ref.action_type_lookup[actions + 1]
    mask = (ids <= 0) | ((req.unsqueeze(-1) - times) < 0)
    mask[:, 0] = False
    float_mask = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(mask, float("-inf"))
    x = torch.cat([ref.action_emb_module(ids), items, cand.double().unsqueeze(1).expand(-1, ids.shape[1], -1)], -1)
    for layer in ref.transformer_encoder.layers:  # the same layers, applied one by one
        x = layer(x, src_key_padding_mask=float_mask)
    pooled = ref.out_linear(x.max(dim=1).values)
    return torch.cat([pooled, x[:, :latest_n].flatten(1)], dim=1)


def make_inputs(b: int, s: int, seed: int, future: int = 0, pad_from: int | None = None):
    g = torch.Generator().manual_seed(seed)
    actions = torch.randint(0, 20, (b, s), generator=g)
    if pad_from is not None:
        actions[:, pad_from:] = -1
    items = torch.randn(b, s, 32, generator=g)
    req = torch.randint(10**9, 2 * 10**9, (b,), generator=g)
    times = req.unsqueeze(1) - torch.randint(1, 10**6, (b, s), generator=g)
    if future:
        times[:, :future] = req.unsqueeze(1) + 5
    cand = torch.randn(b, 32, generator=g)
    return actions, items, times, req, cand


@pytest.mark.parametrize("seed,future,pad_from", [(0, 0, None), (1, 3, 60), (2, 0, 1), (3, 100, None)])
def test_reference_state_dict_loads_strict_and_matches_float64(seed, future, pad_from):
    vocab = list(range(0, 20))
    torch.manual_seed(seed)
    ref = ReferenceShaped(vocab)
    ours = TransAct(TransActConfig(action_vocab=vocab)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    inputs = make_inputs(6, 100, seed, future=future, pad_from=pad_from)
    with torch.no_grad(), transformer_fastpath(False):
        got = ours(*inputs)
    want = float64_forward(ref, *inputs)
    assert got.shape == (6, 96 + 10 * 96)
    assert torch.isfinite(got).all()
    rel = (got.double() - want).norm() / want.norm()
    assert rel < 1e-5, rel


@pytest.mark.parametrize("seed", [0, 1])
def test_fast_path_on_and_off_agree(seed):
    torch.manual_seed(seed)
    m = TransAct(TransActConfig()).eval()
    inputs = make_inputs(5, 100, seed, future=2, pad_from=70)
    with torch.no_grad():
        with transformer_fastpath(True):
            fast = m(*inputs)
        with transformer_fastpath(False):
            slow = m(*inputs)
    assert torch.allclose(fast, slow, atol=1e-5, rtol=1e-5)


def test_training_window_masks_recent_actions_but_keeps_slot_zero():
    m = TransAct(TransActConfig(time_window_ms=1000)).train()
    ids = torch.ones(2, 4, dtype=torch.long)
    req = torch.tensor([10_000, 10_000])
    times = torch.tensor([[9_999, 9_999, 5_000, 1_000], [9_999, 9_999, 9_999, 9_999]])
    torch.manual_seed(0)
    masks = [m.key_padding_mask(ids, times, req) for _ in range(50)]
    assert all(not bool(mk[:, 0].any()) for mk in masks)  # slot 0 never masked
    assert all(not bool(mk[0, 2:].any()) for mk in masks)  # older than the window: never masked
    assert any(bool(mk[0, 1]) for mk in masks)  # 1 ms old: masked whenever the window exceeds 1 ms


def test_highest_bit_matches_python():
    values = [0, 1, 2, 3, 4, 7, 8, 255, 256, 2**30, 2**31 - 1, -(2**31), -1]
    got = highest_bit(torch.tensor(values, dtype=torch.int32)).tolist()
    want = [(v & 0xFFFFFFFF).bit_length() - 1 for v in values]
    assert got == want
