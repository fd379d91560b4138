"""Click commands ``export``, ``inspect`` and ``parity``, registered on the ``transact`` group.

Errors are ``TransactError`` subclasses (exit status 2 for a bad bundle or checkpoint, 1 for a parity
failure); the group prints them on one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
import torch

from .bundle import CPU_PROVIDER, ParityError, export_bundle, load_bundle, onnx_providers
from .manifest import BUNDLE_FILES, DEFAULT_OPSET, MANIFEST
from .parity import run_parity
from .summary import format_summary, inspect_bundle


@click.command("export")
@click.argument("checkpoint", type=click.Path(path_type=Path))
@click.option("-o", "--output", "bundle", required=True, type=click.Path(path_type=Path), help="Bundle folder.")
@click.option("--opset", default=DEFAULT_OPSET, show_default=True, type=click.IntRange(min=18), help="ONNX opset.")
@click.option("--force", is_flag=True, help="Replace an existing bundle folder.")
@click.option("--parity-cases", default=4, show_default=True, type=click.IntRange(min=0),
              help="Random parity cases on top of the fixed edge cases.")  # fmt: skip
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the parity inputs.")
def export_cmd(checkpoint: Path, bundle: Path, opset: int, force: bool, parity_cases: int, seed: int) -> None:
    """Export CHECKPOINT to a verified bundle (weights, ONNX graphs, manifest); parity is checked first."""
    out = export_bundle(checkpoint, bundle, opset=opset, force=force, parity_cases=parity_cases, seed=seed)
    manifest = json.loads((out / MANIFEST).read_text())
    for name in BUNDLE_FILES:
        entry = manifest["files"][name]
        click.echo(f"  {name:<22} {entry['size']:>12,} B  sha256 {entry['sha256'][:16]}…")
    parity = manifest["parity"]
    n_cases = len(parity["cases"])
    worst = max(c["outputs"]["probabilities"]["max_abs"] for c in parity["comparisons"])
    click.echo(f"wrote {out} (opset {opset}); parity passed on {n_cases} cases, max abs error {worst:.2e}")


@click.command("inspect")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--verify", is_flag=True, help="Also check every hash, the weights and the graph signatures.")
def inspect_cmd(bundle: Path, as_json: bool, verify: bool) -> None:
    """Summarise BUNDLE from its manifest and the safetensors header, without loading the weights."""
    info = inspect_bundle(bundle, verify=verify)
    click.echo(json.dumps(info, indent=2) if as_json else format_summary(info))
    if verify and info["verified"] and info["verified"].startswith("FAILED"):
        load_bundle(bundle)  # raises the BundleError (exit status 2) with its one-line message


def check_provider(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """Refuse, before any work, a provider this ONNX Runtime does not have (exit status 2)."""
    try:
        onnx_providers(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    return value


@click.command("parity")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--cases", default=8, show_default=True, type=click.IntRange(min=0),
              help="Random cases on top of the fixed edge cases.")  # fmt: skip
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--hybrid", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Also check the hybrid GPU runtime (auto: when a CUDA GPU is present).")
@click.option("--onnx-provider", default=CPU_PROVIDER, show_default=True, callback=check_provider,
              help="ONNX Runtime execution provider to check the graphs on (e.g. OpenVINOExecutionProvider "
                   "from onnxruntime-openvino); the CPU provider takes the nodes it does not.")
def parity_cmd(bundle: Path, as_json: bool, cases: int, seed: int, hybrid: str, onnx_provider: str) -> None:
    """Compare eager PyTorch with ONNX Runtime (full.onnx, dense.onnx) and, on a GPU, the hybrid runtime,
    on random and edge-case inputs."""
    verified = load_bundle(bundle)
    extra = None
    if hybrid == "on" or (hybrid == "auto" and torch.cuda.is_available()):
        from runtime.parity_backend import hybrid_backends  # the runtime builds on export, not the reverse

        extra = hybrid_backends(bundle)
    report = run_parity(verified, random_cases=cases, seed=seed, extra_backends=extra, provider=onnx_provider)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else report.format_table())
    if not report.passed:
        raise ParityError(f"parity check failed: {report.failure_summary()}", bundle)
