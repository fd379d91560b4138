"""Parity of the exported graphs with the eager model; the checker itself must be able to fail."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from test_export_bundle import small_bundle_dir, small_config

from export.bundle import ParityError, export_bundle, load_bundle, onnx_providers
from export.commands import parity_cmd
from export.onnx_export import EXAMPLE_N, EXAMPLE_R, EXAMPLE_WIDTH, causal_block_ends, encoder_forward, pad_batch
from export.parity import (
    PROB_ATOL,
    BackendOutput,
    eager_backend,
    full_outputs_error,
    parity_cases,
    run_parity,
    spearman,
)
from transact.batch import INPUT_NAMES
from transact.checkpoint import save_checkpoint
from transact.config import ModelConfig
from transact.data.random_batch import random_batch
from transact.model import RankingModel, transformer_fastpath

EDGE_CASES = {"n1", "n7", "n256", "empty", "empty-mixed", "short", "rt-under-r", "max", "ties", "future"}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    return load_bundle(small_bundle_dir(tmp_path_factory))


@pytest.fixture(scope="module")
def report(bundle):  # noqa: ANN001, ANN201
    return run_parity(bundle, random_cases=4, seed=3)


def test_onnx_matches_eager_on_every_case(report) -> None:  # noqa: ANN001
    names = {c["name"] for c in report.cases}
    assert EDGE_CASES <= names
    by_name = {c["name"]: c for c in report.cases}
    assert by_name["n1"]["candidates"] == 1 and by_name["n7"]["candidates"] == 7
    assert by_name["n256"]["candidates"] == 256
    assert by_name["empty"]["widths"] == {"ll": 1, "rt": 1, "imp": 1}
    assert by_name["max"]["lengths"]["ll"] == [small_config().max_ll]
    assert report.passed, report.format_table()
    for comp in report.comparisons:
        probs = comp.outputs["probabilities"]
        assert probs.out_of_tolerance == 0 and probs.max_abs <= PROB_ATOL
        assert probs.count == sum(c["candidates"] for c in report.cases) * 3
        assert comp.spearman_min >= 0.999


def test_toggle_matrix_and_identical_selection(report) -> None:  # noqa: ANN001
    seen = {(c.backend, c.settings["ort_graph_optimization"], c.settings["torch_fastpath"]) for c in report.comparisons}
    assert seen == {(b, o, f) for b in ("onnxruntime-full", "onnxruntime-dense") for o in ("all", "disabled")
                    for f in (False, True)}  # fmt: skip
    total = sum(c["candidates"] for c in report.cases)
    for comp in report.comparisons:
        if comp.backend == "onnxruntime-full":
            assert comp.selection_checked and comp.selection_candidates == total
            assert comp.selection_mismatched == 0
        else:
            assert not comp.selection_checked  # dense.onnx does no selection
    d = report.to_dict()
    json.dumps(d)  # serialisable
    assert d["comparisons"][0]["selection"]["agreement"] == 1.0


def test_selection_output_is_the_eager_selection(bundle) -> None:  # noqa: ANN001
    """full.onnx's selection outputs equal TransActV2.select, including ties and an empty user."""
    model = bundle.build_model()
    session = bundle.session("full")
    cases = {c.name: c for c in parity_cases(bundle.config, 0)}
    for name in ("ties", "empty-mixed", "short", "n256"):
        batch = cases[name].batch
        with torch.inference_mode():
            sel = model.transact_v2.select(batch, batch.cand_item)
        group, pos = session.run(["selection_group", "selection_pos"], {k: v.numpy() for k, v in batch.named_tensors()})
        np.testing.assert_array_equal(pos, torch.where(sel.valid, sel.pos, -1).numpy())
        np.testing.assert_array_equal(group, torch.where(sel.valid, sel.group, -1).numpy())
        if name == "ties":
            assert (pos >= 0).sum() > 0


def test_sequence_outputs_are_the_eager_sequence_features(bundle) -> None:  # noqa: ANN001
    """full.onnx's v1 / v2 outputs are TransAct's and TransAct V2's outputs as eager PyTorch computes them (what
    dense.onnx reads), on edge cases and random ones: relative norm error below 1e-5 (float32 against float32)."""
    model = bundle.build_model()
    session = bundle.session("full")
    cases = {c.name: c for c in parity_cases(bundle.config, 2, seed=5)}
    for name in ("n1", "n7", "n256", "empty-mixed", "short", "ties", "max", "random-0", "random-1"):
        batch = cases[name].batch
        with torch.inference_mode(), transformer_fastpath(False):
            want = model.sequence_features(batch)[:2]
        got = session.run(["v1", "v2"], {k: v.numpy() for k, v in batch.named_tensors()})
        for g, w in zip(got, want, strict=True):
            w = w.numpy()
            assert g.shape == w.shape and np.abs(w).max() > 0
            assert np.linalg.norm(g - w) <= 1e-5 * np.linalg.norm(w), name


def test_full_outputs_check_takes_bundles_from_before_the_sequence_outputs(bundle) -> None:  # noqa: ANN001
    """The parity checker's check of full.onnx's outputs: this version's list, or the list without v1 / v2 (bundles
    exported before full.onnx named them); anything else is named in the error."""
    names = ["probabilities", "scores", "selection_group", "selection_pos"]
    assert full_outputs_error(bundle.config, [*names, "v1", "v2"]) is None
    assert full_outputs_error(bundle.config, names) is None
    for wrong in (names[:2], [*names, "v2", "v1"], [*names, "v1"]):
        assert "full.onnx outputs" in full_outputs_error(bundle.config, wrong)


@pytest.mark.parametrize(
    "requests,candidates,widths",
    [(1, 1, (1, 1, 1)), (1, 2, (5, 2, 9)), (2, 5, (64, 24, 20)), (4, 300, (17, 8, 3)), (5, 3, (200, 40, 33))],
)
def test_dynamic_dims(bundle, requests: int, candidates: int, widths: tuple[int, int, int]) -> None:  # noqa: ANN001
    """Sizes unlike the export example (R=3, N=11, widths 53/29/23), widths beyond the config's maxima too."""
    assert (requests, candidates) != (EXAMPLE_R, EXAMPLE_N) and widths != tuple(EXAMPLE_WIDTH.values())
    cfg = bundle.config
    lengths = {s: [min(w, getattr(cfg, f"max_{s}"), 1 + (i * 7) % (w + 1)) for i in range(requests)]
               for s, w in zip(("ll", "rt", "imp"), widths, strict=True)}  # fmt: skip
    batch = random_batch(cfg, requests, candidates, seed=requests * 31 + candidates, **lengths)
    batch = pad_batch(batch, dict(zip(("ll", "rt", "imp"), widths, strict=True)))
    feed = {k: v.numpy() for k, v in batch.named_tensors()}
    ref = eager_backend(bundle.build_model())(batch)
    for optimize in (True, False):
        probs, scores = bundle.session("full", optimize=optimize).run(["probabilities", "scores"], feed)
        assert probs.shape == (candidates, 3) and scores.shape == (candidates,)
        assert np.abs(probs - ref.probs).max() <= PROB_ATOL
    v1, v2, _ = bundle.build_model().sequence_features(batch)
    dense_feed = {"user_dense": feed["user_dense"], "surface": feed["surface"], "hour": feed["hour"],
                  "cand_request": feed["cand_request"], "cand_item": feed["cand_item"],
                  "item_dense": feed["item_dense"], "v1": v1.detach().numpy(), "v2": v2.detach().numpy()}  # fmt: skip
    probs, _ = bundle.session("dense").run(None, dense_feed)
    assert np.abs(probs - ref.probs).max() <= PROB_ATOL


def test_graph_dims_are_symbolic(bundle) -> None:  # noqa: ANN001
    proto = onnx.load_model_from_string(bundle.graph_bytes("full"))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
    assert list(dims) == list(INPUT_NAMES)
    assert dims["ll_ts"] == ["R", "L_ll"] and dims["rt_item"] == ["R", "L_rt", 32] and dims["imp_length"] == ["R"]
    assert dims["cand_request"] == ["N"] and dims["item_dense"] == ["N", small_config().item_dense_dim]


def test_attention_is_plain_products_in_query_blocks(bundle) -> None:  # noqa: ANN001
    """full.onnx is standard ONNX: no node of ONNX Runtime's domains. Each head of each attention layer is a
    Softmax per query block: V2's causal layers (one head) four blocks each, TransAct's one per head per layer
    (the first layer's in the fallback of its factored form, which scatters its rows back)."""
    proto = onnx.load_model_from_string(bundle.graph_bytes("full"))
    assert {o.domain for o in proto.opset_import} == {""}
    assert all(n.domain == "" for n in proto.graph.node)
    v1, v2 = small_config().transact, small_config().transact_v2
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("Softmax") == 4 * v2.num_layer * v2.nhead + v1.num_layer * v1.nhead
    assert ops.count("ScatterND") == 1  # the first V1 layer's fallback
    # V2's causal tiles (T = 20: blocks of 5), -1e30 above the diagonal of the block's own keys (one per block and
    # layer, small equal ones merged by the exporter's optimizer)
    tiles = [onnx.numpy_helper.to_array(t) for t in proto.graph.initializer if list(t.dims[:1]) == [5]
             and len(t.dims) == 2 and t.data_type == onnx.TensorProto.FLOAT]  # fmt: skip
    assert {t.shape for t in tiles} == {(5, end) for end in (5, 10, 15, 20)}
    for tile in tiles:
        assert np.array_equal(tile[:, -5:], np.triu(np.full((5, 5), -1e30, np.float32), 1)) and not tile[:, :-5].any()


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("final_norm", [False, True])
def test_encoder_forward_is_the_encoder_in_float64(heads: int, causal: bool, final_norm: bool) -> None:
    """The encoder the export traces (its attention op, one-head layers' output projection in the values, rows
    2-D outside attention) against PyTorch's own module, every parameter random (biases and LayerNorm
    parameters included), in float64."""
    torch.manual_seed(3)
    d, layers = 24, 3
    layer = torch.nn.TransformerEncoderLayer(d, heads, dim_feedforward=20, dropout=0.0, batch_first=True)
    enc = torch.nn.TransformerEncoder(layer, layers, norm=torch.nn.LayerNorm(d) if final_norm else None,
                                      enable_nested_tensor=False).double().eval()  # fmt: skip
    with torch.no_grad():
        for p in enc.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    b, s = 5, 11
    x = torch.randn(b, s, d, dtype=torch.float64)
    pad = torch.rand(b, s) < 0.3
    pad[:, 0] = False  # every sequence keeps a key
    mask = torch.ones(s, s, dtype=torch.bool).triu(1) if causal else None
    with torch.no_grad(), transformer_fastpath(False):
        ref = enc(x, mask=mask, src_key_padding_mask=pad, is_causal=causal)
        got = encoder_forward(enc, x, mask, pad, causal)
    err = ((got - ref).norm() / ref.norm()).item()
    assert err < 1e-12, err


def test_causal_block_ends() -> None:
    assert causal_block_ends(192) == [48, 96, 144, 192]
    assert causal_block_ends(20) == [5, 10, 15, 20]
    assert causal_block_ends(10) == [3, 6, 9, 10]
    assert causal_block_ends(7) == []  # too short to split


def test_checker_fails_on_a_wrong_backend(bundle) -> None:  # noqa: ANN001
    """A backend off by 2e-5 on one probability, or with one swapped token, must fail the report."""
    model = bundle.build_model()
    eager = eager_backend(model)
    cases = [c for c in parity_cases(bundle.config, 0) if c.name in ("n7", "short")]

    def off_by_a_bit(batch):  # noqa: ANN001, ANN202
        out = eager(batch)
        probs = out.probs.copy()
        probs[-1, 1] += 2e-5
        return BackendOutput(probs, out.scores, out.selection)

    def swapped_selection(batch):  # noqa: ANN001, ANN202
        out = eager(batch)
        sel = out.selection.copy()
        sel[0, [0, 1]] = sel[0, [1, 0]]
        return BackendOutput(out.probs, out.scores, sel)

    rep = run_parity(bundle, cases=cases, extra_backends={"off": off_by_a_bit, "swap": swapped_selection})
    assert not rep.passed
    comps = {c.backend: c for c in rep.comparisons}
    assert comps["off"].outputs["probabilities"].out_of_tolerance == 2
    worst = comps["off"].outputs["probabilities"].worst
    assert worst["index"] in ([6, 1], [5, 1]) and worst["case"] in ("n7", "short")
    assert comps["swap"].selection_mismatched == 2 and comps["swap"].first_mismatch["candidate"] == 0
    assert all(c.passed for c in rep.comparisons if c.backend.startswith("onnxruntime"))
    assert "FAIL" in rep.format_table()


def test_parity_command(bundle) -> None:  # noqa: ANN001
    result = CliRunner().invoke(parity_cmd, [str(bundle.path), "--json", "--cases", "1", "--seed", "5"])
    assert result.exit_code == 0, (result.output, result.exception)
    data = json.loads(result.output)
    assert data["passed"] is True and data["seed"] == 5 and len(data["comparisons"]) == 8
    result = CliRunner().invoke(parity_cmd, [str(bundle.path), "--cases", "0"])
    assert result.exit_code == 0 and "PASSED" in result.output and "selection" in result.output


def test_parity_command_on_another_provider(bundle) -> None:  # noqa: ANN001
    """``--onnx-provider`` builds the sessions on that provider with the CPU provider behind it. The stock
    wheel's Azure provider (remote endpoints) takes none of the graphs' nodes, so everything falls back to the
    CPU provider and parity must pass; the report names the provider."""
    import onnxruntime as ort

    assert "AzureExecutionProvider" in ort.get_available_providers()  # the stock Linux wheel ships it
    assert onnx_providers("AzureExecutionProvider") == ["AzureExecutionProvider", "CPUExecutionProvider"]
    assert onnx_providers() == ["CPUExecutionProvider"]
    session = bundle.session("dense", provider="AzureExecutionProvider")
    assert session.get_providers() == ["AzureExecutionProvider", "CPUExecutionProvider"]
    args = [str(bundle.path), "--cases", "0", "--onnx-provider", "AzureExecutionProvider"]
    result = CliRunner().invoke(parity_cmd, [*args, "--json"])
    assert result.exit_code == 0, (result.output, result.exception)
    data = json.loads(result.output)
    assert data["passed"] is True and data["onnx_provider"] == "AzureExecutionProvider"
    result = CliRunner().invoke(parity_cmd, args)
    assert "ONNX Runtime on AzureExecutionProvider" in result.output.splitlines()[0]


def test_parity_command_refuses_a_missing_provider(bundle) -> None:  # noqa: ANN001
    result = CliRunner().invoke(parity_cmd, [str(bundle.path), "--onnx-provider", "NoSuchExecutionProvider"])
    assert result.exit_code == 2
    assert "Invalid value for '--onnx-provider'" in result.output and "'NoSuchExecutionProvider'" in result.output
    assert "CPUExecutionProvider" in result.output  # what this ONNX Runtime offers instead
    with pytest.raises(ValueError, match="NoSuchExecutionProvider"):
        onnx_providers("NoSuchExecutionProvider")


def test_parity_command_fails_on_mismatch(bundle, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr("export.parity.PROB_ATOL", 0.0)  # nothing can be that exact: the command must fail
    result = CliRunner().invoke(parity_cmd, [str(bundle.path), "--cases", "0"])
    assert isinstance(result.exception, ParityError) and result.exception.exit_code == 1
    assert "FAILED" in result.output


def test_spearman() -> None:
    a = np.array([0.1, 0.5, 0.3, 0.9])
    assert spearman(a, a * 2 + 1) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(np.array([1.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0])) == pytest.approx(0.5)
    assert spearman(np.array([1.0, 1.0]), np.array([2.0, 2.0])) == 1.0


def test_default_config_bundle(tmp_path: Path) -> None:
    """The default ModelConfig (ll up to 16,000, k 96/32/32/32) exports and passes parity at export."""
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "ckpt", RankingModel(ModelConfig()))
    out = export_bundle(ckpt, tmp_path / "bundle", parity_cases=0)
    parity = json.loads((out / "manifest.json").read_text())["parity"]
    assert parity["passed"] is True
    cases = {c["name"]: c for c in parity["cases"]}
    assert cases["max"]["lengths"] == {"ll": [16_000], "rt": [100], "imp": [100]}
    assert cases["n256"]["candidates"] == 256 and EDGE_CASES <= set(cases)
    for comp in parity["comparisons"]:
        assert comp["outputs"]["probabilities"]["max_abs"] <= PROB_ATOL
        assert comp["outputs"]["probabilities"]["out_of_tolerance"] == 0
        if comp["selection"]:
            assert comp["selection"]["mismatched"] == 0 and comp["selection"]["candidates"] > 256
