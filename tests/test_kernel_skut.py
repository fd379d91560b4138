"""The single-launch transformer kernel against the real nn.TransformerEncoder (float64), under
TRITON_INTERPRET=1 on the CPU.

Covers sequence lengths that are not multiples of 16 (1, 5, 17, 33, 45, 70), d_model 32-128 with
padding (40, 48, 96), 1-4 heads (head dim 8 padded to 16), FFN 16-256, 1-3 layers, causal and
key-padding masks, fully masked rows (zeros, never NaN), both pooling epilogues, a final norm,
batch_first=False encoders, fp16 / bf16 / fp32, every tile configuration, and the argument checks.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import runtime.kernels.skut as sk

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# (relative norm error, max abs error) against the float64 reference; outputs are O(1) after LayerNorm.
TOL = {torch.float32: (1e-4, 1e-3), torch.float16: (5e-3, 2e-2), torch.bfloat16: (3e-2, 1.5e-1)}


make_encoder = sk.random_encoder


def make_mask(bsz, s, causal, seed=1, dead=False):
    """25% random key padding; position 0 kept valid (as the models do), unless ``dead``, which
    also pads the first 3 positions of sequence 0 and every position of the last sequence."""
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(bsz, s, generator=g) < 0.25
    m[:, 0] = False
    if dead:
        m[0, : min(3, s)] = True
        m[-1, :] = True
    return m


def check(out, ref, dtype):
    out = out.double().cpu()
    assert not torch.isnan(out).any(), "NaN (or unwritten poisoned) output"
    rel_tol, abs_tol = TOL[dtype]
    err = (out - ref).norm() / ref.norm().clamp_min(1e-12)
    assert err.item() <= rel_tol, f"relative error {err.item():.3e} > {rel_tol}"
    assert (out - ref).abs().max().item() <= abs_tol


def run_kernel(enc, x, mask, causal, pool, dtype, config=None):
    packed = sk.pack_encoder_weights(enc, dtype, device=DEV)
    bsz, s, d = x.shape
    shape = (bsz, s, d) if pool is None else (bsz, d)
    out = torch.full(shape, float("nan"), dtype=dtype, device=DEV)  # poison
    res = sk.skut_forward(
        x.to(DEV, dtype), packed, None if mask is None else mask.to(DEV), causal, pool, config=config, out=out
    )
    assert res.data_ptr() == out.data_ptr()
    return res


GRID = [
    # S, d, heads, ffn, layers, causal, mask, pool, dtype
    (1, 32, 4, 16, 2, True, True, None, torch.float32),  # head dim 8 -> padded to 16
    (5, 64, 1, 32, 2, True, True, None, torch.float16),  # the V2 shape
    (17, 96, 2, 32, 2, False, True, "max_all", torch.float16),  # the V1 shape (d padded to 128)
    (33, 64, 1, 32, 2, True, True, "max_valid", torch.float16),
    (33, 48, 3, 24, 1, False, False, None, torch.float32),
    (17, 128, 4, 256, 1, True, False, None, torch.float16),
    (70, 32, 2, 64, 3, True, True, None, torch.float32),  # several query tiles
    (45, 40, 2, 20, 2, False, True, "max_valid", torch.float32),
    pytest.param(
        9,
        64,
        2,
        16,
        2,
        True,
        True,
        "max_all",
        torch.bfloat16,
        marks=pytest.mark.skipif(
            DEV == "cpu",
            reason="the Triton 3.9 interpreter mis-computes bf16 tl.dot (relative error ~1e9 on a plain "
            "16x32 @ 32x16); bf16 runs in tests/gpu",
        ),
    ),
]


@pytest.mark.parametrize("s,d,h,f,n_layers,causal,masked,pool,dtype", GRID)
def test_grid_matches_pytorch(s, d, h, f, n_layers, causal, masked, pool, dtype):
    bsz = 3
    enc = make_encoder(d, h, f, n_layers, seed=s + d)
    x = torch.randn(bsz, s, d, generator=torch.Generator().manual_seed(s))
    mask = make_mask(bsz, s, causal, seed=s) if masked else None
    out = run_kernel(enc, x, mask, causal, pool, dtype)
    check(out, sk.skut_reference(enc, x, mask, causal, pool), dtype)


CONFIGS = [
    sk.SkutConfig(16, 16, 4, 16),
    sk.SkutConfig(16, 32, 4, 32),
    sk.SkutConfig(32, 16, 4, 64),
    sk.SkutConfig(32, 32, 8, 64),
    sk.SkutConfig(64, 16, 8, 64),
    sk.SkutConfig(64, 32, 8, 64),
    sk.SkutConfig(64, 64, 4, 32),
    sk.SkutConfig(128, 32, 8, 64),
    sk.SkutConfig(64, 32, 4, 64, max_regs=168),  # V2's tile, with a register cap (ptxas' concern; launches take it)
]


@pytest.mark.parametrize(
    "config", CONFIGS, ids=lambda c: f"m{c.block_m}n{c.block_n}w{c.num_warps}f{c.f_chunk}"
)
def test_every_tile_config(config):
    s, d, h, f = 45, 64, 2, 64
    enc = make_encoder(d, h, f, 2, seed=7)
    x = torch.randn(2, s, d, generator=torch.Generator().manual_seed(3))
    mask = make_mask(2, s, True, seed=4)
    out = run_kernel(enc, x, mask, True, None, torch.float32, config)
    check(out, sk.skut_reference(enc, x, mask, True), torch.float32)


def test_auto_configs_are_in_the_tested_set():
    tested = {(c.block_m, c.block_n, False) for c in CONFIGS} | {(*t, True) for *_, t in SPLIT_GRID}
    for d in (32, 64, 96, 128):
        packed = sk.pack_encoder_weights(make_encoder(d, 2, 32, 1), torch.float16)
        for s in (1, 5, 16, 17, 32, 33, 100, 192, 2048):
            for bsz, causal in ((None, False), (1, True), (1, False), (100_000, True)):
                cfg = sk.choose_config(s, packed, bsz, causal, torch.device("cpu"))
                assert (cfg.block_m, cfg.block_n, cfg.split) in tested


def test_split_launch_is_chosen_for_few_causal_sequences():
    """A causal stack of fewer sequences than the GPU has SMs (4 under the interpreter) takes the split
    launch with 64-row tiles, at sequences of more than one such tile; anything else one program per
    sequence."""
    packed = sk.pack_encoder_weights(make_encoder(64, 1, 32, 2), torch.float16)
    cpu = torch.device("cpu")
    assert sk.choose_config(192, packed, 3, True, cpu) == sk.SkutConfig(64, 32, 4, split=True)
    assert not sk.choose_config(192, packed, 4, True, cpu).split  # as many sequences as SMs
    assert not sk.choose_config(192, packed, 3, False, cpu).split  # not causal
    assert not sk.choose_config(64, packed, 3, True, cpu).split  # one tile per sequence
    assert not sk.choose_config(192, packed).split  # batch unknown
    v1 = sk.pack_encoder_weights(make_encoder(96, 2, 32, 2), torch.float16)
    assert not sk.choose_config(192, v1, 3, True, cpu).split  # d_model > 64: not measured
    # long sequences (one program each) keep three K/V tiles in flight
    assert sk.choose_config(sk.LONG_SEQ, packed, 256, True, cpu) == sk.SkutConfig(64, 64, 4, num_stages=3)
    assert sk.choose_config(sk.LONG_SEQ - 1, packed, 256, True, cpu).num_stages == 2
    assert sk.choose_config(192, packed, 256, True, cpu) == sk.SkutConfig(64, 32, 4)  # the V2 module
    assert sk.choose_config(sk.SHORT_SEQ + 1, packed, 256, True, cpu).block_n == 64


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("pool", [None, "max_valid", "max_all"])
def test_fully_masked_rows_are_zero(causal, pool):
    s, d = 17, 32
    enc = make_encoder(d, 2, 32, 2, seed=5)
    x = torch.randn(3, s, d, generator=torch.Generator().manual_seed(8))
    mask = make_mask(3, s, causal, seed=9, dead=True)
    out = run_kernel(enc, x, mask, causal, pool, torch.float32)
    ref = sk.skut_reference(enc, x, mask, causal, pool)
    check(out, ref, torch.float32)
    out = out.cpu()
    if pool is None:
        assert (out[-1] == 0).all()  # nothing valid at all
        if causal:
            assert (out[0, :3] == 0).all() and (out[0, 3:].abs().sum(-1) > 0).all()
    elif pool == "max_valid":
        assert (out[-1] == 0).all()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(
    "config", [sk.SkutConfig(16, 16, 4, 16), sk.SkutConfig(64, 64, 4, 32), sk.SkutConfig(128, 32, 8, 32)], ids=str
)
def test_heavy_padding_compacts_keys(causal, config):
    """Keys are kept compacted (valid ones only): with 60% padding scattered over many tiles (also the
    runtime's V2 and V1 tiles), one sequence with a single valid key, one whose first 40 keys are padded
    and one with no valid key, the key tiles below a query tile's limit (no mask) and above it (masked)
    give the reference's rows and pools."""
    s, d = 100, 32
    enc = make_encoder(d, 2, 32, 2, seed=21)
    x = torch.randn(4, s, d, generator=torch.Generator().manual_seed(22))
    mask = torch.rand(4, s, generator=torch.Generator().manual_seed(23)) < 0.6
    mask[1, :] = True
    mask[1, 57] = False  # one valid key, in the middle
    mask[2, :40] = True  # a long padded run first
    mask[3, :] = True  # nothing valid
    for pool in (None, "max_valid"):
        out = run_kernel(enc, x, mask, causal, pool, torch.float32, config)
        check(out, sk.skut_reference(enc, x, mask, causal, pool), torch.float32)


SPLIT_GRID = [
    # S, d, heads, ffn, layers, mask, pool, d_out of pool_proj, dtype, (block_m, block_n)
    (45, 64, 2, 64, 2, True, None, None, torch.float32, (16, 16)),  # 3 tiles, the last one partial
    (48, 64, 1, 32, 3, True, None, None, torch.float16, (16, 32)),  # 3 layers: every layer's keys kept
    (70, 32, 2, 32, 2, True, "max_valid", None, torch.float32, (32, 16)),
    (33, 64, 1, 32, 2, True, "max_valid", 24, torch.float16, (16, 16)),  # V2's pool and out_linear
    (23, 32, 2, 16, 2, False, "max_all", None, torch.float32, (16, 16)),  # no mask at all
    (1, 32, 1, 16, 2, True, "max_all", 8, torch.float32, (16, 16)),  # one token
    (1100, 32, 1, 16, 2, True, "max_valid", None, torch.float32, (64, 64)),  # padding counted over chunks
    (150, 64, 1, 32, 2, True, "max_valid", 64, torch.float16, (64, 32)),  # what choose_config picks for V2
]


@pytest.mark.parametrize("s,d,h,f,n_layers,masked,pool,d_out,dtype,tile", SPLIT_GRID, ids=str)
def test_split_launch_matches_pytorch(s, d, h, f, n_layers, masked, pool, d_out, dtype, tile):
    """One program per (sequence, query tile), each waiting for the earlier tiles' keys of every layer:
    the float64 reference's rows, pools and projected pools, with fully masked sequences and rows (the
    last sequence has no valid key, the first none in its first positions), so tiles whose rows see
    nothing and sequences that pool nothing both occur."""
    bsz = 3
    enc = make_encoder(d, h, f, n_layers, seed=s + d)
    x = torch.randn(bsz, s, d, generator=torch.Generator().manual_seed(s))
    mask = make_mask(bsz, s, True, seed=s, dead=True) if masked else None
    config = sk.SkutConfig(*tile, 4, 32, split=True)
    packed = sk.pack_encoder_weights(enc, dtype, device=DEV)
    ref = sk.skut_reference(enc, x, mask, True, pool)
    proj = None
    if d_out is not None:
        lin = torch.nn.Linear(d, d_out)
        proj = (lin.weight.detach().to(DEV), lin.bias.detach().to(DEV))
        ref = torch.nn.functional.linear(ref, lin.weight.double(), lin.bias.double())
    shape = (bsz, s, d) if pool is None else (bsz, d_out or d)
    out = torch.full(shape, float("nan"), dtype=torch.float32 if proj else dtype, device=DEV)  # poison
    hidden = torch.full((bsz, s, d), float("nan"), dtype=dtype, device=DEV) if pool else None
    got = sk.skut_forward(x.to(DEV, dtype), packed, None if mask is None else mask.to(DEV), True, pool,
                          config=config, out=out, hidden=hidden, pool_proj=proj)  # fmt: skip
    assert got.data_ptr() == out.data_ptr()
    check(got, ref, dtype)
    if hidden is not None:
        check(hidden, sk.skut_reference(enc, x, mask, True), dtype)


def test_split_and_grouped_launches_need_causal_and_the_split_its_workspace():
    enc = make_encoder(32, 1, 16, 3)
    packed = sk.pack_encoder_weights(enc, torch.float32, device=DEV)
    x = torch.randn(2, 20, 32, device=DEV)
    split = sk.SkutConfig(16, 16, 4, split=True)
    with pytest.raises(ValueError, match="split needs causal"):
        sk.skut_forward(x, packed, causal=False, config=split)
    with pytest.raises(ValueError, match="warp_groups needs causal"):
        sk.skut_forward(x, packed, causal=False, config=sk.SkutConfig(16, 16, 4, wgmma=True, warp_groups=True))
    for not_grouped in (sk.SkutConfig(16, 16, 4, warp_groups=True),
                        sk.SkutConfig(16, 16, 4, split=True, wgmma=True, warp_groups=True)):  # fmt: skip
        with pytest.raises(ValueError, match="warp_groups is a launch of the wgmma kernels"):
            sk.skut_forward(x, packed, causal=True, config=not_grouped)
    # every layer's K/V (3 buffers) instead of two alternating ones plus an int32 per row (the rows' key
    # slots: one fp32 element each); without a config, enough for either
    kv_buf = 2 * 2 * 20 * 32  # sequences x (K, V) x rows x head dim
    per_seq = sk.workspace_numel(2, 20, packed, sk.SkutConfig(16, 16, 4))
    assert per_seq == 2 * kv_buf + 2 * 20
    assert sk.workspace_numel(2, 20, packed, split) == 3 * kv_buf == sk.workspace_numel(2, 20, packed)
    half = sk.pack_encoder_weights(enc, torch.float16)
    assert sk.workspace_numel(2, 20, half, sk.SkutConfig(16, 16, 4)) == per_seq + 40  # two fp16 per row
    ws = torch.empty(sk.workspace_numel(2, 20, packed), dtype=torch.float32, device=DEV)
    check(sk.skut_forward(x, packed, causal=True, config=split, workspace=ws),
          sk.skut_reference(enc, x.cpu(), None, True), torch.float32)  # fmt: skip
    with pytest.raises(ValueError, match="workspace"):
        sk.skut_forward(x, packed, causal=True, config=split, workspace=ws[:per_seq])


def test_grouped_launch_takes_two_or_three_query_tiles():
    """One warp group per 64-row query tile, two or three of them: 65-192 tokens."""
    fits = {s: sk.skut_wgmma.groups_fit(s) for s in (1, 64, 65, 100, 128, 129, 192, 193, 256)}
    assert fits == {1: False, 64: False, 65: True, 100: True, 128: True, 129: True, 192: True, 193: False,
                    256: False}


def test_wgmma_workspaces():
    """The Gluon launches' scratch: none per sequence (K / V stay in shared memory); per query tile, every
    layer's K and V in whole 64-row tiles; without a config, enough for whichever the call picks, but only for
    a stack those kernels take (V2's shape in 16-bit)."""
    v2 = sk.pack_encoder_weights(make_encoder(64, 1, 32, 2), torch.float16)
    assert sk.workspace_numel(3, 130, v2, sk.SkutConfig(64, 64, 4, wgmma=True)) == 0
    assert sk.workspace_numel(3, 130, v2, sk.SkutConfig(64, 64, 4, wgmma=True, warp_groups=True)) == 0
    tiles = 3 * 2 * 2 * 3 * 64 * 64  # sequences x layers x (K, V) x 3 tiles of 64 rows x d_model
    assert sk.workspace_numel(3, 130, v2, sk.SkutConfig(64, 64, 4, wgmma=True, split=True)) == tiles
    def mma_sync_need(packed):  # the larger of the mma.sync launches' needs
        return max(sk.workspace_numel(3, 130, packed, sk.SkutConfig(64, 32, 4, split=split)) for split in (False, True))

    assert mma_sync_need(v2) < tiles == sk.workspace_numel(3, 130, v2)
    fp32 = sk.pack_encoder_weights(make_encoder(64, 1, 32, 2), torch.float32)  # not a shape the Gluon kernels take
    assert sk.workspace_numel(3, 130, fp32) == mma_sync_need(fp32) < tiles


def test_final_norm_and_sequence_first_encoder():
    enc = make_encoder(64, 2, 48, 2, seed=11, batch_first=False, final_norm=True)
    x = torch.randn(2, 21, 64, generator=torch.Generator().manual_seed(12))
    mask = make_mask(2, 21, True, seed=13)
    out = run_kernel(enc, x, mask, True, None, torch.float16)
    check(out, sk.skut_reference(enc, x, mask, True), torch.float16)


@pytest.mark.parametrize("n_layers,pool", [(2, "max_all"), (1, "max_valid")])
def test_pool_and_hidden_rows_from_one_launch(n_layers, pool):
    """``hidden=`` receives every output row while the pooled rows come back: V1's max pool ⊕ latest rows."""
    enc = make_encoder(96, 2, 32, n_layers, seed=4)
    x = torch.randn(3, 21, 96, generator=torch.Generator().manual_seed(4))
    mask = make_mask(3, 21, False, seed=4)
    packed = sk.pack_encoder_weights(enc, torch.float16, device=DEV)
    hidden = torch.full((3, 21, 96), float("nan"), dtype=torch.float16, device=DEV)  # poison
    pooled = sk.skut_forward(x.to(DEV, torch.float16), packed, mask.to(DEV), False, pool, hidden=hidden)
    check(hidden, sk.skut_reference(enc, x, mask, False), torch.float16)
    check(pooled, sk.skut_reference(enc, x, mask, False, pool), torch.float16)
    with pytest.raises(ValueError, match="hidden needs a pool mode"):
        sk.skut_forward(x.to(DEV, torch.float16), packed, mask.to(DEV), False, None, hidden=hidden)


@pytest.mark.parametrize(
    "d,h,n_layers,pool,causal,d_out",
    [(96, 2, 2, "max_all", False, 96), (64, 1, 2, "max_valid", True, 64), (32, 2, 1, "max_valid", True, 24)],
)  # fmt: skip
def test_pool_projection_in_the_launch(d, h, n_layers, pool, causal, d_out):
    """``pool_proj`` returns Linear(pool) in fp32 (V1's and V2's ``out_linear``), against the float64
    reference's pool through the same Linear; fully masked sequences pool to 0, so they give the bias."""
    enc = make_encoder(d, h, 32, n_layers, seed=d)
    g = torch.Generator().manual_seed(d)
    x = torch.randn(4, 23, d, generator=g)
    mask = make_mask(4, 23, causal, seed=d, dead=True)
    lin = torch.nn.Linear(d, d_out)
    wt, b = lin.weight.detach().to(DEV), lin.bias.detach().to(DEV)
    packed = sk.pack_encoder_weights(enc, torch.float16, device=DEV)
    out = torch.full((4, d_out), float("nan"), device=DEV)  # poison
    hidden = torch.empty(4, 23, d, dtype=torch.float16, device=DEV)
    got = sk.skut_forward(x.to(DEV, torch.float16), packed, mask.to(DEV), causal, pool, out=out, hidden=hidden,
                          pool_proj=(wt, b))  # fmt: skip
    assert got.data_ptr() == out.data_ptr() and got.dtype == torch.float32
    ref = torch.nn.functional.linear(sk.skut_reference(enc, x, mask, causal, pool), lin.weight.double(),
                                     lin.bias.double())  # fmt: skip
    check(got, ref, torch.float16)
    torch.testing.assert_close(got[-1].cpu().double(), lin.bias.double(), rtol=0, atol=1e-6)  # all padded
    check(hidden, sk.skut_reference(enc, x, mask, causal), torch.float16)
    # the torch path (CPU without the interpreter) computes the same
    packed32 = sk.pack_encoder_weights(enc, torch.float32)
    rows = sk.skut_torch(x, packed32, mask, causal, None)
    check(torch.nn.functional.linear(sk._pool(rows, mask, pool), lin.weight, lin.bias), ref, torch.float32)


def test_pool_projection_argument_checks():
    enc = make_encoder(32, 2, 16, 1)
    packed = sk.pack_encoder_weights(enc, torch.float16, device=DEV)
    x = torch.randn(2, 5, 32, device=DEV).half()
    wt, b = torch.randn(8, 32, device=DEV), torch.randn(8, device=DEV)
    with pytest.raises(ValueError, match="needs a pool mode"):
        sk.skut_forward(x, packed, pool_proj=(wt, b))
    with pytest.raises(ValueError, match=r"pool_proj must be \(weight \(d_out, 32\)"):
        sk.skut_forward(x, packed, pool="max_all", pool_proj=(wt[:, :16], b))
    with pytest.raises(ValueError, match="contiguous fp32"):
        sk.skut_forward(x, packed, pool="max_all", pool_proj=(wt.half(), b))
    with pytest.raises(ValueError, match=r"out must be a contiguous \(2, 8\) torch.float32"):
        sk.skut_forward(x, packed, pool="max_all", pool_proj=(wt, b), out=torch.empty(2, 8, device=DEV).half())
    empty = sk.skut_forward(x[:, :0], packed, pool="max_all", pool_proj=(wt, b))  # the pool of nothing is 0
    torch.testing.assert_close(empty, b.expand(2, 8))


def test_torch_path_matches_reference():
    """The pure PyTorch path (used on CPU without the interpreter) computes the same function."""
    enc = make_encoder(96, 2, 32, 2, seed=2)
    x = torch.randn(4, 19, 96, generator=torch.Generator().manual_seed(2))
    mask = make_mask(4, 19, True, seed=2, dead=True)
    packed = sk.pack_encoder_weights(enc, torch.float32)
    for pool in (None, "max_valid", "max_all"):
        check(
            sk.skut_torch(x, packed, mask, True, pool),
            sk.skut_reference(enc, x, mask, True, pool),
            torch.float32,
        )


@pytest.mark.parametrize("causal", [True, False])
def test_large_key_and_value_biases(causal):
    """The packing leaves K's bias out (it shifts every score of a query row alike) and folds V's into
    the out projection's bias (a row's attention weights sum to 1): exact up to rounding, checked here
    with biases far larger than the weights' scale (wrong folding is off by O(1)), several heads, and
    fully masked rows (the one place the two forms differ: their output must still be zeros)."""
    enc = make_encoder(32, 2, 16, 2, seed=11)
    with torch.no_grad():
        for layer in enc.layers:
            layer.self_attn.in_proj_bias[32:].normal_(0.0, 2.0, generator=torch.Generator().manual_seed(3))
    x = torch.randn(3, 21, 32, generator=torch.Generator().manual_seed(4))
    mask = make_mask(3, 21, causal, seed=5, dead=True)
    packed = sk.pack_encoder_weights(enc, torch.float32)
    for pool in (None, "max_valid"):
        ref = sk.skut_reference(enc, x, mask, causal, pool)
        check(run_kernel(enc, x, mask, causal, pool, torch.float32), ref, torch.float32)
        check(sk.skut_torch(x, packed, mask, causal, pool), ref, torch.float32)


def test_reference_is_pytorch_where_nothing_is_fully_masked():
    enc = make_encoder(32, 2, 16, 2, seed=6)
    x = torch.randn(2, 9, 32)
    mask = make_mask(2, 9, False)
    ref = sk.skut_reference(enc, x, mask, False, dtype=torch.float32)
    with torch.no_grad():
        plain = enc(x, src_key_padding_mask=mask)
    torch.testing.assert_close(ref, plain, rtol=1e-5, atol=1e-5)


def test_empty_inputs_and_workspace():
    enc = make_encoder(32, 1, 16, 2)
    packed = sk.pack_encoder_weights(enc, torch.float32, device=DEV)
    assert sk.skut_forward(torch.randn(0, 5, 32, device=DEV), packed).shape == (0, 5, 32)
    pooled = sk.skut_forward(torch.randn(2, 0, 32, device=DEV), packed, pool="max_all")
    assert pooled.shape == (2, 32) and (pooled == 0).all()
    x = torch.randn(2, 7, 32, device=DEV)
    ws = torch.empty(sk.workspace_numel(2, 7, packed), dtype=torch.float32, device=DEV)
    check(sk.skut_forward(x, packed, workspace=ws), sk.skut_reference(enc, x.cpu()), torch.float32)
    with pytest.raises(ValueError, match="workspace"):
        sk.skut_forward(x, packed, workspace=ws[:10])


def test_argument_checks():
    enc = make_encoder(32, 2, 16, 1)
    packed = sk.pack_encoder_weights(enc, torch.float16)
    x = torch.randn(2, 5, 32).half()
    with pytest.raises(ValueError, match="x has dtype"):
        sk.skut_forward(x.float(), packed)
    with pytest.raises(ValueError, match="d_model"):
        sk.skut_forward(torch.randn(2, 5, 16).half(), packed)
    with pytest.raises(ValueError, match="x must be"):
        sk.skut_forward(torch.randn(5, 32).half(), packed)
    with pytest.raises(ValueError, match="key_padding_mask must be a bool"):
        sk.skut_forward(x, packed, key_padding_mask=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        sk.skut_forward(x, packed, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="pool"):
        sk.skut_forward(x, packed, pool="mean")
    with pytest.raises(ValueError, match="packed"):
        sk.skut_forward(x, enc)
    with pytest.raises(ValueError, match="max_regs"):
        sk.skut_forward(x, packed, config=sk.SkutConfig(16, 16, 4, max_regs=16))
    with pytest.raises(ValueError, match="norm_first"):
        sk.pack_encoder_weights(
            nn.TransformerEncoder(
                nn.TransformerEncoderLayer(32, 2, 16, norm_first=True), 1, enable_nested_tensor=False
            )
        )
    with pytest.raises(ValueError, match="ReLU"):
        sk.pack_encoder_weights(nn.TransformerEncoderLayer(32, 2, 16, activation="gelu"))
    with pytest.raises(ValueError, match="d_model"):
        sk.pack_encoder_weights(nn.TransformerEncoderLayer(160, 2, 16))
    with pytest.raises(ValueError, match="dtype"):
        sk.pack_encoder_weights(enc, torch.float64)


def test_packing_is_one_buffer():
    enc = make_encoder(96, 2, 32, 2)
    packed = sk.pack_encoder_weights(enc, torch.float16)
    base = packed.buffer.data_ptr()
    end = base + packed.buffer.numel()
    for view in (packed.mats, packed.vecs, packed.rows):
        assert base <= view.data_ptr() and view.data_ptr() + view.numel() * view.element_size() <= end
        assert view.data_ptr() % 16 == 0  # the kernels copy in 16-byte pieces
    moved = packed.to("cpu")
    for name in ("mats", "vecs", "rows"):
        assert torch.equal(getattr(moved, name), getattr(packed, name)), name
