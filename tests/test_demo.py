"""`transact demo` end to end, as a user runs it: its own process, data -> train -> export -> parity ->
serve -> HTTP requests -> clean shutdown (small and short: 60 synthetic users, one epoch)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

from export.bundle import load_bundle


def test_demo_runs_the_whole_story(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "transact.cli", "demo", "--out", str(out), "--users", "60", "--epochs", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-3000:]

    # Every step ran and reported success.
    for step in range(1, 6):
        assert f"== {step}/5" in log
    assert "PASSED" in log  # the parity report
    served = re.search(r"(\d+) requests over HTTP: .*max \|HTTP - eager\| = ([0-9.e+-]+); server stopped (.*)", log)
    assert served, log[-3000:]
    assert int(served.group(1)) > 0
    assert float(served.group(2)) <= 1e-5
    assert served.group(3).startswith("cleanly")
    assert re.search(r"malformed request -> 400", log)

    # What it leaves behind: the four trained variants with their test metrics, and a verified bundle.
    results = json.loads((out / "ablation" / "ablation.json").read_text())["results"]
    assert len(results) == 4
    for variant in results.values():
        for head in variant["test"].values():
            assert 0.0 <= head["auc"] <= 1.0 and not math.isnan(head["auc"])
    bundle = load_bundle(out / "bundle")  # verifies every file's sha256
    assert bundle.manifest["parity"]["passed"] is True
