"""The cuda backend with the real Triton kernels, run by Triton's interpreter on the CPU (tiny sizes):
the kernels' launch path with the backend's own arguments, against the eager model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_runtime_session import small_bundle

SCRIPT = r"""
import json, sys
import numpy as np, torch
from runtime.backends.cuda import CudaBackend
from runtime.batching import plan_batch
from runtime.session import Request, SessionOptions, open_bundle
from transact.batch import Batch
from transact.data.random_batch import random_batch
from transact.model import transformer_fastpath

bundle = open_bundle(sys.argv[1])
backend = CudaBackend(bundle, SessionOptions(triton_cache_dir=sys.argv[2], dense_on=sys.argv[3]), device="cpu")
model = bundle.verified.build_model()
b = random_batch(bundle.config, 2, 4, ll=[30, 0], rt=[12, 3], imp=[6, 0], seed=0, future=1)
reqs = [Request.from_batch(b, 0), Request.from_batch(b, 1), Request.from_batch(b, 0)]
plan = plan_batch(reqs)
probs, _ = backend.run(plan)
sel = backend.sequence_outputs(plan)
named = plan.padded_inputs()
with torch.no_grad(), transformer_fastpath(False):
    out = model.forward_with_aux(Batch.from_named({k: torch.from_numpy(v) for k, v in named.items()}))
v = out.v2_selection
print(json.dumps({
    "rows": plan.num_rows,
    "max_abs": float(np.abs(probs - out.probs.numpy()).max()),
    "same_pos": bool((sel["selection_pos"] == torch.where(v.valid, v.pos, -1).numpy()).all()),
    "same_group": bool((sel["selection_group"] == torch.where(v.valid, v.group, -1).numpy()).all()),
}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("dense_on", ["gpu", "cpu"])  # the dense part in torch (default) or dense.onnx in ORT
def test_hybrid_backend_under_the_triton_interpreter(tmp_path, dense_on: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(small_bundle()), str(tmp_path / "cache"), dense_on],
                         capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["rows"] == 2
    assert got["max_abs"] <= 2e-3
    assert got["same_pos"] and got["same_group"]
