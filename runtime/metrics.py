"""Prometheus metrics of the serving process (one registry per app, exposed at ``/metrics``).

With several server processes (``transact serve --workers N``) ``PROMETHEUS_MULTIPROC_DIR`` is set and
every worker writes its values there; any worker's ``/metrics`` then reports the sums over all of them
(queue depth summed, readiness the minimum over live workers).
"""

from __future__ import annotations

import os
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess as prometheus_multiprocess

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
CANDIDATE_BUCKETS = (1, 16, 64, 256, 1024, 4096, 16384, 65536)
ERROR_KINDS = ("malformed", "invalid_input", "body_too_large", "unknown_model", "not_ready", "internal")


def forget_dead_workers(metrics_dir: str | os.PathLike) -> list[int]:
    """Drop the live gauges (queue depth, readiness) of worker processes that no longer run, e.g. one the
    supervisor replaced after it died; their counters and histograms stay in the sums. Returns their pids."""
    dead = set()
    for f in Path(metrics_dir).glob("gauge_live*_*.db"):
        pid = int(f.stem.rsplit("_", 1)[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            dead.add(pid)
        except PermissionError:  # alive, someone else's
            pass
    for pid in dead:
        prometheus_multiprocess.mark_process_dead(pid, str(metrics_dir))
    return sorted(dead)


class ServerMetrics:
    """Requests, errors by kind, latency, batch sizes, de-duplication and queue depth."""

    def __init__(self, model_name: str) -> None:
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.registry = CollectorRegistry()
        r, m = self.registry, model_name
        self.requests = Counter("transact_infer_requests", "Inference requests received.", ["model"], registry=r)
        self.success = Counter("transact_infer_success", "Inference requests answered with 200.", ["model"],
                               registry=r).labels(m)  # fmt: skip
        self.errors = Counter("transact_infer_errors", "Failed requests by kind.", ["model", "kind"], registry=r)
        self.latency = Histogram("transact_request_latency_seconds", "Infer request latency, body read to reply.",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=r).labels(m)  # fmt: skip
        self.batch_size = Histogram("transact_batch_size", "Requests per model batch.", ["model"],
                                    buckets=SIZE_BUCKETS, registry=r).labels(m)  # fmt: skip
        self.batch_rows = Histogram("transact_batch_rows", "Request rows per model batch after de-duplication.",
                                    ["model"], buckets=SIZE_BUCKETS, registry=r).labels(m)  # fmt: skip
        self.batch_candidates = Histogram("transact_batch_candidates", "Candidates per model batch.", ["model"],
                                          buckets=CANDIDATE_BUCKETS, registry=r).labels(m)  # fmt: skip
        self.compute = Histogram("transact_batch_compute_seconds", "Model time per batch.", ["model"],
                                 buckets=LATENCY_BUCKETS, registry=r).labels(m)  # fmt: skip
        self.batched_requests = Counter("transact_batched_requests", "Requests run in model batches.", ["model"],
                                        registry=r).labels(m)  # fmt: skip
        self.request_rows = Counter("transact_request_rows", "Request rows run (fewer than requests when de-dup "
                                    "merged identical users).", ["model"], registry=r).labels(m)  # fmt: skip
        self.deduplicated = Counter("transact_deduplicated_requests", "Requests that shared another request's row.",
                                    ["model"], registry=r).labels(m)  # fmt: skip
        self.candidates = Counter("transact_candidates_scored", "Candidates scored.", ["model"], registry=r).labels(m)
        self.queue_depth = Gauge("transact_queue_depth", "Requests waiting for or in a model batch.", ["model"],
                                 registry=r, multiprocess_mode="livesum").labels(m)  # fmt: skip
        self.ready = Gauge("transact_model_ready", "1 once the bundle is verified and warmed up.", ["model"],
                           registry=r, multiprocess_mode="livemin").labels(m)  # fmt: skip
        self.model = m
        self.requests.labels(m)
        for kind in ERROR_KINDS:
            self.errors.labels(m, kind)

    def error(self, kind: str) -> None:
        self.errors.labels(self.model, kind if kind in ERROR_KINDS else "internal").inc()

    def batch(self, requests: int, rows: int, candidates: int, seconds: float) -> None:
        self.batch_size.observe(requests)
        self.batch_rows.observe(rows)
        self.batch_candidates.observe(candidates)
        self.compute.observe(seconds)
        self.batched_requests.inc(requests)
        self.request_rows.inc(rows)
        self.deduplicated.inc(requests - rows)
        self.candidates.inc(candidates)

    def render(self) -> tuple[bytes, str]:
        if self.multiprocess:  # every worker's values, read from the shared folder
            registry = CollectorRegistry()
            prometheus_multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry), CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
