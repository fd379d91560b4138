"""The ``cpu`` backend: the whole model in ONNX Runtime (``full.onnx``).

A request's candidates are scored independently of each other, so the backend cuts them into chunks of at
most ``max_chunk`` (``MAX_CHUNK`` by default) and runs ``split`` chunks at a time side by side with
``threads // split`` intra-op threads each. That keeps every core busy on whole products instead of leaving ONNX
Runtime to split each small operator between all of them: its LayerNormalization, for one, gets no faster past one
thread (benchmarks/RESULTS.md, 2026-12-05); and a small chunk's intermediates stay in the core's caches. When a
request's chunks outnumber the slots, the part of the graph that depends on the request alone runs once before them
(``request_stage``), the chunks stop at the two sequence-module outputs, and ``dense.onnx`` scores the row's
candidates in a few large groups, each as soon as its chunks are done (``_StagedRow``). With one thread per chunk,
a row whose chunks fill every slot is cut by guided self-scheduling (``guided_bounds``): chunks of up to
``max_chunk`` first, then ever smaller ones, taken by the slots as they free up, so that slots running at different
speeds end close together; ONNX Runtime's own threads start those chunks (``_AsyncSlots``), not Python's."""

from __future__ import annotations

import bisect
import collections
import contextlib
import functools
import os
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from export.bundle import onnx_providers
from export.manifest import DENSE_OUTPUTS, FULL_OUTPUTS, SEQUENCE_OUTPUTS
from transact.batch import INPUT_NAMES

from ..batching import BatchPlan, plan_batch
from ..chunks import MAX_CHUNK, MIN_CHUNK, chunk_bounds, guided_bounds
from ..session import Limits, LoadedBundle, SessionOptions
from .request_stage import keep_outputs, split_request_stage
from .warmup import warmup_requests

# Per-candidate inputs of full.onnx: a chunk of candidates is these rows, with the user's inputs whole.
CANDIDATE_INPUTS = ("cand_request", "cand_item", "item_dense")
ROW_INPUTS = (*CANDIDATE_INPUTS, *SEQUENCE_OUTPUTS)  # what a part of dense.onnx's run takes only its rows of


@functools.cache
def _register_shared_arena() -> None:
    """One CPU memory arena in ONNX Runtime's process-wide environment, for the sessions that ask for it."""
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, None)


def ort_options(threads: int | None, shared_arena: bool = False, arena: bool = True) -> ort.SessionOptions:
    """The cpu backend's session options. ``shared_arena``: the session draws its intermediates from one arena
    shared with the other sessions that do, so sessions that take turns (the whole graph and the candidate stage)
    grow one arena, not one each (16 slots: 749 MB resident after warm-up, 1,042 MB with an arena each).
    ``arena=False``: no ONNX Runtime arena at all; the session allocates through the C library's malloc."""
    so = ort.SessionOptions()
    if not arena:
        so.enable_cpu_mem_arena = False
    elif shared_arena:
        _register_shared_arena()
        so.add_session_config_entry("session.use_env_allocators", "1")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1
    if threads:
        so.intra_op_num_threads = int(threads)
    so.log_severity_level = 3
    return so


CGROUP_ROOT = Path("/sys/fs/cgroup")


@contextlib.contextmanager
def flushed_denormals(enabled: bool = True) -> Iterator[None]:
    """Inside the block the calling thread reads and writes denormal floats as zero (x86 DAZ / FTZ, as
    ``torch.set_flush_denormal`` sets them); after it, the thread's own mode again. ``enabled=False``: no change.

    Masked attention scores (ONNX Runtime's mask value is -10,000) underflow in the softmax's exponentials to
    denormals, which Intel cores compute through a microcode assist: ONNX Runtime's Softmax over a causal-masked
    (32, 192, 192) block took 2.73 ms on the Xeon of benchmarks/RESULTS.md (2026-12-05, fifty-fourth session),
    0.36 ms with them flushed. A value below 1.2e-38 becomes zero, far below any tolerance on the probabilities."""
    # Two small normal floats multiply to a denormal unless the thread already flushes them.
    switch = enabled and float(np.float32(1e-30) * np.float32(1e-10)) != 0.0
    if switch:
        torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if switch:
            torch.set_flush_denormal(False)


def _quota(path: Path) -> float | None:
    """CPUs one cgroup's quota file allows: cgroup v2 ``cpu.max`` ("QUOTA PERIOD" or "max PERIOD") or v1
    ``cpu.cfs_quota_us`` beside ``cpu.cfs_period_us`` (-1 = none); None where unset or unreadable."""
    try:
        if path.name == "cpu.max":
            quota, period = path.read_text().split()[:2]
        else:
            quota, period = path.read_text().strip(), (path.parent / "cpu.cfs_period_us").read_text().strip()
        if quota in ("max", "-1") or float(period) <= 0:
            return None
        return float(quota) / float(period)
    except (OSError, ValueError):
        return None


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, self_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """CPUs this process's cgroups let it use (the smallest CFS quota / period on its cgroup's path, cgroup v2 or
    v1), or None when none sets a quota. Container CPU limits (Kubernetes, ``docker --cpus``) work this way while
    every host CPU stays in the affinity mask, so one thread per CPU of the mask would oversubscribe the quota."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return None
    files = []
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _, controllers, rel = fields
        parts = [p for p in rel.split("/") if p]
        if controllers == "":  # cgroup v2
            bases, name = [root], "cpu.max"
        elif "cpu" in controllers.split(","):
            bases, name = [root / controllers, root / "cpu", root / "cpu,cpuacct"], "cpu.cfs_quota_us"
        else:
            continue
        for base in dict.fromkeys(bases):  # the leaf's folder and every folder above it
            files += [base.joinpath(*parts[:depth], name) for depth in range(len(parts), -1, -1)]
    limits = [q for q in map(_quota, files) if q is not None]
    return min(limits) if limits else None


def usable_cpus() -> int:
    """CPUs this process may use: the CPUs it may run on (its affinity mask), at most as many as its cgroup's CPU
    quota allows, rounded down (threads beyond a quota are throttled in turns, each request waiting), at least one."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    return max(1, min(cpus, int(limit))) if limit is not None else cpus


def default_split(threads: int) -> int:
    """Chunks side by side for ``threads`` threads: one thread each, at most one per usable CPU (more chunks
    than CPUs would only take turns)."""
    return max(1, min(threads, usable_cpus()))


class _Slots:
    """One graph's ONNX Runtime sessions, ``split`` runs of it at a time: with one thread per run, concurrent calls
    of one session (ONNX Runtime runs each on its calling thread; the weights held and pre-packed once); with more,
    a session per slot, since a session's calls share one intra-op thread pool. Each run fetches ``outputs``."""

    def __init__(self, graph: bytes, split: int, per: int, providers: list, flush: bool,
                 outputs: tuple[str, ...] = FULL_OUTPUTS, arena: bool = True) -> None:  # fmt: skip
        options = ort_options(per, shared_arena=True, arena=arena)
        self.flush, self.outputs = flush, list(outputs)
        self.sessions = [ort.InferenceSession(graph, sess_options=options, providers=providers)
                         for _ in range(split if per > 1 else 1)]  # fmt: skip
        self.inputs = [i.name for i in self.sessions[0].get_inputs()]
        self._idle: queue.SimpleQueue[ort.InferenceSession] = queue.SimpleQueue()
        for i in range(split):
            self._idle.put(self.sessions[i % len(self.sessions)])

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        session = self._idle.get()
        try:
            with flushed_denormals(self.flush):
                return session.run(self.outputs, feed)
        finally:
            self._idle.put(session)


# From this many concurrent one-thread chunks the candidate stage's sessions allocate through malloc rather than ONNX
# Runtime's arena (``_SlotsBySize``): measured faster at 8 and 12, slower at 1 and 2; not measured in between.
MALLOC_FROM_SLOTS = 8


# From this many slots (one thread each) a row whose chunks fill every slot runs staged, cut by ``guided_bounds``:
# against the even cut, 1.08-1.16x at 8 threads, 1.06-1.09x at 12 and 1.45-1.54x at 16 (where each slot had run one
# whole-graph chunk) on the H100 machine's host, 1.05-1.32x for 128 / 200 candidates at 8 / 16; 0.98-1.01x at 2
# threads on the project machine, and 0.87-0.90x for a row of 24 candidates there (benchmarks/RESULTS.md, 2026-12-06,
# sixty-third session). Below 8 slots, forced on there: 0.92-1.27x on 128 / 256 candidates at 4 to 7 threads, gaining
# only while the host was loaded (0.98-1.06x on a quiet one), and 0.84-0.95x for rows of 64 at 4, 6 and 7 threads
# (1.01x at 5), which leave one whole-graph chunk per slot for the staged path (sixty-fourth session).
GUIDED_FROM_SLOTS = 8


# A row's last dense group (after its last chunk, while every slot waits) is cut into parts of at least this many
# candidates, one per slot: dense.onnx costs ~39 us a candidate on one thread from 64 candidates a run, 44 at 32,
# 48 at 16 and 84 at 8 (project machine).
LAST_PART_ROWS = 32


class _SlotsBySize:
    """The candidate stage with one ``_Slots`` (one session, one thread per run) per chunk size, each made on its
    size's first run.

    ONNX Runtime reuses a session's memory plan only for a run whose every intermediate has exactly the planned size,
    and files plans under an XOR of the input dimensions, in which the candidate stage's chunk size cancels (two
    per-candidate inputs): in one session, the first chunk at given sequence lengths decides the plan for every size,
    and chunks of other sizes allocate their intermediates one by one from the arena that every slot shares. Where a
    request's chunks are not of that size (256 candidates at 6, 10 or 12 threads; 200 at 8) the request ran 1.08-1.19x
    slower on the H100 machine's host than with a session per size (benchmarks/RESULTS.md, 2026-12-06). A session of
    the candidate stage holds only its small weights (the nine sizes of max_chunk 16: 6 MB more resident than one;
    guided chunks take all sixteen).

    With ``arena=False`` (``MALLOC_FROM_SLOTS`` slots or more) their runs allocate through the C library's malloc,
    not ONNX Runtime's arena: one arena is one lock for every concurrent run of a session, every intermediate a plan
    does not cover and every kernel's scratch buffer taking it. Without it DESIGN §5's request ran 1.00-1.10x faster
    at 8 threads on the H100 machine's host and streams of requests of new shapes 1.05-1.08x at 8 and 12 threads;
    on the 2-thread project machine 0.98-0.99x at 1 and 2 threads, with 20-60 MB more resident (benchmarks/
    RESULTS.md, 2026-12-06)."""

    runs_to_plan = 1  # runs of a chunk size that plan it: one session per size

    def __init__(self, graph: bytes, split: int, providers: list, flush: bool, outputs: tuple[str, ...],
                 first: int, arena: bool = True) -> None:  # fmt: skip
        self._make = functools.partial(_Slots, graph, split, 1, providers, flush, outputs, arena=arena)
        self._by_size: dict[int, _Slots] = {}
        self._lock = threading.Lock()
        made = self.slots(first)
        self.inputs, self.outputs = made.inputs, made.outputs

    def slots(self, size: int) -> _Slots:
        """The slots for chunks of ``size`` candidates (made now if this is the size's first run)."""
        made = self._by_size.get(size)  # every chunk's run: no lock once the size has its slots
        if made is None:
            with self._lock:
                made = self._by_size.get(size) or self._by_size.setdefault(size, self._make())
        return made

    @property
    def sessions(self) -> list[ort.InferenceSession]:
        return [s for slots in list(self._by_size.values()) for s in slots.sessions]

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.slots(len(feed["cand_request"])).run(feed)


# A per-candidate input of the candidate stage that no node reads (``_AsyncSlots``): ONNX Runtime files a memory plan
# under the XOR of every input dimension, in which the two per-candidate inputs' chunk size cancels; with a third it
# does not, and one session keeps a plan per chunk size.
CHUNK_ROWS = "chunk_rows"


class _AsyncSlots:
    """The candidate stage of guided rows (``GUIDED_FROM_SLOTS`` one-thread slots and more): a session per slot whose
    runs ONNX Runtime starts on the session's own worker thread (``start``: ``run_async``), so that no Python thread
    waits for the interpreter lock before its slot can start.

    Through ``run`` every slot's pool thread takes Python's lock to convert its chunk's inputs, and the slots start one
    after another: on the H100 machine's host ~55 us per hand-over of the lock plus ~2 us per input (stair probe,
    benchmarks/RESULTS.md, 2026-12-06, sixty-seventh session), the sixteenth slot ~3 ms after the first. Here the
    calling thread starts the first chunk of every slot and each finished run's callback starts its slot's next one
    (the sixteenth slot 1.4-1.8 ms sooner). Each session gets a third per-candidate input (``CHUNK_ROWS``), so that it
    keeps a memory plan per chunk size (a session per slot and size would be 16 x 13 sessions with a thread each).
    Against ``_SlotsBySize`` with a pool thread per slot on DESIGN §5's request, on the H100 machine's host (its 105 MiB
    L3 kind): 1.01-1.08x at 16 threads, 1.12x at 12, 1.15x at 8; the same without the third input 0.98-0.99x on both
    kinds (sixty-seventh session); as shipped 1.08x at 16 and 1.14x at 8 (sixty-eighth).

    A session has two intra-op threads: one worker of its own (which runs ``run_async``'s runs, one operator at a time
    on that thread) beside the calling thread's share, which only a synchronous ``run`` (the warm-up) takes. Idle
    workers do not spin; they flush denormals as ``flushed_denormals`` does (``flush``)."""

    def __init__(self, graph: bytes, split: int, providers: list, flush: bool, outputs: tuple[str, ...],
                 arena: bool) -> None:  # fmt: skip
        model = onnx.load_from_string(graph)
        model.graph.input.append(onnx.helper.make_tensor_value_info(CHUNK_ROWS, onnx.TensorProto.BOOL, ["chunk"]))
        options = ort_options(2, arena=arena)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if flush:
            options.add_session_config_entry("session.set_denormal_as_zero", "1")
        keyed = model.SerializeToString()
        self.flush, self.outputs = flush, list(outputs)
        self.sessions = [ort.InferenceSession(keyed, sess_options=options, providers=providers) for _ in range(split)]
        self.inputs = [i.name for i in self.sessions[0].get_inputs() if i.name != CHUNK_ROWS]
        self.runs_to_plan = split  # each session plans each chunk size on its first run of it
        self._next: queue.SimpleQueue[ort.InferenceSession] = queue.SimpleQueue()
        for session in self.sessions:
            self._next.put(session)

    def _keyed(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return feed | {CHUNK_ROWS: np.ones(len(feed["cand_request"]), dtype=bool)}

    def start(self, session: ort.InferenceSession, feed: dict[str, np.ndarray],
              callback: Callable[[list[np.ndarray], object, str], None], data: object) -> None:  # fmt: skip
        """Start a run of ``feed`` on ``session``'s worker thread; ``callback(outputs, data, error)`` follows there."""
        session.run_async(self.outputs, self._keyed(feed), callback, data)

    def run(self, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
        """A run on the calling thread, on each session in turn (the warm-up plans every session's chunk sizes)."""
        session = self._next.get()
        try:
            with flushed_denormals(self.flush):
                return session.run(self.outputs, self._keyed(feed))
        finally:
            self._next.put(session)


def _candidates(feed: dict[str, np.ndarray], a: int, z: int) -> dict[str, np.ndarray]:
    """``feed`` for candidates [a, z): the per-candidate inputs sliced (views), the request's whole."""
    return {k: (v[a:z] if k in ROW_INPUTS else v) for k, v in feed.items()}


_Finished = tuple[int, int, list[np.ndarray]]  # a finished chunk: its candidates [start, end) and its outputs


class _StagedRow:
    """One request row's chunks, with ``dense.onnx`` started on finished ones while others still run.

    Side-by-side chunks do not finish together: on a shared host some cores run slower than others (8 to 16 slots on
    the H100 machine's host: 15-24 % of the chunk phase's slot time idle, waiting for the last chunks; benchmarks/
    RESULTS.md, 2026-12-06), and the dense stage used to start only after the last of them. Here each finished chunk
    joins a group, and a group of ``group`` candidates (or the last, whatever is left) becomes one run of
    ``dense.onnx``: queued behind the chunks still to start, it runs on slots that would otherwise wait, and only the
    last group's run follows the last chunk (there, 8 to 12 slots: 2.0-3.3 ms from the last chunk to the
    probabilities where 3.5-4.9 ms had been; the request 1.03-1.06x at 6 to 12 threads). That last group, which
    every slot waits for, is cut into parts of ``LAST_PART_ROWS`` candidates or more, one per slot at most, and idle
    pool threads are woken to take them (``_queue_last``; 2 threads, 128 candidates in two parts: the request 1.03x
    on the project machine, sixty-eighth session).

    The row's work is one queue (chunks first, then dense groups as they fill) that each slot empties in turn, cutting
    its chunk's inputs as it takes it: with ``_AsyncSlots`` (guided rows) the calling thread starts one chunk per slot
    and each finished chunk's callback runs the queued dense groups and starts the slot's next chunk (``_next``);
    otherwise one pool worker per slot takes the tasks (``_work``). A pool task and a feed per chunk, made by the
    calling thread before any slot could start, had put the first slot's start 0.44 ms later on the H100 machine's
    host (36 chunks; the request 1.018x at 16 threads, 0.99x at 8; benchmarks/RESULTS.md, 2026-12-06, sixty-sixth
    session)."""

    def __init__(self, backend: CpuBackend, feed: dict[str, np.ndarray], bounds: list[tuple[int, int]],
                 group: int) -> None:  # fmt: skip
        assert backend._pool is not None and backend.staged is not None and backend.dense is not None
        self.backend, self.feed, self.group = backend, feed, group
        self.n, self.left = bounds[-1][1], len(bounds)
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.ready: list[_Finished] = []  # finished chunks not yet in a dense run, in candidate order
        self.dense: list[tuple[list[tuple[int, int]], list[np.ndarray]]] = []
        self.error: BaseException | None = None
        self.staged = {k: feed[k] for k in backend.staged.inputs}
        self.rows = [k for k in self.staged if k in ROW_INPUTS]
        self.todo: collections.deque[tuple[Callable[..., None], tuple]] = collections.deque(
            (self._chunk, bound) for bound in bounds)  # fmt: skip
        self.unfinished = len(bounds)  # queued or running tasks; the row is done at none
        slots = backend.staged
        if isinstance(slots, _AsyncSlots):  # the first chunk of each slot started from here (``_AsyncSlots``)
            for session in slots.sessions[:min(backend.split, len(bounds))]:
                self._next(session)
        else:
            for _ in range(min(backend.split, len(bounds))):
                backend._pool.submit(self._work)

    def _pop(self) -> tuple[Callable[..., None], tuple] | None:
        try:
            return self.todo.popleft()
        except IndexError:
            return None

    def _run(self, task: Callable[..., None], args: tuple) -> None:
        """One task of the row, dropped if the row has already failed; whatever it raises is kept for ``result``."""
        try:
            if self.error is None:
                task(*args)
        except BaseException as e:  # noqa: BLE001 (raised again by result())
            self._fail(e)
        self._finished()

    def _fail(self, error: BaseException) -> None:
        with self.lock:
            self.error = self.error or error

    def _finished(self) -> None:
        with self.lock:
            self.unfinished -= 1
            if self.unfinished == 0:
                self.done.set()

    def _work(self) -> None:
        """One slot's worker: the row's tasks in queue order until none is left."""
        while (item := self._pop()) is not None:
            self._run(*item)

    def _next(self, session: ort.InferenceSession) -> None:
        """``_AsyncSlots``: the row's next tasks for the slot of ``session``, in queue order: dense groups run on this
        thread, and the first chunk is started on the session (its callback, ``_chunk_done``, goes on from there)."""
        while (item := self._pop()) is not None:
            task, args = item
            if task != self._chunk or self.error is not None:
                self._run(task, args)
                continue
            a, z = args
            try:
                self.backend.staged.start(session, self._cut(a, z), self._chunk_done, (session, a, z))  # type: ignore[union-attr]
                return
            except BaseException as e:  # noqa: BLE001 (raised again by result())
                self._fail(e)
                self._finished()

    def _chunk_done(self, outputs: list[np.ndarray], data: tuple, error: str) -> None:
        """``run_async``'s callback, on the session's worker thread: the chunk's place in a group, then the slot's next
        tasks. Nothing may leave it raised (ONNX Runtime's thread would take it)."""
        session, a, z = data
        try:
            if error:
                raise RuntimeError(f"cpu backend: a chunk's run failed: {error}")
            self._chunk_finished(a, z, list(outputs))
        except BaseException as e:  # noqa: BLE001 (raised again by result())
            self._fail(e)
        self._finished()
        self._next(session)

    def _cut(self, a: int, z: int) -> dict[str, np.ndarray]:
        """The candidate stage's inputs for candidates [a, z): the row's dict with the per-candidate inputs sliced."""
        chunk = dict(self.staged)
        for k in self.rows:
            chunk[k] = chunk[k][a:z]
        return chunk

    def _chunk(self, a: int, z: int) -> None:
        """One chunk's run on this thread, then its place in a group."""
        self._chunk_finished(a, z, self.backend.staged.run(self._cut(a, z)))  # type: ignore[union-attr]

    def _chunk_finished(self, a: int, z: int, outs: list[np.ndarray]) -> None:
        """A finished chunk joins the row's ready chunks; a group that is full (or the last) queues its dense run."""
        with self.lock:
            self.left -= 1
            bisect.insort(self.ready, (a, z, outs), key=lambda c: c[0])
            if self.left == 0:
                self._queue_last()
            elif sum(y - x for x, y, _ in self.ready) >= self.group:
                self._queue_dense(self.ready)
            else:
                return
            self.ready = []

    def _queue_last(self) -> None:
        """The row's last dense group, after its last chunk, cut into parts of at least ``LAST_PART_ROWS`` candidates,
        one per slot at most, with idle pool threads woken to take them (the lock held): every slot waits for it."""
        rows = sum(z - a for a, z, _ in self.ready)
        parts = max(1, min(self.backend.split, rows // LAST_PART_ROWS))
        for part in _cut_rows(self.ready, parts):
            self._queue_dense(part)
        for _ in range(parts - 1):
            self.backend._pool.submit(self._work)  # type: ignore[union-attr]

    def _queue_dense(self, group: list[_Finished]) -> None:
        """``dense.onnx`` on ``group``'s finished chunks (in candidate order), queued as one task (the lock held)."""
        spans = [(a, z) for a, z, _ in group]
        feed = {k: v for k, v in self.feed.items() if k in self.backend.dense.inputs}  # type: ignore[union-attr]
        for k in CANDIDATE_INPUTS:
            if k in feed:
                feed[k] = np.concatenate([feed[k][a:z] for a, z in spans])
        for i, k in enumerate(SEQUENCE_OUTPUTS):
            feed[k] = np.concatenate([c[2][i] for c in group])
        self.unfinished += 1
        self.todo.append((self._dense, (spans, feed)))

    def _dense(self, spans: list[tuple[int, int]], feed: dict[str, np.ndarray]) -> None:
        parts = self.backend.dense.run(feed)  # type: ignore[union-attr]
        with self.lock:
            self.dense.append((spans, parts))

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities and scores of the row's candidates, in order, once every chunk and dense run is done."""
        self.done.wait()
        if self.error is not None:
            raise self.error
        out: list[np.ndarray] = []
        for spans, parts in self.dense:
            if not out:
                out = [np.empty((self.n, *p.shape[1:]), p.dtype) for p in parts]
            at = 0
            for a, z in spans:
                for whole, part in zip(out, parts, strict=True):
                    whole[a:z] = part[at:at + z - a]
                at += z - a
        probs, scores = out
        return probs, scores


def _cut_rows(chunks: list[_Finished], parts: int) -> list[list[_Finished]]:
    """Finished chunks (start, end, outputs), cut into ``parts`` groups in their order whose candidate counts differ
    by one at most; a chunk may be cut between two groups (its outputs' rows sliced). ``parts`` <= the candidates."""
    rows = sum(z - a for a, z, _ in chunks)
    cut: list[list[_Finished]] = [[] for _ in range(parts)]
    part, placed = 0, 0
    for start, end, outs in chunks:
        a = start
        while a < end:
            b = min(end, a + rows * (part + 1) // parts - placed)
            cut[part].append((a, b, [o[a - start:b - start] for o in outs]))
            placed, a = placed + b - a, b
            if placed == rows * (part + 1) // parts:
                part += 1
    return cut


def _joined(pending: list) -> list[np.ndarray]:
    """Each output of the runs (futures or finished outputs, in candidate order) joined along the candidates."""
    outs = [p.result() if isinstance(p, Future) else p for p in pending]
    return [np.concatenate(col) if len(outs) > 1 else col[0] for col in zip(*outs, strict=True)]


class CpuBackend:
    """ONNX Runtime on ``full.onnx``: one request row (distinct user) per run, its candidates in chunks
    run side by side.

    When a row's chunks outnumber the slots (each slot would run several in turn), the work that depends on the
    request alone runs once first (``request_stage``: normalising the sequences, TransAct's row share of its
    first layer), the chunks run the graph from its results up to the sequence-module outputs ``v1`` / ``v2``, and
    ``dense.onnx`` (input norm, DCN, MLP, heads) scores the row's candidates in groups of about a slot's share
    (``_StagedRow``: each group as soon as its chunks are done, on slots that would otherwise wait for the last
    chunks), where in chunks the DCN's products (1,184 x 1,184 in the default config) ran at a chunk's rows, their
    weights read again after every chunk's attention had pushed them out of the caches (``dense_stage``: 1.016x
    the request of DESIGN §5 on 2 threads, 1.034x at 1,024 candidates, the same probabilities bit for bit; a bundle
    whose full.onnx lacks the two outputs runs its chunks to the end). Otherwise every chunk runs the whole graph,
    which is quicker when each slot runs one chunk (benchmarks/RESULTS.md, 2026-12-05)."""

    name = "cpu"

    def __init__(self, bundle: LoadedBundle, options: SessionOptions) -> None:
        self.config = bundle.config
        threads = options.threads or usable_cpus()
        self.split = min(options.split or default_split(threads), threads)
        self.max_chunk = options.max_chunk or MAX_CHUNK
        per = max(1, threads // self.split)
        graph, providers = bundle.graph_bytes("full.onnx"), onnx_providers(options.onnx_provider)
        model = onnx.load_from_string(graph)
        names = [i.name for i in model.graph.input]
        if tuple(names) != INPUT_NAMES:
            raise ValueError(f"full.onnx: unexpected inputs {names}")
        # Each run flushes denormals on the thread that makes it (``flushed_denormals``). With more than one thread
        # per chunk, ONNX Runtime's helper threads keep their default mode.
        self.flush = options.flush_denormals
        self.whole = _Slots(graph, self.split, per, providers, self.flush)
        self.sessions = self.whole.sessions
        stage, dense_stage = None, False
        if options.request_stage:
            outputs = {o.name for o in model.graph.output}
            if options.dense_stage and set(SEQUENCE_OUTPUTS) <= outputs:
                upto = keep_outputs(model, SEQUENCE_OUTPUTS)  # item_dense, for one, is read by dense.onnx alone
                reads = {i.name for i in upto.graph.input}
                stage = split_request_stage(upto, [k for k in CANDIDATE_INPUTS if k in reads])
                dense_stage = stage is not None
            stage = stage or split_request_stage(model, CANDIDATE_INPUTS)
        self.request_session: ort.InferenceSession | None = None
        self.staged: _Slots | _SlotsBySize | _AsyncSlots | None = None
        self.guided = False
        self.dense: _Slots | None = None
        self.handoff: list[str] = []
        self._request_inputs: list[str] = []
        if stage is not None:
            # One thread: 0.80 ms at 16,000 lifelong actions where two took 0.88 (their pool's start and join
            # outweigh the split work), and no pool left spinning on cores the chunks need.
            self.request_session = ort.InferenceSession(stage.request.SerializeToString(),
                                                        sess_options=ort_options(1, shared_arena=True),
                                                        providers=providers)  # fmt: skip
            outs = SEQUENCE_OUTPUTS if dense_stage else FULL_OUTPUTS
            candidates = stage.candidates.SerializeToString()
            arena = self.split < MALLOC_FROM_SLOTS
            # Guided chunks take many sizes: only where each size has a memory plan of its own (one thread per chunk),
            # and with a dense stage to score the row's candidates after them. Their rows start their chunks with
            # run_async (_AsyncSlots); other rows with one thread per chunk run a session per chunk size
            # (_SlotsBySize); with more threads, a session per slot already (_Slots).
            self.guided = per == 1 and dense_stage and self.split >= GUIDED_FROM_SLOTS
            if self.guided:
                self.staged = _AsyncSlots(candidates, self.split, providers, self.flush, outs, arena)
            elif per == 1:
                self.staged = _SlotsBySize(candidates, self.split, providers, self.flush, outs, self.max_chunk, arena)
            else:
                self.staged = _Slots(candidates, self.split, per, providers, self.flush, outs)
            if dense_stage:
                self.dense = _Slots(bundle.graph_bytes("dense.onnx"), self.split, per, providers, self.flush,
                                    DENSE_OUTPUTS)  # fmt: skip
            self.handoff = list(stage.handoff)
            self._request_inputs = [i.name for i in self.request_session.get_inputs()]
        self.threads_per_chunk = per
        self._pool = ThreadPoolExecutor(self.split, "transact-cpu") if self.split > 1 else None

    @property
    def layout(self) -> str:
        """Chunks side by side x threads each, for reports: "16 x 1 thread"."""
        per = self.threads_per_chunk
        return f"{self.split} x {per} thread{'s' if per > 1 else ''}"

    def run(self, plan: BatchPlan) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities (N, H) and scores (N,) in the plan's candidate order.

        ``full.onnx`` scores every request row's sequences against every candidate of the batch (R x N x L
        selection work, exactly right for one row), so a batch of R rows would cost R times the work of
        its parts: each row runs on its own, with all the requests that share it, in chunks of candidates."""
        if plan.num_rows <= 1:
            return self._submit(plan.padded_inputs())()
        groups = []
        for row, user in enumerate(plan.users):
            mine = [i for i, r in enumerate(plan.rows) if r == row]
            sub = BatchPlan([plan.requests[i] for i in mine], [user], [0] * len(mine))
            groups.append((mine, sub, self._submit(sub.padded_inputs())))
        parts: list[tuple[np.ndarray, np.ndarray]] = [None] * len(plan.requests)  # type: ignore[list-item]
        for mine, sub, result in groups:
            probs, scores = result()
            for i, p, s in zip(mine, sub.split(probs), sub.split(scores), strict=True):
                parts[i] = (p, s)
        return np.concatenate([p for p, _ in parts]), np.concatenate([s for _, s in parts])

    def _submit(self, feed: dict[str, np.ndarray]) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
        """Start one row's chunks; the returned call waits for the row's probabilities and scores."""
        n = len(feed["cand_request"])
        bounds = chunk_bounds(n, self.split, max_chunk=self.max_chunk)
        if self.guided and len(bounds) >= self.split:  # always more guided chunks than slots: staged below
            bounds = guided_bounds(n, self.split, self.max_chunk)
        if self.request_session is None or self.staged is None or len(bounds) <= self.split:
            return functools.partial(self._joined_outputs, self._start(self.whole, feed, bounds))
        staged = self._with_request_stage(feed)
        if self.dense is None:
            return functools.partial(self._joined_outputs, self._start(self.staged, staged, bounds))
        if self._pool is not None:
            return _StagedRow(self, staged, bounds, group=-(-n // self.split)).result
        sequences = dict(zip(SEQUENCE_OUTPUTS, _joined(self._start(self.staged, staged, bounds)), strict=True))
        return functools.partial(self._joined_outputs, self._start(self.dense, feed | sequences, [(0, n)]))

    def _with_request_stage(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``feed`` and the request stage's outputs on it (what the candidate stage reads)."""
        assert self.request_session is not None
        with flushed_denormals(self.flush):
            handed = self.request_session.run(self.handoff, {k: feed[k] for k in self._request_inputs})
        return feed | dict(zip(self.handoff, handed, strict=True))

    @staticmethod
    def _joined_outputs(pending: list) -> tuple[np.ndarray, np.ndarray]:
        probs, scores = _joined(pending)
        return probs, scores

    def _start(self, slots: _Slots | _SlotsBySize, feed: dict[str, np.ndarray], bounds: list[tuple[int, int]]) -> list:
        """Run ``slots``' graph on each [start, end) of the per-candidate inputs, side by side where there is a pool."""
        feed = {k: feed[k] for k in slots.inputs}
        if len(bounds) == 1:
            return [slots.run(feed)]
        chunks = [_candidates(feed, a, z) for a, z in bounds]
        if self._pool is None:
            return [slots.run(chunk) for chunk in chunks]
        return [self._pool.submit(slots.run, chunk) for chunk in chunks]

    def warmup(self, limits: Limits) -> None:
        """Run a few shapes once through every session (the request stage's too), so that ONNX Runtime has planned
        its memory before the first request, then each chunk size of the candidate stage (``_plan_chunk_sizes``).
        The largest shapes come first: where one session serves every chunk size (several threads per chunk), its
        first run at given sequence lengths decides the plan that every chunk size then meets (``_SlotsBySize``)."""
        every = min(limits.max_candidates, self.split * self.max_chunk)
        staged = min(limits.max_candidates, self.split * self.max_chunk * 2)  # chunks in turns: the request stage
        shapes = list(dict.fromkeys([(1, staged), (1, every), (1, 1), (1, 16), (2, 64)]))  # small limits repeat some
        for reqs in warmup_requests(self.config, limits, shapes):
            self.run(plan_batch(reqs))
        if isinstance(self.staged, (_SlotsBySize, _AsyncSlots)):
            self._plan_chunk_sizes(limits)

    def _plan_chunk_sizes(self, limits: Limits) -> None:
        """A run of the candidate stage per chunk size the staged chunks take (``chunk_bounds``: MIN_CHUNK to
        max_chunk; ``guided_bounds``: 1 to max_chunk, its last chunk being what is left), largest first, at the
        longest sequences, on each session that plans it (``runs_to_plan``); other sizes are planned on their first
        run."""
        smallest = 1 if self.guided else min(MIN_CHUNK, self.max_chunk)
        sizes = range(min(self.max_chunk, limits.max_candidates), smallest - 1, -1)
        if not sizes or self.request_session is None or self.staged is None:
            return
        (req,) = warmup_requests(self.config, limits, [(1, sizes[0])])[0]
        feed = self._with_request_stage(plan_batch([req]).padded_inputs())
        feed = {k: feed[k] for k in self.staged.inputs}
        for size in sizes:
            for _ in range(self.staged.runs_to_plan):  # type: ignore[union-attr]
                self.staged.run(_candidates(feed, 0, size))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()

