"""benchmarks/cpu_timeline.py: a request's stages from the runs of the backend's sessions, on a hand-worked timeline
and end to end on a small bundle (the stages add up to the request, the chunks and dense runs are the backend's)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_runtime_session import random_requests, small_bundle, small_config

from runtime.chunks import chunk_bounds, guided_bounds
from runtime.session import Session

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "cpu_timeline.py"
_spec = importlib.util.spec_from_file_location("cpu_timeline", SCRIPT)
cpu_timeline = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cpu_timeline)


def test_timeline_by_hand() -> None:
    """Two slots: thread 1 runs chunks at 10-20 and 20-35 ms, thread 2 at 12-25 and 25-30; the request stage ran at
    5-9, one dense run at 35-38; the call lasted 0-40. Chunk phase 10-35 (25 ms), 43 ms of chunks in 2 x 25 of slot
    time (14 % idle), thread 2 starting 2 ms after thread 1 and out of chunks 5 ms before it, 5 ms after the last
    chunk."""
    Run = cpu_timeline.Run
    ms = 1e-3
    runs = [Run("staged", 1, 10 * ms, 20 * ms, 16), Run("staged", 2, 12 * ms, 25 * ms, 16),
            Run("request", 1, 5 * ms, 9 * ms, 0), Run("staged", 2, 25 * ms, 30 * ms, 16),
            Run("staged", 1, 20 * ms, 35 * ms, 16), Run("dense", 2, 35 * ms, 38 * ms, 64)]  # fmt: skip
    got = cpu_timeline.timeline(runs, 0.0, 40 * ms)
    want = {"wall_ms": 40, "before_ms": 10, "request_ms": 4, "chunk_phase_ms": 25, "idle_share": 0.14,
            "start_spread_ms": 2, "end_spread_ms": 5, "after_ms": 5, "chunks": 4, "slots": 2, "dense_runs": 1,
            "dense_candidates": 64}
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key
    with pytest.raises(ValueError, match="no chunk"):
        cpu_timeline.timeline([runs[2]], 0.0, 1.0)


def run_script(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)  # fmt: skip


def test_stages_of_the_backends_requests(tmp_path: Path) -> None:
    """40 candidates through the request and dense stages: 4 chunks of 10 at 2 threads (two dense groups of 20), 3 of
    13 or 14 at 1 (one dense run after the chunks); one timed request each, whose stages add up to its time."""
    out = tmp_path / "timeline.json"
    res = run_script("--bundle", str(small_bundle()), "--threads", "2,1", "--runs", "1", "--warmup", "1",
                     "--candidates", "40", "--ll", "50", "--json", str(out))  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads(out.read_text())
    assert [r["threads"] for r in info["results"]] == [2, 1]
    for result, chunks, dense_runs in zip(info["results"], (4, 3), (2, 1), strict=True):
        m = result["median"]
        assert m["chunks"] == len(chunk_bounds(40, result["threads"])) == chunks
        assert m["slots"] <= result["threads"] and m["dense_runs"] == dense_runs and m["dense_candidates"] == 40
        assert m["before_ms"] + m["chunk_phase_ms"] + m["after_ms"] == pytest.approx(m["wall_ms"], rel=1e-9)
        assert 0 < m["request_ms"] < m["before_ms"] and 0 <= m["idle_share"] < 1
        assert 0 <= m["start_spread_ms"] < m["chunk_phase_ms"]
    assert "| 2 | 2 x 1 thread |" in res.stdout and "| 1 | 1 x 1 thread |" in res.stdout


def test_a_guided_rows_runs_are_recorded_by_session() -> None:
    """100 candidates on 8 one-thread slots: guided chunks started with run_async, each recorded from its start to its
    callback under its session (the slot); the stages still add up to the request."""
    import time

    session = Session(small_bundle(), device="cpu", threads=8, split=8, warmup=False)
    record: list = []
    cpu_timeline.record_runs(session.backend, record)
    (req,) = random_requests(small_config(), 71, 1, 100, ll=[150], rt=[30], imp=[9])
    try:
        session.score(req)
        record.clear()
        t0 = time.perf_counter()
        session.score(req)
        m = cpu_timeline.timeline(record, t0, time.perf_counter())
        sessions = {id(s) for s in session.backend.staged.sessions}
    finally:
        session.close()
    assert m["chunks"] == len(guided_bounds(100, 8)) and m["slots"] == 8 and m["dense_candidates"] == 100
    assert {r.thread for r in record if r.kind == "staged"} == sessions
    assert m["before_ms"] + m["chunk_phase_ms"] + m["after_ms"] == pytest.approx(m["wall_ms"], rel=1e-9)


def test_bad_counts_are_refused() -> None:
    res = run_script("--runs", "0", timeout=120)
    assert res.returncode == 2 and "--runs must be at least 1" in res.stderr
