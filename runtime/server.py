"""The serving process: Open Inference Protocol v2 over HTTP (FastAPI + uvicorn).

Routes (KServe / Triton Inference Server REST):

    GET  /v2/health/live                 200 while the process runs
    GET  /v2/health/ready                200 once the bundle is verified and warmed up, else 400
    GET  /v2                             server metadata
    GET  /v2/models/{m}[/versions/{v}]          model metadata
    GET  /v2/models/{m}[/versions/{v}]/ready    model readiness
    GET  /v2/models/{m}[/versions/{v}]/config   model configuration (Triton's extension, as its tools read it)
    POST /v2/models/{m}[/versions/{v}]/infer    inference (JSON or the binary tensor data extension)
    GET  /metrics                        Prometheus

Request bodies may be compressed as Triton Inference Server accepts them (``Content-Encoding: gzip`` or
``deflate``, its client's ``request_compression_algorithm``), the body limit holding after decompression too;
responses go uncompressed whatever ``Accept-Encoding`` asks (HTTP allows it, and the clients read both).

Errors are ``{"error": "..."}`` with a 4xx status naming the tensor and the problem (404 for an unknown
model, 413 for an oversized body, 415 for an unknown Content-Encoding, 503 while the model is loading or the
server is stopping).

One process (``create_app`` + ``run_server``) answers ``live`` at once and ``ready`` after its background
load; ``serve_workers`` runs several such processes on one port (``transact serve --workers N``), each
accepting connections only once its own model is loaded and warm.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from transact.batch import BatchError

from .batching import BatcherClosed, DynamicBatcher
from .metrics import ServerMetrics, forget_dead_workers
from .protocol import (
    HEADER_LENGTH,
    InferRequest,
    ProtocolError,
    decode_content,
    decode_infer_request,
    encode_infer_response,
)
from .session import Output, Session, request_from_tensors
from .session import Request as ModelRequest

log = logging.getLogger("transact.serve")
MODEL_VERSION = "1"
INLINE_HEADER_BYTES = 1 << 16  # binary-extension requests with a JSON header up to this decode in the loop


@dataclass
class ServerSettings:
    model_name: str = "transact"
    device: str = "auto"
    max_batch: int = 16
    max_queue_delay_ms: float = 0.0  # as Triton Inference Server: batch what is queued, wait for nothing
    max_candidates: int = 4096
    max_body_mb: float = 64.0

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)


class ServerState:
    """The loaded session, its batcher and the metrics; ``ready`` only after verification and warm-up."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.metrics = ServerMetrics(settings.model_name)
        self.session: Session | None = None
        self.batcher: DynamicBatcher | None = None
        self.load_error: BaseException | None = None
        self.ready = False

    def attach(self, session: Session) -> None:
        self.session = session
        self.limits = dataclasses.replace(
            session.limits, max_candidates=min(self.settings.max_candidates, session.limits.max_candidates)
        )
        self.batcher = DynamicBatcher(
            # Requests reach the batcher only through decode(), which validated them (request_from_tensors):
            # no second pass over every array in the batch thread.
            functools.partial(session.run, validate=False), self.settings.max_batch,
            self.settings.max_queue_delay_ms / 1000.0,
            on_batch=lambda reqs, res: self.metrics.batch(len(reqs), res.rows, res.candidates, res.seconds),
            on_depth=self.metrics.queue_depth.set,
        )  # fmt: skip
        self.ready = True
        self.metrics.ready.set(1)

    def shutdown(self) -> None:
        self.ready = False
        self.metrics.ready.set(0)
        if self.batcher is not None:
            self.batcher.close()


def _error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refusing (413) anything over ``limit`` bytes; an oversized body is drained, not stored."""
    declared = request.headers.get("content-length")
    too_big = ProtocolError(f"request body is larger than the limit of {limit} bytes (--max-body-mb)", 413,
                            kind="body_too_large")  # fmt: skip
    if declared is not None and declared.isdigit() and int(declared) > limit:
        await _drain(request, 2 * limit + (16 << 20))
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            await _drain(request, 2 * limit + (16 << 20) - size)
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


async def _drain(request: Request, budget: int) -> None:
    try:
        async for chunk in request.stream():
            budget -= len(chunk)
            if budget < 0:
                return
    except Exception:  # noqa: BLE001 - the client may already be gone
        return


def _model_metadata(state: ServerState) -> dict[str, Any]:
    session = state.session
    assert session is not None
    c = session.config
    return {
        "name": state.settings.model_name,
        "versions": [MODEL_VERSION],
        "platform": f"transact_{session.backend_name}",
        "inputs": [s.metadata() for s in session.input_specs()],
        "outputs": [s.metadata() for s in session.output_specs()],
        "parameters": {
            "backend": session.backend_name, "max_candidates": state.limits.max_candidates,
            "max_ll": c.max_ll, "max_rt": c.max_rt, "max_imp": c.max_imp, "num_surfaces": c.num_surfaces,
            "action_names": list(c.action_names), "heads": list(c.heads), "quant_scale": c.quant_scale,
        },  # fmt: skip
    }


def _triton_type(datatype: str) -> str:
    """Triton's model-configuration data type of a wire datatype: TYPE_ + its name (BYTES is TYPE_STRING)."""
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def _model_config(state: ServerState) -> dict[str, Any]:
    """Triton Inference Server's model configuration (its model configuration extension), in the JSON form its
    server writes and its client's ``get_model_config`` returns: protobuf's JSON, so int64 fields such as ``dims``
    are strings. ``max_batch_size`` is 0: a request's tensors carry no batch
    dimension (one request is one user, its candidates along N), and the server batches requests itself, with the
    settings under ``parameters``."""
    metadata = _model_metadata(state)
    session = state.session
    assert session is not None

    def tensors(specs: list[dict[str, Any]], output: bool) -> list[dict[str, Any]]:
        out = []
        for spec in specs:
            entry = {"name": spec["name"], "data_type": _triton_type(spec["datatype"]),
                     "dims": [str(d) for d in spec["shape"]], "is_shape_tensor": False}  # fmt: skip
            entry.update({"label_filename": ""} if output else {"format": "FORMAT_NONE", "optional": False,
                                                                 "allow_ragged_batch": False})  # fmt: skip
            out.append(entry)
        return out

    gpu = session.backend_name == "cuda"
    batching = {"max_batch": state.settings.max_batch, "max_queue_delay_ms": state.settings.max_queue_delay_ms}
    return {
        "name": metadata["name"],
        "platform": metadata["platform"],
        "backend": "transact",
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": 0,
        "input": tensors(metadata["inputs"], output=False),
        "output": tensors(metadata["outputs"], output=True),
        "instance_group": [{"name": f"{metadata['name']}_0", "kind": "KIND_GPU" if gpu else "KIND_CPU", "count": 1,
                            "gpus": [0] if gpu else []}],  # fmt: skip
        "parameters": {k: {"string_value": v if isinstance(v, str) else json.dumps(v)}
                       for k, v in {**metadata["parameters"], **batching}.items()},  # fmt: skip
    }


def _server_version() -> str:
    try:
        return importlib_metadata.version("transact-toolchain")
    except importlib_metadata.PackageNotFoundError:
        return "0"


def create_app(
    settings: ServerSettings | None = None,
    session: Session | None = None,
    load: Callable[[], Session] | None = None,
    on_load_error: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """The OIP v2 app. Give a ready ``session``, or a ``load`` callable run on a thread at start-up
    (the app answers live at once and ready when the load returns)."""
    settings = settings or ServerSettings()
    state = ServerState(settings)

    def load_in_background() -> None:
        try:
            t0 = time.perf_counter()
            s = load()
            state.attach(s)
            log.info("model '%s' ready on %s in %.1f s", settings.model_name, s.backend_name, time.perf_counter() - t0)
        except BaseException as e:  # noqa: BLE001 - reported, and the caller decides to stop
            state.load_error = e
            log.error("model '%s' failed to load: %s", settings.model_name, e)
            if on_load_error:
                on_load_error(e)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if session is not None:
            state.attach(session)
        elif load is not None:
            threading.Thread(target=load_in_background, name="transact-load", daemon=True).start()
        yield
        await asyncio.get_running_loop().run_in_executor(None, state.shutdown)

    app = FastAPI(title="transact", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.transact = state

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(str(exc.detail), exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error on %s", request.url.path)
        state.metrics.error("internal")
        return _error(f"internal error: {type(exc).__name__}", 500)

    def check_model(name: str, version: str | None) -> ProtocolError | None:
        if name != settings.model_name:
            return ProtocolError(f"unknown model '{name}'", 404, kind="unknown_model")
        if version is not None and version != MODEL_VERSION:
            return ProtocolError(f"unknown version '{version}' of model '{name}'", 404, kind="unknown_model")
        if not state.ready:
            return ProtocolError(f"model '{name}' is not ready", 503, kind="not_ready")
        return None

    @app.get("/v2/health/live")
    async def live() -> JSONResponse:
        return JSONResponse({"live": True})

    @app.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        return JSONResponse({"ready": state.ready}, status_code=200 if state.ready else 400)

    @app.get("/v2")
    async def server_metadata() -> JSONResponse:
        return JSONResponse({"name": "transact", "version": _server_version(),
                             "extensions": ["binary_tensor_data", "model_configuration"]})  # fmt: skip

    def describe(model: str, version: str | None, describe_state: Callable[[ServerState], dict]) -> JSONResponse:
        err = check_model(model, version)
        return _error(str(err), err.status) if err is not None else JSONResponse(describe_state(state))

    @app.get("/v2/models/{model}")
    @app.get("/v2/models/{model}/versions/{version}")
    async def model_metadata(model: str, version: str | None = None) -> JSONResponse:
        return describe(model, version, _model_metadata)

    @app.get("/v2/models/{model}/config")
    @app.get("/v2/models/{model}/versions/{version}/config")
    async def model_config(model: str, version: str | None = None) -> JSONResponse:
        return describe(model, version, _model_config)

    @app.get("/v2/models/{model}/ready")
    @app.get("/v2/models/{model}/versions/{version}/ready")
    async def model_ready(model: str, version: str | None = None) -> JSONResponse:
        err = check_model(model, version)
        if err is not None and err.status == 404:
            return _error(str(err), 404)
        return JSONResponse({"name": model, "ready": state.ready}, status_code=200 if state.ready else 400)

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    def decode(body: bytes, header_length: str | None, encoding: str | None) -> tuple[InferRequest, ModelRequest]:
        parsed = decode_infer_request(decode_content(body, encoding, settings.max_body_bytes), header_length)
        names = {s.name for s in state.session.output_specs()}
        for o in parsed.outputs or ():
            if o.name not in names:
                raise ProtocolError(f"unknown output '{o.name}' (expected {', '.join(sorted(names))})")
        tensors = {name: (t.datatype, t.array) for name, t in parsed.inputs.items()}
        try:
            req = request_from_tensors(tensors, state.session.config, state.limits)
        except BatchError as e:
            raise ProtocolError(str(e)) from None
        return parsed, req

    @app.post("/v2/models/{model}/infer")
    @app.post("/v2/models/{model}/versions/{version}/infer")
    async def infer(model: str, request: Request, version: str | None = None) -> Response:
        t0 = time.perf_counter()
        state.metrics.requests.labels(settings.model_name).inc()
        try:
            err = check_model(model, version)
            if err is not None:
                await _drain(request, settings.max_body_bytes)
                raise err
            body = await _read_body(request, settings.max_body_bytes)
            header_length = request.headers.get(HEADER_LENGTH)
            encoding = request.headers.get("content-encoding")
            inline = header_length is not None and header_length.isdigit() and int(header_length) <= INLINE_HEADER_BYTES
            if inline and encoding in (None, "", "identity"):
                # Binary tensors with a small JSON header decode in ~0.15 ms (views over the body, then
                # validation): cheaper here than the hop to a worker thread and back (~0.2 ms a request).
                parsed, req = decode(body, header_length, encoding)
            else:  # JSON tensors and compressed bodies take long to decode; the event loop keeps serving meanwhile
                parsed, req = await run_in_threadpool(decode, body, header_length, encoding)
            try:
                future = state.batcher.submit(req)
            except BatcherClosed as e:
                raise ProtocolError(str(e), 503, kind="not_ready") from None
            out: Output = await asyncio.wrap_future(future)
            payload, headers = encode_infer_response(
                settings.model_name, MODEL_VERSION, {"probabilities": out.probabilities, "scores": out.scores}, parsed
            )
        except ProtocolError as e:
            state.metrics.error(e.kind)
            return _error(str(e), e.status)
        state.metrics.success.inc()
        state.metrics.latency.observe(time.perf_counter() - t0)
        media = headers.pop("Content-Type")
        return Response(payload, media_type=media, headers=headers)

    return app


def http_stack() -> str:
    """What uvicorn will run on: its C parser and loop (httptools, uvloop) when installed, else h11, asyncio."""
    import importlib.util

    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    return f"{http} + {loop}"


WORKER_SPEC_ENV = "TRANSACT_SERVE_WORKER"  # how `serve_workers` hands its settings to the worker processes
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def worker_app() -> FastAPI:
    """The app of one worker process of ``serve_workers`` (a uvicorn app factory). It loads, verifies and
    warms its own Session before uvicorn lets it accept connections, so every worker that answers is ready."""
    spec = json.loads(os.environ[WORKER_SPEC_ENV])
    sys.setswitchinterval(spec["switch_interval_s"])
    logging.basicConfig(level=spec["log_level"].upper(), format=LOG_FORMAT)
    forget_dead_workers(os.environ["PROMETHEUS_MULTIPROC_DIR"])  # a worker this one replaces, if any
    t0 = time.perf_counter()
    session = Session(spec["bundle"], **spec["session"])
    log.info("worker %d: model '%s' ready on %s in %.1f s", os.getpid(), spec["settings"]["model_name"],
             session.backend_name, time.perf_counter() - t0)  # fmt: skip
    return create_app(ServerSettings(**spec["settings"]), session=session)


def serve_workers(bundle: str, settings: ServerSettings, session_options: dict[str, Any], workers: int,
                  host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
                  switch_interval_s: float = 0.0005, graceful_timeout_s: float = 30.0) -> None:  # fmt: skip
    """Serve from ``workers`` processes sharing one socket (uvicorn's supervisor), until SIGINT/SIGTERM.

    Each worker has its own model, batcher and HTTP parser: Python's HTTP handling is what limits one
    process (benchmarks/RESULTS.md). Batches form within a worker; Prometheus metrics are summed over
    the workers through a private folder. A worker that dies is replaced by the supervisor."""
    import uvicorn

    spec = {"bundle": str(bundle), "settings": dataclasses.asdict(settings), "session": session_options,
            "switch_interval_s": switch_interval_s, "log_level": log_level}  # fmt: skip
    names = (WORKER_SPEC_ENV, "PROMETHEUS_MULTIPROC_DIR")
    before = {k: os.environ.get(k) for k in names}
    metrics_dir = tempfile.mkdtemp(prefix="transact-metrics-")
    os.environ[WORKER_SPEC_ENV] = json.dumps(spec)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # read by prometheus_client when a worker imports it
    try:
        # A cold start compiles every kernel bucket; the supervisor must not take that for a hung worker.
        uvicorn.run("runtime.server:worker_app", factory=True, host=host, port=port, workers=workers,
                    log_level=log_level, access_log=False, lifespan="on",
                    timeout_graceful_shutdown=graceful_timeout_s, timeout_worker_healthcheck=120)  # fmt: skip
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_server(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
               graceful_timeout_s: float = 30.0) -> Any:
    """Build the uvicorn server for ``app`` (call ``.run()``); SIGINT/SIGTERM finish in-flight requests."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=graceful_timeout_s, lifespan="on")  # fmt: skip
    return uvicorn.Server(config)
