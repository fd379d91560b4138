"""Registers, spills and occupancy of the transformer kernel on a GPU you do not have, built here.

    PYTHONPATH=. python benchmarks/kernel_registers.py [--arch 90] [V1 | V2 ...] [64/32/4 ...]

Compiles ``_skut_kernel`` for the target (sm_90 by default; no GPU needed) at the runtime's two shapes
with the specialisations a launch gets (16-byte aligned pointers, S divisible by 16 where it is,
mma.sync only), and reads each cubin's resource usage with the ``cuobjdump`` that ships with Triton.
Registers decide how many programs share an SM (65,536 per SM), which bounds the kernel at small
batches; spills go to local memory. The numbers depend on the Triton version (3.6 and 3.9 differ by up
to ~60 registers or ~200 bytes of spills at the same tile) and on the alignment a launch gets (without it
the same tile spills hundreds of bytes more): build with the version the GPU runs, e.g.
``pip install --target DIR triton==3.6.0`` and DIR first on PYTHONPATH. They matched the H200's own
report for every configuration checked (benchmarks/RESULTS.md), but fewer registers is not always
faster: time the candidates on the GPU.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402

from runtime.kernels import skut as sk  # noqa: E402
from runtime.kernels.build import build_for_gpu  # noqa: E402

SHAPES = {  # name: seq, d_model, heads, ffn, causal (both 2 layers with key padding, as in the runtime)
    "V2": (192, 64, 1, 32, True),
    "V1": (100, 96, 2, 32, False),
}
RUNTIME_POOL = {  # how the runtime launches each (--pool): pool mode, rows stored, out_linear fused
    "V2": dict(POOL=1, STORE_OUT=False, POOL_PROJ=True),
    "V1": dict(POOL=2, STORE_OUT=True, POOL_PROJ=True),
}
CONFIGS = ("64/32/4", "64/64/4", "128/32/8", "32/32/4")
_RUNTIME_ARGS = {  # the kernel's non-constexpr arguments, typed as a fp16 launch passes them
    "x_ptr": "*fp16", "out_ptr": "*fp16", "kv_ptr": "*fp16", "slot_ptr": "*i32", "mask_ptr": "*u8", "w_ptr": "*fp16",
    "v_ptr": "*fp32", "pool_ptr": "*fp16", "pw_ptr": "*fp32", "pb_ptr": "*fp32", "S": "i32", "n_layers": "i32",
    "D_OUT": "i32",
}  # fmt: skip


def build_skut(shape: str, cfg: sk.SkutConfig, arch: int, pool: bool = False):  # noqa: ANN201
    """``_skut_kernel`` compiled for sm_<arch> at one (shape, config): all rows stored and no pool, or
    (``pool``) as the runtime launches it."""
    s, d, h, f, causal = SHAPES[shape]
    d_p, dh_p, f_p = (max(16, triton.next_power_of_2(n)) for n in (d, d // h, f))
    const = dict(
        D=d, D_P=d_p, H=h, DH_P=dh_p, F_P=f_p, F_CHUNK=min(cfg.f_chunk, f_p), BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n, CAUSAL=causal, HAS_MASK=True, POOL=0, FINAL_NORM=False, KV_BUFS=2,
        PREC="tf32", STORE_OUT=True, POOL_PROJ=False, O_P=d_p,
    )  # fmt: skip
    if pool:
        const.update(RUNTIME_POOL[shape])
    aligned = [n for n, t in _RUNTIME_ARGS.items() if t.startswith("*")] + (["S"] if s % 16 == 0 else [])
    return build_for_gpu(sk._skut_kernel, _RUNTIME_ARGS, const, aligned, arch=arch,
                         num_warps=cfg.num_warps, num_stages=cfg.num_stages)  # fmt: skip


def resources(shape: str, cfg: sk.SkutConfig, arch: int, pool: bool = False) -> dict[str, int]:
    """Compile one (shape, config) as ``build_skut`` and return cuobjdump's REG / STACK / SHARED counts."""
    kernel = build_skut(shape, cfg, arch, pool)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as fh:
            fh.write(kernel.asm["cubin"])
        tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True)
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED):(\d+)", out.stdout)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100 / H200)")
    ap.add_argument("--pool", action="store_true",
                    help="build each shape as the runtime launches it (its pool, out_linear fused)")
    ap.add_argument("only", nargs="*", help="shape names (V1, V2) and configurations (block_m/block_n/warps)")
    args = ap.parse_args()
    shapes = [a for a in args.only if a in SHAPES] or list(SHAPES)
    cfgs = [a for a in args.only if "/" in a] or list(CONFIGS)
    print(f"Triton {triton.__version__}, sm_{args.arch}\n")
    print("| shape | block_m/block_n/warps | registers | stack bytes (spills) | programs per SM |")
    print("|---|---|---:|---:|---:|")
    for shape in shapes:
        for label in cfgs:
            bm, bn, warps = (int(v) for v in label.split("/"))
            r = resources(shape, sk.SkutConfig(bm, bn, warps), args.arch, args.pool)
            per_sm = 65536 // (-(-max(r["REG"], 1) // 8) * 8 * 32 * warps)  # allocated in steps of 8
            print(f"| {shape} | {label} | {r['REG']} | {r.get('STACK', 0)} | {per_sm} |", flush=True)


if __name__ == "__main__":
    main()
