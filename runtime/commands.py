"""``transact serve BUNDLE``: the Open Inference Protocol v2 server on uvicorn."""

from __future__ import annotations

import logging

import click

from export.bundle import CPU_PROVIDER
from export.commands import check_provider
from transact.errors import TransactError

from .chunks import MAX_CHUNK, MIN_CHUNK


@click.command("serve")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0 for all).")
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--max-batch", default=16, show_default=True, type=click.IntRange(min=1),
              help="Most requests per model batch.")
@click.option("--max-queue-delay-ms", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="How long a request may wait for others to batch with (0: batch what is queued; under "
                   "load requests queue while a batch runs).")
@click.option("--max-candidates", default=4096, show_default=True, type=click.IntRange(min=1),
              help="Most candidates per request.")
@click.option("--max-body-mb", default=64.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Largest request body.")
@click.option("--model-name", default="transact", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="ONNX Runtime threads per server process (default: every CPU this process may use, within "
                   "its cgroup's CPU quota, shared out among the --workers).")
@click.option("--split", type=click.IntRange(min=1), default=None,
              help="cpu: chunks of a request's candidates (at most --max-chunk each) scored side by side at a time, "
                   "threads / split threads each (default: one per thread; several threads per chunk were slower where "
                   "measured, benchmarks/RESULTS.md).")
@click.option("--max-chunk", type=click.IntRange(min=1), default=None,
              help=f"cpu: most candidates per chunk (default {MAX_CHUNK}; chunks keep at least {MIN_CHUNK} where a "
                   "request has them). The best size depends on the host's caches.")
@click.option("--triton-cache-dir", type=click.Path(file_okay=False), default=None,
              help="Persistent compiled-kernel cache (cuda; default ~/.cache/transact/triton).")
@click.option("--dense-on", type=click.Choice(["gpu", "cpu"]), default="gpu", show_default=True,
              help="cuda: run the dense part on the GPU, or dense.onnx in ONNX Runtime on the host.")
@click.option("--tf32/--no-tf32", default=True, show_default=True,
              help="cuda: fp32 matrix products on TF32 tensor cores (within the fp16 path's tolerance).")
@click.option("--switch-interval-ms", default=0.5, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Python's thread switch interval: how long the HTTP thread may keep the interpreter while "
                   "the batch worker waits for it.")  # fmt: skip
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1),
              help="Server processes on one port, each with its own model and batcher (one Python process "
                   "parses ~500 large requests/s); workers accept connections once their model is warm.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info")
@click.option("--onnx-provider", default=CPU_PROVIDER, show_default=True, callback=check_provider,
              help="ONNX Runtime execution provider for full.onnx (cpu) or dense.onnx (cuda, --dense-on cpu); "
                   "check the bundle on it first with `transact parity --onnx-provider`.")
def serve_cmd(bundle, host, port, device, max_batch, max_queue_delay_ms, max_candidates, max_body_mb, model_name,
              threads, split, max_chunk, triton_cache_dir, dense_on, tf32, switch_interval_ms, workers, log_level,
              onnx_provider) -> None:  # fmt: skip
    """Serve BUNDLE over HTTP (KServe / Triton Inference Server v2 protocol) until SIGINT/SIGTERM."""
    import sys

    from .server import LOG_FORMAT, ServerSettings, create_app, http_stack, run_server, serve_workers
    from .session import Session

    sys.setswitchinterval(switch_interval_ms / 1000.0)
    logging.basicConfig(level=log_level.upper(), format=LOG_FORMAT)
    settings = ServerSettings(model_name=model_name, device=device, max_batch=max_batch,
                              max_queue_delay_ms=max_queue_delay_ms, max_candidates=max_candidates,
                              max_body_mb=max_body_mb)  # fmt: skip
    if workers > 1 and threads is None:
        # Every worker runs its own ONNX Runtime: share the CPUs out rather than give each all of them (N workers
        # with every CPU each would run N threads on each core).
        from .backends.cpu import usable_cpus

        threads = max(1, usable_cpus() // workers)
    options = dict(device=device, threads=threads, split=split, max_chunk=max_chunk, max_candidates=max_candidates,
                   triton_cache_dir=triton_cache_dir, max_batch=max_batch, dense_on=dense_on, tf32=tf32,
                   onnx_provider=onnx_provider)  # fmt: skip
    if workers > 1:
        _check_before_workers(bundle, device)
        click.echo(f"serving '{model_name}' from {bundle} on http://{host}:{port}/v2 with {workers} worker "
                   f"processes of {threads} ONNX Runtime thread{'s' if threads > 1 else ''} each (each accepts "
                   f"connections once its model is verified and warm; HTTP on {http_stack()})", err=True)  # fmt: skip
        serve_workers(bundle, settings, options, workers, host=host, port=port, log_level=log_level,
                      switch_interval_s=switch_interval_ms / 1000.0)  # fmt: skip
        return
    server_box: list = []

    def load() -> Session:
        return Session(bundle, **options)

    def stop(_: BaseException) -> None:
        if server_box:
            server_box[0].should_exit = True

    app = create_app(settings, load=load, on_load_error=stop)
    server = run_server(app, host=host, port=port, log_level=log_level)
    server_box.append(server)
    click.echo(f"serving '{model_name}' from {bundle} on http://{host}:{port}/v2 (ready after verification "
               f"and warm-up; HTTP on {http_stack()})", err=True)  # fmt: skip
    server.run()
    error = app.state.transact.load_error
    if isinstance(error, TransactError):
        raise error
    if error is not None:
        raise TransactError(f"cannot serve the bundle: {error}", bundle)


def _check_before_workers(bundle: str, device: str) -> None:
    """Refuse here, once, what would make every worker fail at start-up: a bundle that does not verify, or
    a device that is not there."""
    from .backends import BackendUnavailable
    from .session import open_bundle, resolve_device

    open_bundle(bundle)
    if resolve_device(device) == "cuda":
        from .backends.cuda import check_cuda_available

        try:
            check_cuda_available()
        except BackendUnavailable as e:
            raise TransactError(str(e)) from None


if __name__ == "__main__":
    from transact.cli import _run

    _run(serve_cmd)
