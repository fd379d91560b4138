import pytest
import torch

from transact.quant import dequantize, fit_scale, quantize


@pytest.mark.parametrize("scale", [0.65, 1.0, 3.7])
def test_round_trip_within_half_a_step(scale):
    g = torch.Generator().manual_seed(int(scale * 10))
    e = (torch.rand(4096, 32, generator=g) * 2 - 1) * scale
    back = dequantize(quantize(e, scale), scale)
    step = scale / 127
    assert (back - e).abs().max() <= step / 2 + 1e-6


def test_values_outside_the_scale_clamp_to_127():
    q = quantize(torch.tensor([5.0, -5.0, 0.0]), 1.0)
    assert q.dtype == torch.int8 and q.tolist() == [127, -127, 0]


def test_fit_scale_is_a_high_quantile_and_rejects_bad_input():
    e = torch.linspace(-1, 1, 10001)
    assert abs(fit_scale(e, quantile=1.0) - 1.0) < 1e-6
    assert 0.99 < fit_scale(e) <= 1.0
    with pytest.raises(ValueError):
        fit_scale(torch.tensor([float("nan")]))
    with pytest.raises(ValueError):
        quantize(e, 0.0)
