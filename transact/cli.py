"""The `transact` command line: train, eval, export, inspect, parity, serve, demo."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click

from .errors import TransactError


def _train_config(config: str | None, **flags):
    from .train import TrainConfig, load_train_config

    if config:
        return load_train_config(config, **flags)
    cfg = TrainConfig(**{k: v for k, v in flags.items() if v is not None})
    try:
        cfg.validate()
    except ValueError as e:
        raise TransactError(str(e)) from None
    return cfg


def _data_options(cfg, users: int | None):
    if users is not None:
        if cfg.data != "synthetic":
            raise TransactError("--users applies to synthetic data only", field="users")
        cfg.data_options = {**cfg.data_options, "num_users": users}
    return cfg


@click.group()
@click.version_option(package_name="transact-toolchain")
def cli() -> None:
    """Train, export, verify and serve TransAct / TransAct V2 ranking models."""


def data_flags(f):
    f = click.option("--config", type=click.Path(dir_okay=False), help="TOML training config.")(f)
    f = click.option("--data", type=click.Choice(["synthetic", "movielens", "logs"]), default=None)(f)
    f = click.option("--logs", type=click.Path(dir_okay=False), default=None, help="CSV/Parquet action log.")(f)
    f = click.option("--epochs", type=int, default=None)(f)
    f = click.option("--batch-requests", type=int, default=None)(f)
    f = click.option("--lr", type=float, default=None)(f)
    f = click.option("--seed", type=int, default=None)(f)
    f = click.option("--threads", type=int, default=None)(f)
    f = click.option("--device", default=None, help="auto (a GPU when there is one; default), cpu, cuda, cuda:N.")(f)
    f = click.option("--users", type=int, default=None, help="Synthetic data: number of users.")(f)
    return f


@cli.command()
@data_flags
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Checkpoint folder.")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint in --out.")
def train(config, data, logs, epochs, batch_requests, lr, seed, threads, device, users, out, resume) -> None:
    """Train a model and write a checkpoint folder (safetensors + JSON)."""
    from .train import train as run

    cfg = _train_config(config, data=data, logs=logs, epochs=epochs, batch_requests=batch_requests, lr=lr,
                        seed=seed, threads=threads, device=device, out=out)  # fmt: skip
    cfg = _data_options(cfg, users)
    _, report = run(cfg, resume=resume)
    click.echo(_metrics_table(report["test"]))
    click.echo(f"checkpoint: {cfg.out}  ({report['seconds']:.1f} s on {report['device']})")


@cli.command("eval")
@click.argument("checkpoint", required=False, type=click.Path())
@data_flags
@click.option("--ablation", is_flag=True, help="Train and compare no-seq / rt / rt+NAL / rt+ll+NAL.")
@click.option("--out", type=click.Path(file_okay=False), default="runs/ablation", show_default=True)
@click.option("--json", "as_json", is_flag=True)
def eval_cmd(checkpoint, config, data, logs, epochs, batch_requests, lr, seed, threads, device, users, ablation, out,
             as_json) -> None:  # fmt: skip
    """AUC and HIT@3 per head on the time-based test split, or the ablation table."""
    from .ablation import run_ablation
    from .checkpoint import load_checkpoint
    from .train import TrainConfig, evaluate, load_data, resolve_device

    if ablation:
        cfg = _train_config(config, data=data, logs=logs, epochs=epochs, batch_requests=batch_requests, lr=lr,
                            seed=seed, threads=threads, device=device)  # fmt: skip
        summary = run_ablation(_data_options(cfg, users), out)
        click.echo(json.dumps(summary["results"], indent=2) if as_json else summary["table"])
        click.echo(f"plot: {Path(out) / 'ablation.png'}", err=as_json)  # stdout stays JSON alone
        return
    if not checkpoint:
        raise click.UsageError("give a CHECKPOINT folder, or --ablation")
    model, state = load_checkpoint(checkpoint)
    cfg = TrainConfig(**(state.get("train_config") or {}))
    model.to(resolve_device(device or "auto"))  # where this machine evaluates, not where it was trained
    _, _, test = load_data(cfg)
    metrics = evaluate(model, test)
    click.echo(json.dumps(metrics, indent=2) if as_json else _metrics_table(metrics))


def _metrics_table(metrics: dict) -> str:
    lines = ["| head | AUC | HIT@3 |", "|---|---|---|"]
    lines += [f"| {h} | {m['auc']:.4f} | {m['hit@3']:.4f} |" for h, m in metrics.items()]
    return "\n".join(lines)


# Shorter sequences than the production defaults so that four variants train on a 2-core CPU in a few
# minutes; the architecture is the same (the default ModelConfig is what export and serving use).
DEMO_MODEL = {
    "transact": {"seq_len": 32, "latest_n_emb": 4},
    "transact_v2": {"k_ll": 32, "r_rt": 16, "k_rt": 16, "k_imp": 16},
    "mlp_dims": [128, 64],
}


@cli.command()
@click.option("--out", type=click.Path(file_okay=False), default="runs/demo", show_default=True)
@click.option("--users", type=int, default=500, show_default=True, help="Synthetic users (smaller is faster).")
@click.option("--epochs", type=int, default=3, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
def demo(out, users, epochs, seed) -> None:
    """Synthetic data -> train the ablation variants -> evaluate -> export -> parity -> serve -> query."""
    from .ablation import run_ablation
    from .train import TrainConfig

    try:
        from runtime.demo import run_demo
    except ImportError:  # the export/serving extras are not installed: data, training and evaluation only
        run_demo = None
    if run_demo is not None:
        run_demo(Path(out), users, epochs, seed, DEMO_MODEL)
        return
    t0 = time.perf_counter()
    cfg = TrainConfig(data="synthetic", seed=seed, model=DEMO_MODEL, **({"epochs": epochs} if epochs else {}))
    cfg = _data_options(cfg, users)
    click.echo("== 1/2 data + training: four ablation variants on synthetic data")
    summary = run_ablation(cfg, Path(out) / "ablation")
    click.echo("== 2/2 evaluation (time-based test split)")
    click.echo(summary["table"])
    click.echo(f"plot: {Path(out) / 'ablation' / 'ablation.png'}")
    click.echo(f"demo finished in {time.perf_counter() - t0:.0f} s")


def _register_optional() -> None:
    """Commands that live in the export and runtime packages."""
    try:
        from export.commands import export_cmd, inspect_cmd, parity_cmd
    except ImportError:
        return
    cli.add_command(export_cmd, "export")
    cli.add_command(inspect_cmd, "inspect")
    cli.add_command(parity_cmd, "parity")
    try:
        from runtime.bench import bench_cmd
        from runtime.commands import serve_cmd
    except ImportError:
        return
    cli.add_command(serve_cmd, "serve")
    cli.add_command(bench_cmd, "bench")


_register_optional()


def _run(command: click.Command, args: list[str] | None = None) -> None:
    try:
        code = command.main(args=args, standalone_mode=False)
    except TransactError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


def main() -> None:
    _run(cli)


def export_main() -> None:
    """`transact-export` = `transact export`."""
    _run(cli, ["export", *sys.argv[1:]])


if __name__ == "__main__":
    main()
