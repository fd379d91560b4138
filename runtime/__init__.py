"""Hybrid runtime: Triton kernels for the lifelong-sequence hot path, ONNX Runtime for the rest."""
