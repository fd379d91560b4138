"""Symmetric int8 quantisation of item embeddings (DESIGN §2.2).

``q = clamp(round(e * 127 / s), -127, 127)`` and ``e ≈ q * s / 127`` with one scale ``s`` per model.
"""

from __future__ import annotations

import torch

QMAX = 127


def fit_scale(embeddings: torch.Tensor, quantile: float = 0.999) -> float:
    """Pick a scale from data: a high quantile of |e| so that a few outliers do not waste the range."""
    if embeddings.numel() == 0:
        raise ValueError("cannot fit a quantisation scale on an empty tensor")
    flat = embeddings.detach().abs().flatten().to(torch.float64)
    if not torch.isfinite(flat).all():
        raise ValueError("embeddings contain NaN or infinite values")
    if flat.numel() > 1_000_000:  # quantile() has a size limit; a strided sample is plenty
        flat = flat[:: flat.numel() // 1_000_000 + 1]
    scale = float(torch.quantile(flat, quantile))
    return scale if scale > 0 else 1.0


def quantize(embeddings: torch.Tensor, scale: float) -> torch.Tensor:
    """Float embeddings -> int8 codes in [-127, 127]."""
    if scale <= 0:
        raise ValueError(f"quantisation scale must be positive, got {scale}")
    q = torch.round(embeddings.to(torch.float32) * (QMAX / scale))
    return q.clamp_(-QMAX, QMAX).to(torch.int8)


def dequantize(codes: torch.Tensor, scale: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """int8 codes -> float embeddings."""
    return codes.to(dtype) * (scale / QMAX)
