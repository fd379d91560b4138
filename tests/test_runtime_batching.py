"""The dynamic batcher: grouping by size and delay, draining on close, failure isolation."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from runtime.batching import BatcherClosed, DynamicBatcher
from runtime.session import BatchResult, Output


def fake_request(i: int):
    return type("R", (), {"i": i, "num_candidates": 1})()


class Recorder:
    def __init__(self, delay: float = 0.0, fail_on: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.delay, self.fail_on = delay, fail_on
        self.lock = threading.Lock()

    def __call__(self, requests) -> BatchResult:
        ids = [r.i for r in requests]
        with self.lock:
            self.batches.append(ids)
        if self.fail_on is not None and self.fail_on in ids:
            raise ValueError(f"bad request {self.fail_on}")
        time.sleep(self.delay)
        outs = [Output(np.full((1, 1), r.i, np.float32), np.full(1, r.i, np.float32)) for r in requests]
        return BatchResult(outs, len(requests), len(requests), self.delay)


def test_concurrent_requests_are_grouped_up_to_max_batch() -> None:
    rec = Recorder()
    b = DynamicBatcher(rec, max_batch=4, max_queue_delay_s=0.2)
    futures = [b.submit(fake_request(i)) for i in range(10)]
    results = [int(f.result(timeout=5).scores[0]) for f in futures]
    b.close()
    assert results == list(range(10))  # every caller gets its own answer
    assert [len(x) for x in rec.batches] == [4, 4, 2]
    assert sorted(i for x in rec.batches for i in x) == list(range(10))


def test_delay_bounds_the_wait_of_a_lone_request() -> None:
    b = DynamicBatcher(Recorder(), max_batch=16, max_queue_delay_s=0.05)
    t0 = time.perf_counter()
    b.submit(fake_request(1)).result(timeout=5)
    waited = time.perf_counter() - t0
    b.close()
    assert 0.04 <= waited < 1.0


def test_close_finishes_queued_requests_then_refuses_new_ones() -> None:
    rec = Recorder(delay=0.05)
    b = DynamicBatcher(rec, max_batch=2, max_queue_delay_s=0.0)
    futures = [b.submit(fake_request(i)) for i in range(6)]
    b.close()
    assert all(f.done() for f in futures)
    assert [int(f.result().scores[0]) for f in futures] == list(range(6))
    with pytest.raises(BatcherClosed):
        b.submit(fake_request(7))
    assert b.depth == 0


def test_a_failing_request_does_not_fail_its_batch_mates() -> None:
    rec = Recorder(fail_on=2)
    b = DynamicBatcher(rec, max_batch=8, max_queue_delay_s=0.1)
    futures = [b.submit(fake_request(i)) for i in range(4)]
    b.close()
    for i, f in enumerate(futures):
        if i == 2:
            with pytest.raises(ValueError, match="bad request 2"):
                f.result()
        else:
            assert int(f.result().scores[0]) == i


def test_without_a_delay_requests_that_arrive_during_a_batch_form_the_next_one() -> None:
    """max_queue_delay 0 (the server's default): a lone request runs at once, and requests that queue
    while a batch runs go together into the next batch, not one by one."""
    rec = Recorder(delay=0.2)
    b = DynamicBatcher(rec, max_batch=8, max_queue_delay_s=0.0)
    t0 = time.perf_counter()
    first = b.submit(fake_request(0))
    while not rec.batches:  # the worker has taken request 0 and is running it
        time.sleep(0.001)
    started = time.perf_counter() - t0
    rest = [b.submit(fake_request(i)) for i in range(1, 6)]
    assert int(first.result(timeout=5).scores[0]) == 0
    assert [int(f.result(timeout=5).scores[0]) for f in rest] == [1, 2, 3, 4, 5]
    b.close()
    assert started < 0.1
    assert rec.batches == [[0], [1, 2, 3, 4, 5]]
