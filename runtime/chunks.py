"""How the cpu backend cuts a request's candidates into chunks: the sizes and the cut. Plain Python, so that the
command-line help can name the defaults without loading ONNX Runtime."""

from __future__ import annotations

# Fewest candidates worth a run of their own: each run of the whole graph also pays ~1.6 ms on one thread at 16,000
# actions that no candidate needs (the user's share, 0.8 ms: normalising the lifelong sequence, TransAct's row share;
# reading the DCN's weights; ~300 small nodes), against ~0.8 ms per candidate (benchmarks/RESULTS.md, 2026-12-05).
MIN_CHUNK = 8
# Most candidates per run. A run's intermediates grow with its candidates (V2's tokens are 192 x 64 floats each,
# the lifelong scores 16,000), and past a few dozen candidates they spill from the core's L2 cache and then
# crowd the other cores out of the shared L3: on the AMD EPYC of benchmarks/RESULTS.md (2026-12-05, forty-ninth
# session) 256 candidates on 2 threads ran 1.13x faster as 8 chunks of 32 than as 2 of 128, with chunks of 16
# 1.02x behind 32 there while every chunk still paid the user's share and read the DCN's weights. With the request
# stage and the dense stage taking both out of the chunks, 16 is the best size measured on the Intel Xeon of the
# fifty-fifth session: a chunk costs 0.713 ms per candidate on one thread at 16 (0.843 at 8, 0.740 at 32, 0.767 at
# 64), and the request ran 1.045-1.053x faster than with chunks of 32 at 256 candidates, 1.05-1.06x at 64-1,024,
# 1.04x on one thread (48 candidates: 0.98x). With guided chunks on the H100 machine's host, chunks of at most 8 /
# 12 read 0.81-0.85x / 0.91-0.95x at 12 and 16 threads (benchmarks/RESULTS.md, 2026-12-06, sixty-fourth session).
# The default of ``SessionOptions.max_chunk``, which a host may tune.
MAX_CHUNK = 16


def chunk_bounds(n: int, split: int, min_chunk: int = MIN_CHUNK, max_chunk: int = MAX_CHUNK) -> list[tuple[int, int]]:
    """[start, end) of near-equal chunks of ``n`` candidates: enough that none exceeds ``max_chunk``, rounded up
    to a multiple of ``split`` so that the ``split`` slots finish together, but none below ``min_chunk`` (unless
    ``n`` itself is)."""
    parts = -(-n // max(1, max_chunk))
    parts = -(-parts // split) * split
    parts = max(1, min(parts, n // max(1, min_chunk)))
    edges = [n * i // parts for i in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


# Smallest chunk of a guided schedule (``guided_bounds``), which the cpu backend uses where a row's chunks fill every
# slot. A staged chunk (after the request stage) pays ~0.45 ms per run that no candidate needs (one thread, 16,000
# actions): 0.76 ms per candidate in chunks of 4 against 0.68 in chunks of 16 on the 2-vCPU Xeon of benchmarks/
# RESULTS.md (2026-12-06, sixty-third session), which the tail's few chunks of 4 pay for slots that end together.
# Tails of 2 and 3 read 0.95-1.07x against 4 at 8 to 16 threads on the H100 machine's host (sixty-fourth session).
TAIL_CHUNK = 4


def guided_bounds(n: int, split: int, max_chunk: int = MAX_CHUNK,
                  tail_chunk: int = TAIL_CHUNK) -> list[tuple[int, int]]:  # fmt: skip
    """[start, end) of ``n`` candidates' chunks in the order they are queued, by guided self-scheduling: each chunk
    takes a slot's share of the candidates not yet queued (ceil(left / split)), at most ``max_chunk`` and at least
    ``tail_chunk`` (the last chunk: what is left). Slots take the queued chunks as they free up, so a slot that runs
    slower takes fewer candidates, and the last chunks, being small, end close together."""
    tail = max(1, min(tail_chunk, max_chunk))
    bounds, start = [], 0
    while start < n:
        size = min(n - start, max(tail, min(max_chunk, -(-(n - start) // max(1, split)))))
        bounds.append((start, start + size))
        start += size
    return bounds
