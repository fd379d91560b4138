"""The Gluon packed scan compiles for sm_90 with the installed Triton as ``nn_select.scan_launch`` launches it: on the
integer warp-group MMA, within its register cap without spills, four programs' shared memory in an SM. Gluon has no
interpreter, so this is the CPU's only check of it; its results are checked against float64 and the Triton kernel
on the GPU (tests/gpu/test_kernels_gpu.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runtime.kernels import nn_scan_wgmma as scan
from runtime.kernels import skut_wgmma as sw

SM90_SHARED = 233_472  # bytes of shared memory per SM on H100 / H200 (228 KB)

# Built in a process of its own: the suite runs under TRITON_INTERPRET=1, whose patches of Triton's language break a
# real compile in the same process.
BUILD = r"""
import json, os, re, subprocess, sys, tempfile
import triton
from runtime.kernels import nn_scan_wgmma as scan
from runtime.kernels.build import build_for_gpu

users, wide, cand, top2 = json.loads(sys.argv[1])
types = {"seq_ptr": "*i8", "starts_ptr": "*i64", "lengths_ptr": "*i64", "cand_ptr": cand, "user_ptr": "*i64",
         "gm_ptr": "*i32", "N": "i32", "D": "i32", "G_TOT": "i32", "SPLITS": "i32", "T": "i32"}
consts = dict(BN=scan.BLOCK_N, BS=scan.TILE, U=users, STAGES=scan.stages(wide), WIDE=wide, GDC=True, PREFETCH=not wide,
              TOP2=top2)
aligned = [n for n, t in types.items() if t.startswith("*")]
kernel = build_for_gpu(scan._nn_scan_wgmma_kernel, types, consts, aligned, num_warps=4, max_regs=scan.MAX_REGS)
with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "kernel.cubin")
    with open(path, "wb") as fh:
        fh.write(kernel.asm["cubin"])
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    usage = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
ptx = kernel.asm["ptx"]
print(json.dumps({"wgmma_s8": len(re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n32k32\.s32\.s8\.s8", ptx)),
                  "dp4a": "dp4a.s32.s32" in ptx, "pdl": "griddepcontrol.launch_dependents" in ptx,
                  "wait": "griddepcontrol.wait" in ptx, "prefetch": len(re.findall(r"prefetch\.global\.L2", ptx)),
                  "shared": kernel.metadata.shared,
                  **{k: int(v) for k, v in re.findall(r"\b(REG|STACK):(\d+)", usage)}}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sw.HAVE_GLUON, reason="this Triton has no Gluon")
@pytest.mark.parametrize(
    "users,wide,cand,top2",
    [(4, False, "*fp16", True), (4, False, "*fp16", False), (2, False, "*fp32", True), (4, True, "*i8", True)],
    ids=["4-users", "4-users-maxima-only", "2-users", "wide"],
)
def test_gluon_scan_builds_for_sm90(users: int, wide: bool, cand: str, top2: bool) -> None:
    """4 users per step (DESIGN's 64-user rows), 2, and 64-bit row offsets with int8 candidates, keeping the groups'
    seconds and rows (``nn_select.TOP2``) or not: one integer wgmma per user per step, the norms by dp4a, the wait
    for the kernel before (its first tiles prefetched ahead of it) and the refine pass's early launch signalled, no
    spills at the cap."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", BUILD, json.dumps([users, wide, cand, top2])], capture_output=True,
                         text=True, env=env, cwd=Path(__file__).parents[1], timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    built = json.loads(out.stdout.strip().splitlines()[-1])
    assert built["wgmma_s8"] == users, built
    assert built["dp4a"] and built["pdl"] and built["wait"] and (built["prefetch"] >= 1) is not wide, built
    assert built["REG"] <= scan.MAX_REGS and built["STACK"] == 0, built
    assert 0 < built["shared"] and 4 * (built["shared"] + 1024) <= SM90_SHARED, built


def test_gluon_scan_is_not_taken_for_cpu_tensors() -> None:
    """Where the shape fits, CPU tensors (the interpreter's) still take the Triton kernel."""
    assert scan.shape_ok(32, 16, 64, 64, 4)
    assert not scan.usable(torch.zeros(64, 32, dtype=torch.int8), 32, 16, 64, 64, 4)


@pytest.mark.parametrize(
    "d,block_n,tile,groups,users,ok",
    [(32, 16, 64, 64, 4, True), (32, 16, 64, 64, 2, True), (16, 16, 64, 64, 4, False), (32, 32, 64, 64, 4, False),
     (32, 16, 128, 64, 4, False), (32, 16, 64, 32, 4, False), (32, 16, 64, 64, 1, False)],
)  # fmt: skip
def test_gluon_scan_shape_rule(d: int, block_n: int, tile: int, groups: int, users: int, ok: bool) -> None:
    """The configurations the kernel is written for: 32 codes, 16-candidate blocks, 64-row tiles, 64 groups, 2 or 4
    users per step; any other takes the Triton kernel."""
    assert scan.shape_ok(d, block_n, tile, groups, users) is ok
