"""benchmarks/train_step.py runs end to end at a tiny size and its throughput follows from its own step time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"


def test_train_step_benchmark_reports_consistent_throughput(tmp_path: Path) -> None:
    out = tmp_path / "train.json"
    args = ["--device", "cpu", "--threads", "1", "--users", "30", "--batches", "2", "--batch-requests", "6",
            "--candidates", "4", "--ll", "120", "--runs", "3", "--warmup", "1", "--model", "demo", "--json", str(out)]
    res = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    info = json.loads(out.read_text())
    step = info["ms"]["train step"]
    assert 0 < step["p50_ms"] <= step["p99_ms"] and info["ms"]["batch build + copy"]["p50_ms"] > 0
    assert info["requests_per_s"] == pytest.approx(6 / (step["p50_ms"] / 1e3))
    assert info["candidates_per_s"] == pytest.approx(info["candidates_per_batch"] / (step["p50_ms"] / 1e3))
    assert info["candidates_per_batch"] > 6  # requests carry several candidates each
    assert "| train step |" in res.stdout


def test_train_step_benchmark_refuses_too_few_requests() -> None:
    res = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--users", "3", "--batches", "8"],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 2 and "fewer than --batches x --batch-requests" in res.stderr
