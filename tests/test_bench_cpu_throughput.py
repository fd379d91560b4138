"""benchmarks/cpu_throughput.py: worker processes run each runtime together, block by block; its figures are
consistent with what each block timed, the backend's outputs match eager's, and a worker that fails stops the run
with its message instead of leaving the others at the barrier."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from test_runtime_session import small_bundle

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "cpu_throughput.py"


def run_script(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)  # fmt: skip


def test_throughput_per_round_from_the_blocks(tmp_path: Path) -> None:
    out = tmp_path / "throughput.json"
    res = run_script("--bundle", str(small_bundle()), "--procs", "2", "--rounds", "2", "--block", "2", "--warmup",
                     "0", "--candidates", "9", "--ll", "40", "--json", str(out))  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads(out.read_text())
    assert info["procs"] == 2 and info["threads_per_proc"] == 1
    names = ["eager (fast path on)", "eager (fast path off)", "cpu backend"]
    assert list(info["requests_per_s"]) == names
    for name in names:
        per_round = info["requests_per_s_per_round"][name]
        assert len(per_round) == 2
        # a round's 4 requests (2 workers x 2) last at least as long as one worker's 2
        fastest = info["latency_ms"][name]["min"] / 1e3
        assert all(0 < rps <= 4 / (2 * fastest) for rps in per_round)
    best = info["faster_eager"]
    assert info["requests_per_s"][best] == max(info["requests_per_s"][n] for n in names[:2])
    ratios = [b / e for b, e in zip(info["requests_per_s_per_round"]["cpu backend"],
                                    info["requests_per_s_per_round"][best], strict=True)]  # fmt: skip
    assert info["speedup_per_round"]["rounds"] == ratios
    assert info["speedup_vs_best_eager"] == info["requests_per_s"]["cpu backend"] / info["requests_per_s"][best]
    assert info["max_abs_diff_probabilities"] < 1e-5
    assert "requests/s" in res.stdout


def test_a_failing_worker_stops_the_run(tmp_path: Path) -> None:
    res = run_script("--bundle", str(tmp_path / "no-such-bundle"), "--procs", "2", "--rounds", "1", timeout=300)
    assert res.returncode != 0
    assert "worker" in res.stderr and "failed" in res.stderr
    assert "no-such-bundle" in res.stderr


def test_bad_counts_are_refused() -> None:
    res = run_script("--block", "0", timeout=120)
    assert res.returncode == 2 and "--block must be at least 1" in res.stderr
