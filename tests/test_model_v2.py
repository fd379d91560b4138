"""TransAct V2: selection order on a hand-worked example, token features, the causal encoder against
float64 PyTorch layers, fast path on/off, and the ranking model on edge cases."""

from __future__ import annotations

import copy

import pytest
import torch

from transact.batch import Batch, Seq, validate_batch
from transact.config import ModelConfig, TransActV2Config
from transact.data.random_batch import random_batch
from transact.model import RankingModel, TransActV2, bits, transformer_fastpath
from transact.quant import dequantize


def small_config(**v2) -> ModelConfig:
    return ModelConfig(
        max_ll=64, max_rt=16, max_imp=16, mlp_dims=[32, 16],
        transact_v2=TransActV2Config(**{"k_ll": 2, "r_rt": 2, "k_rt": 1, "k_imp": 1, **v2}),
    )  # fmt: skip


def seq_of(rows: list[list[tuple[int, list[int]]]], width: int) -> Seq:
    """rows[r] = [(ts, item vector), ...] oldest first; action = click, surface = 1."""
    r = len(rows)
    ts = torch.zeros(r, width, dtype=torch.int64)
    item = torch.zeros(r, width, 32, dtype=torch.int8)
    for i, row in enumerate(rows):
        for p, (t, v) in enumerate(row):
            ts[i, p] = t
            item[i, p, : len(v)] = torch.tensor(v, dtype=torch.int8)
    action = torch.ones(r, width, dtype=torch.int32)
    surface = torch.ones(r, width, dtype=torch.int64)
    return Seq(ts, action, surface, item, torch.tensor([len(x) for x in rows]))


A, B, C = [100, 0, 0], [0, 100, 0], [0, 0, 100]


def hand_batch(config: ModelConfig) -> Batch:
    ll = seq_of([[(100, A), (200, B), (300, C), (400, A)], []], 4)
    rt = seq_of([[(500, C), (600, A), (700, B), (800, B), (900, C), (1100, A)], []], 6)
    imp = seq_of([[(950, B), (2000, A)], []], 2)
    cand = torch.zeros(3, 32)
    cand[0, 0] = cand[2, 0] = 0.5  # candidates 0 and 2 look like A
    cand[1, 1] = 0.5  # candidate 1 (of the empty user) looks like B
    return Batch(
        request_ts=torch.tensor([1000, 1000]), user_dense=torch.randn(2, config.user_dense_dim),
        surface=torch.tensor([0, 1]), hour=torch.tensor([3, 4]), ll=ll, rt=rt, imp=imp,
        cand_request=torch.tensor([0, 1, 0]), cand_item=cand, item_dense=torch.randn(3, config.item_dense_dim),
    )  # fmt: skip


def test_selection_order_hand_worked():
    cfg = small_config()
    batch = hand_batch(cfg)
    validate_batch(batch, cfg)
    v2 = TransActV2(cfg.transact_v2, 3, cfg.num_surfaces, cfg.quant_scale)
    sel = v2.select(batch, batch.cand_item)
    # NN(ll) k=2: A at 0 and 3 (a tie, both kept), oldest first; NN(rt[r:]) k=1 among rt positions
    # 0..2: A at 1; NN(imp) k=1: B at 0 (the A at 2000 is in the future); rt[:r]: positions 3, 4.
    assert sel.group[0].tolist() == [0, 0, 1, 2, 1, 1]
    assert sel.pos[0].tolist() == [0, 3, 1, 0, 3, 4]
    assert sel.valid[0].all() and int(sel.num_valid[0]) == 6 and int(sel.num_recent[0]) == 2
    assert int(sel.num_valid[1]) == 0 and not sel.valid[1].any()  # the user with no actions


def test_token_features_and_null_token():
    cfg = small_config()
    batch = hand_batch(cfg)
    v2 = TransActV2(cfg.transact_v2, 3, cfg.num_surfaces, cfg.quant_scale)
    sel = v2.select(batch, batch.cand_item)
    x, pad = v2.tokens(batch, batch.cand_item, sel)
    # Slot 1 of candidate 0: ll position 3 (item A, action click = bit 0, surface 1), position 1.
    item = dequantize(torch.tensor(A + [0] * 29, dtype=torch.int8), cfg.quant_scale)
    want = torch.cat([item, batch.cand_item[0]]) + v2.action_emb[0] + v2.surface_emb.weight[1] + v2.pos_emb.weight[1]
    assert torch.allclose(x[0, 1], want, atol=1e-6)
    assert torch.equal(x[1, 0], v2.null_token.detach()) and not pad[1, 0] and pad[1, 1:].all()
    assert not pad[0].any()


def test_bits_multi_hot():
    got = bits(torch.tensor([0, 1, 6, -(2**31)], dtype=torch.int32), 32)
    assert got[0].sum() == 0 and got[1, 0] == 1 and got[2, 1] == got[2, 2] == 1 and got[2].sum() == 2
    assert got[3, 31] == 1 and got[3].sum() == 1


def float64_encode(v2: TransActV2, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    enc = copy.deepcopy(v2.transformer_encoder).double().eval()
    t = x.shape[1]
    causal = torch.zeros(t, t, dtype=torch.float64).masked_fill(torch.ones(t, t).triu(1).bool(), float("-inf"))
    key = torch.zeros(pad.shape, dtype=torch.float64).masked_fill(pad, float("-inf"))
    y = x.double()
    for layer in enc.layers:
        y = layer(y, src_mask=causal, src_key_padding_mask=key)
    return y


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_encoder_matches_float64_layers_and_fast_path(seed):
    torch.manual_seed(seed)
    cfg = ModelConfig(max_ll=400, mlp_dims=[32])
    batch = random_batch(cfg, 3, 9, ll=[300, 0, 40], rt=[50, 0, 3], imp=[40, 0, 1], seed=seed, future=1)
    v2 = TransActV2(cfg.transact_v2, 3, cfg.num_surfaces, cfg.quant_scale).eval()
    with torch.no_grad():
        sel = v2.select(batch, batch.cand_item)
        x, pad = v2.tokens(batch, batch.cand_item, sel)
        with transformer_fastpath(False):
            slow = v2.encode(x, pad)
        with transformer_fastpath(True):
            fast = v2.encode(x, pad)
        want = float64_encode(v2, x, pad)
    keep = ~pad
    rel = (slow[keep].double() - want[keep]).norm() / want[keep].norm()
    assert rel < 1e-5, rel
    assert torch.allclose(fast[keep], slow[keep], atol=1e-5)


@pytest.mark.parametrize(
    "ll,rt,imp,future",
    [([0], [0], [0], 0), ([1], [1], [1], 0), ([5], [3], [2], 5), ([300, 0], [1, 100], [0, 3], 0)],
)
def test_ranking_model_is_finite_on_edge_cases(ll, rt, imp, future):
    cfg = ModelConfig(max_ll=400, mlp_dims=[32])
    torch.manual_seed(0)
    model = RankingModel(cfg).eval()
    batch = random_batch(cfg, len(ll), 4, ll=ll, rt=rt, imp=imp, future=future)
    validate_batch(batch, cfg)
    with torch.no_grad():
        for fast in (True, False):
            with transformer_fastpath(fast):
                probs = model(batch)
            assert probs.shape == (4, 3) and torch.isfinite(probs).all()
            assert ((probs > 0) & (probs < 1)).all()


def test_all_future_actions_count_as_none():
    cfg = ModelConfig(max_ll=400, mlp_dims=[32])
    torch.manual_seed(0)
    model = RankingModel(cfg).eval()
    future = random_batch(cfg, 1, 3, ll=5, rt=5, imp=5, future=5)
    empty = random_batch(cfg, 1, 3, ll=[0], rt=[0], imp=[0])
    for name in ("request_ts", "user_dense", "surface", "hour", "cand_item", "item_dense"):
        setattr(empty, name, getattr(future, name))
    with torch.no_grad():
        assert torch.allclose(model(future), model(empty), atol=1e-6)


def test_sequence_modules_can_be_switched_off():
    cfg = small_config()
    cfg.transact.enabled = False
    cfg.transact_v2.enabled = False
    model = RankingModel(cfg).eval()
    assert model.transact is None and model.transact_v2 is None
    batch = hand_batch(cfg)
    assert model(batch).shape == (3, 3)
