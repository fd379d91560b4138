"""Side-by-side timings of the Triton kernels and PyTorch on one GPU: every row of DESIGN §5.

    PYTHONPATH=. python benchmarks/kernels.py --out results_dir

For each transformer shape (2 layers, 1 head, d=64, FFN 32, 25% random key padding + causal, position
0 kept valid): nn.TransformerEncoder in fp16, an SDPA implementation of the same layers in fp16, and
(first row) torch.compile of the SDPA version, against ``skut_forward``. For each selection shape
(top-64 of int8 sequences, 256 candidates): repeat_interleave + bmm + topk and a de-duplicated
bmm + topk in PyTorch, against ``nn_select``. Our kernels are timed both as plain launches and
replayed from a CUDA graph (which removes the host launch cost; the PyTorch baselines are eager).
Every kernel configuration swept is first checked against a float64 reference; after the sweep the default
and the best configuration are timed three more times, alternating, and their medians reported. The floor is
max(bytes / measured copy bandwidth, FLOPs / measured fp16 matmul rate).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import statistics
import sys
import time

# Run as a script, this folder would come first on sys.path and its runtime.py would shadow the
# ``runtime`` package: put the repository root there instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.dirname(_HERE))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from torch import nn  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from runtime.kernels import nn_select as nn_mod  # noqa: E402
from runtime.kernels import skut as sk  # noqa: E402
from transact.selection import nn_select_reference  # noqa: E402

DEV = "cuda"
L2_BYTES = 50 * 2**20


# ----------------------------------------------------------------------------------------------
# timing helpers
# ----------------------------------------------------------------------------------------------
def bench_eager(fns) -> float:
    """Median ms per call, cycling over the input sets (so that inputs do not stay in L2)."""
    state = {"i": 0}

    def step():
        fns[state["i"] % len(fns)]()
        state["i"] += 1

    return do_bench(step, warmup=25, rep=200, return_mode="median")


def bench_graph(fns, replays: int = 30) -> float:
    """Median ms per call from a CUDA graph that runs every input set once.

    Each timed replay follows an untimed one, so the GPU is busy while the host launches it and the time is the
    graph's own: a replay timed from an idle GPU also counts the host's launch of the graph, 2-4.6 µs per replay
    on the H100 (the 100,000-row selection, one input set, 108.4 against 106.3 µs; benchmarks/RESULTS.md,
    fifty-second session). do_bench's way of keeping the GPU busy, zeroing a 256 MB buffer ahead of each call,
    leaves L2 full of dirty lines the call must write back (115.5 µs for the same selection)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:
            f()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for f in fns:
            f()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        g.replay()  # untimed: keeps the GPU busy while the host launches the timed replay
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / len(fns))
    times.sort()
    return times[len(times) // 2]


def settle(timings: dict, fns_of: dict, keys: list, rounds: int = 3) -> None:
    """Time ``keys`` (the default and the best configuration) again in ``rounds`` rounds after a sweep, which goes
    first alternating, and keep each one's median over all its timings. A configuration timed once, after the eager
    baselines and the configurations before it, read the 100,000-row selection 12 % slower than interleaved rounds on
    the same H100 (benchmarks/RESULTS.md, fiftieth session)."""
    keys = list(dict.fromkeys(k for k in keys if k in timings))
    samples = {k: [timings[k]] for k in keys}
    for i in range(rounds):
        for k in keys if i % 2 == 0 else keys[::-1]:
            samples[k].append(bench_graph(fns_of[k]))
    for k in keys:
        timings[k] = statistics.median(samples[k])


def kernel_times(fn, calls: int = 20) -> list[tuple[str, float, int]]:
    """Device time of each kernel ``fn`` launches, per call: (name, ms, launches), heaviest first.

    ``fn`` runs once to warm up, then ``calls`` times under the PyTorch profiler."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)
        if t:
            rows.append((ev.key[:60], t / calls / 1000, ev.count // calls))
    return sorted(rows, key=lambda r: -r[1])


def n_sets(bytes_per_set: int) -> int:
    """Input sets to rotate over: enough to exceed twice the L2, at most 8."""
    return max(1, min(8, math.ceil(2 * L2_BYTES / max(bytes_per_set, 1))))


def measure_peaks() -> tuple[float, float]:
    """(copy bandwidth in bytes/s counting read + write, fp16 dense matmul FLOP/s)."""
    src = torch.empty(2**28, dtype=torch.float32, device=DEV).normal_()
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median")
    bw = 2 * src.numel() * 4 / (ms * 1e-3)
    src = dst = None
    a = torch.randn(8192, 8192, device=DEV, dtype=torch.float16)
    b = torch.randn(8192, 8192, device=DEV, dtype=torch.float16)
    ms = do_bench(lambda: a @ b, warmup=10, rep=100, return_mode="median")
    flops = 2 * 8192**3 / (ms * 1e-3)
    return bw, flops


# ----------------------------------------------------------------------------------------------
# transformer
# ----------------------------------------------------------------------------------------------
def make_encoder(d: int = 64, h: int = 1, f: int = 32, n_layers: int = 2, seed: int = 0) -> nn.TransformerEncoder:
    return sk.random_encoder(d, h, f, n_layers, seed).to(DEV)


class SDPAEncoder(nn.Module):
    """The same post-norm layers written with F.scaled_dot_product_attention (fp16 baseline)."""

    def __init__(self, enc: nn.TransformerEncoder, dtype=torch.float16) -> None:
        super().__init__()
        self.layers = [
            {
                "w_in": lay.self_attn.in_proj_weight.detach().to(dtype),
                "b_in": lay.self_attn.in_proj_bias.detach().to(dtype),
                "w_out": lay.self_attn.out_proj.weight.detach().to(dtype),
                "b_out": lay.self_attn.out_proj.bias.detach().to(dtype),
                "w1": lay.linear1.weight.detach().to(dtype),
                "b1": lay.linear1.bias.detach().to(dtype),
                "w2": lay.linear2.weight.detach().to(dtype),
                "b2": lay.linear2.bias.detach().to(dtype),
                "n1": (lay.norm1.weight.detach().to(dtype), lay.norm1.bias.detach().to(dtype), lay.norm1.eps),
                "n2": (lay.norm2.weight.detach().to(dtype), lay.norm2.bias.detach().to(dtype), lay.norm2.eps),
            }
            for lay in enc.layers
        ]
        self.h = enc.layers[0].self_attn.num_heads

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        for p in self.layers:
            qkv = F.linear(x, p["w_in"], p["b_in"]).view(b, s, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=allowed)
            a = F.linear(a.transpose(1, 2).reshape(b, s, d), p["w_out"], p["b_out"])
            x = F.layer_norm(x + a, (d,), *p["n1"][:2], p["n1"][2])
            f = F.linear(F.relu(F.linear(x, p["w1"], p["b1"])), p["w2"], p["b2"])
            x = F.layer_norm(x + f, (d,), *p["n2"][:2], p["n2"][2])
        return x


def transformer_inputs(bsz, s, d, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(bsz, s, d, device=DEV, generator=g).half()
    kpm = torch.rand(bsz, s, device=DEV, generator=g) < 0.25
    kpm[:, 0] = False
    return x, kpm


def transformer_flops_bytes(bsz, s, d, f, n_layers):
    per_layer = 2 * bsz * s * d * 3 * d + 2 * bsz * s * d * d + 2 * 2 * bsz * s * d * f
    per_layer += 2 * 2 * bsz * s * s * d / 2  # causal QK^T and PV
    return n_layers * per_layer, 2 * bsz * s * d * 2 + bsz * s


def check_skut(enc, packed, cfg, bsz_check=8, s=192, causal=True, pool=None):
    """Relative error of ``skut_forward`` against the float64 reference on fresh inputs (inf if NaN)."""
    d = packed.d_model
    x, kpm = transformer_inputs(bsz_check, s, d, seed=123)
    shape = (bsz_check, s, d) if pool is None else (bsz_check, d)
    out = torch.full(shape, float("nan"), dtype=torch.float16, device=DEV)
    sk.skut_forward(x, packed, kpm, causal, pool, config=cfg, out=out)
    ref = sk.skut_reference(enc, x.float(), kpm, causal, pool)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    return err if not math.isnan(err) else float("inf")


def bench_transformer(rows, peaks, log):
    bw, flops_peak = peaks
    enc = make_encoder()
    enc16 = make_encoder().half()
    sdpa = SDPAEncoder(enc)
    packed = sk.pack_encoder_weights(enc, torch.float16)
    results = []
    # Correctness of every swept config first (on S=192 and S=300).
    valid_cfgs = []
    for cfg in sk.SWEEP_CONFIGS:
        try:
            e1, e2 = check_skut(enc, packed, cfg), check_skut(enc, packed, cfg, 4, 300)
        except Exception as exc:  # a config that fails to compile is reported, not used
            log(f"  config {cfg}: FAILED {type(exc).__name__}: {exc}")
            continue
        ok = e1 < 5e-3 and e2 < 5e-3
        info = {k: v for k, v in sk.last_launch_info.items() if k != "config"}
        log(f"  config {cfg}: rel err {e1:.2e} / {e2:.2e} {'ok' if ok else 'WRONG'} {info}")
        if ok:
            valid_cfgs.append(cfg)
    for name, bsz, s, target in rows:
        sets = [transformer_inputs(bsz, s, 64, seed=i) for i in range(n_sets(bsz * s * 64 * 2 * 4))]
        allowed = [
            (~kpm[:, None, None, :]) & torch.ones(s, s, dtype=torch.bool, device=DEV).tril()
            for _, kpm in sets
        ]
        causal = torch.ones(s, s, dtype=torch.bool, device=DEV).triu(1)
        outs = [torch.empty(bsz, s, 64, dtype=torch.float16, device=DEV) for _ in sets]
        wss = [torch.empty(sk.workspace_numel(bsz, s, packed), dtype=torch.float16, device=DEV) for _ in sets]
        r = {"work": name, "B": bsz, "S": s, "target_ms": target}
        with torch.no_grad():
            try:
                r["nn.TransformerEncoder"] = bench_eager(
                    [lambda x=x, m=m, c=causal: enc16(x, mask=c, src_key_padding_mask=m) for x, m in sets]
                )
            except Exception as exc:
                log(f"  nn.TransformerEncoder failed: {exc}")
            r["SDPA eager"] = bench_eager(
                [lambda x=x, a=a: sdpa(x, a) for (x, _), a in zip(sets, allowed, strict=True)]
            )
            if bsz == 256 and s == 192:
                try:
                    comp = torch.compile(sdpa.forward)
                    t0 = time.time()
                    for _ in range(3):
                        comp(sets[0][0], allowed[0])
                    torch.cuda.synchronize()
                    log(f"  torch.compile warm-up {time.time() - t0:.1f}s")
                    r["torch.compile (SDPA)"] = bench_eager(
                        [lambda x=x, a=a, f=comp: f(x, a) for (x, _), a in zip(sets, allowed, strict=True)]
                    )
                except Exception as exc:
                    log(f"  torch.compile failed: {type(exc).__name__}: {exc}")
        default = sk.choose_config(s, packed, bsz, True, torch.device(DEV))
        timings, fns_of = {}, {}
        for cfg in [default] + [c for c in valid_cfgs if c != default]:
            fns_of[cfg] = [
                lambda x=x, m=m, o=o, w=w, c=cfg: sk.skut_forward(
                    x, packed, m, True, None, config=c, out=o, workspace=w
                )
                for (x, m), o, w in zip(sets, outs, wss, strict=True)
            ]
            try:
                timings[cfg] = bench_graph(fns_of[cfg])
            except Exception as exc:
                log(f"  {cfg} failed at B={bsz} S={s}: {exc}")
        settle(timings, fns_of, [default, min(timings, key=timings.get)] if timings else [])
        best = min(timings, key=timings.get) if timings else None
        r["ours default (graph)"] = timings.get(default)
        r["ours best (graph)"] = timings.get(best)
        r["best config"] = str(best)
        r["ours default (launch)"] = bench_eager(
            [
                lambda x=x, m=m, o=o, w=w: sk.skut_forward(x, packed, m, True, None, out=o, workspace=w)
                for (x, m), o, w in zip(sets, outs, wss, strict=True)
            ]
        )
        fl, by = transformer_flops_bytes(bsz, s, 64, 32, 2)
        r["floor_ms"] = max(by / bw, fl / flops_peak) * 1e3
        r["sweep"] = {str(c): t for c, t in timings.items()}
        log(f"  {name}: " + json.dumps({k: v for k, v in r.items() if k != "sweep"}, default=str))
        results.append(r)
    return results


# ----------------------------------------------------------------------------------------------
# NN selection
# ----------------------------------------------------------------------------------------------
def nn_inputs(n_users, length, n_cand, seed):
    g = torch.Generator(device=DEV).manual_seed(seed)
    seq = torch.randint(-127, 128, (n_users * length, 32), device=DEV, generator=g, dtype=torch.int8)
    starts = torch.arange(n_users, device=DEV, dtype=torch.int64) * length
    lens = torch.full((n_users,), length, device=DEV, dtype=torch.int64)
    users = torch.arange(n_users, device=DEV).repeat_interleave(n_cand // n_users)
    cand = torch.randn(n_cand, 32, device=DEV, generator=g).half()
    return seq, starts, lens, cand, users


def torch_repeat_interleave(seq, lens, cand, n_users, length, k):
    items = seq.view(n_users, length, 32).half()
    items = items / items.norm(dim=-1, keepdim=True).clamp_min(1e-3)
    c = F.normalize(cand.float(), dim=-1).half()
    per = items.repeat_interleave(cand.shape[0] // n_users, dim=0)
    s = torch.bmm(per, c[:, :, None]).squeeze(-1)
    valid = (
        torch.arange(length, device=DEV)[None, :] < lens.repeat_interleave(cand.shape[0] // n_users)[:, None]
    )
    return s.masked_fill(~valid, float("-inf")).topk(k, dim=1)


def torch_dedup(seq, lens, cand, n_users, length, k):
    items = seq.view(n_users, length, 32).half()
    items = items / items.norm(dim=-1, keepdim=True).clamp_min(1e-3)
    c = F.normalize(cand.float(), dim=-1).half().view(n_users, -1, 32)
    s = torch.bmm(c, items.transpose(1, 2))  # (U, C, L)
    valid = torch.arange(length, device=DEV)[None, None, :] < lens[:, None, None]
    return s.masked_fill(~valid, float("-inf")).topk(k, dim=2)


def nn_configs(n_cand, n_users, total, k):
    auto = nn_mod.choose_config(n_cand, n_users, total, k, torch.device(DEV))
    variants = [dict(block_n=bn, splits=sp) for bn in (16, 32, 64) for sp in (16, 32, 64, 128)]
    cfgs = [auto]
    for v in variants:
        c = nn_mod.choose_config(n_cand, n_users, total, k, torch.device(DEV), **v)
        if c not in cfgs:
            cfgs.append(c)
    # Twice the scan's tile (half its steps, twice the bytes per load) at the automatic split count.
    for c in [c for c in cfgs if c.splits == auto.splits and c.block_n <= 32]:
        wide = dataclasses.replace(c, tile=2 * c.tile, num_warps=nn_mod.scan_warps(c.block_n, 2 * c.tile))
        if wide not in cfgs:
            cfgs.append(wide)
    # One user per scan step against 4 side by side, in 16-candidate blocks (choose_config packs long chunks only).
    for c in [c for c in cfgs if c.block_n == 16 and c.tile == auto.tile and n_users > 1]:
        other = dataclasses.replace(c, users_per_step=1 if c.users_per_step > 1 else 4)
        if other not in cfgs:
            cfgs.append(other)
    return cfgs


def check_nn(inputs, k, cfg) -> bool:
    seq, starts, lens, cand, users = inputs
    sel = slice(0, 8)  # the reference is slow: check 8 candidates of the first user(s)
    idx, scores = nn_mod.nn_select(seq, starts, lens, cand, users, k, config=cfg)
    ref_idx, ref_scores = nn_select_reference(
        seq.cpu(), starts.cpu(), lens.cpu(), cand[sel].cpu(), users[sel].cpu(), k
    )
    same = (idx[sel].cpu() == ref_idx).float().mean().item()
    return same > 0.99 and (scores[sel].cpu().double() - ref_scores).abs().max().item() < 1e-4


def bench_nn(rows, peaks, log):
    bw, _ = peaks
    results = []
    for name, n_users, length, n_cand, k, target in rows:
        total = n_users * length
        sets = [nn_inputs(n_users, length, n_cand, seed=i) for i in range(n_sets(total * 32))]
        r = {"work": name, "users": n_users, "S": length, "N": n_cand, "k": k, "target_ms": target}
        with torch.no_grad():
            try:
                r["repeat_interleave+bmm+topk"] = bench_eager(
                    [
                        lambda s=s, u=n_users, n=length, kk=k: torch_repeat_interleave(
                            s[0], s[2], s[3], u, n, kk
                        )
                        for s in sets
                    ]
                )
            except Exception as exc:  # memory for the (N, L, 32) copy
                log(f"  repeat_interleave failed: {type(exc).__name__}")
            r["dedup bmm+topk"] = bench_eager(
                [lambda s=s, u=n_users, n=length, kk=k: torch_dedup(s[0], s[2], s[3], u, n, kk) for s in sets]
            )
        timings, fns_of = {}, {}
        for cfg in nn_configs(n_cand, n_users, total, k):
            try:
                if not check_nn(sets[0], k, cfg):
                    log(f"  {cfg}: WRONG result, skipped")
                    continue
                outs = [
                    (
                        torch.empty(n_cand, k, dtype=torch.int64, device=DEV),
                        torch.empty(n_cand, k, device=DEV),
                    )
                    for _ in sets
                ]
                fns_of[cfg] = [
                    lambda s=s, o=o, c=cfg, kk=k: nn_mod.nn_select(*s, kk, config=c, out=o)
                    for s, o in zip(sets, outs, strict=True)
                ]
                timings[cfg] = bench_graph(fns_of[cfg])
                log(f"  {cfg}: {timings[cfg] * 1e3:.1f} us")
            except Exception as exc:
                log(f"  {cfg}: FAILED {type(exc).__name__}: {exc}")
        auto = nn_mod.choose_config(n_cand, n_users, total, k, torch.device(DEV))
        settle(timings, fns_of, [auto, min(timings, key=timings.get)] if timings else [])
        best = min(timings, key=timings.get) if timings else None
        r["ours default (graph)"] = timings.get(auto)
        r["ours best (graph)"] = timings.get(best)
        r["best config"] = repr(best)
        try:
            r["ours default (launch)"] = bench_eager(
                [lambda s=s, kk=k: nn_mod.nn_select(*s, kk) for s in sets]
            )
        except Exception as exc:
            log(f"  default launch failed: {type(exc).__name__}: {exc}")
        by = total * 32 + n_cand * 32 * 2 + n_cand * k * 12
        r["floor_ms"] = by / bw * 1e3
        log(f"  {name}: " + json.dumps(r, default=str))
        results.append(r)
    return results


# ----------------------------------------------------------------------------------------------
def fmt(v):
    return "—" if v is None else f"{v:.3f}"


def meets(r: dict) -> str:
    """Whether a row meets its target: judged on the default configuration, the one a caller gets. Each
    configuration of the sweep is timed once; the default and the best again in three alternating rounds
    (``settle``), so a lead of a few per cent can still be noise (confirm it with ab_kernels.py)."""
    return "yes" if (r["ours default (graph)"] or 1e9) <= r["target_ms"] else "no"


def table(tr, nr, peaks) -> str:
    lines = [
        "| work | PyTorch eager | torch.compile | ours, CUDA graph (default / best config, median of 4 timings) "
        "| ours, plain launch | floor | target | met (default) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in tr:
        eager = f"{fmt(r.get('SDPA eager'))} (SDPA), {fmt(r.get('nn.TransformerEncoder'))} (nn.TE)"
        met = meets(r)
        lines.append(
            f"| 2-layer transformer, B={r['B']} S={r['S']} d=64 ff=32 | {eager} | "
            f"{fmt(r.get('torch.compile (SDPA)'))} | {fmt(r['ours default (graph)'])} / "
            f"{fmt(r['ours best (graph)'])} | {fmt(r['ours default (launch)'])} | {fmt(r['floor_ms'])} | "
            f"≤ {r['target_ms']} | {met} |"
        )
    for r in nr:
        eager = (
            f"{fmt(r.get('repeat_interleave+bmm+topk'))} (repeat_interleave), "
            f"{fmt(r.get('dedup bmm+topk'))} (dedup)"
        )
        met = meets(r)
        lines.append(
            f"| NN scores + top-{r['k']}, {r['users']} user(s), S={r['S']:,}, {r['N']} candidates "
            f"| {eager} | — | "
            f"{fmt(r['ours default (graph)'])} / {fmt(r['ours best (graph)'])} | "
            f"{fmt(r.get('ours default (launch)'))} | {fmt(r['floor_ms'])} | ≤ {r['target_ms']} | {met} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--only", choices=["transformer", "nn"], default=None)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    log_f = open(os.path.join(args.out, "bench_detail.log"), "a")

    def log(msg):
        print(msg)
        log_f.write(msg + "\n")
        log_f.flush()

    props = torch.cuda.get_device_properties(0)
    env = {
        "device": torch.cuda.get_device_name(),
        "sms": props.multi_processor_count,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.date.today().isoformat(),
        "python": sys.version.split()[0],
    }
    log(json.dumps(env))
    peaks = measure_peaks()
    log(f"measured copy bandwidth {peaks[0] / 1e12:.2f} TB/s, fp16 matmul {peaks[1] / 1e12:.0f} TFLOP/s")
    tr_rows = [
        ("B=256 S=192", 256, 192, 0.03),
        ("B=16", 16, 192, 0.015),
        ("B=2048", 2048, 192, 0.15),
        ("B=256 S=2048", 256, 2048, 1.6),
    ]
    nn_rows = [
        ("1 user", 1, 16_000, 256, 64, 0.02),
        ("64 users", 64, 16_000, 256, 64, 0.03),
        ("64 users S=100k", 64, 100_000, 256, 64, 0.10),
    ]
    tr = bench_transformer(tr_rows, peaks, log) if args.only in (None, "transformer") else []
    nr = bench_nn(nn_rows, peaks, log) if args.only in (None, "nn") else []
    md = table(tr, nr, peaks)
    head = (
        f"{env['device']} ({env['sms']} SMs), torch {env['torch']}, Triton {env['triton']}, "
        f"CUDA {env['cuda']}, {env['date']}; measured copy {peaks[0] / 1e12:.2f} TB/s (read + write), "
        f"fp16 matmul {peaks[1] / 1e12:.0f} TFLOP/s. Times in ms (median)."
    )
    log("\n" + head + "\n\n" + md)
    with open(os.path.join(args.out, "kernels_table.md"), "w") as fh:
        fh.write(head + "\n\n" + md + "\n")
    with open(os.path.join(args.out, "kernels_results.json"), "w") as fh:
        json.dump({"env": env, "peaks": peaks, "transformer": tr, "nn": nr}, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
