"""The export's first TransAct layer: ``candidate_attention`` in ONNX Runtime (each request row's share of the
attention worked out once for all its candidates, ``_candidate_attention_onnx``) against PyTorch's own
``nn.MultiheadAttention`` in float64, and the fallback that keeps it exact where its exponentials underflow."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.export import Dim

import export.onnx_export as onnx_export
from export.onnx_export import TRANSLATIONS, _export, candidate_attention

TOKEN_DIM, CAND_DIM, SEQ = 8, 4, 9
EMBED = TOKEN_DIM + CAND_DIM


class Probe(nn.Module):
    """The op alone, as ``transact_forward_rows`` calls it, with the attention weights of ``attn``."""

    def __init__(self, attn: nn.MultiheadAttention) -> None:
        super().__init__()
        self.attn = attn

    def forward(self, tokens: torch.Tensor, cand: torch.Tensor, cand_request: torch.Tensor, keep: torch.Tensor):  # noqa: ANN201
        x = torch.cat([tokens[cand_request], cand.unsqueeze(1).expand(-1, tokens.shape[1], -1)], dim=-1)
        a = self.attn
        return candidate_attention(x, tokens, cand, cand_request, keep, a.in_proj_weight.t(), a.in_proj_bias,
                                   a.num_heads)  # fmt: skip


def random_attention(heads: int, seed: int, qk_scale: float = 1.0) -> nn.MultiheadAttention:
    torch.manual_seed(seed)
    attn = nn.MultiheadAttention(EMBED, heads, batch_first=True).eval()
    with torch.no_grad():
        attn.in_proj_weight.copy_(torch.randn_like(attn.in_proj_weight) * 0.4)
        attn.in_proj_weight[: 2 * EMBED] *= qk_scale
        attn.in_proj_bias.copy_(torch.randn_like(attn.in_proj_bias) * 0.3)
    return attn


def export_probe(attn: nn.MultiheadAttention, folder: Path) -> ort.InferenceSession:
    r, n = Dim("R"), Dim("N")
    args = (torch.randn(2, SEQ, TOKEN_DIM), torch.randn(3, CAND_DIM), torch.tensor([1, 0, 1]),
            torch.ones(2, SEQ, dtype=torch.int32))  # fmt: skip
    path = folder / "probe.onnx"
    with torch.no_grad():
        _export(Probe(attn), args, path, ["tokens", "cand", "cand_request", "keep"], ["out"],
                ({0: r}, {0: n}, {0: n}, {0: r}), 18, TRANSLATIONS)  # fmt: skip
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def inputs(rows: int, cands: int, seed: int) -> dict[str, np.ndarray]:
    g = np.random.default_rng(seed)
    keep = (g.random((rows, SEQ)) > 0.3).astype(np.int32)
    keep[:, 0] = 1  # slot 0 is never masked (TransAct's key-padding mask)
    return {"tokens": g.standard_normal((rows, SEQ, TOKEN_DIM)).astype(np.float32),
            "cand": g.standard_normal((cands, CAND_DIM)).astype(np.float32),
            "cand_request": g.integers(0, rows, cands).astype(np.int64), "keep": keep}  # fmt: skip


def reference(attn: nn.MultiheadAttention, feed: dict[str, np.ndarray]) -> np.ndarray:
    """PyTorch's module in float64 on each candidate's whole sequence, output projection set to identity."""
    ref = nn.MultiheadAttention(EMBED, attn.num_heads, batch_first=True).double().eval()
    with torch.no_grad():
        ref.in_proj_weight.copy_(attn.in_proj_weight)
        ref.in_proj_bias.copy_(attn.in_proj_bias)
        ref.out_proj.weight.copy_(torch.eye(EMBED))
        ref.out_proj.bias.zero_()
        rows = torch.from_numpy(feed["cand_request"])
        tokens = torch.from_numpy(feed["tokens"]).double()[rows]
        cand = torch.from_numpy(feed["cand"]).double().unsqueeze(1).expand(-1, SEQ, -1)
        x = torch.cat([tokens, cand], dim=-1)
        pad = torch.from_numpy(feed["keep"])[rows] == 0
        return ref(x, x, x, key_padding_mask=pad, need_weights=False)[0].numpy()


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.parametrize("heads", [1, 2, 3])
def test_factored_attention_matches_the_module_in_float64(heads: int, tmp_path: Path) -> None:
    """One row, several rows with candidates in mixed order, one candidate; 1-3 heads; random key padding."""
    attn = random_attention(heads, seed=heads)
    session = export_probe(attn, tmp_path)
    for rows, cands, seed in [(1, 6, 0), (3, 7, 1), (2, 1, 2), (1, 1, 3)]:
        feed = inputs(rows, cands, seed)
        got = session.run(None, feed)[0]
        assert got.shape == (cands, SEQ, EMBED)
        assert rel_err(got, reference(attn, feed)) < 2e-6


def test_underflow_falls_back_to_the_plain_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Scores spread over hundreds of nats: where a row's and a candidate's best keys differ, the product of the
    two shifted exponentials underflows. Candidates with near-zero embeddings have flat candidate scores and
    stay on the factored path, the others need the plain node: the graph without the fallback gets the former
    right and returns NaN or far-off rows for the latter; with it, every candidate is the module's."""
    attn = random_attention(2, seed=7, qk_scale=40.0)
    feed = inputs(2, 10, 5)
    feed["cand"][::2] *= 1e-4
    want = reference(attn, feed)
    guarded = export_probe(attn, tmp_path).run(None, feed)[0]
    assert rel_err(guarded, want) < 2e-6
    monkeypatch.setattr(onnx_export, "FACTORED_MIN_DENOMINATOR", 0.0)
    (tmp_path / "bare").mkdir()
    bare = export_probe(attn, tmp_path / "bare").run(None, feed)[0]
    ok = [np.isfinite(b).all() and rel_err(b, w) < 2e-6 for b, w in zip(bare, want, strict=True)]
    assert all(ok[::2]) and not any(ok[1::2]), ok
