"""Checkpoint -> bundle, and bundle loading with verification (DESIGN §3).

``export_bundle`` writes everything into a temporary folder beside the target, checks it (load it back,
run the parity checker) and renames it into place only when all of that passed: a failed export leaves
nothing behind. ``load_bundle`` checks the manifest's format, then the size and sha256 of every file it
lists, then that the weights' metadata and tensors agree with the config, then the graphs' signatures;
the first problem raises ``BundleError`` (exit status 2) naming the file. The bytes that were hashed
are the bytes used: the bundle keeps them in memory, so a file changed after loading has no effect.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file

from transact.checkpoint import CONFIG as CKPT_CONFIG
from transact.checkpoint import FORMAT as CKPT_FORMAT
from transact.checkpoint import WEIGHTS as CKPT_WEIGHTS
from transact.checkpoint import load_checkpoint
from transact.config import ModelConfig
from transact.errors import TransactError, replace_folder
from transact.model import RankingModel

from .manifest import (
    BUNDLE_FILES,
    BUNDLE_FORMAT,
    DEFAULT_OPSET,
    DENSE,
    FULL,
    MANIFEST,
    WEIGHTS,
    build_manifest,
    graph_signature,
    write_manifest,
)

SAFETENSORS_DTYPES = {
    torch.float32: "F32", torch.float64: "F64", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip
DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
               "I8": 1, "U8": 1, "BOOL": 1}  # fmt: skip
MAX_HEADER = 100 << 20
CPU_PROVIDER = "CPUExecutionProvider"


class BundleError(TransactError):
    """A bundle that is missing, damaged, tampered with or not ours."""

    exit_code = 2


class CheckpointError(TransactError):
    """A checkpoint that cannot be exported: not ours, or config and weights disagree."""

    exit_code = 2


class ParityError(TransactError):
    """The exported graphs do not match the eager model within tolerance."""

    exit_code = 1


# ---------------------------------------------------------------------------------------------
# safetensors header (read by hand: no tensor data is touched)
# ---------------------------------------------------------------------------------------------


def parse_safetensors_header(data: bytes, total_size: int, path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Tensor table and ``__metadata__`` from the first bytes of a safetensors file, checked for consistency."""
    if len(data) < 8:
        raise BundleError("not a safetensors file (shorter than its 8-byte header length)", path)
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER or 8 + n > total_size or len(data) < 8 + n:
        raise BundleError(f"damaged safetensors header (claims {n} bytes)", path)
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"damaged safetensors header ({e})", path) from None
    if not isinstance(header, dict):
        raise BundleError("damaged safetensors header (not a JSON object)", path)
    meta = header.pop("__metadata__", None) or {}
    end = 0
    for name, info in header.items():
        try:
            begin, stop = info["data_offsets"]
            count = 1
            for d in info["shape"]:
                count *= int(d)
            width = DTYPE_BYTES[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise BundleError(f"damaged safetensors header (entry '{name}')", path) from None
        if stop - begin != count * width or stop < begin:
            raise BundleError(f"damaged safetensors header ('{name}' has the wrong byte length)", path)
        end = max(end, stop)
    if 8 + n + end != total_size:
        raise BundleError(f"size mismatch: header describes {8 + n + end} bytes, file has {total_size}", path)
    return header, meta


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, str]]:
    """Read only the header of a safetensors file: ({name: {dtype, shape, data_offsets}}, metadata)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) == 8:
            (n,) = struct.unpack("<Q", head)
            head += f.read(min(n, MAX_HEADER + 1))
    return parse_safetensors_header(head, size, path)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def expected_tensors(config: ModelConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (safetensors dtype, shape)} of every tensor a model with this config holds."""
    # Built on the CPU: the first model built on the meta device costs ~0.6-0.8 s of one-off dispatch
    # set-up at every start, a CPU build of the default model 25 ms (and no more memory than loading it).
    model = RankingModel(config)
    return {k: (SAFETENSORS_DTYPES[v.dtype], tuple(v.shape)) for k, v in model.state_dict().items()}


def check_tensors_match(config: ModelConfig, header: dict[str, Any], path: Path, error: type[TransactError]) -> None:
    """Raise ``error`` naming ``path`` unless the tensor table is exactly what ``config`` needs."""
    expected = expected_tensors(config)
    missing, extra = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
    if missing:
        raise error(f"weights do not match the config: '{missing[0]}' missing from the weights", path)
    if extra:
        raise error(f"weights do not match the config: '{extra[0]}' is not part of the model", path)
    for name, (dtype, shape) in expected.items():
        got = (header[name]["dtype"], tuple(header[name]["shape"]))
        if got != (dtype, shape):
            raise error(
                f"weights do not match the config: '{name}' is {got[0]}{list(got[1])}, the config needs "
                f"{dtype}{list(shape)}", path,
            )  # fmt: skip


def read_manifest(folder: Path) -> dict[str, Any]:
    """Parse manifest.json and check its format version; BundleError naming it otherwise."""
    path = folder / MANIFEST
    if not folder.is_dir():
        raise BundleError("bundle folder not found", folder)
    if not path.is_file():
        raise BundleError("missing file (not a TransAct bundle?)", path)
    try:
        manifest = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"not valid JSON ({e})", path) from None
    if not isinstance(manifest, dict):
        raise BundleError("not a manifest (expected a JSON object)", path)
    fmt = manifest.get("format")
    if fmt != BUNDLE_FORMAT:
        raise BundleError(f"unsupported bundle format {fmt!r} (this version reads {BUNDLE_FORMAT!r})", path)
    files = manifest.get("files")
    if not isinstance(files, dict) or any(name not in files for name in BUNDLE_FILES):
        raise BundleError(f"manifest must list {', '.join(BUNDLE_FILES)} under 'files'", path)
    for name, entry in files.items():
        if (
            not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str)
            or not isinstance(entry.get("size"), int) or Path(name).name != name
        ):  # fmt: skip
            raise BundleError(f"bad entry for '{name}' under 'files'", path)
    return manifest


def verify_files(folder: Path, manifest: dict[str, Any]) -> dict[str, bytes]:
    """Size and sha256 of every listed file; returns the verified bytes."""
    import hashlib

    blobs = {}
    for name, entry in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise BundleError("missing file listed in the manifest", path)
        data = path.read_bytes()
        if len(data) != entry["size"]:
            raise BundleError(f"size mismatch: {len(data)} bytes, manifest says {entry['size']} (truncated?)", path)
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry["sha256"]:
            raise BundleError(f"sha256 mismatch: {digest[:16]}…, manifest says {entry['sha256'][:16]}…", path)
        blobs[name] = data
    return blobs


def unlisted_files(folder: Path, manifest: dict[str, Any]) -> list[str]:
    """Files in the folder that the manifest does not list (never read; shown by ``inspect``)."""
    listed = set(manifest.get("files", {})) | {MANIFEST}
    return sorted(p.name for p in folder.iterdir() if p.name not in listed)


@dataclass
class Bundle:
    """A verified bundle: manifest, config and the verified bytes of every file."""

    path: Path
    manifest: dict[str, Any]
    config: ModelConfig
    tensors: dict[str, Any]  # safetensors header table (dtype, shape, offsets)
    blobs: dict[str, bytes] = field(repr=False)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return load_safetensors_bytes(self.blobs[WEIGHTS])

    def build_model(self) -> RankingModel:
        """The eager model rebuilt from ``weights.safetensors`` and the config, in eval mode."""
        model = RankingModel(self.config)
        model.load_state_dict(self.state_dict(), strict=True)
        return model.eval()

    def graph_bytes(self, name: str) -> bytes:
        """Serialized ONNX of ``full.onnx`` / ``dense.onnx`` (or ``full`` / ``dense``)."""
        return self.blobs[name if name.endswith(".onnx") else f"{name}.onnx"]

    def session(
        self, name: str = "full", optimize: bool = True, threads: int | None = None, spinning: bool = True,
        provider: str = CPU_PROVIDER,
    ) -> Any:
        """An ONNX Runtime session on one graph; ``optimize=False`` turns graph optimisations off, ``provider``
        picks the execution provider (see ``onnx_providers``).

        ``spinning=False`` stops idle worker threads from spinning, for callers that alternate ONNX Runtime
        with other multi-threaded work (PyTorch) on the same cores."""
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if not spinning:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.graph_optimization_level = (
            ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        )
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
        return ort.InferenceSession(self.graph_bytes(name), opts, providers=onnx_providers(provider))


def onnx_providers(provider: str = CPU_PROVIDER) -> list[str]:
    """The providers of an ONNX Runtime session on ``provider``, with the CPU provider behind it for the nodes
    it does not take (an installed ``onnxruntime-openvino``, for one, offers ``OpenVINOExecutionProvider``).
    ValueError, naming what this ONNX Runtime offers, when it has no such provider."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if provider not in available:
        raise ValueError(f"ONNX Runtime provider {provider!r} is not available: onnxruntime {ort.__version__} "
                         f"here offers {', '.join(available)}")  # fmt: skip
    return [provider] if provider == CPU_PROVIDER else [provider, CPU_PROVIDER]


def load_bundle(path: str | os.PathLike) -> Bundle:
    """Open and verify a bundle: format, every file's size and sha256, weights vs config, graph signatures."""
    import onnx

    folder = Path(path)
    manifest = read_manifest(folder)
    blobs = verify_files(folder, manifest)
    weights = folder / WEIGHTS
    header, meta = parse_safetensors_header(blobs[WEIGHTS], len(blobs[WEIGHTS]), weights)
    if meta.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"unsupported weights format {meta.get('format')!r} (expected {BUNDLE_FORMAT!r})", weights)
    try:
        config = ModelConfig.from_json(meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"bad model config in the metadata ({e})", weights) from None
    try:
        manifest_config = ModelConfig.from_dict(manifest.get("model_config") or {})
    except (TypeError, ValueError) as e:
        raise BundleError(f"bad model_config ({e})", folder / MANIFEST) from None
    if manifest_config.to_dict() != config.to_dict():
        raise BundleError("model_config differs from the config stored in weights.safetensors", folder / MANIFEST)
    check_tensors_match(config, header, weights, BundleError)
    for name in (FULL, DENSE):
        try:
            proto = onnx.load_model_from_string(blobs[name])
        except Exception as e:  # protobuf raises its own DecodeError
            raise BundleError(f"not a readable ONNX model ({type(e).__name__})", folder / name) from None
        claimed = (manifest.get("graphs") or {}).get(name)
        if graph_signature(proto) != claimed:
            raise BundleError("graph signature (inputs, outputs, opset, IR version) differs from the manifest",
                              folder / name)  # fmt: skip
    return Bundle(folder, manifest, config, header, blobs)


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def load_source_checkpoint(checkpoint_dir: str | os.PathLike) -> RankingModel:
    """Load a training checkpoint for export; CheckpointError (exit 2) if it is not a TransAct checkpoint."""
    path = Path(checkpoint_dir)
    weights = path / CKPT_WEIGHTS
    if not path.is_dir():
        raise CheckpointError("checkpoint folder not found", path)
    if not (path / CKPT_CONFIG).is_file():
        raise CheckpointError("not a TransAct checkpoint (config.json missing)", path / CKPT_CONFIG)
    if not weights.is_file():
        raise CheckpointError("not a TransAct checkpoint (weights missing)", weights)
    try:
        header, meta = read_safetensors_header(weights)
    except BundleError as e:
        raise CheckpointError(str(e).split(": ", 1)[-1], weights) from None
    if meta.get("format") != CKPT_FORMAT:
        raise CheckpointError(f"not a TransAct checkpoint (format {meta.get('format')!r}, expected {CKPT_FORMAT!r})",
                              weights)  # fmt: skip
    try:
        model, _ = load_checkpoint(path)
    except TransactError as e:
        raise CheckpointError(str(e)) from None
    if meta.get("config") is not None:
        try:
            stored = ModelConfig.from_json(meta["config"])
        except ValueError as e:
            raise CheckpointError(f"bad model config in the metadata ({e})", weights) from None
        if stored.to_dict() != model.config.to_dict():
            raise CheckpointError("config.json differs from the config stored with the weights", path / CKPT_CONFIG)
    return model.eval()


def write_weights(model: RankingModel, path: Path) -> None:
    """Every tensor of the model, contiguous; floating point as fp32, integer buffers unchanged."""
    tensors = {}
    for name, t in model.state_dict().items():
        t = t.detach().cpu()
        tensors[name] = (t.to(torch.float32) if t.is_floating_point() else t).contiguous().clone()
    meta = {"format": BUNDLE_FORMAT, "config": model.config.to_json(), "quant_scale": repr(model.config.quant_scale)}
    save_file(tensors, path, metadata=meta)


def export_bundle(
    checkpoint_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    opset: int = DEFAULT_OPSET,
    force: bool = False,
    parity_cases: int = 4,
    seed: int = 0,
    check: bool = True,
) -> Path:
    """Export a checkpoint to a bundle folder; the folder appears only if export and parity succeed.

    ``parity_cases`` random cases are checked on top of the fixed edge cases; ``check=False`` skips the
    parity run (the manifest then records ``"parity": null``)."""
    import onnx

    from .onnx_export import ExportFailed, export_graphs  # imported here: loading a bundle never needs it
    from .parity import run_parity

    model = load_source_checkpoint(checkpoint_dir)
    out = Path(out_dir)
    if out.exists() and not force:
        raise BundleError("output already exists (use --force to replace it)", out)
    if out.exists() and not out.is_dir():
        raise BundleError("output exists and is not a folder", out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        write_weights(model, tmp / WEIGHTS)
        try:
            export_graphs(model, tmp, opset)
        except ExportFailed as e:
            raise TransactError(str(e), checkpoint_dir) from None
        graphs = {name: graph_signature(onnx.load(tmp / name)) for name in (FULL, DENSE)}
        manifest = build_manifest(tmp, model.config.to_dict(), graphs, opset, model.config.quant_scale, None,
                                  source=str(Path(checkpoint_dir).resolve()))  # fmt: skip
        write_manifest(tmp, manifest)
        if check:
            report = run_parity(load_bundle(tmp), random_cases=parity_cases, seed=seed)
            manifest["parity"] = report.to_dict()
            write_manifest(tmp, manifest)
            if not report.passed:
                raise ParityError(f"export refused, parity check failed: {report.failure_summary()}", out)
        _publishable(tmp)
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _publishable(folder: Path) -> None:
    """mkdtemp makes a private folder (0700); give the bundle the usual permissions under the umask."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for f in folder.iterdir():
        os.chmod(f, 0o666 & ~umask)
