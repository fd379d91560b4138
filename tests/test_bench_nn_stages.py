"""benchmarks/nn_refine_stages.py still fits the selection kernel: its clock reads go in where it expects,
and the instrumented refine pass builds for sm_90 with a read at the start and the end of each stage."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "nn_refine_stages.py"
# Loaded from its file: benchmarks/ on sys.path would let benchmarks/runtime.py shadow the package.
_spec = importlib.util.spec_from_file_location("nn_refine_stages", SCRIPT)
stages = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(stages)

BUILD = r"""
import importlib.util, re, sys
spec = importlib.util.spec_from_file_location("nn_refine_stages", sys.argv[1])
stages = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stages)
from runtime.kernels.build import build_for_gpu

mod = stages.load_instrumented()
types = {n: "*i32" for n in ("starts_ptr", "lengths_ptr", "user_ptr", "gm_ptr", "gid_ptr", "cnt_ptr", "idx_ptr")}
types |= {"seq_ptr": "*i8", "cand_ptr": "*fp16", "tau_ptr": "*i64", "keys_ptr": "*i64", "score_ptr": "*fp32",
          "stages_ptr": "*i64", "D": "i32", "k": "i32", "G_TOT": "i32", "SPLITS": "i32", "CAP": "i32",
          "margin": "fp32"}
consts = dict(BS=64, C=32, G_P=2048, R=mod.REFINE_ROWS, STEPS=mod.THRESHOLD_STEPS, K=64, CH=64, D_P=32, M_BULK=8,
              TOP2=True)
ptx = build_for_gpu(mod._nn_refine_kernel, types, consts, [n for n in types if n.endswith("_ptr")]).asm["ptx"]
print(len(re.findall(r"mov\.u64\s+%rd\d+,\s*%clock64", ptx)))
"""


def test_the_clock_reads_fit_the_kernel_and_build_for_sm90() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", BUILD, str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, env=env,
                         timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert int(res.stdout.strip().splitlines()[-1]) == len(stages.STAGES) + 1


def test_a_changed_kernel_is_named_not_mismeasured() -> None:
    src = Path(stages.KERNEL_FILE).read_text()
    stages.instrumented_source(src)  # the current kernel: every insertion point found once
    anchor = "    tl.store(cnt_ptr + row, n_keys)\n"
    with pytest.raises(ValueError, match=r"found it 0 times:\n    tl\.store\(cnt_ptr"):
        stages.instrumented_source(src.replace(anchor, "    tl.store(cnt_ptr + row, n_keys + 0)\n"))
    with pytest.raises(ValueError, match="found it 2 times"):
        stages.instrumented_source(src.replace(anchor, anchor * 2))
