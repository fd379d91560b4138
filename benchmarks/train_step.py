"""Training throughput: one optimiser step (forward, BCE + Next Action Loss, backward, AdamW) of the ranking
model on synthetic data, on the CPU or a GPU, and the host time to build and copy each batch.

    python benchmarks/train_step.py                          # device auto, the default ModelConfig
    python benchmarks/train_step.py --device cpu --threads 2 --model demo
    python benchmarks/train_step.py --device cuda --batch-requests 128 --json out.json

The data: ``make_synthetic`` users with lifelong sequences up to ``--ll`` actions, rt / imp up to 100,
``--candidates`` per request. Batches are built beforehand and cycled, so the step time holds no data work;
the data row times building one batch on the host and copying it to the device, which a training loop
pays too unless it overlaps it. Both are medians after a warm-up, the two taking turns.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.manifest import tool_versions  # noqa: E402
from runtime.bench import cpu_name, latency_stats, take_turns  # noqa: E402
from transact.cli import DEMO_MODEL  # noqa: E402
from transact.data.synthetic import make_synthetic  # noqa: E402
from transact.model import RankingModel  # noqa: E402
from transact.train import TrainConfig, model_config_for, resolve_device, train_step  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--model", choices=["default", "demo"], default="default",
                    help="default: the production ModelConfig (selection 96/32/32/32); demo: the demo's smaller one")
    ap.add_argument("--batch-requests", type=int, default=32)
    ap.add_argument("--candidates", type=int, default=16)
    ap.add_argument("--users", type=int, default=300)
    ap.add_argument("--ll", type=int, default=1000, help="longest lifelong sequence of the synthetic users")
    ap.add_argument("--batches", type=int, default=8, help="distinct batches cycled through")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    on_gpu = device.type == "cuda"
    data = make_synthetic(seed=args.seed, num_users=args.users, candidates_per_request=args.candidates,
                          long_term_actions=(args.ll // 2, args.ll), max_ll=args.ll)  # fmt: skip
    if data.num_requests < args.batches * args.batch_requests:
        ap.error(f"{data.num_requests} requests from {args.users} users: fewer than --batches x --batch-requests")
    overrides = DEMO_MODEL if args.model == "demo" else {}
    torch.manual_seed(args.seed)
    model = RankingModel(model_config_for(TrainConfig(model=overrides), data)).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rows = [list(range(i * args.batch_requests, (i + 1) * args.batch_requests)) for i in range(args.batches)]
    sets = [data.batch(r) for r in rows]
    on_device = itertools.cycle([b.to(device) for b in sets])
    to_build = itertools.cycle(rows)

    def sync() -> None:
        if on_gpu:
            torch.cuda.synchronize(device)

    def step() -> None:
        train_step(model, opt, next(on_device), TrainConfig().grad_clip)
        sync()

    def build() -> None:
        data.batch(next(to_build)).to(device)
        sync()

    times = take_turns({"train step": step, "batch build + copy": build}, args.runs, args.warmup)
    stats = {name: latency_stats(ms) for name, ms in times.items()}
    candidates = sum(int(b.cand_item.shape[0]) for b in sets) / len(sets)
    step_s = stats["train step"]["p50_ms"] / 1e3
    info = {
        "date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name(device) if on_gpu else cpu_name(),
        "threads": torch.get_num_threads(), "logical_cpus": os.cpu_count(), "model": args.model,
        "batch_requests": args.batch_requests, "candidates_per_batch": candidates, "ll": args.ll,
        "parameters": sum(p.numel() for p in model.parameters()), "ms": stats,
        "requests_per_s": args.batch_requests / step_s, "candidates_per_s": candidates / step_s,
        "versions": tool_versions(),
    }  # fmt: skip
    print(f"{info['device']} ({device}); {torch.get_num_threads()} CPU threads; model {args.model} "
          f"({info['parameters']:,} parameters); {args.batch_requests} requests x {args.candidates} candidates per "
          f"batch, ll up to {args.ll}; median of {args.runs} after {args.warmup} warm-up, taking turns")  # fmt: skip
    print("| work | p50 ms | p99 ms |\n|---|---:|---:|")
    for name, s in stats.items():
        print(f"| {name} | {s['p50_ms']:.2f} | {s['p99_ms']:.2f} |")
    print(f"train steps: {info['requests_per_s']:.1f} requests/s, {info['candidates_per_s']:.0f} candidates/s")
    if args.json:
        args.json.write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
