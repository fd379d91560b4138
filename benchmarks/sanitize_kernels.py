"""Every Triton kernel of the runtime, launched once or twice per code path on small inputs and checked
against its reference: the driver that ``benchmarks/gpu_sanitize.sh`` runs under compute-sanitizer.

    PYTHONPATH=. python benchmarks/sanitize_kernels.py [substring ...]   # needs a CUDA GPU

The cases are the GPU tests' own functions (tests/gpu, tests/test_kernel_*.py) with one parameter set
per path: the transformer's per-sequence tiles that ``choose_config`` can return and its split launch,
fully masked rows and both pools, and on sm_90 its Gluon launches (with three control kernels for racecheck's
reading of the grouped launch); the selection's scan and refine pass, its
overflow fallback and the one-pass short kernel; the token builders; the dense part's kernels. One process, so
each kernel compiles once and the sanitizer's start-up is paid once.
"""

from __future__ import annotations

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests"), os.path.join(ROOT, "tests", "gpu")]

import torch  # noqa: E402

if not torch.cuda.is_available():
    sys.exit("needs a CUDA GPU")

import test_kernel_dense as dense_t  # noqa: E402
import test_kernel_skut as skut_t  # noqa: E402
import test_kernels_gpu as gpu_t  # noqa: E402

import runtime.kernels.skut as sk  # noqa: E402

f16, f32 = torch.float16, torch.float32
SM90 = torch.cuda.get_device_capability()[0] == 9  # the Gluon (wgmma) launches are built for sm_90
SPLIT = sk.SkutConfig(64, 32, 4, 32, split=True)


def _label(c: sk.SkutConfig) -> str:
    """A configuration's name in the case list: its tiles, not its repr (whose "wgmma=False" a filter for the Gluon
    cases would match)."""
    return f"{c.block_m}/{c.block_n}/{c.num_warps} f{c.f_chunk} s{c.num_stages}" + " split" * c.split + (
        f" regs {c.max_regs}" if c.max_regs else "") + " wgmma" * c.wgmma + " groups" * c.warp_groups


def _wgmma(case: int, config: sk.SkutConfig):  # noqa: ANN202
    """The GPU test of the Gluon launches on ``WGMMA_CASES[case]`` through ``config``."""
    return lambda: gpu_t.test_skut_wgmma(*gpu_t.WGMMA_CASES[case], config)


if SM90:  # Gluon and its barrier as the Gluon launches import them (Triton 3.9 renamed the barrier)
    from runtime.kernels.skut_wgmma import _cta_barrier, gl, gluon, mbarrier

    @gluon.jit
    def _ws_part(out_ptr, rows_s, bar, P: gl.constexpr, MODE: gl.constexpr):
        """Partition P of ``_ws_control_kernel``: 128 distinct values into its own row of the output (MODE 0);
        through its own shared row first, written by warp rows and read back by warp columns behind the
        partition's barrier (1); and, for the workers, the default partition's output made from their rows after
        one thread's mbarrier arrive per partition (2), as the grouped launch handed over its pooled maxima."""
        BY_ROW: gl.constexpr = gl.BlockedLayout([1, 1], [1, 32], [4, 1], [1, 0])
        BY_COL: gl.constexpr = gl.BlockedLayout([1, 1], [4, 8], [1, 4], [0, 1])
        idx = gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(1, BY_ROW)), 1) * 32 + gl.expand_dims(
            gl.arange(0, 32, layout=gl.SliceLayout(0, BY_ROW)), 0)
        b = gl.program_id(0)
        v = b * 1000 + P * 200 + idx
        if MODE >= 1:
            rows_s.index(P).store(v)
            _cta_barrier()
            v = gl.convert_layout(rows_s.index(P).load(BY_COL), BY_ROW)
        if MODE == 2:
            if P == 0:  # the workers' rows hold b * 1000 + 200 + idx and b * 1000 + 400 + idx
                mbarrier.wait(bar, 0)
                v = v + rows_s.index(1).load(BY_ROW) + rows_s.index(2).load(BY_ROW) - 2 * (b * 1000 + 300 + idx)
            else:
                mbarrier.arrive(bar)
        gl.store(out_ptr + (b * 3 + P) * 128 + idx, v)

    @gluon.jit
    def _ws_control_kernel(out_ptr, MODE: gl.constexpr):
        """Three warp groups split as the grouped transformer launch splits them: a control for what racecheck
        reports of that launch (``_ws_part``)."""
        rows_s = gl.allocate_shared_memory(gl.int32, [3, 4, 32], gl.SwizzledSharedLayout(1, 1, 1, order=[1, 0]))
        bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(bar, count=2)
        _cta_barrier()
        gl.warp_specialize([(_ws_part, (out_ptr, rows_s, bar, 0, MODE)), (_ws_part, (out_ptr, rows_s, bar, 1, MODE)),
                            (_ws_part, (out_ptr, rows_s, bar, 2, MODE))], [4, 4], [144, 160])  # fmt: skip


def _ws_control(mode: int) -> None:
    """The control kernel over a few waves of programs, its output checked element by element."""
    progs = 3 * torch.cuda.get_device_properties(0).multi_processor_count
    out = torch.full((progs, 3, 128), -7, dtype=torch.int32, device="cuda")  # poison
    _ws_control_kernel[(progs,)](out, MODE=mode, num_warps=4)
    b, p, i = torch.meshgrid(*(torch.arange(n, device="cuda") for n in out.shape), indexing="ij")
    torch.testing.assert_close(out, (b * 1000 + p * 200 + i).to(torch.int32), rtol=0, atol=0)


CASES = [
    # transformer: the grid's small shapes (every head count, FFN width, pool, dtype) ...
    ("skut 5x64 causal", lambda: gpu_t.test_skut_grid(5, 64, 1, 32, 2, True, True, None, f16)),
    ("skut 17x96 h2 max_all", lambda: gpu_t.test_skut_grid(17, 96, 2, 32, 2, False, True, "max_all", f16)),
    ("skut 33x64 max_valid", lambda: gpu_t.test_skut_grid(33, 64, 1, 32, 2, True, True, "max_valid", f16)),
    ("skut 70x32 fp32 3 layers", lambda: gpu_t.test_skut_grid(70, 32, 2, 64, 3, True, True, None, f32)),
    ("skut 17x128 h4 ffn256", lambda: gpu_t.test_skut_grid(17, 128, 4, 256, 1, True, False, None, f16)),
    ("skut 9x64 bf16", lambda: gpu_t.test_skut_grid(9, 64, 2, 16, 2, True, True, "max_all", torch.bfloat16)),
    ("skut fully masked rows", lambda: (gpu_t.test_skut_fully_masked_rows(True),
                                        gpu_t.test_skut_fully_masked_rows(False))),
    # ... every per-sequence configuration choose_config returns, and the split launch
    *((f"skut config {_label(c)}", lambda c=c: gpu_t.test_skut_every_config(c, 64, 1, 32)) for c in gpu_t.SKUT_CONFIGS),
    ("skut split 5x37 max_all", lambda: gpu_t.test_skut_split_launch(SPLIT, 5, 37, "max_all")),
    ("skut split 16x192", lambda: gpu_t.test_skut_split_launch(SPLIT, 16, 192, None)),
    ("skut pool projection", lambda: skut_t.test_pool_projection_in_the_launch(64, 1, 2, "max_valid", True, 64)),
    # ... and on sm_90 the Gluon launches (V2's stack): per sequence (one token; a tail; bf16 with the final norm),
    # per query tile, one warp group per query tile (three tiles pooled with Linear(pool) as the runtime runs
    # them; two tiles), the two-pass form for more causal sequences than two per SM, and several waves of programs
    # (the per-tile launch's tickets; the grouped launch's barriers over 6 layers)
    *((
        ("skut wgmma 1 token", _wgmma(2, gpu_t.WGMMA)),
        ("skut wgmma 37 max_all proj", _wgmma(6, gpu_t.WGMMA)),
        ("skut wgmma 256 bf16 final norm", _wgmma(5, gpu_t.WGMMA)),
        ("skut wgmma split 192", _wgmma(0, gpu_t.WGMMA_SPLIT)),
        ("skut wgmma groups 192 pooled proj", _wgmma(1, gpu_t.WGMMA_GROUPS)),
        ("skut wgmma groups 100 bf16", _wgmma(9, gpu_t.WGMMA_GROUPS)),
        ("skut wgmma two-pass causal", lambda: gpu_t.test_skut_wgmma_two_pass_causal("max_valid")),
        ("skut wgmma waves: per-tile launch", lambda: gpu_t.test_skut_wgmma_split_many_sequences(None, 192)),
        ("skut wgmma waves: grouped launch, 6 layers",
         lambda: gpu_t.test_skut_wgmma_groups_many_sequences(192, "max_valid", 6)),
        # (controls for racecheck's reading of the grouped launch: its warp groups sharing nothing; each with a
        # round trip through shared memory behind its own barrier; and handing over to the default partition)
        *((f"skut wgmma groups control {m}: {what}", lambda m=m: _ws_control(m)) for m, what in enumerate((
            "nothing shared", "own rows behind own barrier", "rows handed over by mbarrier"))),
    ) if SM90 else ()),
    # ... and the Gluon packed scan (4 and 2 users per step), against float64 and the Triton kernel
    *((
        ("nn gluon scan 4 users", lambda: gpu_t.test_nn_scan_wgmma_group_maxima(4, f16)),
        ("nn gluon scan 2 users fp32", lambda: gpu_t.test_nn_scan_wgmma_group_maxima(2, f32)),
    ) if SM90 else ()),
    # selection: the two passes at several block sizes and splits, the overflow fallback, k > 128
    ("nn grid 4 users", lambda: gpu_t.test_nn_select_grid([5, 17, 0, 33], [3, 1, 2, 4], 8, f16)),
    ("nn config k64 b16 s7", lambda: gpu_t.test_nn_select_every_config(64, 16, 7, False, 1)),
    ("nn config k96 b32 s1", lambda: gpu_t.test_nn_select_every_config(96, 32, 1, False, 1)),
    ("nn config k16 b64 s33", lambda: gpu_t.test_nn_select_every_config(16, 64, 33, False, 1)),
    ("nn config k200 b16 s7", lambda: gpu_t.test_nn_select_every_config(200, 16, 7, False, 1)),
    ("nn config small capacity", lambda: gpu_t.test_nn_select_every_config(64, 16, 5, True, 1)),
    ("nn config 4 users per step", lambda: gpu_t.test_nn_select_every_config(64, 16, 7, False, 4)),
    ("nn config 2 users per step, k200", lambda: gpu_t.test_nn_select_every_config(200, 16, 5, True, 2)),
    ("nn repeated items (exact scan)", lambda: gpu_t.test_nn_select_repeated_items(20)),
    ("nn short path", lambda: gpu_t.test_nn_select_short_path([128, 3, 0], [100, 50, 20], 96, 128, f16)),
    ("nn short path merged", lambda: gpu_t.test_nn_select_short_path([1000, 90], [40, 30], 64, 100, f32)),
    # token builders and the dense part
    ("v2 tokens", lambda: gpu_t.test_v2_tokens_production_shape([[16000], [20], [3]])),
    ("v2 tokens, no actions", lambda: gpu_t.test_v2_tokens_production_shape([[0], [0], [0]])),
    ("v1 tokens", lambda: gpu_t.test_v1_tokens_production_shape()),
    ("dense both modules", lambda: dense_t.test_dense_kernels_match_the_model({}, 7, 3)),
    ("dense no MLP", lambda: dense_t.test_dense_kernels_match_the_model({"cross_layers": 0, "mlp_dims": []}, 9, 2)),
    ("dense default width tf32", lambda: dense_t.test_default_model_width(True)),
]


def main() -> None:
    only = sys.argv[1:]
    failed = 0
    for name, run in CASES:
        if only and not any(o in name for o in only):
            continue
        t0 = time.perf_counter()
        try:
            run()
            torch.cuda.synchronize()
            status = "ok"
        except Exception as exc:  # reported and counted; the other cases still run
            failed += 1
            status = f"FAILED {type(exc).__name__}: {str(exc)[:200]}"
        print(f"{name}: {status} ({time.perf_counter() - t0:.1f} s)", flush=True)
    print(f"{failed} case(s) failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
