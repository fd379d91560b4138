"""benchmarks/cpu_backend.py --profile reads ONNX Runtime's profile as the installed version writes it:
node time per operator and per node, the warm-up run left out."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_backend.py"
# Loaded from its file: benchmarks/ on sys.path would let benchmarks/runtime.py shadow the package.
_spec = importlib.util.spec_from_file_location("cpu_backend", SCRIPT)
cpu_backend = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cpu_backend)


def two_op_graph() -> bytes:
    """y = sigmoid(relu(x)): two nodes that ONNX Runtime's optimisations leave apart."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [256, 256])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [256, 256])
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="first"),
             helper.make_node("Sigmoid", ["r"], ["y"], name="second")]  # fmt: skip
    graph = helper.make_graph(nodes, "two_ops", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()


def test_profile_reports_every_node_per_request() -> None:
    feed = {"x": np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32)}
    prof = cpu_backend.onnxruntime_profile(two_op_graph(), feed, threads=1, runs=3)
    assert prof["runs"] == 3  # four runs, the first left out
    assert set(prof["by_operator"]) == {"Relu", "Sigmoid"}
    assert set(prof["by_node"]) == {"first", "second"}
    assert all(ms > 0 for ms in prof["by_node"].values())
    assert sum(prof["by_operator"].values()) == pytest.approx(sum(prof["by_node"].values()))
