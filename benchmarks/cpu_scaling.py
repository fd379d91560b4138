"""How the cpu backend's chunks slow each other down on a many-core host.

The cpu backend (runtime.backends.cpu) runs a request's candidates in chunks side by side, one thread per CPU,
as concurrent calls of one ONNX Runtime session. On a 16-core Xeon a chunk of 16 candidates took ~15.8 ms alone,
yet the request of 16 such chunks ~35.5 ms (benchmarks/RESULTS.md, 2026-12-05, a session per chunk then): side by
side, the chunks ran ~2.2x slower. This script measures that. K threads each run one chunk of the DESIGN §5
request (1 user, ll 16,000, rt 100, imp 100) at the same time, round after round, for each K asked, on one shared
session as the backend does (``--separate-sessions``: a session each); it prints the wall time per round, the
slowdown against one chunk alone, and ONNX Runtime's node time per operator at each K (profiled on a session
each, whose profiles keep the runs apart), so that the operators that slow down stand out. Two probes tell the
host's limits apart: chained 256 x 256 matrix products that stay in a core's L2 slow down when the cores share
execution units or clock (SMT siblings, an all-core clock below the one-core turbo); adds streaming over 16 MB
slow down when they share memory bandwidth.

    python benchmarks/cpu_scaling.py                          # random default model; K = 1, 2, 4, ... CPUs
    python benchmarks/cpu_scaling.py --bundle B --chunks 1 8 16 --pin --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Protocol

import numpy as np
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.bundle import load_bundle  # noqa: E402
from export.manifest import tool_versions  # noqa: E402
from runtime.backends.cpu import CANDIDATE_INPUTS, ort_options, usable_cpus  # noqa: E402
from runtime.bench import bundle_or_random, cpu_name, profile_node_times, request_batch  # noqa: E402

PROBE_WIDTH = 256  # compute probe: (512, 256) @ (256, 256), eight times; 0.5 MB of activations + 0.25 MB weight
PROBE_PRODUCTS = 8
STREAM_SHAPE = (4096, 1024)  # stream probe: four adds over 16 MB
STREAM_ADDS = 4


class Runnable(Protocol):
    def run(self, output_names: list[str] | None, feed: dict) -> list: ...


def rounds(sessions: list[Runnable], feeds: list[dict], runs: int, pin: bool = False) -> list[float]:
    """Milliseconds per round: in each round every session runs its feed once, all at the same time (one thread
    each, as the backend's pool does), and the round ends when the last one finishes. ``pin`` puts the i-th
    session's thread on the i-th usable CPU."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if pin and not cpus:
        raise RuntimeError("--pin needs os.sched_setaffinity (Linux)")
    start, end = threading.Barrier(len(sessions) + 1), threading.Barrier(len(sessions) + 1)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            if pin:
                os.sched_setaffinity(0, {cpus[i % len(cpus)]})  # 0 = the calling thread on Linux
            for _ in range(runs):
                start.wait()
                sessions[i].run(None, feeds[i])
                end.wait()
        except threading.BrokenBarrierError:
            pass
        except BaseException as e:  # reported in the main thread
            errors.append(e)
            start.abort()
            end.abort()

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(len(sessions))]
    for t in threads:
        t.start()
    walls = []
    try:
        for _ in range(runs):
            t0 = time.perf_counter()
            start.wait()
            end.wait()
            walls.append((time.perf_counter() - t0) * 1e3)
    except threading.BrokenBarrierError:
        pass
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return walls


def side_by_side(graph: bytes, feeds: list[dict], runs: int, warmup: int, pin: bool, profile: bool,
                 shared: bool = True) -> dict:  # fmt: skip
    """``len(feeds)`` single-threaded runs of ``graph`` at the same time, on one ``shared`` session or a session
    each: the median wall time per round and (``profile``, in a second pass on a session each, since profiling
    slows every node down) the mean node time per operator, averaged over the sessions."""
    import onnxruntime as ort

    def sessions(folder: str | None, one: bool) -> list:
        made = []
        for i in range(1 if one else len(feeds)):
            opts = ort_options(1)
            if folder is not None:
                opts.enable_profiling = True
                opts.profile_file_prefix = str(Path(folder) / f"s{i}")
            made.append(ort.InferenceSession(graph, opts, providers=["CPUExecutionProvider"]))
        made = made * len(feeds) if one else made
        rounds(made, feeds, warmup, pin)
        return made

    wall = statistics.median(rounds(sessions(None, shared), feeds, runs, pin))
    out: dict = {"chunks": len(feeds), "shared_session": shared, "wall_ms": wall}
    if profile:
        with tempfile.TemporaryDirectory(prefix="transact-scaling-") as folder:
            profiled = sessions(folder, False)
            rounds(profiled, feeds, runs, pin)
            by_op: dict[str, float] = {}
            for s in profiled:
                times = profile_node_times(json.loads(Path(s.end_profiling()).read_text()), skip=warmup)
                for op, ms in times["by_operator"].items():
                    by_op[op] = by_op.get(op, 0.0) + ms / len(profiled)
        out["node_ms"] = sum(by_op.values())
        out["by_operator"] = dict(sorted(by_op.items(), key=lambda kv: -kv[1]))
    return out


def _chain(name: str, op: str, count: int, x: np.ndarray, w: np.ndarray) -> bytes:
    """y = op(...op(op(x, w), w)..., w), ``count`` nodes."""
    info = helper.make_tensor_value_info
    nodes = [helper.make_node(op, ["x" if i == 0 else f"y{i - 1}", "w"], [f"y{i}"]) for i in range(count)]
    inputs, outputs = [info("x", TensorProto.FLOAT, list(x.shape))], [info(f"y{count - 1}", TensorProto.FLOAT, None)]
    graph = helper.make_graph(nodes, name, inputs, outputs, [numpy_helper.from_array(w, "w")])
    # An IR version that every supported ONNX Runtime reads (onnx's newest default, 14, is beyond onnxruntime 1.30's).
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10).SerializeToString()


def probes(seed: int = 0) -> dict[str, tuple[bytes, dict, np.ndarray]]:
    """The two probe graphs with their input and the weight they use: "compute" = x @ w, eight times over;
    "stream" = x + w, four times over."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((PROBE_WIDTH, PROBE_WIDTH)) * PROBE_WIDTH**-0.5).astype(np.float32)
    x = rng.standard_normal((2 * PROBE_WIDTH, PROBE_WIDTH)).astype(np.float32)
    ws, xs = (rng.standard_normal(STREAM_SHAPE).astype(np.float32) for _ in range(2))
    return {"compute": (_chain("compute", "MatMul", PROBE_PRODUCTS, x, w), {"x": x}, w),
            "stream": (_chain("stream", "Add", STREAM_ADDS, xs, ws), {"x": xs}, ws)}  # fmt: skip


def chunk_feeds(feed: dict[str, np.ndarray], k: int, per: int) -> list[dict]:
    """``k`` chunks of ``per`` candidates each (the first ``k * per`` candidates, in order), the user's inputs
    whole, as the backend cuts a request."""
    return [{n: (v[i * per:(i + 1) * per] if n in CANDIDATE_INPUTS else v) for n, v in feed.items()}
            for i in range(k)]  # fmt: skip


def default_counts(cpus: int) -> list[int]:
    """1, 2, 4, ... up to ``cpus``, and ``cpus`` itself."""
    counts = [1]
    while counts[-1] * 2 < cpus:
        counts.append(counts[-1] * 2)
    return counts + ([cpus] if cpus > 1 else [])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, help="bundle to time (default: export a random default model)")
    ap.add_argument("--chunks", type=int, nargs="+", help="chunks side by side, K (default: 1, 2, 4, ... usable CPUs)")
    ap.add_argument("--candidates", type=int, default=16, help="candidates per chunk (16 = 256 over 16 chunks)")
    ap.add_argument("--ll", type=int, default=16_000)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--pin", action="store_true", help="pin each chunk's thread to its own CPU")
    ap.add_argument("--separate-sessions", action="store_true",
                    help="a session per chunk (as the backend had before 2026-12-05) instead of one shared")
    ap.add_argument("--no-profile", action="store_true", help="skip the per-operator node times")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the results here as JSON")
    args = ap.parse_args()
    counts = args.chunks or default_counts(usable_cpus())
    if min(counts) < 1 or args.runs < 1 or args.warmup < 1 or args.candidates < 1:
        ap.error("--chunks, --runs, --warmup and --candidates must be >= 1")

    with bundle_or_random(args.bundle, args.seed) as args.bundle:
        bundle = load_bundle(args.bundle)
        graph = bundle.graph_bytes("full.onnx")
        batch = request_batch(bundle.config, args.candidates * max(counts), args.ll, args.seed)
        feed = {k: v.numpy() for k, v in batch.named_tensors()}

    info: dict = {
        "date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "usable_cpus": usable_cpus(), "pinned": args.pin,
        "shared_session": not args.separate_sessions,
        "request": {"users": 1, "ll": args.ll, "rt": 100, "imp": 100, "candidates_per_chunk": args.candidates},
        "runs": args.runs, "warmup": args.warmup, "versions": tool_versions(), "model": [], "probes": {},
    }  # fmt: skip
    where = "a session each" if args.separate_sessions else "one shared session"
    print(f"{info['cpu']} ({info['usable_cpus']} usable CPUs){', threads pinned' if args.pin else ''}; K one-thread "
          f"chunks side by side on {where}, {args.candidates} candidates each, median of {args.runs} rounds")
    for k in counts:
        row = side_by_side(graph, chunk_feeds(feed, k, args.candidates), args.runs, args.warmup, args.pin,
                           not args.no_profile, shared=not args.separate_sessions)  # fmt: skip
        row["slowdown"] = row["wall_ms"] / info["model"][0]["wall_ms"] if info["model"] else 1.0
        info["model"].append(row)
        node = f", profiled node time per chunk {row['node_ms']:8.2f} ms" if "node_ms" in row else ""
        print(f"  K = {k:3d}: {row['wall_ms']:8.2f} ms per round ({row['slowdown']:.2f}x one alone){node}", flush=True)
    if not args.no_profile:
        rows = info["model"]
        print("  profiled node time per chunk and operator (ms, mean over runs and chunks):")
        print(f"    {'operator':<24}" + "".join(f"{'K = ' + str(r['chunks']):>10}" for r in rows))
        for op in list(rows[0]["by_operator"])[:16]:
            print(f"    {op:<24}" + "".join(f"{r['by_operator'].get(op, 0.0):10.3f}" for r in rows))
    for name, (g, probe_feed, _) in probes(args.seed).items():
        walls = [side_by_side(g, [probe_feed] * k, args.runs, args.warmup, args.pin, False)["wall_ms"] for k in counts]
        info["probes"][name] = dict(zip(map(str, counts), walls, strict=True))
        print(f"  probe {name:<8}" + "".join(f"  K = {k}: {w:.2f} ms ({w / walls[0]:.2f}x)"
                                           for k, w in zip(counts, walls, strict=True)))  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
