"""The hybrid (cuda) backend on a GPU against the eager model: probabilities within 2e-3 abs, identical
selections except exact ties, at N = 1, 7, 256 and ll up to 16,000; graphs vs eager launches; dense on
the GPU; batched requests with de-duplication.

    pytest -m gpu tests/gpu
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from runtime.batching import plan_batch  # noqa: E402
from runtime.session import Request, Session  # noqa: E402
from transact.batch import Batch  # noqa: E402
from transact.config import ModelConfig  # noqa: E402
from transact.data.random_batch import random_batch  # noqa: E402
from transact.model import RankingModel, transformer_fastpath  # noqa: E402
from transact.selection import normalize_rows  # noqa: E402

TOL = 2e-3
SHAPES = [(1, 16, 64), (1, 256, 16000)]  # a small warm-up; other buckets are captured on first use


@pytest.fixture(scope="module")
def bundle() -> Path:
    from export.bundle import export_bundle
    from transact.checkpoint import save_checkpoint

    if os.environ.get("TRANSACT_TEST_BUNDLE"):  # a default-config bundle exported beforehand
        return Path(os.environ["TRANSACT_TEST_BUNDLE"])
    root = Path(tempfile.mkdtemp(prefix="transact-gpu-"))
    torch.manual_seed(0)
    save_checkpoint(root / "ckpt", RankingModel(ModelConfig()).eval())  # default config: max_ll 16,000
    return export_bundle(root / "ckpt", root / "bundle", check=False)


@pytest.fixture(scope="module")
def hybrid(bundle: Path) -> Session:
    s = Session(bundle, device="cuda", warmup_shapes=SHAPES)
    assert s.backend_name == "cuda"
    return s


@pytest.fixture(scope="module")
def eager(hybrid: Session) -> RankingModel:
    return hybrid.bundle.verified.build_model().cuda()


def eager_run(model: RankingModel, plan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    named = plan.padded_inputs()
    batch = Batch.from_named({k: torch.from_numpy(v) for k, v in named.items()}).to("cuda")
    with torch.no_grad(), transformer_fastpath(False):
        out = model.forward_with_aux(batch)
    sel = out.v2_selection
    pos = torch.where(sel.valid, sel.pos, -1).cpu().numpy()
    group = torch.where(sel.valid, sel.group, -1).cpu().numpy()
    return out.probs.cpu().numpy(), pos, group


def token_scores(plan, row_of: np.ndarray, cand: np.ndarray, group: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """float64 cosine of each selected token with its candidate (NaN for empty slots)."""
    out = np.full(pos.shape, np.nan)
    c = normalize_rows(torch.from_numpy(cand).double()).numpy()
    for i in range(pos.shape[0]):
        user = plan.users[row_of[i]]
        for j in range(pos.shape[1]):
            if pos[i, j] < 0:
                continue
            seq = getattr(user, ("ll", "rt", "imp")[group[i, j]])
            item = normalize_rows(torch.from_numpy(seq.item[pos[i, j]]).double()).numpy()
            out[i, j] = float(item @ c[i])
    return out


def check_selection(plan, got_pos, got_group, want_pos, want_group) -> None:
    """Identical selections, except that tokens with exactly equal scores may be swapped."""
    same = (got_pos == want_pos).all(1) & (got_group == want_group).all(1)
    if same.all():
        return
    rows = np.nonzero(~same)[0]
    cand = np.concatenate([r.cand_item for r in plan.requests])[rows]
    row_of = plan.cand_request()[rows]
    a = token_scores(plan, row_of, cand, got_group[rows], got_pos[rows])
    b = token_scores(plan, row_of, cand, want_group[rows], want_pos[rows])
    for i in range(len(rows)):
        sa, sb = np.sort(a[i][~np.isnan(a[i])]), np.sort(b[i][~np.isnan(b[i])])
        assert sa.shape == sb.shape, f"candidate {rows[i]}: different numbers of selected tokens"
        np.testing.assert_allclose(sa, sb, atol=1e-6, err_msg=f"candidate {rows[i]}: selections differ beyond ties")


@pytest.mark.parametrize("n", [1, 7, 256])
@pytest.mark.parametrize("ll", [0, 5, 200, 3000, 16000])
def test_hybrid_matches_eager(hybrid: Session, eager: RankingModel, n: int, ll: int) -> None:
    b = random_batch(hybrid.config, 1, n, ll=ll, rt=100, imp=100, seed=n * 7 + ll, future=2)
    plan = plan_batch([Request.from_batch(b, 0)])
    probs, _ = hybrid.backend.run(plan)
    want, pos, group = eager_run(eager, plan)
    assert np.abs(probs - want).max() <= TOL
    sel = hybrid.backend.sequence_outputs(plan)
    check_selection(plan, sel["selection_pos"], sel["selection_group"], pos, group)


def test_batched_users_with_dedup(hybrid: Session, eager: RankingModel) -> None:
    b = random_batch(hybrid.config, 3, 30, ll=[16000, 0, 777], rt=[100, 7, 0], imp=[50, 0, 100], seed=3, future=2)
    reqs = [Request.from_batch(b, r) for r in range(3)]
    reqs.append(reqs[0])  # the same user twice: one request row
    res = hybrid.run(reqs)
    assert res.rows == 3
    for req, out in zip(reqs, res.outputs, strict=True):
        want, _, _ = eager_run(eager, plan_batch([req]))
        assert np.abs(out.probabilities - want).max() <= TOL


def test_graphs_eager_launches_and_dense_on_cpu_agree(bundle: Path, hybrid: Session) -> None:
    b = random_batch(hybrid.config, 1, 256, ll=16000, rt=100, imp=100, seed=11)
    req = Request.from_batch(b, 0)
    ref = hybrid.score(req)
    assert hybrid.backend.stats["graph_failures"] == 0 and hybrid.backend.stats["graphs_captured"] >= 1
    no_graphs = Session(bundle, device="cuda", cuda_graphs=False, warmup_shapes=SHAPES)
    np.testing.assert_allclose(no_graphs.score(req), ref, atol=1e-5)
    assert hybrid.backend.dense_on == "gpu" and hybrid.backend.options.tf32  # the defaults
    # fp32 products on the GPU agree with dense.onnx in ONNX Runtime to fp32 accuracy; TF32 within the fp16 path's.
    fp32 = Session(bundle, device="cuda", tf32=False, warmup_shapes=SHAPES)
    dense_cpu = Session(bundle, device="cuda", dense_on="cpu", tf32=False, warmup_shapes=SHAPES)
    np.testing.assert_allclose(dense_cpu.score(req), fp32.score(req), atol=1e-4)
    np.testing.assert_allclose(fp32.score(req), ref, atol=TOL)


def test_repeated_requests_reuse_buffers_without_leaking_state(hybrid: Session) -> None:
    """A short request after a long one in the same bucket must not see the long one's tokens."""
    long = Request.from_batch(random_batch(hybrid.config, 1, 16, ll=16000, seed=21), 0)
    short = Request.from_batch(random_batch(hybrid.config, 1, 16, ll=9000, seed=22), 0)
    first = hybrid.score(short)
    hybrid.score(long)
    np.testing.assert_array_equal(hybrid.score(short), first)


@pytest.mark.parametrize("v1, v2", [(True, False), (False, True), (False, False)], ids=["v1-only", "v2-only", "none"])
def test_one_or_no_sequence_module_with_graphs(v1: bool, v2: bool, tmp_path: Path) -> None:
    """The ablation's variants through the captured graphs (a stage with nothing to do captures no work)."""
    from export.bundle import export_bundle
    from transact.checkpoint import save_checkpoint
    from transact.config import TransActConfig, TransActV2Config

    cfg = ModelConfig(max_ll=2048, transact=TransActConfig(enabled=v1), transact_v2=TransActV2Config(enabled=v2))
    torch.manual_seed(5)
    model = RankingModel(cfg).eval()
    save_checkpoint(tmp_path / "ckpt", model)
    bundle = export_bundle(tmp_path / "ckpt", tmp_path / "bundle", check=False)
    session = Session(bundle, device="cuda", warmup_shapes=[(1, 64, 2048)])
    b = random_batch(cfg, 1, 64, ll=2000, rt=100, imp=100, seed=9, future=2)
    plan = plan_batch([Request.from_batch(b, 0)])
    probs, _ = session.backend.run(plan)
    batch = Batch.from_named({k: torch.from_numpy(v) for k, v in plan.padded_inputs().items()}).to("cuda")
    with torch.no_grad(), transformer_fastpath(False):
        want = model.cuda()(batch).cpu().numpy()
    assert np.abs(probs - want).max() <= TOL
    assert session.backend.stats["graph_failures"] == 0 and session.backend.stats["graphs_captured"] >= 1
