"""`transact bench` times the runtime and eager PyTorch on the same request and prints both."""

from __future__ import annotations

import re
from pathlib import Path

from click.testing import CliRunner
from test_runtime_session import small_bundle

from runtime.bench import bench_cmd, latency
from runtime.commands import serve_cmd
from runtime.session import Session


def test_bench_prints_both_paths_with_positive_times() -> None:
    # --system-malloc: the default's mallopt would outlive the command in this test process.
    result = CliRunner().invoke(bench_cmd, [str(small_bundle()), "--device", "cpu", "--candidates", "7",
                                            "--runs", "2", "--warmup", "1", "--threads", "1",
                                            "--system-malloc"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "malloc: defaults" in result.output
    rows = re.findall(r"^\| (runtime \(cpu\)|eager PyTorch fp32) \| ([0-9.]+) \| ([0-9.]+) \|", result.output, re.M)
    assert [r[0] for r in rows] == ["runtime (cpu)", "eager PyTorch fp32"]
    assert all(float(p50) > 0 and float(p99) >= float(p50) for _, p50, p99 in rows)


def test_bench_and_serve_take_an_onnx_provider() -> None:
    """The cpu backend's session runs on the provider asked for (the stock wheel's Azure provider takes no node,
    so the CPU provider behind it runs the graph); a provider this ONNX Runtime lacks is refused before any
    work, with exit status 2."""
    args = ["--device", "cpu", "--candidates", "3", "--runs", "1", "--warmup", "0", "--system-malloc"]
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


FAULTS = """
import resource, sys
from runtime.bench import keep_freed_memory
if sys.argv[1] == "kept":
    assert keep_freed_memory()
def faults_touching_64mb():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = bytearray(64 << 20)  # malloc'd and written (zeroed) page by page
    block[::4096] = b"x" * len(block[::4096])
    del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_touching_64mb()
print(faults_touching_64mb())
"""


def test_keep_freed_memory_spares_the_page_faults_of_a_reused_block() -> None:
    """With glibc's defaults a 64 MB block is mmap'd and unmapped on every use (16,384 fresh 4 KB pages, each a
    page fault); kept, the second use finds its pages still mapped. The kernel's own fault counter is the
    reference. A subprocess each, since mallopt changes the whole process."""
    import subprocess
    import sys

    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, timeout=120,
                             check=True)  # fmt: skip
        return int(out.stdout.strip())

    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    huge = thp.exists() and "[always]" in thp.read_text()
    pages = (64 << 20) // ((2 << 20) if huge else 4096)
    assert faults("defaults") >= pages // 2  # the block's pages fault again (16,385 of 16,384 on the project machine)
    assert faults("kept") < pages // 16  # (0 there)
