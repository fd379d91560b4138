"""CPU throughput benchmark: requests per second with every core busy, the cpu backend against eager PyTorch.

`cpu_backend.py` times one request at a time, each runtime with all its threads on it. A CPU serving fleet runs
several requests at once instead (`transact serve --workers P --threads T`), so what a machine delivers is its
throughput with all cores busy. Here ``--procs`` worker processes with ``--threads`` threads each (default: one
per usable CPU, one thread each) all run the same runtime at the same time, block by block: each block starts
together in every worker (a barrier), each worker runs ``--block`` requests of DESIGN §5's shape (1 user, ll
16,000, rt 100, imp 100, 256 candidates) back to back, and the block's throughput is its requests over the time
from the first worker's start to the last one's end. The runtimes take turns block by block (eager with the
transformer fast path on, off, then the cpu backend), so a host that drifts moves them alike; the ratio of the
backend's throughput to the faster eager setting's is reported by medians and round by round.

    python benchmarks/cpu_throughput.py                          # every usable CPU, one thread per worker
    python benchmarks/cpu_throughput.py --procs 8 --threads 2 --rounds 6 --json out.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import queue
import statistics
import sys
import time
import traceback
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runtime.backends.cpu import usable_cpus  # noqa: E402
from runtime.bench import (  # noqa: E402
    bundle_or_random,
    cpu_name,
    eager_forward,
    keep_freed_memory,
    request_batch,
    request_shape,
    round_ratios,
)

EAGER = ("eager (fast path on)", "eager (fast path off)")
BACKEND = "cpu backend"
RUNTIMES = (*EAGER, BACKEND)
BARRIER_TIMEOUT_S = 900.0  # a worker that died leaves the others waiting; this bounds the wait


def worker(index: int, args: argparse.Namespace, barrier: Barrier, results: Queue) -> None:
    """One worker process: both runtimes on ``args.threads`` threads, then ``args.rounds`` rounds in which every
    runtime runs one block of ``args.block`` requests, started together with the other workers. Puts one record per
    block on ``results`` (and the backend's largest difference from eager first), or ("error", text) and stops."""
    try:
        import torch

        from export.bundle import load_bundle
        from runtime.session import Request, Session

        keep_freed_memory()
        torch.set_num_threads(args.threads)
        bundle = load_bundle(args.bundle)
        model = bundle.build_model()
        batch = request_batch(bundle.config, args.candidates, args.ll, args.seed + index)
        backend = Session(args.bundle, device="cpu", threads=args.threads, split=args.split)
        request = Request.from_batch(batch, 0)

        fns = {EAGER[0]: eager_forward(model, batch, True), EAGER[1]: eager_forward(model, batch, False),
               BACKEND: lambda: backend.score(request)}  # fmt: skip
        diff = float(np.abs(backend.score(request) - fns[EAGER[1]]().numpy()).max())
        results.put(("diff", index, diff, backend.backend.layout))
        for fn in fns.values():
            for _ in range(args.warmup):
                fn()
        for rnd in range(args.rounds):
            for name, fn in fns.items():
                barrier.wait(BARRIER_TIMEOUT_S)
                start, times = time.monotonic(), []
                for _ in range(args.block):
                    t = time.perf_counter()
                    fn()
                    times.append((time.perf_counter() - t) * 1e3)
                results.put(("block", index, rnd, name, start, time.monotonic(), times))
        backend.close()
    except Exception:  # reported to the parent, which stops the run
        barrier.abort()
        results.put(("error", index, traceback.format_exc()))


def collect(procs: list[mp.Process], results: Queue, expected: int) -> list[tuple]:
    """The workers' records; SystemExit naming the first worker that failed or died."""
    records = []
    while len(records) < expected:
        try:
            rec = results.get(timeout=5.0)
        except queue.Empty:  # nothing for a while: check that every worker still lives
            dead = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if dead:
                raise SystemExit(f"cpu_throughput: worker {dead[0][0]} died (exit code {dead[0][1]})") from None
            continue
        if rec[0] == "error":
            raise SystemExit(f"cpu_throughput: worker {rec[1]} failed:\n{rec[2]}")
        records.append(rec)
    return records


def summarise(records: list[tuple], args: argparse.Namespace) -> dict:
    """Requests per second per runtime and round (the round's requests over its first start to its last end),
    medians, the backend's ratio over the faster eager setting by medians and round by round, latencies."""
    blocks: dict[str, dict[int, list[tuple]]] = {name: {} for name in RUNTIMES}
    for _, _, rnd, name, start, end, times in (r for r in records if r[0] == "block"):
        blocks[name].setdefault(rnd, []).append((start, end, times))
    per_round = {name: [] for name in RUNTIMES}
    latency = {name: [] for name in RUNTIMES}
    for name, rounds in blocks.items():
        for rnd in sorted(rounds):
            parts = rounds[rnd]
            wall = max(e for _, e, _ in parts) - min(s for s, _, _ in parts)
            per_round[name].append(sum(len(t) for _, _, t in parts) / wall)
            latency[name] += [ms for _, _, t in parts for ms in t]
    med = {name: statistics.median(v) for name, v in per_round.items()}
    best = max(EAGER, key=med.__getitem__)
    rounds = round_ratios(per_round[BACKEND], per_round[best], block=1)
    diffs = [r[2] for r in records if r[0] == "diff"]
    layouts = sorted({r[3] for r in records if r[0] == "diff"})
    return {
        "date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "usable_cpus": usable_cpus(),
        "procs": args.procs, "threads_per_proc": args.threads, "backend_layout": layouts,
        "request": request_shape(args.candidates, args.ll),
        "rounds": args.rounds, "block": args.block, "warmup": args.warmup,
        "requests_per_s": med, "requests_per_s_per_round": per_round, "faster_eager": best,
        "latency_ms": {name: {"min": min(v), "median": statistics.median(v), "max": max(v)}
                       for name, v in latency.items()},
        "speedup_vs_best_eager": med[BACKEND] / med[best],
        "speedup_per_round": {"median": statistics.median(rounds), "min": min(rounds), "max": max(rounds),
                              "rounds": rounds},
        "max_abs_diff_probabilities": max(diffs),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, help="bundle to time (default: export a random default model)")
    ap.add_argument("--procs", type=int, default=None, help="worker processes (default: usable CPUs // threads)")
    ap.add_argument("--threads", type=int, default=1, help="threads per worker, for both runtimes (default 1)")
    ap.add_argument("--split", type=int, default=None, help="the cpu backend's chunks at a time per worker")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--block", type=int, default=3, help="requests per worker per runtime per round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed requests per worker and runtime first")
    ap.add_argument("--candidates", type=int, default=256)
    ap.add_argument("--ll", type=int, default=16_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the results here as JSON")
    args = ap.parse_args()
    for name in ("threads", "rounds", "block"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.warmup < 0:
        ap.error(f"--warmup must be at least 0, got {args.warmup}")
    args.procs = args.procs or max(1, usable_cpus() // args.threads)
    if args.procs < 1:
        ap.error(f"--procs must be at least 1, got {args.procs}")

    with bundle_or_random(args.bundle, args.seed) as args.bundle:
        ctx = mp.get_context("spawn")  # fresh interpreters: no thread pool of this process carried into a fork
        barrier, results = ctx.Barrier(args.procs), ctx.Queue()
        procs = [ctx.Process(target=worker, args=(i, args, barrier, results), daemon=True) for i in range(args.procs)]
        for p in procs:
            p.start()
        try:
            records = collect(procs, results, args.procs * (1 + args.rounds * len(RUNTIMES)))
        finally:
            for p in procs:
                p.join(timeout=60)
                if p.is_alive():
                    p.terminate()
    info = summarise(records, args)

    print(f"{info['cpu']} ({info['usable_cpus']} usable CPUs): {args.procs} worker processes x {args.threads} "
          f"thread{'s' if args.threads > 1 else ''}, all running the same runtime at once; cpu backend per worker "
          f"{', '.join(info['backend_layout'])}")  # fmt: skip
    print(f"request: 1 user, ll {args.ll}, rt 100, imp 100, {args.candidates} candidates; {args.rounds} rounds of "
          f"{args.block} requests per worker and runtime after {args.warmup} warm-up")  # fmt: skip
    for name in RUNTIMES:
        print(f"  {name:<22} {info['requests_per_s'][name]:8.2f} requests/s   (median latency "
              f"{info['latency_ms'][name]['median']:9.2f} ms)")
    rounds = info["speedup_per_round"]
    print(f"  cpu backend throughput over the faster eager setting: {info['speedup_vs_best_eager']:.2f}x   (max |diff| "
          f"{info['max_abs_diff_probabilities']:.1e}); round by round: median {rounds['median']:.2f}x, "
          f"{rounds['min']:.2f}-{rounds['max']:.2f}x over {len(rounds['rounds'])} rounds")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
