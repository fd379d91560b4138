"""Without a GPU the Triton kernels run in Triton's interpreter. Triton decides that when a kernel module is
imported, so it is set here, before any test module imports one (whichever runs first, alone or in a subset)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
