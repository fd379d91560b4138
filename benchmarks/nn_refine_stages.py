"""Where the selection's refine pass spends its time: clock cycles per stage, per program, on the GPU.

    PYTHONPATH=. python benchmarks/nn_refine_stages.py [--users 1] [--length 16000] [--k 64 96]

Loads a copy of ``runtime/kernels/nn_select.py`` whose ``_nn_refine_kernel`` reads ``%clock64`` at the start
and at the end of each of its four stages (threshold, packing the visited groups' ids, scoring their rows,
ordering the kept keys and writing the top k) and stores the readings, the visited groups (whole or by one
row, ``nn_select.TOP2``) and the list length per candidate. Each reading takes the value its stage produced as
an operand, so the compiler cannot move it ahead of the stage. Prints the mean cycles per stage over the
candidates, next to the kernel's time under the profiler. ``%clock64`` counts one SM's cycles: differences
within a program are exact, absolute values are not comparable across SMs.

The copy is made by inserting lines at fixed places of the kernel's source; ``instrumented_source`` fails with the
line it could not find when the kernel changes (tests/test_bench_nn_stages.py builds the copy for sm_90 on every CI
run).

GPU only: the interpreter runs no inline assembly.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import sys
import tempfile
from types import ModuleType

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
# Run as a script, this folder comes first on the path, and its runtime.py would shadow the package.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, _ROOT)
sys.path.append(_HERE)
KERNEL_FILE = os.path.join(_ROOT, "runtime", "kernels", "nn_select.py")
STAGES = ("threshold", "pack", "rows", "order")

_CLOCK = '''@triton.jit
def _clock_after(dep):
    """%clock64 once ``dep`` (an int32 scalar) exists."""
    return tl.inline_asm_elementwise("mov.u64 $0, %clock64; // $1", "=l,r", [dep], dtype=tl.int64,
                                     is_pure=False, pack=1)


@triton.jit
def _below('''

# (anchor in the kernel's source, what replaces it); each anchor must occur exactly once.
_STORES = "".join(f"    tl.store(out + {i}, {v})\n" for i, v in enumerate(
    ("t0", "t1", "t2", "t3", "t4", "(n_visit + n_single).to(tl.int64)", "n_keys.to(tl.int64)")))  # fmt: skip

# (anchor in the kernel's source, what replaces it); each anchor must occur exactly once.
_EDITS = (
    ("@triton.jit\ndef _below(", _CLOCK),
    (
        "    M_BULK: tl.constexpr,\n    TOP2: tl.constexpr = False,\n):\n    \"\"\"Pass 2,",
        "    M_BULK: tl.constexpr,\n    stages_ptr,\n    TOP2: tl.constexpr = False,\n):\n    \"\"\"Pass 2,",
    ),
    (
        "    row = tl.program_id(0)\n    if GDC:  # the next selection's scan",
        "    row = tl.program_id(0)\n    t0 = _clock_after(row)\n    if GDC:  # the next selection's scan",
    ),
    (
        "    tl.store(tau_ptr + row, lo << 32)\n",
        "    t1 = _clock_after(lo.to(tl.int32))\n    tl.store(tau_ptr + row, lo << 32)\n",
    ),
    (
        "    tl.debug_barrier()\n\n    n_rows = ",
        "    tl.debug_barrier()\n    t2 = _clock_after(n_visit)\n\n    n_rows = ",
    ),
    ("    tl.store(cnt_ptr + row, n_keys)\n", "    t3 = _clock_after(n_keys)\n    tl.store(cnt_ptr + row, n_keys)\n"),
    (
        "                    score_ptr, D, k, K, D_P, M_BULK)  # fmt: skip\n\n\n",
        "                    score_ptr, D, k, K, D_P, M_BULK)  # fmt: skip\n"
        "    tl.debug_barrier()\n    t4 = _clock_after(row)\n    out = stages_ptr + row.to(tl.int64) * 7\n"
        + _STORES + "\n\n",
    ),
    (
        "M_BULK=8, TOP2=top2, num_warps=4,\n        )",
        "M_BULK=8, TOP2=top2, stages_ptr=STAGES_OUT, num_warps=4,\n        )",
    ),
    ("from . import ", "from runtime.kernels import "),
)


def instrumented_source(src: str) -> str:
    """The selection module's source with the refine kernel's stage clocks inserted."""
    for anchor, replacement in _EDITS:
        found = src.count(anchor)
        if found != 1:
            raise ValueError(f"nn_select.py changed: expected this text once, found it {found} times:\n{anchor}")
        src = src.replace(anchor, replacement)
    return src


def load_instrumented() -> ModuleType:
    """Import the instrumented copy (set its ``STAGES_OUT`` to an (N, 7) int64 CUDA tensor before a call)."""
    with open(KERNEL_FILE) as fh:
        src = instrumented_source(fh.read())
    with tempfile.TemporaryDirectory(prefix="nn_stages_") as folder:  # Triton reads a kernel's source at import
        path = os.path.join(folder, "nn_select_stages.py")
        with open(path, "w") as fh:
            fh.write(src)
        spec = importlib.util.spec_from_file_location("nn_select_stages", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
        spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=1)
    ap.add_argument("--length", type=int, default=16_000, help="rows per user")
    ap.add_argument("--candidates", type=int, default=256)
    ap.add_argument("--k", type=int, nargs="+", default=[64, 96])
    args = ap.parse_args()

    import torch
    import triton
    from kernels import kernel_times, nn_inputs

    mod = load_instrumented()
    mod.dependent_launch = lambda device: False  # the refine pass's own chain: not started early behind the scan
    dev = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}; "
          f"{args.users} user(s) x {args.length} rows, {args.candidates} candidates\n")  # fmt: skip
    print("| k | " + " | ".join(f"{s}, cycles" for s in STAGES) + " | total, cycles | visited groups | keys (max) |"
          " refine kernel, profiler µs |")  # fmt: skip
    print("|---:|" + "---:|" * (len(STAGES) + 4))
    inputs = nn_inputs(args.users, args.length, args.candidates, seed=0)
    for k in args.k:
        cfg = mod.choose_config(args.candidates, args.users, args.users * args.length, k, dev)
        mod.STAGES_OUT = torch.full((args.candidates, 7), -1, dtype=torch.int64, device=dev)
        for _ in range(3):  # compile, then two timed-in-cycles calls (the last one is read)
            mod.nn_select(*inputs, k, config=cfg)
        torch.cuda.synchronize()
        t = mod.STAGES_OUT.double()
        stages = [(t[:, i + 1] - t[:, i]).mean().item() for i in range(len(STAGES))]
        total = (t[:, 4] - t[:, 0]).mean().item()
        kt = kernel_times(functools.partial(mod.nn_select, *inputs, k, config=cfg))
        refine_us = next((ms for name, ms, _ in kt if "refine" in name), float("nan")) * 1e3
        keys = f"{t[:, 6].mean().item():.1f} ({t[:, 6].max().item():.0f})"
        print(f"| {k} | " + " | ".join(f"{c:,.0f}" for c in stages)
              + f" | {total:,.0f} | {t[:, 5].mean().item():.1f} | {keys} | {refine_us:.1f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
