"""Bundle export, layout, loading and refusal of damaged or foreign inputs (DESIGN §3)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from export.bundle import (
    BundleError,
    CheckpointError,
    ParityError,
    export_bundle,
    load_bundle,
    read_safetensors_header,
)
from export.commands import export_cmd, inspect_cmd
from export.manifest import BUNDLE_FORMAT, sha256_file
from export.onnx_export import EXAMPLE_N, EXAMPLE_R, EXAMPLE_WIDTH
from export.summary import inspect_bundle
from transact.checkpoint import save_checkpoint
from transact.config import ModelConfig, TransActConfig, TransActV2Config
from transact.model import RankingModel

REPO = Path(__file__).resolve().parents[1]
_CACHE: dict[str, Path] = {}


def small_config() -> ModelConfig:
    return ModelConfig(
        max_ll=64, max_rt=24, max_imp=20, mlp_dims=[32, 16], user_dense_dim=4, item_dense_dim=6,
        transact=TransActConfig(seq_len=12, latest_n_emb=3),
        transact_v2=TransActV2Config(k_ll=8, r_rt=4, k_rt=4, k_imp=4, latest_n=2),
    )  # fmt: skip


def small_checkpoint(root: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    return save_checkpoint(root / f"ckpt-{seed}", RankingModel(small_config()))


def small_bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small bundle per test session, exported through the ``export`` command (parity at export)."""
    if "small" not in _CACHE:
        root = tmp_path_factory.mktemp("small-bundle")
        ckpt = small_checkpoint(root)
        result = CliRunner().invoke(export_cmd, [str(ckpt), "-o", str(root / "bundle"), "--parity-cases", "2"])
        assert result.exit_code == 0, (result.output, result.exception)
        assert "parity passed" in result.output
        _CACHE["small"] = root / "bundle"
        _CACHE["small-ckpt"] = ckpt
    return _CACHE["small"]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return small_bundle_dir(tmp_path_factory)


@pytest.fixture
def copy(bundle_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(bundle_dir, dst)
    return dst


def rewrite_manifest(folder: Path, edit) -> None:  # noqa: ANN001
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def rehash(folder: Path, name: str) -> None:
    """What a careless tool would do: make the manifest agree with an edited file."""

    def edit(m: dict) -> None:
        m["files"][name] = {"sha256": sha256_file(folder / name), "size": (folder / name).stat().st_size}

    rewrite_manifest(folder, edit)


# ---------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------


def test_bundle_layout_and_manifest(bundle_dir: Path) -> None:
    assert sorted(p.name for p in bundle_dir.iterdir()) == [
        "dense.onnx", "full.onnx", "manifest.json", "weights.safetensors"
    ]  # fmt: skip
    m = json.loads((bundle_dir / "manifest.json").read_text())
    assert m["format"] == BUNDLE_FORMAT and m["opset"] == 18
    assert ModelConfig.from_dict(m["model_config"]).to_dict() == small_config().to_dict()
    for name, entry in m["files"].items():
        assert entry == {"sha256": sha256_file(bundle_dir / name), "size": (bundle_dir / name).stat().st_size}
    assert {"torch", "onnx", "onnxruntime"} <= set(m["tools"])
    for name in ("full.onnx", "dense.onnx"):
        proto = onnx.load(bundle_dir / name)
        assert m["graphs"][name]["ir_version"] == proto.ir_version
        assert m["graphs"][name]["opset"]["ai.onnx"] == 18
    full = m["graphs"]["full.onnx"]
    names = [i["name"] for i in full["inputs"]]
    from transact.batch import INPUT_NAMES

    assert names == list(INPUT_NAMES)
    sig = {i["name"]: i for i in full["inputs"]}
    assert sig["ll_item"] == {"name": "ll_item", "dtype": "int8", "shape": ["R", "L_ll", 32]}
    assert sig["rt_ts"]["shape"] == ["R", "L_rt"] and sig["imp_action"]["shape"] == ["R", "L_imp"]
    assert sig["cand_item"]["shape"] == ["N", 32] and sig["request_ts"]["dtype"] == "int64"
    outs = {o["name"]: o for o in full["outputs"]}
    assert outs["probabilities"]["shape"] == ["N", 3] and outs["scores"]["shape"] == ["N"]
    assert outs["selection_pos"]["shape"] == ["N", small_config().transact_v2.max_tokens]
    assert [o["name"] for o in full["outputs"]][-2:] == ["v1", "v2"]  # dense.onnx's inputs of the same names
    assert outs["v1"]["shape"] == ["N", small_config().transact.out_dim]
    assert outs["v2"]["shape"] == ["N", small_config().transact_v2.out_dim]
    dense = m["graphs"]["dense.onnx"]
    assert [i["name"] for i in dense["inputs"]] == [
        "user_dense", "surface", "hour", "cand_request", "cand_item", "item_dense", "v1", "v2"
    ]  # fmt: skip
    assert dense["inputs"][-1]["shape"] == ["N", small_config().transact_v2.out_dim]
    assert m["parity"]["passed"] is True and len(m["parity"]["comparisons"]) == 8


def test_weights_hold_every_tensor(bundle_dir: Path) -> None:
    ckpt_model = RankingModel(small_config())
    ckpt_model.load_state_dict(load_file(_CACHE["small-ckpt"] / "model.safetensors"))
    tensors = load_file(bundle_dir / "weights.safetensors")
    expected = ckpt_model.state_dict()
    assert set(tensors) == set(expected)
    for name, value in expected.items():
        t = tensors[name]
        assert t.is_contiguous()
        assert t.dtype == (torch.float32 if value.is_floating_point() else value.dtype), name
        assert torch.equal(t, value), name
    assert tensors["transact.action_type_lookup"].dtype == torch.int64
    _, meta = read_safetensors_header(bundle_dir / "weights.safetensors")
    assert meta["format"] == BUNDLE_FORMAT and float(meta["quant_scale"]) == 0.65
    assert ModelConfig.from_json(meta["config"]).to_dict() == small_config().to_dict()


def test_load_bundle_rebuilds_the_model(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    model = bundle.build_model()
    assert not model.training
    reference = load_file(_CACHE["small-ckpt"] / "model.safetensors")
    for name, value in model.state_dict().items():
        assert torch.equal(value, reference[name])


# ---------------------------------------------------------------------------------------------
# Tampering: every case refused, exit status 2, the file named
# ---------------------------------------------------------------------------------------------


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x5A
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _weights_with(folder: Path, meta_edit=None, tensor_edit=None) -> None:  # noqa: ANN001
    """Rewrite weights.safetensors (metadata and/or tensors) and re-hash it in the manifest."""
    path = folder / "weights.safetensors"
    tensors = load_file(path)
    _, meta = read_safetensors_header(path)
    if meta_edit:
        meta_edit(meta)
    if tensor_edit:
        tensor_edit(tensors)
    save_file(tensors, path, metadata=meta)
    rehash(folder, "weights.safetensors")


def _other_config_json(folder: Path) -> str:
    cfg = small_config()
    cfg.mlp_dims = [32, 8]
    return cfg.to_json()


TAMPER = {
    "missing weights": (lambda d: (d / "weights.safetensors").unlink(), "weights.safetensors", "missing"),
    "missing full graph": (lambda d: (d / "full.onnx").unlink(), "full.onnx", "missing"),
    "truncated full graph": (lambda d: _truncate(d / "full.onnx"), "full.onnx", "size mismatch"),
    "truncated weights": (lambda d: _truncate(d / "weights.safetensors"), "weights.safetensors", "size mismatch"),
    "edited weight byte": (lambda d: _flip_byte(d / "weights.safetensors", -40), "weights.safetensors", "sha256"),
    "edited dense byte": (lambda d: _flip_byte(d / "dense.onnx", 5000), "dense.onnx", "sha256"),
    "manifest hash edited": (
        lambda d: rewrite_manifest(d, lambda m: m["files"]["full.onnx"].update(sha256="0" * 64)), "full.onnx",
        "sha256",
    ),
    "manifest not json": (lambda d: (d / "manifest.json").write_text("{not json"), "manifest.json", "JSON"),
    "manifest missing": (lambda d: (d / "manifest.json").unlink(), "manifest.json", "missing"),
    "manifest format version": (
        lambda d: rewrite_manifest(d, lambda m: m.update(format="transact-bundle/99")), "manifest.json",
        "unsupported bundle format",
    ),
    "manifest config edited": (
        lambda d: rewrite_manifest(d, lambda m: m["model_config"].update(mlp_dims=[32, 8])), "manifest.json",
        "model_config differs",
    ),
    "manifest signature edited": (
        lambda d: rewrite_manifest(d, lambda m: m["graphs"]["full.onnx"]["inputs"][0].update(name="x")),
        "full.onnx", "signature",
    ),
    "weights format version": (
        lambda d: _weights_with(d, meta_edit=lambda meta: meta.update(format="transact-bundle/0")),
        "weights.safetensors", "unsupported weights format",
    ),
    "config does not match weights": (
        lambda d: (
            _weights_with(d, meta_edit=lambda meta: meta.update(config=_other_config_json(d))),
            rewrite_manifest(d, lambda m: m.update(model_config=json.loads(_other_config_json(d)))),
        ),
        "weights.safetensors", "do not match the config",
    ),
    "tensor missing": (
        lambda d: _weights_with(d, tensor_edit=lambda t: t.pop("head.bias")), "weights.safetensors",
        "'head.bias' missing",
    ),
}


@pytest.mark.parametrize("case", list(TAMPER))
def test_tampered_bundle_is_refused(copy: Path, case: str) -> None:
    tamper, filename, reason = TAMPER[case]
    tamper(copy)
    with pytest.raises(BundleError) as info:
        load_bundle(copy)
    err = info.value
    assert err.exit_code == 2
    message = str(err)
    assert "\n" not in message
    assert filename in message and reason in message, message


def test_unlisted_file_is_ignored_and_shown(copy: Path) -> None:
    (copy / "notes.txt").write_text("hello")
    load_bundle(copy)  # files outside the manifest are never read
    info = inspect_bundle(copy)
    assert info["unlisted_files"] == ["notes.txt"]


def test_cli_exit_status_2_on_tampered_bundle(copy: Path) -> None:
    _flip_byte(copy / "full.onnx", 3000)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", "from transact.cli import main; main()", "parity", str(copy)],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "full.onnx" in lines[0] and "sha256" in lines[0], proc.stderr


# ---------------------------------------------------------------------------------------------
# Export refusals: nothing left in the output folder
# ---------------------------------------------------------------------------------------------


def _assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    if out.parent.exists():  # no temporary folder left beside it either
        assert [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")] == []


def test_export_refuses_foreign_checkpoint(tmp_path: Path) -> None:
    ckpt = tmp_path / "hf-model"
    ckpt.mkdir()
    (ckpt / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "hidden_size": 768}))
    save_file({"w": torch.zeros(2)}, ckpt / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out" / "bundle"
    with pytest.raises(CheckpointError) as info:
        export_bundle(ckpt, out)
    assert info.value.exit_code == 2 and "model.safetensors" in str(info.value)
    assert "not a TransAct checkpoint" in str(info.value)
    _assert_nothing_written(out)


def test_export_refuses_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError) as info:
        export_bundle(tmp_path / "nope", tmp_path / "bundle")
    assert info.value.exit_code == 2 and "nope" in str(info.value)
    _assert_nothing_written(tmp_path / "bundle")


def test_export_refuses_config_that_does_not_match_weights(tmp_path: Path) -> None:
    ckpt = small_checkpoint(tmp_path)
    data = json.loads((ckpt / "config.json").read_text())
    data["model"]["mlp_dims"] = [32, 8]
    (ckpt / "config.json").write_text(json.dumps(data))
    out = tmp_path / "bundle"
    with pytest.raises(CheckpointError) as info:
        export_bundle(ckpt, out)
    assert info.value.exit_code == 2 and "do not match" in str(info.value), str(info.value)
    _assert_nothing_written(out)


def _graphs_from(bundle: Path):  # noqa: ANN202
    """A stand-in for the exporter that copies already exported graphs (keeps these tests fast)."""

    def fake_export(model, out_dir, opset=18):  # noqa: ANN001, ANN202
        for name in ("full.onnx", "dense.onnx"):
            shutil.copy(bundle / name, Path(out_dir) / name)

    return fake_export


def test_export_refused_when_parity_fails(bundle_dir: Path, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    # Graphs of one model, weights of another: a real numerical mismatch the parity check must catch.
    ckpt = small_checkpoint(tmp_path, seed=1)
    monkeypatch.setattr("export.onnx_export.export_graphs", _graphs_from(bundle_dir))
    out = tmp_path / "bundle"
    with pytest.raises(ParityError) as info:
        export_bundle(ckpt, out, parity_cases=0)
    assert "parity check failed" in str(info.value) and info.value.exit_code != 0
    _assert_nothing_written(out)


def test_export_existing_output_needs_force(bundle_dir: Path, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr("export.onnx_export.export_graphs", _graphs_from(bundle_dir))
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(BundleError, match="already exists"):
        export_bundle(_CACHE["small-ckpt"], out, parity_cases=0)
    assert (out / "keep.txt").read_text() == "mine"
    export_bundle(_CACHE["small-ckpt"], out, parity_cases=0, force=True)
    assert not (out / "keep.txt").exists()
    load_bundle(out)
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # not the private mode of a temporary folder


# ---------------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------------


def test_inspect_reads_no_weights(copy: Path, monkeypatch) -> None:  # noqa: ANN001
    def refuse(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("inspect must not load tensors")

    for target in ("safetensors.torch.load_file", "safetensors.torch.load", "safetensors.safe_open",
                   "export.bundle.load_safetensors_bytes"):  # fmt: skip
        monkeypatch.setattr(target, refuse)
    # Damage the tensor data (not the header): inspect still works because it never reads it.
    _flip_byte(copy / "weights.safetensors", -8)
    result = CliRunner().invoke(inspect_cmd, [str(copy)])
    assert result.exit_code == 0, (result.output, result.exception)
    out = result.output
    assert "transact-bundle/1" in out and "opset 18" in out
    n_tensors = len(RankingModel(small_config()).state_dict())
    assert f"{n_tensors} tensors" in out
    assert "ll_item:int8[R, L_ll, 32]" in out and "probabilities:float32[N, 3]" in out
    assert "parity     passed" in out
    info = json.loads(CliRunner().invoke(inspect_cmd, [str(copy), "--json"]).output)
    assert info["weights"]["config_matches_manifest"] is True
    assert info["weights"]["dtypes"] == {"F32": n_tensors - 1, "I64": 1}


def test_inspect_verify_reports_damage(copy: Path) -> None:
    _flip_byte(copy / "weights.safetensors", -8)
    result = CliRunner().invoke(inspect_cmd, [str(copy), "--verify"])
    assert isinstance(result.exception, BundleError) and result.exception.exit_code == 2
    assert "FAILED" in result.output and "weights.safetensors" in result.output


def test_example_sizes_are_distinct() -> None:
    sizes = [EXAMPLE_R, EXAMPLE_N, *EXAMPLE_WIDTH.values()]
    assert len(set(sizes)) == len(sizes) and min(sizes) >= 2
