"""The bundle's manifest: what each file is, its hash and size, the graphs' signatures (DESIGN §3).

    BUNDLE/
      manifest.json        this file (the only file not listed in itself)
      weights.safetensors  every tensor of the model; metadata: format, config JSON, quant scale
      dense.onnx           sequence-module outputs + dense/context features -> probabilities, scores
      full.onnx            the whole model, NN selection included

Only files listed under ``files`` are ever read; anything else in the folder is ignored (``inspect``
lists such files so that they do not go unnoticed).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Any

BUNDLE_FORMAT = "transact-bundle/1"
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
DENSE = "dense.onnx"
FULL = "full.onnx"
BUNDLE_FILES = (WEIGHTS, DENSE, FULL)
DEFAULT_OPSET = 18  # the ONNX opset graphs are exported with unless told otherwise

# The graphs' tensor names (export.onnx_export writes them; the runtime reads them without importing the exporter).
FULL_OUTPUTS = ("probabilities", "scores")
SELECTION_OUTPUTS = ("selection_group", "selection_pos")  # full.onnx, when TransAct V2 is on
SEQUENCE_OUTPUTS = ("v1", "v2")  # full.onnx's last outputs and dense.onnx's inputs of the same names
DENSE_INPUTS = ("user_dense", "surface", "hour", "cand_request", "cand_item", "item_dense", *SEQUENCE_OUTPUTS)
DENSE_OUTPUTS = ("probabilities", "scores")

ONNX_DTYPES = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool", 10: "float16",
               11: "float64", 16: "bfloat16"}  # fmt: skip


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "size": path.stat().st_size}


def graph_signature(model: Any) -> dict[str, Any]:
    """Inputs and outputs of an ``onnx.ModelProto``: name, dtype, shape (ints or symbolic names)."""

    def values(items: Any) -> list[dict[str, Any]]:
        out = []
        for v in items:
            t = v.type.tensor_type
            shape = [d.dim_param if d.HasField("dim_param") else int(d.dim_value) for d in t.shape.dim]
            out.append({"name": v.name, "dtype": ONNX_DTYPES.get(t.elem_type, str(t.elem_type)), "shape": shape})
        return out

    opset = {imp.domain or "ai.onnx": int(imp.version) for imp in model.opset_import}
    return {"ir_version": int(model.ir_version), "opset": opset,
            "inputs": values(model.graph.input), "outputs": values(model.graph.output)}  # fmt: skip


def tool_versions() -> dict[str, str]:
    import numpy
    import onnx
    import onnxruntime
    import safetensors
    import torch

    return {
        "python": platform.python_version(), "torch": torch.__version__, "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__, "onnxscript": _version("onnxscript"),
        "safetensors": safetensors.__version__, "numpy": numpy.__version__,
    }  # fmt: skip


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def build_manifest(
    folder: Path, config: dict[str, Any], graphs: dict[str, dict[str, Any]], opset: int, quant_scale: float,
    parity: dict[str, Any] | None, source: str | None = None,
) -> dict[str, Any]:
    """The manifest for the files now in ``folder`` (hashes are taken here)."""
    return {
        "format": BUNDLE_FORMAT,
        "model_config": config,
        "quant_scale": quant_scale,
        "opset": opset,
        "graphs": graphs,
        "files": {name: file_entry(folder / name) for name in BUNDLE_FILES},
        "tools": tool_versions(),
        "source_checkpoint": source,
        "parity": parity,
    }


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    path = folder / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path
