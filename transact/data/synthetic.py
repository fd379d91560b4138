"""Synthetic action logs with planted long-term and short-term interests.

The world: items live in topics (clusters of unit vectors in 32-d). Every user has
* a few **long-term** topics, engaged with over the past year — mostly long ago, so these actions
  sit deep in the lifelong sequence ``ll`` and rarely in the latest 100 (``rt``);
* one **disliked** topic, whose items the user hides now and then (hides also live mostly in ``ll``);
* a **session** topic before each request: a burst of recent actions that fills ``rt``.
A candidate is likely clicked (and saved) when its topic is a long-term topic or the current session
topic, and likely hidden when it is the disliked topic. A model that only sees ``rt`` can find the
session topic but hardly the long-term or disliked ones; the lifelong module can find all three.
Shown-but-ignored items become impressions (``imp``).
"""

from __future__ import annotations

import numpy as np

from .dataset import DEFAULT_ACTIONS, ActionLog, RankingDataset, Requests, history_features
from .embeddings import quantize_embeddings

DAY_MS = 86_400_000
MIN_MS = 60_000
T0 = 1_700_000_000_000  # start of the request period (Nov 2023); history runs a year before it
CLICK, SAVE, HIDE = 1, 2, 4  # bits of DEFAULT_ACTIONS


def topic_embeddings(
    num_topics: int, items_per_topic: int, rng: np.random.Generator, spread: float = 0.08
) -> tuple[np.ndarray, np.ndarray]:
    """Unit item vectors clustered around random topic centres: (I, 32) float32 and (I,) topic ids."""
    centres = rng.standard_normal((num_topics, 32))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    topic = np.repeat(np.arange(num_topics), items_per_topic)
    emb = centres[topic] + spread * rng.standard_normal((len(topic), 32))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb.astype(np.float32), topic


def _engage_actions(n: int, p_save: float, rng: np.random.Generator) -> np.ndarray:
    """Explicit positive actions: clicks, some of them also saves, a few saves alone."""
    r = rng.random(n)
    return np.where(r < 1 - p_save, CLICK, np.where(r < 1 - 0.15 * p_save, CLICK | SAVE, SAVE)).astype(np.int32)


def make_synthetic(
    num_users: int = 1000,
    num_topics: int = 40,
    items_per_topic: int = 50,
    requests_per_user: int = 4,
    candidates_per_request: int = 16,
    long_term_topics: int = 3,
    long_term_actions: tuple[int, int] = (300, 800),
    session_actions: tuple[int, int] = (100, 160),
    num_surfaces: int = 3,
    max_ll: int = 1000,
    max_rt: int = 100,
    max_imp: int = 100,
    scale: float | None = None,
    seed: int = 0,
) -> RankingDataset:
    """A ``RankingDataset`` of ``num_users * requests_per_user`` requests; deterministic for a seed.

    ``scale`` is the int8 quantisation scale (fitted from the embeddings when None)."""
    if num_topics < long_term_topics + 3:
        raise ValueError("num_topics: needs room for long-term, disliked and session topics")
    rng = np.random.default_rng(seed)
    emb, item_topic = topic_embeddings(num_topics, items_per_topic, rng)
    quality = rng.normal(0.0, 0.4, len(item_topic))  # a per-item bias visible (noisily) in item_dense
    surface_bias = np.linspace(0.3, -0.3, num_surfaces)
    c = candidates_per_request
    n_long, n_session, n_dislike = (max(1, round(c * k / 16)) if c >= 3 else 0 for k in (3, 3, 2))

    def items_of(topics: np.ndarray) -> np.ndarray:
        return topics * items_per_topic + rng.integers(0, items_per_topic, len(topics))

    ev: dict[str, list[np.ndarray]] = {k: [] for k in ("user", "item", "action", "ts", "surface")}
    rq: dict[str, list] = {k: [] for k in ("user", "ts", "surface", "activity")}
    cand_item, cand_action = [], []

    def emit(u: int, items: np.ndarray, actions: np.ndarray, ts: np.ndarray) -> None:
        ev["user"].append(np.full(len(items), u))
        ev["item"].append(items)
        ev["action"].append(np.broadcast_to(np.asarray(actions, np.int32), items.shape))
        ev["ts"].append(ts.astype(np.int64))
        ev["surface"].append(rng.integers(0, num_surfaces, len(items)))

    for u in range(num_users):
        topics = rng.permutation(num_topics)
        long_t, dislike_t, other_t = topics[:long_term_topics], topics[long_term_topics], topics[long_term_topics + 1 :]
        activity = rng.normal(0.0, 0.5)  # how click-happy the user is: visible in user_dense
        # Request times over four weeks, at least four hours apart so that sessions do not overlap.
        gaps = np.arange(requests_per_user) * 240 * MIN_MS
        req_ts = T0 + np.sort(rng.integers(0, 28 * DAY_MS, requests_per_user)) + gaps
        start, last = T0 - 365 * DAY_MS, int(req_ts[-1])

        # Long-term interests: mostly old, a trickle in the last two weeks.
        n = int(rng.integers(*long_term_actions))
        old = rng.random(n) < 0.95
        ts = np.where(old, rng.integers(start, T0 - 14 * DAY_MS, n), rng.integers(T0 - 14 * DAY_MS, last, n))
        weights = rng.dirichlet(np.full(long_term_topics, 3.0))
        emit(u, items_of(rng.choice(long_t, n, p=weights)), _engage_actions(n, 0.35, rng), ts)
        # Dislikes: hides spread over the year.
        n = int(rng.integers(15, 40))
        emit(u, items_of(np.full(n, dislike_t)), HIDE, rng.integers(start, T0 - 7 * DAY_MS, n))
        # Background impressions: items of other topics shown and ignored.
        n = int(rng.integers(150, 250))
        emit(u, items_of(rng.choice(other_t, n)), 0, rng.integers(start, last, n))

        past_t: list[int] = []  # earlier session topics keep a little of their pull
        for t in req_ts:
            t = int(t)
            session_t = int(rng.choice(other_t))
            begin = t - int(rng.integers(30, 90)) * MIN_MS
            # The session: a burst on the session topic with a few long-term actions mixed in.
            n = int(rng.integers(*session_actions))
            on_topic = rng.random(n) < 0.97
            tops = np.where(on_topic, session_t, rng.choice(long_t, n))
            emit(u, items_of(tops), _engage_actions(n, 0.15, rng), rng.integers(begin, t - 1000, n))
            n = int(rng.integers(40, 80))
            emit(u, items_of(rng.choice(other_t, n)), 0, rng.integers(begin, t - 1000, n))

            # Candidates: some from each kind of topic (3/16, 3/16, 2/16 of them), the rest at random.
            planted = [rng.choice(long_t, n_long), np.full(n_session, session_t), np.full(n_dislike, dislike_t)]
            tops = np.concatenate([*planted, rng.integers(0, num_topics, c - n_long - n_session - n_dislike)])
            items = items_of(tops)
            surface = int(rng.integers(0, num_surfaces))
            in_long, in_session, disliked = np.isin(tops, long_t), tops == session_t, tops == dislike_t
            in_past = np.isin(tops, past_t) & ~in_session
            logit = -2.6 + 3.0 * in_long + 2.4 * in_session + 1.2 * in_past - 2.5 * disliked + activity + quality[items]
            logit += surface_bias[surface]
            hide = rng.random(c) < np.where(disliked, 0.55, 0.02)
            click = ~hide & (rng.random(c) < 1 / (1 + np.exp(-logit)))
            save = click & (rng.random(c) < np.where(in_long, 0.5, 0.12))
            action = (click * CLICK | save * SAVE | hide * HIDE).astype(np.int32)
            # What the user did is logged just after the request, so later requests see it.
            emit(u, items, action, t + rng.integers(1000, 10 * MIN_MS, c))
            past_t.append(session_t)
            rq["user"].append(u)
            rq["ts"].append(t)
            rq["surface"].append(surface)
            rq["activity"].append(activity)
            cand_item.append(items)
            cand_action.append(action)

    log = ActionLog(*(np.concatenate(ev[k]) for k in ("user", "item", "action", "ts", "surface")))
    req_user, req_ts = np.asarray(rq["user"], np.int64), np.asarray(rq["ts"], np.int64)
    cand_item_a, cand_action_a = np.concatenate(cand_item), np.concatenate(cand_action)
    cand_request = np.repeat(np.arange(len(req_user)), c)
    user_hist, item_hist = history_features(log, req_user, req_ts, cand_request, cand_item_a, len(DEFAULT_ACTIONS))
    user_dense = np.column_stack([np.asarray(rq["activity"]) + rng.normal(0, 0.25, len(req_user)), user_hist])
    item_dense = np.column_stack([quality[cand_item_a] + rng.normal(0, 0.2, len(cand_item_a)), item_hist])
    codes, scale = quantize_embeddings(emb, scale)
    requests = Requests(
        user=req_user, ts=req_ts, surface=np.asarray(rq["surface"], np.int64),
        user_dense=user_dense.astype(np.float32), cand_request=cand_request, cand_item=cand_item_a,
        cand_action=cand_action_a, item_dense=item_dense.astype(np.float32),
    )  # fmt: skip
    ds = RankingDataset(
        log, requests, codes, scale, action_names=DEFAULT_ACTIONS, max_ll=max_ll, max_rt=max_rt,
        max_imp=max_imp, num_surfaces=num_surfaces, source=f"synthetic(seed={seed})",
    )  # fmt: skip
    ds.item_topic = item_topic  # ground truth, for probes and tests
    return ds
