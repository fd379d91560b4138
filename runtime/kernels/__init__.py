"""Triton kernels, each beside its PyTorch reference.

- ``nn_select``: fused int8 nearest-neighbour selection (dequant, normalise, score, top-k).
- ``nn_scan_wgmma``: its scan of several users per step on Hopper's integer warp-group MMA, in Gluon; ``nn_select``
  picks it.
- ``skut``: a whole ``nn.TransformerEncoder`` stack in one launch.
- ``skut_wgmma``: the same for TransAct V2's shape on Hopper, in Gluon (warp-group MMA); ``skut`` picks it.
- ``tokens``: the V2 and V1 transformer inputs (ordering, gathers, embeddings) in one launch each.
- ``dense``: the ranking model's dense part (gathers + LayerNorm, cross layers, MLP, heads), fused.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

# Triton 3.6 on H100 computes wrong results (and sometimes faults) for these kernels when their
# 64-row tiles are lowered to Hopper's asynchronous warp-group MMA (wgmma, "MMA v3"): seen on the
# transformer kernel with several heads or the pooling epilogue, while the same tiles are exact with
# fp32 (no tensor cores) and with 16/32-row tiles (mma.sync). The matrices here have K <= 256, so the
# synchronous mma.sync path costs little; it is forced while *our* kernels compile (the variable is
# part of Triton's cache key, so cached binaries keep the choice). TRANSACT_KERNELS_WGMMA=1 lifts it.
ALLOW_WGMMA = os.environ.get("TRANSACT_KERNELS_WGMMA", "0") == "1"


def interpreting() -> bool:
    """True under ``TRITON_INTERPRET=1``: the kernels then run on CPU tensors (how CI checks them)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 4 elsewhere (the interpreter: small grids)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


@contextlib.contextmanager
def mma_sync_only() -> Iterator[None]:
    """Compile (and launch) Triton kernels inside with DISABLE_MMA_V3=1, restoring it afterwards.

    Not thread-safe with respect to other threads compiling Triton kernels at the same moment.
    """
    if ALLOW_WGMMA:
        yield
        return
    old = os.environ.get("DISABLE_MMA_V3")
    os.environ["DISABLE_MMA_V3"] = "1"
    try:
        yield
    finally:
        if old is None:
            del os.environ["DISABLE_MMA_V3"]
        else:
            os.environ["DISABLE_MMA_V3"] = old


@contextlib.contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:
    """fp32 matrix products on TF32 tensor cores inside the block (recorded as such by a graph capture),
    the process-wide setting restored afterwards. Other threads' products in the meantime see it too."""
    if not enabled:
        yield
        return
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        matmul.fp32_precision = before
