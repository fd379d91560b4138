"""The dense-part kernels under TRITON_INTERPRET=1 on the CPU, against the model's own
``RankingModel.dense`` in float64, over model shapes (cross layers, MLP widths, heads, which sequence
modules exist) and batch sizes, with the V1 output read in two blocks as the runtime passes it."""

from __future__ import annotations

import pytest
import torch

import runtime.kernels.dense as dense_mod
from transact.config import ModelConfig, TransActConfig, TransActV2Config
from transact.model import RankingModel

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def small_config(**kw) -> ModelConfig:
    v1 = TransActConfig(seq_len=6, latest_n_emb=kw.pop("latest_n_emb", 2), action_emb_dim=16,
                        enabled=kw.pop("v1", True), concat_max_pool=kw.pop("max_pool", True))  # fmt: skip
    v2 = TransActV2Config(k_ll=4, r_rt=2, k_rt=2, k_imp=2, enabled=kw.pop("v2", True))
    return ModelConfig(max_ll=20, max_rt=8, max_imp=8, transact=v1, transact_v2=v2, **kw)


def case(cfg: ModelConfig, n: int, rows: int, seed: int):
    """A model with non-trivial weights and random inputs; V1's output as the runtime holds it."""
    torch.manual_seed(seed)
    model = RankingModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(("cross", "input_norm")):  # the cross layers start near the identity
                p.add_(0.3 * torch.randn_like(p))
    g = torch.Generator().manual_seed(seed + 1)
    user_dense = torch.randn(rows, cfg.user_dense_dim, generator=g)
    item_dense = torch.randn(n, cfg.item_dense_dim, generator=g)
    surface = torch.randint(0, cfg.num_surfaces, (rows,), generator=g)
    hour = torch.randint(0, 24, (rows,), generator=g)
    req = torch.randint(0, rows, (n,), generator=g, dtype=torch.int32)
    cand = torch.randint(-127, 128, (n, 32), generator=g).float() * 0.01
    parts = []
    t1 = cfg.transact
    if t1.enabled:
        d1, keep = t1.d_model, (t1.latest_n_emb or t1.seq_len)
        if t1.concat_max_pool:
            parts.append(torch.randn(n, d1, generator=g))  # out_linear of the max pool (fp32)
        hidden = torch.randn(n, t1.seq_len, d1, generator=g).half().to(DEV)  # the transformer's rows (fp16)
        parts.append(hidden[:, :keep].reshape(n, keep * d1))  # a strided view, as the runtime passes it
    if cfg.transact_v2.enabled:
        parts.append(torch.randn(n, cfg.transact_v2.out_dim, generator=g))
    return model, (user_dense, item_dense, surface, hour, req, cand), parts


def reference(model, inputs, parts):
    user_dense, item_dense, surface, hour, req, cand = inputs
    parts = [p.cpu() for p in parts]
    m = RankingModel(model.config).double().eval()
    m.load_state_dict(model.state_dict())
    m = m.double()
    v1 = [p.double() for p in parts[:-1]] if model.config.transact_v2.enabled else [p.double() for p in parts]
    v2 = parts[-1].double() if model.config.transact_v2.enabled else torch.zeros(cand.shape[0], 0).double()
    v1 = torch.cat(v1, dim=1) if v1 else torch.zeros(cand.shape[0], 0).double()
    with torch.no_grad():
        return m.dense(user_dense.double(), item_dense.double(), surface, hour, req.long(), cand.double(), v1, v2)


def run_kernel(model, inputs, parts, tf32=False):
    w = dense_mod.pack_dense(model, DEV)
    user_dense, item_dense, surface, hour, req, cand = (t.to(DEV) for t in inputs)
    probs = dense_mod.dense_forward(w, user_dense, item_dense, surface, hour, req, cand,
                                    [p.to(DEV) for p in parts], tf32=tf32)  # fmt: skip
    return probs.cpu().double()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize(
    "cfg_kw, n, rows",
    [
        ({}, 7, 3),  # both modules, 2 cross layers, MLP [256, 128], 3 heads
        ({}, 1, 1),
        ({}, 33, 5),
        ({"cross_layers": 0, "mlp_dims": []}, 9, 2),  # LayerNorm straight into the heads
        ({"cross_layers": 3, "mlp_dims": [40], "heads": ["click"], "score_weights": [1.0],
          "loss_weights": [1.0]}, 17, 4),
        ({"v1": False}, 8, 2),
        ({"v2": False, "max_pool": False}, 8, 3),
        ({"latest_n_emb": 0}, 5, 2),  # every V1 row
    ],
)  # fmt: skip
def test_dense_kernels_match_the_model(cfg_kw, n, rows):
    cfg = small_config(**cfg_kw)
    model, inputs, parts = case(cfg, n, rows, seed=n + rows)
    want = reference(model, inputs, parts)
    got = run_kernel(model, inputs, parts)
    assert got.shape == want.shape == (n, len(cfg.heads))
    # fp32 products against float64; probabilities in (0, 1)
    assert rel_err(got, want) < 1e-5, rel_err(got, want)
    assert (got - want).abs().max().item() < 5e-5


def test_torch_path_matches_the_model():
    cfg = small_config()
    model, inputs, parts = case(cfg, 11, 3, seed=5)
    want = reference(model, inputs, parts)
    w = dense_mod.pack_dense(model, "cpu")
    got = dense_mod.dense_torch(w, *inputs, [p.cpu() for p in parts]).double()
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("tf32", [False, True])
def test_default_model_width(tf32):
    """The runtime's shape: the default model (input row of 1,184 columns), 24 candidates; with TF32
    products (as the runtime runs them; exact fp32 under the interpreter) within DESIGN §3's fp16
    tolerance."""
    cfg = ModelConfig()
    model, inputs, parts = case(cfg, 24, 2, seed=3)
    assert sum(p.shape[1] for p in parts) + 64 == 1184
    want = reference(model, inputs, parts)
    got = run_kernel(model, inputs, parts, tf32=tf32)
    assert rel_err(got, want) < (2e-3 if tf32 and DEV == "cuda" else 1e-5)


def test_bad_inputs_are_refused():
    cfg = small_config()
    model, inputs, parts = case(cfg, 4, 2, seed=1)
    w = dense_mod.pack_dense(model, DEV)
    with pytest.raises(ValueError, match="columns"):
        dense_mod.dense_forward(w, *(t.to(DEV) for t in inputs), [p.to(DEV) for p in parts[:-1]])
    user_dense, item_dense, surface, hour, req, cand = (t.to(DEV) for t in inputs)
    with pytest.raises(ValueError, match="item_dense has 3 rows"):
        dense_mod.dense_forward(w, user_dense, item_dense[:3], surface, hour, req, cand, [p.to(DEV) for p in parts])
    with pytest.raises(ValueError, match=r"seq_parts\[0\] must be a 2-D tensor with contiguous rows"):
        dense_mod.dense_forward(w, user_dense, item_dense, surface, hour, req, cand,
                                [parts[0].to(DEV).t().contiguous().t(), *parts[1:]])  # fmt: skip


@pytest.mark.parametrize(
    "m, n, k, want",
    [(256, 1184, 1184, (64, 32, 64, True)), (256, 256, 1184, (64, 32, 64, True)),
     (256, 128, 256, (16, 16, 64, False)), (256, 3, 128, (16, 16, 64, False)),
     (32, 1184, 1184, (16, 16, 64, False)), (4096, 1184, 256, (64, 64, 64, False)),
     (4096, 128, 256, (32, 32, 64, False)), (1, 3, 128, (16, 16, 64, False))],
)  # fmt: skip
def test_linear_config(m, n, k, want):
    """Worked by hand: wgmma 64 x 32 for long products of at least 64 rows; otherwise halve 64 x 64
    mma.sync tiles, the larger side first, until 264 programs (two per SM of 132) or 16 x 16."""
    assert dense_mod.linear_config(m, n, k, 132) == want


def test_large_batches_take_the_torch_path(monkeypatch):
    """Above FUSED_MAX_ROWS candidates cuBLAS's products are faster: dense_forward runs dense_torch
    (no kernel launch) and still matches the model."""
    cfg = small_config()
    n = dense_mod.FUSED_MAX_ROWS + 1
    model, inputs, parts = case(cfg, n, 3, seed=2)
    want = reference(model, inputs, parts)

    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError("a kernel was launched")

    monkeypatch.setattr(dense_mod, "_dense_input_kernel", NoLaunch())
    monkeypatch.setattr(dense_mod, "_linear_kernel", NoLaunch())
    got = run_kernel(model, inputs, parts)
    assert rel_err(got, want) < 1e-5
