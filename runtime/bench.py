"""`transact bench BUNDLE`: one request through the runtime vs the eager model on the same device."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import click
import numpy as np
import torch

from export.bundle import CPU_PROVIDER
from export.commands import check_provider


def latency(fn: Callable[[], object], runs: int, warmup: int, sync: bool = False) -> dict[str, float]:
    """p50 / p99 / mean milliseconds of ``fn`` after ``warmup`` calls (device synchronised if ``sync``)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        if sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    ms = np.asarray(times)
    return {"p50_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean())}


@click.command("bench")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--candidates", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--ll", default=None, type=click.IntRange(min=0), help="Lifelong length (default: the config's max).")
@click.option("--runs", default=20, show_default=True, type=click.IntRange(min=1))
@click.option("--warmup", default=3, show_default=True, type=click.IntRange(min=0))
@click.option("--threads", default=None, type=click.IntRange(min=1), help="CPU threads for both sides.")
@click.option("--onnx-provider", default=CPU_PROVIDER, show_default=True, callback=check_provider,
              help="ONNX Runtime execution provider for the cpu backend's full.onnx.")
def bench_cmd(bundle: Path, device: str, candidates: int, ll: int | None, runs: int, warmup: int,
              threads: int | None, onnx_provider: str) -> None:  # fmt: skip
    """Time one request (1 user, random inputs) through the runtime and through eager PyTorch."""
    from transact.data.random_batch import random_batch
    from transact.model import transformer_fastpath

    from .session import Request, Session

    if threads:
        torch.set_num_threads(threads)
    session = Session(bundle, device=device, threads=threads, onnx_provider=onnx_provider)
    cfg = session.config
    batch = random_batch(cfg, 1, candidates, ll=cfg.max_ll if ll is None else ll, rt=cfg.max_rt, imp=cfg.max_imp)
    request = Request.from_batch(batch, 0)
    model = session.bundle.verified.build_model().eval()
    on_gpu = session.backend_name == "cuda"
    eager_batch = batch.to("cuda") if on_gpu else batch
    if on_gpu:
        model = model.cuda()
    path = session.backend_name if onnx_provider == CPU_PROVIDER else f"{session.backend_name}, {onnx_provider}"
    rows = {f"runtime ({path})": latency(lambda: session.score(request), runs, warmup)}
    with torch.no_grad(), transformer_fastpath(True):
        rows["eager PyTorch fp32"] = latency(lambda: model(eager_batch), runs, warmup, sync=on_gpu)
    base = rows["eager PyTorch fp32"]["p50_ms"]
    click.echo(f"1 user, {candidates} candidates, ll {batch.ll.ts.shape[1]}, rt {cfg.max_rt}, imp {cfg.max_imp}; "
               f"{runs} runs after {warmup} warm-up; torch {torch.__version__}, {torch.get_num_threads()} threads")
    click.echo("| path | p50 ms | p99 ms | speed-up (p50) |\n|---|---:|---:|---:|")
    for name, r in rows.items():
        click.echo(f"| {name} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {base / r['p50_ms']:.2f}x |")
