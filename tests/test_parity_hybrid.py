"""`transact parity` with the hybrid runtime as a backend: the glue (request split, candidate order,
selection layout, fp16 tolerance) checked on the CPU with the cuda backend's CPU code paths; on a GPU
the same backend runs the Triton kernels (`transact parity BUNDLE --hybrid on`)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from test_runtime_session import small_bundle

from export.bundle import load_bundle
from export.parity import BackendOutput, run_parity
from runtime.backends.cuda import CudaBackend
from runtime.parity_backend import HYBRID_ATOL, hybrid_backend
from runtime.session import Session, SessionOptions


@pytest.fixture(scope="module")
def hybrid_on_cpu(tmp_path_factory) -> Iterator[Session]:
    # The kernels' PyTorch paths, not the (slow) Triton interpreter that the kernel tests switch on: the
    # kernels themselves are checked against their references in test_kernel_*.py.
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TRITON_INTERPRET", raising=False)
        session = Session(small_bundle(), device="cpu", threads=1)
        options = SessionOptions(triton_cache_dir=str(tmp_path_factory.mktemp("triton")))
        session.backend = CudaBackend(session.bundle, options, device="cpu", cpu_reference=True)
        yield session


def test_hybrid_backend_passes_parity(hybrid_on_cpu: Session) -> None:
    bundle = load_bundle(small_bundle())
    report = run_parity(bundle, random_cases=1, seed=3,
                        extra_backends={"hybrid": (hybrid_backend(hybrid_on_cpu), HYBRID_ATOL)})  # fmt: skip
    hybrid = [c for c in report.comparisons if c.backend == "hybrid"]
    assert len(hybrid) == 1 and hybrid[0].passed, report.format_table()
    assert hybrid[0].selection_checked and hybrid[0].selection_mismatched == 0
    assert report.passed


def test_a_wrong_hybrid_answer_fails_parity(hybrid_on_cpu: Session) -> None:
    good = hybrid_backend(hybrid_on_cpu)

    def off_by_a_bit(batch) -> BackendOutput:
        out = good(batch)
        return BackendOutput(out.probs + 3 * HYBRID_ATOL, out.scores, out.selection)

    report = run_parity(load_bundle(small_bundle()), random_cases=0, seed=0,
                        extra_backends={"hybrid": (off_by_a_bit, HYBRID_ATOL)})  # fmt: skip
    assert not report.passed
    assert np.isfinite(report.to_dict()["comparisons"][-1]["outputs"]["probabilities"]["max_abs"])
