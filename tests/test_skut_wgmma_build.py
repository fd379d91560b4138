"""The Gluon transformer kernels compile for sm_90 with the installed Triton, within the budget their design
assumes (three programs per SM for the two-pass form, two for the one-pass form and the per-tile launch, one for
the grouped launch). Gluon has no interpreter, so this is the CPU's only check of them; their results are
checked against float64 on the GPU (tests/gpu/test_kernels_gpu.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.kernels import skut_wgmma as sw

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not sw.HAVE_GLUON, reason="this Triton has no Gluon")]

SM90_SHARED = 233_472  # bytes of shared memory per SM on H100 / H200 (228 KB)

# Built in a process of its own: the suite runs under TRITON_INTERPRET=1, whose patches of Triton's language
# break a real compile in the same process.
BUILD = r"""
import json, sys
from runtime.kernels import skut_wgmma as sw
from runtime.kernels.build import build_for_gpu

pooled, kind, nt, gdc = json.loads(sys.argv[1])
fn = {"split": sw._skut_wgmma_split_kernel, "groups": sw._skut_wgmma_groups_kernel}.get(kind, sw._skut_wgmma_kernel)
one_pass = kind != "two-pass"
types = {"x_ptr": "*fp16", "act_ptr": "*fp16", "out_ptr": "*fp16", "kv_ptr": "*fp16", "mask_ptr": "*u8",
         "w_ptr": "*fp16", "v_ptr": "*fp32", "pool_ptr": "*fp32" if pooled else "*fp16", "pw_ptr": "*fp32",
         "pb_ptr": "*fp32", "r_ptr": "*fp16", "sync_ptr": "*i32", "part_ptr": "*fp32", "S": "i32", "n_layers": "i32",
         "D_OUT": "i32"}
consts = dict(D=64, F=32, NT=nt, CAUSAL=True, HAS_MASK=True, POOL=1 if pooled else 0, FINAL_NORM=False,
              STORE_OUT=not pooled, POOL_PROJ=pooled, O_P=64, ONE_PASS=one_pass, GDC=gdc)
types = {n: t for n, t in types.items() if n in fn.arg_names}
consts = {n: v for n, v in consts.items() if n in fn.arg_names}
aligned = [n for n, t in types.items() if t.startswith("*")]
kernel = build_for_gpu(fn, types, consts, aligned, num_warps=4, max_regs=None if one_pass else sw.MAX_REGS)
ptx = kernel.asm["ptx"]
print(json.dumps({"wgmma": "wgmma.mma_async" in ptx, "shared": kernel.metadata.shared,
                  "warp_groups": ptx.count("setmaxnreg") > 0, "waits": ptx.count("griddepcontrol.wait"),
                  "signals": ptx.count("griddepcontrol.launch_dependents")}))
"""


@pytest.mark.parametrize(
    "pooled,kind,nt,gdc",
    [(False, "two-pass", 3, False), (True, "one-pass", 3, False), (True, "split", 3, False), (True, "groups", 3, True),
     (False, "groups", 2, True), (False, "groups", 3, False)],
    ids=["rows-two-pass", "runtime-one-pass", "runtime-per-tile", "runtime-grouped", "rows-grouped-two-tiles",
         "rows-grouped-plain-launch"],
)  # fmt: skip
def test_wgmma_kernel_builds_for_sm90(pooled: bool, kind: str, nt: int, gdc: bool) -> None:
    """V2 as the benchmark at B=2048 (every row, two passes per layer, registers capped), as the runtime
    launches it at S=192 (max over valid rows, then out_linear; one pass, one program per query tile, or one
    warp group per query tile) and every row of 65-128 tokens in the grouped launch: they compile to wgmma,
    and three (two, one) programs' shared memory fits an SM; the grouped launch is warp-specialized and, as a
    programmatic dependent, waits for the kernel before it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", BUILD, json.dumps([pooled, kind, nt, gdc])], capture_output=True,
                         text=True, env=env, cwd=Path(__file__).parents[1], timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    built = json.loads(out.stdout.strip().splitlines()[-1])
    assert built["wgmma"]  # the tensor-core path it was written for
    assert built["warp_groups"] == (kind == "groups")
    # As a programmatic dependent, every warp group waits for the kernel before it ahead of reading its rows; the
    # program signals its own dependents once.
    assert (built["waits"], built["signals"]) == ((nt, 1) if gdc else (0, 0))
    per_sm = {"two-pass": 3, "groups": 1}.get(kind, 2)
    assert 0 < built["shared"] and per_sm * (built["shared"] + 2048) <= SM90_SHARED, built


@pytest.mark.parametrize(
    "version,ok",
    [("3.6.0", True), ("3.7.1", True), ("3.9.0", True), ("3.9.1+gitabc", True), ("3.5.1", False),
     ("3.10.0", False), ("4.0.0", False), ("main", False)],
)  # fmt: skip
def test_triton_versions_outside_the_built_range_take_the_mma_sync_kernel(version: str, ok: bool) -> None:
    assert sw.triton_version_ok(version) is ok
