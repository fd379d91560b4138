"""Tile sweep of the fused transformer kernel at the runtime's two shapes (and any you add).

    PYTHONPATH=. python benchmarks/skut_sweep.py [V1 | V2 ...] [64/32/4 ...]
        (substrings of the shape names and of the configurations' labels; default all)

For each shape (the V2 module: B=256 sequences of 192 tokens, d=64, 1 head, causal; the V1 module:
B=256 of 100 tokens, d=96, 2 heads, not causal; both 2 layers, FFN 32, 25% random key padding), every
configuration below is first checked against the float64 PyTorch reference (relative norm error, the
larger of the rows' and the pooled outputs'), then timed replayed from a CUDA graph (median ms), and the
timed batch's own output checked too. Split configurations (one program per sequence and query tile)
run on the causal shapes only. Prints one table; the fastest correct configuration per shape is marked.
With TRANSACT_KERNELS_WGMMA=1 the kernel compiles with Triton's Hopper wgmma path allowed (see
runtime/kernels/__init__.py).
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
from kernels import bench_graph, check_skut, make_encoder, transformer_inputs  # noqa: E402

import runtime.kernels as kernels_pkg  # noqa: E402
from runtime.kernels import skut as sk  # noqa: E402

SHAPES = [
    # name, batch, seq, d_model, heads, ffn, causal
    ("V2 B=256 S=192 d=64", 256, 192, 64, 1, 32, True),
    ("V1 B=256 S=100 d=96 h=2", 256, 100, 96, 2, 32, False),
    ("V2 B=16 S=192 d=64", 16, 192, 64, 1, 32, True),
    ("V2 B=2048 S=192 d=64", 2048, 192, 64, 1, 32, True),  # DESIGN §5's other two transformer rows
    ("V2 B=256 S=2048 d=64", 256, 2048, 64, 1, 32, True),
    ("V2 B=256 S=512 d=64", 256, 512, 64, 1, 32, True),  # where a deeper K/V pipeline starts to pay
    ("V2 B=256 S=1024 d=64", 256, 1024, 64, 1, 32, True),
]
CONFIGS = sorted(
    set(sk.SWEEP_CONFIGS)
    | {
        sk.SkutConfig(128, 32, 16),
        sk.SkutConfig(128, 16, 16),
        sk.SkutConfig(256, 32, 16),
        sk.SkutConfig(64, 32, 4),
        sk.SkutConfig(32, 32, 8),
        sk.SkutConfig(64, 16, 16),
        sk.SkutConfig(128, 64, 8),
        sk.SkutConfig(128, 16, 8),
        sk.SkutConfig(128, 32, 4),
        sk.SkutConfig(64, 64, 4),
        sk.SkutConfig(128, 32, 8, num_stages=1),
        sk.SkutConfig(64, 32, 4, num_stages=1),
        sk.SkutConfig(128, 32, 8, num_stages=3),
        # one program per (sequence, query tile): causal shapes only
        sk.SkutConfig(64, 64, 4, split=True),
        sk.SkutConfig(64, 32, 4, split=True),
        sk.SkutConfig(32, 32, 4, split=True),
        sk.SkutConfig(32, 16, 4, split=True),
        sk.SkutConfig(16, 16, 4, split=True),
        sk.SkutConfig(128, 32, 8, split=True),
        sk.SkutConfig(64, 64, 4, num_stages=1),
        sk.SkutConfig(64, 64, 4, num_stages=3),
        sk.SkutConfig(64, 64, 4, num_stages=4),
        sk.SkutConfig(64, 32, 4, num_stages=1, split=True),
        sk.SkutConfig(64, 32, 4, num_stages=3, split=True),
        # registers capped so that more programs share an SM (ptxas spills the rest)
        *(sk.SkutConfig(bm, bn, w, max_regs=r) for bm, bn, w in ((64, 64, 4), (64, 32, 4), (32, 32, 4))
          for r in (168, 128)),
        sk.SkutConfig(32, 32, 2, max_regs=128),
        sk.SkutConfig(16, 32, 1, max_regs=128),
        sk.SkutConfig(64, 32, 4, split=True, max_regs=128),
    },
    key=lambda c: (c.split, c.block_m, c.block_n, c.num_warps, c.num_stages, c.max_regs or 256),
)


def _label(cfg: sk.SkutConfig) -> str:
    tiles = f"{cfg.block_m}/{cfg.block_n}/{cfg.num_warps}"
    tiles += f" stages {cfg.num_stages}" if cfg.num_stages != 2 else ""
    tiles += f" regs {cfg.max_regs}" if cfg.max_regs else ""
    return tiles + (" split" if cfg.split else "")


def main() -> None:
    # Optional arguments: substrings of the shape names (e.g. "V1") and of the configuration labels
    # (an argument with a "/", e.g. "128/32/8" also matches "128/32/8 stages 3").
    only = [a for a in sys.argv[1:] if "/" not in a]
    cfgs = [c for c in CONFIGS if not any("/" in a for a in sys.argv[1:])
            or any(a in _label(c) for a in sys.argv[1:] if "/" in a)]  # fmt: skip
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    for name, bsz, s, d, h, f, causal in SHAPES:
        if only and not any(o in name for o in only):
            continue
        enc = make_encoder(d, h, f, 2)
        packed = sk.pack_encoder_weights(enc, torch.float16)
        x, kpm = transformer_inputs(bsz, s, d, seed=0)
        default = sk.choose_config(s, packed, bsz, causal, x.device)
        ref = sk.skut_reference(enc, x.float(), kpm, causal)  # of the timed batch itself, float64
        rows = []
        for cfg in cfgs:
            if cfg.split and not causal:
                continue
            try:
                err = max(check_skut(enc, packed, cfg, 8, s, causal),
                          check_skut(enc, packed, cfg, 8, s, causal, "max_valid"))  # fmt: skip
                o = torch.full((bsz, s, d), float("nan"), dtype=torch.float16, device="cuda")
                run = functools.partial(sk.skut_forward, x, packed, kpm, causal, None, config=cfg, out=o)
                ms = bench_graph([run])
                err = max(err, ((o.double() - ref).norm() / ref.norm()).nan_to_num(float("inf")).item())
                info = {k: v for k, v in sk.last_launch_info.items() if k != "config"}
                rows.append((cfg, err, ms, info))
            except Exception as exc:  # a configuration that does not compile is reported, not used
                rows.append((cfg, float("inf"), float("inf"), {"error": f"{type(exc).__name__}: {exc}"[:120]}))
        ok = [r for r in rows if r[1] < 5e-3]
        best = min(ok, key=lambda r: r[2])[0] if ok else None
        mode = "wgmma allowed" if kernels_pkg.ALLOW_WGMMA else "mma.sync"
        print(f"\n{name} (default {default}; {mode})\n| block_m/block_n/warps | rel err | ms | registers, spills |")
        print("|---|---:|---:|---|")
        for cfg, err, ms, info in rows:
            mark = " **best**" if cfg == best else (" (default)" if cfg == default else "")
            print(f"| {_label(cfg)}{mark} | {err:.1e} | {ms:.4f} | {info} |", flush=True)


if __name__ == "__main__":
    main()
