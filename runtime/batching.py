"""Grouping requests into model batches: request-level de-duplication and the dynamic batcher.

``plan_batch`` turns requests into one batch plan: requests whose user tensors are identical share one
request row (their candidates are concatenated, each pointing at the shared row), the way training
batches store a user's sequences once (DESIGN §2.1). ``DynamicBatcher`` runs up to ``max_batch``
queued requests together on a worker thread, after waiting up to ``max_queue_delay`` seconds for more to
arrive (0, the default: none; requests that arrive while a batch runs queue up and form the next batch).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from transact.batch import SEQUENCES

from .session import SEQ_DTYPES, BatchResult, Request, UserSeq, seq_field_shape


def same_user(a: Request, b: Request) -> bool:
    """True when two requests carry identical user tensors (sequences, dense and context features)."""
    if a is b:
        return True
    if (a.request_ts, a.surface, a.hour) != (b.request_ts, b.surface, b.hour):
        return False
    if not np.array_equal(a.user_dense, b.user_dense):
        return False
    for s in SEQUENCES:
        x: UserSeq = getattr(a, s)
        y: UserSeq = getattr(b, s)
        if len(x) != len(y):
            return False
        for f in ("ts", "action", "surface", "item"):
            if not np.array_equal(getattr(x, f), getattr(y, f)):
                return False
    return True


def _cheap_key(r: Request) -> tuple:
    return (r.request_ts, r.surface, r.hour, r.user_dense.tobytes(), *(len(getattr(r, s)) for s in SEQUENCES))


@dataclass
class BatchPlan:
    """Requests in arrival order, the distinct users (request rows) and which row each request uses."""

    requests: list[Request]
    users: list[Request]
    rows: list[int]

    @property
    def num_rows(self) -> int:
        return len(self.users)

    @property
    def num_candidates(self) -> int:
        return sum(r.num_candidates for r in self.requests)

    def cand_request(self) -> np.ndarray:
        parts = [np.full(r.num_candidates, row, np.int64) for r, row in zip(self.requests, self.rows, strict=True)]
        return np.concatenate(parts)

    def widths(self) -> dict[str, int]:
        """Longest sequence of the group, at least 1."""
        return {s: max(1, *(len(getattr(u, s)) for u in self.users)) for s in SEQUENCES}

    def padded_inputs(self, widths: dict[str, int] | None = None) -> dict[str, np.ndarray]:
        """The model-batch tensors (``transact.batch.INPUT_NAMES``), sequences zero-padded to ``widths``."""
        widths = widths or self.widths()
        users, r = self.users, len(self.users)
        out: dict[str, np.ndarray] = {
            "request_ts": np.array([u.request_ts for u in users], np.int64),
            "user_dense": np.stack([u.user_dense for u in users]).astype(np.float32, copy=False),
            "surface": np.array([u.surface for u in users], np.int64),
            "hour": np.array([u.hour for u in users], np.int64),
        }
        for s in SEQUENCES:
            w, seqs = widths[s], [getattr(u, s) for u in users]
            # One full row: views of the request's arrays, no copy (unless one sits at an odd byte offset of a wire
            # body: then an aligned copy).
            in_place = r == 1 and len(seqs[0]) == w
            for f, dtype in SEQ_DTYPES.items():
                if in_place:
                    arr = np.require(getattr(seqs[0], f), dtype, ["C_CONTIGUOUS", "ALIGNED"])[None]
                else:
                    arr = np.zeros(seq_field_shape(f, r, w), dtype)
                    for row, seq in enumerate(seqs):
                        arr[row, : len(seq)] = getattr(seq, f)
                out[f"{s}_{f}"] = arr
            out[f"{s}_length"] = np.array([len(seq) for seq in seqs], np.int64)
        out["cand_request"] = self.cand_request()
        out["cand_item"] = np.concatenate([q.cand_item for q in self.requests]).astype(np.float32, copy=False)
        out["item_dense"] = np.concatenate([q.item_dense for q in self.requests]).astype(np.float32, copy=False)
        return out

    def split(self, arr: np.ndarray) -> list[np.ndarray]:
        """Per-request slices of a per-candidate output (in request order)."""
        if len(self.requests) == 1:  # the common serving case: no cumsum, no split
            return [arr]
        ends = np.cumsum([r.num_candidates for r in self.requests])
        return np.split(arr, ends[:-1])


def plan_batch(requests: list[Request], dedup: bool = True) -> BatchPlan:
    """Assign request rows; with ``dedup`` identical users share one row."""
    users: list[Request] = []
    rows: list[int] = []
    seen: dict[tuple, list[int]] = {}
    for req in requests:
        row = None
        if dedup and len(requests) > 1:
            key = _cheap_key(req)
            for cand in seen.get(key, ()):
                if same_user(users[cand], req):
                    row = cand
                    break
            if row is None:
                seen.setdefault(key, []).append(len(users))
        if row is None:
            row = len(users)
            users.append(req)
        rows.append(row)
    return BatchPlan(list(requests), users, rows)


# ---------------------------------------------------------------------------------------------
# Dynamic batching
# ---------------------------------------------------------------------------------------------


class BatcherClosed(RuntimeError):
    """The batcher is shutting down and takes no new requests."""


@dataclass
class _Item:
    request: Request
    future: Future
    arrived: float


_STOP = object()


class DynamicBatcher:
    """Runs ``run_batch`` on groups of up to ``max_batch`` requests that arrive within ``max_queue_delay_s``
    of the first one; a worker thread does the model work, callers wait on futures."""

    def __init__(
        self,
        run_batch: Callable[[list[Request]], BatchResult],
        max_batch: int = 16,
        max_queue_delay_s: float = 0.0,
        on_batch: Callable[[list[Request], BatchResult], None] | None = None,
        on_depth: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.run_batch, self.max_batch, self.max_delay = run_batch, max_batch, max(0.0, max_queue_delay_s)
        self.on_batch, self.on_depth = on_batch, on_depth
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self._lock = threading.Lock()
        self._pending = 0
        self._thread = threading.Thread(target=self._work, name="transact-batcher", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Requests submitted and not yet answered."""
        return self._pending

    def _depth_changed(self, delta: int) -> None:
        with self._lock:
            self._pending += delta
            depth = self._pending
        if self.on_depth:
            self.on_depth(depth)

    def submit(self, request: Request) -> Future:
        with self._lock:
            if self._closed:
                raise BatcherClosed("the server is shutting down")
            fut: Future = Future()
            self._queue.put(_Item(request, fut, time.perf_counter()))
        self._depth_changed(1)
        return fut

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop taking requests, finish everything already queued, stop the worker."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join(timeout)

    def _collect(self, first: _Item) -> tuple[list[_Item], bool]:
        items, stop = [first], False
        deadline = first.arrived + self.max_delay
        while len(items) < self.max_batch:
            wait = deadline - time.perf_counter()
            try:
                nxt = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is _STOP:
                stop = True
                break
            items.append(nxt)
        return items, stop

    def _work(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is _STOP:
                break
            items, stop = self._collect(first)
            if stop:  # finish whatever is still queued before stopping
                while True:
                    try:
                        nxt = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if nxt is not _STOP:
                        items.append(nxt)
            for i in range(0, len(items), self.max_batch):
                self._run(items[i : i + self.max_batch])

    def _run(self, items: list[_Item]) -> None:
        requests = [it.request for it in items]
        try:
            result = self.run_batch(requests)
        except Exception as e:  # noqa: BLE001 - isolate the failing request when a group fails
            if len(items) > 1:
                for it in items:
                    self._run([it])
                return
            items[0].future.set_exception(e)
            self._depth_changed(-1)
            return
        if self.on_batch:
            try:
                self.on_batch(requests, result)
            except Exception:  # noqa: BLE001 - metrics must never fail a request
                pass
        for it, out in zip(items, result.outputs, strict=True):
            it.future.set_result(out)
        self._depth_changed(-len(items))
