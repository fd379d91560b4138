"""benchmarks/ab_kernels.py: old and new timed in alternating order, each side's median reported."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest

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



def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=Path(__file__).parents[1], capture_output=True, text=True)


def test_prepare_copies_the_kernels_and_the_old_skut_runs_its_own_wgmma(tmp_path, monkeypatch) -> None:
    """At a revision with ``skut_wgmma``, the old ``skut`` is wired to the old copy, not to today's module."""
    if _git("rev-parse", "--git-dir").returncode != 0:
        pytest.skip("not a git checkout")
    monkeypatch.setattr(ab_kernels, "_HERE", str(tmp_path))
    head = Path(ab_kernels.prepare("HEAD"))
    assert sorted(p.name for p in head.glob("*.py")) == ["nn_select.py", "skut.py", "skut_wgmma.py"]
    assert "from . import" not in (head / "skut.py").read_text()
    import runtime.kernels.skut_wgmma as today

    old = ab_kernels.load_old_skut(str(head))
    assert old.skut_wgmma is not today and old.skut_wgmma.__file__ == str(head / "skut_wgmma.py")


def test_prepare_skips_what_the_revision_lacks(tmp_path, monkeypatch) -> None:
    """f3fa9d7 (before the wgmma kernel) has only the two required modules."""
    if _git("cat-file", "-e", "f3fa9d7^{commit}").returncode != 0:
        pytest.skip("this clone lacks the revision")
    monkeypatch.setattr(ab_kernels, "_HERE", str(tmp_path))
    before = Path(ab_kernels.prepare("f3fa9d7"))
    assert sorted(p.name for p in before.glob("*.py")) == ["nn_select.py", "skut.py"]
