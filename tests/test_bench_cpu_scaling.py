"""benchmarks/cpu_scaling.py: its sessions really run side by side, round by round (pinned where asked), its probes
compute what they claim, and its chunks are the backend's."""

from __future__ import annotations

import importlib.util
import os
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "cpu_scaling.py"
# Loaded from its file: benchmarks/ on sys.path would let benchmarks/runtime.py shadow the package.
_spec = importlib.util.spec_from_file_location("cpu_scaling", SCRIPT)
cpu_scaling = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cpu_scaling)


class Recorder:
    """A session stand-in that records which round it ran in, on which CPUs, and how many ran at once."""

    active = 0
    most_at_once = 0
    lock = threading.Lock()

    def __init__(self, sleep_s: float = 0.01) -> None:
        self.calls: list[tuple[dict, set[int]]] = []
        self.sleep_s = sleep_s

    def run(self, output_names, feed):  # noqa: ANN001, ANN201
        with Recorder.lock:
            Recorder.active += 1
            Recorder.most_at_once = max(Recorder.most_at_once, Recorder.active)
        affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
        time.sleep(self.sleep_s)
        with Recorder.lock:
            Recorder.active -= 1
        self.calls.append((feed, affinity))
        return []


def test_rounds_run_every_session_once_per_round_and_all_at_once() -> None:
    Recorder.most_at_once = 0
    sessions = [Recorder(0.02) for _ in range(3)]
    feeds = [{"i": i} for i in range(3)]
    walls = cpu_scaling.rounds(sessions, feeds, runs=4)
    assert len(walls) == 4 and all(w >= 20.0 for w in walls)  # a round lasts as long as its sessions
    assert Recorder.most_at_once == 3
    for i, s in enumerate(sessions):
        assert [f["i"] for f, _ in s.calls] == [i] * 4


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="thread affinity is a Linux call")
def test_pinned_rounds_put_each_session_on_its_own_cpu() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    sessions = [Recorder(0.0) for _ in range(len(cpus) + 1)]
    cpu_scaling.rounds(sessions, [{}] * len(sessions), runs=2, pin=True)
    for i, s in enumerate(sessions):
        assert {frozenset(a) for _, a in s.calls} == {frozenset({cpus[i % len(cpus)]})}
    assert os.sched_getaffinity(0) == set(cpus)  # the caller's own thread is left alone


def test_a_failing_session_stops_the_rounds_with_its_error() -> None:
    class Broken(Recorder):
        def run(self, output_names, feed):  # noqa: ANN001, ANN201
            raise ValueError("bad feed")

    with pytest.raises(ValueError, match="bad feed"):
        cpu_scaling.rounds([Recorder(0.0), Broken()], [{}, {}], runs=3)


def test_probes_compute_what_they_claim() -> None:
    for name, (graph, feed, w) in cpu_scaling.probes(seed=1).items():
        got = ort.InferenceSession(graph, providers=["CPUExecutionProvider"]).run(None, feed)[0]
        want = feed["x"].astype(np.float64)
        for _ in range(cpu_scaling.PROBE_PRODUCTS if name == "compute" else cpu_scaling.STREAM_ADDS):
            want = want @ w.astype(np.float64) if name == "compute" else want + w
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5, name


def test_chunks_are_consecutive_candidates_with_the_user_inputs_whole() -> None:
    feed = {"cand_request": np.zeros(10, np.int64), "cand_item": np.arange(30).reshape(10, 3),
            "item_dense": np.arange(10.0), "ll_item": np.ones((1, 5, 3))}  # fmt: skip
    chunks = cpu_scaling.chunk_feeds(feed, 3, 3)
    assert [c["item_dense"].tolist() for c in chunks] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert np.array_equal(chunks[1]["cand_item"], feed["cand_item"][3:6])
    assert all(c["ll_item"] is feed["ll_item"] for c in chunks)
    assert set(cpu_scaling.CANDIDATE_INPUTS) <= set(feed)  # every input the backend cuts is cut here


@pytest.mark.parametrize(("cpus", "want"), [(1, [1]), (2, [1, 2]), (12, [1, 2, 4, 8, 12]), (16, [1, 2, 4, 8, 16])])
def test_default_session_counts(cpus: int, want: list[int]) -> None:
    assert cpu_scaling.default_counts(cpus) == want


def test_side_by_side_profiles_every_operator() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 64])
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Sigmoid", ["r"], ["y"])]
    graph = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 18)])
    feed = {"x": np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)}
    row = cpu_scaling.side_by_side(graph.SerializeToString(), [feed, feed], runs=3, warmup=1, pin=False, profile=True)
    assert row["chunks"] == 2 and row["shared_session"] and row["wall_ms"] > 0
    assert set(row["by_operator"]) == {"Relu", "Sigmoid"}
    assert row["node_ms"] == pytest.approx(sum(row["by_operator"].values()))
