"""benchmarks/ab_kernels.py: old and new timed in alternating order, each side's median reported."""

from __future__ import annotations

import importlib.util
from pathlib import Path

# Loaded from its file: benchmarks/ on sys.path would let benchmarks/runtime.py shadow the package.
_spec = importlib.util.spec_from_file_location("ab_kernels", Path(__file__).parents[1] / "benchmarks" / "ab_kernels.py")
ab_kernels = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ab_kernels)


def test_alternate_swaps_the_order_every_round_and_keeps_the_sides_apart() -> None:
    def old() -> None: ...

    def new() -> None: ...

    order: list[str] = []
    clock = {"old": iter([5.0, 1.0, 3.0, 9.0, 2.0]), "new": iter([4.0, 8.0, 6.0, 7.0, 0.5])}

    def timer(fn) -> float:  # noqa: ANN001
        name = "old" if fn is old else "new"
        order.append(name)
        return next(clock[name])

    t_old, t_new = ab_kernels._alternate(old, new, 5, timer)
    assert order == ["old", "new", "new", "old", "old", "new", "new", "old", "old", "new"]
    assert (t_old, t_new) == (3.0, 6.0)  # medians of each side's own five times


def test_alternate_with_one_kernel_as_both_sides() -> None:
    """An A/A run passes the same callable twice: each side still gets its own rounds."""
    def same() -> None: ...

    ticks = iter(range(8))
    t_old, t_new = ab_kernels._alternate(same, same, 4, lambda fn: float(next(ticks)))
    # rounds: (old 0, new 1), (new 2, old 3), (old 4, new 5), (new 6, old 7)
    assert (t_old, t_new) == (3.5, 3.5)
