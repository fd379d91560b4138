"""Where the time of ``nn_select`` goes: device time of each of its kernels, per selection shape.

    PYTHONPATH=. python benchmarks/nn_select_passes.py [--runtime]

Runs the default configuration (and a few others) of every selection row of DESIGN §5 under the
PyTorch profiler and prints the mean device time of each kernel per call. Each configuration is first
checked against the float64 reference. ``--runtime`` does the same for the three selections of the
runtime's request instead (ll 16,000 rows with k = 96, rt / imp 100 rows with k = 32, 256 candidates),
including the one-pass kernel for short sequences at several block sizes.
"""

from __future__ import annotations

import functools
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))
sys.path.append(_HERE)

import torch  # noqa: E402
from kernels import check_nn, kernel_times, nn_inputs  # noqa: E402

from runtime.kernels import nn_select as nn_mod  # noqa: E402

ROWS = [("1 user", 1, 16000), ("64 users", 64, 16000), ("64 users S=100k", 64, 100000)]
N_CAND, K = 256, 64


def configs(n_users: int, total: int) -> list[nn_mod.NNSelectConfig]:
    dev = torch.device("cuda")
    cfgs = [nn_mod.choose_config(N_CAND, n_users, total, K, dev)]
    for bn in (16, 32, 64) if n_users == 1 else (16,):
        for sp in (32, 64, 128):
            cfgs.append(nn_mod.choose_config(N_CAND, n_users, total, K, dev, block_n=bn, splits=sp))
    for bn in (16, 64) if n_users == 1 else ():
        gps = nn_mod.choose_config(N_CAND, n_users, total, K, dev, block_n=bn, splits=64).groups_per_split
        cfgs.append(nn_mod.NNSelectConfig(bn, K, 64, 4 if bn == 16 else 8, gps, tile=128))
    return cfgs


def show(name: str, label: str, fn) -> None:
    times = kernel_times(fn)
    parts = ", ".join(f"{k[:40]} {ms * 1e3:.1f}" for k, ms, _ in times)
    print(f"{name}: {label}\n    total {sum(t[1] for t in times) * 1e3:.1f} us: {parts}", flush=True)


def runtime_shapes() -> None:
    dev = torch.device("cuda")
    ll = nn_inputs(1, 16000, N_CAND, seed=0)
    for cfg in [nn_mod.choose_config(N_CAND, 1, 16000, 96, dev)] + [
        nn_mod.NNSelectConfig(bn, 128, sp, 8 if bn * 128 > 4096 else 4, gps, tile=128)
        for bn, sp, gps in ((64, 32, 16), (32, 64, 8), (32, 32, 8))
    ]:
        if check_nn(ll, 96, cfg):
            show("ll 16000 k=96", str(cfg), functools.partial(nn_mod.nn_select, *ll, 96, config=cfg))
        else:
            print(f"ll: {cfg} WRONG result, skipped", flush=True)
    rt = nn_inputs(1, 100, N_CAND, seed=1)
    show("rt 100 k=32", "two passes, default", functools.partial(nn_mod.nn_select, *rt, 32))
    for warps in (1, 2, 4, 8):
        idx = torch.empty((N_CAND, 32), dtype=torch.int64, device=dev)
        sc = torch.empty((N_CAND, 32), device=dev)
        fn = functools.partial(nn_mod._nn_select_short, *rt, 32, idx, sc, 100, num_warps=warps)
        fn()
        ok = torch.equal(idx, nn_mod.nn_select(*rt, 32)[0])
        show("rt 100 k=32", f"one pass, {warps} warps{'' if ok else ' (differs from the two passes)'}", fn)


def main() -> None:
    if "--runtime" in sys.argv:
        runtime_shapes()
        return
    for name, n_users, length in ROWS:
        args = nn_inputs(n_users, length, N_CAND, seed=0)
        for cfg in configs(n_users, n_users * length):
            if not check_nn(args, K, cfg):
                print(f"{name}: {cfg} WRONG result, skipped", flush=True)
                continue
            times = kernel_times(functools.partial(nn_mod.nn_select, *args, K, config=cfg))
            parts = ", ".join(f"{k[:40]} {ms * 1e3:.1f}" for k, ms, _ in times)
            print(f"{name}: {cfg}\n    total {sum(t[1] for t in times) * 1e3:.1f} us: {parts}", flush=True)


if __name__ == "__main__":
    main()
