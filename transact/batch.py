"""The input of the model: requests with their user sequences stored once, and candidates.

A batch holds R requests (one user each) and N candidates; ``cand_request[n]`` names the request
candidate ``n`` belongs to (request-level de-duplication, DESIGN §2.1). Each of the three action
sequences is padded per request to a common length L and stored oldest -> newest; ``length`` counts
the stored tokens. A token is *valid* when its slot is below ``length`` and its timestamp is before
the request time; sequences are sorted by time, so the valid tokens are always a prefix.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields

import torch

SEQUENCES = ("ll", "rt", "imp")


class BatchError(ValueError):
    """Bad model input; the message names the tensor."""


@dataclass
class Seq:
    """One action sequence per request, padded: (R, L) and (R, L, 32)."""

    ts: torch.Tensor  # int64 milliseconds
    action: torch.Tensor  # int32 bitmask over action kinds
    surface: torch.Tensor  # int64 surface id
    item: torch.Tensor  # int8 item codes
    length: torch.Tensor  # (R,) int64 stored tokens

    def to(self, device: torch.device | str) -> Seq:
        return Seq(*(getattr(self, f.name).to(device) for f in fields(self)))

    def valid(self, request_ts: torch.Tensor) -> torch.Tensor:
        """(R, L) bool: slot holds a token that happened before the request."""
        pos = torch.arange(self.ts.shape[1], device=self.ts.device)
        return (pos[None, :] < self.length[:, None]) & (self.ts < request_ts[:, None])

    def valid_count(self, request_ts: torch.Tensor) -> torch.Tensor:
        """(R,) int64 length of the valid prefix."""
        return self.valid(request_ts).sum(dim=1)


@dataclass
class Batch:
    request_ts: torch.Tensor  # (R,) int64 ms
    user_dense: torch.Tensor  # (R, Du) float32
    surface: torch.Tensor  # (R,) int64 surface of the request
    hour: torch.Tensor  # (R,) int64 hour of day 0..23
    ll: Seq
    rt: Seq
    imp: Seq
    cand_request: torch.Tensor  # (N,) int64
    cand_item: torch.Tensor  # (N, 32) float32 candidate embedding (dequantised)
    item_dense: torch.Tensor  # (N, Di) float32
    labels: torch.Tensor | None = None  # (N, H) float32

    @property
    def num_requests(self) -> int:
        return int(self.request_ts.shape[0])

    @property
    def num_candidates(self) -> int:
        return int(self.cand_request.shape[0])

    def to(self, device: torch.device | str) -> Batch:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = None if v is None else v.to(device)
        return Batch(**out)

    def named_tensors(self, with_labels: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """Flat (name, tensor) pairs in a fixed order: the input signature of the exported graphs."""
        for name in ("request_ts", "user_dense", "surface", "hour"):
            yield name, getattr(self, name)
        for s in SEQUENCES:
            seq = getattr(self, s)
            for f in fields(Seq):
                yield f"{s}_{f.name}", getattr(seq, f.name)
        for name in ("cand_request", "cand_item", "item_dense"):
            yield name, getattr(self, name)
        if with_labels and self.labels is not None:
            yield "labels", self.labels

    @classmethod
    def from_named(cls, tensors: dict[str, torch.Tensor]) -> Batch:
        """Inverse of ``named_tensors``."""
        seqs = {s: Seq(**{f.name: tensors[f"{s}_{f.name}"] for f in fields(Seq)}) for s in SEQUENCES}
        return cls(
            request_ts=tensors["request_ts"],
            user_dense=tensors["user_dense"],
            surface=tensors["surface"],
            hour=tensors["hour"],
            cand_request=tensors["cand_request"],
            cand_item=tensors["cand_item"],
            item_dense=tensors["item_dense"],
            labels=tensors.get("labels"),
            **seqs,
        )


INPUT_NAMES: tuple[str, ...] = (
    "request_ts", "user_dense", "surface", "hour",
    *(f"{s}_{f.name}" for s in SEQUENCES for f in fields(Seq)),
    "cand_request", "cand_item", "item_dense",
)  # fmt: skip

INPUT_DTYPES: dict[str, torch.dtype] = {
    "request_ts": torch.int64, "user_dense": torch.float32, "surface": torch.int64,
    "hour": torch.int64, "cand_request": torch.int64, "cand_item": torch.float32,
    "item_dense": torch.float32, "labels": torch.float32,
    **{f"{s}_ts": torch.int64 for s in SEQUENCES}, **{f"{s}_action": torch.int32 for s in SEQUENCES},
    **{f"{s}_surface": torch.int64 for s in SEQUENCES}, **{f"{s}_item": torch.int8 for s in SEQUENCES},
    **{f"{s}_length": torch.int64 for s in SEQUENCES},
}  # fmt: skip


def shape_error(
    name: str, spec: Sequence[str | int], got: Sequence[int], dims: dict[str, int], set_by: dict[str, str]
) -> BatchError:
    """The error for a tensor of the wrong shape: the expected shape with its symbolic sizes filled in, and, for
    each size that disagrees, the input that fixed it (when that is another input), since that one may be wrong."""
    want = ", ".join(f"{d}={dims[d]}" if isinstance(d, str) and d in dims else str(d) for d in spec)
    fixed = []
    if len(got) == len(spec):
        fixed = [f"{d} from {set_by[d]}" for d, g in zip(spec, got, strict=True)
                 if isinstance(d, str) and d in dims and dims[d] != g and set_by.get(d, name) != name]  # fmt: skip
    note = f" ({', '.join(fixed)})" if fixed else ""
    return BatchError(f"{name}: expected shape [{want}]{note}, got {list(got)}")


def validate_batch(batch: Batch, config, num_heads: int | None = None) -> None:
    """Check dtypes, shapes, ranges and finiteness; raise BatchError naming the tensor."""
    named = dict(batch.named_tensors(with_labels=True))
    for name, t in named.items():
        if t.dtype != INPUT_DTYPES[name]:
            raise BatchError(f"{name}: expected dtype {INPUT_DTYPES[name]}, got {t.dtype}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise BatchError(f"{name}: contains NaN or infinite values")
    r, n = batch.num_requests, batch.num_candidates
    if r < 1:
        raise BatchError("request_ts: a batch needs at least one request")
    if n < 1:
        raise BatchError("cand_request: a batch needs at least one candidate")
    dims = {"R": r, "N": n}
    set_by = {"R": "request_ts", "N": "cand_request"}  # symbolic dim -> the input that fixes it
    expect: dict[str, tuple[str | int, ...]] = {
        "request_ts": ("R",), "user_dense": ("R", config.user_dense_dim), "surface": ("R",), "hour": ("R",),
        "cand_request": ("N",), "cand_item": ("N", 32), "item_dense": ("N", config.item_dense_dim),
    }  # fmt: skip
    if batch.labels is not None:
        expect["labels"] = ("N", num_heads or len(config.heads))
    for s in SEQUENCES:
        ts, dim = getattr(batch, s).ts, f"L_{s}"
        if ts.dim() == 2:
            dims[dim], set_by[dim] = ts.shape[1], f"{s}_ts"
        expect.update({f"{s}_ts": ("R", dim), f"{s}_action": ("R", dim), f"{s}_surface": ("R", dim),
                       f"{s}_item": ("R", dim, 32), f"{s}_length": ("R",)})  # fmt: skip
    for name, spec in expect.items():
        got = tuple(named[name].shape)
        if got != tuple(dims.get(d, -1) if isinstance(d, str) else d for d in spec):
            raise shape_error(name, spec, got, dims, set_by)
    for s in SEQUENCES:
        seq = getattr(batch, s)
        limit, length = getattr(config, f"max_{s}"), seq.ts.shape[1]
        if int(seq.length.max()) > limit:
            raise BatchError(f"{s}_length: {int(seq.length.max())} tokens, more than max_{s}={limit}")
        if int(seq.length.min()) < 0 or int(seq.length.max()) > length:
            raise BatchError(f"{s}_length: must lie in [0, {length}]")
    if int(batch.cand_request.min()) < 0 or int(batch.cand_request.max()) >= r:
        raise BatchError(f"cand_request: values must lie in [0, {r})")
    if int(batch.surface.min()) < 0 or int(batch.surface.max()) >= config.num_surfaces:
        raise BatchError(f"surface: values must lie in [0, {config.num_surfaces})")
    if int(batch.hour.min()) < 0 or int(batch.hour.max()) > 23:
        raise BatchError("hour: values must lie in [0, 23]")
    for s in SEQUENCES:
        seq = getattr(batch, s)
        if seq.item.numel() and int(seq.item.min()) < -127:
            raise BatchError(f"{s}_item: int8 codes must lie in [-127, 127]")
        if seq.surface.numel() and (int(seq.surface.min()) < 0 or int(seq.surface.max()) >= config.num_surfaces):
            raise BatchError(f"{s}_surface: values must lie in [0, {config.num_surfaces})")
        pos = torch.arange(seq.ts.shape[1], device=seq.ts.device)
        stored = pos[None, :] < seq.length[:, None]
        if seq.ts.shape[1] > 1:
            later = seq.ts[:, 1:] >= seq.ts[:, :-1]
            if not bool((later | ~stored[:, 1:]).all()):
                raise BatchError(f"{s}_ts: each sequence must be sorted oldest -> newest")
