"""runtime.backends.request_stage: the cut of a graph into its request stage and candidate stage, and the cut of a
graph down to some of its outputs, on hand-made graphs (which nodes go where, against the whole graph in ONNX
Runtime) and through the cpu backend on a bundle (against the backend without the cuts and eager PyTorch), the
dense stage (dense.onnx after chunks that stop at full.onnx's sequence outputs) included."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_runtime_session import eager_probs, random_requests, small_bundle, small_config

from export.manifest import SEQUENCE_OUTPUTS
from runtime.backends import cpu
from runtime.backends.cpu import CANDIDATE_INPUTS, CHUNK_ROWS, GUIDED_FROM_SLOTS, MALLOC_FROM_SLOTS, CpuBackend
from runtime.backends.cpu import _AsyncSlots as AsyncSlots
from runtime.backends.request_stage import keep_outputs, split_request_stage
from runtime.batching import plan_batch
from runtime.chunks import MIN_CHUNK, chunk_bounds, guided_bounds
from runtime.session import LoadedBundle, Session, SessionOptions

RNG = np.random.default_rng(7)
W = RNG.standard_normal((4, 4)).astype(np.float32)


def _graph(nodes: list, outputs: list[str], extra_inputs: list | None = None) -> onnx.ModelProto:
    """Inputs ``r`` (the request's, (R, 4)) and ``c`` (per candidate, (N, 4)), weight ``w`` (4, 4)."""
    inputs = [helper.make_tensor_value_info("r", TensorProto.FLOAT, ["R", 4]),
              helper.make_tensor_value_info("c", TensorProto.FLOAT, ["N", 4]), *(extra_inputs or [])]  # fmt: skip
    outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs]
    graph = helper.make_graph(nodes, "g", inputs, outs, [numpy_helper.from_array(W, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    return onnx.shape_inference.infer_shapes(model)


def _run(model: onnx.ModelProto, feed: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: feed[i.name] for i in session.get_inputs()})


def _staged(stage, feed: dict) -> list[np.ndarray]:  # noqa: ANN001
    handed = dict(zip(stage.handoff, _run(stage.request, feed), strict=True))
    return _run(stage.candidates, feed | handed)


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


FEED = {"r": RNG.standard_normal((1, 4)).astype(np.float32), "c": RNG.standard_normal((5, 4)).astype(np.float32)}


def test_request_work_runs_once_and_layout_nodes_move_down() -> None:
    """u = exp(r @ w) depends on the request alone; its transpose is layout; the product with c and what follows
    are per candidate. The request stage holds MatMul and Exp, hands u over, and the candidate stage transposes."""
    model = _graph([
        helper.make_node("MatMul", ["r", "w"], ["rw"]),
        helper.make_node("Exp", ["rw"], ["u"]),
        helper.make_node("Transpose", ["u"], ["ut"], perm=[1, 0]),
        helper.make_node("MatMul", ["c", "ut"], ["s"]),
        helper.make_node("Add", ["s", "s"], ["y"]),
    ], ["y"])  # fmt: skip
    stage = split_request_stage(model, ["c"])
    assert stage is not None
    assert _ops(stage.request) == ["MatMul", "Exp"] and stage.handoff == ("u",)
    assert _ops(stage.candidates) == ["Transpose", "MatMul", "Add"]
    assert [i.name for i in stage.request.graph.input] == ["r"]
    assert [i.name for i in stage.candidates.graph.input] == ["c", "u"]
    want = 2 * FEED["c"] @ np.exp(FEED["r"] @ W).T
    (whole,), (staged,) = _run(model, FEED), _staged(stage, FEED)
    np.testing.assert_allclose(whole, want, rtol=1e-6)
    np.testing.assert_array_equal(staged, whole)


def test_an_output_of_the_request_alone_is_computed_in_the_candidate_stage() -> None:
    """A graph output that depends on the request alone still comes out of the candidate stage (whose outputs are
    the graph's), computed there from what the request stage hands over."""
    model = _graph([
        helper.make_node("MatMul", ["r", "w"], ["rw"]),
        helper.make_node("Exp", ["rw"], ["u"]),
        helper.make_node("Relu", ["u"], ["side"]),
        helper.make_node("MatMul", ["c", "w"], ["cw"]),
        helper.make_node("Add", ["cw", "u"], ["y"]),
    ], ["y", "side"])  # fmt: skip
    stage = split_request_stage(model, ["c"])
    assert stage is not None and stage.handoff == ("u",)
    assert _ops(stage.candidates) == ["Relu", "MatMul", "Add"]
    for got, want in zip(_staged(stage, FEED), _run(model, FEED), strict=True):
        np.testing.assert_array_equal(got, want)


def test_what_the_weights_alone_give_is_computed_in_the_candidate_stage() -> None:
    """ww = w @ w and its Relu read weights alone: they move to the candidate stage (where ONNX Runtime folds them
    into its weights at load), not handed over; exp(r @ w), the request's, is. The candidate stage computes
    2 * c @ relu(w @ w) + exp(r @ w), as float64 works it out, and as the whole graph does, bit for bit."""
    model = _graph([
        helper.make_node("MatMul", ["w", "w"], ["ww"]),
        helper.make_node("Relu", ["ww"], ["wr"]),
        helper.make_node("MatMul", ["r", "w"], ["rw"]),
        helper.make_node("Exp", ["rw"], ["u"]),
        helper.make_node("MatMul", ["c", "wr"], ["cw"]),
        helper.make_node("Add", ["cw", "cw"], ["s"]),
        helper.make_node("Add", ["s", "u"], ["y"]),
    ], ["y"])  # fmt: skip
    stage = split_request_stage(model, ["c"])
    assert stage is not None
    assert _ops(stage.request) == ["MatMul", "Exp"] and stage.handoff == ("u",)
    assert _ops(stage.candidates) == ["MatMul", "Relu", "MatMul", "Add", "Add"]
    assert [i.name for i in stage.candidates.graph.input] == ["c", "u"]
    w = W.astype(np.float64)
    want = 2 * FEED["c"] @ np.maximum(w @ w, 0) + np.exp(FEED["r"].astype(np.float64) @ w)
    (whole,), (staged,) = _run(model, FEED), _staged(stage, FEED)
    np.testing.assert_allclose(staged, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(staged, whole)


def test_nothing_to_cut() -> None:
    """Every node reads a candidate input, or the request's share is layout alone: no stage."""
    per_candidate = _graph([helper.make_node("MatMul", ["c", "w"], ["cw"]),
                            helper.make_node("Add", ["cw", "r"], ["y"])], ["y"])  # fmt: skip
    assert split_request_stage(per_candidate, ["c"]) is None
    layout_only = _graph([helper.make_node("Transpose", ["r"], ["rt"], perm=[1, 0]),
                          helper.make_node("MatMul", ["c", "rt"], ["y"])], ["y"])  # fmt: skip
    assert split_request_stage(layout_only, ["c"]) is None


def _branch(op: str, read: str) -> onnx.GraphProto:
    """An If branch that reads ``read`` from the outer graph (not an input of the If node) into its output ``o``."""
    return helper.make_graph([helper.make_node(op, [read], ["o"])], op, [],
                             [helper.make_tensor_value_info("o", TensorProto.FLOAT, None)])  # fmt: skip


def _if_graph(flag_from: str, then: onnx.GraphProto, other: onnx.GraphProto, picked: str, tail: list,
              outputs: list[str]) -> onnx.ModelProto:  # fmt: skip
    """rw = r @ w; flag = sum(``flag_from``) > zero; ``picked`` = If(flag, then, other); then ``tail``."""
    return _graph([
        helper.make_node("MatMul", ["r", "w"], ["rw"]),
        helper.make_node("ReduceSum", [flag_from], ["total"], keepdims=0),
        helper.make_node("Greater", ["total", "zero"], ["flag"]),
        helper.make_node("If", ["flag"], [picked], then_branch=then, else_branch=other),
        *tail,
    ], outputs, [helper.make_tensor_value_info("zero", TensorProto.FLOAT, [])])  # fmt: skip


def test_graphs_with_subgraphs_are_left_whole_and_unknown_inputs_refused() -> None:
    tail = [helper.make_node("MatMul", ["c", "w"], ["cw"]), helper.make_node("Add", ["cw", "picked"], ["y"])]
    model = _if_graph("rw", _branch("Identity", "r"), _branch("Identity", "r"), "picked", tail, ["y"])
    assert split_request_stage(model, ["c"]) is None
    plain = _graph([helper.make_node("MatMul", ["c", "w"], ["y"])], ["y"])
    with pytest.raises(ValueError, match="cand"):
        split_request_stage(plain, ["cand"])


def test_keep_outputs_holds_what_the_outputs_need() -> None:
    """z = exp(r @ w) + c needs r, c, w and two nodes; y = c @ w alone needs c and w. Kept to z, the graph has those
    nodes, inputs and the weight, and gives the whole graph's z; kept to y, neither r nor the Exp. An output the
    graph does not have is refused by name."""
    model = _graph([
        helper.make_node("MatMul", ["r", "w"], ["rw"]),
        helper.make_node("Exp", ["rw"], ["u"]),
        helper.make_node("Add", ["u", "c"], ["z"]),
        helper.make_node("MatMul", ["c", "w"], ["y"]),
    ], ["y", "z"])  # fmt: skip
    z_only = keep_outputs(model, ["z"])
    assert _ops(z_only) == ["MatMul", "Exp", "Add"] and [o.name for o in z_only.graph.output] == ["z"]
    assert [i.name for i in z_only.graph.input] == ["r", "c"] and [t.name for t in z_only.graph.initializer] == ["w"]
    (got,), (_, whole) = _run(z_only, FEED), _run(model, FEED)
    want = np.exp(FEED["r"].astype(np.float64) @ W) + FEED["c"]
    scale = np.abs(want).max()  # some elements are sums that cancel: held to float32's error on the largest
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * scale)
    np.testing.assert_allclose(whole, want, rtol=0, atol=1e-6 * scale)
    y_only = keep_outputs(model, ["y"])
    assert _ops(y_only) == ["MatMul"] and [i.name for i in y_only.graph.input] == ["c"]
    with pytest.raises(ValueError, match="v9"):
        keep_outputs(model, ["y", "v9"])


def test_keep_outputs_follows_what_subgraphs_read() -> None:
    """An If whose branches read ``rw`` from the outer graph (not an input of the If node): kept to the If's output,
    the cut keeps rw's producer, and runs to the whole graph's values."""
    tail = [helper.make_node("MatMul", ["c", "w"], ["y"])]
    model = _if_graph("c", _branch("Exp", "rw"), _branch("Neg", "rw"), "z", tail, ["y", "z"])
    z_only = keep_outputs(model, ["z"])
    assert _ops(z_only) == ["MatMul", "ReduceSum", "Greater", "If"]
    feed = FEED | {"zero": np.array(0.0, np.float32)}
    (got,), (_, whole) = _run(z_only, feed), _run(model, feed)
    np.testing.assert_array_equal(got, whole)
    rw = FEED["r"].astype(np.float64) @ W
    want = np.exp(rw) if FEED["c"].sum() > 0 else -rw
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_keep_outputs_keeps_weights_that_only_subgraphs_read() -> None:
    """Branches that read the weight ``w`` itself: kept to the If's output, nothing outside the If reads ``w``, and the
    cut still carries it (else ONNX Runtime could not load the graph) and gives the whole graph's values."""
    tail = [helper.make_node("MatMul", ["c", "w"], ["y"])]
    model = _if_graph("c", _branch("Exp", "w"), _branch("Neg", "w"), "z", tail, ["y", "z"])
    z_only = keep_outputs(model, ["z"])
    assert _ops(z_only) == ["ReduceSum", "Greater", "If"] and [t.name for t in z_only.graph.initializer] == ["w"]
    feed = FEED | {"zero": np.array(0.0, np.float32)}
    (got,), (_, whole) = _run(z_only, feed), _run(model, feed)
    np.testing.assert_array_equal(got, whole)
    np.testing.assert_allclose(got, np.exp(W.astype(np.float64)) if FEED["c"].sum() > 0 else -W, rtol=1e-6)


class _BeforeSequenceOutputs:
    """A loaded bundle whose full.onnx lacks the ``v1`` / ``v2`` outputs, as bundles exported before them do (the
    nodes are all there; only the graph's output list is shorter)."""

    def __init__(self, loaded: LoadedBundle) -> None:
        self.loaded, self.config = loaded, loaded.config

    def graph_bytes(self, name: str) -> bytes:
        data = self.loaded.graph_bytes(name)
        if name != "full.onnx":
            return data
        model = onnx.load_from_string(data)
        kept = [o for o in model.graph.output if o.name not in SEQUENCE_OUTPUTS]
        del model.graph.output[:]
        model.graph.output.extend(kept)
        return model.SerializeToString()


def test_dense_stage_scores_a_rows_candidates_after_its_chunks(monkeypatch) -> None:
    """Where a row's chunks outnumber the slots (150 candidates: 10 chunks of 15 for 2 slots), the chunks run
    full.onnx up to v1 / v2 and dense.onnx scores the row in two groups of 75 (half the row each: five finished
    chunks), the last cut in two parts of 37 and 38 for the two slots (LAST_PART_ROWS); where they do not (30: 2
    chunks), dense.onnx does not run. Three rows of 100 (8 chunks of 12 or 13 each): two groups per row, the first
    of at least 50, the last too small to cut, together the row. The probabilities are those of the
    chunks run to the end and of eager PyTorch, for one request and for three rows at once. A bundle whose full.onnx
    lacks v1 / v2 runs its chunks to the end."""
    bundle_dir = small_bundle()
    on = Session(bundle_dir, device="cpu", threads=2, warmup=False)
    off = Session(bundle_dir, device="cpu", threads=2, warmup=False, dense_stage=False)
    older = CpuBackend(_BeforeSequenceOutputs(on.bundle), SessionOptions(threads=2))
    eager = on.bundle.verified.build_model()
    assert on.backend.dense is not None and off.backend.dense is None and older.dense is None
    assert on.backend.staged.outputs == list(SEQUENCE_OUTPUTS) and older.staged.outputs == ["probabilities", "scores"]
    (dense_session,) = on.backend.dense.sessions
    parts: list[int] = []

    def counted(names, feed, run=dense_session.run):  # noqa: ANN001, ANN202
        parts.append(len(feed["cand_request"]))
        return run(names, feed)

    monkeypatch.setattr(dense_session, "run", counted)
    try:
        for n_rows, n_cands, want_parts in ((1, 150, 3), (1, 30, 0), (3, 300, 6)):
            parts.clear()
            reqs = random_requests(small_config(), 33, n_rows, n_cands, ll=[200, 90, 3][:n_rows],
                                   rt=[40, 0, 7][:n_rows], imp=[30, 4, 0][:n_rows])  # fmt: skip
            got_all, ref_all = on.score_many(reqs), off.score_many(reqs)
            assert len(parts) == want_parts and sum(parts) == (n_cands if want_parts else 0)
            assert n_rows > 1 or sorted(parts) == [37, 38, 75][:want_parts]
            assert not want_parts or sum(p >= 50 for p in parts) >= n_rows
            older_all = [older.run(plan_batch([r]))[0] for r in reqs]
            for got, ref, old, e in zip(got_all, ref_all, older_all, eager_probs(eager, reqs), strict=True):
                np.testing.assert_allclose(got, ref, atol=1e-7, rtol=0)
                np.testing.assert_allclose(old, ref, atol=1e-7, rtol=0)
                np.testing.assert_allclose(got, e, atol=1e-5, rtol=0)
    finally:
        for closing in (on, off):
            closing.close()
        older.close()


def test_bundle_graph_cut_and_backend_with_and_without_it(monkeypatch) -> None:
    """full.onnx of a bundle: the request stage normalises the sequences (LpNormalization) and works out TransAct's row
    share (Exp), reads no candidate input. The backend runs it once per request row when the row's chunks outnumber
    its slots (100 candidates: 8 chunks for 2 slots), not otherwise (16: 2 chunks), and either way gives the same
    probabilities as the backend without it and as eager PyTorch."""
    bundle_dir = small_bundle()
    model = onnx.load(bundle_dir / "full.onnx")
    stage = split_request_stage(model, CANDIDATE_INPUTS)
    assert stage is not None
    ops = set(_ops(stage.request))
    assert {"LpNormalization", "Exp"} <= ops and "Softmax" not in ops and "TopK" not in ops  # no candidate's attention
    assert not {i.name for i in stage.request.graph.input} & set(CANDIDATE_INPUTS)
    assert len(stage.candidates.graph.node) + stage.request_nodes >= len(model.graph.node)
    cut = Session(bundle_dir, device="cpu", threads=2, split=2, warmup=False)
    whole = Session(bundle_dir, device="cpu", threads=2, split=2, warmup=False, request_stage=False)
    eager = cut.bundle.verified.build_model()
    request_runs = []

    def counted(names, feed, run=cut.backend.request_session.run):  # noqa: ANN001, ANN202
        request_runs.append(feed["request_ts"].shape)
        return run(names, feed)

    monkeypatch.setattr(cut.backend.request_session, "run", counted)
    try:
        assert whole.backend.request_session is None and whole.backend.staged is None
        for n_cands, want_runs in ((300, [(1,)] * 3), (48, [])):  # three requests (rows) of 100, then of 16
            request_runs.clear()
            reqs = random_requests(small_config(), 31, n_cands=n_cands)
            got_all, ref_all = cut.score_many(reqs), whole.score_many(reqs)
            assert request_runs == want_runs
            for got, ref, e in zip(got_all, ref_all, eager_probs(eager, reqs), strict=True):
                np.testing.assert_allclose(got, ref, atol=1e-7, rtol=0)
                np.testing.assert_allclose(got, e, atol=1e-5, rtol=0)
    finally:
        cut.close()
        whole.close()


def _small_chunks(**options) -> Session:  # noqa: ANN003
    """The small bundle on two slots: 40 candidates make 4 chunks of 10, so the request and dense stages run, in
    groups of at least 20 candidates."""
    return Session(small_bundle(), device="cpu", threads=2, split=2, warmup=False, **options)


def test_dense_groups_follow_the_order_chunks_finish_in(monkeypatch) -> None:
    """The first chunk finishes last (held back until the other three are done): one group is chunks 2 and 3
    (candidates 10-29, the first to fill), the other chunks 1 and 4 (0-9 and 30-39, not next to each other), and
    every candidate still gets its own probabilities: those of the backend without the dense stage, and of eager
    PyTorch."""
    import threading

    on, off = _small_chunks(), _small_chunks(dense_stage=False)
    eager = on.bundle.verified.build_model()
    staged, dense = on.backend.staged, on.backend.dense
    (req,) = random_requests(small_config(), 41, 1, 40, ll=[180], rt=[25], imp=[12])
    others_done, lock, finished = threading.Event(), threading.Lock(), []

    def held_back(feed, run=staged.run):  # noqa: ANN001, ANN202
        first = np.array_equal(feed["cand_item"], req.cand_item[:10])
        if first:
            assert others_done.wait(60)
        out = run(feed)
        with lock:
            finished.append(int(first))
            if finished == [0, 0, 0]:
                others_done.set()
        return out

    groups: list[np.ndarray] = []

    def recorded(feed, run=dense.run):  # noqa: ANN001, ANN202
        groups.append(feed["cand_item"].copy())
        return run(feed)

    monkeypatch.setattr(staged, "run", held_back)
    monkeypatch.setattr(dense, "run", recorded)
    try:
        got, ref = on.score(req), off.score(req)
        assert finished == [0, 0, 0, 1]
        assert [len(g) for g in groups] == [20, 20]
        # The two dense runs may start in either order (each on whichever slot takes it); their groups may not.
        want = [req.cand_item[10:30], np.concatenate([req.cand_item[:10], req.cand_item[30:]])]
        if not np.array_equal(groups[0], want[0]):
            groups.reverse()
        for g, w in zip(groups, want, strict=True):
            np.testing.assert_array_equal(g, w)
        np.testing.assert_allclose(got, ref, atol=1e-7, rtol=0)
        np.testing.assert_allclose(got, eager_probs(eager, [req])[0], atol=1e-5, rtol=0)
    finally:
        on.close()
        off.close()


def test_cut_rows_by_hand() -> None:
    """Finished chunks [16, 32), [48, 64), [64, 70) (38 candidates, not all next to each other) in 3 parts: 12, 13
    and 13 candidates in their order, the first chunk cut after 12 and the second after 9, each piece with its own
    rows of the chunk's outputs."""
    chunks = [(a, z, [np.arange(a, z) * 10, np.arange(a, z) * -1.0]) for a, z in ((16, 32), (48, 64), (64, 70))]
    parts = cpu._cut_rows(chunks, 3)
    assert [[(a, z) for a, z, _ in part] for part in parts] == [[(16, 28)], [(28, 32), (48, 57)], [(57, 64), (64, 70)]]
    for part in parts:
        for a, z, (tens, minus) in part:
            np.testing.assert_array_equal(tens, np.arange(a, z) * 10)
            np.testing.assert_array_equal(minus, np.arange(a, z) * -1.0)
    assert [[(a, z) for a, z, _ in part] for part in cpu._cut_rows(chunks, 1)] == [[(16, 32), (48, 64), (64, 70)]]
    assert [sum(z - a for a, z, _ in part) for part in cpu._cut_rows(chunks, 38)] == [1] * 38


@pytest.mark.parametrize("split, n, last_part_rows", [(2, 150, None), (GUIDED_FROM_SLOTS, 100, 1)])
def test_a_rows_last_dense_group_runs_on_the_waiting_slots(monkeypatch, split: int, n: int,
                                                            last_part_rows: int | None) -> None:  # fmt: skip
    """After a row's last chunk the last dense group is cut into parts (LAST_PART_ROWS candidates or more, one per
    slot at most), and the parts run at the same time on different threads (each part's run waits, at most 60 s, until
    every part's has begun): on the pool (2 slots, 150 candidates: two parts of the last 75) and on a guided row's
    callback thread and the pool (8 slots, 100 candidates, parts of one candidate or more: the chunks that finish
    last are of any size, the smallest of 3). Every candidate is in one dense run, and the probabilities are eager
    PyTorch's."""
    import threading

    if last_part_rows is not None:
        monkeypatch.setattr(cpu, "LAST_PART_ROWS", last_part_rows)
    (req,) = random_requests(small_config(), 71, 1, n, ll=[150], rt=[30], imp=[9])
    session = _guided() if split == GUIDED_FROM_SLOTS else _small_chunks()
    last: list[np.ndarray] = []  # the last group's parts' candidates
    barrier: list[threading.Barrier] = []
    runs: list[tuple[np.ndarray, int]] = []

    def cut(chunks, parts, cut_rows=cpu._cut_rows):  # noqa: ANN001, ANN202
        out = cut_rows(chunks, parts)
        last.extend(np.concatenate([req.cand_item[a:z] for a, z, _ in part]) for part in out)
        barrier.append(threading.Barrier(parts, timeout=60))
        return out

    def dense(feed, run=session.backend.dense.run):  # noqa: ANN001, ANN202
        runs.append((feed["cand_item"].copy(), threading.get_ident()))
        if any(np.array_equal(feed["cand_item"], part) for part in last):
            barrier[0].wait()
        return run(feed)

    monkeypatch.setattr(cpu, "_cut_rows", cut)
    monkeypatch.setattr(session.backend.dense, "run", dense)
    try:
        got = session.score(req)
        eager = session.bundle.verified.build_model()
    finally:
        session.close()
    assert session.backend.guided == (split >= GUIDED_FROM_SLOTS) and len(barrier) == 1
    sizes = [len(p) for p in last]
    assert len(sizes) > 1 and max(sizes) - min(sizes) <= 1 and min(sizes) >= cpu.LAST_PART_ROWS
    threads = {t for c, t in runs if any(np.array_equal(c, part) for part in last)}
    assert len(threads) == len(last)
    assert sorted(row.tobytes() for c, _ in runs for row in c) == sorted(row.tobytes() for row in req.cand_item)
    np.testing.assert_allclose(got, eager_probs(eager, [req])[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("where", ["chunk", "dense"])
def test_a_failed_run_in_a_row_reaches_the_caller(monkeypatch, where: str) -> None:
    """A chunk's run (the third) or a dense group's run that fails: the request raises that error, once every chunk
    of the row is done, and the backend serves the next request as before."""
    session = _small_chunks()
    slots = session.backend.staged if where == "chunk" else session.backend.dense
    calls: list[int] = []

    def failing(feed, run=slots.run):  # noqa: ANN001, ANN202
        calls.append(len(feed["cand_request"]))
        if len(calls) == 3 or where == "dense":
            raise RuntimeError(f"{where} run failed")
        return run(feed)

    reqs = random_requests(small_config(), 43, 2, 80, ll=[150, 20], rt=[30, 2], imp=[9, 0])
    _fails_then_recovers(session, monkeypatch, reqs, lambda: monkeypatch.setattr(slots, "run", failing),
                         f"{where} run failed")  # fmt: skip


def _fails_then_recovers(session: Session, monkeypatch, reqs: list, break_it, message: str) -> None:  # noqa: ANN001
    """Score ``reqs``, break the backend (``break_it``), check that the first request raises ``message``, mend it and
    check that every request scores as before; the session is closed afterwards."""
    try:
        good = [session.score(r) for r in reqs]
        break_it()
        with pytest.raises(RuntimeError, match=message):
            session.score(reqs[0])
        monkeypatch.undo()
        for r, want in zip(reqs, good, strict=True):
            np.testing.assert_array_equal(session.score(r), want)
    finally:
        session.close()


@pytest.mark.parametrize("threads,split,max_chunk", [(2, 2, 12), (2, 2, 16), (3, 3, 8), (1, 1, 12), (4, 2, 12),
                                                     (8, 8, 12)])
def test_warmup_plans_the_chunk_sizes_at_the_longest_sequences(monkeypatch, threads: int, split: int,
                                                               max_chunk: int) -> None:  # fmt: skip
    """ONNX Runtime reuses a memory plan only for runs of exactly its sizes, filed under a key in which the candidate
    count cancels. With one thread per chunk (a candidate-stage session per chunk size) the warm-up runs every size
    the staged chunks take (MIN_CHUNK to max_chunk, or 1 to max_chunk for guided chunks), each first at the longest
    sequences; with several threads per chunk (one session for every size) its first staged run is a chunk of
    ``max_chunk`` at the longest sequences, and no later warm-up run is larger. Worked out for (2, 2, 12): the old
    order's first staged run was a chunk of 8 (two users of 32 candidates, four chunks each)."""
    session = Session(small_bundle(), device="cpu", threads=threads, split=split, max_chunk=max_chunk, warmup=False)
    backend = session.backend
    seen: dict[str, list[tuple[int, int]]] = {"whole": [], "staged": []}
    for name in seen:
        slots = getattr(backend, name)

        def recorded(feed, run=slots.run, name=name):  # noqa: ANN001, ANN202
            request_size = sum(v.size for k, v in feed.items() if k not in CANDIDATE_INPUTS)
            seen[name].append((len(feed["cand_request"]), request_size))
            return run(feed)

        monkeypatch.setattr(slots, "run", recorded)
    try:
        backend.warmup(session.limits)
    finally:
        session.close()
    longest = max(size for _, size in seen["staged"])
    firsts = {n: size for n, size in reversed(seen["staged"])}  # each chunk size's first run
    if threads // split == 1:  # guided chunks (from GUIDED_FROM_SLOTS slots) end in a chunk of whatever is left
        smallest = 1 if split >= GUIDED_FROM_SLOTS else min(MIN_CHUNK, max_chunk)
        assert set(range(smallest, max_chunk + 1)) <= set(firsts)
        assert all(size == longest for size in firsts.values())
    else:
        assert seen["staged"][0] == (max_chunk, longest)
        assert all(n <= max_chunk for n, _ in seen["staged"])
    # the whole graph keys its plans by the candidate count: each count's first run at the longest sequences
    longest = max(size for _, size in seen["whole"])
    firsts = {n: size for n, size in reversed(seen["whole"])}
    assert all(size == longest for size in firsts.values())


def test_each_chunk_size_runs_in_a_session_of_its_own(monkeypatch) -> None:
    """With one thread per chunk, chunks of different sizes run in different ONNX Runtime sessions of the candidate
    stage (each keeps the memory plan of its size), one session per size; the probabilities are eager PyTorch's."""
    session = Session(small_bundle(), device="cpu", threads=2, split=2, warmup=False)
    run, used = ort.InferenceSession.run, []

    def recorded(self, names, feed, *args):  # noqa: ANN001, ANN202
        if list(names) == list(SEQUENCE_OUTPUTS):  # the candidate stage's runs
            used.append((len(feed["cand_request"]), id(self)))
        return run(self, names, feed, *args)

    monkeypatch.setattr(ort.InferenceSession, "run", recorded)
    try:
        (req,) = random_requests(small_config(), 47, 1, 100, ll=[150], rt=[30], imp=[9])  # 8 chunks of 12 or 13
        got = session.score(req)
        eager = session.bundle.verified.build_model()
    finally:
        session.close()
    sizes = {n for n, _ in used}
    assert sizes == {12, 13} and len(used) == 8
    by_size = {n: {s for m, s in used if m == n} for n in sizes}
    assert all(len(ids) == 1 for ids in by_size.values())
    assert by_size[12] != by_size[13]
    np.testing.assert_allclose(got, eager_probs(eager, [req])[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("split", [2, MALLOC_FROM_SLOTS])
def test_many_side_by_side_chunks_allocate_without_the_arena(split: int) -> None:
    """From MALLOC_FROM_SLOTS one-thread slots the candidate stage's sessions have ONNX Runtime's arena off (its one
    lock would be taken by every concurrent run); below, and for the other sessions, the shared arena stays."""
    session = Session(small_bundle(), device="cpu", threads=split, split=split, warmup=False)
    try:
        backend = session.backend
        (req,) = random_requests(small_config(), 53, 1, 40 * split, ll=[150], rt=[30], imp=[9])
        session.score(req)  # more chunks than slots: the candidate stage runs
        staged = [s.get_session_options().enable_cpu_mem_arena for s in backend.staged.sessions]
        others = [s.get_session_options().enable_cpu_mem_arena for s in [*backend.whole.sessions,
                                                                         *backend.dense.sessions]]  # fmt: skip
    finally:
        session.close()
    assert staged and all(on == (split < MALLOC_FROM_SLOTS) for on in staged)
    assert all(others)


@pytest.mark.parametrize("n", [40, 100])
def test_from_eight_slots_a_row_that_fills_them_runs_guided_chunks(monkeypatch, n: int) -> None:
    """From GUIDED_FROM_SLOTS slots a row whose even chunks fill every slot (40 candidates on 8: five of 8, too few;
    100: eight of 12-13) runs the request stage and then the candidate stage on exactly ``guided_bounds``' chunks
    (the pool takes them in any order); below that, ``chunk_bounds``' chunks as before (100 on 4 slots: eight, in
    turns, staged; 40: the whole graph on four of 10). The probabilities are eager PyTorch's either way."""
    assert GUIDED_FROM_SLOTS == 8
    (req,) = random_requests(small_config(), 53, 1, n, ll=[150], rt=[30], imp=[9])
    eager = None
    for split in (8, 4):
        session = Session(small_bundle(), device="cpu", threads=split, split=split, warmup=False)
        backend = session.backend
        runs: dict[str, list[int]] = {"whole": [], "staged": []}
        for name, got in runs.items():
            slots = getattr(backend, name)

            def counted(feed, run=slots.run, got=got):  # noqa: ANN001, ANN202
                got.append(len(feed["cand_request"]))
                return run(feed)

            monkeypatch.setattr(slots, "run", counted)
            if hasattr(slots, "start"):  # guided rows start their chunks with run_async

                def started(session, feed, *rest, start=slots.start, got=got):  # noqa: ANN001, ANN002, ANN202
                    got.append(len(feed["cand_request"]))
                    return start(session, feed, *rest)

                monkeypatch.setattr(slots, "start", started)
        try:
            probs = session.score(req)
            eager = eager or session.bundle.verified.build_model()
        finally:
            session.close()
        even = [z - a for a, z in chunk_bounds(n, split)]
        if split >= GUIDED_FROM_SLOTS and len(even) >= split:
            assert backend.guided and runs["whole"] == []
            assert sorted(runs["staged"]) == sorted(z - a for a, z in guided_bounds(n, split))
            assert len(runs["staged"]) == 16  # 100 on 8: 13, 11, 10, 9, 8, 7, 6, 5, 4 x 7, 3
        elif len(even) > split:  # several rounds of even chunks: staged, as before
            assert not backend.guided and runs["whole"] == [] and sorted(runs["staged"]) == sorted(even)
        else:
            assert sorted(runs["whole"]) == sorted(even) and runs["staged"] == []
        np.testing.assert_allclose(probs, eager_probs(eager, [req])[0], atol=1e-5, rtol=0)


def _guided() -> Session:
    """The small bundle on GUIDED_FROM_SLOTS one-thread slots: a row of 100 candidates (eight even chunks of 12-13)
    runs guided chunks, started with run_async."""
    return Session(small_bundle(), device="cpu", threads=GUIDED_FROM_SLOTS, split=GUIDED_FROM_SLOTS, warmup=False)


def test_guided_rows_run_each_slot_on_a_session_of_its_own() -> None:
    """From GUIDED_FROM_SLOTS slots the candidate stage is a session per slot, each with a third per-candidate input
    (CHUNK_ROWS) so that it keeps a memory plan per chunk size; the calling thread starts one chunk on every slot's
    session, each finished run's callback the slot's next: every guided chunk runs once, no session runs two at a
    time, and the probabilities are eager PyTorch's."""
    import threading

    session = _guided()
    slots = session.backend.staged
    lock, running, most, seen = threading.Lock(), {}, [0], []

    def start(sess, feed, callback, data, start=slots.start):  # noqa: ANN001, ANN202
        with lock:
            running[id(sess)] = running.get(id(sess), 0) + 1
            most[0] = max(most[0], running[id(sess)])
            seen.append((id(sess), len(feed["cand_request"])))

        def done(outputs, data_, error):  # noqa: ANN001, ANN202
            with lock:
                running[id(sess)] -= 1
            callback(outputs, data_, error)

        return start(sess, feed, done, data)

    (req,) = random_requests(small_config(), 61, 1, 100, ll=[150], rt=[30], imp=[9])
    try:
        assert isinstance(slots, AsyncSlots) and len(slots.sessions) == GUIDED_FROM_SLOTS
        assert all(CHUNK_ROWS in [i.name for i in s.get_inputs()] and CHUNK_ROWS not in slots.inputs
                   for s in slots.sessions)  # fmt: skip
        slots.start = start
        got = session.score(req)
        eager = session.bundle.verified.build_model()
    finally:
        session.close()
    assert most[0] == 1 and {s for s, _ in seen} == {id(s) for s in slots.sessions}
    assert sorted(n for _, n in seen) == sorted(z - a for a, z in guided_bounds(100, GUIDED_FROM_SLOTS))
    np.testing.assert_allclose(got, eager_probs(eager, [req])[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("where", ["start", "callback", "dense"])
def test_a_failed_run_in_a_guided_row_reaches_the_caller(monkeypatch, where: str) -> None:
    """A guided row's third chunk that cannot start, or whose run reports an error to its callback, or a dense
    group's run that fails (on a callback's thread): the request raises that error once nothing of the row runs, and
    the backend serves the next requests as before."""
    session = _guided()
    backend = session.backend
    slots, calls = backend.staged, []

    def failing_start(sess, feed, callback, data, start=slots.start):  # noqa: ANN001, ANN202
        calls.append(len(feed["cand_request"]))
        if len(calls) == 3 and where == "start":
            raise RuntimeError("start run failed")
        if len(calls) == 3:
            callback = functools.partial(reported, callback)
        return start(sess, feed, callback, data)

    def reported(callback, outputs, data, error):  # noqa: ANN001, ANN202
        callback(outputs, data, "callback run failed")

    def failing_dense(feed):  # noqa: ANN001, ANN202
        raise RuntimeError("dense run failed")

    def break_it() -> None:
        if where == "dense":
            monkeypatch.setattr(backend.dense, "run", failing_dense)
        else:
            monkeypatch.setattr(slots, "start", failing_start)

    reqs = random_requests(small_config(), 67, 2, 200, ll=[150, 20], rt=[30, 2], imp=[9, 0])  # 100 each
    _fails_then_recovers(session, monkeypatch, reqs, break_it, f"{where} run failed")
