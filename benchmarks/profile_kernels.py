"""Run one kernel workload a few times, for a profiler to capture (see gpu_profile.sh).

    PYTHONPATH=. python benchmarks/profile_kernels.py WORKLOAD [--launches N]

Workloads (the shapes of benchmarks/kernels.py and skut_sweep.py, default configurations):
    skut_v2      transformer, B=256 S=192 d=64, 1 head, causal, 25% key padding
    skut_v2_b16  the same with B=16
    skut_v1      transformer, B=256 S=100 d=96, 2 heads, not causal
    nn_1user     selection, 1 user, S=16,000, 256 candidates, top-64
    nn_64users   selection, 64 users of S=16,000, 4 candidates each, top-64
    nn_64users_100k  the same with S=100,000
Each launch is a plain launch (no CUDA graph), so a profiler sees every kernel; the first launch
compiles. Prints the kernel configuration used.
"""

from __future__ import annotations

import argparse
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))
sys.path.append(_HERE)

import torch  # noqa: E402
from kernels import make_encoder, nn_inputs, transformer_inputs  # noqa: E402

from runtime.kernels import nn_select as nn_mod  # noqa: E402
from runtime.kernels import skut as sk  # noqa: E402

SKUT = {  # name: batch, seq, d_model, heads, ffn, causal
    "skut_v2": (256, 192, 64, 1, 32, True),
    "skut_v2_b16": (16, 192, 64, 1, 32, True),
    "skut_v1": (256, 100, 96, 2, 32, False),
}
NN = {"nn_1user": (1, 16_000, 256, 64), "nn_64users": (64, 16_000, 256, 64), "nn_64users_100k": (64, 100_000, 256, 64)}


def workload(name: str):
    """A no-argument callable that launches the workload's kernels once."""
    if name in SKUT:
        bsz, s, d, h, f, causal = SKUT[name]
        packed = sk.pack_encoder_weights(make_encoder(d, h, f, 2), torch.float16)
        x, kpm = transformer_inputs(bsz, s, d, seed=0)
        out = torch.empty(bsz, s, d, dtype=torch.float16, device="cuda")
        ws = torch.empty(sk.workspace_numel(bsz, s, packed), dtype=torch.float16, device="cuda")
        print(name, sk.choose_config(s, packed, bsz, causal, x.device))
        return lambda: sk.skut_forward(x, packed, kpm, causal, None, out=out, workspace=ws)
    if name in NN:
        n_users, length, n_cand, k = NN[name]
        seq, starts, lens, cand, users = nn_inputs(n_users, length, n_cand, seed=0)
        print(name, nn_mod.choose_config(n_cand, n_users, seq.shape[0], k, seq.device))
        return lambda: nn_mod.nn_select(seq, starts, lens, cand, users, k, idx_dtype=torch.int32)
    raise SystemExit(f"unknown workload {name!r}; choose from {sorted(SKUT) + sorted(NN)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workload")
    ap.add_argument("--launches", type=int, default=4)
    args = ap.parse_args()
    run = workload(args.workload)
    for _ in range(args.launches):
        run()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
