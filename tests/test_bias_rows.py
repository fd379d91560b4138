"""The grouped wgmma launch's bias rows (``PackedEncoder.rows``): each layer's biases of Q, the out projection and
the FFN, split into terms of the compute dtype whose sum is the packed fp32 bias. Packed on the host, so checked
here; the kernel that reads them is checked on the GPU (tests/gpu)."""

from __future__ import annotations

import pytest
import torch

from runtime.kernels import skut as sk
from runtime.kernels import skut_wgmma as sw


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("f,n_layers", [(32, 2), (64, 3), (16, 1)])
def test_bias_rows_sum_to_the_layers_biases(dtype: torch.dtype, f: int, n_layers: int) -> None:
    d = sw.D_MODEL
    enc = sk.random_encoder(d, 1, f, n_layers, seed=f + n_layers)
    with torch.no_grad():  # biases of every magnitude, some far below the dtype's smallest step at 1
        for layer in enc.layers:
            for b in (layer.self_attn.in_proj_bias, layer.self_attn.out_proj.bias, layer.linear1.bias,
                      layer.linear2.bias):  # fmt: skip
                b.copy_(torch.randn_like(b) * torch.logspace(-6, 2, b.numel()))
    packed = sk.pack_encoder_weights(enc, dtype)
    rows = packed.rows
    r = sw.BIAS_ROWS
    assert rows.dtype == dtype and rows.shape == (n_layers, r * (3 * d + f))
    scale = 1.4426950408889634 / d**0.5  # Wq and bq carry log2(e) / sqrt(head_dim)
    for i, layer in enumerate(enc.layers):
        att = layer.self_attn
        want = {  # float64, from the module itself
            "bq": att.in_proj_bias[:d].double() * scale,
            "bo": att.out_proj.bias.double() + att.out_proj.weight.double() @ att.in_proj_bias[2 * d :].double(),
            "b2": layer.linear2.bias.double(),
            "b1": layer.linear1.bias.double(),
        }
        off = 0
        for name, width in (("bq", d), ("bo", d), ("b2", d), ("b1", f)):
            block = rows[i, off : off + r * width].view(r, width).double()
            off += r * width
            assert (block[sw.BIAS_TERMS :] == 0).all(), name  # the k-step's other rows add nothing
            got = block.sum(0)
            # The packed biases are fp32: their rounding is the only error left, bar fp16's smallest step (2^-24)
            # for parts below its range.
            err = (got - want[name]).abs() - 2e-7 * want[name].abs()
            assert err.max().item() <= (2.0**-24 if dtype == torch.float16 else 0.0), (name, err.max().item())
            one_term = (block[0] - want[name]).abs() / want[name].abs().clamp_min(1e-30)
            assert one_term.max().item() > 1e-4  # a single term of the dtype would not do
