"""The hybrid runtime as a backend of `transact parity` (fp16 kernel tolerance, DESIGN §3)."""

from __future__ import annotations

import os

import numpy as np

from export.parity import BackendOutput
from transact.batch import Batch

from .batching import plan_batch
from .session import Request, Session

HYBRID_ATOL = 2e-3  # fp16 kernel paths: probabilities within 2e-3 abs


def hybrid_backend(session: Session):
    """Batch -> BackendOutput through ``session`` (cuda): probabilities, scores and the V2 selection."""

    def run(batch: Batch) -> BackendOutput:
        requests = [Request.from_batch(batch, r) for r in range(batch.num_requests)]
        plan = plan_batch(requests, dedup=False)
        # The plan orders candidates request by request; the batch may interleave them.
        order = np.argsort(batch.cand_request.numpy(), kind="stable")
        result = session.run(requests, dedup=False, validate=False)
        got_p = np.concatenate([o.probabilities for o in result.outputs])
        got_s = np.concatenate([o.scores for o in result.outputs])
        probs, scores = np.empty_like(got_p), np.empty_like(got_s)
        probs[order], scores[order] = got_p, got_s
        selection = None
        seq = session.backend.sequence_outputs(plan)
        if "selection_pos" in seq:
            got = np.stack([seq["selection_group"], seq["selection_pos"]], axis=-1).astype(np.int64)
            selection = np.empty_like(got)
            selection[order] = got
        return BackendOutput(probs, scores, selection)

    return run


def hybrid_backends(bundle_path: str | os.PathLike) -> dict:
    """``{"hybrid-cuda": (backend, atol)}`` for ``run_parity(extra_backends=...)``."""
    session = Session(bundle_path, device="cuda", warmup=False)
    return {"hybrid-cuda": (hybrid_backend(session), HYBRID_ATOL)}
