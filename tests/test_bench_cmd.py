"""`transact bench` times the runtime and eager PyTorch on the same request and prints both."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_runtime_session import small_bundle

from export.bundle import load_bundle
from runtime.bench import bench_cmd, bundle_or_random, last_level_cache, latency_stats, round_ratios, take_turns
from runtime.chunks import MAX_CHUNK, MIN_CHUNK
from runtime.commands import serve_cmd
from runtime.session import Session
from transact.config import ModelConfig


def test_bench_prints_both_paths_with_positive_times() -> None:
    # --system-malloc: the default's mallopt would outlive the command in this test process.
    result = CliRunner().invoke(bench_cmd, [str(small_bundle()), "--device", "cpu", "--candidates", "7",
                                            "--runs", "2", "--warmup", "1", "--threads", "1",
                                            "--system-malloc"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "malloc: defaults" in result.output
    assert "2 runs each after 1 warm-up, taking turns" in result.output
    rows = re.findall(r"^\| (runtime \(cpu, 1 x 1 thread\)|eager PyTorch fp32, fast path o(?:n|ff)) \| ([0-9.]+) \| "
                      r"([0-9.]+) \| ([0-9.]+)x \|$", result.output, re.M)  # fmt: skip
    assert [r[0] for r in rows] == ["runtime (cpu, 1 x 1 thread)", "eager PyTorch fp32, fast path on",
                                    "eager PyTorch fp32, fast path off"]  # fmt: skip
    assert all(float(p50) > 0 and float(p99) >= float(p50) for _, p50, p99, _ in rows)
    base = min(float(p50) for name, p50, _, _ in rows if name.startswith("eager"))
    for _, p50, _, speedup in rows:  # every ratio is against the faster eager setting (printed to 3 decimals)
        assert float(speedup) == pytest.approx(base / float(p50), abs=0.01 + 2e-3 * base / float(p50))
    # 2 runs in blocks of 5: one round
    per_round = re.search(r"round by round .*: median ([0-9.]+)x, ([0-9.]+)-([0-9.]+)x over 1 rounds$", result.output,
                          re.M)  # fmt: skip
    assert per_round is not None, result.output
    assert float(per_round[1]) == float(per_round[2]) == float(per_round[3]) > 0


def test_bench_and_serve_take_an_onnx_provider() -> None:
    """The cpu backend's session runs on the provider asked for (the stock wheel's Azure provider takes no node,
    so the CPU provider behind it runs the graph); a provider this ONNX Runtime lacks is refused before any
    work, with exit status 2."""
    args = ["--device", "cpu", "--candidates", "3", "--runs", "1", "--warmup", "0", "--system-malloc"]
    result = CliRunner().invoke(bench_cmd, [str(small_bundle()), *args, "--onnx-provider", "AzureExecutionProvider",
                                            "--threads", "2", "--split", "2"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "| runtime (cpu, AzureExecutionProvider, 2 x 1 thread) |" in result.output
    session = Session(small_bundle(), device="cpu", warmup=False, onnx_provider="AzureExecutionProvider")
    for ort_session in session.backend.sessions:
        assert ort_session.get_providers() == ["AzureExecutionProvider", "CPUExecutionProvider"]
    for cmd in (bench_cmd, serve_cmd):
        result = CliRunner().invoke(cmd, [str(small_bundle()), "--onnx-provider", "NoSuchExecutionProvider"])
        assert result.exit_code == 2 and "'NoSuchExecutionProvider' is not available" in result.output


def test_bench_and_serve_take_a_chunk_size(monkeypatch) -> None:
    """``--max-chunk`` reaches the cpu backend's session options; below 1 it is refused with exit status 2, by name."""
    import runtime.session

    made = []

    class Recorded(Session):
        def __init__(self, *args, **options) -> None:  # noqa: ANN002, ANN003
            super().__init__(*args, **options)
            made.append(self.backend.max_chunk)

    monkeypatch.setattr(runtime.session, "Session", Recorded)
    args = ["--device", "cpu", "--candidates", "3", "--runs", "1", "--warmup", "0", "--system-malloc", "--threads", "1"]
    result = CliRunner().invoke(bench_cmd, [str(small_bundle()), *args, "--max-chunk", "9"])
    assert result.exit_code == 0, result.output
    assert made == [9]
    for cmd in (bench_cmd, serve_cmd):
        result = CliRunner().invoke(cmd, [str(small_bundle()), "--max-chunk", "0"])
        assert result.exit_code == 2 and "--max-chunk" in result.output


def test_chunk_size_help_names_the_backends_defaults() -> None:
    """The help of both commands gives the sizes the cpu backend uses, and reading them loads no ONNX Runtime (a
    fresh interpreter, since this one has it already)."""
    for cmd in (bench_cmd, serve_cmd):
        text = " ".join(CliRunner().invoke(cmd, ["--help"], terminal_width=400).output.split())
        assert f"most candidates per chunk (default {MAX_CHUNK}" in text
    assert f"at least {MIN_CHUNK} where" in " ".join(
        CliRunner().invoke(serve_cmd, ["--help"], terminal_width=400).output.split()
    )
    code = "import sys, runtime.bench, runtime.commands; print(sorted(m for m in sys.modules if 'onnxruntime' in m))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert out.stdout.strip() == "[]"


def test_take_turns_interleaves_blocks_after_one_untimed_call() -> None:
    """The call order, worked out by hand for runs=7, warmup=2, block=3: warm-ups first, then per round each
    function's untimed call and its block; the last round's blocks are cut to what is still owed."""
    log: list[str] = []
    fns = {name: (lambda name=name: log.append(name)) for name in ("a", "b")}
    times = take_turns(fns, runs=7, warmup=2, block=3)
    assert "".join(log) == "aa" "bb" + "aaaa" "bbbb" + "aaaa" "bbbb" + "aa" "bb"
    assert {k: len(v) for k, v in times.items()} == {"a": 7, "b": 7}


def test_take_turns_times_each_call_alone() -> None:
    """A function that sleeps 20 ms is timed at 20 ms or a little more, one that does nothing far below: the
    timer holds neither the other function's calls nor the untimed ones."""
    import time

    times = take_turns({"slow": lambda: time.sleep(0.02), "fast": lambda: None}, runs=4, warmup=1, block=2)
    assert all(20.0 <= ms < 200.0 for ms in times["slow"])
    assert all(0.0 <= ms < 5.0 for ms in times["fast"])


def test_take_turns_refuses_counts_that_cannot_time_anything() -> None:
    for runs, warmup, block in ((0, 1, 5), (3, -1, 5), (3, 1, 0)):
        with pytest.raises(ValueError, match="runs must be >= 1"):
            take_turns({"a": lambda: None}, runs=runs, warmup=warmup, block=block)


def test_latency_stats_against_numpy() -> None:
    ms = [5.0, 1.0, 3.0, 2.0, 4.0, 100.0]
    stats = latency_stats(ms)
    assert stats["p50_ms"] == 3.5  # the mean of the middle two, 3 and 4
    assert stats["mean_ms"] == 115.0 / 6
    # Linear interpolation between order statistics: sorted, position 0.99 * 5 = 4.95 between 5 and 100.
    assert stats["p99_ms"] == pytest.approx(5.0 + 0.95 * 95.0)


def test_round_ratios_by_hand() -> None:
    """Blocks of 2 (the last one short): each round's median of base over its median of other. The host's drift
    (every time of round 2 doubled) leaves the ratios alone."""
    base = [10.0, 12.0, 20.0, 24.0, 9.0]
    other = [5.0, 7.0, 10.0, 14.0, 3.0]
    assert round_ratios(base, other, block=2) == pytest.approx([11.0 / 6.0, 22.0 / 12.0, 3.0])
    assert round_ratios(base, other, block=5) == pytest.approx([12.0 / 7.0])
    for bad in (([1.0], [1.0, 2.0], 2), ([], [], 2), ([1.0], [1.0], 0)):
        with pytest.raises(ValueError, match="equally long"):
            round_ratios(*bad)


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


def test_bundle_or_random_exports_a_verified_bundle_for_the_block() -> None:
    """No bundle given: a default random model exported to a folder that lasts the block (it loads, hashes
    verified); a bundle given: that bundle, untouched."""
    with bundle_or_random(None, seed=3) as path:
        bundle = load_bundle(path)
        assert bundle.config == ModelConfig()
    assert not path.exists()
    given = small_bundle()
    with bundle_or_random(given) as path:
        assert path == given
    assert (given / "manifest.json").exists()


def _caches(root: Path, entries: dict[str, tuple[str, str]]) -> Path:
    for name, (level, size) in entries.items():
        (root / name).mkdir(parents=True)
        (root / name / "level").write_text(level + "\n")
        (root / name / "size").write_text(size + "\n")
    return root


@pytest.mark.parametrize(("entries", "want"), [
    ({"index0": ("1", "48K"), "index2": ("2", "2048K"), "index3": ("3", "307200K")}, "L3 300 MiB"),  # 300 x 1024
    ({"index0": ("1", "32K"), "index1": ("2", "1536K")}, "L2 1536 KiB"),  # 1.5 MiB: not a whole MiB
    ({"index3": ("3", "105M"), "index4": ("x", "1G")}, "L3 105 MiB"),  # a malformed level is passed over
    ({"index0": ("1", "48Q")}, None),  # an unknown unit: nothing known
    ({}, None),
])  # fmt: skip
def test_last_level_cache_reads_sysfs(tmp_path: Path, entries: dict, want: str | None) -> None:
    assert last_level_cache(_caches(tmp_path / "cache", entries)) == want
