"""`transact demo`, the whole story: data -> train -> export -> parity -> serve -> real HTTP requests ->
a summary of scores, latency and parity -> a clean shutdown."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import click
import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(client, proc: subprocess.Popen, timeout_s: float = 300.0) -> float:
    """Poll /v2/health/ready until the server says so; returns the seconds it took."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        if proc.poll() is not None:
            raise click.ClickException(f"the server exited early with status {proc.returncode}")
        try:
            if client.get("/v2/health/ready").status_code == 200:
                return time.perf_counter() - t0
        except Exception:  # not listening yet
            pass
        time.sleep(0.1)
    raise click.ClickException("the server did not become ready in time")


def serve_and_query(bundle: Path, requests: list, eager_probs: list[np.ndarray], echo=click.echo) -> dict:
    """Start `transact serve` as its own process, send the requests over HTTP, compare, shut down."""
    import httpx

    from .protocol import decode_infer_response, encode_infer_request

    port = free_port()
    cmd = [sys.executable, "-m", "transact.cli", "serve", str(bundle), "--port", str(port), "--device", "cpu",
           "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            ready_s = wait_ready(client, proc)
            meta = client.get("/v2/models/transact").json()
            echo(f"server ready in {ready_s:.1f} s on 127.0.0.1:{port}; model '{meta['name']}' with "
                 f"{len(meta['inputs'])} inputs")  # fmt: skip
            latencies, worst = [], 0.0
            for req, want in zip(requests, eager_probs, strict=True):
                body, headers = encode_infer_request(req.tensors(), binary=True)
                t0 = time.perf_counter()
                resp = client.post("/v2/models/transact/infer", content=body, headers=headers)
                latencies.append((time.perf_counter() - t0) * 1e3)
                if resp.status_code != 200:
                    raise click.ClickException(f"infer failed: {resp.status_code} {resp.text[:200]}")
                got = decode_infer_response(resp.content, resp.headers)["probabilities"]
                worst = max(worst, float(np.abs(got - want).max()))
            bad = client.post("/v2/models/transact/infer", content=b'{"inputs": [', headers={})
            echo(f"malformed request -> {bad.status_code}: {bad.json().get('error', '')[:80]}")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
    lat = np.asarray(latencies)
    return {"requests": len(requests), "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "max_abs_err_vs_eager": worst, "exit_code": code}  # fmt: skip


def run_demo(out: Path, users: int | None, epochs: int | None, seed: int, model_overrides: dict,
             echo=click.echo) -> dict:  # fmt: skip
    """All the steps; returns a summary dict."""
    import torch

    from export.bundle import export_bundle, load_bundle
    from export.parity import run_parity
    from transact.ablation import run_ablation, slug
    from transact.train import TrainConfig

    from .session import Request

    t0 = time.perf_counter()
    cfg = TrainConfig(data="synthetic", seed=seed, model=model_overrides, **({"epochs": epochs} if epochs else {}))
    if users is not None:
        cfg.data_options = {"num_users": users}
    echo("== 1/5 data + training: four ablation variants on synthetic data (time-based split)")
    summary = run_ablation(cfg, out / "ablation")
    echo("== 2/5 evaluation on the test split")
    echo(summary["table"])
    echo(f"plot: {out / 'ablation' / 'ablation.png'}")

    echo("== 3/5 export the full model (rt + ll + NAL)")
    bundle_dir = export_bundle(out / "ablation" / slug("rt + ll + NAL"), out / "bundle", force=True)
    bundle = load_bundle(bundle_dir)
    files = bundle.manifest["files"]
    echo(f"bundle: {bundle_dir}  ({', '.join(sorted(files))}; every sha256 verified)")

    echo("== 4/5 parity: eager PyTorch vs ONNX Runtime (full.onnx, dense.onnx), edge cases + random inputs")
    report = run_parity(bundle, random_cases=2, seed=seed)
    echo(report.format_table())
    if not report.passed:
        raise click.ClickException("parity failed")

    echo("== 5/5 serve over HTTP (Open Inference Protocol v2) and score test requests")
    from transact.data.synthetic import make_synthetic

    test = make_synthetic(seed=seed, **cfg.data_options).split_by_time(cfg.valid_frac, cfg.test_frac)[2]
    batch = test.batch(np.arange(min(20, test.num_requests)))
    requests = [Request.from_batch(batch, r) for r in range(batch.num_requests)]
    model = bundle.build_model().eval()
    with torch.no_grad():
        eager = [model(test.batch(np.array([r]))).numpy() for r in range(batch.num_requests)]
    served = serve_and_query(bundle_dir, requests, eager, echo)
    # uvicorn drains in-flight requests on SIGTERM, then re-raises the signal: -15 is the clean path.
    stopped = "cleanly on SIGTERM" if served["exit_code"] in (0, -signal.SIGTERM) else f"with {served['exit_code']}"
    echo(f"{served['requests']} requests over HTTP: p50 {served['p50_ms']:.1f} ms, p99 {served['p99_ms']:.1f} ms; "
         f"max |HTTP - eager| = {served['max_abs_err_vs_eager']:.2e}; server stopped {stopped}")  # fmt: skip
    if served["max_abs_err_vs_eager"] > 1e-5:
        raise click.ClickException("scores over HTTP differ from the eager model")
    elapsed = time.perf_counter() - t0
    echo(f"demo finished in {elapsed:.0f} s")
    return {"ablation": summary["results"], "parity_passed": report.passed, "served": served, "seconds": elapsed}
