"""End-to-end latency of one request in process: the hybrid (cuda) backend vs the eager PyTorch model on
the same GPU (DESIGN §5), plus cold vs warm start of a cuda Session.

The request: 1 user, ll 16,000, rt 100, imp 100, 256 candidates; default ModelConfig, random weights.
Rows (p50 / p99 over ``--runs`` runs after ``--warmup`` runs):

* hybrid, dense in ONNX Runtime (CPU) — the DESIGN's split, numpy in -> numpy out
* hybrid, dense in torch on the GPU (same CUDA graph) — numpy in -> numpy out
* hybrid without CUDA graphs (dense on the GPU)
* eager fp32 / eager fp16 autocast — the batch already on the GPU, and end to end (copy in, copy out)
* on the CPU: ONNX Runtime (full.onnx) and eager fp32 (the DESIGN's CPU target: ORT >= 2x eager)

Start-up: a fresh process builds ``Session(device="cuda")`` twice with one TRITON_CACHE_DIR: first with the
folder empty (cold: every kernel compiles), then again (warm: compiled kernels come from the cache).

    python benchmarks/runtime.py [--bundle DIR] [--runs 300] [--skip-startup] [--timeline]

``--timeline`` also runs the request without syncs, a CUDA event behind each step, and prints when the
host had issued each step and when the GPU had done it: whether stage B waits for the host or the GPU.

Prints a table; writes $OUT/runtime.json when $OUT is set.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "benchmarks"))

from kernels import kernel_times  # noqa: E402  (benchmarks/kernels.py, beside this script)

from runtime.batching import plan_batch  # noqa: E402
from runtime.bench import random_bundle  # noqa: E402
from runtime.session import Request, Session  # noqa: E402
from transact.batch import Batch  # noqa: E402
from transact.data.random_batch import random_batch  # noqa: E402
from transact.model import transformer_fastpath  # noqa: E402

SHAPE = {"candidates": 256, "ll": 16000, "rt": 100, "imp": 100}
REQUEST_BUCKET = (1, 256, 16000)  # (request rows, candidates, ll width): the bucket of the timed request


def timeit(fn, runs: int, warmup: int, sync: bool) -> dict:
    for _ in range(warmup):
        fn()
    if sync:
        torch.cuda.synchronize()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    ms = np.asarray(times) * 1000
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(ms.mean()), "runs": runs}  # fmt: skip


def _spin(stop) -> None:
    x = 0
    while not stop.is_set():
        x += 1


def batch_times(session: Session, users: list[int], runs: int) -> dict[str, dict]:
    """p50 / p99 of one batch of ``u`` distinct users (256 candidates each) for each ``u``: alone, and
    beside a Python thread that never yields the interpreter (the most a server's HTTP threads can cost a
    batch: each time the batch's thread releases the GIL, it waits up to the switch interval for it)."""
    import threading

    out = {}
    for u in users:
        b = random_batch(session.config, u, SHAPE["candidates"] * u, ll=SHAPE["ll"], rt=SHAPE["rt"],
                         imp=SHAPE["imp"], seed=u)  # fmt: skip
        run = functools.partial(session.run, [Request.from_batch(b, i) for i in range(u)], validate=False)
        r = timeit(run, runs, 5, False)
        stop = threading.Event()
        t = threading.Thread(target=_spin, args=(stop,), daemon=True)
        old = sys.getswitchinterval()
        sys.setswitchinterval(0.0005)  # `transact serve`'s default
        t.start()
        try:
            r["busy_p50_ms"] = timeit(run, runs, 3, False)["p50_ms"]
        finally:
            stop.set()
            t.join()
            sys.setswitchinterval(old)
        out[str(u)] = r
    return out


def stage_breakdown(session: Session, req: Request, runs: int) -> dict[str, float]:
    """Median ms of each stage of one request through the cuda backend (each stage synchronised)."""
    be = session.backend
    times: dict[str, list[float]] = {}

    def stage(name, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        torch.cuda.synchronize()
        times.setdefault(name, []).append((time.perf_counter() - t0) * 1000)
        return out

    for _ in range(runs):
        plan = stage("plan the batch (host)", plan_batch, [req])
        b, arena = be.staging_for(plan)
        stage("fill part one of the arena (host)", be._fill_first, arena, b, plan)
        stage("the rest, overlapped (uploads, graphs, fills of parts two and three, copy back)", be._outputs_for,
              arena, b, plan)  # fmt: skip
    # The parts of the overlapped stage, each on its own (synchronised).
    graph_a, graph_ll, graph_b, _, _ = be.graphs[b]
    for _ in range(runs):
        stage("  graph A (upload of part one, V1, rt / imp selection)", graph_a.replay)
        stage("  fill part two: the ll codes (host)", be._fill_ll, arena, b, plan)
        stage("  graph ll (uploads of part two and of the candidates' copy, ll selection)", graph_ll.replay)
        stage("  fill part three: actions, surfaces, dense features (host)", be._fill_rest, arena, b, plan)
        stage("  graph B (upload of part three, V2, dense, copy back)", graph_b.replay)
    # The same host fills into pageable numpy arrays: what writing into pinned memory costs on this host
    # (e.g. pinned pages on another NUMA node) apart from the Python around the copies.
    pageable = SimpleNamespace(np={k: np.zeros_like(v) for k, v in arena.np.items()})
    for _ in range(runs):
        stage("  fill part one into pageable memory (host, for comparison)", be._fill_first, pageable, b, plan)
        stage("  fill part two into pageable memory (host, for comparison)", be._fill_ll, pageable, b, plan)
    return {k: float(np.median(v)) for k, v in times.items()}


def timeline(session: Session, req: Request, runs: int) -> list[tuple[str, float, float]]:
    """One request through the cuda backend, unsynchronised, with a CUDA event behind each step: when the
    host had issued the step and when the GPU had done it (ms from the start, medians over ``runs``).
    If graph B starts on the GPU well after graph A and the ll selection are done, the host is the
    critical path; if it starts as soon as they are, the GPU is. Each mark costs the host an event
    record, so the host's times run later than without them."""
    be = session.backend
    plan = plan_batch([req])
    b, arena = be.staging_for(plan)
    saved = be.graphs[b]
    graph_a, graph_ll, graph_b = saved[:3]
    events = [torch.cuda.Event(enable_timing=True) for _ in range(16)]
    marks: list[tuple[str, float, torch.cuda.Event]] = []

    def mark(name: str) -> None:
        ev = events[len(marks)]
        ev.record()
        marks.append((name, time.perf_counter(), ev))

    def marked(name, fn, before=False):
        """``fn`` with a mark after it (and, with ``before``, one named "<name> starts" before it)."""
        def call(*args):
            if before:
                mark(name + " starts")
            out = fn(*args)
            mark(name)
            return out
        return call

    be._fill_ll = marked("fill part two (host)", be._fill_ll)
    be._fill_rest = marked("fill part three (host)", be._fill_rest)
    be.graphs[b] = (SimpleNamespace(replay=marked("graph A", graph_a.replay)),
                    SimpleNamespace(replay=marked("graph ll", graph_ll.replay)),
                    SimpleNamespace(replay=marked("graph B", graph_b.replay, before=True)), *saved[3:])  # fmt: skip
    rows: dict[str, list[tuple[float, float]]] = {}
    try:
        for _ in range(runs):
            marks.clear()
            torch.cuda.synchronize()
            mark("start")
            be._fill_first(arena, b, plan)
            mark("fill part one (host)")
            be._outputs_for(arena, b, plan)  # graph B ends with the copy back
            torch.cuda.synchronize()
            t_end = time.perf_counter()
            t0, e0 = marks[0][1], marks[0][2]
            for name, t, ev in marks[1:]:
                rows.setdefault(name, []).append(((t - t0) * 1000, e0.elapsed_time(ev)))
            rows.setdefault("host has the result", []).append(((t_end - t0) * 1000, float("nan")))
    finally:
        del be._fill_ll, be._fill_rest
        be.graphs[b] = saved
    return [(n, float(np.median([h for h, _ in v])), float(np.median([g for _, g in v]))) for n, v in rows.items()]


def host_profile(session: Session, req: Request, runs: int, top: int = 22) -> str:
    """Where the host's time of ``Session.run`` goes (cProfile, own time per function; the profiler
    inflates Python calls, so read it for proportions)."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(runs):
        session.run([req], validate=False)
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def gpu_kernel_profile(session: Session, req: Request, top: int = 15) -> list[tuple[str, float, int]]:
    """Device time per request of the heaviest kernels of the GPU part (run without graphs)."""
    be = session.backend
    plan = plan_batch([req])
    b, arena = be.staging_for(plan)
    be._fill(arena, b, plan)
    arena.upload()
    with torch.no_grad():
        rows = kernel_times(lambda: be._compute(arena, b), calls=10)
    return [("TOTAL", sum(r[1] for r in rows), sum(r[2] for r in rows))] + rows[:top]


def startup_child(bundle: str, cache: str) -> None:
    """In a fresh process: build a cuda Session and print its start-up timings as JSON."""
    t0 = time.perf_counter()
    s = Session(bundle, device="cuda", triton_cache_dir=cache, warmup_shapes=[REQUEST_BUCKET])
    total = time.perf_counter() - t0
    print(json.dumps({"total_s": total, **s.startup, **{k: v for k, v in s.backend.stats.items()}}))


def measure_startup(bundle: Path) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        for label in ("cold", "warm"):
            cmd = [sys.executable, __file__, "--startup-child", str(bundle), "--cache", cache]
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1800)
            if res.returncode != 0:
                raise SystemExit(f"start-up child failed:\n{res.stderr[-3000:]}")
            out[label] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, help="a bundle with the default config (default: export one now)")
    p.add_argument("--runs", type=int, default=300)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--cpu-runs", type=int, default=20)
    p.add_argument("--skip-startup", action="store_true")
    p.add_argument("--skip-cpu", action="store_true")
    p.add_argument("--host-profile", action="store_true", help="print a cProfile of the host side of run()")
    p.add_argument("--timeline", action="store_true",
                   help="when the host issues each step of a request and when the GPU finishes it")
    p.add_argument("--batch-users", default="",
                   help="also time batches of these many distinct users (256 candidates each), e.g. 1,4,8,16")
    p.add_argument("--startup-child", help=argparse.SUPPRESS)
    p.add_argument("--cache", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.startup_child:
        startup_child(args.startup_child, args.cache)
        return
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/runtime.py needs a CUDA GPU")

    tmp = tempfile.TemporaryDirectory()
    bundle = args.bundle or random_bundle(Path(tmp.name) / "bundle")
    results: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "shape": SHAPE, "rows": {}}
    rows = results["rows"]

    hybrid = Session(bundle, device="cuda", dense_on="cpu", warmup_shapes=[REQUEST_BUCKET])
    cfg = hybrid.config
    b = random_batch(cfg, 1, SHAPE["candidates"], ll=SHAPE["ll"], rt=SHAPE["rt"], imp=SHAPE["imp"], seed=0)
    req = Request.from_batch(b, 0)
    plan = plan_batch([req])

    rows["hybrid, dense in ONNX Runtime (CPU)"] = timeit(lambda: hybrid.run([req], validate=False), args.runs,
                                                         args.warmup, sync=False)  # fmt: skip
    dense_gpu = Session(bundle, device="cuda", dense_on="gpu", warmup_shapes=[REQUEST_BUCKET])
    rows["hybrid, dense on GPU"] = timeit(lambda: dense_gpu.run([req], validate=False), args.runs, args.warmup, False)
    no_graph = Session(bundle, device="cuda", dense_on="gpu", cuda_graphs=False, warmup_shapes=[REQUEST_BUCKET])
    rows["hybrid, dense on GPU, no CUDA graphs"] = timeit(lambda: no_graph.run([req], validate=False), args.runs,
                                                          args.warmup, False)  # fmt: skip
    got = dense_gpu.score(req)
    results["stages_dense_gpu_ms"] = stage_breakdown(dense_gpu, req, args.runs)
    results["gpu_kernels_ms"] = gpu_kernel_profile(no_graph, req)
    if args.host_profile:
        print(host_profile(dense_gpu, req, args.runs))
    if args.timeline:
        results["timeline_ms"] = timeline(dense_gpu, req, args.runs)
    if args.batch_users:
        users = [int(u) for u in args.batch_users.split(",")]
        results["batches"] = batch_times(dense_gpu, users, max(20, args.runs // 4))

    model = hybrid.bundle.verified.build_model().cuda()
    named = {k: torch.from_numpy(v) for k, v in plan.padded_inputs().items()}
    cpu_batch = Batch.from_named(named)
    gpu_batch = cpu_batch.to("cuda")
    with torch.no_grad(), transformer_fastpath(True):
        want = model(gpu_batch).cpu().numpy()
        rows["eager fp32, inputs on GPU"] = timeit(lambda: model(gpu_batch), args.runs, args.warmup, True)
        rows["eager fp32, end to end"] = timeit(lambda: model(cpu_batch.to("cuda")).cpu(),
                                                args.runs, args.warmup, True)  # fmt: skip
        with torch.autocast("cuda", dtype=torch.float16):
            rows["eager fp16 autocast, inputs on GPU"] = timeit(lambda: model(gpu_batch), args.runs, args.warmup, True)
            rows["eager fp16 autocast, end to end"] = timeit(
                lambda: model(cpu_batch.to("cuda")).float().cpu(), args.runs, args.warmup, True)
    results["max_abs_diff_hybrid_vs_eager"] = float(np.abs(got - want).max())

    if not args.skip_cpu:
        cpu = Session(bundle, device="cpu")
        rows["CPU: ONNX Runtime full.onnx"] = timeit(lambda: cpu.run([req], validate=False), args.cpu_runs, 3, False)
        cpu_model = hybrid.bundle.verified.build_model()
        with torch.no_grad():
            rows["CPU: eager fp32"] = timeit(lambda: cpu_model(cpu_batch), args.cpu_runs, 3, False)

    base = rows["eager fp32, inputs on GPU"]["p50_ms"]
    print(f"\nruntime: 1 user, ll {SHAPE['ll']}, rt {SHAPE['rt']}, imp {SHAPE['imp']}, {SHAPE['candidates']} "
          f"candidates, default ModelConfig, on {results['device']} (torch {torch.__version__})\n")  # fmt: skip
    print("| path | p50 ms | p99 ms | speed-up vs eager fp32 (p50) |")
    print("|---|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {base / r['p50_ms']:.1f}x |")
    print("\n| stage of one request, hybrid with dense on GPU (each synchronised) | median ms |\n|---|---:|")
    for name, ms in results["stages_dense_gpu_ms"].items():
        print(f"| {name} | {ms:.3f} |")
    if "timeline_ms" in results:
        print("\n| step of one request (no syncs; medians) | host has issued it, ms | GPU has done it, ms |")
        print("|---|---:|---:|")
        for name, host_ms, gpu_ms in results["timeline_ms"]:
            gpu = f"{gpu_ms:.3f}" if gpu_ms == gpu_ms else "—"  # NaN: a host-only step
            print(f"| {name} | {host_ms:.3f} | {gpu} |")
    print("\n| kernel of the GPU part (no graph), per request | device ms | launches |\n|---|---:|---:|")
    for name, ms, n in results["gpu_kernels_ms"]:
        print(f"| {name} | {ms:.3f} | {n} |")
    print(f"\nmax |hybrid - eager| on probabilities: {results['max_abs_diff_hybrid_vs_eager']:.2e}")
    best = min(rows["hybrid, dense in ONNX Runtime (CPU)"]["p50_ms"], rows["hybrid, dense on GPU"]["p50_ms"])
    print(f"targets: p50 <= 0.5 ms -> best hybrid {best:.3f} ms; >= 10x eager -> {base / best:.1f}x")
    if "CPU: ONNX Runtime full.onnx" in rows:
        ratio = rows["CPU: eager fp32"]["p50_ms"] / rows["CPU: ONNX Runtime full.onnx"]["p50_ms"]
        print(f"CPU: ONNX Runtime is {ratio:.1f}x eager (target >= 2x)")
    if "batches" in results:
        print("\n| batch of distinct users (256 candidates each), dense on GPU | p50 ms | p99 ms | p50 ms per user "
              "| p50 ms beside a busy Python thread |\n|---:|---:|---:|---:|---:|")  # fmt: skip
        for u, r in results["batches"].items():
            per_user = r["p50_ms"] / int(u)
            print(f"| {u} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {per_user:.3f} | {r['busy_p50_ms']:.3f} |")
        print(f"backend stats: {dense_gpu.backend.stats}")
    startup = None if args.skip_startup else measure_startup(bundle)
    if startup:
        results["startup"] = startup
        print("\n| start-up (cuda Session) | total s | warm-up s | buckets | graphs |")
        print("|---|---:|---:|---:|---:|")
        for label, s in startup.items():
            print(f"| {label} Triton cache | {s['total_s']:.1f} | {s['warmup_s']:.1f} | {s.get('buckets_warmed', 0)} "
                  f"| {s.get('graphs_captured', 0)} |")  # fmt: skip
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "runtime.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
