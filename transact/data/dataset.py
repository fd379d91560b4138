"""In-memory ranking data: an action log, requests with their candidates, and batching.

Every source (the synthetic generator, MovieLens-100K, user action logs) builds a ``RankingDataset``:

* an **action log** — one row per event (user, item, action bitmask, timestamp ms, surface); an
  action of 0 is a pure impression (shown, not engaged);
* **requests** — (user, request time, surface, hour, dense user features) and their **candidates**
  (item, dense item features, and the action the user took on it: the labels);
* int8 **item codes** (I, 32) with their quantisation scale (DESIGN §2.2).

The three sequences of a request are cut from its user's log at batch time and contain only events
strictly before the request time, so no example can see its own future:
``ll`` the latest ``max_ll`` explicit actions (action != 0), ``rt`` the latest ``max_rt`` of them,
``imp`` the latest ``max_imp`` impressions (action == 0); each stored oldest -> newest.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..batch import Batch, Seq
from ..config import ITEM_DIM
from ..errors import TransactError
from ..quant import dequantize

HOUR_MS = 3_600_000
DEFAULT_ACTIONS = ("click", "save", "hide")
NEGATIVE_ACTIONS = ("hide",)  # actions that count against an item (negative score weight)


def stable_order(key: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Permutation sorting by (key, ts); equal pairs keep their input order."""
    order = np.argsort(ts, kind="stable")
    return order[np.argsort(key[order], kind="stable")]


def is_sorted(key: np.ndarray, ts: np.ndarray) -> bool:
    """Whether the rows are already ordered by (key, ts)."""
    dk = np.diff(key)
    return bool((dk >= 0).all() and ((dk > 0) | (np.diff(ts) >= 0)).all())


# ---------------------------------------------------------------------------------------------
# Raw inputs
# ---------------------------------------------------------------------------------------------


@dataclass
class ActionLog:
    """Events of all users; stored sorted by (user, ts), ties in ts keep their input order."""

    user: np.ndarray  # (E,) int64
    item: np.ndarray  # (E,) int64 index into the item table
    action: np.ndarray  # (E,) int32 bitmask over action_names; 0 = impression
    ts: np.ndarray  # (E,) int64 milliseconds
    surface: np.ndarray | None = None  # (E,) int64; None = surface 0 everywhere

    def __post_init__(self) -> None:
        n = len(self.user)
        if self.surface is None:
            self.surface = np.zeros(n, dtype=np.int64)
        for name in ("user", "item", "action", "ts", "surface"):
            arr = np.asarray(getattr(self, name))
            if arr.ndim != 1 or len(arr) != n:
                raise TransactError(f"expected a 1-d array of {n} values, got shape {arr.shape}", field=name)
            if arr.size and not np.issubdtype(arr.dtype, np.integer):
                raise TransactError(f"expected integers, got {arr.dtype}", field=name)
            setattr(self, name, arr)
        self.user, self.item = self.user.astype(np.int64), self.item.astype(np.int64)
        self.action, self.ts = self.action.astype(np.int32), self.ts.astype(np.int64)
        self.surface = self.surface.astype(np.int64)
        if not is_sorted(self.user, self.ts):
            order = stable_order(self.user, self.ts)
            for name in ("user", "item", "action", "ts", "surface"):
                setattr(self, name, getattr(self, name)[order])

    def __len__(self) -> int:
        return len(self.user)

    def take(self, mask: np.ndarray) -> ActionLog:
        """The events where ``mask`` is true (order kept)."""
        return ActionLog(self.user[mask], self.item[mask], self.action[mask], self.ts[mask], self.surface[mask])


@dataclass
class Requests:
    """Ranking requests and their candidates (flat, ``cand_request`` names each candidate's request)."""

    user: np.ndarray  # (R,) int64
    ts: np.ndarray  # (R,) int64 ms
    surface: np.ndarray  # (R,) int64
    user_dense: np.ndarray  # (R, Du) float32
    cand_request: np.ndarray  # (M,) int64 in [0, R)
    cand_item: np.ndarray  # (M,) int64
    cand_action: np.ndarray  # (M,) int32 what the user did with the candidate (labels come from it)
    item_dense: np.ndarray  # (M, Di) float32
    hour: np.ndarray | None = None  # (R,) int64; None = hour of day (UTC) of ``ts``


# ---------------------------------------------------------------------------------------------
# Vectorised helpers
# ---------------------------------------------------------------------------------------------


def cut_points(
    group: np.ndarray, ts: np.ndarray, q_group: np.ndarray, q_ts: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Events sorted by (group, ts); for each query (q_group, q_ts) return the index of the group's
    first event and of its first event with ts >= q_ts. Events in [start, cut) are strictly earlier.

    A binary search inside each query's own group, run for all queries at once (the cost depends on
    the number of queries, not of events)."""
    start = np.searchsorted(group, q_group, side="left").astype(np.int64)
    hi = np.searchsorted(group, q_group, side="right").astype(np.int64)
    lo = start.copy()
    q_ts = np.asarray(q_ts, dtype=np.int64)
    while True:
        open_ = lo < hi
        if not open_.any():
            break
        mid = (lo + hi) // 2
        before = open_ & (ts[np.minimum(mid, len(ts) - 1)] < q_ts)
        lo = np.where(before, mid + 1, lo)
        hi = np.where(open_ & ~before, mid, hi)
    return start, lo


def ragged_arange(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + c)`` for each pair, without a Python loop."""
    counts = counts.astype(np.int64)
    total = int(counts.sum())
    first = np.repeat(np.cumsum(counts) - counts, counts)
    return np.repeat(starts.astype(np.int64), counts) + (np.arange(total, dtype=np.int64) - first)


def action_bits(action: np.ndarray, n: int) -> np.ndarray:
    """(E, n) bool: bit ``a`` of each bitmask."""
    return (action.astype(np.int64)[:, None] >> np.arange(n)) & 1 == 1


def time_cutoffs(request_ts: np.ndarray, valid_frac: float, test_frac: float) -> tuple[int, int]:
    """Request times where valid and test begin: train < t_valid <= valid < t_test <= test.

    Requests at one timestamp always fall in the same split, so the order is strict."""
    if not (0 <= valid_frac < 1 and 0 <= test_frac < 1 and valid_frac + test_frac < 1):
        raise TransactError("valid_frac and test_frac must lie in [0, 1) and sum to less than 1", field="split")
    s = np.sort(np.asarray(request_ts, dtype=np.int64))
    n = len(s)
    if n == 0:
        raise TransactError("no requests to split", field="split")
    n_test, n_valid = int(round(n * test_frac)), int(round(n * valid_frac))
    end = int(s[-1]) + 1
    t_test = int(s[n - n_test]) if n_test else end
    t_valid = int(s[n - n_test - n_valid]) if n_valid else t_test
    return min(t_valid, t_test), t_test


def history_features(
    log: ActionLog,
    req_user: np.ndarray,
    req_ts: np.ndarray,
    cand_request: np.ndarray,
    cand_item: np.ndarray,
    num_actions: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Count features from the log strictly before each request (leak-free by construction).

    Per request (2 + A): log1p(#explicit actions), log1p(#impressions), share of each action kind.
    Per candidate (1 + A): log1p(#events on the item), smoothed rate of each action kind on it.
    """
    bits = action_bits(log.action, num_actions).astype(np.int64)
    explicit = log.action != 0
    start, cut = cut_points(log.user, log.ts, req_user, req_ts)
    cum_ex = np.concatenate([[0], np.cumsum(explicit)])
    cum_bits = np.concatenate([np.zeros((1, num_actions), np.int64), np.cumsum(bits, axis=0)])
    n_all = cut - start
    n_ex = cum_ex[cut] - cum_ex[start]
    kinds = cum_bits[cut] - cum_bits[start]
    share = (kinds + 0.1) / (n_ex[:, None] + 1.0)
    user_f = np.column_stack([np.log1p(n_ex), np.log1p(n_all - n_ex), share]).astype(np.float32)

    by_item = stable_order(log.item, log.ts)
    i_bits = np.concatenate([np.zeros((1, num_actions), np.int64), np.cumsum(bits[by_item], axis=0)])
    i_start, i_cut = cut_points(log.item[by_item], log.ts[by_item], cand_item, req_ts[cand_request])
    n_item = i_cut - i_start
    rates = (i_bits[i_cut] - i_bits[i_start] + 0.1) / (n_item[:, None] + 1.0)
    item_f = np.column_stack([np.log1p(n_item), rates]).astype(np.float32)
    return user_f, item_f


def sessionize(
    log: ActionLog, gap_ms: int, max_candidates: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Turn a log into requests: each user's events are cut into sessions at gaps longer than
    ``gap_ms``, sessions into chunks of at most ``max_candidates`` events; a chunk is one request at
    the time of its first event, and its events are the candidates (labels = their actions).

    Repeated events on one item within a chunk merge into one candidate (OR of the actions), so an
    impression followed by a click is labelled as a click. Returns (req_user, req_ts, req_surface,
    cand_request, cand_item, cand_action).
    """
    if max_candidates < 1:
        raise TransactError("must be >= 1", field="max_candidates")
    n = len(log)
    if n == 0:
        raise TransactError("the action log is empty", field="user")
    new_session = np.ones(n, dtype=bool)
    new_session[1:] = (log.user[1:] != log.user[:-1]) | (log.ts[1:] - log.ts[:-1] > gap_ms)
    session_first = np.flatnonzero(new_session)
    pos = np.arange(n) - session_first[np.cumsum(new_session) - 1]
    new_chunk = new_session | (pos % max_candidates == 0)
    chunk = np.cumsum(new_chunk) - 1
    first = np.flatnonzero(new_chunk)
    order = np.lexsort((log.item, chunk))
    c, it, act = chunk[order], log.item[order], log.action[order]
    head = np.ones(n, dtype=bool)
    head[1:] = (c[1:] != c[:-1]) | (it[1:] != it[:-1])
    starts = np.flatnonzero(head)
    cand_action = np.bitwise_or.reduceat(act, starts).astype(np.int32)
    return (log.user[first], log.ts[first], log.surface[first], c[starts].astype(np.int64), it[starts], cand_action)


# ---------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------


class _SubLog:
    """One kind of event (explicit or impression), sorted by (user, ts), plus a padding row at the end
    that padded sequence slots point at."""

    def __init__(self, log: ActionLog, pad_item: int) -> None:
        self.user = log.user
        self.ts = np.append(log.ts, 0)
        self.action = np.append(log.action, 0).astype(np.int32)
        self.surface = np.append(log.surface, 0)
        self.item = np.append(log.item, pad_item)
        self.pad = len(log)


class RankingDataset:
    """Requests over a shared action log, batched into ``transact.batch.Batch`` objects."""

    def __init__(
        self,
        log: ActionLog,
        requests: Requests,
        item_codes: np.ndarray,
        scale: float,
        *,
        action_names: Sequence[str] = DEFAULT_ACTIONS,
        heads: Sequence[str] | None = None,
        max_ll: int = 1000,
        max_rt: int = 100,
        max_imp: int = 100,
        num_surfaces: int | None = None,
        source: str = "data",
        embedding_cutoff_ts: int | None = None,
    ) -> None:
        self.source = source
        self.action_names = list(action_names)
        self.heads = list(heads) if heads is not None else list(self.action_names)
        self.max_ll, self.max_rt, self.max_imp = int(max_ll), int(max_rt), int(max_imp)
        self.scale = float(scale)
        # Items seen by the embedding learner end before this time; a split must not train later.
        self.embedding_cutoff_ts = embedding_cutoff_ts
        self.item_topic: np.ndarray | None = None  # ground-truth topic per item, when a generator knows it
        self.user_keys: np.ndarray | None = None  # original ids of dense user / item ids, when loaded from a file
        self.item_keys: np.ndarray | None = None
        self._validate_config()
        self.item_codes = self._check_codes(item_codes)
        self.log = log
        self._check_log(log)
        self._set_requests(requests)
        self.num_surfaces = max(
            int(num_surfaces or 1), int(log.surface.max(initial=0)) + 1, int(self.req_surface.max(initial=0)) + 1
        )
        # Explicit actions feed ll and rt, impressions feed imp; the padding item is an all-zero row.
        self.item_codes_padded = np.concatenate([self.item_codes, np.zeros((1, ITEM_DIM), np.int8)])
        pad_item = len(self.item_codes)
        explicit = log.action != 0
        self._ex = _SubLog(log.take(explicit), pad_item)
        self._im = _SubLog(log.take(~explicit), pad_item)
        self._windows()

    # -- validation --------------------------------------------------------------------------

    def _err(self, message: str, field: str) -> TransactError:
        return TransactError(message, path=self.source, field=field)

    def _validate_config(self) -> None:
        if not 1 <= len(self.action_names) <= 32:
            raise self._err("between 1 and 32 action kinds fit the int32 bitmask", "action_names")
        for h in self.heads:
            if h not in self.action_names:
                raise self._err(f"head '{h}' is not one of {self.action_names}", "heads")
        for key in ("max_ll", "max_rt", "max_imp"):
            if getattr(self, key) < 1:
                raise self._err("must be >= 1", key)
        if not np.isfinite(self.scale) or self.scale <= 0:
            raise self._err(f"quantisation scale must be positive, got {self.scale}", "quant_scale")

    def _check_codes(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != ITEM_DIM or codes.dtype != np.int8:
            raise self._err(f"expected int8 codes of shape (I, {ITEM_DIM}), got {codes.dtype} {codes.shape}",
                            "item_codes")  # fmt: skip
        if codes.size and int(codes.min()) < -127:
            raise self._err("int8 codes must lie in [-127, 127]", "item_codes")
        return codes

    def _check_items(self, item: np.ndarray, field: str) -> None:
        if item.size and (int(item.min()) < 0 or int(item.max()) >= len(self.item_codes)):
            raise self._err(f"item ids must lie in [0, {len(self.item_codes)})", field)

    def _check_actions(self, action: np.ndarray, field: str) -> None:
        limit = 1 << len(self.action_names)
        bad = (action.astype(np.int64) < 0) | (action.astype(np.int64) >= limit)
        if bad.any():
            raise self._err(f"bitmask {int(action[bad][0])} outside [0, {limit}) for actions {self.action_names}",
                            field)  # fmt: skip

    def _check_log(self, log: ActionLog) -> None:
        self._check_items(log.item, "item")
        self._check_actions(log.action, "action")
        if len(log) and int(log.surface.min()) < 0:
            raise self._err("surface ids must be >= 0", "surface")

    def _set_requests(self, q: Requests) -> None:
        r = len(q.user)
        req = {name: np.asarray(getattr(q, name)) for name in ("user", "ts", "surface", "user_dense")}
        cand = {name: np.asarray(getattr(q, name)) for name in ("cand_request", "cand_item", "cand_action",
                                                                 "item_dense")}  # fmt: skip
        for name, arr in req.items():
            if len(arr) != r:
                raise self._err(f"expected {r} rows (one per request), got {len(arr)}", name)
        m = len(cand["cand_request"])
        for name, arr in cand.items():
            if len(arr) != m:
                raise self._err(f"expected {m} rows (one per candidate), got {len(arr)}", name)
        for name, arr in (("user_dense", req["user_dense"]), ("item_dense", cand["item_dense"])):
            if arr.ndim != 2:
                raise self._err(f"expected a 2-d array, got shape {arr.shape}", name)
            if not np.isfinite(arr).all():
                raise self._err("contains NaN or infinite values", name)
        cr = cand["cand_request"].astype(np.int64)
        if m and (int(cr.min()) < 0 or int(cr.max()) >= r):
            raise self._err(f"values must lie in [0, {r})", "cand_request")
        counts = np.bincount(cr, minlength=r)
        if (counts == 0).any():
            raise self._err(f"request {int(np.flatnonzero(counts == 0)[0])} has no candidates", "cand_request")
        self._check_items(cand["cand_item"], "cand_item")
        self._check_actions(cand["cand_action"], "cand_action")
        if r and int(req["surface"].min()) < 0:
            raise self._err("surface ids must be >= 0", "surface")
        hour = (req["ts"] // HOUR_MS) % 24 if q.hour is None else np.asarray(q.hour)
        if r and (int(hour.min()) < 0 or int(hour.max()) > 23):
            raise self._err("values must lie in [0, 23]", "hour")

        order = np.argsort(cr, kind="stable")  # candidates grouped by request
        self.req_user = req["user"].astype(np.int64)
        self.req_ts = req["ts"].astype(np.int64)
        self.req_surface = req["surface"].astype(np.int64)
        self.req_hour = hour.astype(np.int64)
        self.user_dense = req["user_dense"].astype(np.float32)
        self.cand_item = cand["cand_item"][order].astype(np.int64)
        self.cand_action = cand["cand_action"][order].astype(np.int32)
        self.item_dense = cand["item_dense"][order].astype(np.float32)
        self.cand_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def _windows(self) -> None:
        """Per request, the [start, cut) range of its user's earlier events in each sub-log."""
        self._ex_start, self._ex_cut = cut_points(self._ex.user, self._ex.ts[:-1], self.req_user, self.req_ts)
        self._im_start, self._im_cut = cut_points(self._im.user, self._im.ts[:-1], self.req_user, self.req_ts)

    # -- sizes and config -----------------------------------------------------------------------

    @property
    def num_requests(self) -> int:
        return len(self.req_ts)

    def __len__(self) -> int:
        return self.num_requests

    @property
    def num_candidates(self) -> int:
        return len(self.cand_item)

    @property
    def num_items(self) -> int:
        return len(self.item_codes)

    @property
    def labels(self) -> np.ndarray:
        """(M, H) float32 labels of all candidates, grouped by request."""
        idx = [self.action_names.index(h) for h in self.heads]
        return action_bits(self.cand_action, len(self.action_names))[:, idx].astype(np.float32)

    def model_overrides(self) -> dict:
        """ModelConfig fields that must match this data (``ModelConfig(**ds.model_overrides())``)."""
        out = {
            "user_dense_dim": int(self.user_dense.shape[1]),
            "item_dense_dim": int(self.item_dense.shape[1]),
            "num_surfaces": int(self.num_surfaces),
            "action_names": list(self.action_names),
            "heads": list(self.heads),
            "positive_actions": [a for a in self.action_names if a not in NEGATIVE_ACTIONS],
            "max_ll": self.max_ll,
            "max_rt": self.max_rt,
            "max_imp": self.max_imp,
            "quant_scale": self.scale,
        }
        if self.heads != list(DEFAULT_ACTIONS):  # the model's default weights are one per default head
            out["score_weights"] = [-1.0 if h in NEGATIVE_ACTIONS else 1.0 for h in self.heads]
            out["loss_weights"] = [1.0] * len(self.heads)
        return out

    def describe(self) -> str:
        """One line: sizes and label rates."""
        rate = self.labels.mean(0) if self.num_candidates else np.zeros(len(self.heads))
        rates = ", ".join(f"{h} {r:.3f}" for h, r in zip(self.heads, rate, strict=True))
        return (f"{self.source}: {self.num_requests} requests, {self.num_candidates} candidates, "
                f"{len(set(self.req_user.tolist()))} users, {self.num_items} items, {len(self.log)} events; "
                f"label rates {rates}")  # fmt: skip

    # -- subsets and splits ---------------------------------------------------------------------

    def subset(self, request_ids: np.ndarray) -> RankingDataset:
        """A dataset of the given requests (same log, items and config; arrays shared, not copied)."""
        ids = np.asarray(request_ids, dtype=np.int64)
        out = copy.copy(self)
        lo, hi = self.cand_offsets[ids], self.cand_offsets[ids + 1]
        rows = ragged_arange(lo, hi - lo)
        out.cand_item, out.cand_action = self.cand_item[rows], self.cand_action[rows]
        out.item_dense = self.item_dense[rows]
        out.cand_offsets = np.concatenate([[0], np.cumsum(hi - lo)]).astype(np.int64)
        for name in ("req_user", "req_ts", "req_surface", "req_hour", "user_dense",
                     "_ex_start", "_ex_cut", "_im_start", "_im_cut"):  # fmt: skip
            setattr(out, name, getattr(self, name)[ids])
        return out

    def split_by_time(
        self, valid_frac: float = 0.1, test_frac: float = 0.1
    ) -> tuple[RankingDataset, RankingDataset, RankingDataset]:
        """(train, valid, test) by request time: every train request is strictly earlier than every
        valid request, and every valid request than every test request. All three keep the whole log:
        sequences are cut at each request's own time, so history is shared but never the future."""
        t_valid, t_test = time_cutoffs(self.req_ts, valid_frac, test_frac)
        if self.embedding_cutoff_ts is not None and t_valid < self.embedding_cutoff_ts:
            raise self._err(
                f"the item embeddings were learned from events up to {self.embedding_cutoff_ts} ms, later than "
                f"this split's training period ({t_valid} ms); reload the data with the same valid/test fractions",
                "split",
            )
        ts = self.req_ts
        parts = [np.flatnonzero(ts < t_valid), np.flatnonzero((ts >= t_valid) & (ts < t_test)),
                 np.flatnonzero(ts >= t_test)]  # fmt: skip
        fracs = (1 - valid_frac - test_frac, valid_frac, test_frac)
        for name, frac, ids in zip(("train", "valid", "test"), fracs, parts, strict=True):
            if frac > 0 and len(ids) == 0:
                raise self._err(f"the {name} split is empty ({self.num_requests} requests)", "split")
        train, valid, test = (self.subset(ids) for ids in parts)
        return train, valid, test

    # -- batching -------------------------------------------------------------------------------

    def _seq(self, sub: _SubLog, start: np.ndarray, cut: np.ndarray, limit: int) -> Seq:
        """The latest ``limit`` events in [start, cut) per request, oldest -> newest, padded."""
        lo = np.maximum(start, cut - limit)
        n = cut - lo
        width = max(1, int(n.max(initial=0)))
        pos = np.arange(width)
        stored = pos[None, :] < n[:, None]
        idx = np.where(stored, lo[:, None] + pos[None, :], sub.pad)
        return Seq(
            ts=torch.from_numpy(sub.ts[idx]),
            action=torch.from_numpy(sub.action[idx]),
            surface=torch.from_numpy(sub.surface[idx]),
            item=torch.from_numpy(self.item_codes_padded[sub.item[idx]]),
            length=torch.from_numpy(n.astype(np.int64)),
        )

    def batch(self, request_ids: np.ndarray | Sequence[int], labels: bool = True) -> Batch:
        """One ``Batch`` of the given requests (in that order) with all their candidates."""
        ids = np.asarray(request_ids, dtype=np.int64)
        if ids.size == 0:
            raise self._err("a batch needs at least one request", "request_ids")
        lo, hi = self.cand_offsets[ids], self.cand_offsets[ids + 1]
        rows = ragged_arange(lo, hi - lo)
        cand_request = np.repeat(np.arange(len(ids), dtype=np.int64), hi - lo)
        codes = torch.from_numpy(self.item_codes[self.cand_item[rows]])
        y = None
        if labels:
            head_idx = [self.action_names.index(h) for h in self.heads]
            bits = action_bits(self.cand_action[rows], len(self.action_names))[:, head_idx]
            y = torch.from_numpy(bits.astype(np.float32))
        return Batch(
            request_ts=torch.from_numpy(self.req_ts[ids]),
            user_dense=torch.from_numpy(self.user_dense[ids]),
            surface=torch.from_numpy(self.req_surface[ids]),
            hour=torch.from_numpy(self.req_hour[ids]),
            ll=self._seq(self._ex, self._ex_start[ids], self._ex_cut[ids], self.max_ll),
            rt=self._seq(self._ex, self._ex_start[ids], self._ex_cut[ids], self.max_rt),
            imp=self._seq(self._im, self._im_start[ids], self._im_cut[ids], self.max_imp),
            cand_request=torch.from_numpy(cand_request),
            cand_item=dequantize(codes, self.scale),
            item_dense=torch.from_numpy(self.item_dense[rows]),
            labels=y,
        )

    def batches(self, batch_requests: int, shuffle: bool = False, seed: int = 0) -> Iterator[Batch]:
        """Batches of ``batch_requests`` requests (the last one may be smaller); a shuffled order is a
        function of ``seed`` only."""
        if batch_requests < 1:
            raise self._err("must be >= 1", "batch_requests")
        order = np.random.default_rng(seed).permutation(self.num_requests) if shuffle else np.arange(self.num_requests)
        for i in range(0, self.num_requests, batch_requests):
            yield self.batch(order[i : i + batch_requests])
