"""The ablation of DESIGN §2.7: no sequence / rt only / rt + NAL / rt + ll + NAL, as a table and a plot."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

from .errors import atomic_path
from .train import TrainConfig, load_data, train

VARIANTS: dict[str, dict[str, Any]] = {
    "no sequence": {"transact": {"enabled": False}, "transact_v2": {"enabled": False}},
    "rt": {"transact_v2": {"enabled": False}},
    "rt + NAL": {"transact_v2": {"use_ll": False}},
    "rt + ll + NAL": {},
}


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        out[k] = deep_merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def slug(name: str) -> str:
    return name.replace(" + ", "_").replace(" ", "_")


def run_ablation(cfg: TrainConfig, out: str | Path, variants: list[str] | None = None, progress: bool = True) -> dict:
    """Train each variant on the same data and seed; write ablation.json, ablation.md and ablation.png."""
    out = Path(out)
    data = load_data(cfg)
    results = {}
    for name in variants or list(VARIANTS):
        vcfg = dataclasses.replace(cfg, out=str(out / slug(name)), model=deep_merge(cfg.model, VARIANTS[name]))
        _, report = train(vcfg, progress=progress, data=data)
        results[name] = {"test": report["test"], "seconds": report["seconds"], "parameters": report["parameters"]}
    summary = {"data": cfg.data, "seed": cfg.seed, "epochs": cfg.epochs, "results": results}
    with atomic_path(out / "ablation.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    table = format_table(summary)
    with atomic_path(out / "ablation.md") as tmp:
        tmp.write_text(table + "\n")
    plot(summary, out / "ablation.png")
    summary["table"] = table
    return summary


def format_table(summary: dict) -> str:
    results = summary["results"]
    heads = list(next(iter(results.values()))["test"])
    header = "| variant | " + " | ".join(f"{h} AUC | {h} HIT@3" for h in heads) + " | train s |"
    rule = "|---" * (2 * len(heads) + 2) + "|"
    rows = [
        f"| {name} | " + " | ".join(f"{r['test'][h]['auc']:.4f} | {r['test'][h]['hit@3']:.4f}" for h in heads)
        + f" | {r['seconds']:.0f} |"
        for name, r in results.items()
    ]
    title = f"data: {summary['data']}, seed {summary['seed']}, {summary['epochs']} epochs (test split)"
    return "\n".join([title, "", header, rule, *rows])


def plot(summary: dict, path: Path) -> None:
    """Grouped bars: test AUC per head for each variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = summary["results"]
    names = list(results)
    heads = list(next(iter(results.values()))["test"])
    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [results[name]["test"][h]["auc"] for h in heads]
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(heads))]
        ax.bar(xs, values, width, label=name)
    ax.set_xticks(range(len(heads)), heads)
    ax.set_ylabel("test AUC")
    lows = [results[n]["test"][h]["auc"] for n in names for h in heads]
    ax.set_ylim(max(0.0, min(lows) - 0.05), min(1.0, max(lows) + 0.03))
    ax.set_title(f"Ablation on {summary['data']} (seed {summary['seed']})")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
