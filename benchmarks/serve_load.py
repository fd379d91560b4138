"""Bounded load test of `transact serve` on loopback.

Starts the server as a subprocess (or uses ``--url``), then for each concurrency level keeps that many
clients sending binary-tensor infer requests (distinct users, random among a pre-built pool) for
``--duration`` seconds. Reports throughput in candidates scored per second, request latency p50 / p99,
the error count, and from the server's /metrics the mean requests per batch and model time per batch (what
is not model time is queueing, decoding and HTTP); prints a Markdown table and writes JSON to
$OUT/serve_load.json when $OUT is set.

    python benchmarks/serve_load.py BUNDLE --device cpu --concurrency 1,4,16 --duration 10
    python benchmarks/serve_load.py --build-bundle /tmp/b   # export a random-weights bundle first
    python benchmarks/serve_load.py BUNDLE --workers 1,2,4 --client-procs 4   # servers of 1, 2, 4 processes
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runtime.backends.warmup import synthetic_request  # noqa: E402
from runtime.protocol import encode_infer_request  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundle: Path, device: str, args: argparse.Namespace, workers: int = 1) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "runtime.commands", str(bundle), "--port", str(port), "--device", device,
           "--max-batch", str(args.max_batch), "--max-queue-delay-ms", str(args.max_queue_delay_ms),
           "--log-level", "warning"]  # fmt: skip
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.switch_interval_ms:
        cmd += ["--switch-interval-ms", str(args.switch_interval_ms)]
    if workers > 1:
        cmd += ["--workers", str(workers)]
    proc = subprocess.Popen(cmd, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + args.start_timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/v2/health/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit("server did not become ready in time")


def model_config(url: str, model: str):
    from transact.config import ModelConfig

    meta = httpx.get(f"{url}/v2/models/{model}", timeout=10).json()
    dims = {i["name"]: i["shape"] for i in meta["inputs"]}
    par = meta["parameters"]
    heads = par["heads"]
    return ModelConfig(
        user_dense_dim=dims["user_dense"][0], item_dense_dim=dims["item_dense"][1], num_surfaces=par["num_surfaces"],
        action_names=par["action_names"], heads=heads, positive_actions=[], score_weights=[1.0] * len(heads),
        loss_weights=[1.0] * len(heads), quant_scale=par["quant_scale"], max_ll=par["max_ll"], max_rt=par["max_rt"],
        max_imp=par["max_imp"],
    )  # fmt: skip


def server_totals(url: str) -> dict[str, float]:
    """Sums and counts of the server's batch histograms (from /metrics), to split a level's latency into
    model time per batch and the rest (queueing, decoding, HTTP)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name in ("transact_batch_compute_seconds", "transact_batch_size"):
            for sample in family.samples:
                if sample.name.endswith(("_sum", "_count")):
                    out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def batch_stats(before: dict[str, float], after: dict[str, float]) -> dict:
    """Mean requests per batch and mean model ms per batch between two ``server_totals``."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    batches = d.get("transact_batch_compute_seconds_count", 0.0)
    if batches <= 0:
        return {"batches": 0, "mean_batch": None, "model_ms_per_batch": None}
    return {"batches": int(batches), "mean_batch": round(d["transact_batch_size_sum"] / batches, 2),
            "model_ms_per_batch": round(1000 * d["transact_batch_compute_seconds_sum"] / batches, 2)}  # fmt: skip


def _closed_loop(url: str, model: str, bodies: list[tuple[bytes, dict]], clients: int, stop_at: float,
                 seed: int = 0) -> tuple[list[float], int]:  # fmt: skip
    """``clients`` threads, each posting a random body and waiting for the answer, until ``stop_at``
    (``time.perf_counter()``); returns the successful requests' latencies (s) and the failure count."""
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    client = httpx.Client(base_url=url, timeout=60, limits=limits)

    def worker(i: int) -> None:
        rng = np.random.default_rng(seed * 1000 + i)
        mine, bad = [], 0
        while time.perf_counter() < stop_at:
            body, headers = bodies[int(rng.integers(len(bodies)))]
            t0 = time.perf_counter()
            try:
                r = client.post(f"/v2/models/{model}/infer", content=body, headers=headers)
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok:
                mine.append(time.perf_counter() - t0)
            else:
                bad += 1
        with lock:
            lat.extend(mine)
            errors[0] += bad

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(stop_at - time.perf_counter() + 120)
    client.close()
    return lat, errors[0]


def request_lengths(config, args: argparse.Namespace) -> dict[str, int]:  # noqa: ANN001
    """Sequence lengths of the test requests: the asked ones, capped at the model's maxima."""
    return {s: min(getattr(args, s), getattr(config, f"max_{s}")) for s in ("ll", "rt", "imp")}


def make_bodies(config, args: argparse.Namespace) -> list[tuple[bytes, dict]]:  # noqa: ANN001
    """The pool of request bodies for the served model's ``config`` (the same in every process: fixed seeds)."""
    lengths = request_lengths(config, args)
    return [encode_infer_request(synthetic_request(config, args.candidates, lengths, seed=i).tensors())
            for i in range(args.users)]  # fmt: skip


def _client_process(url: str, model: str, args: argparse.Namespace, clients: int, start_at: float,
                    duration: float, seed: int, conn) -> None:  # fmt: skip
    """One load-generator process: its share of the clients, from wall-clock ``start_at``; the result goes
    back as JSON."""
    bodies = make_bodies(model_config(url, model), args)
    time.sleep(max(0.0, start_at - time.time()))
    lat, bad = _closed_loop(url, model, bodies, clients, time.perf_counter() + duration, seed)
    conn.send_bytes(json.dumps({"lat": lat, "errors": bad}).encode())
    conn.close()


def run_level(url: str, model: str, bodies: list[tuple[bytes, dict]], args: argparse.Namespace, concurrency: int,
              duration: float) -> dict:  # fmt: skip
    """``concurrency`` clients in a closed loop for ``duration`` seconds, their threads spread over
    ``--client-procs`` processes (one Python process caps how many requests it can send)."""
    procs = max(1, min(args.client_procs, concurrency))
    t0 = time.perf_counter()
    if procs == 1:
        lat, errors = _closed_loop(url, model, bodies, concurrency, t0 + duration)
    else:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        start_at = time.time() + 5.0 + 0.05 * args.users  # after every process has built its bodies
        share = [concurrency // procs + (i < concurrency % procs) for i in range(procs)]
        pipes, workers = [], []
        for i, n in enumerate(share):
            mine, theirs = ctx.Pipe(duplex=False)
            w = ctx.Process(target=_client_process, args=(url, model, args, n, start_at, duration, i + 1, theirs))
            w.start()
            theirs.close()
            pipes.append(mine)
            workers.append(w)
        lat, errors = [], 0
        for mine, w in zip(pipes, workers, strict=True):
            res = json.loads(mine.recv_bytes())
            lat += res["lat"]
            errors += res["errors"]
            w.join(60)
        t0 = time.perf_counter() - duration  # the processes ran ``duration`` from their common start
    wall = time.perf_counter() - t0
    ms = np.asarray(lat) * 1000 if lat else np.zeros(1)
    return {
        "concurrency": concurrency, "requests": len(lat), "seconds": round(wall, 2),
        "requests_per_s": round(len(lat) / wall, 1), "candidates_per_s": round(len(lat) * args.candidates / wall),
        "p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "errors": errors, "client_procs": procs,
    }  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", nargs="?", type=Path)
    p.add_argument("--build-bundle", type=Path, help="export a random-weights bundle here first and use it")
    p.add_argument("--small", action="store_true", help="with --build-bundle: max_ll 1024 instead of 16,000")
    p.add_argument("--url", help="use a running server instead of starting one")
    p.add_argument("--model", default="transact")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per concurrency level")
    p.add_argument("--warmup", type=float, default=2.0, help="untimed seconds before each level")
    p.add_argument("--switch-interval-ms", type=float, default=None, help="server: Python's thread switch interval")
    p.add_argument("--candidates", type=int, default=256)
    p.add_argument("--ll", type=int, default=1000)
    p.add_argument("--rt", type=int, default=100)
    p.add_argument("--imp", type=int, default=100)
    p.add_argument("--users", type=int, default=32, help="distinct requests in the pool")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-queue-delay-ms", type=float, default=0.0)
    p.add_argument("--threads", type=int, default=None, help="server: ONNX Runtime intra-op threads")
    p.add_argument("--workers", default="1",
                   help="server worker processes (transact serve --workers); a list such as 1,2,4 runs one server "
                        "after the other and prints one table")
    p.add_argument("--start-timeout", type=float, default=600.0)
    p.add_argument("--client-procs", type=int, default=1,
                   help="spread each level's clients over this many processes (so the load generator's own "
                        "interpreter lock is not the limit)")
    args = p.parse_args()

    bundle = args.bundle
    if args.build_bundle:  # torch and the exporter only here: the load generator's processes never need them
        from runtime.bench import random_bundle
        from transact.config import ModelConfig

        bundle = random_bundle(args.build_bundle, ModelConfig(max_ll=1024) if args.small else None)
    if not args.url and bundle is None:
        p.error("give BUNDLE, --build-bundle DIR or --url")
    worker_counts = [int(x) for x in args.workers.split(",")]
    if args.url and worker_counts != [1]:
        p.error("--workers starts servers; with --url the running server's own setting applies")
    rows = []
    for workers in worker_counts:
        proc = None
        if args.url:
            url = args.url
        else:
            proc, url = start_server(bundle, args.device, args, workers)
        try:
            meta = httpx.get(f"{url}/v2/models/{args.model}", timeout=10).json()
            config = model_config(url, args.model)
            bodies, lengths = make_bodies(config, args), request_lengths(config, args)
            for c in [int(x) for x in args.concurrency.split(",")]:
                _closed_loop(url, args.model, bodies, c, time.perf_counter() + args.warmup)  # untimed: shapes compile
                before = server_totals(url)
                row = run_level(url, args.model, bodies, args, c, args.duration)
                rows.append({"workers": workers, **row, **batch_stats(before, server_totals(url))})
                # Each level as it ends, so that a run cut short by a time limit still reports what it measured.
                print(f"workers {workers}, {c} clients: {row['candidates_per_s']:,} candidates/s, p50 {row['p50_ms']} "
                      f"ms, p99 {row['p99_ms']} ms, {row['errors']} errors", flush=True)  # fmt: skip
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(60)
    backend = meta.get("parameters", {}).get("backend", "?")
    print(f"\nserve load: backend={backend}, {args.candidates} candidates/request, ll={lengths['ll']} "
          f"rt={lengths['rt']} imp={lengths['imp']}, max_batch={args.max_batch}, "
          f"max_queue_delay={args.max_queue_delay_ms} ms, client processes {args.client_procs}, "
          f"{os.cpu_count()} CPU cores\n")  # fmt: skip
    print("| server workers | concurrency | requests | req/s | candidates/s | p50 ms | p99 ms | errors | "
          "requests per batch | model ms per batch |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['workers']} | {r['concurrency']} | {r['requests']} | {r['requests_per_s']} | "
              f"{r['candidates_per_s']:,} | {r['p50_ms']} | {r['p99_ms']} | {r['errors']} | {r['mean_batch']} | "
              f"{r['model_ms_per_batch']} |")  # fmt: skip
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        result = {"backend": backend, "args": {k: str(v) for k, v in vars(args).items()}, "levels": rows}
        (Path(out) / "serve_load.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
