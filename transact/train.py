"""Training: config, the loop, checkpoints and resume (DESIGN §2.7).

    cfg = TrainConfig(data="synthetic", out="runs/m", epochs=3)
    model, report = train(cfg)

Runs are repeatable: the seed fixes the model init, the data order and the training-time masks;
resuming from a checkpoint continues at the next epoch with the same seeds a straight run would use.
On a GPU (``device="cuda"``, or ``"auto"`` where one is present) two runs may differ in the last bits: the
backward pass of gathers and embedding lookups adds with CUDA atomics, in no fixed order (PyTorch's
reproducibility notes).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from .checkpoint import load_checkpoint, load_optimizer_state, save_checkpoint
from .config import ModelConfig
from .errors import TransactError
from .losses import total_loss
from .metrics import auc, hit_at_k
from .model import RankingModel

DATA_SOURCES = ("synthetic", "movielens", "logs")


@dataclass
class TrainConfig:
    data: str = "synthetic"
    logs: str | None = None  # path of a CSV/Parquet action log when data = "logs"
    out: str = "runs/model"
    epochs: int = 3
    batch_requests: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-5
    grad_clip: float = 1.0
    seed: int = 0
    valid_frac: float = 0.1
    test_frac: float = 0.2
    threads: int | None = None
    device: str = "auto"  # "auto" (a GPU when there is one), "cpu", "cuda" or "cuda:N"
    data_options: dict[str, Any] = field(default_factory=dict)  # passed to the data source
    model: dict[str, Any] = field(default_factory=dict)  # ModelConfig overrides

    def validate(self) -> None:
        if self.data not in DATA_SOURCES:
            raise ValueError(f"data: must be one of {', '.join(DATA_SOURCES)}, got '{self.data}'")
        if self.data == "logs" and not self.logs:
            raise ValueError("logs: a path is required when data = 'logs'")
        for key in ("epochs", "batch_requests"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1")
        if not self.lr > 0:
            raise ValueError("lr: must be positive")
        if not (0 <= self.valid_frac < 1 and 0 < self.test_frac < 1 and self.valid_frac + self.test_frac < 1):
            raise ValueError("valid_frac/test_frac: need 0 <= valid, 0 < test and valid + test < 1")
        if self.device != "auto" and _device_type(self.device) not in ("cpu", "cuda"):
            raise ValueError(f"device: must be auto, cpu, cuda or cuda:N, got '{self.device}'")


def _device_type(name: str) -> str | None:
    try:
        return torch.device(name).type
    except (RuntimeError, ValueError):
        return None


def resolve_device(name: str) -> torch.device:
    """``auto`` -> the GPU when CUDA is available, else the CPU; a GPU asked for that is not there is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if _device_type(name) not in ("cpu", "cuda"):
        raise TransactError(f"must be auto, cpu, cuda or cuda:N, got '{name}'", field="device")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TransactError("CUDA is not available to this PyTorch (a CPU build, or no GPU): use cpu or auto",
                                field="device")  # fmt: skip
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise TransactError(f"{name}: this machine has {torch.cuda.device_count()} GPU(s)", field="device")
    return device


def load_train_config(path: str | Path, **overrides: Any) -> TrainConfig:
    """Read a TOML file: top-level train keys, plus [model] and [data_options] tables."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise TransactError("config file not found", path) from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise TransactError(f"malformed TOML ({e})", path) from None
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    for key in raw:
        if key not in known:
            raise TransactError("unknown key", path, field=key)
    raw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        cfg = TrainConfig(**raw)
        cfg.validate()
        ModelConfig.from_dict(cfg.model)  # fail now, not after loading data
    except (TypeError, ValueError) as e:
        raise TransactError(str(e), path) from None
    return cfg


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_data(cfg: TrainConfig):
    """The data set named by the config, split by time into (train, valid, test)."""
    if cfg.data == "synthetic":
        from .data.synthetic import make_synthetic

        ds = make_synthetic(seed=cfg.seed, **cfg.data_options)
    elif cfg.data == "movielens":
        from .data.movielens import load_movielens

        ds = load_movielens(valid_frac=cfg.valid_frac, test_frac=cfg.test_frac, **cfg.data_options)
    else:
        from .data.logs import load_action_log

        ds = load_action_log(cfg.logs, valid_frac=cfg.valid_frac, test_frac=cfg.test_frac, **cfg.data_options)
    return ds.split_by_time(cfg.valid_frac, cfg.test_frac)


def model_config_for(cfg: TrainConfig, dataset) -> ModelConfig:
    """Data-dependent sizes come from the data set; the user's [model] table overrides the rest."""
    data = dataset.model_overrides()
    merged = {**data, **{k: v for k, v in cfg.model.items() if k not in data}}
    for key in set(cfg.model) & set(data):
        if key in ("max_ll", "max_rt", "max_imp"):
            if cfg.model[key] < data[key]:
                raise TransactError(f"{cfg.model[key]} is shorter than the data's sequences ({data[key]}); set "
                                    f"data_options.{key} to cut them", field=f"model.{key}")  # fmt: skip
        elif cfg.model[key] != data[key]:
            raise TransactError(f"conflicts with the data ({data[key]!r})", field=f"model.{key}")
        merged[key] = cfg.model[key]
    return ModelConfig.from_dict(merged)


@torch.no_grad()
def predict(model: RankingModel, dataset, batch_requests: int = 64) -> dict[str, np.ndarray]:
    """Probabilities, labels and request ids of every candidate of a data set (on the model's device)."""
    model.eval()
    device = next(model.parameters()).device
    probs, labels, groups = [], [], []
    offset = 0
    for batch in dataset.batches(batch_requests, shuffle=False, seed=0):
        probs.append(model(batch.to(device)).cpu().numpy())
        labels.append(batch.labels.numpy())
        groups.append(batch.cand_request.numpy() + offset)
        offset += batch.num_requests
    return {"probs": np.concatenate(probs), "labels": np.concatenate(labels), "groups": np.concatenate(groups)}


def evaluate(model: RankingModel, dataset, batch_requests: int = 64) -> dict[str, dict[str, float]]:
    """AUC and HIT@3 per head."""
    out = predict(model, dataset, batch_requests)
    metrics = {}
    for h, name in enumerate(model.config.heads):
        p, y = out["probs"][:, h], out["labels"][:, h]
        metrics[name] = {"auc": auc(p, y), "hit@3": hit_at_k(p, y, out["groups"], 3), "positives": float(y.mean())}
    return metrics


def optimizer_tensors(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW moments keyed by parameter name (safetensors needs flat tensor dicts)."""
    out = {}
    for name, p in model.named_parameters():
        for key, value in opt.state.get(p, {}).items():
            out[f"{name}::{key}"] = value.detach().clone() if torch.is_tensor(value) else torch.tensor(value)
    return out


def restore_optimizer(model: torch.nn.Module, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for flat, value in tensors.items():
        name, key = flat.split("::")
        if name in params:
            # AdamW keeps its step count on the CPU unless it runs capturable / fused; moments sit with the weights.
            opt.state[params[name]][key] = value if key == "step" else value.to(params[name].device)


def train_step(
    model: RankingModel, opt: torch.optim.Optimizer, batch, grad_clip: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """One optimiser step on a batch already on the model's device: the loss and its parts."""
    loss, parts = total_loss(model, batch, model.forward_with_aux(batch))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return loss, parts


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True, data=None) -> tuple[RankingModel, dict]:
    """Train and checkpoint after every epoch; returns the model and a report with test metrics."""
    cfg.validate()
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    train_ds, valid_ds, test_ds = data if data is not None else load_data(cfg)
    out = Path(cfg.out)
    start_epoch, history = 0, []
    if resume and (out / "model.safetensors").is_file():
        model, state = load_checkpoint(out)
        start_epoch, history = int(state.get("epoch", 0)), list(state.get("history", []))
    else:
        seed_everything(cfg.seed)
        model = RankingModel(model_config_for(cfg, train_ds))
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if resume and start_epoch:
        moments = load_optimizer_state(out)
        if moments:
            restore_optimizer(model, opt, moments)
    for epoch in range(start_epoch, cfg.epochs):
        seed_everything(cfg.seed * 1000 + epoch + 1)
        model.train()
        totals: dict[str, float] = {}
        steps = 0
        batches = train_ds.batches(cfg.batch_requests, shuffle=True, seed=cfg.seed * 1000 + epoch)
        bar = tqdm(batches, total=math.ceil(train_ds.num_requests / cfg.batch_requests),
                   desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=None if progress else True, leave=False)  # fmt: skip
        for batch in bar:
            loss, parts = train_step(model, opt, batch.to(device), cfg.grad_clip)
            steps += 1
            for k, v in {"loss": float(loss.detach()), **parts}.items():
                totals[k] = totals.get(k, 0.0) + v
            bar.set_postfix(loss=f"{totals['loss'] / steps:.4f}")
        valid = evaluate(model, valid_ds) if valid_ds.num_requests else {}
        history.append({"epoch": epoch + 1, **{k: v / max(steps, 1) for k, v in totals.items()}, "valid": valid})
        state = {"epoch": epoch + 1, "history": history, "seed": cfg.seed}
        save_checkpoint(out, model, dataclasses.asdict(cfg), state, optimizer_tensors(model, opt))
    report = {
        "test": evaluate(model, test_ds),
        "history": history,
        "seconds": time.perf_counter() - started,
        "parameters": sum(p.numel() for p in model.parameters()),
        "device": str(device),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return model, report
