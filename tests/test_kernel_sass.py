"""benchmarks/kernel_sass.py: loops and source lines read from nvdisasm's text; real builds of the selection and of
the grouped transformer launch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from runtime.kernels.skut_wgmma import HAVE_GLUON

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)

import kernel_sass  # noqa: E402

# nvdisasm -c -gi's layout, by hand: a prologue, one loop of three instructions over two source lines (the
# branch predicated), the exit and the trailing self-branch every kernel ends with.
SASS = """
        //## File "/src/k.py", line 10
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        //## File "/src/k.py", line 12 inlined at "/src/k.py", line 30
        /*0010*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0020*/                   ISETP.GE.AND P0, PT, R2, 0x10, PT ;
        //## File "/src/k.py", line 13
        /*0030*/              @!P0 BRA `(.L_x_0) ;
        /*0040*/                   EXIT ;
.L_x_1:
        /*0050*/                   BRA `(.L_x_1);
"""


def test_parse_and_loops_by_hand() -> None:
    instrs, labels = kernel_sass.parse(SASS)
    assert [i.addr for i in instrs] == [0x0, 0x10, 0x20, 0x30, 0x40, 0x50]
    assert labels == {".L_x_0": 1, ".L_x_1": 5}
    assert instrs[3].text == "BRA `(.L_x_0)" and instrs[3].opcode == "BRA"  # predicate dropped
    assert [i.source for i in instrs[:4]] == ["k.py:10", "k.py:12", "k.py:12", "k.py:13"]  # innermost line
    found = kernel_sass.loops(instrs, labels)
    assert [(lp.first, lp.last) for lp in found] == [(1, 3), (5, 5)]
    text = kernel_sass.report(SASS)
    assert "6 instructions in all" in text
    assert "loop 0x0010-0x0030: 3 instructions" in text
    assert "0x0050" not in text  # the self-branch is no loop worth reporting
    assert "      2  k.py:12" in text and "      1  k.py:13" in text


def run_tool(kernel: str, *extra: str) -> tuple[str, list[str]]:
    """``kernel_sass.py KERNEL`` in its own process, without the interpreter the suite sets (it would wrap
    the kernels); its output and the text of each loop it reports."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, os.path.join(BENCH, "kernel_sass.py"), kernel, "--top", "50", *extra],
                         capture_output=True, text=True, env=env, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout, out.stdout.split("\nloop ")[1:]


@pytest.mark.slow
def test_scan_builds_and_its_loop_is_found() -> None:
    """``kernel_sass.py scan`` builds the selection's scan for sm_90 with the installed Triton (in its own
    process: the other tests' interpreter must not wrap the kernels) and reports its step loop, which holds
    the integer tensor-core dots and whose instructions come mostly from nn_select.py."""
    stdout, blocks = run_tool("scan")
    steps = [b for b in blocks if "IMMA" in b.splitlines()[-1]]  # the opcodes line
    assert steps, stdout
    size = int(steps[0].split(": ", 1)[1].split()[0])
    assert 50 < size < 2000
    from_nn = sum(int(line.split()[0]) for line in steps[0].splitlines()[1:-1] if "nn_select.py:" in line)
    assert from_nn > size // 2


@pytest.mark.slow
def test_refine_builds_and_its_rows_loop_is_found() -> None:
    """``kernel_sass.py refine`` builds the refine pass for sm_90 (in its own process, as above); its rows
    loop gathers int8 rows from global memory and converts them for the fp32 scores on the CUDA cores."""
    stdout, blocks = run_tool("refine")
    assert "refine, 8 x 32 groups, top-64" in stdout
    rows = [b for b in blocks if "I2F.S8" in b.splitlines()[-1] and "LDG" in b.splitlines()[-1]]
    assert rows, stdout
    assert any("nn_select.py:" in line for line in rows[0].splitlines()[1:-1])


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_GLUON, reason="this Triton has no Gluon")
def test_groups_builds_with_a_layer_loop_per_query_tile() -> None:
    """``kernel_sass.py groups`` builds the grouped wgmma launch for sm_90 (in its own process, as above). Each
    warp group runs its own code, so each query tile has a layer loop of warp-group products; tile t attends
    to t + 1 key tiles, so the loops' exponentials grow about 1 : 2 : 3."""
    stdout, blocks = run_tool("groups", "--tiles", "3")
    assert "grouped wgmma launch, V2, 3 query tiles" in stdout

    def count(block: str, op: str) -> int:
        opcodes = block.splitlines()[-1].split("opcodes: ", 1)[1].split(", ")
        return sum(int(o.rsplit(" ", 1)[1]) for o in opcodes if o.rsplit(" ", 1)[0] == op)

    # Loops holding both products and exponentials, smallest first; the out-of-line waits' branches make more
    # "loops" that enclose or overlap the layer loops, so keep only those disjoint from the ones already kept.
    spans = []
    for b in blocks:
        if "HGMMA" in b.splitlines()[-1] and count(b, "MUFU.EX2"):
            lo, hi = (int(a, 16) for a in b.split(":", 1)[0].split("-"))
            spans.append((hi - lo, lo, hi, count(b, "MUFU.EX2")))
    kept = []
    for _, lo, hi, ex2 in sorted(spans):
        if all(hi < k_lo or lo > k_hi for k_lo, k_hi, _ in kept):
            kept.append((lo, hi, ex2))
    exps = sorted(ex2 for *_, ex2 in kept)
    assert len(exps) == 3, stdout
    assert 1.8 < exps[1] / exps[0] < 2.2 and 2.7 < exps[2] / exps[0] < 3.3, exps


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_GLUON, reason="this Triton has no Gluon")
def test_gluon_scan_builds_and_its_step_loop_is_found() -> None:
    """``kernel_sass.py gluon-scan`` builds the Gluon packed scan for sm_90 (in its own process, as above); its step
    loop holds one integer warp-group product per user and the rows' squares by ``dp4a`` (2 rows x 2 words per
    thread and user)."""
    stdout, blocks = run_tool("gluon-scan", "--users", "4")
    assert "Gluon packed scan, 4 users per step" in stdout
    steps = [b for b in blocks if "IGMMA" in b.splitlines()[-1]]
    assert steps, stdout
    opcodes = dict(o.rsplit(" ", 1) for o in steps[0].splitlines()[-1].split("opcodes: ", 1)[1].split(", "))
    assert int(opcodes["IGMMA.64x32x32.S8.S8"]) == 4
    assert int(opcodes["IDP.4A.S8.S8"]) == 16
