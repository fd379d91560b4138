"""CPU backend benchmark: ONNX Runtime on full.onnx against eager PyTorch, one request, same CPU.

The request of DESIGN §5: 1 user, ll 16,000, rt 100, imp 100, 256 candidates. Two ONNX Runtime rows: the
runtime's cpu backend as `transact serve` runs it (``runtime.Session``: the candidates in chunks of at most 16,
``--split`` at a time side by side of threads / split threads each; the request's conversion and checks included),
and one plain session on full.onnx with every thread. Both runtimes get the same number of threads, by default every
usable CPU (affinity and quota), as ``runtime.Session`` takes unless told otherwise; they take
turns in blocks of runs (``runtime.bench.take_turns``), and the median over many runs after a warm-up is
reported, with the ratio (the cpu backend's), and the ratio round by round (``runtime.bench.round_ratios``:
each round's blocks ran side by side, so a host that drifts moves both). glibc's malloc keeps freed memory in the
process (``runtime.bench.keep_freed_memory``; ``--system-malloc`` leaves it at its defaults), so eager PyTorch is
timed at its steadier, faster setting.

    python benchmarks/cpu_backend.py                      # random default model, exported to a temp folder
    python benchmarks/cpu_backend.py --bundle BUNDLE --threads 4 --runs 50 --json out.json
    python benchmarks/cpu_backend.py --threads 1,2,4,8,16 --runs 40   # each count in turn, then one table
    python benchmarks/cpu_backend.py --threads 2 --profile 10   # also ONNX Runtime's time per operator
    python benchmarks/cpu_backend.py --onnx-provider OpenVINOExecutionProvider   # with onnxruntime-openvino
    python benchmarks/cpu_backend.py --compile    # also torch.compile (inductor; needs a C++ compiler, ~30-60 s)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.bundle import CPU_PROVIDER, Bundle, load_bundle, onnx_providers  # noqa: E402
from export.manifest import tool_versions  # noqa: E402
from runtime.backends.cpu import usable_cpus  # noqa: E402
from runtime.bench import (  # noqa: E402
    bundle_or_random,
    cpu_name,
    eager_forward,
    keep_freed_memory,
    profile_node_times,
    request_batch,
    request_shape,
    round_ratios,
    take_turns,
    thread_counts,
)
from runtime.session import Request, Session  # noqa: E402
from transact.batch import Batch  # noqa: E402


def onnxruntime_profile(graph: bytes, feed: dict, threads: int, runs: int, provider: str = CPU_PROVIDER) -> dict:
    """Node time per request (ms) by operator type and by node, from ONNX Runtime's own profiler, and the
    number of runs counted. The profile covers every run of its session, so the session runs ``runs + 1``
    times and the first (warm-up) run is left out."""
    import onnxruntime as ort

    from runtime.backends.cpu import ort_options

    with tempfile.TemporaryDirectory(prefix="transact-ortprof-") as folder:
        opts = ort_options(threads)
        opts.enable_profiling = True
        opts.profile_file_prefix = str(Path(folder) / "ort")
        session = ort.InferenceSession(graph, opts, providers=onnx_providers(provider))
        for _ in range(runs + 1):
            session.run(None, feed)
        return profile_node_times(json.loads(Path(session.end_profiling()).read_text()))


class Compiled(NamedTuple):
    """torch.compile of the model (fast path off, as traced): the call to time, its first output, and the seconds
    that first call took (compiling)."""

    run: Callable[[], torch.Tensor]
    probabilities: np.ndarray
    compile_s: float


def compiled_run(model: torch.nn.Module, batch: Batch) -> Compiled:
    """Compile the model for ``batch``'s shapes and make its first call."""
    run = eager_forward(torch.compile(model, dynamic=False), batch, False)
    t = time.perf_counter()
    probs = run().numpy()
    return Compiled(run, probs, time.perf_counter() - t)


def measure(args: argparse.Namespace, threads: int, bundle: Bundle, model: torch.nn.Module, batch: Batch,
            reference: np.ndarray, compiled: Compiled | None, malloc: str) -> dict:  # fmt: skip
    """Time eager PyTorch, the cpu backend and one plain session at ``threads`` threads, taking turns; print the
    figures and return them. ``reference``: eager's probabilities (fast path off), which every runtime must match."""
    torch.set_num_threads(threads)
    feed = {k: v.numpy() for k, v in batch.named_tensors()}
    session = bundle.session("full", optimize=True, threads=threads, provider=args.onnx_provider)
    fns = {f"eager (fast path {'on' if fast else 'off'})": eager_forward(model, batch, fast) for fast in (True, False)}
    if compiled is not None:
        fns["torch.compile (inductor)"] = compiled.run
    probs = session.run(["probabilities"], feed)[0]
    backend = Session(args.bundle, device="cpu", threads=threads, split=args.split, max_chunk=args.max_chunk,
                      onnx_provider=args.onnx_provider)  # fmt: skip
    request = Request.from_batch(batch, 0)
    backend_name = f"cpu backend ({backend.backend.layout})"
    backend_probs = backend.score(request)
    fns[backend_name] = lambda: backend.score(request)
    fns["onnxruntime full.onnx"] = lambda: session.run(None, feed)
    results = take_turns(fns, args.runs, args.warmup)
    backend.close()

    med = {k: statistics.median(v) for k, v in results.items()}
    best_name = min((k for k in med if k.startswith("eager")), key=med.__getitem__)
    eager_best = med[best_name]
    ratio = eager_best / med[backend_name]
    rounds = round_ratios(results[best_name], results[backend_name])
    diff = float(np.abs(backend_probs - reference).max())
    info = {
        "date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "logical_cpus": os.cpu_count(),
        "usable_cpus": usable_cpus(), "threads": threads, "onnx_provider": args.onnx_provider, "malloc": malloc,
        "request": request_shape(args.candidates, args.ll),
        "runs": args.runs, "warmup": args.warmup, "median_ms": med,
        "p10_ms": {k: float(np.percentile(v, 10)) for k, v in results.items()},
        "p90_ms": {k: float(np.percentile(v, 90)) for k, v in results.items()},
        "faster_eager": best_name,
        "backend": {"name": backend_name, "split": backend.backend.split, "max_chunk": backend.backend.max_chunk,
                    "threads_per_chunk": backend.backend.threads_per_chunk,
                    "dense_stage": backend.backend.dense is not None},
        "speedup_vs_best_eager": ratio, "max_abs_diff_probabilities": diff,
        "speedup_per_round": {"median": statistics.median(rounds), "min": min(rounds), "max": max(rounds),
                              "rounds": rounds},
        "plain_session": {"speedup_vs_best_eager": eager_best / med["onnxruntime full.onnx"],
                          "max_abs_diff_probabilities": float(np.abs(probs - reference).max())},
        "versions": tool_versions(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }  # fmt: skip
    if compiled is not None:
        info["torch_compile"] = {
            "compile_s": compiled.compile_s,
            "max_abs_diff_probabilities": float(np.abs(compiled.probabilities - reference).max()),
            "onnxruntime_speedup": med["torch.compile (inductor)"] / med[backend_name],
        }  # fmt: skip
    print(f"{info['cpu']} ({info['logical_cpus']} logical CPUs), {threads} intra-op threads for both runtimes; "
          f"ONNX Runtime on {args.onnx_provider}")
    print(f"request: 1 user, ll {args.ll}, rt 100, imp 100, {args.candidates} candidates; "
          f"median of {args.runs} runs after {args.warmup} warm-up; malloc: {malloc}")  # fmt: skip
    for k, v in med.items():
        print(f"  {k:<26} median {v:9.2f} ms   p10 {info['p10_ms'][k]:9.2f}   p90 {info['p90_ms'][k]:9.2f}")
    print(f"  cpu backend speed-up over the faster eager setting: {ratio:.2f}x   (max |diff| {diff:.1e}); one plain "
          f"session: {info['plain_session']['speedup_vs_best_eager']:.2f}x")
    print(f"  the same, round by round (each round's blocks of runs side by side; drift moves both): median "
          f"{statistics.median(rounds):.2f}x, {min(rounds):.2f}-{max(rounds):.2f}x over {len(rounds)} rounds")
    if compiled is not None:
        tc = info["torch_compile"]
        print(f"  cpu backend speed-up over torch.compile: {tc['onnxruntime_speedup']:.2f}x   (its first call "
              f"{tc['compile_s']:.1f} s, compiling; max |diff| against eager {tc['max_abs_diff_probabilities']:.1e})")
    if args.profile:
        prof = onnxruntime_profile(bundle.graph_bytes("full.onnx"), feed, threads, args.profile, args.onnx_provider)
        info["onnxruntime_profile_ms"] = prof
        total = sum(prof["by_operator"].values())
        print(f"ONNX Runtime node time per request, {args.profile} profiled runs: {total:.1f} ms")
        for title, table in (("by operator", prof["by_operator"]), ("slowest nodes", prof["by_node"])):
            print(f"  {title}:")
            for name, ms in list(table.items())[:12]:
                print(f"    {name[:60]:<60} {ms:8.2f} ms")
    return info


def sweep_table(infos: list[dict]) -> str:
    """One line per thread count: the faster eager setting, the cpu backend, their ratio by medians and round by
    round."""
    lines = ["| threads | eager (faster setting), ms | cpu backend, ms | speed-up | round by round |",
             "|---:|---:|---:|---:|---:|"]  # fmt: skip
    for info in infos:
        med, rounds = info["median_ms"], info["speedup_per_round"]
        lines.append(f"| {info['threads']} | {med[info['faster_eager']]:.2f} | {med[info['backend']['name']]:.2f} | "
                     f"{info['speedup_vs_best_eager']:.2f}x | {rounds['median']:.2f}x "
                     f"({rounds['min']:.2f}-{rounds['max']:.2f}) |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, help="bundle to time (default: export a random default model)")
    ap.add_argument("--threads", type=thread_counts, default=[usable_cpus()],
                    help="intra-op threads for both (default: the usable CPUs, as the cpu backend takes); several, "
                         "comma-separated (1,2,4,8), time each in turn and end with a table")  # fmt: skip
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--candidates", type=int, default=256)
    ap.add_argument("--ll", type=int, default=16_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--split", type=int, default=None,
                    help="the cpu backend's chunks run at a time (default: runtime.backends.cpu.default_split)")
    ap.add_argument("--max-chunk", type=int, default=None,
                    help="most candidates per chunk (default: runtime.chunks.MAX_CHUNK)")
    ap.add_argument("--onnx-provider", default=CPU_PROVIDER,
                    help="ONNX Runtime execution provider (the CPU provider takes the nodes it does not)")
    ap.add_argument("--system-malloc", action="store_true",
                    help="leave glibc's malloc at its defaults (eager then pays page faults that vary by host)")
    ap.add_argument("--compile", action="store_true",
                    help="also time torch.compile(model) (inductor, static shapes, fast path off)")
    ap.add_argument("--json", type=Path, help="write the results here as JSON (several thread counts: "
                                              "{\"sweep\": [one result per count]})")  # fmt: skip
    ap.add_argument("--profile", type=int, default=0, metavar="RUNS",
                    help="also profile ONNX Runtime over RUNS runs: node time per operator and per node")  # fmt: skip
    args = ap.parse_args()

    malloc = "defaults" if args.system_malloc else (
        "glibc, freed memory kept" if keep_freed_memory() else "defaults (no glibc mallopt, or it refused)")
    torch.set_num_threads(args.threads[0])
    with bundle_or_random(args.bundle, args.seed) as args.bundle:
        bundle = load_bundle(args.bundle)
        model = bundle.build_model()
        batch = request_batch(bundle.config, args.candidates, args.ll, args.seed)
        reference = eager_forward(model, batch, False)().numpy()
        compiled = compiled_run(model, batch) if args.compile else None
        infos = []
        for i, threads in enumerate(args.threads):
            if i:
                print()
            infos.append(measure(args, threads, bundle, model, batch, reference, compiled, malloc))
    if len(infos) > 1:
        print("\n" + sweep_table(infos))
    if args.json:
        args.json.write_text(json.dumps(infos[0] if len(infos) == 1 else {"sweep": infos}, indent=2))


if __name__ == "__main__":
    main()
