"""Where one request's time goes in the cpu backend, stage by stage.

The cpu backend (runtime.backends.cpu) runs a request in stages: checks and batching, the request stage (the work of
the user alone), the chunks of candidates side by side, and dense.onnx on groups of finished chunks. This script
times every run of the backend's ONNX Runtime sessions from the outside (each session's ``run`` wrapped, nothing
else changed) over many requests of DESIGN §5's shape (1 user, ll 16,000, rt 100, imp 100, 256 candidates) and
prints, per thread count, medians of:

- *before*: from the call to the first chunk's start (checks, batching, the request stage, ``request ms`` of it);
- *chunk phase*: from the first chunk's start to the last one's end, and in it the *idle* share of the slots' time
  (a slot waiting for its first chunk, or for the queue to empty while others still compute; only chunk runs count
  as busy, so a dense group run inside the phase counts as idle too), the *start spread*
  (how long after the first chunk the last slot started its own) and the *end spread* (how long the first slot to
  run out of chunks waited for the last);
- *after*: from the last chunk's end to the call's return (the dense groups still to run, the join).

On a shared many-core host the chunk phase's idle share shows how unevenly the slots finish (benchmarks/RESULTS.md,
2026-12-06: 15-24 % at 8 to 16 threads on the H100 machine's host, ~1 % on two quiet vCPUs). The start spread shows
the slots starting one after another: each needs Python's interpreter lock to start its run (sixty-fifth session:
~0.2 ms a slot there, 3.3-3.8 ms from the first slot to the sixteenth).

    python benchmarks/cpu_timeline.py --threads 8 --runs 30
    python benchmarks/cpu_timeline.py --bundle B --threads 2,8,16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.bundle import load_bundle  # noqa: E402
from export.manifest import tool_versions  # noqa: E402
from runtime.backends.cpu import CpuBackend, usable_cpus  # noqa: E402
from runtime.bench import bundle_or_random, cpu_name, request_batch, thread_counts  # noqa: E402
from runtime.session import Request, Session  # noqa: E402

CHUNK_KINDS = ("whole", "staged")  # the sessions whose runs are chunks of candidates


class Run(NamedTuple):
    """One run of one of the backend's sessions: which (``whole``, ``staged``, ``dense``, ``request``), on which
    slot (the calling thread; for a run started with ``run_async``, its session), when (``time.perf_counter``
    seconds, a started run from its start to its callback) and over how many candidates."""

    kind: str
    thread: int
    start: float
    end: float
    candidates: int


def record_runs(backend: CpuBackend, runs: list[Run]) -> None:
    """Wrap each session ``backend`` runs so that every run appends a ``Run`` to ``runs``."""
    lock = threading.Lock()

    def timed(kind: str, run, count):  # noqa: ANN001, ANN202
        def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            t0 = time.perf_counter()
            out = run(*args, **kwargs)
            with lock:
                runs.append(Run(kind, threading.get_ident(), t0, time.perf_counter(), count(*args)))
            return out
        return wrapper

    def started(kind: str, start):  # noqa: ANN001, ANN202
        def wrapper(session, feed, callback, data):  # noqa: ANN001, ANN202
            t0 = time.perf_counter()

            def done(*args):  # noqa: ANN002, ANN202
                with lock:
                    runs.append(Run(kind, id(session), t0, time.perf_counter(), len(feed["cand_request"])))
                return callback(*args)

            return start(session, feed, done, data)
        return wrapper

    for kind in ("whole", "staged", "dense"):
        slots = getattr(backend, kind)
        if slots is not None:
            slots.run = timed(kind, slots.run, lambda feed: len(feed["cand_request"]))
            if hasattr(slots, "start"):  # runs started with run_async: their slot is their session
                slots.start = started(kind, slots.start)
    if backend.request_session is not None:
        session = backend.request_session
        session.run = timed("request", session.run, lambda names, feed: 0)


def timeline(runs: list[Run], start: float, end: float) -> dict[str, float]:
    """One request's stages (milliseconds) from the runs it made between ``start`` and ``end``."""
    chunks = [r for r in runs if r.kind in CHUNK_KINDS]
    if not chunks:
        raise ValueError("the request ran no chunk")
    first, last = min(r.start for r in chunks), max(r.end for r in chunks)
    slots: dict[int, list[Run]] = {}
    for r in chunks:
        slots.setdefault(r.thread, []).append(r)
    busy = sum(r.end - r.start for r in chunks)
    phase = last - first
    dense = [r for r in runs if r.kind == "dense"]
    return {
        "wall_ms": (end - start) * 1e3,
        "before_ms": (first - start) * 1e3,
        "request_ms": sum((r.end - r.start) * 1e3 for r in runs if r.kind == "request"),
        "chunk_phase_ms": phase * 1e3,
        "idle_share": 1 - busy / (len(slots) * phase) if phase > 0 else 0.0,
        "start_spread_ms": (max(min(r.start for r in rs) for rs in slots.values()) - first) * 1e3,
        "end_spread_ms": (last - min(max(r.end for r in rs) for rs in slots.values())) * 1e3,
        "after_ms": (end - last) * 1e3,
        "chunks": len(chunks),
        "slots": len(slots),
        "dense_runs": len(dense),
        "dense_candidates": sum(r.candidates for r in dense),
    }


def measure(bundle: Path, request: Request, threads: int, runs: int, warmup: int) -> dict:
    """Medians of ``timeline`` over ``runs`` requests on a backend of ``threads`` threads."""
    session = Session(bundle, device="cpu", threads=threads)
    backend = session.backend
    assert isinstance(backend, CpuBackend)
    record: list[Run] = []
    record_runs(backend, record)
    try:
        for _ in range(warmup):
            session.score(request)
        lines = []
        for _ in range(runs):
            record.clear()
            t0 = time.perf_counter()
            session.score(request)
            lines.append(timeline(record, t0, time.perf_counter()))
    finally:
        session.close()
    return {"threads": threads, "layout": backend.layout, "runs": runs,
            "median": {k: statistics.median(line[k] for line in lines) for k in lines[0]}}  # fmt: skip


def table(results: list[dict]) -> str:
    lines = ["| threads | layout | request, ms | before (request stage), ms | chunk phase, ms | idle share | "
             "start spread, ms | end spread, ms | after, ms | chunks / dense runs |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for res in results:
        m = res["median"]
        lines.append(f"| {res['threads']} | {res['layout']} | {m['wall_ms']:.2f} | {m['before_ms']:.2f} "
                     f"({m['request_ms']:.2f}) | {m['chunk_phase_ms']:.2f} | {100 * m['idle_share']:.1f} % | "
                     f"{m['start_spread_ms']:.2f} | {m['end_spread_ms']:.2f} | {m['after_ms']:.2f} | "
                     f"{m['chunks']:.0f} / {m['dense_runs']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, help="bundle to time (default: export a random default model)")
    ap.add_argument("--threads", type=thread_counts, default=[usable_cpus()],
                    help="the backend's threads (default: the usable CPUs); several, comma-separated")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--candidates", type=int, default=256)
    ap.add_argument("--ll", type=int, default=16_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the results here as JSON")
    args = ap.parse_args()
    if args.runs < 1 or args.warmup < 0:
        ap.error("--runs must be at least 1 and --warmup at least 0")
    with bundle_or_random(args.bundle, args.seed) as path:
        config = load_bundle(path).config
        batch = request_batch(config, args.candidates, args.ll, args.seed)
        request = Request.from_batch(batch, 0)
        results = [measure(path, request, t, args.runs, args.warmup) for t in args.threads]
    print(f"{cpu_name()}, {usable_cpus()} usable CPUs; one request of {args.candidates} candidates, ll {args.ll}; "
          f"medians of {args.runs} requests\n")
    print(table(results))
    if args.json:
        info = {"cpu": cpu_name(), "usable_cpus": usable_cpus(), "candidates": args.candidates, "ll": args.ll,
                "date": time.strftime("%Y-%m-%d"), "versions": tool_versions(), "results": results}  # fmt: skip
        args.json.write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
