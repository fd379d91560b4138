"""Whether Triton's interpreter can run this project's kernels here.

Triton 3.6's interpreter turns a loop bound held in a tensor into an int with ``int()`` of a one-element
array, which NumPy 2.4 made an error (deprecated since 1.25); later Triton releases take the element
first. Every kernel here loops over runtime lengths, so on that pairing each interpreter test would fail
with the same TypeError. ``interpreter_problem`` finds it once, by running a loop like theirs.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl


@triton.jit
def _sum_below(out_ptr, n):
    acc = 0
    for i in range(0, tl.cdiv(n, 4)):  # a runtime bound, as in every kernel of the project
        acc += i
    tl.store(out_ptr, acc)


def interpreter_problem() -> str | None:
    """None where the interpreter runs the probe loop right (call with TRITON_INTERPRET=1 set before
    ``triton`` was imported), else what is wrong and what to install."""
    out = torch.full((1,), -1, dtype=torch.int32)
    try:
        _sum_below[(1,)](out, 10)  # i = 0, 1, 2
    except Exception as exc:  # the interpreter wraps the TypeError in its own error type
        return (f"Triton {triton.__version__}'s interpreter cannot run the kernels with NumPy {np.__version__} "
                f"({exc}); install numpy<2.4 or a later Triton")  # fmt: skip
    if int(out.item()) != 3:
        return f"Triton {triton.__version__}'s interpreter summed 0..2 to {int(out.item())}, not 3"
    return None


if __name__ == "__main__":
    problem = interpreter_problem()
    print(problem or "ok")
    raise SystemExit(1 if problem else 0)
