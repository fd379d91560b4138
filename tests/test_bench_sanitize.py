"""benchmarks/gpu_sanitize.sh's one-line report per tool, with compute-sanitizer replaced by a script that prints
what the real tool prints: a finished run is judged by its summary, a run cut short by the time limit (no
summary) by the reports it printed, never as "0 errors"."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_sanitize.sh"
RACE = "========= Error: Race reported between Write access at k+0x10 in a.py:1\n=========     and Read access\n"
SUMMARY = "========= RACECHECK SUMMARY: {} hazards displayed ({} errors, {} warnings)\n"


def run_with_fake_tool(tmp_path: Path, log: str, rc: int) -> subprocess.CompletedProcess:
    fake = tmp_path / "bin" / "compute-sanitizer"
    fake.parent.mkdir()
    (tmp_path / "log.txt").write_text(log)
    fake.write_text(f"#!/bin/sh\ncat '{tmp_path / 'log.txt'}'\nexit {rc}\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = dict(os.environ, PATH=f"{fake.parent}{os.pathsep}{os.environ['PATH']}", OUT=str(tmp_path / "out"),
               TOOLS="racecheck", LIMIT="30")  # fmt: skip
    return subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_a_finished_clean_run_reports_zero(tmp_path: Path) -> None:
    log = "case a: ok (1.0 s)\ncase b: ok (2.0 s)\n" + SUMMARY.format(0, 0, 0)
    res = run_with_fake_tool(tmp_path, log, 0)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "racecheck: 0 errors; 2 cases ok, 0 failed (rc 0" in res.stdout


def test_a_finished_run_with_hazards_reports_the_summary(tmp_path: Path) -> None:
    log = "case a: ok (1.0 s)\n" + RACE * 3 + SUMMARY.format(5, 3, 2)
    res = run_with_fake_tool(tmp_path, log, 0)
    assert res.returncode == 1
    assert "racecheck: 5 errors; 1 cases ok" in res.stdout


def test_a_run_cut_short_counts_the_reports_it_printed(tmp_path: Path) -> None:
    log = "case a: ok (1.0 s)\n" + RACE * 2 + "========= Warning: Race reported at k+0x30\ncase b: ok (3.0 s)\n"
    res = run_with_fake_tool(tmp_path, log, 124)
    assert res.returncode == 1
    assert "racecheck: 3 errors; 2 cases ok, 0 failed (rc 124" in res.stdout
    assert "out of time after: case b: ok (3.0 s)" in res.stdout
