"""Hybrid runtime: Triton kernels for the lifelong-sequence hot path, ONNX Runtime for the rest.

``runtime.Session`` scores ``runtime.Request`` objects from a verified bundle (see ``runtime.session``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["Request", "Session", "UserSeq"]


def __getattr__(name: str) -> Any:  # lazy: importing runtime.kernels must not pull in ONNX Runtime
    if name in __all__:
        from . import session

        return getattr(session, name)
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")
