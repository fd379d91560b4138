"""``runtime.Session``: score ranking requests from a verified bundle on the CPU or the GPU (DESIGN §4).

A ``Request`` is one user (the three action sequences, dense and context features) and that user's
candidates, as numpy arrays. ``Session.score_many`` groups requests into one model batch (identical
users share one request row) and runs it on a backend:

* ``cpu``  — ONNX Runtime on ``full.onnx``;
* ``cuda`` — the hybrid path: Triton kernels for selection and the transformers, ``dense.onnx`` in ONNX
  Runtime (``runtime.backends.cuda``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.bundle import CPU_PROVIDER
from transact.batch import SEQUENCES, Batch, BatchError, shape_error
from transact.config import ITEM_DIM, ModelConfig

QMAX = 127
DEVICES = ("auto", "cpu", "cuda")


# Each sequence field's dtype (and the model's input dtype for ``{seq}_{field}``); ``item`` is (L, ITEM_DIM).
SEQ_DTYPES = {"ts": np.int64, "action": np.int32, "surface": np.int64, "item": np.int8}


def seq_field_shape(field: str, *lead: int) -> tuple[int, ...]:
    """The shape of a sequence field over the leading dims ``lead`` (length, or rows and width): ``item`` adds
    ITEM_DIM."""
    return (*lead, ITEM_DIM) if field == "item" else lead


@dataclass
class UserSeq:
    """One action sequence of one user, oldest -> newest: (L,) arrays and (L, 32) int8 item codes."""

    ts: np.ndarray  # int64 ms
    action: np.ndarray  # int32 bitmask
    surface: np.ndarray  # int64
    item: np.ndarray  # int8

    def __len__(self) -> int:
        return int(self.ts.shape[0])

    @classmethod
    def empty(cls) -> UserSeq:
        return cls(**{f: np.zeros(seq_field_shape(f, 0), d) for f, d in SEQ_DTYPES.items()})


@dataclass
class Request:
    """One ranking request: one user and that user's N candidates."""

    request_ts: int
    user_dense: np.ndarray  # (Du,) float32
    surface: int
    hour: int
    ll: UserSeq
    rt: UserSeq
    imp: UserSeq
    cand_item: np.ndarray  # (N, 32) float32, dequantised
    item_dense: np.ndarray  # (N, Di) float32

    @property
    def num_candidates(self) -> int:
        return int(self.cand_item.shape[0])

    def valid_length(self, name: str) -> int:
        """Tokens of sequence ``name`` before the request time (a prefix: sequences are sorted)."""
        ts = getattr(self, name).ts
        return int(np.searchsorted(ts, self.request_ts, side="left"))

    def tensors(self) -> dict[str, np.ndarray]:
        """The wire tensors of this request (names and shapes of the model metadata)."""
        out = {
            "request_ts": np.array([self.request_ts], np.int64), "user_dense": self.user_dense,
            "surface": np.array([self.surface], np.int64), "hour": np.array([self.hour], np.int64),
        }  # fmt: skip
        for s in SEQUENCES:
            seq: UserSeq = getattr(self, s)
            out.update({f"{s}_ts": seq.ts, f"{s}_action": seq.action, f"{s}_surface": seq.surface,
                        f"{s}_item": seq.item})  # fmt: skip
        out.update(cand_item=self.cand_item, item_dense=self.item_dense)
        return out

    @classmethod
    def from_batch(cls, batch: Batch, r: int) -> Request:
        """Request ``r`` of a model batch (its stored tokens and its candidates)."""
        seqs = {}
        for s in SEQUENCES:
            seq = getattr(batch, s)
            n = int(seq.length[r])
            seqs[s] = UserSeq(
                seq.ts[r, :n].numpy().astype(np.int64), seq.action[r, :n].numpy().astype(np.int32),
                seq.surface[r, :n].numpy().astype(np.int64), seq.item[r, :n].numpy().astype(np.int8),
            )  # fmt: skip
        mine = (batch.cand_request == r).numpy()
        return cls(
            request_ts=int(batch.request_ts[r]), user_dense=batch.user_dense[r].numpy().astype(np.float32),
            surface=int(batch.surface[r]), hour=int(batch.hour[r]),
            cand_item=batch.cand_item.numpy()[mine].astype(np.float32),
            item_dense=batch.item_dense.numpy()[mine].astype(np.float32), **seqs,
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Input signature and validation
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatypes: tuple[str, ...]  # accepted wire datatypes, the first is the canonical one
    shape: tuple[int | str, ...]  # ints are fixed, strings name a dynamic dim shared between tensors

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatypes[0],
                "shape": [d if isinstance(d, int) else -1 for d in self.shape]}  # fmt: skip


INTS = ("INT64", "INT32")


def input_specs(config: ModelConfig) -> list[TensorSpec]:
    """Per-request inputs over the wire: one user, sequence lengths implied by the shapes."""
    specs = [
        TensorSpec("request_ts", INTS, (1,)),
        TensorSpec("user_dense", ("FP32",), (config.user_dense_dim,)),
        TensorSpec("surface", INTS, (1,)),
        TensorSpec("hour", INTS, (1,)),
    ]
    for s in SEQUENCES:
        dim = f"L_{s}"
        specs += [
            TensorSpec(f"{s}_ts", INTS, (dim,)),
            TensorSpec(f"{s}_action", ("INT32", "INT64"), (dim,)),
            TensorSpec(f"{s}_surface", INTS, (dim,)),
            TensorSpec(f"{s}_item", ("INT8",), (dim, ITEM_DIM)),
        ]
    specs += [
        TensorSpec("cand_item", ("FP32", "INT8"), ("N", ITEM_DIM)),
        TensorSpec("item_dense", ("FP32",), ("N", config.item_dense_dim)),
    ]
    return specs


def output_specs(config: ModelConfig) -> list[TensorSpec]:
    return [TensorSpec("probabilities", ("FP32",), ("N", len(config.heads))), TensorSpec("scores", ("FP32",), ("N",))]


@dataclass
class Limits:
    """Request limits: candidates per request and tokens per sequence (the model config's max_*)."""

    max_candidates: int = 4096
    max_ll: int = 16_000
    max_rt: int = 100
    max_imp: int = 100

    @classmethod
    def from_config(cls, config: ModelConfig, max_candidates: int = 4096) -> Limits:
        return cls(max_candidates, config.max_ll, config.max_rt, config.max_imp)


def request_from_tensors(
    tensors: dict[str, tuple[str, np.ndarray]], config: ModelConfig, limits: Limits | None = None
) -> Request:
    """Wire tensors (name -> (datatype, array)) -> a validated ``Request``; BatchError names the tensor."""
    limits = limits or Limits.from_config(config)
    specs = {s.name: s for s in input_specs(config)}
    for name in tensors:
        if name not in specs:
            raise BatchError(f"{name}: unknown input (expected {', '.join(specs)})")
    dims: dict[str, int] = {}
    set_by: dict[str, str] = {}  # symbolic dim -> the input that fixed it (named when another disagrees)
    arrays: dict[str, np.ndarray] = {}
    for name, spec in specs.items():
        if name not in tensors:
            raise BatchError(f"{name}: missing input")
        datatype, arr = tensors[name]
        if datatype not in spec.datatypes:
            raise BatchError(f"{name}: expected datatype {' or '.join(spec.datatypes)}, got {datatype}")
        ok = arr.ndim == len(spec.shape)
        if ok:
            for want, got in zip(spec.shape, arr.shape, strict=True):
                if isinstance(want, int):
                    ok &= want == got
                elif dims.setdefault(want, got) != got:
                    ok = False
                else:
                    set_by.setdefault(want, name)
        if not ok:
            raise shape_error(name, spec.shape, arr.shape, dims, set_by)
        arrays[name] = arr
    n = dims["N"]
    if n < 1:
        raise BatchError("cand_item: a request needs at least one candidate")
    if n > limits.max_candidates:
        raise BatchError(f"cand_item: {n} candidates, more than the limit of {limits.max_candidates}")
    for s in SEQUENCES:
        limit = getattr(limits, f"max_{s}")
        if dims[f"L_{s}"] > limit:
            raise BatchError(f"{s}_ts: {dims[f'L_{s}']} tokens, more than max_{s}={limit}")
    cand = arrays["cand_item"]
    if tensors["cand_item"][0] == "INT8":
        _check_codes("cand_item", cand)
        cand = cand.astype(np.float32) * np.float32(config.quant_scale / QMAX)
    seqs = {
        s: UserSeq(
            arrays[f"{s}_ts"].astype(np.int64), arrays[f"{s}_action"], arrays[f"{s}_surface"].astype(np.int64),
            arrays[f"{s}_item"],
        )
        for s in SEQUENCES
    }  # fmt: skip
    for s in SEQUENCES:  # INT64 action masks must still be int32 bit patterns
        a = seqs[s].action
        if a.dtype != np.int32:
            if a.size and (int(a.min()) < -(2**31) or int(a.max()) >= 2**32):
                raise BatchError(f"{s}_action: values must fit a 32-bit mask")
            seqs[s].action = a.astype(np.int64).astype(np.uint32).view(np.int32)
    req = Request(
        request_ts=int(arrays["request_ts"][0]), user_dense=np.ascontiguousarray(arrays["user_dense"], np.float32),
        surface=int(arrays["surface"][0]), hour=int(arrays["hour"][0]),
        cand_item=np.ascontiguousarray(cand, np.float32),
        item_dense=np.ascontiguousarray(arrays["item_dense"], np.float32), **seqs,
    )  # fmt: skip
    validate_request(req, config, limits)
    return req


def _check_codes(name: str, codes: np.ndarray) -> None:
    if codes.size and int(codes.min()) < -QMAX:
        raise BatchError(f"{name}: int8 codes must lie in [-127, 127], got {int(codes.min())}")


def validate_request(req: Request, config: ModelConfig, limits: Limits | None = None) -> None:
    """Shapes, dtypes, ranges, finiteness, order and limits of one request; BatchError names the tensor."""
    limits = limits or Limits.from_config(config)
    floats = {"user_dense": (req.user_dense, (config.user_dense_dim,)),
              "cand_item": (req.cand_item, (req.num_candidates, ITEM_DIM)),
              "item_dense": (req.item_dense, (req.num_candidates, config.item_dense_dim))}  # fmt: skip
    for name, (arr, shape) in floats.items():
        if arr.dtype != np.float32:
            raise BatchError(f"{name}: expected float32, got {arr.dtype}")
        if arr.shape != shape:
            raise BatchError(f"{name}: expected shape {list(shape)}, got {list(arr.shape)}")
        if not np.isfinite(arr).all():
            raise BatchError(f"{name}: contains NaN or infinite values")
    n = req.num_candidates
    if not 1 <= n <= limits.max_candidates:
        raise BatchError(f"cand_item: {n} candidates, must be between 1 and {limits.max_candidates}")
    if not 0 <= req.surface < config.num_surfaces:
        raise BatchError(f"surface: {req.surface} is not in [0, {config.num_surfaces})")
    if not 0 <= req.hour <= 23:
        raise BatchError(f"hour: {req.hour} is not in [0, 23]")
    for s in SEQUENCES:
        seq: UserSeq = getattr(req, s)
        length = len(seq)
        for f, dtype in SEQ_DTYPES.items():
            shape, arr = seq_field_shape(f, length), getattr(seq, f)
            if arr.dtype != dtype:
                raise BatchError(f"{s}_{f}: expected {np.dtype(dtype).name}, got {arr.dtype}")
            if arr.shape != shape:
                raise BatchError(f"{s}_{f}: expected shape {list(shape)}, got {list(arr.shape)}")
        limit = getattr(limits, f"max_{s}")
        if length > limit:
            raise BatchError(f"{s}_ts: {length} tokens, more than max_{s}={limit}")
        if length == 0:
            continue
        _check_codes(f"{s}_item", seq.item)
        if int(seq.surface.min()) < 0 or int(seq.surface.max()) >= config.num_surfaces:
            raise BatchError(f"{s}_surface: values must lie in [0, {config.num_surfaces})")
        if length > 1 and bool((seq.ts[1:] < seq.ts[:-1]).any()):  # no int64 difference array
            raise BatchError(f"{s}_ts: each sequence must be sorted oldest -> newest")


# ---------------------------------------------------------------------------------------------
# The session
# ---------------------------------------------------------------------------------------------


@dataclass
class Output:
    """The model's answer for one request."""

    probabilities: np.ndarray  # (N, H) float32
    scores: np.ndarray  # (N,) float32


@dataclass
class BatchResult:
    outputs: list[Output]
    rows: int  # request rows after de-duplication
    candidates: int
    seconds: float


@dataclass
class LoadedBundle:
    """What a backend needs from a verified bundle (the verified bytes are the bytes used)."""

    path: Path
    config: ModelConfig
    manifest: dict[str, Any]
    verified: Any  # export.bundle.Bundle

    def graph_bytes(self, name: str) -> bytes:
        return self.verified.graph_bytes(name)

    def state_dict(self) -> dict[str, Any]:
        return self.verified.state_dict()


def open_bundle(path: str | os.PathLike) -> LoadedBundle:
    """Verify the bundle (format, every file's size and sha256, weights vs config, graph signatures)."""
    from export.bundle import load_bundle

    b = load_bundle(path)
    return LoadedBundle(Path(path), b.config, b.manifest, b)


def resolve_device(device: str) -> str:
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


@dataclass
class SessionOptions:
    """Backend options. ``threads``: CPU threads for ONNX Runtime (None: the cpu backend takes every CPU this
    process may use, ``runtime.backends.cpu.usable_cpus``; the cuda backend's dense.onnx ONNX Runtime's default)."""

    threads: int | None = None
    # cpu: chunks of a request's candidates (at most ``max_chunk`` each) run side by side, ``split`` at a time,
    # threads // split threads each (None: runtime.backends.cpu.default_split)
    split: int | None = None
    # cpu: most candidates per chunk (None: runtime.chunks.MAX_CHUNK); the best size depends on the host's
    # caches (benchmarks/RESULTS.md: 16 on an Intel Xeon, 32 on an AMD EPYC before the dense stage)
    max_chunk: int | None = None
    # cpu: where a request row's chunks outnumber ``split``, the nodes of full.onnx that depend on the request alone
    # (normalising the sequences, TransAct's row share) run once and hand their results to every chunk
    # (runtime.backends.request_stage)
    request_stage: bool = True
    # cpu: with the request stage, the chunks run full.onnx up to the sequence-module outputs v1 / v2 and dense.onnx
    # then scores all of a row's candidates at once (a bundle whose full.onnx lacks those outputs: the chunks run it
    # to the end)
    dense_stage: bool = True
    # cpu: each ONNX Runtime run treats denormal floats as zero on its thread (runtime.backends.cpu.flushed_denormals):
    # masked softmax underflows to them, and Intel cores compute them slowly
    flush_denormals: bool = True
    # ONNX Runtime's execution provider for full.onnx (cpu) and dense.onnx (cuda with dense_on="cpu"); the CPU
    # provider takes the nodes another one does not. Check a bundle on it first: `transact parity --onnx-provider`.
    onnx_provider: str = CPU_PROVIDER
    max_candidates: int = 4096
    warmup: bool = True
    triton_cache_dir: str | None = None  # cuda: persistent compiled-kernel cache (default ~/.cache/transact/triton)
    cuda_graphs: bool = True  # cuda: replay captured graphs per shape bucket
    # cuda: "gpu" runs the dense part in torch inside the captured graph (about 2 ms less per 256
    # candidates than dense.onnx on the host CPU, see benchmarks/RESULTS.md); "cpu" runs dense.onnx in
    # ONNX Runtime on the host, which keeps the GPU for the sequence modules alone.
    dense_on: str = "gpu"
    # cuda: the fp32 matrix products on the GPU (dense part, output projections) on TF32 tensor cores:
    # 10-bit mantissas like the fp16 transformer, well inside the fp16 path's 2e-3 on probabilities.
    tf32: bool = True
    max_batch: int = 16  # cuda: largest number of request rows warmed up
    # cuda: (request rows, candidates, ll width) buckets compiled and captured at start-up; None: the defaults
    warmup_shapes: list[tuple[int, int, int]] | None = None

    def __post_init__(self) -> None:
        if self.max_chunk is not None and self.max_chunk < 1:
            raise ValueError(f"max_chunk must be at least 1, got {self.max_chunk}")


class Session:
    """Scores requests against a bundle. ``device``: "auto" (cuda when a GPU is present), "cpu" or "cuda"."""

    def __init__(self, bundle: str | os.PathLike, device: str = "auto", **options: Any) -> None:
        t0 = time.perf_counter()
        self.options = SessionOptions(**options)
        self.device = resolve_device(device)
        if self.device == "cuda":
            from .backends.cuda import check_cuda_available

            check_cuda_available()
        self.bundle = open_bundle(bundle)
        self.config = self.bundle.config
        self.limits = Limits.from_config(self.config, self.options.max_candidates)
        t_verify = time.perf_counter()
        if self.device == "cuda":
            from .backends.cuda import CudaBackend

            self.backend = CudaBackend(self.bundle, self.options)
        else:
            from .backends.cpu import CpuBackend

            self.backend = CpuBackend(self.bundle, self.options)
        t_backend = time.perf_counter()
        if self.options.warmup:
            self.backend.warmup(self.limits)
        t_ready = time.perf_counter()
        self.startup = {"verify_s": t_verify - t0, "backend_s": t_backend - t_verify,
                        "warmup_s": t_ready - t_backend, "total_s": t_ready - t0}  # fmt: skip

    @property
    def backend_name(self) -> str:
        return self.backend.name

    def input_specs(self) -> list[TensorSpec]:
        return input_specs(self.config)

    def output_specs(self) -> list[TensorSpec]:
        return output_specs(self.config)

    def score(self, request: Request) -> np.ndarray:
        """Head probabilities (N, H) for one request."""
        return self.run([request]).outputs[0].probabilities

    def score_many(self, requests: list[Request]) -> list[np.ndarray]:
        """Head probabilities for each request, scored together as one batch."""
        return [o.probabilities for o in self.run(requests).outputs]

    def run(self, requests: list[Request], dedup: bool = True, validate: bool = True) -> BatchResult:
        """Score a group of requests as one batch; identical users share one request row."""
        from .batching import plan_batch

        if not requests:
            return BatchResult([], 0, 0, 0.0)
        if validate:
            for r in requests:
                validate_request(r, self.config, self.limits)
        t0 = time.perf_counter()
        plan = plan_batch(requests, dedup=dedup)
        probs, scores = self.backend.run(plan)
        outputs = [Output(p, s) for p, s in zip(plan.split(probs), plan.split(scores), strict=True)]
        return BatchResult(outputs, plan.num_rows, plan.num_candidates, time.perf_counter() - t0)

    def rank_scores(self, probabilities: np.ndarray) -> np.ndarray:
        """The final score Σ_h w_h p_h."""
        return probabilities @ np.asarray(self.config.score_weights, np.float32)

    def close(self) -> None:
        close = getattr(self.backend, "close", None)
        if close:
            close()
