"""User action logs: a hand-worked round trip and one clear error per kind of bad input."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from transact.data.logs import load_action_log, read_action_log
from transact.errors import TransactError

CLICK, SAVE, HIDE = 1, 2, 4
NOW = 1_000_000_000  # "now" for the future-timestamp check, in ms

# Sessions break at gaps over 60 s; chunks hold at most 3 candidates.
HAND_LOG = """user,item,action,timestamp,surface
alice,i1,click,1000,0
alice,i2,impression,2000,0
alice,i3,save,3000,1
alice,i2,hide,3000,0
alice,i4,click,4000,0
bob,i3,3,150000,0
bob,i1,hide,150100,0
alice,i1,impression,200000,0
alice,i5,click|save,200500,0
alice,i1,click,201000,0
"""


def write(tmp_path: Path, text: str, name: str = "log.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def load(path: Path, **kw):
    return load_action_log(path, session_gap_ms=60_000, max_candidates=3, max_ll=3, max_rt=2, max_imp=5,
                           now_ms=NOW, **kw)  # fmt: skip


def test_hand_worked_round_trip(tmp_path):
    ds = load(write(tmp_path, HAND_LOG), valid_frac=0.25, test_frac=0.25)
    assert ds.user_keys.tolist() == ["alice", "bob"] and ds.item_keys.tolist() == ["i1", "i2", "i3", "i4", "i5"]
    # alice: session 1 = chunk [i1, i2, i3] at t=1000 and chunk [i2, i4] at t=3000; session 2 at t=200000;
    # bob: one request at t=150000.
    assert ds.req_ts.tolist() == [1000, 3000, 200000, 150000] and ds.req_user.tolist() == [0, 0, 0, 1]
    b = ds.batch([0, 1, 2, 3])
    assert b.ll.length.tolist() == [0, 1, 3, 0] and b.rt.length.tolist() == [0, 1, 2, 0]
    assert b.imp.length.tolist() == [0, 1, 1, 0]
    # Request at t=3000 sees only what happened before 3000 (the save at 3000 is its own candidate's peer).
    assert b.ll.ts[1, :1].tolist() == [1000] and b.ll.action[1, :1].tolist() == [CLICK]
    assert b.imp.ts[1, :1].tolist() == [2000]
    # Request at t=200000: explicit history i1 click, i3 save, i2 hide, i4 click -> latest 3 (tie kept in
    # file order); rt the latest 2; the one impression.
    assert b.ll.ts[2].tolist() == [3000, 3000, 4000] and b.ll.action[2].tolist() == [SAVE, HIDE, CLICK]
    assert b.ll.surface[2].tolist() == [1, 0, 0]
    assert torch.equal(b.ll.item[2], torch.from_numpy(ds.item_codes[[2, 1, 3]]))
    assert b.rt.action[2].tolist() == [HIDE, CLICK] and b.imp.ts[2, :1].tolist() == [2000]
    # Candidates (by item id within a request) and their labels (click, save, hide).
    items = [ds.item_keys[i] for i in ds.cand_item]
    assert items == ["i1", "i2", "i3", "i2", "i4", "i1", "i5", "i1", "i3"]
    assert b.labels.tolist() == [
        [1, 0, 0], [0, 0, 0], [0, 1, 0],  # request t=1000
        [0, 0, 1], [1, 0, 0],  # t=3000
        [1, 0, 0], [1, 1, 0],  # t=200000: impression + click of i1 merge into a click
        [0, 0, 1], [1, 1, 0],  # bob
    ]  # fmt: skip
    assert ds.model_overrides()["user_dense_dim"] == 5 and ds.model_overrides()["item_dense_dim"] == 4


def test_parquet_and_iso_timestamps_give_the_same_dataset(tmp_path):
    csv = load(write(tmp_path, HAND_LOG))
    rows = [line.split(",") for line in HAND_LOG.strip().splitlines()[1:]]
    iso = [np.datetime_as_string(np.datetime64(int(r[3]), "ms"), unit="ms") + "Z" for r in rows]
    table = pa.table({"user": [r[0] for r in rows], "item": [r[1] for r in rows], "action": [r[2] for r in rows],
                      "timestamp": iso, "surface": [int(r[4]) for r in rows]})  # fmt: skip
    pq.write_table(table, tmp_path / "log.parquet")
    par = load(tmp_path / "log.parquet")
    # A real timestamp column too.
    ts_col = pa.array([int(r[3]) for r in rows], pa.int64()).cast(pa.timestamp("ms", tz="UTC"))
    pq.write_table(table.set_column(3, "timestamp", ts_col), tmp_path / "log2.parquet")
    par2 = load(tmp_path / "log2.parquet")
    for other in (par, par2):
        for name in ("user", "item", "action", "ts", "surface"):
            assert np.array_equal(getattr(csv.log, name), getattr(other.log, name)), name
        assert np.array_equal(csv.labels, other.labels)


def test_embeddings_file(tmp_path):
    text = "user,item,action,timestamp\n" + "".join(f"u{i % 3},{i % 4},click,{1000 * i}\n" for i in range(12))
    table = np.random.default_rng(0).standard_normal((6, 32)).astype(np.float32)
    np.save(tmp_path / "emb.npy", table)
    ds = load(write(tmp_path, text), embeddings=tmp_path / "emb.npy")
    assert ds.item_keys.tolist() == [0, 1, 2, 3]
    back = ds.item_codes.astype(np.float32) * ds.scale / 127
    assert np.abs(back - np.clip(table[:4], -ds.scale, ds.scale)).max() <= ds.scale / 127 / 2 + 1e-6
    np.save(tmp_path / "short.npy", table[:2])
    with pytest.raises(TransactError, match="field 'item'.*short.npy"):
        load(tmp_path / "log.csv", embeddings=tmp_path / "short.npy")


BAD = [
    ("user,item,action,timestamp,price\nu,i,click,1,3\n", "price", "unknown column"),
    ("user,item,action\nu,i,click\n", "timestamp", "missing"),
    ("user,item,action,timestamp\nu,i,,1000\n", "action", "row 1"),
    ("user,item,action,timestamp\nu,i,click,1000\nu,,click,2000\n", "item", "row 2"),
    ("user,item,action,timestamp\nu,i,click,1000\nu,i,like,2000\n", "action", "unknown action 'like'"),
    ("user,item,action,timestamp\nu,i,click,1000\nu,i,9,2000\n", "action", "bitmask 9"),
    ("user,item,action,timestamp\nu,i,click,1000\nu,i,click,2000000000\n", "timestamp", "future"),
    ("user,item,action,timestamp\nu,i,click,2020-01-01T00:00:00\n", "timestamp", "future"),
    ("user,item,action,timestamp\nu,i,click,1000\nu,i,click,yesterday\n", "timestamp", "cannot parse 'yesterday'"),
    ("user,item,action,timestamp\nu,i,click,1.5\n", "timestamp", "not an integer"),
    ("user,item,action,timestamp,surface\nu,i,click,1,-1\n", "surface", "negative"),
]


@pytest.mark.parametrize("text, field, words", BAD)
def test_bad_input_names_the_column_and_the_file(tmp_path, text, field, words):
    path = write(tmp_path, text)
    with pytest.raises(TransactError) as e:
        load(path)
    message = str(e.value)
    assert f"field '{field}'" in message and str(path) in message and words in message
    assert "\n" not in message and e.value.field == field


def test_nan_in_a_parquet_column(tmp_path):
    table = pa.table({"user": [1, 2], "item": [1, 2], "action": ["click", "save"], "timestamp": [1.0, float("nan")]})
    pq.write_table(table, tmp_path / "nan.parquet")
    with pytest.raises(TransactError, match="field 'timestamp'.*nan.parquet: empty or NaN value in row 2"):
        read_action_log(tmp_path / "nan.parquet", now_ms=NOW)


@pytest.mark.parametrize("text", ["", "user,item,action,timestamp\n"])
def test_empty_files(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(TransactError, match="empty file") as e:
        load(path)
    assert str(path) in str(e.value)


def test_unsupported_or_missing_file(tmp_path):
    with pytest.raises(TransactError, match="file not found"):
        load(tmp_path / "nope.csv")
    with pytest.raises(TransactError, match="unsupported file type"):
        load(write(tmp_path, "x", "log.json"))
