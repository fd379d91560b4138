"""Build one of the kernels for a GPU on a machine without one (Triton ships its own ptxas).

Used to check that every launch compiles for the GPU (tests/test_kernels_compile.py; the interpreter never
lowers a kernel) and to read registers and spills (benchmarks/kernel_registers.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import mma_sync_only


def build_for_gpu(
    fn: Any,
    types: dict[str, str],
    consts: dict[str, Any],
    aligned: Iterable[str] = (),
    *,
    arch: int = 90,
    num_warps: int = 4,
    num_stages: int = 3,
    mma_sync: bool = True,
    max_regs: int | None = None,
) -> Any:
    """Compile the @triton.jit ``fn`` for sm_<arch> as a launch would, with mma.sync only (or, with
    ``mma_sync=False``, Hopper's wgmma allowed, as for the dense part's large products). A @gluon.jit
    kernel spells its own instructions: ``mma_sync`` does not apply to it.

    Args:
        fn: the kernel (a JITFunction: not under TRITON_INTERPRET=1).
        types: Triton type of each runtime argument by name, e.g. ``{"x_ptr": "*fp16", "S": "i32"}``.
        consts: the value of each constexpr argument by name.
        aligned: arguments a launch would specialise as divisible by 16 (16-byte aligned pointers,
            integers that are multiples of 16): this changes the code, registers included.
        max_regs: a register cap per thread (a launch's ``maxnreg``), or None.
    Returns:
        Triton's compiled kernel (``.asm["cubin"]``, ``.asm["ptx"]``, ...).
    """
    names = fn.arg_names
    sig = {n: types.get(n, "constexpr") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    gluon = getattr(fn, "is_gluon", lambda: False)()
    if gluon:
        from triton.experimental.gluon._runtime import GluonASTSource as source
    else:
        source = ASTSource
    src = source(fn, sig, {(names.index(k),): v for k, v in consts.items()}, attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    if max_regs is not None:
        options["maxnreg"] = max_regs
    with mma_sync_only() if mma_sync and not gluon else contextlib.nullcontext():
        return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
