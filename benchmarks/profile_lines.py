"""The kernel lines that cost the most, from an Nsight Compute source export (see gpu_profile.sh).

    python benchmarks/profile_lines.py OUT/skut_v2_source.csv [--top 30] [--fetch]

Sums each Python line's executed instructions and warp stall samples over its SASS instructions, per
kernel, and prints the heaviest lines with their shares and top stall reasons next to the source text
(read from this checkout, so profile the same revision; lines of Triton's own library files, e.g. its
reductions, are shown by file and number only).

``--fetch`` adds, per kernel, where instruction fetch stalls: the share of "no instruction" samples on the
first instruction of a 128-byte line (a miss in the instruction cache lands there), and the samples of each
warp-specialized partition (the code between ``SETMAXREG`` instructions) by stall reason.
"""

from __future__ import annotations

import argparse
import csv
import os
from collections import defaultdict

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SAMPLES = "Warp Stall Sampling (All Samples)"
_INSTR = "Instructions Executed"


def _int(v: str) -> int:
    return int(v) if v.isdigit() else 0


def _rows(path: str):  # noqa: ANN202 (a generator of tuples)
    """(kernel, file, header, row) for each data row of the CSV: a source line's totals have the line number in
    the first field, its SASS rows an empty one."""
    file = kernel = ""
    header: list[str] | None = None
    with open(path, newline="") as fh:
        for row in csv.reader(fh):
            if not row:
                continue
            if row[0] == "File Path":
                file, header = row[1], None
            elif row[0] == "Function Name":
                kernel = row[1]
            elif row[0] == "Line No":
                header = row
            elif header:
                yield kernel, file, header, row


def _stalls(rec: dict[str, str]) -> dict[str, int]:
    """The warp stall samples of one row by reason (all samples, not the not-issued subset)."""
    return {n: _int(v) for n, v in rec.items() if n.startswith("stall_") and "Not Issued" not in n}


def read_lines(path: str) -> dict[str, dict[tuple[str, int], dict[str, int]]]:
    """kernel -> (file, line) -> {"samples", "instructions", "stall_<reason>", ...} from the CSV."""
    out: dict[str, dict[tuple[str, int], dict[str, int]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(int)))
    for kernel, file, header, row in _rows(path):
        if row[0]:  # a source line's totals
            rec = dict(zip(header, row, strict=False))
            acc = out[kernel][(file, int(row[0]))]
            acc["samples"] += _int(rec.get(_SAMPLES, ""))
            acc["instructions"] += _int(rec.get(_INSTR, ""))
            for name, value in _stalls(rec).items():
                acc[name] += value
    return out


def read_sass(path: str) -> dict[str, dict[int, tuple[str, dict[str, int]]]]:
    """kernel -> SASS address -> (instruction text, {"stall_<reason>": samples}) from the CSV's SASS rows."""
    out: dict[str, dict[int, tuple[str, dict[str, int]]]] = defaultdict(dict)
    for kernel, _, header, row in _rows(path):
        if not row[0] and len(row) == len(header):
            try:
                addr = int(row[2], 16)
            except ValueError:
                continue
            out[kernel][addr] = (row[3], _stalls(dict(zip(header, row, strict=True))))
    return out


def fetch_report(sass: dict[int, tuple[str, dict[str, int]]]) -> str:
    """Instruction-fetch stalls by position in a 128-byte line, and each partition's samples by stall reason."""
    base = min(sass)
    no_inst = [0] * 8
    for addr, (_, st) in sass.items():
        no_inst[(addr - base) % 128 // 16] += st.get("stall_no_inst", 0)
    total = sum(sum(st.values()) for _, st in sass.values()) or 1
    lines = [f"no-instruction samples: {sum(no_inst)} of {total} ({100 * sum(no_inst) / total:.0f} %); by slot in a "
             f"128-byte line: {no_inst}"]  # fmt: skip
    cuts = [a for a, (text, _) in sorted(sass.items()) if "SETMAXREG" in text] + [max(sass) + 16]
    lo = base
    for hi in cuts:
        part = [sass[a] for a in sass if lo <= a < hi]
        n = sum(sum(st.values()) for _, st in part)
        if part and n:
            reasons = defaultdict(int)
            for _, st in part:
                for name, c in st.items():
                    reasons[name[6:]] += c
            top = sorted(reasons.items(), key=lambda kv: -kv[1])[:6]
            ex2 = sum("MUFU.EX2" in text for text, _ in part)
            span = f"{lo - base:#07x}-{hi - base:#07x}"
            lines.append(f"  {span}: {len(part)} instructions ({ex2} MUFU.EX2), {n} samples: "
                         + ", ".join(f"{k} {v}" for k, v in top))  # fmt: skip
        lo = hi
    return "\n".join(lines)


def _source(file: str, line: int) -> str:
    local = os.path.join(_ROOT, *file.split("/")[-3:])  # e.g. .../runtime/kernels/skut.py in this checkout
    if not os.path.exists(local):
        return f"({os.path.basename(file)})"
    with open(local) as fh:
        lines = fh.read().splitlines()
    return lines[line - 1].strip() if line <= len(lines) else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--fetch", action="store_true", help="instruction-fetch stalls and per-partition samples")
    args = ap.parse_args()
    sass = read_sass(args.csv) if args.fetch else {}
    for kernel, lines in read_lines(args.csv).items():
        samples = sum(v["samples"] for v in lines.values()) or 1
        instr = sum(v["instructions"] for v in lines.values()) or 1
        print(f"\n{kernel}: {instr:,} instructions, {samples:,} stall samples")
        print("| samples | instructions | line | top stalls | source |\n|---:|---:|---|---|---|")
        for (file, line), v in sorted(lines.items(), key=lambda kv: -kv[1]["samples"])[: args.top]:
            stalls = sorted(((c, n[6:]) for n, c in v.items() if n.startswith("stall_") and c), reverse=True)[:3]
            print(
                f"| {100 * v['samples'] / samples:.1f}% | {100 * v['instructions'] / instr:.1f}% "
                f"| {os.path.basename(file)}:{line} | {', '.join(f'{n} {c}' for c, n in stalls)} "
                f"| `{_source(file, line)[:70]}` |"
            )
        if sass.get(kernel):
            print(fetch_report(sass[kernel]))


if __name__ == "__main__":
    main()
