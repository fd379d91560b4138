"""benchmarks/cpu_backend.py: ``--profile`` reads ONNX Runtime's profile as the installed version writes it (node
time per operator and per node, the warm-up run left out); ``--threads`` takes several counts and times each."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper
from test_runtime_session import small_bundle

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


@pytest.mark.parametrize("text, want", [("8", [8]), ("1,2,4", [1, 2, 4]), ("16,2,16", [16, 2])])
def test_thread_counts_parse(text: str, want: list[int]) -> None:
    assert cpu_backend.thread_counts(text) == want


@pytest.mark.parametrize("text", ["", "two", "2,", "0", "4,-1", "1.5"])
def test_thread_counts_refuse(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        cpu_backend.thread_counts(text)


def test_sweep_times_each_thread_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    """``--threads 1,2``: one measurement per count (the backend laid out for it, its outputs those of eager), the
    ratios those of the medians, and a table with one line per count."""
    out = tmp_path / "sweep.json"
    monkeypatch.setattr(sys, "argv", ["cpu_backend.py", "--bundle", str(small_bundle()), "--threads", "1,2",
                                      "--runs", "5", "--warmup", "1", "--candidates", "9", "--ll", "40",
                                      "--json", str(out)])  # fmt: skip
    cpu_backend.main()
    sweep = json.loads(out.read_text())["sweep"]
    assert [run["threads"] for run in sweep] == [1, 2]
    for run in sweep:
        med = run["median_ms"]
        backend = run["backend"]["name"]
        assert run["backend"]["split"] * run["backend"]["threads_per_chunk"] <= run["threads"]
        assert run["faster_eager"] == min((k for k in med if k.startswith("eager")), key=med.__getitem__)
        assert run["speedup_vs_best_eager"] == pytest.approx(med[run["faster_eager"]] / med[backend])
        assert run["max_abs_diff_probabilities"] < 1e-5
        assert run["plain_session"]["max_abs_diff_probabilities"] < 1e-5
    table = capsys.readouterr().out.split("| threads |")[1].splitlines()
    assert [line.split("|")[1].strip() for line in table[2:]] == ["1", "2"]
    assert table[3].split("|")[4].strip() == f"{sweep[1]['speedup_vs_best_eager']:.2f}x"
