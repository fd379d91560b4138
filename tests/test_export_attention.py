"""The export's self-attention (``_self_attention_onnx``: plain products per head, causal query blocks, the
output projection folded into the values of one-head layers) in ONNX Runtime against PyTorch's own
``nn.TransformerEncoder`` in float64."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.export import Dim

from export.onnx_export import TRANSLATIONS, _encoder_layers, _export, causal_block_ends
from transact.model import transformer_fastpath

EMBED, SEQ = 12, 10


class Probe(nn.Module):
    """The encoder as the export traces it: keys ``keep`` (B, S) int32."""

    def __init__(self, encoder: nn.TransformerEncoder, causal: bool, keys_prefix: bool) -> None:
        super().__init__()
        self.encoder, self.causal, self.keys_prefix = encoder, causal, keys_prefix

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        return _encoder_layers(self.encoder, x, keep, self.causal, keys_prefix=self.keys_prefix)


def random_encoder(heads: int, seed: int) -> nn.TransformerEncoder:
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(EMBED, heads, dim_feedforward=8, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    with torch.no_grad():
        for p in encoder.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return encoder


def export_probe(probe: Probe, folder: Path, static_length: bool) -> ort.InferenceSession:
    args = (torch.randn(3, SEQ, EMBED), torch.ones(3, SEQ, dtype=torch.int32))
    shapes = ({0: Dim("B")}, {0: Dim("B")}) if static_length else ({0: Dim("B"), 1: Dim("S")},) * 2
    path = folder / "probe.onnx"
    with torch.no_grad(), transformer_fastpath(False):
        _export(probe, args, path, ["x", "keep"], ["out"], shapes, 18, TRANSLATIONS)
    proto = onnx.load(path)
    assert {o.domain for o in proto.opset_import} == {""}  # standard ONNX only
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def reference(encoder: nn.TransformerEncoder, x: np.ndarray, keep: np.ndarray, causal: bool) -> np.ndarray:
    ref = random_encoder(encoder.layers[0].self_attn.num_heads, 0).double()
    ref.load_state_dict(encoder.state_dict())
    s = x.shape[1]
    mask = torch.ones(s, s, dtype=torch.bool).triu(1) if causal else None
    with torch.no_grad(), transformer_fastpath(False):
        out = ref(torch.from_numpy(x).double(), mask=mask, src_key_padding_mask=torch.from_numpy(keep == 0),
                  is_causal=causal)  # fmt: skip
    return out.numpy()


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def assert_matches(session: ort.InferenceSession, encoder: nn.TransformerEncoder, causal: bool,
                   shapes: list[tuple[int, int]], seed: int) -> None:  # fmt: skip
    """ONNX Runtime against the float64 encoder on random tokens of each (batch, length), random key padding (slot 0
    always kept, as in both sequence modules)."""
    g = np.random.default_rng(seed)
    for batch, length in shapes:
        x = g.standard_normal((batch, length, EMBED)).astype(np.float32)
        keep = (g.random((batch, length)) > 0.3).astype(np.int32)
        keep[:, 0] = 1
        got = session.run(None, {"x": x, "keep": keep})[0]
        assert rel_err(got, reference(encoder, x, keep, causal)) < 2e-6


@pytest.mark.parametrize("heads", [1, 2, 3])
@pytest.mark.parametrize("causal", [False, True])
def test_plain_attention_matches_the_encoder_in_float64(heads: int, causal: bool, tmp_path: Path) -> None:
    """Batches of 1 and 5; the causal encoder of static length in query blocks."""
    assert causal_block_ends(SEQ) == [3, 6, 9, 10]
    encoder = random_encoder(heads, seed=heads)
    session = export_probe(Probe(encoder, causal, keys_prefix=False), tmp_path, static_length=True)
    assert_matches(session, encoder, causal, [(1, SEQ), (5, SEQ)], seed=heads)


@pytest.mark.parametrize("heads", [1, 2])
def test_causal_attention_of_any_length(heads: int, tmp_path: Path) -> None:
    """A dynamic length has no query blocks: the causal tile comes from the sequence's length in the graph."""
    encoder = random_encoder(heads, seed=10 + heads)
    session = export_probe(Probe(encoder, True, keys_prefix=False), tmp_path, static_length=False)
    assert_matches(session, encoder, True, [(2, 1), (3, 7), (1, 23)], seed=heads)


@pytest.mark.parametrize("heads", [1, 2])
def test_kept_keys_as_a_prefix_need_no_padding_mask(heads: int, tmp_path: Path) -> None:
    """V2's case: kept tokens first. The graph leaves the key-padding mask out; every kept row is the encoder's with
    the mask, and the rows of dropped positions (which differ) are never read by a kept row."""
    encoder = random_encoder(heads, seed=20 + heads)
    session = export_probe(Probe(encoder, True, keys_prefix=True), tmp_path, static_length=True)
    g = np.random.default_rng(heads)
    x = g.standard_normal((6, SEQ, EMBED)).astype(np.float32)
    lengths = np.array([1, 2, 5, 9, SEQ, 4])
    keep = (np.arange(SEQ)[None] < lengths[:, None]).astype(np.int32)
    got = session.run(None, {"x": x, "keep": keep})[0]
    want = reference(encoder, x, keep, True)
    kept = keep.astype(bool)
    assert rel_err(got[kept], want[kept]) < 2e-6
    assert np.abs(got[~kept] - want[~kept]).max() > 1e-3  # the dropped rows did change: the mask is really gone
