"""Without a GPU the Triton kernels run in Triton's interpreter. Triton decides that when a kernel module is
imported, so it is set here, before any test module imports one (whichever runs first, alone or in a subset)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config) -> None:
    """Refuse to start where the interpreter cannot run the kernels at all (one clear line, not one
    TypeError per kernel test)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        from interpreter_probe import interpreter_problem

        problem = interpreter_problem()
        if problem:
            raise pytest.UsageError(problem)
