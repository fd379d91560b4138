"""runtime.Session on the CPU backend against the eager model; request validation; de-duplication; the
hybrid backend's glue code run on the CPU; device selection and refusals.

``small_bundle`` (used by the server tests too) exports one small model per test session."""

from __future__ import annotations

import atexit
import dataclasses
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from runtime.backends import BackendUnavailable
from runtime.backends import cpu as cpu_backend
from runtime.batching import plan_batch
from runtime.chunks import MAX_CHUNK, TAIL_CHUNK, chunk_bounds, guided_bounds
from runtime.session import Limits, Request, Session, request_from_tensors, resolve_device
from transact.batch import Batch, BatchError
from transact.config import ModelConfig, TransActConfig, TransActV2Config
from transact.data.random_batch import random_batch
from transact.model import RankingModel, transformer_fastpath

_BUILT: dict[str, Path] = {}


def small_config() -> ModelConfig:
    return ModelConfig(
        max_ll=256, max_rt=40, max_imp=30, mlp_dims=[32, 16],
        transact=TransActConfig(seq_len=16, latest_n_emb=2),
        transact_v2=TransActV2Config(k_ll=8, r_rt=4, k_rt=4, k_imp=4),
    )  # fmt: skip


def small_bundle() -> Path:
    """A checkpoint of a small random model exported to a bundle, once per test process."""
    if "bundle" not in _BUILT:
        from export.bundle import export_bundle
        from transact.checkpoint import save_checkpoint

        root = Path(tempfile.mkdtemp(prefix="transact-runtime-"))
        atexit.register(shutil.rmtree, root, True)
        torch.manual_seed(0)
        model = RankingModel(small_config()).eval()
        save_checkpoint(root / "ckpt", model)
        _BUILT["bundle"] = export_bundle(root / "ckpt", root / "bundle", check=False)
        _BUILT["root"] = root
    return _BUILT["bundle"]


@pytest.fixture(scope="session")
def bundle_dir() -> Path:
    return small_bundle()


@pytest.fixture(scope="session")
def session(bundle_dir: Path) -> Session:
    return Session(bundle_dir, device="cpu", threads=2)


@pytest.fixture(scope="session")
def eager(session: Session) -> RankingModel:
    return session.bundle.verified.build_model()


def eager_probs(model: RankingModel, requests: list[Request]) -> list[np.ndarray]:
    """The eager PyTorch model on the same requests (fp32, fast path off)."""
    plan = plan_batch(requests, dedup=False)
    named = plan.padded_inputs()
    with torch.no_grad(), transformer_fastpath(False):
        probs = model(Batch.from_named({k: torch.from_numpy(v) for k, v in named.items()})).numpy()
    return plan.split(probs)


def random_requests(config: ModelConfig, seed: int, n_requests: int = 3, n_cands: int = 12, **lengths) -> list[Request]:
    lengths = {"ll": [200, 0, 37], "rt": [40, 3, 0], "imp": [30, 0, 5], **lengths}
    b = random_batch(config, n_requests, n_cands, seed=seed, future=2, **lengths)
    return [Request.from_batch(b, r) for r in range(n_requests)]


# ---------------------------------------------------------------------------------------------


def test_a_lone_full_row_reads_the_requests_arrays_in_place() -> None:
    """One request row: each sequence that fills its width goes in as a view of the request's array (no copy), with
    the dtypes and values of the zero-padded copy a wider batch makes; an empty sequence still gets one zero slot."""
    (req,) = random_requests(small_config(), 51, 1, 6, ll=[200], rt=[40], imp=[0])
    plan = plan_batch([req])
    lone, wide = plan.padded_inputs(), plan.padded_inputs({"ll": 210, "rt": 45, "imp": 3})
    for s, n in (("ll", 200), ("rt", 40), ("imp", 0)):
        assert lone[f"{s}_length"].tolist() == wide[f"{s}_length"].tolist() == [n]
        for f in ("ts", "action", "surface", "item"):
            a, b = lone[f"{s}_{f}"], wide[f"{s}_{f}"]
            assert a.dtype == b.dtype and a.flags.c_contiguous and a.shape[:2] == (1, max(n, 1))
            np.testing.assert_array_equal(a[:, :n], b[:, :n])
            assert not b[:, n:].any() and (n > 0 or not a.any())
            assert np.shares_memory(a, getattr(getattr(req, s), f)) == (n > 0)
    # An array at an odd byte offset (as a binary request body can hold) is copied to aligned memory.
    body = np.zeros(8 * 200 + 1, np.uint8)
    odd = np.frombuffer(body.data, np.int64, count=200, offset=1)
    odd_req = dataclasses.replace(req, ll=dataclasses.replace(req.ll, ts=odd))
    ts = plan_batch([odd_req]).padded_inputs()["ll_ts"]
    assert not odd.flags.aligned and ts.flags.aligned and not np.shares_memory(ts, odd)
    np.testing.assert_array_equal(ts[0], odd)


def test_cpu_session_matches_eager_per_request_and_batched(session: Session, eager: RankingModel) -> None:
    for seed in range(3):
        reqs = random_requests(session.config, seed)
        together = session.score_many(reqs)
        for req, got, want in zip(reqs, together, eager_probs(eager, reqs), strict=True):
            assert got.shape == (req.num_candidates, 3)
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
            np.testing.assert_allclose(session.score(req), want, atol=1e-5, rtol=0)


def test_cpu_backend_runs_one_row_per_call(bundle_dir: Path, eager: RankingModel, monkeypatch) -> None:
    """Batches of several users run full.onnx once per user and candidate chunk (its selection is R x N x L
    work), and the answers land in the requests' order, shared rows included."""
    session = Session(bundle_dir, device="cpu", threads=2, split=2, warmup=False)
    reqs = random_requests(session.config, 7, n_requests=3, n_cands=36)  # 12 candidates each
    reqs = [reqs[1], reqs[0], reqs[2], reqs[0]]  # request 0's user twice: one row, two requests
    calls = []
    for ort_session in session.backend.sessions:
        def counted(names, feed, run=ort_session.run):  # noqa: ANN001, ANN202
            calls.append((feed["user_dense"].shape[:1], len(feed["cand_request"])))
            return run(names, feed)

        monkeypatch.setattr(ort_session, "run", counted)
    plan = plan_batch(reqs)
    probs, scores = session.backend.run(plan)
    session.close()
    # two sessions; 12 candidates make one chunk (MIN_CHUNK 8), the shared row's 24 two of 12
    assert sorted(calls) == [((1,), 12)] * 4
    want = eager_probs(eager, reqs)
    for got, exp in zip(plan.split(probs), want, strict=True):
        np.testing.assert_allclose(got, exp, atol=1e-5, rtol=0)
    np.testing.assert_allclose(scores, probs @ np.asarray(session.config.score_weights, np.float32), atol=1e-6)


@pytest.mark.parametrize(("n", "split", "want"), [
    (128, 4, [(i * 16, i * 16 + 16) for i in range(8)]),
    (256, 2, [(i * 16, i * 16 + 16) for i in range(16)]),  # MAX_CHUNK (16) each, eight per slot
    (100, 2, [(0, 12), (12, 25), (25, 37), (37, 50), (50, 62), (62, 75), (75, 87), (87, 100)]),  # 8, not 7: slots
    (40, 1, [(0, 13), (13, 26), (26, 40)]),  # one slot still runs chunks of at most 16, in turn
    (256, 16, [(i * 16, i * 16 + 16) for i in range(16)]),
    (20, 4, [(0, 10), (10, 20)]),  # two chunks of at least MIN_CHUNK (8)
    (17, 3, [(0, 8), (8, 17)]),
    (7, 4, [(0, 7)]),
    (1, 16, [(0, 1)]),
    (10, 1, [(0, 10)]),
])  # fmt: skip
def test_chunk_bounds_by_hand(n: int, split: int, want: list[tuple[int, int]]) -> None:
    assert chunk_bounds(n, split) == want


@pytest.mark.parametrize("n", [1, 7, 8, 33, 64, 65, 100, 255, 256, 1000, 4096])
@pytest.mark.parametrize("split", [1, 2, 3, 16])
def test_chunk_bounds_cover_every_candidate_once(n: int, split: int) -> None:
    bounds = chunk_bounds(n, split)
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(z0 == a1 for (_, z0), (a1, _) in zip(bounds[:-1], bounds[1:], strict=True))
    sizes = [z - a for a, z in bounds]
    assert max(sizes) - min(sizes) <= 1
    assert max(sizes) <= MAX_CHUNK or len(bounds) == max(1, n // 8)  # unless MIN_CHUNK caps the count
    assert min(sizes) >= min(n, 8)


@pytest.mark.parametrize(("n", "split", "max_chunk", "sizes"), [
    # ceil(left / 8) is 16 or more until 112 are left; then 14 (112 / 8), 13 (98 / 8 = 12.25), 11, 10, 8, 7, 7, 6, 5,
    # then TAIL_CHUNK (4) from 31 left, and the last 3
    (256, 8, 16, [16] * 9 + [14, 13, 11, 10, 8, 7, 7, 6, 5] + [4] * 7 + [3]),
    (40, 8, 16, [5, 5, 4, 4, 4, 4, 4, 4, 4, 2]),  # 40 / 8 = 5; 35 / 8 = 4.4 -> 5; 30 / 8 = 3.75 -> 4
    (64, 2, 16, [16, 16, 16, 8, 4, 4]),  # 16 / 2 = 8, then 8 / 2 = 4
    (10, 16, 16, [4, 4, 2]),
    (5, 8, 2, [2, 2, 1]),  # max_chunk below TAIL_CHUNK bounds both
    (3, 8, 16, [3]),
    (1, 1, 16, [1]),
])  # fmt: skip
def test_guided_bounds_by_hand(n: int, split: int, max_chunk: int, sizes: list[int]) -> None:
    bounds = guided_bounds(n, split, max_chunk)
    assert [z - a for a, z in bounds] == sizes
    assert bounds[0][0] == 0 and all(z0 == a1 for (_, z0), (a1, _) in zip(bounds[:-1], bounds[1:], strict=True))


@pytest.mark.parametrize("n", [1, 3, 4, 7, 33, 100, 255, 256, 1000])
@pytest.mark.parametrize("split", [1, 2, 8, 12, 16])
@pytest.mark.parametrize("max_chunk", [2, 16, 32])
def test_guided_bounds_shrink_from_max_chunk_to_the_tail(n: int, split: int, max_chunk: int) -> None:
    """Every candidate once, in order; sizes never grow, none above ``max_chunk``, none below the tail size but the
    last; each (but the tail's) a slot's share of what was left."""
    bounds = guided_bounds(n, split, max_chunk)
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(z0 == a1 for (_, z0), (a1, _) in zip(bounds[:-1], bounds[1:], strict=True))
    sizes = [z - a for a, z in bounds]
    tail = min(TAIL_CHUNK, max_chunk)
    assert all(x >= y for x, y in zip(sizes[:-1], sizes[1:], strict=True))
    assert max(sizes) <= max_chunk and min(sizes[:-1], default=tail) >= tail
    for (a, z) in bounds[:-1]:
        share = -(-(n - a) // split)
        assert z - a == min(max_chunk, max(tail, share))


@pytest.mark.parametrize(("max_chunk", "sizes"), [
    (None, [13, 13, 14]),  # MAX_CHUNK (16)
    (32, [20, 20]),
    (64, [40]),  # one chunk: the whole graph
    (10, [10, 10, 10, 10]),
    (4, [8, 8, 8, 8, 8]),  # never below MIN_CHUNK (8)
])  # fmt: skip
def test_max_chunk_sets_the_chunks(bundle_dir: Path, eager: RankingModel, max_chunk: int | None, sizes: list[int],
                                   monkeypatch) -> None:  # fmt: skip
    """``max_chunk`` bounds the candidates of each run of full.onnx (or of its candidate stage); the probabilities
    are the same as eager PyTorch's at every size."""
    reqs = random_requests(small_config(), 31, n_requests=1, n_cands=40, ll=[200], rt=[30], imp=[20])
    session = Session(bundle_dir, device="cpu", threads=1, max_chunk=max_chunk, warmup=False)
    runs = []
    for slots in (session.backend.whole, session.backend.staged):
        def counted(feed, run=slots.run):  # noqa: ANN001, ANN202
            runs.append(len(feed["cand_request"]))
            return run(feed)

        monkeypatch.setattr(slots, "run", counted)
    try:
        got = session.score(reqs[0])
    finally:
        session.close()
    assert runs == sizes
    np.testing.assert_allclose(got, eager_probs(eager, reqs)[0], atol=1e-5, rtol=0)


def test_max_chunk_below_one_is_refused(bundle_dir: Path) -> None:
    with pytest.raises(ValueError, match="max_chunk must be at least 1, got 0"):
        Session(bundle_dir, device="cpu", threads=1, max_chunk=0, warmup=False)


@pytest.mark.parametrize(("threads", "cpus", "want"), [(16, 4, 4), (2, 16, 2), (1, 8, 1), (8, 8, 8)])
def test_default_split_is_one_chunk_per_thread_and_cpu(threads: int, cpus: int, want: int, monkeypatch) -> None:
    monkeypatch.setattr(cpu_backend, "usable_cpus", lambda: cpus)
    assert cpu_backend.default_split(threads) == want


def test_candidates_split_across_sessions_match_one_session(bundle_dir: Path, eager: RankingModel) -> None:
    """Three one-thread chunks side by side (concurrent calls of one session) and three two-thread chunks (a
    session each): the same probabilities as one session scoring the request whole, and as eager PyTorch."""
    reqs = random_requests(small_config(), 21, n_cands=120)  # 40 candidates each
    whole = Session(bundle_dir, device="cpu", threads=1, warmup=False)
    split = Session(bundle_dir, device="cpu", threads=3, split=3, warmup=False)
    wide = Session(bundle_dir, device="cpu", threads=6, split=3, warmup=False)
    try:
        assert [len(s.backend.sessions) for s in (whole, split, wide)] == [1, 1, 3]
        assert [s.backend.threads_per_chunk for s in (whole, split, wide)] == [1, 1, 2]
        assert wide.backend.layout == "3 x 2 threads"
        np.testing.assert_allclose(wide.score_many(reqs)[0], whole.score_many(reqs)[0], atol=1e-6, rtol=0)
        got, ref = split.score_many(reqs), whole.score_many(reqs)
        for g, r, e in zip(got, ref, eager_probs(eager, reqs), strict=True):
            assert g.shape == (40, 3)
            np.testing.assert_allclose(g, r, atol=1e-6, rtol=0)
            np.testing.assert_allclose(g, e, atol=1e-5, rtol=0)
    finally:
        for s in (whole, split, wide):
            s.close()


def test_one_thread_chunks_run_at_once_on_one_session(bundle_dir: Path, monkeypatch) -> None:
    """With one thread per chunk, ``split`` chunks run at the same time, all on the one session: never more."""
    session = Session(bundle_dir, device="cpu", threads=3, split=3, warmup=False)
    (ort_session,) = session.backend.sessions
    lock, state = threading.Lock(), {"now": 0, "most": 0, "calls": 0}

    def counted(names, feed, run=ort_session.run):  # noqa: ANN001, ANN202
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
            state["calls"] += 1
        time.sleep(0.05)  # long enough for the other chunks to start
        try:
            return run(names, feed)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(ort_session, "run", counted)
    try:
        for seed in (23, 24):  # 48 candidates: three chunks of 16 each time
            session.score(random_requests(session.config, seed, 1, 48, ll=[200], rt=[40], imp=[30])[0])
    finally:
        session.close()
    assert state["most"] == 3 and state["calls"] == 6


def denormal_product() -> float:
    """1e-30 x 1e-10 in float32 on the calling thread: a denormal (~1e-40), or zero where the thread flushes them."""
    return float(np.float32(1e-30) * np.float32(1e-10))


@pytest.mark.parametrize("threads,split", [(1, 1), (2, 2)])
@pytest.mark.parametrize("flush", [True, False])
def test_onnx_runtime_runs_with_denormals_flushed(bundle_dir: Path, monkeypatch, eager: RankingModel, threads: int,
                                                 split: int, flush: bool) -> None:
    """Every ONNX Runtime call of the cpu backend (a single chunk on the caller's thread, chunks side by side or in
    turns, the request stage, the dense stage) runs with denormals flushed unless told not to, and each thread gets
    its own mode back afterwards."""
    assert denormal_product() > 0  # the test process keeps denormals
    session = Session(bundle_dir, device="cpu", threads=threads, split=split, warmup=False, flush_denormals=flush)
    backend, seen = session.backend, []
    run = ort.InferenceSession.run

    def probed(self, names, feed, *args):  # noqa: ANN001, ANN202 (every session, those made later included)
        seen.append((threading.current_thread().name, denormal_product()))
        return run(self, names, feed, *args)

    monkeypatch.setattr(ort.InferenceSession, "run", probed)
    try:
        for n_cands in (3, 4 * 32 * split + 12):  # one chunk of the whole graph; the request stage, then chunks
            (req,) = random_requests(session.config, 31, 1, n_cands, ll=[200], rt=[40], imp=[30])
            np.testing.assert_allclose(session.score(req), eager_probs(eager, [req])[0], atol=1e-5, rtol=0)
        assert denormal_product() > 0
        if backend._pool is not None:  # the chunks' threads get their mode back too
            assert all(f.result() > 0 for f in [backend._pool.submit(denormal_product) for _ in range(8)])
    finally:
        session.close()
    names = {name for name, _ in seen}
    assert len(seen) >= 1 + 1 + 5 and "MainThread" in names and (split == 1 or len(names) > 1)
    assert all((product == 0.0) == flush for _, product in seen)


def test_flushed_denormals_keeps_a_thread_that_already_flushes() -> None:
    """A caller that flushes denormals itself still does after the backend's runs."""
    torch.set_flush_denormal(True)
    try:
        with cpu_backend.flushed_denormals():
            assert denormal_product() == 0.0
        assert denormal_product() == 0.0
    finally:
        torch.set_flush_denormal(False)
    with cpu_backend.flushed_denormals():
        assert denormal_product() == 0.0
    assert denormal_product() > 0
    with cpu_backend.flushed_denormals(enabled=False):
        assert denormal_product() > 0


def test_edge_cases_match_eager(session: Session, eager: RankingModel) -> None:
    c = session.config
    cases = [
        random_requests(c, 10, 1, 1, ll=[0], rt=[0], imp=[0]),  # one candidate, a user with no actions
        random_requests(c, 11, 1, 5, ll=[c.max_ll], rt=[c.max_rt], imp=[c.max_imp]),  # maximum lengths
        random_requests(c, 12, 2, 7, ll=[3, 1], rt=[2, 5], imp=[1, 0]),  # shorter than k
    ]
    for reqs in cases:
        for got, want in zip(session.score_many(reqs), eager_probs(eager, reqs), strict=True):
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_scores_are_weighted_heads(session: Session) -> None:
    req = random_requests(session.config, 3)[0]
    out = session.run([req]).outputs[0]
    np.testing.assert_allclose(out.scores, session.rank_scores(out.probabilities), atol=1e-6)


def test_dedup_shares_rows_and_keeps_answers(session: Session, eager: RankingModel) -> None:
    a, b, _ = random_requests(session.config, 4)
    other = random_requests(session.config, 5)[0]
    # Same user as `a`, other candidates: shares a's row, candidates concatenate.
    a2 = Request(**{**a.__dict__, "cand_item": other.cand_item[:3], "item_dense": other.item_dense[:3]})
    plan = plan_batch([a, b, a2, a])
    assert plan.num_rows == 2 and plan.rows == [0, 1, 0, 0]
    res = session.run([a, b, a2, a])
    assert res.rows == 2 and res.candidates == 2 * a.num_candidates + b.num_candidates + 3
    for req, out in zip([a, b, a2, a], res.outputs, strict=True):
        np.testing.assert_allclose(out.probabilities, eager_probs(eager, [req])[0], atol=1e-5, rtol=0)
    # A user differing in one sequence token is a different row.
    c = Request(**{**a.__dict__})
    c.ll = type(a.ll)(a.ll.ts, a.ll.action.copy(), a.ll.surface, a.ll.item)
    c.ll.action[0] ^= 1
    assert plan_batch([a, c]).num_rows == 2
    assert plan_batch([a, a], dedup=False).num_rows == 2


def wire(req: Request) -> dict[str, tuple[str, np.ndarray]]:
    types = {np.dtype("int64"): "INT64", np.dtype("int32"): "INT32", np.dtype("int8"): "INT8",
             np.dtype("float32"): "FP32"}  # fmt: skip
    return {k: (types[v.dtype], v) for k, v in req.tensors().items()}


@pytest.mark.parametrize(
    "change, tensor, words",
    [
        (lambda t: t.pop("rt_ts"), "rt_ts", "missing"),
        (lambda t: t.__setitem__("extra", ("FP32", np.zeros(1, np.float32))), "extra", "unknown input"),
        (lambda t: t.__setitem__("ll_ts", ("FP32", t["ll_ts"][1].astype(np.float32))), "ll_ts", "datatype"),
        (lambda t: t.__setitem__("ll_item", ("INT8", t["ll_item"][1][:, :16])), "ll_item", "shape"),
        (lambda t: t.__setitem__("ll_action", ("INT32", t["ll_action"][1][:-1])), "ll_action", "shape"),
        (lambda t: t["user_dense"][1].__setitem__(0, np.nan), "user_dense", "NaN"),
        (lambda t: t["item_dense"][1].__setitem__((0, 0), np.inf), "item_dense", "infinite"),
        (lambda t: t["ll_item"][1].__setitem__((0, 0), -128), "ll_item", "[-127, 127]"),
        (lambda t: t.__setitem__("hour", ("INT64", np.array([24]))), "hour", "[0, 23]"),
        (lambda t: t.__setitem__("surface", ("INT64", np.array([-1]))), "surface", "[0, 8)"),
        (lambda t: t["ll_ts"][1].__setitem__(0, t["ll_ts"][1][-1] + 1), "ll_ts", "sorted"),
    ],
)
def test_request_validation_names_the_tensor(session: Session, change, tensor: str, words: str) -> None:
    req = random_requests(session.config, 6)[0]
    tensors = {k: (d, a.copy()) for k, (d, a) in wire(req).items()}
    change(tensors)
    with pytest.raises(BatchError) as e:
        request_from_tensors(tensors, session.config, session.limits)
    assert str(e.value).startswith(tensor) and words in str(e.value)


def test_length_mismatch_names_the_input_that_set_the_length(session: Session) -> None:
    """A sequence's length comes from its first input (``ll_ts``); when ``ll_ts`` itself is the one cut short,
    the error on the next input says where the expected length came from."""
    req = random_requests(session.config, 6)[0]
    tensors = {k: (d, a.copy()) for k, (d, a) in wire(req).items()}
    length = tensors["ll_ts"][1].shape[0]
    tensors["ll_ts"] = ("INT64", tensors["ll_ts"][1][:-1])
    with pytest.raises(BatchError) as e:
        request_from_tensors(tensors, session.config, session.limits)
    assert str(e.value) == f"ll_action: expected shape [L_ll={length - 1}] (L_ll from ll_ts), got [{length}]"
    tensors = {k: (d, a.copy()) for k, (d, a) in wire(req).items()}
    tensors["cand_item"] = ("FP32", tensors["cand_item"][1][:, :16])  # its own dims only: no note
    with pytest.raises(BatchError) as e:
        request_from_tensors(tensors, session.config, session.limits)
    n = tensors["cand_item"][1].shape[0]
    assert str(e.value) == f"cand_item: expected shape [N={n}, 32], got [{n}, 16]"


def test_limits_on_candidates_and_lengths(session: Session) -> None:
    req = random_requests(session.config, 7, 1, 20, ll=[256], rt=[40], imp=[30])[0]
    t = wire(req)
    request_from_tensors(t, session.config, Limits.from_config(session.config, 20))  # at the limits: fine
    with pytest.raises(BatchError, match=r"^cand_item: 20 candidates, more than the limit of 19"):
        request_from_tensors(t, session.config, Limits.from_config(session.config, 19))
    longer = dict(t)
    longer["ll_ts"] = ("INT64", np.arange(257, dtype=np.int64))
    for f in ("action", "surface"):
        longer[f"ll_{f}"] = (t[f"ll_{f}"][0], np.zeros(257, t[f"ll_{f}"][1].dtype))
    longer["ll_item"] = ("INT8", np.zeros((257, 32), np.int8))
    with pytest.raises(BatchError, match=r"^ll_ts: 257 tokens, more than max_ll=256"):
        request_from_tensors(longer, session.config, session.limits)


def test_int8_candidates_are_dequantised(session: Session) -> None:
    req = random_requests(session.config, 8)[0]
    codes = np.round(req.cand_item * 127 / session.config.quant_scale).astype(np.int8)
    t = wire(req)
    t["cand_item"] = ("INT8", codes)
    got = request_from_tensors(t, session.config, session.limits)
    np.testing.assert_allclose(got.cand_item, req.cand_item, atol=1e-6)
    np.testing.assert_allclose(session.score(got), session.score(req), atol=1e-6)


def test_device_selection_and_cuda_refusal(bundle_dir: Path) -> None:
    expect = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == expect
    with pytest.raises(ValueError, match="device must be one of"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(BackendUnavailable, match=r"needs a CUDA GPU.*device='cpu'"):
            Session(bundle_dir, device="cuda")


def test_tampered_bundle_is_refused(bundle_dir: Path, tmp_path: Path) -> None:
    from export.bundle import BundleError

    bad = tmp_path / "bundle"
    shutil.copytree(bundle_dir, bad)
    data = bytearray((bad / "dense.onnx").read_bytes())
    data[-10] ^= 0xFF
    (bad / "dense.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="dense.onnx"):
        Session(bad, device="cpu")


def cpu_cuda_backend(bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: ANN001, ANN201
    """The cuda backend's own code on the CPU, with the kernels' PyTorch paths (not the interpreter)."""
    from runtime.backends.cuda import CudaBackend
    from runtime.session import SessionOptions

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # set by conftest.py without a GPU
    options = SessionOptions(triton_cache_dir=str(tmp_path / "triton"))
    return CudaBackend(bundle, options, device="cpu", cpu_reference=True)


def test_hybrid_glue_on_cpu_matches_eager(
    session: Session, eager: RankingModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cuda backend's own code (staging arena, selection, token building, V1/V2 assembly, dense
    part) run on the CPU with the kernels' PyTorch paths; the interpreter runs the Triton kernels in
    test_runtime_hybrid_interpreter.py and the GPU in tests/gpu."""
    backend = cpu_cuda_backend(session.bundle, tmp_path, monkeypatch)
    reqs = random_requests(session.config, 9, n_cands=20)
    probs, _ = backend.run(plan_batch(reqs))
    want = np.concatenate(eager_probs(eager, reqs))
    np.testing.assert_allclose(probs, want, atol=2e-3, rtol=0)
    # Selections: identical to the model's (the reference scores are exact, no near-ties at this size).
    plan = plan_batch(reqs)
    sel = backend.sequence_outputs(plan)
    named = plan.padded_inputs()
    with torch.no_grad(), transformer_fastpath(False):
        out = eager.forward_with_aux(Batch.from_named({k: torch.from_numpy(v) for k, v in named.items()}))
    ref_pos = torch.where(out.v2_selection.valid, out.v2_selection.pos, -1).numpy()
    ref_group = torch.where(out.v2_selection.valid, out.v2_selection.group, -1).numpy()
    np.testing.assert_array_equal(sel["selection_pos"], ref_pos)
    np.testing.assert_array_equal(sel["selection_group"], ref_group)


def test_outputs_are_copied_back_once_graphs_are_given_up(
    session: Session, eager: RankingModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Captured graphs copy their outputs to the host themselves; after a failed capture (graphs off, the
    earlier buckets' graphs still held) every batch must copy its own outputs back, not return the pinned
    buffers of an earlier batch."""
    backend = cpu_cuda_backend(session.bundle, tmp_path, monkeypatch)
    first, second = (random_requests(session.config, seed, n_cands=20) for seed in (21, 22))
    backend.run(plan_batch(first))
    b, _ = backend.staging_for(plan_batch(second))
    backend.graphs[b] = ("a bucket captured before the capture failure",)
    backend.use_graphs = False
    probs, _ = backend.run(plan_batch(second))
    np.testing.assert_allclose(probs, np.concatenate(eager_probs(eager, second)), atol=2e-3, rtol=0)


def test_staging_parts_hold_what_each_stage_reads(session: Session, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The cuda backend uploads its arena in three parts and starts stage A after the first, the ll
    selection after the second: each fill writes only its own part, stage A reads nothing past part one
    and the ll selection nothing past part two (device bytes there are poisoned: same outputs)."""
    backend = cpu_cuda_backend(session.bundle, tmp_path, monkeypatch)
    plan = plan_batch(random_requests(session.config, 12, n_requests=3, n_cands=9))
    assert plan.num_rows == 3
    b, arena = backend.staging_for(plan)
    s1, s2 = arena.splits
    assert 0 < s1 < s2 < arena.size
    host = arena.host_bytes
    parts = ((backend._fill_first, 0, s1), (backend._fill_ll, s1, s2), (backend._fill_rest, s2, arena.size))
    for fill, lo, hi in parts:
        host.fill_(0xA5)
        fill(arena, b, plan)
        changed = torch.nonzero(host != 0xA5).flatten()
        assert changed.numel() > 0, fill.__name__
        assert lo <= int(changed.min()) and int(changed.max()) < hi, fill.__name__

    backend._fill(arena, b, plan)
    # Padding candidates repeat a real one: an all-zero vector ties with every token, which costs the GPU
    # selection its exact full scan (tens of ms per batch, benchmarks/RESULTS.md).
    cand, n = arena.np["cand"], plan.num_candidates
    assert n < b.cands and np.abs(cand[0]).sum() > 0
    np.testing.assert_array_equal(cand[n:], np.broadcast_to(cand[0], cand[n:].shape))
    arena.upload()
    with torch.no_grad():
        want_a, want_ll = backend._stage_a(arena, b), backend._stage_ll(arena, b)
        arena.dev_bytes[s1:].fill_(0x5A)
        got_a = backend._stage_a(arena, b)
        arena.upload(s1, s2)
        got_ll = backend._stage_ll(arena, b)
    assert want_a.keys() == got_a.keys() == {"v1_0", "v1_1", "picks_rt", "picks_imp"}  # V1: pool, rows
    for k in want_a:
        assert torch.equal(want_a[k], got_a[k]), k
    assert torch.equal(want_ll, got_ll)


@pytest.mark.parametrize("v1, v2", [(True, False), (False, True), (False, False)], ids=["v1-only", "v2-only", "none"])
def test_hybrid_glue_with_one_or_no_sequence_module(v1: bool, v2: bool, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The ablation's variants without V1, without V2 or without either, through the cuda backend's
    stages (on the CPU), against the eager model."""
    from export.bundle import export_bundle
    from runtime.session import open_bundle
    from transact.checkpoint import save_checkpoint

    base = small_config()
    cfg = dataclasses.replace(base, transact=dataclasses.replace(base.transact, enabled=v1),
                              transact_v2=dataclasses.replace(base.transact_v2, enabled=v2))  # fmt: skip
    torch.manual_seed(3)
    model = RankingModel(cfg).eval()
    save_checkpoint(tmp_path / "ckpt", model)
    bundle = open_bundle(export_bundle(tmp_path / "ckpt", tmp_path / "bundle", check=False))
    backend = cpu_cuda_backend(bundle, tmp_path, monkeypatch)
    reqs = random_requests(cfg, 13, n_cands=10)
    probs, _ = backend.run(plan_batch(reqs))
    np.testing.assert_allclose(probs, np.concatenate(eager_probs(model, reqs)), atol=2e-3, rtol=0)


def _cgroup(tmp_path: Path, self_cgroup: str, files: dict[str, str]) -> tuple[Path, Path]:
    """A fake /sys/fs/cgroup tree and /proc/self/cgroup."""
    root = tmp_path / "cgroup"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    proc = tmp_path / "self_cgroup"
    proc.write_text(self_cgroup)
    return root, proc


@pytest.mark.parametrize(("self_cgroup", "files", "want"), [
    ("0::/\n", {"cpu.max": "200000 100000\n"}, 2.0),  # cgroup v2, the container's own root (a cgroup namespace)
    ("0::/\n", {"cpu.max": "max 100000\n"}, None),
    ("0::/\n", {}, None),  # no cpu controller there
    ("0::/pods/a\n", {"pods/a/cpu.max": "max 100000", "pods/cpu.max": "150000 100000"}, 1.5),  # a parent's quota
    ("0::/pods/a\n", {"pods/a/cpu.max": "400000 100000", "pods/cpu.max": "800000 100000"}, 4.0),  # the smallest
    ("4:cpu,cpuacct:/docker/x\n1:name=systemd:/\n", {"cpu,cpuacct/docker/x/cpu.cfs_quota_us": "300000",
                                                     "cpu,cpuacct/docker/x/cpu.cfs_period_us": "100000"}, 3.0),  # v1
    ("2:cpuacct:/\n1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
    ("2:cpuset:/\n", {"cpuset/cpu.cfs_quota_us": "100000", "cpuset/cpu.cfs_period_us": "100000"}, None),  # not cpu
    ("garbage\n0::/\n", {"cpu.max": "300000 100000"}, 3.0),  # a line it cannot read is passed over
])  # fmt: skip
def test_cgroup_cpu_limit_reads_the_quota_on_the_process_path(tmp_path: Path, self_cgroup: str, files: dict,
                                                              want: float | None) -> None:  # fmt: skip
    root, proc = _cgroup(tmp_path, self_cgroup, files)
    assert cpu_backend.cgroup_cpu_limit(root, proc) == want


@pytest.mark.parametrize(("affinity", "limit", "want"), [(16, None, 16), (16, 2.0, 2), (16, 2.5, 2), (16, 0.5, 1),
                                                         (4, 8.0, 4)])  # fmt: skip
def test_usable_cpus_is_the_affinity_capped_by_the_quota(affinity: int, limit: float | None, want: int,
                                                         monkeypatch) -> None:  # fmt: skip
    monkeypatch.setattr(cpu_backend.os, "sched_getaffinity", lambda pid: set(range(affinity)), raising=False)
    monkeypatch.setattr(cpu_backend, "cgroup_cpu_limit", lambda: limit)
    assert cpu_backend.usable_cpus() == want
