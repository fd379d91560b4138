"""`transact bench BUNDLE`: one request through the runtime vs the eager model on the same device."""

from __future__ import annotations

import argparse
import collections
import contextlib
import platform
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import click
import numpy as np
import torch

from export.bundle import CPU_PROVIDER
from export.commands import check_provider
from transact.batch import Batch
from transact.config import ModelConfig

from .chunks import MAX_CHUNK

CPU_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")


def last_level_cache(root: Path = CPU_CACHES) -> str | None:
    """The largest cache level of the first CPU as Linux's sysfs describes it ("L3 300 MiB"), or None where it does
    not. Lent machines of one CPU model name can differ in it (the H100 machines' hosts: 105 or 300 MiB of L3), and
    their eager PyTorch by a third."""
    found = []  # (level, KiB) of each cache sysfs describes readably
    for index in root.glob("index*"):
        try:
            level = int((index / "level").read_text())
            size = (index / "size").read_text().strip()
            found.append((level, int(size[:-1]) * {"K": 1, "M": 1024, "G": 1024**2}[size[-1].upper()]))
        except (OSError, ValueError, KeyError, IndexError):
            continue
    if not found:
        return None
    level, kib = max(found)
    return f"L{level} {kib // 1024} MiB" if kib % 1024 == 0 else f"L{level} {kib} KiB"


def cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what the platform module knows; with its last-level cache
    where sysfs tells it ("Intel(R) Xeon(R) Processor, L3 300 MiB")."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cache = last_level_cache()
    return f"{name}, {cache}" if cache else name


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in the process instead of returning it to the OS, as PyTorch's
    CPU performance guide advises (through jemalloc or tcmalloc). Eager PyTorch allocates and frees tens of MB
    per operator; with glibc's defaults every large block comes back as fresh pages, and the page faults cost
    whatever the host makes them cost: on one VM the same eager request took 233-400 ms within an hour, 248-257
    with this setting. ONNX Runtime keeps its own arena either way. False where the C library is not glibc or
    refuses the settings (then nothing is changed, or only part of it)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3  # glibc's <malloc.h>
    # Blocks below the mmap threshold come from the heap; older glibc caps the threshold at 32 MB.
    heap = mallopt(m_mmap_threshold, 1 << 30) == 1 or mallopt(m_mmap_threshold, 32 << 20) == 1
    return heap and mallopt(m_trim_threshold, 2**31 - 1) == 1 and mallopt(m_top_pad, 1 << 30) == 1


def take_turns(fns: dict[str, Callable[[], object]], runs: int, warmup: int, block: int = 5) -> dict[str, list[float]]:
    """Milliseconds per call of each function: ``warmup`` calls each, then rounds in which each function in
    turn gets one untimed call and ``block`` timed ones, until each has ``runs`` timed calls. Taking turns
    spreads a slow spell of the machine (shared hosts drift by 10-30 % within minutes) over all of them
    alike; the untimed call lets the previous function's worker threads, which spin for a while after their
    work, go quiet first. A function that runs on a GPU must synchronise before it returns."""
    if runs < 1 or warmup < 0 or block < 1:
        raise ValueError(f"runs must be >= 1, warmup >= 0 and block >= 1; got {runs}, {warmup}, {block}")
    out: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    while any(len(v) < runs for v in out.values()):
        for name, fn in fns.items():
            fn()
            for _ in range(min(block, runs - len(out[name]))):
                t0 = time.perf_counter()
                fn()
                out[name].append((time.perf_counter() - t0) * 1e3)
    return out


def round_ratios(base: list[float], other: list[float], block: int = 5) -> list[float]:
    """``base`` over ``other`` round by round, for two lists timed by ``take_turns`` with the same ``block``: the
    median of each round's block of ``base`` over the median of the same round's block of ``other``. Both blocks of
    a round ran within seconds of each other, so a host whose speed drifts over minutes (shared machines: 10-30 %)
    moves both alike and their ratio much less than either time."""
    if len(base) != len(other) or not base or block < 1:
        raise ValueError(f"two equally long, non-empty lists and block >= 1; got {len(base)}, {len(other)}, {block}")
    return [float(np.median(base[i:i + block]) / np.median(other[i:i + block])) for i in range(0, len(base), block)]


REQUEST_RT = REQUEST_IMP = 100  # DESIGN §5's request: 100 real-time and 100 impression actions


def request_batch(config: ModelConfig, candidates: int, ll: int, seed: int = 0) -> Batch:
    """A random batch of DESIGN §5's request shape: one user with ``ll`` lifelong actions and the real-time and
    impression actions above, ``candidates`` candidates."""
    from transact.data.random_batch import random_batch

    return random_batch(config, 1, candidates, ll=ll, rt=REQUEST_RT, imp=REQUEST_IMP, seed=seed)


def request_shape(candidates: int, ll: int) -> dict[str, int]:
    """``request_batch``'s shape, as the benchmarks' JSON records it."""
    return {"users": 1, "ll": ll, "rt": REQUEST_RT, "imp": REQUEST_IMP, "candidates": candidates}


def eager_forward(model: torch.nn.Module, batch: Batch, fastpath: bool,
                  synchronize: bool = False) -> Callable[[], torch.Tensor]:  # fmt: skip
    """A call of the eager model on ``batch`` for timing: inference mode, PyTorch's transformer fast path on or off
    for the call (restored after); ``synchronize``: wait for the GPU before returning."""
    from transact.model import transformer_fastpath

    def run() -> torch.Tensor:
        with torch.inference_mode(), transformer_fastpath(fastpath):
            out = model(batch)
        if synchronize:
            torch.cuda.synchronize()
        return out

    return run


def thread_counts(text: str) -> list[int]:
    """``--threads``: one count ("8") or several, comma-separated ("1,2,4,8,16"), each at least 1."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"integers separated by commas, got {text!r}") from None
    if min(counts) < 1:
        raise argparse.ArgumentTypeError(f"each thread count must be at least 1, got {text!r}")
    return list(dict.fromkeys(counts))


def random_bundle(out: Path, config: ModelConfig | None = None, seed: int = 0) -> Path:
    """Export a randomly initialised model (``config``, default ``ModelConfig()``) to the bundle folder ``out``
    (replaced if it exists), without the export-time parity run: what the benchmarks time when given no bundle."""
    import tempfile

    from export.bundle import export_bundle
    from transact.checkpoint import save_checkpoint
    from transact.model import RankingModel

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix="transact-ckpt-") as tmp:
        save_checkpoint(Path(tmp) / "ckpt", RankingModel(config or ModelConfig()).eval())
        return export_bundle(Path(tmp) / "ckpt", out, check=False, force=True)


@contextlib.contextmanager
def bundle_or_random(bundle: Path | None, seed: int = 0) -> Iterator[Path]:
    """``bundle`` itself, or when None a random default model exported to a temporary folder that lasts the block:
    what a benchmark script times when given no bundle."""
    if bundle is not None:
        yield bundle
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="transact-bench-") as tmp:
        yield random_bundle(Path(tmp) / "bundle", seed=seed)


def profile_node_times(events: list[dict], skip: int = 1) -> dict:
    """ONNX Runtime profile events (one session's, as ``end_profiling`` writes them) -> node time per run (ms)
    by operator type and by node, the first ``skip`` runs (warm-up) left out, and the number of runs counted."""
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    counted = len(starts) - skip
    if counted < 1:
        raise RuntimeError(f"ONNX Runtime's profile has no model_run events past the first {skip}")
    by_op: collections.Counter[str] = collections.Counter()
    by_node: collections.Counter[str] = collections.Counter()
    seen: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= starts[skip]:
            node = e["name"].removesuffix("_kernel_time")
            by_op[e["args"]["op_name"]] += e["dur"] / 1e3 / counted
            by_node[node] += e["dur"] / 1e3 / counted
            seen[node] += 1
    if any(n != counted for n in seen.values()):
        raise RuntimeError(f"ONNX Runtime's profile: nodes seen {set(seen.values())} times in {counted} runs")
    return {"runs": counted, "by_operator": dict(by_op.most_common()), "by_node": dict(by_node.most_common())}


def latency_stats(ms: list[float]) -> dict[str, float]:
    """p50 / p99 / mean of a list of milliseconds."""
    a = np.asarray(ms, dtype=np.float64)
    return {"p50_ms": float(np.median(a)), "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean())}


@click.command("bench")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--candidates", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--ll", default=None, type=click.IntRange(min=0), help="Lifelong length (default: the config's max).")
@click.option("--runs", default=20, show_default=True, type=click.IntRange(min=1))
@click.option("--warmup", default=3, show_default=True, type=click.IntRange(min=0))
@click.option("--threads", default=None, type=click.IntRange(min=1), help="CPU threads for both sides.")
@click.option("--split", default=None, type=click.IntRange(min=1),
              help="cpu: chunks of the candidates scored side by side, threads / split threads each "
                   "(default: one per thread).")
@click.option("--max-chunk", default=None, type=click.IntRange(min=1),
              help=f"cpu: most candidates per chunk (default {MAX_CHUNK}).")
@click.option("--system-malloc", is_flag=True,
              help="Leave glibc's malloc at its defaults (eager then pays page faults whose cost varies by host).")
@click.option("--onnx-provider", default=CPU_PROVIDER, show_default=True, callback=check_provider,
              help="ONNX Runtime execution provider for the cpu backend's full.onnx.")
def bench_cmd(bundle: Path, device: str, candidates: int, ll: int | None, runs: int, warmup: int,
              threads: int | None, split: int | None, max_chunk: int | None, onnx_provider: str,
              system_malloc: bool) -> None:  # fmt: skip
    """Time one request (1 user, random inputs) through the runtime and through eager PyTorch."""
    from transact.data.random_batch import random_batch

    from .session import Request, Session

    kept = not system_malloc and keep_freed_memory()
    if threads:
        torch.set_num_threads(threads)
    session = Session(bundle, device=device, threads=threads, split=split, max_chunk=max_chunk,
                      onnx_provider=onnx_provider)  # fmt: skip
    cfg = session.config
    batch = random_batch(cfg, 1, candidates, ll=cfg.max_ll if ll is None else ll, rt=cfg.max_rt, imp=cfg.max_imp)
    request = Request.from_batch(batch, 0)
    model = session.bundle.verified.build_model().eval()
    on_gpu = session.backend_name == "cuda"
    eager_batch = batch.to("cuda") if on_gpu else batch
    if on_gpu:
        model = model.cuda()
    parts = [session.backend_name]
    if onnx_provider != CPU_PROVIDER:
        parts.append(onnx_provider)
    if session.backend_name == "cpu":
        parts.append(session.backend.layout)
    path = ", ".join(parts)

    # Eager PyTorch with its transformer fast path on and off, the faster of the two the baseline (which one wins
    # depends on the host: the fast path's fused kernels against the masks it must then build).
    eager_rows = {f"eager PyTorch fp32, fast path {'on' if fp else 'off'}":
                  eager_forward(model, eager_batch, fp, synchronize=on_gpu) for fp in (True, False)}  # fmt: skip
    runtime_row = f"runtime ({path})"
    times = take_turns({runtime_row: lambda: session.score(request), **eager_rows}, runs, warmup)
    rows = {name: latency_stats(ms) for name, ms in times.items()}
    base_row = min(eager_rows, key=lambda name: rows[name]["p50_ms"])
    base = rows[base_row]["p50_ms"]
    rounds = round_ratios(times[base_row], times[runtime_row])
    click.echo(f"1 user, {candidates} candidates, ll {batch.ll.ts.shape[1]}, rt {cfg.max_rt}, imp {cfg.max_imp}; "
               f"{runs} runs each after {warmup} warm-up, taking turns; torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads; malloc: {'freed memory kept' if kept else 'defaults'}")
    click.echo("| path | p50 ms | p99 ms | speed-up (p50) over the faster eager |\n|---|---:|---:|---:|")
    for name, r in rows.items():
        click.echo(f"| {name} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | {base / r['p50_ms']:.2f}x |")
    click.echo(f"runtime over the faster eager, round by round (each round's runs side by side): median "
               f"{np.median(rounds):.2f}x, {min(rounds):.2f}-{max(rounds):.2f}x over {len(rounds)} rounds")
