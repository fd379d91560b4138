"""SASS instructions of the runtime's Triton kernels, per loop and per source line, for a GPU you do not have.

    PYTHONPATH=. python benchmarks/kernel_sass.py scan [--users 1|2|4] [--block-n 16] [--groups 32]
    PYTHONPATH=. python benchmarks/kernel_sass.py gluon-scan [--users 2|4]
    PYTHONPATH=. python benchmarks/kernel_sass.py refine [--groups 32] [--k 64]
    PYTHONPATH=. python benchmarks/kernel_sass.py skut [V2|V1] [--config 64/32/4] [--pool]
    PYTHONPATH=. python benchmarks/kernel_sass.py groups [--tiles 3] [--pool]

Builds a kernel here as a launch would specialise it (``runtime.kernels.build``: 16-byte aligned pointers,
mma.sync only), disassembles the cubin with the nvdisasm that ships with Triton, line information on, and
prints every loop (a backward branch and the code it jumps back over): its instruction count, the source
lines its instructions come from (the innermost inlined function's line, where the Triton release records
inlining; Triton 3.9 records the kernel's own lines) and its opcodes, most frequent first.

The counts are static: a loop's body counted once, code under a branch inside it counted whether it runs
or not. They tell where a loop's instructions come from and let two variants be compared before either is
timed; they do not say which is faster (a variant with fewer instructions can be slower: time it on the
GPU). The code depends on the Triton version: build with the one the GPU runs, e.g.
``pip install --target DIR triton==3.6.0`` and DIR first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))
sys.path.insert(1, _HERE)

import triton  # noqa: E402

_LINE = re.compile(r'//## File "([^"]+)", line (\d+)')
_LABEL = re.compile(r"^\s*(\.L_x_\d+):")
_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")
_PREDICATE = re.compile(r"^@!?U?P[T0-9]+\s+")


@dataclass(frozen=True)
class Instr:
    addr: int
    text: str  # without its predicate
    source: str  # "file.py:line" of the innermost inlined function, "?" before any line information

    @property
    def opcode(self) -> str:
        return self.text.split()[0]


@dataclass(frozen=True)
class Loop:
    first: int  # index of the branch target in the instruction list
    last: int  # index of the backward branch
    body: tuple[Instr, ...]


def disassemble(cubin: bytes) -> str:
    """nvdisasm's text of a cubin, with line information (``-gi``: source lines, inlining included)."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as fh:
            fh.write(cubin)
        return subprocess.run([tool, "-c", "-gi", path], capture_output=True, text=True, check=True).stdout


def parse(sass: str) -> tuple[list[Instr], dict[str, int]]:
    """Instructions in address order and each label's index in that list."""
    instrs: list[Instr] = []
    labels: dict[str, int] = {}
    source = "?"
    for line in sass.splitlines():
        if m := _LINE.search(line):
            source = f"{os.path.basename(m.group(1))}:{m.group(2)}"
        elif m := _LABEL.match(line):
            labels[m.group(1)] = len(instrs)
        elif m := _INSTR.match(line):
            instrs.append(Instr(int(m.group(1), 16), _PREDICATE.sub("", m.group(2)), source))
    return instrs, labels


def loops(instrs: list[Instr], labels: dict[str, int]) -> list[Loop]:
    """Every backward branch with the instructions from its target to itself, in address order."""
    found = []
    for i, ins in enumerate(instrs):
        m = _BRANCH.search(ins.text)
        if m and m.group(1) in labels and labels[m.group(1)] <= i:
            first = labels[m.group(1)]
            found.append(Loop(first, i, tuple(instrs[first : i + 1])))
    return found


def report(sass: str, top: int = 20) -> str:
    """A readable summary: the kernel's size, then each loop by source line and opcode."""
    instrs, labels = parse(sass)
    out = [f"{len(instrs)} instructions in all"]
    for lp in loops(instrs, labels):
        if len(lp.body) < 2:  # a branch to itself (the kernel's trailing trap)
            continue
        out.append(f"\nloop {lp.body[0].addr:#06x}-{lp.body[-1].addr:#06x}: {len(lp.body)} instructions")
        by_line = collections.Counter(ins.source for ins in lp.body)
        for source, n in by_line.most_common(top):
            ops = collections.Counter(ins.opcode for ins in lp.body if ins.source == source)
            out.append(f"  {n:5d}  {source:28s} " + ", ".join(f"{k} {v}" for k, v in ops.most_common(4)))
        ops = collections.Counter(ins.opcode for ins in lp.body)
        out.append("  opcodes: " + ", ".join(f"{k} {v}" for k, v in ops.most_common()))
    return "\n".join(out)


# The selection kernels' runtime arguments, typed as the runtime launches them (int8 codes of 32, fp16
# candidates); each build takes those its kernel has.
_SELECT_ARGS = {"seq_ptr": "*i8", "seqw_ptr": "*i32", "starts_ptr": "*i64", "lengths_ptr": "*i64", "cand_ptr": "*fp16",
                "user_ptr": "*i64", "gm_ptr": "*i32", "gid_ptr": "*i32", "tau_ptr": "*i64", "cnt_ptr": "*i32",
                "keys_ptr": "*i64", "idx_ptr": "*i64", "score_ptr": "*fp32", "N": "i32", "D": "i32", "k": "i32",
                "G_TOT": "i32", "SPLITS": "i32", "CAP": "i32", "margin": "fp32", "T": "i32"}  # fmt: skip
_SELECT_ALIGNED = ("N", "D", "k", "G_TOT", "CAP")  # multiples of 16 at the runtime's shapes


def _build_select(fn, consts: dict, arch: int, num_warps: int):  # noqa: ANN001, ANN202
    """``fn`` (a selection kernel) built for sm_<arch> as ``_nn_select_triton`` launches it."""
    from runtime.kernels.build import build_for_gpu

    names = fn.arg_names
    types = {n: t for n, t in _SELECT_ARGS.items() if n in names}
    aligned = [n for n, t in types.items() if t.startswith("*") or n in _SELECT_ALIGNED]
    return build_for_gpu(fn, types, consts, aligned, arch=arch, num_warps=num_warps)


def build_scan(users: int, block_n: int, tile: int, groups: int, arch: int, words: bool = True):  # noqa: ANN201
    """The selection's scan (``_nn_scan_kernel``, or the packed one for 2 / 4 users per step); packed, ``words``:
    row norms from int32 words (aligned rows, as the runtime's), else from the widened codes."""
    from runtime.kernels import nn_select as nn

    consts = {"BN": block_n, "BS": tile, "C": groups, "D_P": 32, "WIDE": False, "GDC": False}
    fn = nn._nn_scan_kernel
    if users > 1:
        fn = nn._nn_scan_packed_kernel
        consts.update(U=users, WORDS=words, ASM=True)
    return _build_select(fn, consts, arch, nn.scan_warps(block_n, tile))


def build_gluon_scan(users: int, arch: int):  # noqa: ANN201
    """The Gluon packed scan (``nn_scan_wgmma``) for 2 / 4 users per step, as ``scan_launch`` launches it on sm_90
    (its one configuration: 16 candidates x 64 rows, 64 groups; its register cap)."""
    from runtime.kernels import nn_scan_wgmma as scan
    from runtime.kernels.build import build_for_gpu

    fn = scan._nn_scan_wgmma_kernel
    types = {n: t for n, t in _SELECT_ARGS.items() if n in fn.arg_names}
    consts = dict(BN=scan.BLOCK_N, BS=scan.TILE, U=users, STAGES=scan.STAGES, WIDE=False, GDC=True,
                  PREFETCH=scan.PREFETCH)
    aligned = [n for n, t in types.items() if t.startswith("*")]
    return build_for_gpu(fn, types, consts, aligned, arch=arch, num_warps=4, max_regs=scan.MAX_REGS)


def build_refine(groups: int, splits: int, k: int, arch: int):  # noqa: ANN201
    """The selection's refine pass (``_nn_refine_kernel``) for ``splits`` chunks of ``groups`` groups and
    top-``k``."""
    from runtime.kernels import nn_select as nn

    consts = {"BS": 64, "C": groups, "G_P": triton.next_power_of_2(groups * splits), "R": nn.REFINE_ROWS,
              "STEPS": nn.THRESHOLD_STEPS, "K": max(16, triton.next_power_of_2(k)), "CH": 64, "D_P": 32,
              "WIDE": False, "GDC": False, "M_BULK": 8}  # fmt: skip
    return _build_select(nn._nn_refine_kernel, consts, arch, 4)


def build_groups(tiles: int, pool: bool, arch: int, gdc: bool = False):  # noqa: ANN201
    """The grouped wgmma launch (``skut_wgmma._skut_wgmma_groups_kernel``, one warp group per query tile) for V2
    (d_model 64, FFN 32) at ``tiles`` query tiles: every row stored, or (``pool``) as the runtime launches it.
    Each warp group is a partition of its own code, so the report has a layer loop per query tile."""
    from runtime.kernels import skut_wgmma as sw
    from runtime.kernels.build import build_for_gpu

    types = {"x_ptr": "*fp16", "out_ptr": "*fp16", "mask_ptr": "*u8", "w_ptr": "*fp16", "v_ptr": "*fp32",
             "pool_ptr": "*fp32" if pool else "*fp16", "pw_ptr": "*fp32", "pb_ptr": "*fp32", "r_ptr": "*fp16",
             "S": "i32", "n_layers": "i32", "D_OUT": "i32"}  # fmt: skip
    consts = dict(D=64, F=32, NT=tiles, HAS_MASK=True, POOL=1 if pool else 0, FINAL_NORM=False, STORE_OUT=not pool,
                  POOL_PROJ=pool, O_P=64, GDC=gdc, PREFETCH=sw.PREFETCH)  # fmt: skip
    fn = sw._skut_wgmma_groups_kernel
    types = {n: t for n, t in types.items() if n in fn.arg_names}
    aligned = [n for n, t in types.items() if t.startswith("*")]
    return build_for_gpu(fn, types, consts, aligned, arch=arch, num_warps=4)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kernel", choices=("scan", "gluon-scan", "refine", "skut", "groups"))
    ap.add_argument("shape", nargs="?", default="V2", help="skut: V2 or V1 (kernel_registers.SHAPES)")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100 / H200)")
    ap.add_argument("--users", type=int, default=1, choices=(1, 2, 4), help="scan: users per step")
    ap.add_argument("--block-n", type=int, default=16, help="scan: candidates per block")
    ap.add_argument("--tile", type=int, default=64, help="scan: rows per tile")
    ap.add_argument("--groups", type=int, default=32, help="scan, refine: group maxima per chunk")
    ap.add_argument("--splits", type=int, default=8, help="refine: chunks per sequence")
    ap.add_argument("--k", type=int, default=64, help="refine: top k")
    ap.add_argument("--config", default="64/32/4", help="skut: block_m/block_n/warps")
    ap.add_argument("--pool", action="store_true", help="skut, groups: as the runtime launches it (pool, out_linear)")
    ap.add_argument("--tiles", type=int, default=3, choices=(2, 3), help="groups: query tiles (warp groups)")
    ap.add_argument("--codes", action="store_true", help="packed scan: norms from the widened codes")
    ap.add_argument("--top", type=int, default=20, help="source lines listed per loop")
    args = ap.parse_args()
    if args.kernel == "scan":
        kernel = build_scan(args.users, args.block_n, args.tile, args.groups, args.arch, words=not args.codes)
        what = f"scan, {args.users} user(s) per step, {args.block_n} candidates x {args.tile} rows"
        what += f", {args.groups} groups" + (", norms from the codes" if args.codes and args.users > 1 else "")
    elif args.kernel == "gluon-scan":
        users = 4 if args.users == 1 else args.users
        kernel = build_gluon_scan(users, args.arch)
        what = f"Gluon packed scan, {users} users per step"
    elif args.kernel == "refine":
        kernel = build_refine(args.groups, args.splits, args.k, args.arch)
        what = f"refine, {args.splits} x {args.groups} groups, top-{args.k}"
    elif args.kernel == "groups":
        kernel = build_groups(args.tiles, args.pool, args.arch)
        what = f"grouped wgmma launch, V2, {args.tiles} query tiles"
        what += ", as the runtime launches it" if args.pool else ""
    else:
        from kernel_registers import build_skut

        from runtime.kernels import skut as sk

        bm, bn, warps = (int(v) for v in args.config.split("/"))
        kernel = build_skut(args.shape, sk.SkutConfig(bm, bn, warps), args.arch, args.pool)
        what = f"skut {args.shape}, {args.config}" + (", as the runtime launches it" if args.pool else "")
    print(f"Triton {triton.__version__}, sm_{args.arch}: {what}\n")
    print(report(disassemble(kernel.asm["cubin"]), args.top))


if __name__ == "__main__":
    main()
