"""`transact bench` times the runtime and eager PyTorch on the same request and prints both."""

from __future__ import annotations

import re

from click.testing import CliRunner
from test_runtime_session import small_bundle

from runtime.bench import bench_cmd, latency


def test_bench_prints_both_paths_with_positive_times() -> None:
    result = CliRunner().invoke(bench_cmd, [str(small_bundle()), "--device", "cpu", "--candidates", "7",
                                            "--runs", "2", "--warmup", "1", "--threads", "1"])  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = re.findall(r"^\| (runtime \(cpu\)|eager PyTorch fp32) \| ([0-9.]+) \| ([0-9.]+) \|", result.output, re.M)
    assert [r[0] for r in rows] == ["runtime (cpu)", "eager PyTorch fp32"]
    assert all(float(p50) > 0 and float(p99) >= float(p50) for _, p50, p99 in rows)


def test_latency_counts_every_call() -> None:
    calls = []
    stats = latency(lambda: calls.append(1), runs=5, warmup=2)
    assert len(calls) == 7 and stats["p99_ms"] >= stats["p50_ms"] >= 0
