"""Session backends: ``cpu`` (ONNX Runtime on full.onnx) and ``cuda`` (Triton kernels + dense.onnx)."""


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run on this machine; the message says why and what to use instead."""
