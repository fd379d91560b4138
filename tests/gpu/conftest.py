"""GPU tests run on a CUDA machine (`pytest -m gpu tests/gpu`); without a GPU they are not collected."""

import torch

collect_ignore_glob = [] if torch.cuda.is_available() else ["test_*.py"]
