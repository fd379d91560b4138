"""The kernels of this checkout against those of an earlier revision, side by side in one process.

    python benchmarks/ab_kernels.py prepare REV            # here, with git: writes benchmarks/_ab/REV/
    PYTHONPATH=. python benchmarks/ab_kernels.py run benchmarks/_ab/REV [--only transformer|selection]

``prepare`` copies ``runtime/kernels/skut.py``, ``nn_select.py`` and ``skut_wgmma.py`` (where REV has it) as
they were at REV into benchmarks/_ab/REV (ignored by git: take it along to the GPU machine; git is not needed
there). ``run`` checks each new result first (the transformer against the float64 reference, the selection bit for bit
against the old kernel and against the reference on a few candidates), then times old and new
alternately from CUDA graphs (median of the rounds' medians; which one goes first alternates by round) at
DESIGN §5's shapes and the runtime's, and prints one table with the ratios and the transformer's registers /
spills.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import statistics
import subprocess
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, _ROOT)
sys.path.append(_HERE)

MODULES = ("skut", "nn_select")
OPTIONAL = ("skut_wgmma",)  # copied where REV has it; the old skut then runs its own
TRANSFORMER = [  # name, batch, seq, d_model, heads, causal, fraction of keys padded[, pooled as the runtime pools V2]
    ("V2 B=256 S=192 d=64 causal", 256, 192, 64, 1, True, 0.25),
    ("V2 B=256 S=192, the runtime's max over valid rows + out_linear", 256, 192, 64, 1, True, 0.25, True),
    ("V2 B=256 S=192, no padding", 256, 192, 64, 1, True, 0.0),
    ("V1 B=256 S=100 d=96 2 heads", 256, 100, 96, 2, False, 0.25),
    ("V1 B=256 S=100, no padding", 256, 100, 96, 2, False, 0.0),
    ("V2 B=16 S=192", 16, 192, 64, 1, True, 0.25),
    ("V2 B=64 S=192", 64, 192, 64, 1, True, 0.25),
    ("V2 B=128 S=192", 128, 192, 64, 1, True, 0.25),
    ("V2 B=2048 S=192", 2048, 192, 64, 1, True, 0.25),
    ("V2 B=256 S=2048", 256, 2048, 64, 1, True, 0.25),
]
SELECTION = [  # name, users, rows per user, candidates, k
    ("1 user S=16,000, top-64", 1, 16_000, 256, 64),
    ("1 user S=16,000, top-96 (the runtime's ll)", 1, 16_000, 256, 96),
    ("64 users S=16,000, top-64", 64, 16_000, 256, 64),
    ("64 users S=100,000, top-64", 64, 100_000, 256, 64),
]


def prepare(rev: str) -> str:
    """Write the kernels as they were at ``rev`` into benchmarks/_ab/<rev>/ (imports made absolute)."""
    out = os.path.join(_HERE, "_ab", rev.replace("/", "_"))
    os.makedirs(out, exist_ok=True)
    for name in MODULES + OPTIONAL:
        shown = subprocess.run(["git", "show", f"{rev}:runtime/kernels/{name}.py"], cwd=_ROOT,
                               capture_output=True, text=True)  # fmt: skip
        if shown.returncode != 0:
            if name in OPTIONAL:
                continue
            raise SystemExit(f"git show {rev}:runtime/kernels/{name}.py failed: {shown.stderr.strip()}")
        src = shown.stdout.replace("from . import ", "from runtime.kernels import ")
        with open(os.path.join(out, f"{name}.py"), "w") as fh:
            fh.write(src)
    return out


def _load(folder: str, name: str):
    spec = importlib.util.spec_from_file_location(f"ab_old_{name}", os.path.join(folder, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def load_old_skut(folder: str):  # noqa: ANN201 (a module)
    """The old ``skut``, running the old ``skut_wgmma`` where the folder has one (else today's)."""
    old = _load(folder, "skut")
    if os.path.exists(os.path.join(folder, "skut_wgmma.py")):
        old.skut_wgmma = _load(folder, "skut_wgmma")
    return old


def _alternate(old, new, rounds: int, timer=None) -> tuple[float, float]:
    """Median time of ``old`` and of ``new`` over ``rounds`` rounds, each timed once per round by ``timer``
    (default: ``kernels.bench_graph`` on a list of the one call). Which goes first alternates from round to
    round: an A/A run of the same kernel as both, old always first, put old ahead by up to 2 %."""
    if timer is None:
        from kernels import bench_graph

        def timer(fn):  # noqa: ANN001, ANN202
            return bench_graph([fn])

    times: tuple[list[float], list[float]] = ([], [])
    for i in range(rounds):
        for side in (0, 1) if i % 2 == 0 else (1, 0):
            times[side].append(timer((old, new)[side]))
    return statistics.median(times[0]), statistics.median(times[1])


def run_transformer(old_sk, rounds: int) -> None:
    import torch
    from kernels import check_skut, make_encoder, transformer_inputs

    from runtime.kernels import skut as new_sk

    print("| transformer (2 layers, FFN 32) | old ms | new ms | speed-up | rel. err (new) | regs / spills old -> new |")
    print("|---|---:|---:|---:|---:|---|")
    for name, bsz, s, d, h, causal, pad, *pooled in TRANSFORMER:
        enc = make_encoder(d, h, 32, 2)
        pool, proj = (None, None)
        if pooled:  # V2 as the runtime launches it: max over valid rows, then out_linear (d -> d), fp32 out
            gen = torch.Generator(device="cuda").manual_seed(1)
            pool = "max_valid"
            proj = (torch.randn(d, d, device="cuda", generator=gen) / 8, torch.randn(d, device="cuda", generator=gen))
        p_new, p_old = new_sk.pack_encoder_weights(enc, torch.float16), old_sk.pack_encoder_weights(enc, torch.float16)
        x, kpm = transformer_inputs(bsz, s, d, seed=0)
        if pad == 0.0:
            kpm = torch.zeros_like(kpm)
        cfg = new_sk.choose_config(s, p_new, bsz, causal, x.device)  # what the timed call picks
        err = max(check_skut(enc, p_new, cfg, 8, s, causal), check_skut(enc, p_new, cfg, 8, s, causal, "max_valid"))
        if pool is None:
            o_new = torch.empty(bsz, s, d, dtype=torch.float16, device="cuda")
        else:
            o_new = torch.empty(bsz, d, dtype=torch.float32, device="cuda")
        o_old = torch.empty_like(o_new)
        run_new = functools.partial(new_sk.skut_forward, x, p_new, kpm, causal, pool, out=o_new, pool_proj=proj)
        run_old = functools.partial(old_sk.skut_forward, x, p_old, kpm, causal, pool, out=o_old, pool_proj=proj)
        run_new()
        run_old()
        regs = (f"{old_sk.last_launch_info.get('n_regs')} / {old_sk.last_launch_info.get('n_spills')} -> "
                f"{new_sk.last_launch_info.get('n_regs')} / {new_sk.last_launch_info.get('n_spills')}")  # fmt: skip
        t_old, t_new = _alternate(run_old, run_new, rounds)
        print(f"| {name} | {t_old:.4f} | {t_new:.4f} | {t_old / t_new:.2f}x | {err:.1e} | {regs} |", flush=True)


def run_selection(old_nn, rounds: int) -> None:
    import torch
    from kernels import nn_inputs

    from runtime.kernels import nn_select as new_nn
    from transact.selection import nn_select_reference

    print("\n| selection (256 candidates) | old ms | new ms | speed-up | new == old | new == reference |")
    print("|---|---:|---:|---:|---|---|")
    for name, n_users, length, n_cand, k in SELECTION:
        seq, starts, lens, cand, users = nn_inputs(n_users, length, n_cand, seed=0)
        args = (seq, starts, lens, cand, users, k)
        run_new = functools.partial(new_nn.nn_select, *args, idx_dtype=torch.int32)
        run_old = functools.partial(old_nn.nn_select, *args, idx_dtype=torch.int32)
        (i_new, s_new), (i_old, s_old) = run_new(), run_old()
        same = torch.equal(i_new, i_old) and torch.equal(s_new, s_old)
        few = slice(0, 4)
        ri, rs = nn_select_reference(*(t.cpu() for t in (seq, starts, lens, cand[few], users[few])), k)
        ref_ok = torch.equal(i_new[few].cpu().long(), ri) and (s_new[few].cpu().double() - rs).abs().max() < 1e-4
        t_old, t_new = _alternate(run_old, run_new, rounds)
        print(f"| {name} | {t_old:.4f} | {t_new:.4f} | {t_old / t_new:.2f}x | {same} | {bool(ref_ok)} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="copy the kernels of a git revision (here, where git is)")
    p.add_argument("rev")
    r = sub.add_parser("run", help="time old against new on the GPU")
    r.add_argument("old", help="a folder written by `prepare`")
    r.add_argument("--only", choices=("transformer", "selection"))
    r.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if args.cmd == "prepare":
        print(prepare(args.rev))
        return
    import torch
    import triton

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, Triton {triton.__version__}; "
          f"old: {os.path.basename(os.path.normpath(args.old))}\n")  # fmt: skip
    if args.only != "selection":
        run_transformer(load_old_skut(args.old), args.rounds)
    if args.only != "transformer":
        run_selection(_load(args.old, "nn_select"), args.rounds)


if __name__ == "__main__":
    main()
