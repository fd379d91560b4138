"""The ``cuda`` backend (hybrid): Triton kernels for the sequence modules; the dense part on the GPU
(default) or ``dense.onnx`` in ONNX Runtime on the host (``dense_on="cpu"``).

Per batch:

1. The host writes the batch into one pinned staging arena (item codes, action masks and surfaces of
   the three sequences, valid-prefix lengths, candidates, dense features) sized for the batch's shape
   bucket, in three parts: what stage A reads, the ll item codes (0.5 MB at 16,000 rows), the rest.
2. Stage A: one asynchronous copy moves part one to the GPU, then
   V1 runs on one stream: ``v1_tokens`` (newest rt actions ⊕ candidate), ``skut_forward`` writing
   ``out_linear`` of the max pool and the output rows in one launch (the first ``latest_n`` rows are
   read where they lie);
   on another, ``nn_select`` over the 100-row rt[:-r] and imp sequences (one pass each). Meanwhile the
   host fills part two, which a third stream uploads and scans (``nn_select`` over the jagged int8 ll
   rows) beside stage A, then part three, which stage B uploads first.
3. Stage B, after both: ``v2_tokens`` orders the picks and builds the V2 tokens (gathers, embeddings,
   null token) in one launch; ``skut_forward`` runs the whole V2 transformer with the causal + padding
   masks, the masked max pool and its ``out_linear`` fused. fp32 products use TF32 (``tf32=True``).
   Per shape bucket the three parts (about 20 launches in all, each graph beginning with its upload)
   are captured once as CUDA graphs (``cuda_graphs=True``), the streams of stage A as parallel
   branches, and replayed.
4. With ``dense_on="gpu"`` (the default) the dense part runs on the GPU inside stage B's graph, in
   ``runtime.kernels.dense``'s fused launches (gathers + concatenation + LayerNorm in one, then one per
   linear layer with its epilogue), reading V1's output blocks where V1 left them; one small copy
   back, the graph's last node: the probabilities. With ``dense_on="cpu"`` ``v1`` / ``v2`` come back
   into pinned host buffers and ``dense.onnx`` runs in ONNX Runtime on the CPU on numpy views of them
   (no extra copies); at 256 candidates that costs about 2 ms of host CPU per request.

Shape buckets (request rows, candidates, ll width; rt and imp always at their configured maximum) are
warmed up at start-up, so every Triton kernel is compiled before the server reports ready, and
Triton's compiled kernels live in a persistent folder (``TRITON_CACHE_DIR``) so that restarts do not
compile again.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from transact.config import ITEM_DIM, ModelConfig
from transact.model import RankingModel

from ..batching import BatchPlan, plan_batch
from ..kernels import interpreting, tf32_matmuls
from ..session import Limits, LoadedBundle, SessionOptions
from . import BackendUnavailable
from .warmup import warmup_requests

log = logging.getLogger("transact.runtime.cuda")
SEQS = ("ll", "rt", "imp")
MIN_CANDIDATE_BUCKET = 16
MIN_LL_BUCKET = 64
ALIGN = 256


def default_triton_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "transact" / "triton"


def set_triton_cache_dir(path: str | os.PathLike | None) -> Path:
    """Point Triton's compiled-kernel cache at a persistent folder (explicit path > $TRITON_CACHE_DIR > default)."""
    if path is None:
        path = os.environ.get("TRITON_CACHE_DIR") or default_triton_cache_dir()
    path = Path(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TRITON_CACHE_DIR"] = str(path)
    try:  # Triton >= 3.4 reads its knobs lazily from the environment; set the knob too where it exists
        import triton

        knobs = getattr(triton, "knobs", None)
        if knobs is not None and hasattr(knobs, "cache"):
            knobs.cache.dir = str(path)
    except Exception:  # noqa: BLE001 - older Triton: the environment variable is enough
        pass
    return path


def check_cuda_available() -> None:
    """Raise BackendUnavailable with the reason when the hybrid backend cannot run here."""
    if not torch.cuda.is_available():
        raise BackendUnavailable(
            "device='cuda' needs a CUDA GPU for its Triton kernels, and torch.cuda.is_available() is False "
            "here; use device='cpu' (ONNX Runtime) or device='auto'"
        )
    try:
        import triton  # noqa: F401
    except ImportError as e:
        raise BackendUnavailable(f"device='cuda' needs Triton for its kernels ({e}); pip install triton") from None


def load_kernels() -> SimpleNamespace:
    """The Triton kernel modules (import errors become BackendUnavailable)."""
    try:
        from runtime.kernels import dense, nn_select, skut, tokens
    except ImportError as e:
        raise BackendUnavailable(f"device='cuda': the Triton kernels are not available ({e})") from None
    return SimpleNamespace(dense=dense, nn_select=nn_select, skut=skut, tokens=tokens)


def pow2_bucket(n: int, minimum: int, cap: int | None = None) -> int:
    b = 1 << max(0, math.ceil(math.log2(max(n, minimum, 1))))
    return min(b, cap) if cap is not None and n <= cap else b


@dataclass(frozen=True)
class Bucket:
    rows: int
    cands: int
    widths: tuple[int, int, int]  # ll, rt, imp


class Arena:
    """One pinned host buffer and one device buffer with the same layout; named views into both."""

    def __init__(self, fields: list[tuple[str, torch.dtype, tuple[int, ...]]], device: torch.device) -> None:
        offsets, size = {}, 0
        for name, dtype, shape in fields:
            nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
            offsets[name] = (size, nbytes, dtype, shape)
            size += (nbytes + ALIGN - 1) // ALIGN * ALIGN
        pin = device.type == "cuda"
        self.host_bytes = torch.zeros(max(size, ALIGN), dtype=torch.uint8, pin_memory=pin)
        self.dev_bytes = torch.zeros(max(size, ALIGN), dtype=torch.uint8, device=device)
        self.host: dict[str, torch.Tensor] = {}
        self.dev: dict[str, torch.Tensor] = {}
        self.np: dict[str, np.ndarray] = {}
        for name, (off, nbytes, dtype, shape) in offsets.items():
            self.host[name] = self.host_bytes[off : off + nbytes].view(dtype).view(shape)
            self.dev[name] = self.dev_bytes[off : off + nbytes].view(dtype).view(shape)
            self.np[name] = self.host[name].numpy()
        self.size = size
        self._views: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.splits = (size, size)  # byte offsets where the second and third upload start (set by the owner)
        self.mirror_bytes = self.dev_bytes[:0]
        self.mirror: dict[str, torch.Tensor] = {}

    def offset(self, name: str) -> int:
        """Byte offset of field ``name`` in both buffers."""
        return self.host[name].data_ptr() - self.host_bytes.data_ptr()

    def add_mirror(self, names: list[str]) -> None:
        """A second device copy of the bytes up to the end of fields ``names``, with views of them
        (``mirror``), filled by ``upload_mirror``: work on another stream reads that copy, so it need not
        wait for the upload into the main device buffer."""
        hi = max(self.offset(n) + self.host[n].numel() * self.host[n].element_size() for n in names)
        self.mirror_bytes = torch.zeros(hi, dtype=torch.uint8, device=self.dev_bytes.device)
        for n in names:
            off, t = self.offset(n), self.host[n]
            self.mirror[n] = self.mirror_bytes[off : off + t.numel() * t.element_size()].view(t.dtype).view(t.shape)

    def upload(self, lo: int = 0, hi: int | None = None) -> None:
        """Copy bytes [lo, hi) of the host buffer to the device buffer, asynchronously on the current stream;
        with no arguments, all of it and the mirror."""
        if lo == 0 and hi is None:
            self.upload_mirror()
        hi = self.size if hi is None else hi
        views = self._views.get((lo, hi))
        if views is None:  # slicing costs microseconds of host time per call: keep the views
            views = self._views[(lo, hi)] = (self.dev_bytes[lo:hi], self.host_bytes[lo:hi])
        views[0].copy_(views[1], non_blocking=True)

    def upload_mirror(self) -> None:
        """Copy the mirrored host bytes to the mirror, asynchronously on the current stream."""
        self.mirror_bytes.copy_(self.host_bytes[: self.mirror_bytes.numel()], non_blocking=True)


class CudaBackend:
    """Triton kernels + torch on the GPU for the sequence modules, ONNX Runtime for the dense graph."""

    name = "cuda"

    def __init__(self, bundle: LoadedBundle, options: SessionOptions, device: str | torch.device | None = None,
                 cpu_reference: bool = False) -> None:
        """``device`` defaults to the current GPU. ``cpu_reference=True`` (tests) runs the same code on the CPU
        with the kernels' CPU paths (their PyTorch versions, or the interpreter under TRITON_INTERPRET=1)."""
        self.device = torch.device(device or "cuda")
        if self.device.type == "cuda":
            check_cuda_available()
        elif not (cpu_reference or interpreting()):
            raise BackendUnavailable("the cuda backend runs on a CUDA GPU (or on the CPU under TRITON_INTERPRET=1)")
        self.options = options
        self.triton_cache_dir = set_triton_cache_dir(options.triton_cache_dir)
        self.kernels = load_kernels()
        self.nn_select, self.skut_forward = self.kernels.nn_select.nn_select, self.kernels.skut.skut_forward
        pack = self.kernels.skut.pack_encoder_weights
        self.config: ModelConfig = bundle.config
        self.model = _load_model(bundle, self.device)
        self._lock = threading.Lock()
        m, c = self.model, self.config
        self.dense_on = options.dense_on
        if self.dense_on not in ("cpu", "gpu"):
            raise ValueError(f"dense_on must be 'cpu' or 'gpu', got {self.dense_on!r}")
        self.use_graphs = bool(options.cuda_graphs) and self.device.type == "cuda"
        half = torch.float16
        self.v1_packed = pack(m.transact.transformer_encoder, half) if m.transact is not None else None
        self.v2_packed = pack(m.transact_v2.transformer_encoder, half) if m.transact_v2 is not None else None
        # The modules' out_linear, as the transformer launch applies it to the pool (once, not per batch).
        self.v1_proj = _params(m.transact.out_linear) if m.transact is not None else None
        self.v2_proj = _params(m.transact_v2.out_linear) if m.transact_v2 is not None else None
        if m.transact_v2 is not None:
            m2 = m.transact_v2
            tables = (m2.action_emb, m2.surface_emb.weight, m2.pos_emb.weight, m2.null_token)
            self.v2_emb = self.kernels.tokens.V2Embeddings(*(t.detach() for t in tables))
        self.dense_w = self.kernels.dense.pack_dense(m, self.device) if self.dense_on == "gpu" else None
        self.widths_rt_imp = (max(1, c.max_rt), max(1, c.max_imp))
        self._score_weights = np.asarray(c.score_weights, np.float32)
        self.graphs: dict[Bucket, tuple] = {}  # (graph A, graph ll, graph B, A's + ll's outputs, B's outputs)
        self.arenas: dict[Bucket, Arena] = {}
        self.outputs: dict[Bucket, dict[str, torch.Tensor]] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._pool_ll = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._streams = [torch.cuda.Stream(self.device) for _ in range(2)] if self.device.type == "cuda" else []
        self._copy = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None  # ll upload + selection
        self._ll_done = torch.cuda.Event() if self.device.type == "cuda" else None
        self.stats = {"graphs_captured": 0, "graph_failures": 0, "buckets_warmed": 0}
        if self.dense_on == "cpu":
            import onnxruntime as ort

            from export.bundle import onnx_providers

            from .cpu import ort_options

            self.dense = ort.InferenceSession(
                bundle.graph_bytes("dense.onnx"), sess_options=ort_options(options.threads),
                providers=onnx_providers(options.onnx_provider),
            )
            self.dense_inputs = [i.name for i in self.dense.get_inputs()]

    # -- shapes ---------------------------------------------------------------------------------

    def bucket_for(self, rows: int, cands: int, ll_width: int) -> Bucket:
        cap = max(1, self.config.max_ll)
        ll = pow2_bucket(ll_width, MIN_LL_BUCKET, cap)
        return Bucket(pow2_bucket(rows, 1), pow2_bucket(cands, MIN_CANDIDATE_BUCKET), (ll, *self.widths_rt_imp))

    def staging_for(self, plan: BatchPlan) -> tuple[Bucket, Arena]:
        """The shape bucket of a plan and its (reused) staging arena, not yet filled."""
        b = self.bucket_for(plan.num_rows, plan.num_candidates, max(len(u.ll) for u in plan.users))
        return b, self._arena(b)

    def _arena(self, b: Bucket) -> Arena:
        arena = self.arenas.get(b)
        if arena is None:
            c, r, n = self.config, b.rows, b.cands
            tokens = r * sum(b.widths)
            # Three parts, each filled and uploaded in turn (see _outputs_for): what stage A (V1, the rt /
            # imp selections) reads; the ll item codes (0.5 MB at 16,000 rows), which the ll selection
            # reads; what only stage B reads. V1 reads the rt action masks from their own copy in part one.
            fields = [
                ("counts", torch.int32, (3, r)), ("cand", torch.float32, (n, ITEM_DIM)),
                ("cand_req", torch.int32, (n,)), ("rt_action", torch.int32, (r * b.widths[1],)),
                ("item", torch.int8, (tokens, ITEM_DIM)),  # rt, imp, then ll: the split falls inside
                ("action", torch.int32, (tokens,)), ("surface", torch.int32, (tokens,)),
                ("user_dense", torch.float32, (r, c.user_dense_dim)), ("context", torch.int64, (2, r)),
                ("item_dense", torch.float32, (n, c.item_dense_dim)),
            ]  # fmt: skip
            arena = self.arenas[b] = Arena(fields, self.device)
            arena.splits = (arena.offset("item") + self._bases(b)[0] * ITEM_DIM, arena.offset("action"))
            arena.add_mirror(["counts", "cand", "cand_req"])  # the ll selection's own copy of them
        return arena

    @staticmethod
    def _bases(b: Bucket) -> tuple[int, int, int]:
        """First token row of each group (ll, rt, imp) in the arena: rt (first, as ``rt_action`` assumes),
        imp, then ll."""
        r, (_, w_rt, w_imp) = b.rows, b.widths
        return r * (w_rt + w_imp), 0, r * w_rt

    def _fill(self, arena: Arena, b: Bucket, plan: BatchPlan) -> None:
        """Write the batch into the pinned staging arena (padding rows: zero lengths, row-0 candidates)."""
        self._fill_first(arena, b, plan)
        self._fill_ll(arena, b, plan)
        self._fill_rest(arena, b, plan)

    def _fill_first(self, arena: Arena, b: Bucket, plan: BatchPlan) -> None:
        """Part one: valid lengths, candidates, rt and imp item codes, rt actions."""
        a = arena.np
        counts = a["counts"]
        counts[:] = 0
        for g, (s, w, base) in enumerate(zip(SEQS, b.widths, self._bases(b), strict=True)):
            for i, u in enumerate(plan.users):
                seq = getattr(u, s)
                n = len(seq)
                if n and g:
                    a["item"][base + i * w : base + i * w + n] = seq.item
                    if g == 1:
                        a["rt_action"][i * w : i * w + n] = seq.action
                counts[g, i] = u.valid_length(s)
        n0 = 0
        for req, row in zip(plan.requests, plan.rows, strict=True):
            n = req.num_candidates
            a["cand"][n0 : n0 + n] = req.cand_item
            a["cand_req"][n0 : n0 + n] = row
            n0 += n
        a["cand_req"][n0:] = 0
        if n0 < b.cands:
            # Padding candidates repeat candidate 0 (whose row is 0). An all-zero vector would score
            # exactly 0 against every token, and such ties send the selection down its exact full scan:
            # 20-60 ms for a batch whose bucket had 512-1536 padding candidates. Outputs are discarded.
            a["cand"][n0:] = a["cand"][0]

    def _fill_ll(self, arena: Arena, b: Bucket, plan: BatchPlan) -> None:
        """Part two: the ll item codes."""
        item, w, lo = arena.np["item"], b.widths[0], self._bases(b)[0]
        for i, u in enumerate(plan.users):
            n = len(u.ll)
            if n:
                item[lo + i * w : lo + i * w + n] = u.ll.item

    def _fill_rest(self, arena: Arena, b: Bucket, plan: BatchPlan) -> None:
        """Part three: every action mask and surface, the dense features."""
        a = arena.np
        for s, w, base in zip(SEQS, b.widths, self._bases(b), strict=True):
            for i, u in enumerate(plan.users):
                seq = getattr(u, s)
                n = len(seq)
                lo = base + i * w
                if n:
                    a["action"][lo : lo + n] = seq.action
                    a["surface"][lo : lo + n] = seq.surface
        n0 = 0
        for req in plan.requests:
            n = req.num_candidates
            a["item_dense"][n0 : n0 + n] = req.item_dense
            n0 += n
        if n0 < b.cands:
            a["item_dense"][n0:] = 0
        for i, u in enumerate(plan.users):
            a["user_dense"][i] = u.user_dense
            a["context"][0, i] = u.surface
            a["context"][1, i] = u.hour

    # -- the GPU part ----------------------------------------------------------------------------

    def _compute(self, arena: Arena, b: Bucket) -> dict[str, torch.Tensor]:
        """v1 (Nb, d1), v2 (Nb, d2) (and probabilities with dense_on="gpu"), all on the device."""
        return self._stage_b(arena, b, self._stage_a(arena, b), self._stage_ll(arena, b))

    def _stage_a(self, arena: Arena, b: Bucket) -> dict[str, torch.Tensor]:
        """Everything that does not read the ll item codes: the V1 module (v1) and the selections over the
        short rt and imp sequences, on two streams (parallel branches of the graph)."""
        m, d = self.model, arena.dev
        cand, cand_req, counts = d["cand"], d["cand_req"], d["counts"]
        out = {} if self.dense_on == "gpu" else {"v1": torch.zeros(cand.shape[0], 0, device=self.device)}
        with tf32_matmuls(self.options.tf32 and self.device.type == "cuda"):
            used = []  # join only the streams that got work (a capture may not wait on an idle stream)
            if m.transact is not None:
                with self._side_stream(0):
                    parts = self._v1(arena, b, cand, cand_req, counts[1])
                    if self.dense_on == "gpu":  # the dense kernel reads the parts where they are
                        out.update({f"v1_{i}": p for i, p in enumerate(parts)})
                    else:
                        out["v1"] = torch.cat([p.float() for p in parts], dim=1)
                used.append(0)
            if m.transact_v2 is not None:
                with self._side_stream(1):
                    out["picks_rt"], out["picks_imp"] = self._pick(arena, b, cand, cand_req, counts, (1, 2))
                used.append(1)
            for i in used:
                self._join(i)
        return out

    def _stage_ll(self, arena: Arena, b: Bucket) -> torch.Tensor | None:
        """The selection over the ll item codes (the V2 module's picks_ll), or None without V2."""
        if self.model.transact_v2 is None:
            return None
        d = arena.mirror  # uploaded by this stage itself (see _outputs_for): no wait for stage A's upload
        return self._pick(arena, b, d["cand"], d["cand_req"], d["counts"], (0,))[0]

    def _stage_b(self, arena: Arena, b: Bucket, a: dict[str, torch.Tensor], picks_ll: torch.Tensor | None
                 ) -> dict[str, torch.Tensor]:  # fmt: skip
        """The V2 module and (dense_on="gpu") the dense part, after stage A and the ll selection."""
        m, d = self.model, arena.dev
        cand, cand_req, counts = d["cand"], d["cand_req"], d["counts"]
        out: dict[str, torch.Tensor] = {"v1": a["v1"]} if "v1" in a else {}
        with tf32_matmuls(self.options.tf32 and self.device.type == "cuda"):
            v2 = torch.zeros(cand.shape[0], 0, device=self.device)
            if m.transact_v2 is not None:
                v2, sel = self._v2(arena, b, cand, cand_req, counts, (picks_ll, a["picks_rt"], a["picks_imp"]))
                out.update(sel)
            out["v2"] = v2
            if self.dense_on == "gpu":
                parts = [a[k] for k in sorted(a) if k.startswith("v1_")] + [v2]
                out["probabilities"] = self.kernels.dense.dense_forward(
                    self.dense_w, d["user_dense"], d["item_dense"], d["context"][0], d["context"][1], cand_req,
                    cand, parts, tf32=self.options.tf32,
                )  # fmt: skip
        return out

    @contextlib.contextmanager
    def _side_stream(self, i: int) -> Iterator[None]:
        """Run the block on side stream ``i``, after everything queued so far (no-op off the GPU)."""
        if self.device.type != "cuda":
            yield
            return
        side = self._streams[i]
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            yield

    def _join(self, i: int) -> None:
        """Make the current stream wait for side stream ``i``."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).wait_stream(self._streams[i])

    def _token_arena(self, arena: Arena, b: Bucket, v1: bool = False):
        """The staged sequences as the token kernels read them; for V1 (which reads only the rt group,
        based at row 0) with the action masks of the arena's first part."""
        d = arena.dev
        action = d["rt_action"] if v1 else d["action"]
        return self.kernels.tokens.TokenArena(d["item"], action, d["surface"], self._bases(b), b.widths)

    def _pick(self, arena: Arena, b: Bucket, cand, cand_req, counts, groups: tuple[int, ...]) -> list[torch.Tensor]:
        """V2's top-k positions (N, k) int32 for each of ``groups`` (0 ll, 1 rt without its newest r_rt, 2 imp)."""
        cfg = self.config.transact_v2
        tokens = self._token_arena(arena, b)
        out = []
        for g in groups:
            if g == 0:
                n = counts[0] if cfg.use_ll else torch.zeros_like(counts[0])
            else:
                n = (counts[1] - cfg.r_rt).clamp_min(0) if g == 1 else counts[2]
            starts = torch.arange(0, b.rows * b.widths[g], b.widths[g], device=self.device)
            k = (cfg.k_ll, cfg.k_rt, cfg.k_imp)[g]
            out.append(self.nn_select(tokens.rows(g, b.rows), starts, n, cand, cand_req, k, idx_dtype=torch.int32,
                                      max_len=b.widths[g])[0])  # fmt: skip
        return out

    def _v2(self, arena: Arena, b: Bucket, cand, cand_req, counts, picks) -> tuple[torch.Tensor, dict]:
        m2, cfg = self.model.transact_v2, self.config.transact_v2
        scale = self.config.quant_scale / 127.0
        x, pad, pos, group = self.kernels.tokens.v2_tokens(
            self._token_arena(arena, b), picks, counts[1], cfg.r_rt, cand, cand_req, self.v2_emb, scale
        )
        if cfg.latest_n > 0:
            hidden = self.skut_forward(x, self.v2_packed, key_padding_mask=pad, causal=True, pool=None).float()
            v2 = m2.pool(hidden, pad)
        else:
            v2 = self.skut_forward(x, self.v2_packed, key_padding_mask=pad, causal=True, pool="max_valid",
                                   pool_proj=self.v2_proj)  # out_linear in the same launch
        return v2, {"selection_pos": pos, "selection_group": group}

    def _v1(self, arena: Arena, b: Bucket, cand, cand_req, rt_n) -> list[torch.Tensor]:
        """V1's output as its column blocks: ``out_linear`` of the max pool (fp32, with
        ``concat_max_pool``; from the transformer's launch) and the output rows kept, (N, rows * d), a view
        of the fp16 hidden buffer."""
        m1, cfg = self.model.transact, self.config.transact
        x, mask = self.kernels.tokens.v1_tokens(
            self._token_arena(arena, b, v1=True), rt_n, cfg.seq_len, cand, cand_req, m1.action_type_lookup,
            m1.action_emb_module.weight.detach(), self.config.quant_scale / 127.0,
            concat_candidate=cfg.concat_candidate_emb,
        )  # fmt: skip
        parts = []
        if cfg.concat_max_pool:  # max over every slot, padding included, as the module does; same launch
            hidden = torch.empty_like(x)
            parts.append(self.skut_forward(x, self.v1_packed, mask, causal=False, pool="max_all", hidden=hidden,
                                           pool_proj=self.v1_proj))  # fmt: skip
        else:
            hidden = self.skut_forward(x, self.v1_packed, key_padding_mask=mask, causal=False, pool=None)
        rows = hidden[:, : cfg.latest_n_emb] if cfg.latest_n_emb > 0 else hidden
        parts.append(rows.reshape(rows.shape[0], -1))
        return parts

    # -- running ---------------------------------------------------------------------------------

    def _outputs_for(self, arena: Arena, b: Bucket, plan: BatchPlan) -> dict[str, torch.Tensor]:
        """Upload, fill parts two and three of the arena and run the GPU part, for a bucket whose arena
        holds part one of ``plan`` (``_fill_first``).

        With captured graphs the work overlaps: stage A's graph uploads part one and starts; the host
        then fills the ll item codes (0.5 MB at 16,000 rows), which the ll selection's graph uploads and
        scans on a second stream beside stage A, while the host fills part three (action masks,
        surfaces, dense features); stage B's graph follows both streams, uploads part three first and
        ends by copying the returned outputs to their pinned host buffers. Without graphs (or before the
        first capture) it runs in order."""
        graphs = self.graphs.get(b) if self.use_graphs else None
        if graphs is None:
            self._fill_ll(arena, b, plan)
            self._fill_rest(arena, b, plan)
            arena.upload()
            if not self.use_graphs:
                with torch.no_grad():
                    return self._compute(arena, b)
            return self._capture(arena, b)
        graph_a, graph_ll, graph_b, _, static = graphs
        # Each graph uploads what it reads first, so the host makes one call per stage. The ll stream
        # waits for nothing: the previous batch, whose stage B read the device's part two, ended in a
        # host sync, and the ll selection reads its own copy of part one's candidates and counts.
        if graph_a is not None:
            graph_a.replay()  # uploads part one, then stage A
        else:
            arena.upload(0, arena.splits[0])
        self._fill_ll(arena, b, plan)
        with torch.cuda.stream(self._copy):
            graph_ll.replay()  # uploads part two and the ll selection's copy of part one, then the selection
            self._ll_done.record(self._copy)
        self._fill_rest(arena, b, plan)  # while the ll codes go up and are scanned
        torch.cuda.current_stream(self.device).wait_event(self._ll_done)
        graph_b.replay()  # uploads part three, runs stage B, copies the returned outputs to the host
        return static

    def _capture(self, arena: Arena, b: Bucket) -> dict[str, torch.Tensor]:
        """Compile (eager runs on a side stream), capture stage A, the ll selection and stage B as three
        CUDA graphs, check their replay against the eager result.

        A and B share one memory pool (B always runs after A); the ll selection, which runs beside A, has
        its own pool, so that neither can reuse memory the other is still using."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.no_grad(), torch.cuda.stream(stream):
            for _ in range(2):
                eager = self._compute(arena, b)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        try:
            m = self.model
            # Stage A with no work (no V1 and no V2 module) is not captured: an empty graph is no use, and
            # torch warns about one. The ll graph always has work: the upload of part two.
            graph_a = torch.cuda.CUDAGraph() if m.transact is not None or m.transact_v2 is not None else None
            graph_ll, graph_b = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            s1, s2 = arena.splits
            host = {k: self._host_out(b, k, eager[k]) for k in self._returned()}  # pinned: allocated before
            # The uploads and the copy back are nodes of the graphs: fewer calls on the host's critical
            # path, which on slower hosts decides when stage B can start.
            with torch.no_grad(), _maybe_graph(graph_a, self._pool):
                if graph_a is not None:
                    arena.upload(0, s1)
                mid = self._stage_a(arena, b)  # kept alive with the graphs: stage B reads these buffers
            with torch.no_grad(), torch.cuda.graph(graph_ll, pool=self._pool_ll):
                arena.upload_mirror()
                arena.upload(s1, s2)
                mid["picks_ll"] = self._stage_ll(arena, b)
            with torch.no_grad(), torch.cuda.graph(graph_b, pool=self._pool):
                arena.upload(s2)
                static = self._stage_b(arena, b, mid, mid["picks_ll"])
                for k, buf in host.items():
                    buf.copy_(static[k], non_blocking=True)
            for g in (graph_a, graph_ll, graph_b):
                if g is not None:
                    g.replay()
            torch.cuda.synchronize(self.device)
            for k, v in eager.items():
                if v.is_floating_point() and v.numel() and not torch.allclose(v, static[k], atol=1e-4, rtol=1e-4):
                    raise RuntimeError(f"graph replay differs from the eager run on '{k}'")
                if not v.is_floating_point() and not torch.equal(v, static[k]):
                    raise RuntimeError(f"graph replay differs from the eager run on '{k}'")
            for k, buf in host.items():
                if not torch.equal(buf, static[k].cpu()):
                    raise RuntimeError(f"the graph's copy of '{k}' to the host differs from the device's")
        except Exception as e:  # noqa: BLE001 - fall back to eager launches, never to wrong results
            self.stats["graph_failures"] += 1
            log.warning("CUDA graph capture failed for %s (%s); running that path eagerly from now on", b, e)
            self.use_graphs = False
            torch.cuda.synchronize(self.device)
            return eager
        self.graphs[b] = (graph_a, graph_ll, graph_b, mid, static)
        self.stats["graphs_captured"] += 1
        return static

    def _returned(self) -> list[str]:
        """The outputs every batch copies back: the probabilities, or v1 and v2 for ``dense.onnx``."""
        return ["probabilities"] if self.dense_on == "gpu" else ["v1", "v2"]

    def _host_out(self, b: Bucket, name: str, src: torch.Tensor) -> torch.Tensor:
        store = self.outputs.setdefault(b, {})
        buf = store.get(name)
        if buf is None or buf.shape != src.shape:
            buf = store[name] = torch.empty(src.shape, dtype=src.dtype, pin_memory=self.device.type == "cuda")
        return buf

    def sequence_outputs(self, plan: BatchPlan) -> dict[str, np.ndarray]:
        """The GPU part for a plan, copied back: the probabilities (dense_on="gpu") or v1 and v2
        (dense_on="cpu"), and the V2 selection (selection_pos, selection_group)."""
        with self._lock:
            return {k: v.copy() for k, v in self._sequence_outputs(plan, selection=True).items()}

    def _sequence_outputs(self, plan: BatchPlan, selection: bool = False) -> dict[str, np.ndarray]:
        """As ``sequence_outputs``, as views of the reused pinned buffers (valid until the next batch); the
        selection (two (N, T) int64 tensors, ~0.8 MB at 256 candidates) only when asked for."""
        b, arena = self.staging_for(plan)
        self._fill_first(arena, b, plan)
        outs = self._outputs_for(arena, b, plan)
        n = plan.num_candidates
        wanted = self._returned()
        # Stage B's graph copied these to the host itself (not so if the graphs were given up since).
        copied = set(wanted) if self.use_graphs and b in self.graphs else set()
        if selection:
            wanted += [k for k in ("selection_pos", "selection_group") if k in outs]
        host = {}
        for k in wanted:
            buf = host[k] = self._host_out(b, k, outs[k])
            if k not in copied:
                buf.copy_(outs[k], non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return {k: v.numpy()[:n] for k, v in host.items()}

    def run(self, plan: BatchPlan) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            return self._run(plan)

    def _run(self, plan: BatchPlan) -> tuple[np.ndarray, np.ndarray]:
        outs = self._sequence_outputs(plan)
        if self.dense_on == "gpu":
            probs = outs["probabilities"].astype(np.float32, copy=True)
            return probs, probs @ self._score_weights
        users = plan.users
        feed = {
            "user_dense": np.stack([u.user_dense for u in users]), "surface": np.array([u.surface for u in users]),
            "hour": np.array([u.hour for u in users]), "cand_request": plan.cand_request(),
            "cand_item": np.concatenate([q.cand_item for q in plan.requests]),
            "item_dense": np.concatenate([q.item_dense for q in plan.requests]),
            "v1": outs["v1"], "v2": outs["v2"],
        }  # fmt: skip
        feed["surface"] = feed["surface"].astype(np.int64)
        feed["hour"] = feed["hour"].astype(np.int64)
        probs, scores = self.dense.run(["probabilities", "scores"], {k: feed[k] for k in self.dense_inputs})
        return probs, scores

    def warmup(self, limits: Limits) -> None:
        """Compile and capture the common buckets: one user at every candidate bucket and ll width, then
        the batched row buckets, so that no request pays for a compile."""
        t0 = time.perf_counter()
        c = self.config
        shapes = self.options.warmup_shapes
        if shapes is None:
            top = max(limits.max_candidates, MIN_CANDIDATE_BUCKET)
            n_buckets = [MIN_CANDIDATE_BUCKET << i for i in range(16) if (MIN_CANDIDATE_BUCKET << i) <= top]
            ll_widths = sorted({pow2_bucket(w, MIN_LL_BUCKET, max(1, c.max_ll))
                                for w in [MIN_LL_BUCKET << i for i in range(20)] + [c.max_ll]
                                if w <= max(c.max_ll, MIN_LL_BUCKET)})  # fmt: skip
            shapes = [(1, n, w) for n in n_buckets for w in ll_widths]
            rows = 2
            while rows <= max(1, self.options.max_batch):
                shapes.append((rows, MIN_CANDIDATE_BUCKET * rows, ll_widths[-1]))
                rows *= 2
        for users, cands, ll in shapes:
            lim = Limits(max(cands, 1), min(ll, c.max_ll), limits.max_rt, limits.max_imp)
            reqs = warmup_requests(c, lim, [(users, cands)])[0]
            self.run(plan_batch(reqs, dedup=False))
            self.stats["buckets_warmed"] += 1
        self.stats["warmup_s"] = time.perf_counter() - t0


def _params(linear: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of a Linear as ``skut_forward``'s ``pool_proj`` takes them (fp32, contiguous)."""
    bias = linear.bias if linear.bias is not None else torch.zeros_like(linear.weight[:, 0])
    return linear.weight.detach().contiguous(), bias.detach().contiguous()


def _maybe_graph(graph: torch.cuda.CUDAGraph | None, pool) -> contextlib.AbstractContextManager:
    """Capture into ``graph`` (sharing ``pool``), or run the block uncaptured when it is None (a stage
    that launches nothing)."""
    return contextlib.nullcontext() if graph is None else torch.cuda.graph(graph, pool=pool)


def _load_model(bundle: LoadedBundle, device: torch.device) -> RankingModel:
    """Rebuild the model from the manifest's config and load weights.safetensors (fp32, eval mode)."""
    model = RankingModel(bundle.config)
    model.load_state_dict(bundle.state_dict(), strict=True)
    return model.eval().to(device)
