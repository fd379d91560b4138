"""Nearest-neighbour selection: the reference vs a brute-force float64 computation, and the model's
vectorised selection vs the reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from transact.model import select_recent_nn
from transact.selection import nn_select_reference, normalize_rows


def brute_force(seq, starts, lengths, cand, cand_user, k):
    """Plain Python: cosine per token, order by (score desc, position desc), first k."""
    out_idx, out_score = [], []
    for i in range(cand.shape[0]):
        c = [float(v) for v in cand[i]]
        cn = math.sqrt(sum(v * v for v in c)) or 1.0
        u = int(cand_user[i])
        rows = []
        for p in range(int(lengths[u])):
            q = [float(v) for v in seq[int(starts[u]) + p]]
            qn = math.sqrt(sum(v * v for v in q))
            s = 0.0 if qn == 0 else sum(a * b for a, b in zip(q, c, strict=True)) / (qn * cn)
            rows.append((s, p))
        rows.sort(key=lambda t: (-t[0], -t[1]))
        rows = rows[:k]
        out_idx.append([p for _, p in rows] + [-1] * (k - len(rows)))
        out_score.append([s for s, _ in rows] + [float("-inf")] * (k - len(rows)))
    return torch.tensor(out_idx), torch.tensor(out_score, dtype=torch.float64)


def jagged_case(lengths, n_cand, seed, dup=True, d=32):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    seq = torch.randint(-127, 128, (max(total, 1), d), generator=g).to(torch.int8)
    starts = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)[:-1].tolist()), dtype=torch.int64)
    if dup and total > 4:  # exact ties: copies of one row at several positions of the first user
        src = seq[int(starts[0])].clone()
        for p in range(1, min(lengths[0], 6), 2):
            seq[int(starts[0]) + p] = src
        seq[int(starts[0]) + min(lengths[0], 7) - 1] = 0  # a zero vector scores 0
    cand_user = torch.randint(0, len(lengths), (n_cand,), generator=g)
    cand = torch.randn(n_cand, d, generator=g)
    # Make some candidates point straight at the duplicated row, so the tie is at the top.
    cand[cand_user == 0] = seq[int(starts[0])].float() + 0.01 * cand[cand_user == 0]
    return seq, starts, torch.tensor(lengths, dtype=torch.int64), cand, cand_user


@pytest.mark.parametrize(
    "lengths,k",
    [([37, 0, 5, 64], 8), ([1], 4), ([9, 9], 9), ([50, 3], 16), ([200], 96), ([0, 0], 3)],
)
def test_reference_matches_brute_force_including_ties(lengths, k):
    seq, starts, lens, cand, cand_user = jagged_case(lengths, 12, seed=sum(lengths) + k)
    idx, score = nn_select_reference(seq, starts, lens, cand, cand_user, k)
    bidx, bscore = brute_force(seq, starts, lens, cand, cand_user, k)
    assert torch.equal(idx, bidx)
    finite = torch.isfinite(bscore)
    assert torch.equal(finite, torch.isfinite(score))
    assert torch.allclose(score[finite], bscore[finite], atol=1e-12)


def test_ties_prefer_the_more_recent_action():
    seq = torch.tensor([[3, 4], [1, 0], [3, 4], [3, 4]], dtype=torch.int8)
    idx, score = nn_select_reference(seq, torch.tensor([0]), torch.tensor([4]), torch.tensor([[3.0, 4.0]]),
                                     torch.tensor([0]), 3)  # fmt: skip
    assert idx.tolist() == [[3, 2, 0]]
    assert torch.allclose(score, torch.ones(1, 3, dtype=torch.float64))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_model_selection_matches_reference_as_a_set(seed):
    g = torch.Generator().manual_seed(seed)
    r, length, n, k = 3, 70, 10, 12
    items = torch.randint(-127, 128, (r, length, 32), generator=g).to(torch.int8)
    items[0, 10] = items[0, 20] = items[0, 30]  # exact ties
    count = torch.tensor([70, 5, 0])
    cand_request = torch.arange(n) % r
    cand = torch.randn(n, 32, generator=g)
    cand[0] = items[0, 30].float()
    got = select_recent_nn(items, count, normalize_rows(cand), cand_request, k)
    ridx, _ = nn_select_reference(items.reshape(-1, 32), torch.arange(r) * length, count, cand, cand_request, k)
    for i in range(n):
        want = sorted(p for p in ridx[i].tolist() if p >= 0)
        assert got[i].tolist() == want + [-1] * (k - len(want))
    assert got[0, :3].tolist() != [-1, -1, -1] and 30 in got[0].tolist() and 20 in got[0].tolist()


def test_normalize_rows_keeps_zero_rows_finite():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    y = normalize_rows(x)
    assert torch.equal(y[0], torch.zeros(2)) and torch.allclose(y[1], torch.tensor([0.6, 0.8]))



def test_normalize_codes_exported_gives_the_same_bits(tmp_path) -> None:  # noqa: ANN001
    """normalize_codes exported as the model's graphs export it (one LpNormalization node) and run in ONNX Runtime,
    against normalize_rows on the same int8 codes: bit for bit, zero rows and the extreme codes included (the
    selection's ties rest on it)."""
    import onnx
    import onnxruntime as ort

    from export.manifest import DEFAULT_OPSET
    from export.onnx_export import MODEL_TRANSLATIONS, _export
    from transact.selection import normalize_codes

    class Normalize(torch.nn.Module):
        def forward(self, codes: torch.Tensor) -> torch.Tensor:
            return normalize_codes(codes)

    g = torch.Generator().manual_seed(5)
    codes = torch.randint(-128, 128, (3, 500, 32), dtype=torch.int8, generator=g)
    codes[0, 7] = 0
    codes[1, 3] = -128
    codes[2, 9] = 127
    codes[2, 10] = 0
    codes[2, 10, 4] = -1
    dims = ({0: torch.export.Dim("R"), 1: torch.export.Dim("L")},)
    _export(Normalize().eval(), (codes[:2, :50],), tmp_path / "n.onnx", ["codes"], ["normalized"], dims, DEFAULT_OPSET,
            MODEL_TRANSLATIONS)  # fmt: skip
    graph = onnx.load(tmp_path / "n.onnx")
    assert [n.op_type for n in graph.graph.node].count("LpNormalization") == 1
    got = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {graph.graph.input[0].name: codes.numpy()})[0]  # fmt: skip
    want = normalize_rows(codes.to(torch.float32)).numpy()
    assert np.array_equal(got, want) and torch.equal(normalize_codes(codes), torch.from_numpy(want))
    assert not got[0, 7].any() and np.isfinite(got).all()
    with pytest.raises(ValueError, match="int8"):
        normalize_codes(codes.to(torch.int16))
