"""A ``Session`` in its own process (``transact serve --model-process``).

Why: the thread that runs a batch releases Python's interpreter lock at every call into torch or numpy
(uploads, graph replays, copies: a few dozen per batch) and must win it back from the HTTP threads each
time. Beside a Python thread that never yields, a batch of 8 users took 35 ms instead of 2.5
(``benchmarks/runtime.py --batch-users``). In a child process the batch has the interpreter to itself;
Triton Inference Server's Python backend runs its models out of process for the same reason. The price
is the pipe: every request's arrays cross it (about 0.8 MB at ll 16,000), which measured about 1 ms per
request on the GPU host, so it is opt-in and pays only when the HTTP side starves the batch thread.

The wire between the two is a pipe carrying raw bytes (no pickle): a JSON header that describes every
array (dtype, shape, offset) followed by the arrays' bytes; ``np.frombuffer`` reads them back.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import struct
import threading
import time
from typing import Any

import numpy as np

from transact.config import ModelConfig
from transact.errors import TransactError

from .session import SEQUENCES, BatchResult, Limits, Output, Request, TensorSpec, UserSeq, input_specs, output_specs

log = logging.getLogger("transact.serve")
_HEAD = struct.Struct("<I")  # length of the JSON header


# ---------------------------------------------------------------------------------------------
# Framing: a JSON header plus the raw bytes of named arrays
# ---------------------------------------------------------------------------------------------
def pack(meta: dict[str, Any], arrays: list[np.ndarray]) -> bytes:
    """One message: ``meta`` and the arrays (described in the header as dtype / shape / offset)."""
    descr, off = [], 0
    for a in arrays:
        descr.append([a.dtype.str, list(a.shape), off])
        off += a.nbytes
    head = json.dumps({"meta": meta, "arrays": descr}).encode()
    return b"".join([_HEAD.pack(len(head)), head, *(np.ascontiguousarray(a).tobytes() for a in arrays)])


def unpack(msg: bytes) -> tuple[dict[str, Any], list[np.ndarray]]:
    """Inverse of ``pack``; the arrays are read-only views of ``msg``."""
    (n,) = _HEAD.unpack_from(msg)
    head = json.loads(msg[_HEAD.size : _HEAD.size + n])
    base = _HEAD.size + n
    out = []
    for dtype, shape, off in head["arrays"]:
        dt = np.dtype(dtype)
        count = int(np.prod(shape)) if shape else 1
        out.append(np.frombuffer(msg, dt, count, base + off).reshape(shape))
    return head["meta"], out


def _request_arrays(r: Request) -> list[np.ndarray]:
    arrays = [r.user_dense, r.cand_item, r.item_dense]
    for s in SEQUENCES:
        seq = getattr(r, s)
        arrays += [seq.ts, seq.action, seq.surface, seq.item]
    return arrays


def pack_requests(requests: list[Request]) -> bytes:
    meta = {"requests": [[int(r.request_ts), int(r.surface), int(r.hour)] for r in requests]}
    return pack(meta, [a for r in requests for a in _request_arrays(r)])


def unpack_requests(msg: bytes) -> list[Request]:
    meta, arrays = unpack(msg)
    per = 3 + 4 * len(SEQUENCES)
    out = []
    for i, (ts, surface, hour) in enumerate(meta["requests"]):
        a = arrays[i * per : (i + 1) * per]
        seqs = {s: UserSeq(*a[3 + 4 * j : 7 + 4 * j]) for j, s in enumerate(SEQUENCES)}
        out.append(Request(request_ts=ts, user_dense=a[0], surface=surface, hour=hour, cand_item=a[1],
                           item_dense=a[2], **seqs))  # fmt: skip
    return out


# ---------------------------------------------------------------------------------------------
# The child
# ---------------------------------------------------------------------------------------------
def _error_meta(e: BaseException) -> dict[str, Any]:
    return {"error": str(e) or type(e).__name__, "type": type(e).__name__,
            "transact": isinstance(e, TransactError), "exit_code": getattr(e, "exit_code", 1)}  # fmt: skip


def _child(bundle: str, device: str, options: dict[str, Any], conn) -> None:
    import signal

    from .session import Session

    # Ctrl-C reaches the whole process group; the parent decides when to stop (after in-flight batches).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        session = Session(bundle, device=device, **options)
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which decides
        conn.send_bytes(pack(_error_meta(e), []))
        return
    limits = session.limits
    conn.send_bytes(pack({"config": session.config.to_dict(), "backend": session.backend_name,
                          "limits": [limits.max_candidates, limits.max_ll, limits.max_rt, limits.max_imp],
                          "startup": session.startup}, []))  # fmt: skip
    while True:
        try:
            msg = conn.recv_bytes()
        except (EOFError, OSError):  # the parent went away
            break
        if not msg:  # the parent's request to stop
            break
        try:
            res = session.run(unpack_requests(msg))
        except BaseException as e:  # noqa: BLE001 - one failing batch must not end the process
            conn.send_bytes(pack(_error_meta(e), []))
            continue
        meta = {"rows": res.rows, "candidates": res.candidates, "seconds": res.seconds}
        conn.send_bytes(pack(meta, [a for o in res.outputs for a in (o.probabilities, o.scores)]))
    session.close()
    conn.close()


# ---------------------------------------------------------------------------------------------
# The parent's handle
# ---------------------------------------------------------------------------------------------
class ModelProcessError(RuntimeError):
    """The model process failed a batch or is gone."""


class ProcessSession:
    """``Session``'s serving interface (config, limits, specs, run) over a child process that holds the
    real Session. Blocks in the constructor until the child is warmed up (or failed to load)."""

    def __init__(self, bundle: str, device: str = "auto", **options: Any) -> None:
        ctx = mp.get_context("spawn")  # never fork a process that may hold CUDA or ONNX Runtime threads
        self._conn, child_conn = ctx.Pipe()
        self._proc = ctx.Process(target=_child, args=(str(bundle), device, options, child_conn),
                                 name="transact-model", daemon=True)  # fmt: skip
        self._proc.start()
        child_conn.close()
        self._lock = threading.Lock()
        meta, _ = self._receive()
        if "error" in meta:
            self._proc.join(10)
            if meta["transact"]:
                err = TransactError(meta["error"])
                err.exit_code = meta["exit_code"]
                raise err
            raise ModelProcessError(f"the model process failed to load the bundle: {meta['type']}: {meta['error']}")
        self.config = ModelConfig.from_dict(meta["config"])
        self.limits = Limits(*meta["limits"])
        self.backend_name = meta["backend"]
        self.startup = meta["startup"]

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def input_specs(self) -> list[TensorSpec]:
        return input_specs(self.config)

    def output_specs(self) -> list[TensorSpec]:
        return output_specs(self.config)

    def _receive(self) -> tuple[dict[str, Any], list[np.ndarray]]:
        try:
            return unpack(self._conn.recv_bytes())
        except (EOFError, OSError):
            code = self._proc.exitcode
            raise ModelProcessError(f"the model process exited (exit code {code})") from None

    def run(self, requests: list[Request]) -> BatchResult:
        """Score a group of requests as one batch in the child (validated and de-duplicated there)."""
        if not requests:
            return BatchResult([], 0, 0, 0.0)
        t0 = time.perf_counter()
        with self._lock:
            try:
                self._conn.send_bytes(pack_requests(requests))
            except (BrokenPipeError, OSError):
                raise ModelProcessError(f"the model process exited (exit code {self._proc.exitcode})") from None
            meta, arrays = self._receive()
        if "error" in meta:
            raise ModelProcessError(f"{meta['type']}: {meta['error']}")
        outs = [Output(arrays[2 * i], arrays[2 * i + 1]) for i in range(len(requests))]
        # The child's own time for the batch is what the metrics call model time; the round trip adds
        # the pipe (about 1 MB per request at ll 16,000).
        log.debug("batch of %d: %.2f ms in the child, %.2f ms round trip", len(requests), meta["seconds"] * 1e3,
                  (time.perf_counter() - t0) * 1e3)  # fmt: skip
        return BatchResult(outs, meta["rows"], meta["candidates"], meta["seconds"])

    def close(self, timeout: float = 30.0) -> None:
        """Ask the child to stop after its current batch; terminate it if it does not within ``timeout``."""
        if not self._proc.is_alive():
            return
        with self._lock:
            try:
                self._conn.send_bytes(b"")
            except OSError:
                pass
        self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5)
        self._conn.close()
