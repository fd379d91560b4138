"""Where the time of ``nn_select`` goes: device time of each of its kernels, per selection shape.

    PYTHONPATH=. python benchmarks/nn_select_passes.py

Runs the default configuration (and a few others) of every selection row of DESIGN §5 under the
PyTorch profiler and prints the mean device time of each kernel per call.
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from runtime.kernels import nn_select as nn_mod  # noqa: E402
from transact.selection import nn_select_reference  # noqa: E402

ROWS = [("1 user", 1, 16000), ("64 users", 64, 16000), ("64 users S=100k", 64, 100000)]


def inputs(n_users: int, length: int, n_cand: int = 256):
    g = torch.Generator(device="cuda").manual_seed(0)
    seq = torch.randint(-127, 128, (n_users * length, 32), device="cuda", generator=g, dtype=torch.int8)
    starts = torch.arange(n_users, device="cuda") * length
    lens = torch.full((n_users,), length, device="cuda")
    users = torch.arange(n_users, device="cuda").repeat_interleave(n_cand // n_users)
    cand = torch.randn(n_cand, 32, device="cuda", generator=g).half()
    return seq, starts, lens, cand, users


def profile_once(args, cfg, calls: int = 20) -> dict[str, float]:
    for _ in range(3):
        nn_mod.nn_select(*args, 64, config=cfg)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            nn_mod.nn_select(*args, 64, config=cfg)
        torch.cuda.synchronize()
    out: dict[str, float] = {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)
        if t:
            out[ev.key[:40]] = t / calls
    return out


def main() -> None:
    for name, n_users, length in ROWS:
        args = inputs(n_users, length)
        dev = torch.device("cuda")
        auto = nn_mod.choose_config(256, n_users, n_users * length, 64, dev)
        cfgs = [auto]
        for bn in (16, 32, 64) if n_users == 1 else (16,):
            for sp in (32, 64, 128):
                cfgs.append(nn_mod.choose_config(256, n_users, n_users * length, 64, dev, block_n=bn, splits=sp))
        for bn in (16, 64) if n_users == 1 else ():
            cfg = nn_mod.choose_config(256, n_users, n_users * length, 64, dev, block_n=bn, splits=64)
            cfgs.append(nn_mod.NNSelectConfig(bn, 64, 64, 4 if bn == 16 else 8, cfg.groups_per_split, tile=128))
        seq, starts, lens, cand, users = args
        ref_idx, _ = nn_select_reference(seq.cpu(), starts.cpu(), lens.cpu(), cand[:8].cpu(), users[:8].cpu(), 64)
        for cfg in cfgs:
            idx, _ = nn_mod.nn_select(*args, 64, config=cfg)
            agree = (idx[:8].cpu() == ref_idx).float().mean().item()
            if agree < 0.99:
                print(f"{name}: {cfg} WRONG (agreement {agree:.3f} with the reference)", flush=True)
                continue
            times = profile_once(args, cfg)
            total = sum(times.values())
            parts = ", ".join(f"{k} {v:.1f}" for k, v in sorted(times.items(), key=lambda kv: -kv[1]))
            print(f"{name}: {cfg}\n    total {total:.1f} us: {parts}", flush=True)


if __name__ == "__main__":
    main()
