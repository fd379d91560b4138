"""The ``cpu`` backend: the whole model in ONNX Runtime (``full.onnx``)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from export.bundle import onnx_providers
from transact.batch import INPUT_NAMES

from ..batching import BatchPlan, plan_batch
from ..session import Limits, LoadedBundle, SessionOptions
from .warmup import warmup_requests


def ort_options(threads: int | None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    if threads:
        so.intra_op_num_threads = int(threads)
    so.log_severity_level = 3
    return so


class CpuBackend:
    """ONNX Runtime on ``full.onnx``, one request row (distinct user) per call."""

    name = "cpu"

    def __init__(self, bundle: LoadedBundle, options: SessionOptions) -> None:
        self.config = bundle.config
        self.session = ort.InferenceSession(
            bundle.graph_bytes("full.onnx"), sess_options=ort_options(options.threads),
            providers=onnx_providers(options.onnx_provider),
        )
        names = [i.name for i in self.session.get_inputs()]
        if tuple(names) != INPUT_NAMES:
            raise ValueError(f"full.onnx: unexpected inputs {names}")

    def run(self, plan: BatchPlan) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities (N, H) and scores (N,) in the plan's candidate order, one request row at a time.

        ``full.onnx`` scores every request row's sequences against every candidate of the batch (R x N x L
        selection work, exactly right for one row), so a batch of R rows would cost R times the work of
        its parts: each row runs on its own, with all the requests that share it."""
        if plan.num_rows <= 1:
            return self._run(plan)
        parts: list[tuple[np.ndarray, np.ndarray]] = [None] * len(plan.requests)  # type: ignore[list-item]
        for row, user in enumerate(plan.users):
            mine = [i for i, r in enumerate(plan.rows) if r == row]
            sub = BatchPlan([plan.requests[i] for i in mine], [user], [0] * len(mine))
            probs, scores = self._run(sub)
            for i, p, s in zip(mine, sub.split(probs), sub.split(scores), strict=True):
                parts[i] = (p, s)
        return np.concatenate([p for p, _ in parts]), np.concatenate([s for _, s in parts])

    def _run(self, plan: BatchPlan) -> tuple[np.ndarray, np.ndarray]:
        probs, scores = self.session.run(["probabilities", "scores"], plan.padded_inputs())
        return probs, scores

    def warmup(self, limits: Limits) -> None:
        """Run a few shapes once so that ONNX Runtime has planned its memory before the first request."""
        for reqs in warmup_requests(self.config, limits, [(1, 1), (1, 16), (2, 64)]):
            self.run(plan_batch(reqs))
