"""GPU tests run on a CUDA machine (`pytest -m gpu tests/gpu`); without a GPU they are not collected."""

import sys
from pathlib import Path

import torch

collect_ignore_glob = [] if torch.cuda.is_available() else ["test_*.py"]
# The GPU tests reuse the CPU tests' input builders (``from test_kernel_tokens import ...``).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
