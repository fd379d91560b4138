"""`transact bench` times the runtime and eager PyTorch on the same request and prints both."""

from __future__ import annotations

import re

from click.testing import CliRunner
from test_runtime_session import small_bundle

from runtime.bench import bench_cmd, latency
from runtime.commands import serve_cmd
from runtime.session import Session


def test_bench_prints_both_paths_with_positive_times() -> None:
    result = CliRunner().invoke(bench_cmd, [str(small_bundle()), "--device", "cpu", "--candidates", "7",
                                            "--runs", "2", "--warmup", "1", "--threads", "1"])  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = re.findall(r"^\| (runtime \(cpu\)|eager PyTorch fp32) \| ([0-9.]+) \| ([0-9.]+) \|", result.output, re.M)
    assert [r[0] for r in rows] == ["runtime (cpu)", "eager PyTorch fp32"]
    assert all(float(p50) > 0 and float(p99) >= float(p50) for _, p50, p99 in rows)


def test_bench_and_serve_take_an_onnx_provider() -> None:
    """The cpu backend's session runs on the provider asked for (the stock wheel's Azure provider takes no node,
    so the CPU provider behind it runs the graph); a provider this ONNX Runtime lacks is refused before any
    work, with exit status 2."""
    args = ["--device", "cpu", "--candidates", "3", "--runs", "1", "--warmup", "0"]
    result = CliRunner().invoke(bench_cmd, [str(small_bundle()), *args, "--onnx-provider", "AzureExecutionProvider"])
    assert result.exit_code == 0, result.output
    assert "| runtime (cpu, AzureExecutionProvider) |" in result.output
    session = Session(small_bundle(), device="cpu", warmup=False, onnx_provider="AzureExecutionProvider")
    assert session.backend.session.get_providers() == ["AzureExecutionProvider", "CPUExecutionProvider"]
    for cmd in (bench_cmd, serve_cmd):
        result = CliRunner().invoke(cmd, [str(small_bundle()), "--onnx-provider", "NoSuchExecutionProvider"])
        assert result.exit_code == 2 and "'NoSuchExecutionProvider' is not available" in result.output


def test_latency_counts_every_call() -> None:
    calls = []
    stats = latency(lambda: calls.append(1), runs=5, warmup=2)
    assert len(calls) == 7 and stats["p99_ms"] >= stats["p50_ms"] >= 0
