"""``transact inspect``: what a bundle holds, from the manifest and the safetensors header alone.

No tensor data is read (the weights file is opened for its header only) and nothing is hashed unless
``verify=True``, so inspecting a large or damaged bundle is cheap and always possible.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .bundle import BundleError, load_bundle, read_manifest, read_safetensors_header, unlisted_files
from .manifest import DENSE, FULL, WEIGHTS


def inspect_bundle(path: str | os.PathLike, verify: bool = False) -> dict[str, Any]:
    """A summary dict of the bundle at ``path``; ``verify=True`` also runs the full ``load_bundle`` check."""
    folder = Path(path)
    manifest = read_manifest(folder)
    files = []
    for name, entry in manifest["files"].items():
        p = folder / name
        state = "missing" if not p.is_file() else ("ok (size)" if p.stat().st_size == entry["size"] else "size differs")
        files.append({"name": name, "size": entry["size"], "sha256": entry["sha256"], "state": state})
    weights: dict[str, Any] = {}
    wpath = folder / WEIGHTS
    if wpath.is_file():
        try:
            header, meta = read_safetensors_header(wpath)
            dtypes: dict[str, int] = {}
            params = 0
            for info in header.values():
                n = 1
                for d in info["shape"]:
                    n *= int(d)
                params += n
                dtypes[info["dtype"]] = dtypes.get(info["dtype"], 0) + 1
            weights = {"tensors": len(header), "elements": params, "dtypes": dtypes,
                       "metadata": {k: v for k, v in meta.items() if k != "config"},
                       "config_matches_manifest": _same_config(meta.get("config"), manifest.get("model_config")),
                       "largest": sorted(((k, v["shape"]) for k, v in header.items()),
                                         key=lambda kv: -_numel(kv[1]))[:5]}  # fmt: skip
        except BundleError as e:
            weights = {"error": str(e)}
    verified = None
    if verify:
        try:
            load_bundle(folder)
            verified = "ok: every hash, the weights and the graph signatures match"
        except BundleError as e:
            verified = f"FAILED: {e}"
    parity = manifest.get("parity") or {}
    return {
        "path": str(folder), "format": manifest.get("format"), "opset": manifest.get("opset"),
        "model_config": manifest.get("model_config"), "quant_scale": manifest.get("quant_scale"),
        "files": files, "unlisted_files": unlisted_files(folder, manifest), "weights": weights,
        "graphs": manifest.get("graphs"), "tools": manifest.get("tools"),
        "source_checkpoint": manifest.get("source_checkpoint"),
        "parity": None if not parity else {
            "passed": parity.get("passed"), "cases": len(parity.get("cases", [])),
            "max_abs_probabilities": max((c["outputs"]["probabilities"]["max_abs"]
                                          for c in parity.get("comparisons", [])), default=None),
        },
        "verified": verified,
    }  # fmt: skip


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _same_config(meta_config: str | None, manifest_config: dict[str, Any] | None) -> bool:
    import json

    try:
        return json.loads(meta_config or "null") == manifest_config
    except ValueError:
        return False


def _shape(shape: list[Any]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def format_summary(info: dict[str, Any]) -> str:
    """Readable text for ``inspect_bundle``'s dict."""
    cfg = info.get("model_config") or {}
    v1, v2 = cfg.get("transact", {}), cfg.get("transact_v2", {})
    lines = [
        f"bundle     {info['path']}",
        f"format     {info['format']}   opset {info['opset']}   quant scale {info['quant_scale']}",
        f"model      heads {cfg.get('heads')} (score weights {cfg.get('score_weights')}), "
        f"mlp {cfg.get('mlp_dims')}, cross layers {cfg.get('cross_layers')}",
        f"sequences  max ll {cfg.get('max_ll')}, rt {cfg.get('max_rt')}, imp {cfg.get('max_imp')}; "
        f"TransAct {'on' if v1.get('enabled') else 'off'} (seq_len {v1.get('seq_len')}), "
        f"TransAct V2 {'on' if v2.get('enabled') else 'off'} (k_ll {v2.get('k_ll')}, r_rt {v2.get('r_rt')}, "
        f"k_rt {v2.get('k_rt')}, k_imp {v2.get('k_imp')})",
        "files",
    ]
    for f in info["files"]:
        lines.append(f"  {f['name']:<22} {f['size']:>12,} B  sha256 {f['sha256'][:16]}…  {f['state']}")
    for name in info.get("unlisted_files") or []:
        lines.append(f"  {name:<22} (not in the manifest: ignored)")
    w = info.get("weights") or {}
    if "error" in w:
        lines.append(f"weights    {w['error']}")
    elif w:
        dt = ", ".join(f"{k} x{v}" for k, v in sorted(w["dtypes"].items()))
        agree = "matches" if w["config_matches_manifest"] else "DIFFERS from"
        lines.append(f"weights    {w['tensors']} tensors, {w['elements']:,} elements ({dt}); metadata {w['metadata']}; "
                     f"config {agree} the manifest")  # fmt: skip
    for name in (FULL, DENSE):
        g = (info.get("graphs") or {}).get(name)
        if not g:
            continue
        lines.append(f"{name:<10} IR {g['ir_version']}, opsets {g['opset']}")
        for kind in ("inputs", "outputs"):
            sig = ", ".join(f"{v['name']}:{v['dtype']}{_shape(v['shape'])}" for v in g[kind])
            lines.append(f"  {kind:<8} {sig}")
    tools = info.get("tools") or {}
    lines.append("tools      " + ", ".join(f"{k} {v}" for k, v in tools.items()))
    p = info.get("parity")
    if p:
        lines.append(f"parity     {'passed' if p['passed'] else 'FAILED'} at export ({p['cases']} cases, "
                     f"max abs error on probabilities {p['max_abs_probabilities']:.2e})")  # fmt: skip
    else:
        lines.append("parity     not run at export")
    lines.append(f"verified   {info['verified'] or 'not checked (use --verify to check every hash)'}")
    return "\n".join(lines)
