"""The model in a child process (`transact serve`'s default): the byte framing between the processes,
scores equal to the in-process Session and to eager PyTorch, a failing batch that leaves the child
serving, a child that is gone, shutdown, and a tampered bundle refused with the child's message."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_runtime_session import eager_probs, random_requests, small_bundle

from runtime.model_process import ModelProcessError, ProcessSession, pack, pack_requests, unpack, unpack_requests
from runtime.session import SEQUENCES, Session
from transact.errors import TransactError


@pytest.fixture(scope="module")
def proc_session():
    s = ProcessSession(str(small_bundle()), device="cpu", threads=1)
    yield s
    s.close()


@pytest.fixture(scope="module")
def local() -> Session:
    return Session(small_bundle(), device="cpu", threads=1)


def test_framing_round_trips_every_array_bit_for_bit(local: Session) -> None:
    reqs = random_requests(local.config, 11, ll=[300, 0, 5], rt=[0, 17, 2], imp=[9, 1, 0])
    back = unpack_requests(pack_requests(reqs))
    assert len(back) == len(reqs)
    for a, b in zip(reqs, back, strict=True):
        assert (a.request_ts, a.surface, a.hour) == (b.request_ts, b.surface, b.hour)
        for name in ("user_dense", "cand_item", "item_dense"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)
        for s in SEQUENCES:
            for f in dataclasses.fields(getattr(a, s)):
                x, y = getattr(getattr(a, s), f.name), getattr(getattr(b, s), f.name)
                assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)
    meta, arrays = unpack(pack({"k": [1, "two"]}, [np.arange(6, dtype=np.int16).reshape(2, 3), np.zeros((0, 4))]))
    assert meta == {"k": [1, "two"]}
    assert arrays[0].tolist() == [[0, 1, 2], [3, 4, 5]] and arrays[1].shape == (0, 4)


def test_child_scores_equal_the_in_process_session_and_eager(proc_session: ProcessSession, local: Session) -> None:
    assert proc_session.config == local.config and proc_session.limits == local.limits
    assert proc_session.backend_name == local.backend_name == "cpu"
    assert proc_session.pid is not None
    eager = local.bundle.verified.build_model()
    for seed in range(3):
        reqs = random_requests(local.config, seed)
        got = proc_session.run(reqs)
        want = local.run(reqs)
        assert (got.rows, got.candidates) == (want.rows, want.candidates) and got.seconds > 0
        for g, w, e in zip(got.outputs, want.outputs, eager_probs(eager, reqs), strict=True):
            np.testing.assert_allclose(g.probabilities, w.probabilities, atol=1e-6)
            np.testing.assert_allclose(g.scores, w.scores, atol=1e-6)
            np.testing.assert_allclose(g.probabilities, e, atol=1e-5)


def test_a_failing_batch_is_reported_and_the_child_keeps_serving(proc_session: ProcessSession, local: Session) -> None:
    bad = random_requests(local.config, 3)
    bad[1].user_dense = np.full_like(bad[1].user_dense, np.nan)  # refused by the child's validation
    with pytest.raises(ModelProcessError, match="user_dense"):
        proc_session.run(bad)
    good = random_requests(local.config, 4)
    np.testing.assert_allclose(proc_session.run(good).outputs[0].probabilities,
                               local.run(good).outputs[0].probabilities, atol=1e-6)  # fmt: skip


def test_close_stops_the_child_and_later_batches_fail_cleanly(local: Session) -> None:
    s = ProcessSession(str(small_bundle()), device="cpu", threads=1)
    reqs = random_requests(local.config, 5)
    s.run(reqs)
    s.close()
    assert not s._proc.is_alive() and s._proc.exitcode == 0
    with pytest.raises(ModelProcessError, match="exited"):
        s.run(reqs)


def test_a_killed_child_is_an_error_not_a_hang(local: Session) -> None:
    s = ProcessSession(str(small_bundle()), device="cpu", threads=1)
    s._proc.kill()
    s._proc.join(10)
    with pytest.raises(ModelProcessError, match="exited"):
        s.run(random_requests(local.config, 6))
    s.close()


def test_a_tampered_bundle_is_refused_with_the_childs_message(tmp_path: Path) -> None:
    bad = tmp_path / "bundle"
    shutil.copytree(small_bundle(), bad)
    data = bytearray((bad / "weights.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (bad / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(TransactError, match="sha256") as info:
        ProcessSession(str(bad), device="cpu")
    assert "weights.safetensors" in str(info.value) and info.value.exit_code == 2
