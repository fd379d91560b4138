"""benchmarks/profile_lines.py on a hand-made Nsight Compute source export: per-line sums and the fetch report."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "profile_lines", Path(__file__).parents[1] / "benchmarks" / "profile_lines.py"
)
profile_lines = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(profile_lines)

HEADER = ["Line No", "Source", "Address", "Source", "Warp Stall Sampling (All Samples)", "Instructions Executed",
          "stall_no_inst", "stall_long_sb", "stall_no_inst (Not Issued)"]  # fmt: skip
# (address, SASS, no_inst, long_sb): two partitions, split at the SETMAXREG of the second; 0x1000 is the base.
SASS = [
    (0x1000, "NOP", 0, 0),
    (0x1010, "FADD R1, R2, R3", 1, 4),
    (0x1080, "MUFU.EX2 R1, R1", 5, 0),  # first slot of the second 128-byte line
    (0x10A0, "USETMAXREG.DEALLOC.CTAPOOL 0xa8", 0, 0),
    (0x1100, "MUFU.EX2 R2, R2", 7, 2),  # first slot of the third line
    (0x1130, "LDG.E R4, desc[UR4][R2.64]", 0, 9),
]


def _write(path: Path) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["File Path", "/x/runtime/kernels/skut_wgmma.py"])
        w.writerow(["Function Name", "_k"])
        w.writerow(HEADER)
        w.writerow(["12", "y = x + 1", "", "", "11", "300", "6", "4", "0"])  # a source line's totals
        for addr, text, no_inst, long_sb in SASS:
            w.writerow(["", "", f"0x{addr:x}", text, str(no_inst + long_sb), "10", str(no_inst), str(long_sb), "99"])


def test_line_totals_come_from_the_source_rows(tmp_path: Path) -> None:
    _write(tmp_path / "s.csv")
    lines = profile_lines.read_lines(str(tmp_path / "s.csv"))
    rec = lines["_k"][("/x/runtime/kernels/skut_wgmma.py", 12)]
    assert (rec["samples"], rec["instructions"], rec["stall_no_inst"], rec["stall_long_sb"]) == (11, 300, 6, 4)
    assert "stall_no_inst (Not Issued)" not in rec


def test_fetch_report_by_line_slot_and_partition(tmp_path: Path) -> None:
    _write(tmp_path / "s.csv")
    sass = profile_lines.read_sass(str(tmp_path / "s.csv"))["_k"]
    assert sorted(sass) == [a for a, *_ in SASS]
    report = profile_lines.fetch_report(sass).splitlines()
    # no_inst 1 + 5 + 7 = 13 of 28 samples; slot 0 holds 5 + 7, slot 1 (0x1010) holds 1.
    assert report[0] == "no-instruction samples: 13 of 28 (46 %); by slot in a 128-byte line: [12, 1, 0, 0, 0, 0, 0, 0]"
    # partition 1: 0x1000-0x10a0 (3 instructions, 10 samples); partition 2 from the SETMAXREG (3, 18 samples).
    assert report[1].startswith("  0x00000-0x000a0: 3 instructions (1 MUFU.EX2), 10 samples: no_inst 6, long_sb 4")
    assert report[2].startswith("  0x000a0-0x00140: 3 instructions (1 MUFU.EX2), 18 samples: long_sb 11, no_inst 7")
    assert len(report) == 3
