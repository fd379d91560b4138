"""User-supplied action logs (CSV or Parquet) -> ``RankingDataset``.

Columns (names exact, order free):
    user       any id (integers or strings)
    item       any id (integers or strings; integers when an embeddings .npy file is given)
    action     an action name (``click``), several joined by ``|`` (``click|save``), ``impression``
               (shown, not engaged), or an integer bitmask over ``action_names``
    timestamp  integer milliseconds since the epoch (or seconds with ``timestamp_unit="s"``), or
               ISO-8601 text (``2024-05-01T12:30:00Z``; without a zone it is read as UTC)
    surface    optional: a non-negative integer or a name

Requests are built as for MovieLens: sessions cut into chunks of candidates, each chunk one request
whose history is everything before it. Item embeddings are learned from the training period only,
unless an ``.npy`` file of shape (max item id + 1, 32) is given. Every problem with the file is a
one-line ``TransactError`` that names the column and the file.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from ..config import ITEM_DIM
from ..errors import TransactError
from .dataset import (
    DEFAULT_ACTIONS,
    NEGATIVE_ACTIONS,
    ActionLog,
    RankingDataset,
    Requests,
    history_features,
    sessionize,
    time_cutoffs,
)  # fmt: skip
from .embeddings import learn_item_embeddings, quantize_embeddings

REQUIRED = ("user", "item", "action", "timestamp")
OPTIONAL = ("surface",)
IMPRESSION = "impression"


def _read_table(path: Path):
    """pyarrow Table of the file; strings stay strings and empty cells become nulls."""
    try:
        import pyarrow as pa
        import pyarrow.csv as pcsv
        import pyarrow.parquet as pq
    except ImportError as e:
        raise TransactError("reading action logs needs pyarrow: pip install pyarrow", path=path) from e
    if not path.is_file():
        raise TransactError("file not found", path=path)
    if path.stat().st_size == 0:
        raise TransactError("empty file", path=path)
    name = path.name.lower()
    try:
        if name.endswith((".parquet", ".pq")):
            return pq.read_table(path)
        if name.endswith((".csv", ".csv.gz")):
            opts = pcsv.ConvertOptions(strings_can_be_null=True)
            return pcsv.read_csv(path, convert_options=opts)
    except (pa.ArrowInvalid, OSError) as e:
        raise TransactError(f"cannot read: {str(e).splitlines()[0]}", path=path) from e
    raise TransactError("unsupported file type (expected .csv, .csv.gz, .parquet or .pq)", path=path)


class _Column:
    """One column of the file, with errors that name it."""

    def __init__(self, table, name: str, path: Path) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc

        self.name, self.path = name, path
        col = table.column(name).combine_chunks()
        bad = pc.is_null(col, nan_is_null=True) if pa.types.is_floating(col.type) else pc.is_null(col)
        if pc.any(bad).as_py():
            self.fail(f"empty or NaN value in row {self.row(bad.to_numpy(zero_copy_only=False))}")
        self.type = col.type
        self.is_int = pa.types.is_integer(col.type)
        self.is_float = pa.types.is_floating(col.type)
        self.is_text = pa.types.is_string(col.type) or pa.types.is_large_string(col.type)
        self.is_time = pa.types.is_timestamp(col.type) or pa.types.is_date(col.type)
        if self.is_time:
            zone = getattr(col.type, "tz", None)  # zoned times are stored as UTC instants already
            col = pc.cast(pc.cast(col, pa.timestamp("ms", tz=zone)), pa.int64())
        elif not (self.is_int or self.is_float or self.is_text):
            self.fail(f"unsupported type {col.type}")
        self.values = col.to_numpy(zero_copy_only=False)

    def fail(self, message: str):
        raise TransactError(message, path=self.path, field=self.name)

    @staticmethod
    def row(mask: np.ndarray) -> int:
        return int(np.flatnonzero(mask)[0]) + 1  # data rows count from 1

    def integers(self) -> np.ndarray:
        """The column as int64; floats must be whole numbers, text must be digits."""
        v = self.values
        if self.is_int or self.is_time:
            return v.astype(np.int64)
        if self.is_float:
            if not np.isfinite(v).all() or (v != np.round(v)).any():
                self.fail(f"not an integer in row {self.row(~np.isfinite(v) | (v != np.round(v)))}")
            return v.astype(np.int64)
        out = np.empty(len(v), dtype=np.int64)
        uniq, inv = np.unique(v, return_inverse=True)
        for k, s in enumerate(uniq):
            try:
                out[inv == k] = int(s.strip())
            except ValueError:
                self.fail(f"cannot parse '{s}' in row {self.row(inv == k)} as an integer")
        return out

    def ids(self) -> tuple[np.ndarray, np.ndarray]:
        """Dense ids 0..K-1 in sorted key order, and the keys."""
        v = self.values if self.is_text else self.integers()
        keys, inv = np.unique(v, return_inverse=True)
        return inv.astype(np.int64), keys


def _parse_actions(col: _Column, action_names: Sequence[str]) -> np.ndarray:
    """Names, 'a|b' combinations, 'impression' or integer bitmasks -> int32 bitmask."""
    limit = 1 << len(action_names)
    if not col.is_text:
        mask = col.integers()
    else:
        bit = {name: 1 << i for i, name in enumerate(action_names)}
        bit[IMPRESSION] = 0
        uniq, inv = np.unique(col.values, return_inverse=True)
        codes = np.empty(len(uniq), dtype=np.int64)
        for k, s in enumerate(uniq):
            s = s.strip()
            if s.lstrip("-").isdigit():
                codes[k] = int(s)
                continue
            parts = [p.strip() for p in s.split("|")]
            unknown = [p for p in parts if p not in bit]
            if unknown:
                col.fail(f"unknown action '{unknown[0]}' in row {col.row(inv == k)} (expected one of "
                         f"{[*action_names, IMPRESSION]} or an integer bitmask)")  # fmt: skip
            codes[k] = sum(bit[p] for p in set(parts))
        mask = codes[inv]
    bad = (mask < 0) | (mask >= limit)
    if bad.any():
        col.fail(f"bitmask {int(mask[bad][0])} in row {col.row(bad)} is outside [0, {limit}) for {list(action_names)}")
    return mask.astype(np.int32)


def _parse_time(col: _Column, unit: str) -> np.ndarray:
    """Integer ms (or s), ISO-8601 text, or a timestamp column -> int64 ms."""
    factor = {"ms": 1, "s": 1000}[unit]
    if col.is_time:
        return col.values.astype(np.int64)
    if not col.is_text:
        return col.integers() * factor
    uniq, inv = np.unique(col.values, return_inverse=True)
    ms = np.empty(len(uniq), dtype=np.int64)
    for k, s in enumerate(uniq):
        s = s.strip()
        try:
            if s.lstrip("-").isdigit():
                ms[k] = int(s) * factor
                continue
            dt = datetime.fromisoformat(s)
        except ValueError:
            col.fail(f"cannot parse '{s}' in row {col.row(inv == k)} as integer {unit} or ISO-8601")
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        ms[k] = round(dt.timestamp() * 1000)
    return ms[inv]


def read_action_log(
    path: str | Path,
    action_names: Sequence[str] = DEFAULT_ACTIONS,
    timestamp_unit: str = "ms",
    now_ms: int | None = None,
) -> tuple[ActionLog, np.ndarray, np.ndarray]:
    """Parse and check the file: (log with dense user/item ids, user keys, item keys)."""
    path = Path(path)
    if timestamp_unit not in ("ms", "s"):
        raise TransactError("must be 'ms' or 's'", field="timestamp_unit")
    table = _read_table(path)
    names = [str(c) for c in table.column_names]
    for name in names:
        if name not in REQUIRED + OPTIONAL:
            raise TransactError(f"unknown column (expected {list(REQUIRED)} and optionally {list(OPTIONAL)})",
                                path=path, field=name)  # fmt: skip
    for name in REQUIRED:
        if name not in names:
            raise TransactError("required column missing", path=path, field=name)
    if len(set(names)) != len(names):
        raise TransactError("duplicate column", path=path, field=next(n for n in names if names.count(n) > 1))
    if table.num_rows == 0:
        raise TransactError("empty file (no rows)", path=path)
    cols = {name: _Column(table, name, path) for name in names}
    user, user_keys = cols["user"].ids()
    item, item_keys = cols["item"].ids()
    action = _parse_actions(cols["action"], action_names)
    ts = _parse_time(cols["timestamp"], timestamp_unit)
    now = int(time.time() * 1000) if now_ms is None else int(now_ms)
    future = ts > now
    if future.any():
        row = _Column.row(future)
        when = datetime.fromtimestamp(int(ts[future][0]) / 1000, tz=UTC).isoformat()
        cols["timestamp"].fail(f"row {row} is in the future ({when})")
    surface = None
    if "surface" in cols:
        c = cols["surface"]
        surface = c.ids()[0] if c.is_text else c.integers()
        if (surface < 0).any():
            c.fail(f"negative surface id in row {c.row(surface < 0)}")
    return ActionLog(user, item, action, ts, surface), user_keys, item_keys


def _embeddings_file(path: Path, item_keys: np.ndarray) -> np.ndarray:
    """Rows of a (max id + 1, 32) .npy file for the log's integer item ids."""
    if path.suffix != ".npy":
        raise TransactError("expected a .npy file of shape (items, 32)", path=path, field="embeddings")
    try:
        table = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise TransactError(f"cannot read: {e}", path=path, field="embeddings") from e
    if table.ndim != 2 or table.shape[1] != ITEM_DIM or not np.issubdtype(table.dtype, np.floating):
        raise TransactError(f"expected float shape (items, {ITEM_DIM}), got {table.dtype} {table.shape}", path=path,
                            field="embeddings")  # fmt: skip
    if not np.issubdtype(item_keys.dtype, np.integer):
        raise TransactError("item ids must be integers (rows of the embeddings file)", path=path, field="item")
    if item_keys.min() < 0 or item_keys.max() >= len(table):
        raise TransactError(f"item id {int(item_keys.max())} has no row in the embeddings file ({len(table)} rows)",
                            path=path, field="item")  # fmt: skip
    rows = table[item_keys].astype(np.float32)
    if not np.isfinite(rows).all():
        raise TransactError("contains NaN or infinite values", path=path, field="embeddings")
    return rows


def load_action_log(
    path: str | Path,
    action_names: Sequence[str] = DEFAULT_ACTIONS,
    heads: Sequence[str] | None = None,
    session_gap_ms: int = 30 * 60 * 1000,
    max_candidates: int = 20,
    max_ll: int = 1000,
    max_rt: int = 100,
    max_imp: int = 100,
    valid_frac: float = 0.1,
    test_frac: float = 0.1,
    embeddings: str | Path | None = None,
    timestamp_unit: str = "ms",
    now_ms: int | None = None,
    seed: int = 0,
) -> RankingDataset:
    """An action log file as a ``RankingDataset``; pass the same ``valid_frac``/``test_frac`` to
    ``split_by_time`` (learned item embeddings only see the training period they imply)."""
    path = Path(path)
    log, user_keys, item_keys = read_action_log(path, action_names, timestamp_unit, now_ms)
    req_user, req_ts, req_surface, cand_request, cand_item, cand_action = sessionize(log, session_gap_ms,
                                                                                     max_candidates)  # fmt: skip
    t_valid, _ = time_cutoffs(req_ts, valid_frac, test_frac)
    cutoff = None
    if embeddings is not None:
        emb = _embeddings_file(Path(embeddings), item_keys)
    else:
        # Co-occurrence of positive actions; impressions count a little; negative actions not at all.
        neg = sum(1 << i for i, a in enumerate(action_names) if a in NEGATIVE_ACTIONS)
        weight = np.where((log.action & ~neg) != 0, 1.0, np.where(log.action == 0, 0.2, 0.0))
        train = log.ts < t_valid
        emb = learn_item_embeddings(log.user[train], log.item[train], weight[train], len(item_keys), seed=seed)
        cutoff = t_valid
    codes, scale = quantize_embeddings(emb)
    user_dense, item_dense = history_features(log, req_user, req_ts, cand_request, cand_item, len(action_names))
    requests = Requests(
        user=req_user, ts=req_ts, surface=req_surface, user_dense=user_dense, cand_request=cand_request,
        cand_item=cand_item, cand_action=cand_action, item_dense=item_dense,
    )  # fmt: skip
    ds = RankingDataset(
        log, requests, codes, scale, action_names=action_names, heads=heads, max_ll=max_ll, max_rt=max_rt,
        max_imp=max_imp, source=str(path), embedding_cutoff_ts=cutoff,
    )  # fmt: skip
    ds.user_keys, ds.item_keys = user_keys, item_keys
    return ds
