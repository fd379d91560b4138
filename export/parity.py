"""The parity checker: the eager PyTorch model against every exported path (DESIGN §3).

A *backend* is any callable ``Batch -> BackendOutput`` (probabilities, scores and, where the path makes
it, the V2 selection). The eager model (rebuilt from ``weights.safetensors``) is the reference; ONNX
Runtime on ``full.onnx`` and on ``dense.onnx`` (fed with the eager sequence-module outputs) are the
backends checked here, each with ONNX Runtime's graph optimisations off and on, against the reference
with PyTorch's transformer fast path off and on. Another path (the hybrid GPU runtime) joins by passing
``extra_backends={"name": callable}``.

Pass criteria (fp32): every probability within 1e-5 (absolute) of the reference, every score within
1e-5 * sum|w_h|, the same V2 selection (group and position of every token) for every candidate, and a
Spearman rank correlation of the final scores of at least 0.999 in every case with 2+ candidates.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from transact.batch import SEQUENCES, Batch, Seq
from transact.config import ITEM_DIM, ModelConfig
from transact.data.random_batch import random_batch
from transact.model import RankingModel, transformer_fastpath
from transact.quant import dequantize

from .bundle import CPU_PROVIDER
from .manifest import DENSE_INPUTS, SEQUENCE_OUTPUTS, tool_versions
from .onnx_export import full_output_names

PROB_ATOL = 1e-5
SPEARMAN_MIN = 0.999


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    batch: Batch
    note: str = ""

    def describe(self) -> dict[str, Any]:
        b = self.batch
        return {
            "name": self.name, "note": self.note, "requests": b.num_requests, "candidates": b.num_candidates,
            "lengths": {s: getattr(b, s).length.tolist() for s in SEQUENCES},
            "widths": {s: int(getattr(b, s).ts.shape[1]) for s in SEQUENCES},
        }  # fmt: skip


def _clamp(n: int, limit: int) -> int:
    return max(0, min(n, limit))


def _with_duplicate_items(batch: Batch, config: ModelConfig, seed: int) -> Batch:
    """Every sequence drawn from 3 distinct item codes plus the zero vector; candidates equal to them."""
    g = torch.Generator().manual_seed(seed)
    palette = torch.randint(-127, 128, (4, ITEM_DIM), generator=g, dtype=torch.int64).to(torch.int8)
    palette[3] = 0
    seqs = {}
    for s in SEQUENCES:
        seq: Seq = getattr(batch, s)
        pick = torch.randint(0, 4, seq.ts.shape, generator=g)
        seqs[s] = Seq(seq.ts, seq.action, seq.surface, palette[pick], seq.length)
    pick = torch.randint(0, 3, (batch.num_candidates,), generator=g)
    cand_item = dequantize(palette[pick], config.quant_scale)
    rest = {k: getattr(batch, k) for k in ("request_ts", "user_dense", "surface", "hour", "cand_request",
                                            "item_dense")}  # fmt: skip
    return Batch(**rest, cand_item=cand_item, **seqs)


def parity_cases(config: ModelConfig, random_cases: int = 8, seed: int = 0) -> list[Case]:
    """Fixed edge cases (from the config's sizes) plus ``random_cases`` random batches."""
    v2 = config.transact_v2
    mx = {s: getattr(config, f"max_{s}") for s in SEQUENCES}
    mid = {"ll": _clamp(300, mx["ll"]), "rt": _clamp(mx["rt"] // 2 + 1, mx["rt"]), "imp": _clamp(40, mx["imp"])}
    short = {"ll": _clamp(v2.k_ll // 2, mx["ll"]), "rt": _clamp(v2.r_rt + v2.k_rt // 2, mx["rt"]),
             "imp": _clamp(v2.k_imp // 2, mx["imp"])}  # fmt: skip
    rb = lambda r, n, s, **kw: random_batch(config, r, n, seed=seed * 1000 + s, **kw)  # noqa: E731
    cases = [
        Case("n1", rb(1, 1, 1, **mid), "one candidate"),
        Case("n7", rb(2, 7, 2, **mid), "7 candidates over 2 requests"),
        Case("n256", rb(2, 256, 3, **mid), "256 candidates"),
        Case("empty", rb(1, 5, 4, ll=0, rt=0, imp=0), "all sequences empty (width 1)"),
        Case("empty-mixed", rb(3, 9, 5, ll=[0, mid["ll"], 1], rt=[mid["rt"], 0, 1], imp=[0, 1, mid["imp"]]),
             "one empty user beside others"),
        Case("short", rb(2, 6, 6, **short), "every sequence shorter than its k"),
        Case("rt-under-r", rb(2, 6, 7, ll=short["ll"], rt=_clamp(v2.r_rt - 1, mx["rt"]), imp=1),
             "fewer rt actions than r"),
        Case("max", rb(1, 7, 8, **mx), "maximum lengths from the config"),
        Case("ties", _with_duplicate_items(rb(2, 8, 9, **mid), config, seed), "duplicate items: equal similarity"),
        Case("future", rb(2, 6, 10, **mid, future=max(mid.values())), "all actions after the request time"),
        Case("some-future", rb(2, 6, 11, **mid, future=3), "the newest 3 actions after the request time"),
    ]
    rng = random.Random(seed)
    for i in range(random_cases):
        r = rng.randint(1, 4)
        n = rng.choice([1, 2, 3, rng.randint(4, 64), rng.randint(4, 300)])
        lengths = {s: [rng.randint(0, min(mx[s], 2 * v2.max_tokens if s == "ll" else mx[s])) for _ in range(r)]
                   for s in SEQUENCES}  # fmt: skip
        cases.append(Case(f"random-{i}", rb(r, n, 100 + i, **lengths), "random sizes"))
    return cases


# ---------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------


@dataclass
class BackendOutput:
    probs: np.ndarray  # (N, H) float32
    scores: np.ndarray  # (N,)
    selection: np.ndarray | None = None  # (N, T, 2) int64 [group, position], -1 in unused slots


Backend = Callable[[Batch], BackendOutput]


@contextlib.contextmanager
def fastpath(enabled: bool) -> Iterator[None]:
    """Inference mode with PyTorch's transformer fast path on or off."""
    with transformer_fastpath(enabled), torch.inference_mode():
        yield


def _selection(out: Any) -> np.ndarray | None:
    sel = out.v2_selection
    if sel is None:
        return None
    group = torch.where(sel.valid, sel.group, -1)
    pos = torch.where(sel.valid, sel.pos, -1)
    return torch.stack([group, pos], dim=-1).numpy()


def eager_backend(model: RankingModel, use_fastpath: bool = False) -> Backend:
    """The eager model, PyTorch's transformer fast path on or off."""

    def run(batch: Batch) -> BackendOutput:
        with fastpath(use_fastpath):
            out = model.forward_with_aux(batch)
            return BackendOutput(out.probs.numpy(), model.score(out.probs).numpy(), _selection(out))

    return run


def ort_full_backend(session: Any) -> Backend:
    """ONNX Runtime on ``full.onnx``."""
    names = [o.name for o in session.get_outputs()]

    def run(batch: Batch) -> BackendOutput:
        feed = {k: v.numpy() for k, v in batch.named_tensors()}
        out = dict(zip(names, session.run(None, feed), strict=True))
        sel = None
        if "selection_group" in out:
            sel = np.stack([out["selection_group"], out["selection_pos"]], axis=-1)
        return BackendOutput(out["probabilities"], out["scores"], sel)

    return run


def ort_dense_backend(session: Any, model: RankingModel, use_fastpath: bool = False) -> Backend:
    """ONNX Runtime on ``dense.onnx`` fed with the eager sequence-module outputs (no selection)."""

    def run(batch: Batch) -> BackendOutput:
        with fastpath(use_fastpath):
            v1, v2, _ = model.sequence_features(batch)
        values = {"user_dense": batch.user_dense, "surface": batch.surface, "hour": batch.hour,
                  "cand_request": batch.cand_request, "cand_item": batch.cand_item,
                  "item_dense": batch.item_dense, "v1": v1, "v2": v2}  # fmt: skip
        probs, scores = session.run(None, {k: values[k].numpy() for k in DENSE_INPUTS})
        return BackendOutput(probs, scores)

    return run


# ---------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------


def swapped_pairs(ref: np.ndarray, out: np.ndarray, margin: float) -> int:
    """Pairs (i, j) with ref[i] > ref[j] + margin whose outputs are ordered out[i] < out[j]."""
    ref, out = np.asarray(ref, np.float64), np.asarray(out, np.float64)
    apart = (ref[:, None] - ref[None, :]) > margin
    return int((apart & (out[:, None] < out[None, :])).sum())


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); 1.0 when both are constant."""

    def ranks(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=np.float64)
        for v in np.unique(x):  # average ranks of ties
            m = x == v
            if m.sum() > 1:
                r[m] = r[m].mean()
        return r

    ra, rb = ranks(a), ranks(b)
    da, db = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((da * da).sum() * (db * db).sum()))
    if denom == 0:
        return 1.0 if np.array_equal(ra, rb) else 0.0
    return float((da * db).sum() / denom)


@dataclass
class OutputStats:
    """Error statistics of one output over all cases."""

    atol: float
    count: int = 0
    sum_abs: float = 0.0
    sum_rel: float = 0.0
    max_abs: float = 0.0
    max_rel: float = 0.0
    out_of_tolerance: int = 0
    worst: dict[str, Any] | None = None

    def add(self, case: Case, expected: np.ndarray, actual: np.ndarray) -> None:
        exp, act = np.asarray(expected, np.float64), np.asarray(actual, np.float64)
        if exp.shape != act.shape:
            self.count += exp.size
            self.out_of_tolerance += exp.size
            self.max_abs = math.inf
            self.worst = {"case": case.name, "error": f"shape {list(act.shape)}, expected {list(exp.shape)}"}
            return
        err = np.abs(act - exp)
        err = np.where(np.isnan(err), np.inf, err)
        rel = err / np.maximum(np.abs(exp), 1e-12)
        self.count += err.size
        self.sum_abs += float(err.sum())
        self.sum_rel += float(np.minimum(rel, 1e300).sum())
        self.out_of_tolerance += int((err > self.atol).sum())
        self.max_rel = max(self.max_rel, float(rel.max(initial=0.0)))
        if err.size and (self.worst is None or float(err.max()) > self.max_abs):
            idx = np.unravel_index(int(np.argmax(err)), err.shape)
            n = int(idx[0])
            self.max_abs = float(err.max())
            self.worst = {
                "case": case.name, "index": [int(i) for i in idx], "request": int(case.batch.cand_request[n]),
                "expected": float(exp[idx]), "actual": float(act[idx]), "abs_error": float(err[idx]),
            }  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_abs": self.max_abs, "mean_abs": self.sum_abs / max(self.count, 1), "max_rel": self.max_rel,
            "mean_rel": self.sum_rel / max(self.count, 1), "tolerance_abs": self.atol,
            "out_of_tolerance": self.out_of_tolerance, "count": self.count, "worst": self.worst,
        }  # fmt: skip


@dataclass
class Comparison:
    """One backend under one setting against the eager reference, over all cases."""

    backend: str
    settings: dict[str, Any]
    outputs: dict[str, OutputStats]
    selection_checked: bool = False
    selection_candidates: int = 0
    selection_mismatched: int = 0
    first_mismatch: dict[str, Any] | None = None
    spearman_min: float = 1.0
    spearman_case: str | None = None
    order_violations: int = 0  # candidate pairs clearly apart in the reference but ranked the other way
    errors: list[str] = field(default_factory=list)

    def add(self, case: Case, ref: BackendOutput, out: BackendOutput) -> None:
        self.outputs["probabilities"].add(case, ref.probs, out.probs)
        self.outputs["scores"].add(case, ref.scores, out.scores)
        if ref.selection is not None and out.selection is not None:
            self.selection_checked = True
            n = ref.selection.shape[0]
            self.selection_candidates += n
            if ref.selection.shape != out.selection.shape:
                self.selection_mismatched += n
                bad = np.arange(n)
            else:
                bad = np.nonzero((ref.selection != out.selection).any(axis=(1, 2)))[0]
                self.selection_mismatched += len(bad)
            if len(bad) and self.first_mismatch is None:
                c = int(bad[0])
                self.first_mismatch = {
                    "case": case.name, "candidate": c,
                    "expected": ref.selection[c].tolist(), "actual": out.selection[c].tolist(),
                }  # fmt: skip
        if len(ref.scores) >= 2 and ref.scores.shape == out.scores.shape:
            rho = spearman(ref.scores, out.scores)
            if self.spearman_case is None or rho < self.spearman_min:
                self.spearman_min, self.spearman_case = rho, case.name
            self.order_violations += swapped_pairs(ref.scores, out.scores, 2 * self.outputs["scores"].atol)

    @property
    def failures(self) -> list[str]:
        out = list(self.errors)
        for name, s in self.outputs.items():
            if s.out_of_tolerance:
                out.append(f"{name}: {s.out_of_tolerance}/{s.count} beyond {s.atol:g} (max {s.max_abs:.3g})")
        if self.selection_mismatched:
            out.append(f"selection: {self.selection_mismatched}/{self.selection_candidates} candidates differ")
        # Rank correlation is meaningful at fp32 tolerance; a looser path (fp16 kernels) may reorder
        # candidates whose scores are closer than its tolerance, but never pairs clearly apart.
        strict = self.outputs["probabilities"].atol <= PROB_ATOL
        if strict and self.spearman_min < SPEARMAN_MIN:
            out.append(f"spearman {self.spearman_min:.6f} < {SPEARMAN_MIN} ({self.spearman_case})")
        if self.order_violations:
            out.append(f"ranking: {self.order_violations} candidate pairs swapped beyond the score tolerance")
        return out

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict[str, Any]:
        sel = None
        if self.selection_checked:
            agree = self.selection_candidates - self.selection_mismatched
            sel = {
                "candidates": self.selection_candidates, "mismatched": self.selection_mismatched,
                "agreement": agree / max(self.selection_candidates, 1), "first_mismatch": self.first_mismatch,
            }  # fmt: skip
        return {
            "backend": self.backend, "settings": self.settings, "passed": self.passed, "failures": self.failures,
            "outputs": {k: v.to_dict() for k, v in self.outputs.items()}, "selection": sel,
            "spearman": {"min": self.spearman_min, "case": self.spearman_case, "threshold": SPEARMAN_MIN},
        }  # fmt: skip


@dataclass
class ParityReport:
    cases: list[dict[str, Any]]
    comparisons: list[Comparison]
    seed: int
    bundle: str | None = None
    onnx_provider: str = CPU_PROVIDER

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.comparisons) and bool(self.comparisons)

    def failure_summary(self) -> str:
        for c in self.comparisons:
            if c.failures:
                return f"{c.backend} {_settings_text(c.settings)}: {c.failures[0]}"
        return "no comparison was run" if not self.comparisons else "passed"

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed, "bundle": self.bundle, "seed": self.seed, "onnx_provider": self.onnx_provider,
            "tolerances": {"probabilities_abs": PROB_ATOL, "spearman_min": SPEARMAN_MIN},
            "versions": tool_versions(), "cases": self.cases, "comparisons": [c.to_dict() for c in self.comparisons],
        }  # fmt: skip

    def format_table(self) -> str:
        """A readable table: one block per backend and setting."""
        lines = [f"parity {self.bundle or ''}: {len(self.cases)} cases, seed {self.seed}, "
                 f"ONNX Runtime on {self.onnx_provider}"]
        head = f"{'backend':<18} {'ort opt':<8} {'fastpath':<8} {'check':<14} {'max abs':>9} {'mean abs':>9} " \
               f"{'max rel':>9} {'bad':>7}  worst / detail"  # fmt: skip
        lines += [head, "-" * len(head)]
        for c in self.comparisons:
            opt = c.settings.get("ort_graph_optimization", "-")
            fp = "on" if c.settings.get("torch_fastpath") else "off"
            first = True
            for name, s in c.outputs.items():
                w = s.worst or {}
                where = f"{w.get('case')} {w.get('index')}" if w else ""
                lead = f"{c.backend:<18} {opt:<8} {fp:<8}" if first else " " * 36
                lines.append(f"{lead} {name:<14} {s.max_abs:>9.2e} {s.sum_abs / max(s.count, 1):>9.2e} "
                             f"{s.max_rel:>9.2e} {s.out_of_tolerance:>7}  {where}")  # fmt: skip
                first = False
            if c.selection_checked:
                agree = c.selection_candidates - c.selection_mismatched
                lines.append(f"{'':36} {'selection':<14} {agree}/{c.selection_candidates} candidates identical")
            lines.append(f"{'':36} {'spearman':<14} min {c.spearman_min:.6f} ({c.spearman_case})")
            lines.append(f"{'':36} {'result':<14} {'ok' if c.passed else 'FAIL: ' + '; '.join(c.failures)}")
        lines.append("PASSED" if self.passed else f"FAILED: {self.failure_summary()}")
        return "\n".join(lines)


def _settings_text(settings: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items())


def compare(
    reference: Backend, backends: dict[str, tuple[Backend, dict[str, Any]]], cases: list[Case], score_atol: float
) -> list[Comparison]:
    """Run the reference and every backend on every case; one Comparison per backend."""
    def stats(settings: dict[str, Any]) -> dict[str, OutputStats]:
        # A backend may carry its own tolerance (fp16 kernel paths: 2e-3 on probabilities).
        if "probabilities_atol" not in settings:
            return {"probabilities": OutputStats(PROB_ATOL), "scores": OutputStats(score_atol)}
        atol = float(settings["probabilities_atol"])
        return {"probabilities": OutputStats(atol), "scores": OutputStats(atol * settings["score_weight_sum"])}

    comps = {name: Comparison(name.split("@")[0], settings, stats(settings))
             for name, (_, settings) in backends.items()}  # fmt: skip
    for case in cases:
        ref = reference(case.batch)
        for name, (backend, _) in backends.items():
            try:
                out = backend(case.batch)
            except Exception as e:  # a backend that crashes on a case fails that comparison, visibly
                comps[name].errors.append(f"{case.name}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                continue
            comps[name].add(case, ref, out)
    return list(comps.values())


def run_parity(
    bundle: Any,
    random_cases: int = 8,
    seed: int = 0,
    extra_backends: dict[str, Backend | tuple[Backend, float]] | None = None,
    cases: list[Case] | None = None,
    threads: int | None = 1,
    provider: str = CPU_PROVIDER,
) -> ParityReport:
    """Eager (from the bundle's weights) vs ONNX Runtime on full.onnx and dense.onnx, in the toggle matrix.

    ``bundle`` is a verified ``export.bundle.Bundle``; ``extra_backends`` are checked against the eager
    model with the fast path off, each either a callable (fp32 tolerance) or ``(callable, probabilities_atol)``.
    ``threads`` caps PyTorch and ONNX Runtime threads while checking (parity
    is about numbers, not speed; alternating two multi-threaded runtimes on few cores is very slow);
    ``None`` leaves both at their defaults. ``provider``: ONNX Runtime's execution provider for both graphs."""
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _run_parity(bundle, random_cases, seed, extra_backends, cases, threads, provider)
    finally:
        torch.set_num_threads(old_threads)


def full_outputs_error(config: ModelConfig, got: list[str]) -> str | None:
    """Why full.onnx's outputs ``got`` are not the ones ``config`` exports, or None. Bundles exported before full.onnx
    named the sequence-module outputs (``v1`` / ``v2``) lack the last two and are still right."""
    expected = list(full_output_names(config))
    if got in (expected, [o for o in expected if o not in SEQUENCE_OUTPUTS]):
        return None
    return f"full.onnx outputs {got}, expected {expected}"


def _run_parity(
    bundle: Any, random_cases: int, seed: int, extra_backends: dict[str, Backend] | None,
    cases: list[Case] | None, threads: int | None, provider: str,
) -> ParityReport:
    model = bundle.build_model()
    cases = cases if cases is not None else parity_cases(bundle.config, random_cases, seed)
    score_atol = PROB_ATOL * float(np.abs(np.asarray(bundle.config.score_weights)).sum())
    sessions = {
        (g, opt): bundle.session(g, optimize=opt, threads=threads, spinning=False, provider=provider)
        for g in ("full", "dense") for opt in (False, True)
    }  # fmt: skip
    outputs_error = full_outputs_error(bundle.config, [o.name for o in sessions[("full", True)].get_outputs()])
    comparisons: list[Comparison] = []
    for fp in (False, True):
        backends: dict[str, tuple[Backend, dict[str, Any]]] = {}
        for opt in (False, True):
            settings = {"ort_graph_optimization": "all" if opt else "disabled", "torch_fastpath": fp}
            backends[f"onnxruntime-full@{opt}"] = (ort_full_backend(sessions[("full", opt)]), settings)
            backends[f"onnxruntime-dense@{opt}"] = (ort_dense_backend(sessions[("dense", opt)], model, fp), settings)
        if not fp:
            for name, spec in (extra_backends or {}).items():
                fn, atol = spec if isinstance(spec, tuple) else (spec, PROB_ATOL)
                backends[name] = (fn, {"torch_fastpath": False, "probabilities_atol": atol,
                                       "score_weight_sum": float(np.abs(bundle.config.score_weights).sum())})
        comparisons += compare(eager_backend(model, fp), backends, cases, score_atol)
    if outputs_error:
        comparisons[0].errors.append(outputs_error)
    return ParityReport([c.describe() for c in cases], comparisons, seed, str(bundle.path), provider)
