"""Every Triton kernel launch of the runtime also compiles for the GPU (sm_90) with the installed Triton.

The interpreter tests check the kernels' results on the CPU, but the interpreter never lowers a kernel: a
construct the GPU compiler rejects, or lowers differently in another Triton release (DESIGN §4 asks for
3.6 through 3.9), would pass them. Here one subprocess runs the hybrid backend and the kernels' public
functions at the runtime's tile configurations under the interpreter and records each launch (argument
types, 16-byte alignment, constexprs, warps, stages); a second one, without the interpreter, compiles
every recorded launch for sm_90 as the runtime would (mma.sync only, except where a launch allows
wgmma). No GPU is needed: Triton ships its own ptxas.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from test_runtime_session import small_bundle

RECORD = r"""
import inspect, json, os, sys
import torch
import triton.runtime.interpreter as interp

launches = []
_run = interp.InterpretedFunction.run


def _type(v):
    if isinstance(v, torch.Tensor):
        return "*" + {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int8: "i8",
                      torch.uint8: "u8", torch.int32: "i32", torch.int64: "i64", torch.bool: "i1"}[v.dtype]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -2**31 <= v < 2**31 else "i64"
    return "fp32"


def record(self, *args, grid, warmup, **kwargs):
    named = dict(zip(self.arg_names, args)) | {k: v for k, v in kwargs.items() if k in self.arg_names}
    params = inspect.signature(self.fn).parameters
    rec = {"module": self.fn.__module__, "kernel": self.fn.__name__, "args": {},
           "num_warps": kwargs.get("num_warps", 4), "num_stages": kwargs.get("num_stages", 3),
           "maxnreg": kwargs.get("maxnreg"),
           "mma_sync": os.environ.get("DISABLE_MMA_V3") == "1"}
    for name, v in named.items():
        if isinstance(v, torch.Tensor):
            rec["args"][name] = {"type": _type(v), "aligned": v.data_ptr() % 16 == 0}
        elif "constexpr" in str(params[name].annotation):
            rec["args"][name] = {"const": v}
        else:
            rec["args"][name] = {"type": _type(v), "aligned": isinstance(v, int) and v % 16 == 0 and v != 1}
    launches.append(rec)
    return _run(self, *args, grid=grid, warmup=warmup, **kwargs)


interp.InterpretedFunction.run = record

from runtime.backends.cuda import CudaBackend
from runtime.batching import plan_batch
from runtime.kernels import nn_select as nn_mod, skut as sk
from runtime.session import Request, SessionOptions, open_bundle
from transact.data.random_batch import random_batch

# The hybrid backend's own launches (token builders, selections, transformers, at the bundle's shapes).
bundle = open_bundle(sys.argv[1])
backend = CudaBackend(bundle, SessionOptions(triton_cache_dir=sys.argv[2]), device="cpu")
b = random_batch(bundle.config, 2, 4, ll=[30, 0], rt=[12, 3], imp=[6, 0], seed=0, future=1)
backend.run(plan_batch([Request.from_batch(b, 0), Request.from_batch(b, 1)]))

# The two-pass selection at the configurations the production shapes choose on a 132-SM GPU (k = 64
# and 96; 63 chunks per sequence; at 100,000 rows, 64 chunks and 4 or 2 users per scan step), on small inputs.
g = torch.Generator().manual_seed(0)
seq = torch.randint(-127, 128, (300, 32), generator=g, dtype=torch.int8)
starts, lens = torch.tensor([0, 150]), torch.tensor([150, 150])
cand = torch.randn(6, 32, generator=g)
users = torch.tensor([0, 0, 0, 1, 1, 1])
for k in (64, 96):
    for n_users, rows, splits in ((1, 16_000, 63), (64, 16_000, 63), (64, 100_000, 64), (32, 100_000, 64)):
        cfg = nn_mod.choose_config(256, n_users, rows * n_users, k, torch.device("cpu"), splits=splits)
        nn_mod.nn_select(seq, starts, lens, cand, users, k, idx_dtype=torch.int32, config=cfg)

# The transformer at the runtime's tiles: V2 (d 64, causal) and V1 (d 96, 2 heads, pooled + rows).
for d, h, causal, pool, seq_len in ((64, 1, True, None, 192), (96, 2, False, "max_valid", 100)):
    enc = sk.random_encoder(d, h, 32, 2)
    packed = sk.pack_encoder_weights(enc, torch.float16)
    cfg = sk.choose_config(seq_len, packed)
    x = torch.randn(1, 9, d).half()
    mask = torch.zeros(1, 9, dtype=torch.bool)
    hidden = torch.empty(1, 9, d, dtype=torch.float16) if pool else None
    sk.skut_forward(x, packed, mask, causal, pool, config=cfg, hidden=hidden)
# V2 as the runtime launches it below the SM count (the split launch, pooled through out_linear, and rows),
# and at 2,048 tokens and more (three K/V stages).
enc = sk.random_encoder(64, 1, 32, 2)
packed = sk.pack_encoder_weights(enc, torch.float16)
x, mask = torch.randn(2, 9, 64).half(), torch.zeros(2, 9, dtype=torch.bool)
split = sk.choose_config(192, packed, 2, True, torch.device("cpu"))
assert split.split
proj = (torch.randn(64, 64), torch.randn(64))
sk.skut_forward(x, packed, mask, True, "max_valid", config=split, pool_proj=proj)
sk.skut_forward(x, packed, mask, True, None, config=split)
sk.skut_forward(x, packed, mask, True, None, config=sk.choose_config(sk.LONG_SEQ, packed))
# A configuration with a register cap (benchmarks/skut_sweep.py measures them; choose_config sets none).
sk.skut_forward(x, packed, mask, True, None, config=sk.SkutConfig(64, 32, 4, max_regs=168))

# The dense part's products at the configurations the production shapes choose (dense.linear_config:
# wgmma 64 x 32 for the cross layers and the first MLP layer, mma.sync 16 x 16 for the rest, and 64 x 64
# at 4,096 candidates); sizes divisible by 16, as 1,184 is.
import contextlib
from runtime.kernels import dense as dk, mma_sync_only
x, w = torch.randn(64, 64, generator=g), torch.randn(64, 64, generator=g)
for bm, bn, epi, wgmma in ((64, 32, "cross", True), (64, 32, "relu", True), (64, 64, "relu", False),
                           (16, 16, "relu", False), (16, 16, "sigmoid", False)):
    with contextlib.nullcontext() if wgmma else mma_sync_only():
        dk._linear_kernel[(1, 1)](x, w, w[0], x, torch.empty(64, 64), 64, 64, 64, EPI=dk.EPILOGUES.index(epi),
                                  BM=bm, BN=bn, BK=64, PREC="tf32", num_warps=4, num_stages=3)
print(json.dumps(launches))
"""

COMPILE = r"""
import importlib, json, sys
from runtime.kernels.build import build_for_gpu

launches = json.loads(sys.stdin.read())
seen, failed = set(), []
for rec in launches:
    key = json.dumps(rec, sort_keys=True)
    if key in seen:
        continue
    seen.add(key)
    fn = getattr(importlib.import_module(rec["module"]), rec["kernel"])
    args = rec["args"]
    types = {n: a["type"] for n, a in args.items() if "type" in a}
    consts = {n: a["const"] for n, a in args.items() if "const" in a}
    if "ASM" in consts:  # inline PTX on the GPU, which the interpreter that recorded the launch cannot run
        consts["ASM"] = True
    if "GDC" in consts:  # the selection's passes as sm_90 launches them: each the dependent of the kernel before
        consts["GDC"] = True
    aligned = [n for n, a in args.items() if a.get("aligned")]
    try:
        k = build_for_gpu(fn, types, consts, aligned, num_warps=rec["num_warps"], num_stages=rec["num_stages"],
                          mma_sync=rec["mma_sync"], max_regs=rec["maxnreg"])
        ptx = k.asm["ptx"]
        if rec["maxnreg"] is not None and f".maxnreg {rec['maxnreg']}" not in ptx:
            failed.append(f"{rec['kernel']}: maxnreg={rec['maxnreg']} did not reach the PTX")
        if consts.get("GDC") and "griddepcontrol" not in ptx:
            failed.append(f"{rec['kernel']}: GDC=True but no griddepcontrol in the PTX")
        wait, load = ptx.find("griddepcontrol.wait"), ptx.find("ld.global")
        if wait >= 0 and "_scan" in rec["kernel"]:
            # A packed scan is the dependent of whatever kernel came before: it reads nothing until that one has
            # finished, and lets the refine pass start only after that.
            if 0 <= load < wait:
                failed.append(f"{rec['kernel']}: a global load is issued before griddepcontrol.wait")
            if not wait < ptx.find("griddepcontrol.launch_dependents"):
                failed.append(f"{rec['kernel']}: griddepcontrol.launch_dependents is not after the wait")
        elif wait >= 0 and not 0 <= load < wait:  # the refine pass loads its own inputs while the scan runs
            failed.append(f"{rec['kernel']}: no global load is issued before griddepcontrol.wait")
    except Exception as exc:
        failed.append(f"{rec['kernel']} {rec['num_warps']} warps: {type(exc).__name__}: {str(exc)[:400]}")
print(json.dumps({"compiled": len(seen), "kernels": sorted({r["kernel"] for r in launches}), "failed": failed}))
"""


@pytest.mark.slow
def test_every_runtime_kernel_launch_compiles_for_sm90(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    probe_py = os.path.join(os.path.dirname(__file__), "interpreter_probe.py")
    probe = subprocess.run([sys.executable, probe_py], capture_output=True, text=True,
                           env={**env, "TRITON_INTERPRET": "1"}, timeout=300)  # fmt: skip
    if probe.returncode != 0:  # on a GPU machine whose Triton and NumPy do not pair (conftest refuses that on the CPU)
        pytest.skip("the launches are recorded under the interpreter: " + probe.stdout.strip()[-400:])
    rec = subprocess.run([sys.executable, "-c", RECORD, str(small_bundle()), str(tmp_path / "cache")],
                         capture_output=True, text=True, env={**env, "TRITON_INTERPRET": "1"}, timeout=900)  # fmt: skip
    assert rec.returncode == 0, rec.stderr[-3000:]
    launches = rec.stdout.strip().splitlines()[-1]
    res = subprocess.run([sys.executable, "-c", COMPILE], input=launches, capture_output=True, text=True,
                         env={**env, "TRITON_CACHE_DIR": str(tmp_path / "gpu_cache")}, timeout=900)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert not got["failed"], "\n".join(got["failed"])
    expected = {"_nn_scan_kernel", "_nn_scan_packed_kernel", "_nn_refine_kernel", "_nn_short_kernel",
                "_skut_kernel", "_skut_split_kernel", "_v1_tokens_kernel", "_v2_tokens_kernel", "_dense_input_kernel",
                "_linear_kernel"}  # fmt: skip
    assert expected <= set(got["kernels"])
    assert got["compiled"] >= len(expected)
